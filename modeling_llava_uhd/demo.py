"""`llava-uhd demo`: a Gradio web app that shows how an image becomes slices and tokens, and chats about it.

`build_app(model, processor)` is the app; `launch` loads a model as `llava-uhd chat` does and serves it (the command
and a Hub Space's `app.py` call it). Needs the `demo` extra (Gradio). Not part of the Hub bundle.
"""

import dataclasses
import html
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .cli import (
    CliError,
    check_device,
    check_source,
    draw_slices,
    image_token_cost,
    load_model,
    load_processor,
    open_image,
)

logger = logging.getLogger(__name__)

# LLaVA-1.5 at 336 px: one CLIP ViT-L/14 crop of 336x336, one token per 14x14 patch.
LLAVA_15_TOKENS = (336 // 14) ** 2
# The repository's example images (examples/ of a checkout) and the questions the README asks about them.
EXAMPLES = (("detail.png", "Which pattern is inside the frame?"), ("coffee.jpg", "What is on the table?"))
EXAMPLES_FOLDER = Path(__file__).resolve().parents[1] / "examples"
DECODING = ("greedy", "beam search", "sampling")
NUM_BEAMS = 4
GPU_CONCURRENCY = 4  # generates at once on an accelerator; on a CPU one, since a generate already uses every core
SLICING_CONCURRENCY = 4  # grids drawn at once (no model runs)
DISPLAY_SIZE = 1024  # longest side of the drawn overlay
CACHE_SECONDS = 3600  # uploads and drawn images are deleted after an hour, and all of them when the app stops


def bundled_examples(folder: str | Path = EXAMPLES_FOLDER) -> list[tuple[str, str]]:
    """`(image path, question)` for each example image present in `folder` (none in an installed wheel)."""
    return [(str(Path(folder) / name), question) for name, question in EXAMPLES if (Path(folder) / name).is_file()]


def _refuse(title: str, message: str) -> gr.Error:
    """The message shown in the page for a request that cannot be served (as text: the page renders HTML)."""
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def _read_image(path: str) -> Image.Image:
    """The image at `path`, decoded in full, or a refusal naming the uploaded file (not its temporary path)."""
    try:
        return open_image(path)
    except CliError as error:
        raise _refuse("Not a usable image", str(error).replace(repr(path), repr(Path(path).name))) from None


def _one_image(files: list[str] | None) -> str:
    if not files:
        raise _refuse("No image", "Upload an image (or pick an example) first.")
    if len(files) > 1:
        names = ", ".join(Path(path).name for path in files)
        raise _refuse(
            "Several images", f"One image per conversation: {len(files)} files were uploaded ({names}); keep one."
        )
    return files[0]


def _label_slices(canvas: Image.Image, layout) -> None:
    """Write each slice's size (W x H; the default font has no ×) in its middle."""
    rows, cols = layout.grid
    slice_h, slice_w = layout.slice_size
    text = f"{slice_w}x{slice_h}"
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(14, min(canvas.width // cols, canvas.height // rows) // 6))
    for row in range(rows):
        for col in range(cols):
            x, y = (2 * col + 1) * canvas.width // (2 * cols), (2 * row + 1) * canvas.height // (2 * rows)
            box = draw.textbbox((x, y), text, font=font, anchor="mm")
            draw.rectangle((box[0] - 6, box[1] - 4, box[2] + 6, box[3] + 4), fill=(255, 40, 40))
            draw.text((x, y), text, fill="white", font=font, anchor="mm")


def slicing(processor, image: Image.Image, max_slice_nums: int) -> tuple[Image.Image, Image.Image, str, dict]:
    """The slice grid drawn over `image`, its overview crop, a summary for people and the figures: the processor's
    `SliceLayout` (sizes as height, width), crops, image tokens and separators, their total (what the processor
    inserts) and LLaVA-1.5's count for comparison."""
    if processor.image_processor.apply_exif_orientation:  # the processor slices the upright photo
        image = ImageOps.exif_transpose(image)
    layout = processor.image_processor.get_slice_layout(image.height, image.width, max_slice_nums)
    image_tokens, separators = image_token_cost(layout, processor.num_queries)
    figures = dataclasses.asdict(layout) | {
        "crops": layout.num_crops,
        "image_tokens": image_tokens,
        "separators": separators,
        "tokens": image_tokens + separators,
        "llava_1_5_tokens": LLAVA_15_TOKENS,
    }
    overlay = draw_slices(image, layout)
    if layout.grid is not None:
        _label_slices(overlay, layout)
    overlay.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE))
    overview_h, overview_w = layout.overview_size
    overview = image.convert("RGB").resize((overview_w, overview_h), Image.Resampling.BICUBIC)
    if layout.grid is None:
        crops = "not sliced: the overview alone"
    else:
        rows, cols = layout.grid
        slice_h, slice_w = layout.slice_size
        crops = f"{rows} × {cols} slices (rows × columns) of {slice_w}×{slice_h} px + the overview"
    summary = (
        f"### {figures['tokens']} tokens\n"
        f"{image.width}×{image.height} px, sliced at {layout.image_size[1]}×{layout.image_size[0]}: {crops} "
        f"({overview_w}×{overview_h} px) = {layout.num_crops} crops × {processor.num_queries} tokens"
        f"{f' + {separators} separators' if separators else ''}.  \n"
        f"LLaVA-1.5 at 336 px: {LLAVA_15_TOKENS} tokens for any image, one 336×336 crop."
    )
    return overlay, overview, summary, figures


class _TimedStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that notes when the first generated token arrives."""

    first_token_at: float | None = None

    def put(self, value):
        if self.first_token_at is None and not self.next_tokens_are_prompt:
            self.first_token_at = time.perf_counter()
        super().put(value)


class _Cancelled(StoppingCriteria):
    """Stops a generate once `event` is set: the page's request was cancelled or its connection closed."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def build_app(
    model,
    processor,
    examples: Sequence[tuple[str, str]] = (),
    concurrency_limit: int | None = None,
    max_queue: int = 16,
) -> gr.Blocks:
    """The demo page for a LLaVA-UHD `model` and its `processor`.

    Args:
        examples: `(image path, question)` pairs offered under the upload.
        concurrency_limit: generates at once (default: 1 on a CPU, `GPU_CONCURRENCY` elsewhere).
        max_queue: requests waiting at most; one more is refused with Gradio's "queue is full" message.
    """
    image_processor = processor.image_processor
    if not hasattr(image_processor, "get_slice_layout") or not hasattr(processor, "num_queries"):
        raise ValueError(f"the demo shows LLaVA-UHD slicing; {type(processor).__name__} is not a LLaVA-UHD processor")
    if concurrency_limit is None:
        concurrency_limit = 1 if model.device.type == "cpu" else GPU_CONCURRENCY
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    def preview(files: list[str] | None, max_slice_nums: int):
        if not files:
            return None, None, "Upload an image to see its slices.", None
        try:
            image = _read_image(_one_image(files))
        except gr.Error as error:
            return None, None, f"**{error.title}.** {error.message}", None  # the message is escaped already
        return slicing(processor, image, int(max_slice_nums))

    def respond(history: list[dict], files: list[str] | None, question: str, max_slice_nums, decoding, max_new_tokens):
        """Stream the answer to `question` after `history`: (chat, figures, question box) as it grows."""
        if not question or not question.strip():
            raise _refuse("No question", "The question is empty: ask something about the image.")
        if processor.image_token in question:
            raise _refuse(
                "Image token in the question",
                f"The question contains the image token {processor.image_token!r}; the image goes before it by itself.",
            )
        image = _read_image(_one_image(files))
        max_slice_nums, max_new_tokens = int(max_slice_nums), int(max_new_tokens)
        history = [*history, {"role": "user", "content": [{"type": "text", "text": question.strip()}]}]
        messages = [
            {"role": turn["role"], "content": [part for part in turn["content"] if part.get("type") == "text"]}
            for turn in history
        ]
        messages[0]["content"].insert(0, {"type": "image"})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, max_slice_nums=max_slice_nums, return_tensors="pt")
        prompt_tokens = inputs["input_ids"].shape[1]
        if max_positions is not None and prompt_tokens + max_new_tokens > max_positions:
            raise _refuse(
                "Conversation too long",
                f"The conversation is {prompt_tokens} tokens; with {max_new_tokens} new ones it passes this model's "
                f"{max_positions} positions. Press Clear, or lower max new tokens or max_slice_nums.",
            )
        options = {
            "greedy": {"do_sample": False, "num_beams": 1},
            "beam search": {"do_sample": False, "num_beams": NUM_BEAMS},
            "sampling": {"do_sample": True, "num_beams": 1},
        }[decoding]
        streamer = None if decoding == "beam search" else _TimedStreamer(processor.tokenizer, skip_prompt=True)
        result, cancelled = {}, threading.Event()

        def generate():
            try:
                result["output"] = model.generate(
                    **inputs.to(model.device), max_new_tokens=max_new_tokens, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]), **options,
                )  # fmt: skip
            except Exception as error:  # reported in the page; the thread must not hang the stream
                result["error"] = error
                if streamer is not None:
                    streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        answer = ""
        try:
            for piece in streamer or ():
                answer += piece
                yield [*history, {"role": "assistant", "content": answer}], gr.skip(), ""
        except GeneratorExit:  # the request was cancelled mid-stream: its generate stops before its slot is freed
            cancelled.set()
            thread.join()
            raise
        thread.join()
        end = time.perf_counter()
        if "error" in result:
            logger.error("generate failed", exc_info=result["error"])
            error = result["error"]
            raise _refuse("Generation failed", f"{type(error).__name__}: {error}")
        new_ids = result["output"][0, prompt_tokens:]
        answer = processor.decode(new_ids, skip_special_tokens=True).strip()
        first = streamer.first_token_at if streamer is not None and streamer.first_token_at else end
        figures = {
            "decoding": decoding,
            "prompt_tokens": prompt_tokens,
            "crops": len(inputs["image_grid_hw"]),
            "new_tokens": len(new_ids),
            "time_to_first_token_s": round(first - start, 3),
            "tokens_per_s": round(len(new_ids) / (end - start), 2),
        }
        yield [*history, {"role": "assistant", "content": answer}], figures, ""

    def regenerate(history: list[dict], files, max_slice_nums, decoding, max_new_tokens):
        """Answer the last question again (with the current settings)."""
        if len(history) < 2 or history[-1]["role"] != "assistant":
            raise _refuse("No answer yet", "Nothing to regenerate yet: ask a question first.")
        question = "".join(part["text"] for part in history[-2]["content"] if part.get("type") == "text")
        yield from respond(history[:-2], files, question, max_slice_nums, decoding, max_new_tokens)

    with gr.Blocks(title="LLaVA-UHD", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as app:
        gr.Markdown(
            "# LLaVA-UHD\nAn image becomes a grid of slices of about 336×336 px each, plus a low-resolution overview; "
            "every crop becomes a fixed number of tokens. Upload an image, move **max_slice_nums**, ask a question."
        )
        with gr.Row():
            with gr.Column(scale=5):
                files = gr.File(
                    label="Image", file_count="multiple", file_types=["image"], height=110, elem_id="image"
                )
                question = gr.Textbox(
                    label="Question", placeholder="Ask about the image, then press Enter", render=False
                )
                if examples:
                    gr.Examples([[[path], text] for path, text in examples], [files, question], label="Examples")
                max_slice_nums = gr.Slider(
                    1, 2 * image_processor.max_slice_nums, value=image_processor.max_slice_nums, step=1,
                    label="max_slice_nums", info="most slices per image; 1: the overview alone",
                    elem_id="max-slice-nums",
                )  # fmt: skip
                with gr.Row():
                    overlay = gr.Image(
                        label="Slices", type="pil", format="png", interactive=False, scale=3, height=440
                    )
                    overview = gr.Image(label="Overview", type="pil", format="png", interactive=False, scale=1)
                summary = gr.Markdown("Upload an image to see its slices.", elem_id="tokens")
                with gr.Accordion("Slicing figures (sizes as height, width)", open=False):
                    layout = gr.JSON(label="Slicing", show_label=False)
            with gr.Column(scale=5):
                chat = gr.Chatbot(label="Chat (Vicuna v1 template)", height=440, elem_id="chat")
                question.render()
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    again = gr.Button("Regenerate")
                    reset = gr.Button("Clear")
                with gr.Row():
                    decoding = gr.Radio(list(DECODING), value="greedy", label="Decoding")
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                figures = gr.JSON(label="This answer", elem_id="figures")

        # Drawing the grid runs no model: its own queue slots, so it never waits behind a generate.
        slicing_event = {
            "fn": preview, "inputs": [files, max_slice_nums], "outputs": [overlay, overview, summary, layout],
            "concurrency_id": "slicing", "concurrency_limit": SLICING_CONCURRENCY,
        }  # fmt: skip
        files.change(**slicing_event, api_name="preview")
        max_slice_nums.change(**slicing_event, api_visibility="private")
        files.change(lambda: ([], None), outputs=[chat, figures], api_visibility="private", queue=False)  # a new image
        settings = [max_slice_nums, decoding, max_new_tokens]
        generate_event = {"outputs": [chat, figures, question], "concurrency_id": "generate"}
        ask.click(respond, [chat, files, question, *settings], api_name="ask", **generate_event)
        question.submit(respond, [chat, files, question, *settings], api_visibility="private", **generate_event)
        again.click(regenerate, [chat, files, *settings], api_name="regenerate", **generate_event)
        reset.click(lambda: ([], None, ""), outputs=[chat, figures, question], api_name="clear", queue=False)
    return app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)


def launch(
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    examples: Sequence[tuple[str, str]] | None = None,
    **launch_kwargs,
) -> None:
    """Load `model` (a folder or Hub repo id; `None`: the bundled default model) with `llava-uhd chat`'s consent rules
    (a model's own code runs only with `trust_remote_code`) and serve the demo on `host:port` (`None`: Gradio's
    defaults, `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`, else 127.0.0.1:7860) until interrupted."""
    torch_device = check_device(device)
    if model is None:
        from .default_model import default_model_path

        model = str(default_model_path())
    local_files_only = check_source(model, trust_remote_code)
    processor = load_processor(model, trust_remote_code, local_files_only)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    loaded = load_model(model, trust_remote_code, torch_dtype, local_files_only)
    app = build_app(loaded.to(torch_device).eval(), processor, bundled_examples() if examples is None else examples)
    app.launch(server_name=host, server_port=port, **launch_kwargs)


__all__ = ["LLAVA_15_TOKENS", "build_app", "bundled_examples", "launch", "slicing"]
