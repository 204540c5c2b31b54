"""Convert the authors' LLaVA-UHD checkpoints (LLaVA layout) into a Hub-native LLaVA-UHD folder.

    python -m conversion.convert_llava_uhd --original DIR_OR_REPO --vision-tower DIR_OR_REPO --output DIR \\
        [--dtype bfloat16] [--overwrite] [--push-to-hub ORG/NAME [--public]]

The conversion streams: each input shard is read tensor by tensor and output shards are written as soon as they
fill, so peak memory stays near one output shard plus the largest input tensor, not the model size.

It writes into a hidden staging folder beside `--output` and moves it into place only once it is complete and
checked, so `--output` is never half-written: it is created, or with `--overwrite` an earlier conversion there is
replaced (unless a file of it changed since, such as a hand-edited model card). A folder holding anything else is
refused, and so is one that is, holds or lies inside a source. An `--output` that a rename cannot replace (a mount
point, such as a container volume) is staged inside, on its own disk, and the files are moved in at the end.
"""

import argparse
import json
import math
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, GenerationConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import modeling_llava_uhd
from modeling_llava_uhd import (
    BUNDLE_FILES,
    LlavaUhdConfig,
    LlavaUhdForConditionalGeneration,
    LlavaUhdImageProcessor,
    LlavaUhdProcessor,
)
from modeling_llava_uhd.configuration_llava_uhd import PAD_VOCAB_TO

from .common import ConversionError, OneLineParser, print_summary, read_json, reported
from .model_card import write_model_card
from .output import (
    check_output,
    converted_files,
    move_into_place,
    staging_folder,
    tidy_siblings,
    write_manifest,
)
from .tokenizer import prepare_tokenizer

# Separator ids the reference inserts for every tokenizer (Vicuna's ',' and '\n').
REFERENCE_SLICE_SEPARATOR_ID = 29892
REFERENCE_ROW_SEPARATOR_ID = 13
STAGE1_PROJECTOR = "mm_projector.bin"
# Keys of original checkpoints that hold nothing to convert (recomputed buffers, frozen CLIP copies).
IGNORED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.vision_tower\.)")
# The projector's keys keep their names. The key third of `attn.in_proj_bias` is carried over but changes no output (it
# adds `query . b_k` to every score of a query, which softmax ignores): no test can tell it, so none tries.
KEY_RULES = (
    (re.compile(r"^model\.mm_projector\.(.+)$"), r"model.resampler.\1"),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
    (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
)
VISION_RULE = (re.compile(r"^vision_model\.(.+)$"), r"model.vision_tower.\1")
VISION_IGNORED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale)")
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
EMBEDDING_CHUNK = 1024  # rows of an embedding read at a time (in float64) to grow it
# LLM families the converter maps (a word of the original's `model_type` / `architectures` -> transformers model type).
SUPPORTED_LLMS = {"qwen": "qwen2", "llama": "llama"}
# LLaVA-only fields of the original config.json that are not part of the language model's config.
LLAVA_FIELDS = re.compile(r"^(mm_|image_|tune_|freeze_|tokenizer_|use_mm|unfreeze)")


def resolve(source: str, flag: str, allow_patterns: list[str] | None = None) -> tuple[Path, str | None]:
    """`(folder, repo_id)`: a local folder (`repo_id` None), or a Hub repo `org/name` downloaded with huggingface_hub.
    A `source` that is neither (`./x`, `/x`, `~/x`, `a/b/c`, `x`) is reported as a missing folder."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{flag} {source!r} is a file; expected a checkpoint folder or a Hub repo id.")
        return path.resolve(), None
    try:
        validate_repo_id(source)  # refuses `.`, `~`, `\`, a leading `/` and more than one `/`
        is_repo_id = source.count("/") == 1
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise ConversionError(f"{flag} {source!r}: no such folder (and not a Hub repo id of the form org/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=allow_patterns)), source
    except Exception as error:  # huggingface_hub raises many types: missing repo, no network, offline mode, ...
        raise ConversionError(
            f"{flag} {source!r} is no local folder and could not be downloaded from the Hub ({type(error).__name__}: "
            f"{error})"
        ) from error


def check_arguments(pad_vocab_to: int, max_shard_size: float, resampler_num_heads: int | None) -> None:
    """Refuse values that would fail later, before anything is read or written."""
    if pad_vocab_to < 1:
        raise ConversionError(f"--pad-vocab-to must be a positive integer, got {pad_vocab_to}.")
    if not 0 < max_shard_size < math.inf:
        raise ConversionError(f"--max-shard-size must be a positive number of GiB, got {max_shard_size}.")
    if resampler_num_heads is not None and resampler_num_heads < 1:
        raise ConversionError(f"--resampler-num-heads must be a positive integer, got {resampler_num_heads}.")


def check_push_target(repo_id: str) -> None:
    """Refuse a `--push-to-hub` value that is no Hub repo id, before converting."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConversionError(f"--push-to-hub {repo_id!r} is not a Hub repo id: {error}") from error


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors first, else PyTorch `.bin` files; anything else is refused.
    A stage-1 `mm_projector.bin` is not a shard of the model (see `--text-model`). A shard that the format's index
    (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) names but the folder lacks is reported by name."""
    for pattern in ("*.safetensors", "*.bin"):
        for index in sorted(folder.glob(f"{pattern}.index.json")):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no `weight_map` object.")
            absent = sorted(str(name) for name in set(weight_map.values()) if not (folder / str(name)).is_file())
            if absent:
                raise ConversionError(f"{folder} lacks {', '.join(absent)}, named in {index.name} (incomplete copy?).")
        files = sorted(p for p in folder.glob(pattern) if p.name != STAGE1_PROJECTOR)
        if files:
            return files
    others = sorted(p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack"})
    detail = f" (found {', '.join(others)}; only .safetensors and .bin are read)" if others else ""
    raise ConversionError(f"No *.safetensors or *.bin weights in {folder}{detail}.")


def iter_tensors(path: Path, keep=lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of one shard for the names `keep` accepts, one tensor in memory at a time for safetensors
    (memory-mapped for .bin)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as shard:
                for name in shard.keys():
                    if keep(name):
                        yield name, shard.get_tensor(name)
        except SafetensorError as error:
            raise ConversionError(f"{path} is not a valid safetensors file: {error}") from error
        return
    try:  # only zip files (torch >= 1.6's format) can be memory-mapped; legacy files are read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises many types for corrupt or unsafe pickles
        raise ConversionError(f"{path} could not be read as a PyTorch state dict ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors.")
    yield from ((name, tensor) for name, tensor in state.items() if keep(name))


def text_config_from(original: dict) -> dict:
    """The language model's config from an original LLaVA config.json (Llama/Vicuna or Qwen2); other LLM families are
    refused, naming the supported ones."""
    kinds = " ".join([str(original.get("model_type", "")), *map(str, original.get("architectures") or [])]).lower()
    model_type = next((family for key, family in SUPPORTED_LLMS.items() if key in kinds), None)
    if model_type is None:
        raise ConversionError(
            f"The original's LLM ({kinds.strip() or 'no model_type or architectures'}) is not supported; supported: "
            f"{', '.join(sorted(set(SUPPORTED_LLMS.values())))} (Llama covers Vicuna)."
        )
    known = set(CONFIG_MAPPING[model_type]().to_dict())
    fields = {k: v for k, v in original.items() if k in known and not LLAVA_FIELDS.match(k)}
    fields.pop("architectures", None)
    return {**fields, "model_type": model_type}


def read_original_config(original: Path) -> dict:
    """The original checkpoint's config.json."""
    config_path = original / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{original} has no config.json; expected an original LLaVA-UHD checkpoint folder.")
    return read_json(config_path)


def model_sources(original: Path, text_folder: Path, separate_llm: bool) -> list[Path]:
    """The weight files holding the LLM and the projector: the original's shards, or with a separate LLM
    (`--text-model`) the stage-1 `mm_projector.bin` (when there is one) and the LLM's shards. A stage-1 folder without
    a separate LLM is refused."""
    stage1 = original / STAGE1_PROJECTOR
    if not separate_llm and stage1.is_file() and not any(original.glob("*.safetensors")):
        if not [p for p in original.glob("*.bin") if p.name != STAGE1_PROJECTOR]:
            raise ConversionError(f"{original} is a stage-1 folder ({STAGE1_PROJECTOR} only): pass the LLM as --text-model.")
    return ([stage1] if separate_llm and stage1.is_file() else []) + weight_files(text_folder)


def count_queries(sources: list[Path], original: Path) -> int:
    """The resampler's query count, from the shape of `model.mm_projector.query` (the only tensor read); refused when
    `sources` hold no resampler query."""
    is_query = lambda name: name == "model.mm_projector.query"  # noqa: E731
    for path in sources:
        for _, query in iter_tensors(path, keep=is_query):
            return query.shape[0]
    hint = " (a stage-1 folder: pass the LLM as --text-model)" if (original / STAGE1_PROJECTOR).is_file() else ""
    raise ConversionError(
        f"No `model.mm_projector.*` weights in {', '.join(p.name for p in sources)}: not a LLaVA-UHD checkpoint{hint}."
    )


def build_config(
    original: dict, vision_folder: Path, num_queries: int, resampler_num_heads: int | None
) -> LlavaUhdConfig:
    """The LLaVA-UHD config from the original's config.json, the CLIP folder's config and the projector's query
    count, naming the architecture (as `save_pretrained` would: serving engines pick the model by it);
    `image_token_id` is set once the tokenizer is known (`fit_vocabulary`)."""
    text_config = text_config_from(original)
    spatial = original.get("mm_projector_type") == "adapt_spatial_resampler"
    try:
        vision_config = CLIPVisionConfig.from_pretrained(vision_folder)
    except (OSError, ValueError) as error:
        raise ConversionError(f"--vision-tower {vision_folder} is not a CLIP checkpoint: {error}") from error
    return LlavaUhdConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        projector_type="spatial_resampler" if spatial else "resampler",
        num_queries=num_queries,
        resampler_num_heads=resampler_num_heads,  # `None`: the config's rule for the projector type
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        image_token_id=0,  # set once the tokenizer has its <image> token
        architectures=[LlavaUhdForConditionalGeneration.__name__],
    )


def tokenizer_folder(original: Path, text_folder: Path) -> Path:
    """The original when it holds a tokenizer, else the LLM's folder."""
    names = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
    return original if any((original / name).is_file() for name in names) else text_folder


def build_processor(tokenizer, num_queries: int, slice_separator_id: int, row_separator_id: int) -> LlavaUhdProcessor:
    """The processor to save with the conversion; building it validates the separator ids against the tokenizer."""
    try:
        return LlavaUhdProcessor(
            image_processor=LlavaUhdImageProcessor(),
            tokenizer=tokenizer,
            num_queries=num_queries,
            slice_separator_id=slice_separator_id,
            row_separator_id=row_separator_id,
        )
    except ValueError as error:
        raise ConversionError(str(error)) from error


def fit_vocabulary(config: LlavaUhdConfig, tokenizer, pad_vocab_to: int) -> None:
    """Point `config` at the tokenizer's `<image>` and pad tokens, and make its vocabulary cover the tokenizer, rounded
    up to a multiple of `pad_vocab_to` (never below the original's)."""
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = -(-len(tokenizer) // pad_vocab_to) * pad_vocab_to
    config.text_config.vocab_size = max(vocab_size, config.text_config.vocab_size)
    config.text_config.pad_token_id = tokenizer.pad_token_id


def grow_embedding(weight: torch.Tensor, rows: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` with rows appended up to `rows`, drawn deterministically from a normal with the existing
    rows' mean and 1e-5 x their covariance (as transformers' LLaVA conversion does).

    A draw is `mean + sqrt(1e-5 / n) * z @ (weight - mean)` with `z` standard normal over the `n` existing rows, whose
    covariance is exactly that: no covariance matrix to build and factorise (at 32000 x 5120 that took minutes and
    several float64 copies of the matrix), and `weight` is read in float64 chunks, so memory stays near the output."""
    count, width = weight.shape
    if rows <= count:
        return weight.to(dtype)
    z = torch.randn(rows - count, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    total, mixed = torch.zeros(width, dtype=torch.float64), torch.zeros(rows - count, width, dtype=torch.float64)
    for start in range(0, count, EMBEDDING_CHUNK):
        chunk = weight[start : start + EMBEDDING_CHUNK].double()
        total += chunk.sum(0)
        mixed += z[:, start : start + EMBEDDING_CHUNK] @ chunk
    mean = total / count
    grown = torch.empty(rows, width, dtype=dtype)
    grown[:count] = weight
    grown[count:] = mean + (mixed - z.sum(1, keepdim=True) * mean) * math.sqrt(1e-5 / count)
    return grown


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` as they come, then names them and the index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.folder / f"part-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        count = len(self.shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for i, name in enumerate(names):
            (self.folder / f"part-{i:05d}.tmp").rename(self.folder / name)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {key: name for name, keys in zip(names, self.shards) for key in sorted(keys)},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def map_key(name: str) -> str | None:
    for pattern, replacement in KEY_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def renamed_tensors(sources: list[Path], vision_files: list[Path]) -> Iterator[tuple[str, str | None, torch.Tensor]]:
    """`(source key, new name, tensor)` for every tensor worth converting, one at a time with a progress bar over the
    files; the new name is None where no rule maps the key, which is given as `file: key`."""
    for path in tqdm(sources + vision_files, desc="Converting shards", unit="shard", disable=None):
        for key, tensor in iter_tensors(path):
            if path in vision_files:
                if VISION_IGNORED.match(key):
                    continue
                pattern, replacement = VISION_RULE
                name = pattern.sub(replacement, key) if pattern.match(key) else None
            else:
                if IGNORED_KEYS.search(key):
                    continue
                name = map_key(key)
            yield f"{path.name}: {key}", name, tensor


def write_weights(
    folder: Path,
    sources: list[Path],
    vision_files: list[Path],
    expected: dict[str, torch.Size],
    vocab_size: int,
    dtype: torch.dtype,
    max_shard_size: float,
) -> list[str]:
    """Stream the renamed tensors into `dtype` shards of at most `max_shard_size` GiB in `folder`, the embeddings grown
    to `vocab_size` rows, and return the shard names. Unmapped keys, shapes that differ from `expected` and keys it
    names that no source holds are refused, listed."""
    writer = ShardWriter(folder, int(max_shard_size * 2**30))
    written, unmapped, mismatched = set(), [], []
    for source_key, name, tensor in renamed_tensors(sources, vision_files):
        if name is None:
            unmapped.append(source_key)
            continue
        if name in EMBEDDING_KEYS:
            tensor = grow_embedding(tensor, vocab_size, EMBEDDING_KEYS.index(name), dtype)
        if name not in expected:
            unmapped.append(name)
        elif tuple(tensor.shape) != tuple(expected[name]):
            mismatched.append(f"{name}: {tuple(tensor.shape)} != expected {tuple(expected[name])}")
        elif name not in written:
            written.add(name)
            writer.add(name, tensor.to(dtype))
    missing = sorted(set(expected) - written)
    problems = [("unmapped keys", unmapped), ("shape mismatches", mismatched), ("missing keys", missing)]
    if any(items for _, items in problems):
        details = "; ".join(f"{len(items)} {what}: {', '.join(items[:20])}" for what, items in problems if items)
        raise ConversionError(f"The checkpoint does not map onto LLaVA-UHD: {details}.")
    return writer.finish()


def write_folder_files(
    folder: Path, config: LlavaUhdConfig, processor: LlavaUhdProcessor, original: str | Path, vision_tower: str | Path
) -> None:
    """Write everything beside the weights: config, modeling code, generation config, processor and model card
    (`original` and `vision_tower` as `write_model_card` takes them)."""
    config.save_pretrained(folder)
    package = Path(modeling_llava_uhd.__file__).parent
    for name in BUNDLE_FILES:
        shutil.copyfile(package / name, folder / name)
    tokenizer = processor.tokenizer
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_model_card(folder, config, original, vision_tower)


def convert(
    original: str,
    vision_tower: str,
    output: str | Path,
    *,
    dtype: str = "bfloat16",
    text_model: str | None = None,
    slice_separator_id: int = REFERENCE_SLICE_SEPARATOR_ID,
    row_separator_id: int = REFERENCE_ROW_SEPARATOR_ID,
    resampler_num_heads: int | None = None,
    pad_vocab_to: int = PAD_VOCAB_TO,
    max_shard_size: float = 5.0,
    overwrite: bool = False,
) -> dict:
    """Convert the `original` checkpoint and its CLIP `vision_tower` (local folders or Hub repo ids) into `output`, as
    the command line does (its flags name the parameters); returns a summary of the conversion."""
    check_arguments(pad_vocab_to, max_shard_size, resampler_num_heads)
    original_folder, original_repo = resolve(original, "--original")
    vision_folder, vision_repo = resolve(vision_tower, "--vision-tower", ["*.json", "*.safetensors", "*.bin"])
    # A stage-1 folder holds only `mm_projector.bin`; its LLM then comes from --text-model.
    text_folder = resolve(text_model, "--text-model")[0] if text_model else original_folder
    output = Path(output).expanduser().resolve()
    folders = {"--original": original_folder, "--vision-tower": vision_folder, "--text-model": text_folder}
    tidy_siblings(output)
    check_output(output, folders, overwrite)

    original_config = read_original_config(original_folder)
    sources = model_sources(original_folder, text_folder, separate_llm=bool(text_model))
    config = build_config(original_config, vision_folder, count_queries(sources, original_folder), resampler_num_heads)
    tokenizer = prepare_tokenizer(tokenizer_folder(original_folder, text_folder))
    processor = build_processor(tokenizer, config.num_queries, slice_separator_id, row_separator_id)
    original_vocab = config.text_config.vocab_size
    fit_vocabulary(config, tokenizer, pad_vocab_to)
    weights_dtype = getattr(torch, dtype)
    config.dtype = dtype
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaUhdForConditionalGeneration(config).state_dict().items()}

    vision_files = weight_files(vision_folder)
    with staging_folder(output) as staging:
        shards = write_weights(
            staging, sources, vision_files, expected, config.text_config.vocab_size, weights_dtype, max_shard_size
        )
        write_folder_files(staging, config, processor, original_repo or original_folder, vision_repo or vision_folder)
        write_manifest(staging)
        converted_files(staging, hashes=False)  # its manifest was hashed from these very files
        check_output(output, folders, overwrite)  # again: the folder may have changed while we converted
        move_into_place(staging, output)

    return {
        "parameters": sum(int(torch.Size(s).numel()) for s in expected.values()),
        "dtype": dtype,
        "projector_type": config.projector_type,
        "num_queries": config.num_queries,
        "vocab_size": f"{original_vocab} -> {config.text_config.vocab_size} (<image> = {config.image_token_id})",
        "shards": shards,
        "files": sorted(p.name for p in output.iterdir()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m conversion.convert_llava_uhd", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="original checkpoint folder or Hub repo id")
    parser.add_argument("--vision-tower", required=True, help="CLIP checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write the converted model to (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion in --output, once the new one has succeeded")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--text-model", help="LLM folder or Hub repo id, when --original is a stage-1 folder")
    parser.add_argument("--slice-separator-id", type=int)
    parser.add_argument("--row-separator-id", type=int)
    parser.add_argument("--resampler-num-heads", type=int, help="override the resampler's head count")
    parser.add_argument("--pad-vocab-to", type=int, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--max-shard-size", type=float, help="output shard size in GiB")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the conversion (see conversion.publish)")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.set_defaults(**convert.__kwdefaults__)  # one home for the defaults: convert's signature
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> dict:
        if args.push_to_hub:
            check_push_target(args.push_to_hub)
        options = {name: getattr(args, name) for name in convert.__kwdefaults__}  # the flags name the keywords
        return convert(args.original, args.vision_tower, args.output, **options)

    summary = reported("conversion failed", run, args.debug)
    if summary is None:
        return 1
    print_summary("Converted LLaVA-UHD checkpoint", summary)
    if args.push_to_hub:
        from .publish import publish

        what = f"publish failed (the conversion in {args.output} is complete)"
        report = reported(what, lambda: publish(args.output, args.push_to_hub, public=args.public), args.debug)
        if report is None:
            return 1
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
