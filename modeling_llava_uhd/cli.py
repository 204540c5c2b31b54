"""`llava-uhd` command line: inspect how an image is sliced, or chat with a model about an image."""

import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import signal
import stat
import sys
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from .configuration_llava_uhd import DEFAULT_NUM_QUERIES, LlavaUhdConfig
from .image_processing_llava_uhd import NO_PRE_RESIZE, LlavaUhdImageProcessor, SliceLayout
from .layout_llava_uhd import schema_token_counts


class CliError(Exception):
    """A problem with what the user asked for; its message is the whole report."""


# The longest a chat template may take to render: a model folder's template is data, but its loops can be made to run
# for hours (Jinja's sandbox bounds each `range`, not their nesting).
TEMPLATE_SECONDS = 10


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (exit code 2), like every other failure of `llava-uhd`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {number}")
    return number


def _max_image_size(value: str) -> int:
    if value.lower() == "none":
        return NO_PRE_RESIZE
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'none', got {value!r}") from None


def image_token_cost(layout: SliceLayout, num_queries: int) -> tuple[int, int]:
    """(image tokens, separator tokens) an image with `layout` occupies in the LLM sequence: its spatial schema."""
    return schema_token_counts(*(layout.grid or (0, 0)), num_queries)


def not_regular(mode: int) -> str | None:
    """What a file of `st_mode` `mode` is when it is not a regular file (a folder, a FIFO...), else `None`."""
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket"}
    kinds |= {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return None if stat.S_ISREG(mode) else next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def _open_nonblocking(path: str, flags: int) -> int:
    """`os.open` that does not wait for a FIFO's writer: what it opened is checked before a byte is read."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_image(path: str) -> Image.Image:
    """The image file at `path`, decoded in full, so that a missing, unreadable, corrupt, truncated or oversized file
    fails here, with its name, before anything slow happens. Anything but a regular file (a FIFO, a device: reading
    it could block or never end) is refused unread. Images over Pillow's `Image.MAX_IMAGE_PIXELS` (a decompression
    bomb's sign) are refused, not only those over twice that."""
    try:
        with open(path, "rb", opener=_open_nonblocking) as file:
            kind = not_regular(os.fstat(file.fileno()).st_mode)
            if kind is not None:
                raise CliError(f"image {path!r} is {kind}, not an image file")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:  # keeps the decoded pixels
                    image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise CliError(
            f"image {path!r} has {size}, over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(PIL.Image.MAX_IMAGE_PIXELS): refused as a possible decompression bomb"
        ) from None
    except FileNotFoundError:
        raise CliError(f"image {path!r} does not exist") from None
    except IsADirectoryError:
        raise CliError(f"image {path!r} is a folder, not an image file") from None
    except PermissionError:
        raise CliError(f"image {path!r} cannot be read (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise CliError(f"image {path!r} is not an image file Pillow can read (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for damaged data
        if getattr(error, "errno", None) == errno.ENXIO:  # what opening a socket (or a device with no driver) raises
            raise CliError(f"image {path!r} is a socket or a device, not an image file") from None
        raise CliError(f"image {path!r} could not be decoded (corrupt or truncated): {error}") from None
    if image.width < 1 or image.height < 1:
        raise CliError(f"image {path!r} is empty ({image.width}x{image.height} pixels)")
    return image


def draw_slices(image: Image.Image, layout: SliceLayout) -> Image.Image:
    """`image` at its sliced size with the slice grid drawn on it."""
    height, width = layout.image_size
    canvas = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if layout.grid is not None:
        rows, cols = layout.grid
        draw = ImageDraw.Draw(canvas)
        line = max(2, min(width, height) // 150)
        for col in range(1, cols):
            x = round(col * width / cols)
            draw.line([(x, 0), (x, height)], fill=(255, 40, 40), width=line)
        for row in range(1, rows):
            y = round(row * height / rows)
            draw.line([(0, y), (width, y)], fill=(255, 40, 40), width=line)
    return canvas


def output_format(out: str, image: str, overwrite: bool) -> str:
    """The Pillow format `--out` is written in (from its extension), once `out` is known to be writable without
    harm: a new file in an existing folder, or with `overwrite` an existing regular file; never the input `image`
    (the same file by any path: a symlink, a hard link)."""
    path = Path(out)
    if path.is_dir():
        example = str(path / "slices.png")
        raise CliError(f"--out {out!r} is a folder; name the image file to write in it, e.g. {example!r}")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        got = repr(path.suffix) if path.suffix else "none"
        raise CliError(f"--out {out!r}: expected an image file extension Pillow writes (.png, .jpg...), got {got}")
    if path.exists() and os.path.samefile(path, image):
        raise CliError(f"--out {out!r} is the input image {image!r}; choose another file")
    if os.path.lexists(path):
        if not overwrite:
            raise CliError(f"--out {out!r} exists; pass --overwrite to replace it")
        kind = not_regular(path.stat().st_mode) if path.exists() else "a broken symlink"
        if kind is not None:
            raise CliError(f"--out {out!r} is {kind}, not a file --overwrite replaces")
    if not path.parent.is_dir():
        raise CliError(f"--out {out!r}: the folder {str(path.parent)!r} does not exist")
    return image_format


def save_image(image: Image.Image, out: str, image_format: str) -> None:
    """Write `image` to a staging file beside `out`, then rename it onto `out`: a failed or interrupted write leaves
    `out` as it was, never half-written."""
    path = Path(out)
    staging = path.with_name(f".llava-uhd-{secrets.token_hex(4)}.partial")  # short: `out`'s name may be at the limit
    try:
        with open(staging, "xb") as file:
            image.save(file, format=image_format)
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def slices(args: argparse.Namespace) -> None:
    processor = LlavaUhdImageProcessor()
    image = open_image(args.image)
    image_format = output_format(args.out, args.image, args.overwrite) if args.out else None
    if processor.apply_exif_orientation:  # the processor slices the upright photo
        image = ImageOps.exif_transpose(image)
    layout = processor.get_slice_layout(image.height, image.width, args.max_slices, args.max_image_size)
    image_tokens, separators = image_token_cost(layout, args.num_queries)
    print(f"image:     {args.image} ({image.width}x{image.height}, W x H)")
    print(f"sliced at: {layout.image_size[1]}x{layout.image_size[0]}")
    if layout.grid is None:
        print("grid:      not sliced (overview only)")
    else:
        rows, cols = layout.grid
        print(f"grid:      {rows} row(s) x {cols} column(s) = {layout.num_slices} slices")
        print(f"slice:     {layout.slice_size[1]}x{layout.slice_size[0]}")
    print(f"overview:  {layout.overview_size[1]}x{layout.overview_size[0]}")
    print(
        f"tokens:    {image_tokens} image + {separators} separator = {image_tokens + separators} "
        f"({layout.num_crops} crops x {args.num_queries} queries)"
    )
    if args.out:
        save_image(draw_slices(image, layout), args.out, image_format)
        print(f"drawn:     {args.out}")


def check_device(spec: str):
    """`spec` as a `torch.device` this machine can use, or a one-line reason why not."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {spec!r} is not a torch device; expected e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "meta":
        raise CliError("--device meta holds no weights; use cpu or a GPU such as cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CliError(f"--device {spec}: CUDA is not available ({reason}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:  # per backend; the first line says why
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CliError(f"--device {spec} is not usable on this machine: {first}") from None
    return device


def is_hub_id(model: str) -> bool:
    """Whether `--model` names a Hub repo rather than a folder; a file, or a path to nothing, is refused."""
    folder = Path(model)
    if folder.is_dir():
        return False
    if folder.exists():
        raise CliError(f"--model {model!r} is a file; expected a model folder or a Hub repo id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise CliError(f"--model {model!r}: no such folder")
    return True


def hub_unreachable(model: str) -> bool:
    """Whether Hub repo `model` must load from the local cache alone: `HF_HUB_OFFLINE` is set, or the Hub did not
    answer one request for its config.json (huggingface_hub would retry every file for about 30 s before transformers
    fell back to the cache). Refused at once if the cache does not hold it either."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            get_hf_file_metadata(hf_hub_url(model, "config.json"))
        except HfHubHTTPError:  # the Hub answered (no such repo, gated...): transformers says what
            return False
        except Exception as error:  # no answer: no network, a refused connection, DNS, a timeout, a proxy
            reason = f"the Hub at {constants.ENDPOINT} did not answer ({error})"
        else:
            return False
    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise CliError(f"--model {model!r} is not in the local Hub cache, and {reason}")
    return True


def model_config(model: str, local_files_only: bool) -> dict:
    """`config.json` of a model folder or Hub repo id, read as data: no code of the model runs."""
    if not is_hub_id(model):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise CliError(f"--model {model!r} is a folder without a config.json, not a saved model")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CliError(f"--model {model!r}: its config.json is not readable JSON ({error})") from None
    else:  # only its config.json is fetched
        from transformers import PretrainedConfig

        config, _ = PretrainedConfig.get_config_dict(model, local_files_only=local_files_only)
    if not isinstance(config, dict):
        raise CliError(f"--model {model!r}: config.json holds {type(config).__name__}, expected a JSON object")
    return config


def check_loadable(model: str, local_files_only: bool) -> None:
    """Refuse, before anything loads, a model that only its own code could load: without `--trust-remote-code`
    `llava-uhd` loads LLaVA-UHD models (config `model_type` "llava_uhd") with this package's installed classes, so
    the `.py` files a folder carries never run."""
    config = model_config(model, local_files_only)
    model_type = config.get("model_type")
    if model_type != LlavaUhdConfig.model_type:
        code = " and carries its own code (auto_map)" if "auto_map" in config else ""
        raise CliError(
            f"--model {model!r} is not a LLaVA-UHD model (config.json model_type {model_type!r}, expected "
            f"{LlavaUhdConfig.model_type!r}){code}; pass --trust-remote-code to load it with its own code, "
            f"only if you trust it"
        )


def check_source(model: str, trust_remote_code: bool) -> bool:
    """Check `--model` (a folder, or a Hub repo id) before anything loads: refused at once if it is neither, if the
    Hub does not answer and the cache lacks it, or if only its own code could load it without `trust_remote_code`.
    Returns whether it must load from the local cache alone (`local_files_only`)."""
    local_files_only = is_hub_id(model) and hub_unreachable(model)
    if not trust_remote_code:
        check_loadable(model, local_files_only)
    return local_files_only


def load_processor(model: str, trust_remote_code: bool, local_files_only: bool):
    if trust_remote_code:  # the code its auto_map names runs, as in transformers
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model, trust_remote_code=True, local_files_only=local_files_only)
    from .processing_llava_uhd import LlavaUhdProcessor

    return LlavaUhdProcessor.from_pretrained(model, trust_remote_code=False, local_files_only=local_files_only)


def load_model(model: str, trust_remote_code: bool, dtype, local_files_only: bool):
    options = {"dtype": dtype, "local_files_only": local_files_only}
    if trust_remote_code:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True, **options)
    from .modeling_llava_uhd import LlavaUhdForConditionalGeneration

    return LlavaUhdForConditionalGeneration.from_pretrained(model, trust_remote_code=False, **options)


class _TimeUp(BaseException):
    """Raised by `time_limit`'s alarm; a `BaseException`, so that no `except Exception` in the timed code takes it."""


@contextlib.contextmanager
def time_limit(seconds: float, message: str):
    """Stop the block with `CliError(message)` after `seconds` of wall time (a `SIGALRM` timer: in the main thread of a
    POSIX process; elsewhere the block runs unbounded)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TimeUp

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TimeUp:
        raise CliError(message) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def chat(args: argparse.Namespace) -> None:
    # What the user typed is checked before the model loads: a typo costs no load.
    if not args.prompt.strip():
        raise CliError("--prompt is empty; ask a question about the image")
    import torch

    device = check_device(args.device)
    image = open_image(args.image)
    if args.model is None:  # this package's own model
        from .default_model import default_model_path

        path = str(default_model_path())
    else:
        path = args.model
    local_files_only = check_source(path, args.trust_remote_code)
    if not args.debug and not sys.stderr.isatty():  # no progress bars where a script reads stderr
        from transformers.utils import logging

        logging.disable_progress_bar()
    processor = load_processor(path, args.trust_remote_code, local_files_only)
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in args.prompt:
        raise CliError(
            f"--prompt contains the image token {image_token!r}; the image goes before the prompt by itself"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    slow = f"the chat template of {path!r} ran for over {TEMPLATE_SECONDS} s (loops that never finish?); stopped"
    with time_limit(TEMPLATE_SECONDS, slow):
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = load_model(path, args.trust_remote_code, dtype, local_files_only).to(device).eval()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())


def demo(args: argparse.Namespace) -> None:
    try:
        from .demo import launch
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise CliError(
            'the demo needs Gradio, which the demo extra installs: pip install -e ".[demo]" from a checkout '
            '(or pip install "llava-uhd[demo]")'
        ) from None
    launch(args.model, args.host, args.port, args.device, args.dtype, args.trust_remote_code)


def _port(value: str) -> int:
    number = _positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 1 to 65535, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # On the command too (`llava-uhd chat ... --debug`); SUPPRESS keeps a top-level `--debug` from being reset.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog="llava-uhd", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure, not one line")
    commands = parser.add_subparsers(dest="command", required=True)

    slice_parser = commands.add_parser("slices", parents=[common], help="print (and draw) how an image is sliced")
    slice_parser.add_argument("image", help="image file")
    defaults = LlavaUhdImageProcessor  # `None`: the image processor's own setting
    slice_parser.add_argument(
        "--max-slices", type=_positive_int, help=f"most slices (default {defaults.max_slice_nums})"
    )
    slice_parser.add_argument(
        "--max-image-size",
        type=_max_image_size,
        help=f"long-side pre-resize, or 'none' (default {defaults.max_image_size})",
    )
    queries = DEFAULT_NUM_QUERIES["spatial_resampler"]
    slice_parser.add_argument(
        "--num-queries", type=_positive_int, default=queries, help=f"tokens per crop (default {queries})"
    )
    slice_parser.add_argument(
        "--out", help="write the image with the slice grid drawn on it to this new file (.png, .jpg...)"
    )
    slice_parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    slice_parser.set_defaults(func=slices)

    chat_parser = commands.add_parser("chat", parents=[common], help="answer a question about an image")
    chat_parser.add_argument(
        "--model", help="model folder or Hub repo id (default: the bundled default model, see README)"
    )
    chat_parser.add_argument("--image", required=True, help="image file")
    chat_parser.add_argument("--prompt", required=True, help="question about the image")
    chat_parser.add_argument("--max-new-tokens", type=_positive_int, default=128)
    chat_parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps ... (default cpu)")
    chat_parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat_parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's own Python files (its config's auto_map) run, as transformers' trust_remote_code does: "
        "only for a model you trust. Without it, LLaVA-UHD models load with this package's installed classes and "
        "other models are refused",
    )
    chat_parser.set_defaults(func=chat)

    demo_parser = commands.add_parser(
        "demo", parents=[common], help="serve a web page that shows the slices and chats (needs the demo extra)"
    )
    demo_parser.add_argument("--model", help="model folder or Hub repo id (default: the bundled default model)")
    demo_parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    demo_parser.add_argument("--port", type=_port, default=7860, help="TCP port (default 7860)")
    demo_parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps ... (default cpu)")
    demo_parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    demo_parser.add_argument(
        "--trust-remote-code", action="store_true", help="let the model's own Python files run (as for chat)"
    )
    demo_parser.set_defaults(func=demo)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, CliError):
        return text
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return f"{text} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run `llava-uhd`; every failure is one line on stderr and a non-zero return (2: usage, 1: other, 130: ^C),
    unless `--debug`, which lets the exception through."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, already reported in one line
        return done.code if isinstance(done.code, int) else 2
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"llava-uhd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place that turns any failure into one line
        if args.debug:
            raise
        print(f"llava-uhd {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
