"""Convert the authors' LLaVA-UHD checkpoints (LLaVA layout) into a Hub-native LLaVA-UHD folder.

    python -m conversion.convert_llava_uhd --original DIR_OR_REPO --vision-tower DIR_OR_REPO --output DIR \\
        [--dtype bfloat16] [--push-to-hub ORG/NAME [--private]]

The conversion streams: each input shard is read tensor by tensor and output shards are written as soon as they
fill, so peak memory stays near one output shard plus the largest input tensor, not the model size.
"""

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, GenerationConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import modeling_llava_uhd
from modeling_llava_uhd import (
    LlavaUhdConfig,
    LlavaUhdForConditionalGeneration,
    LlavaUhdImageProcessor,
    LlavaUhdProcessor,
)

from .model_card import write_model_card
from .tokenizer import TokenizerConversionError, load_original_tokenizer

# Separator ids the reference inserts for every tokenizer (Vicuna's ',' and '\n').
REFERENCE_SLICE_SEPARATOR_ID = 29892
REFERENCE_ROW_SEPARATOR_ID = 13
STAGE1_PROJECTOR = "mm_projector.bin"
BUNDLE_FILES = (
    "configuration_llava_uhd.py",
    "modeling_llava_uhd.py",
    "image_processing_llava_uhd.py",
    "processing_llava_uhd.py",
)
# Keys of original checkpoints that hold nothing to convert (recomputed buffers, frozen CLIP copies).
IGNORED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.vision_tower\.)")
KEY_RULES = (
    (re.compile(r"^model\.mm_projector\.(.+)$"), r"model.resampler.\1"),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
    (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
)
VISION_RULE = (re.compile(r"^vision_model\.(.+)$"), r"model.vision_tower.\1")
VISION_IGNORED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale)")
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# LLaVA-only fields of the original config.json that are not part of the language model's config.
LLAVA_FIELDS = re.compile(r"^(mm_|image_|tune_|freeze_|tokenizer_|use_mm|unfreeze)")


class ConversionError(ValueError):
    """The original checkpoint cannot be converted; the message says what is wrong."""


def resolve(source: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a Hub repo id downloaded with huggingface_hub."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source!r} is a file; expected a checkpoint folder or a Hub repo id.")
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=allow_patterns))


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors first, else PyTorch `.bin` files; anything else is refused.
    A stage-1 `mm_projector.bin` is not a shard of the model (see `--text-model`)."""
    for pattern in ("*.safetensors", "*.bin"):
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe pickles
        raise ConversionError(f"{path} could not be read as a PyTorch state dict ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors.")
    yield from ((name, tensor) for name, tensor in state.items() if keep(name))


def text_config_from(original: dict) -> dict:
    """The language model's config from an original LLaVA config.json (Llama/Vicuna or Qwen2)."""
    kinds = " ".join([original.get("model_type", ""), *original.get("architectures", [])]).lower()
    model_type = "qwen2" if "qwen" in kinds else "llama"
    known = set(CONFIG_MAPPING[model_type]().to_dict())
    fields = {k: v for k, v in original.items() if k in known and not LLAVA_FIELDS.match(k)}
    fields.pop("architectures", None)
    return {**fields, "model_type": model_type}


def build_config(original: dict, vision_folder: Path, projector: dict[str, torch.Tensor], args) -> LlavaUhdConfig:
    text_config = text_config_from(original)
    spatial = original.get("mm_projector_type") == "adapt_spatial_resampler"
    vision_config = CLIPVisionConfig.from_pretrained(vision_folder)
    # The release ties heads to the LLM width; the paper's code used the vision width (1024 // 128 = 8).
    default_heads = (text_config["hidden_size"] if spatial else vision_config.hidden_size) // 128
    return LlavaUhdConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        projector_type="spatial_resampler" if spatial else "resampler",
        num_queries=projector["model.mm_projector.query"].shape[0],
        resampler_num_heads=args.resampler_num_heads or max(default_heads, 1),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        image_token_id=0,  # set once the tokenizer has its <image> token
    )


def prepare_tokenizer(source: str | Path):
    """The original tokenizer (see `load_original_tokenizer`) with `<image>`, and `<pad>` when it has no pad token."""
    try:
        tokenizer = load_original_tokenizer(source)
    except TokenizerConversionError as error:
        raise ConversionError(str(error)) from error
    added = {}
    if "<image>" not in tokenizer.get_vocab():
        added["additional_special_tokens"] = ["<image>"]
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    return tokenizer


def grow_embedding(weight: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Append rows drawn from a normal with the existing rows' mean and 1e-5 x their covariance (as transformers'
    LLaVA conversion does), deterministically."""
    if rows <= weight.shape[0]:
        return weight
    old = weight.double()
    mean = old.mean(0)
    centered = old - mean
    covariance = 1e-5 * (centered.T @ centered) / old.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    scale = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows - weight.shape[0], weight.shape[1], generator=generator, dtype=torch.float64)
    return torch.cat([weight, (mean + noise @ scale.T).to(weight.dtype)])


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


def convert(args: argparse.Namespace) -> dict:
    original = resolve(args.original)
    vision_folder = resolve(args.vision_tower, ["*.json", "*.safetensors", "*.bin"])
    output = Path(args.output)
    config_path = original / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{original} has no config.json; expected an original LLaVA-UHD checkpoint folder.")
    original_config = json.loads(config_path.read_text())

    # A stage-1 folder holds only `mm_projector.bin`; its LLM then comes from --text-model.
    text_folder = Path(args.text_model) if args.text_model else original
    stage1 = original / STAGE1_PROJECTOR
    if not args.text_model and stage1.is_file() and not any(original.glob("*.safetensors")):
        if not [p for p in original.glob("*.bin") if p.name != STAGE1_PROJECTOR]:
            raise ConversionError(f"{original} is a stage-1 folder ({STAGE1_PROJECTOR} only): pass the LLM as --text-model.")
    sources = ([stage1] if args.text_model and stage1.is_file() else []) + weight_files(text_folder)
    is_projector = lambda name: name.startswith("model.mm_projector.")  # noqa: E731
    projector = {k: v for path in sources for k, v in iter_tensors(path, keep=is_projector)}
    if "model.mm_projector.query" not in projector:
        hint = " (a stage-1 folder: pass the LLM as --text-model)" if stage1.is_file() else ""
        raise ConversionError(
            f"No `model.mm_projector.*` weights in {', '.join(p.name for p in sources)}: not a LLaVA-UHD "
            f"checkpoint{hint}."
        )

    config = build_config(original_config, vision_folder, projector, args)
    has_tokenizer = any((original / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
    tokenizer = prepare_tokenizer(original if has_tokenizer else text_folder)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    try:  # validates the separator ids against the tokenizer before any weight is written
        processor = LlavaUhdProcessor(
            image_processor=LlavaUhdImageProcessor(),
            tokenizer=tokenizer,
            num_queries=config.num_queries,
            slice_separator_id=args.slice_separator_id,
            row_separator_id=args.row_separator_id,
        )
    except ValueError as error:
        raise ConversionError(str(error)) from error
    vocab_size = -(-len(tokenizer) // args.pad_vocab_to) * args.pad_vocab_to
    original_vocab = config.text_config.vocab_size
    config.text_config.vocab_size = max(vocab_size, original_vocab)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    dtype = getattr(torch, args.dtype)
    config.dtype = args.dtype

    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaUhdForConditionalGeneration(config).state_dict().items()}

    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.safetensors"):
        stale.unlink()
    writer = ShardWriter(output, int(args.max_shard_size * 2**30))
    written, unmapped, mismatched = set(), [], []

    def emit(name: str, tensor: torch.Tensor) -> None:
        if name in EMBEDDING_KEYS:
            tensor = grow_embedding(tensor.float(), config.text_config.vocab_size, seed=EMBEDDING_KEYS.index(name))
        if name not in expected:
            unmapped.append(name)
        elif tuple(tensor.shape) != tuple(expected[name]):
            mismatched.append(f"{name}: {tuple(tensor.shape)} != expected {tuple(expected[name])}")
        elif name not in written:
            written.add(name)
            writer.add(name, tensor.to(dtype))

    vision_files = weight_files(vision_folder)
    for path in tqdm(sources + vision_files, desc="Converting shards", unit="shard"):
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
            if name is None:
                unmapped.append(f"{path.name}: {key}")
            else:
                emit(name, tensor)
    missing = sorted(set(expected) - written)
    problems = [("unmapped keys", unmapped), ("shape mismatches", mismatched), ("missing keys", missing)]
    if any(items for _, items in problems):
        for tmp in output.glob("part-*.tmp"):
            tmp.unlink()
        details = "; ".join(f"{len(items)} {what}: {', '.join(items[:20])}" for what, items in problems if items)
        raise ConversionError(f"The checkpoint does not map onto LLaVA-UHD: {details}.")
    shards = writer.finish()

    config.save_pretrained(output)
    package = Path(modeling_llava_uhd.__file__).parent
    for name in BUNDLE_FILES:
        shutil.copyfile(package / name, output / name)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    generation.save_pretrained(output)
    processor.save_pretrained(output)
    write_model_card(output, config, args.original, args.vision_tower)

    summary = {
        "parameters": sum(int(torch.Size(s).numel()) for s in expected.values()),
        "dtype": args.dtype,
        "projector_type": config.projector_type,
        "num_queries": config.num_queries,
        "vocab_size": f"{original_vocab} -> {config.text_config.vocab_size} (<image> = {config.image_token_id})",
        "shards": shards,
        "files": sorted(p.name for p in output.iterdir()),
    }
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conversion.convert_llava_uhd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="original checkpoint folder or Hub repo id")
    parser.add_argument("--vision-tower", required=True, help="CLIP checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--text-model", help="LLM checkpoint folder, when --original is a stage-1 folder (mm_projector.bin)")
    parser.add_argument("--slice-separator-id", type=int, default=REFERENCE_SLICE_SEPARATOR_ID)
    parser.add_argument("--row-separator-id", type=int, default=REFERENCE_ROW_SEPARATOR_ID)
    parser.add_argument("--resampler-num-heads", type=int, help="override the resampler's head count")
    parser.add_argument("--pad-vocab-to", type=int, default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--max-shard-size", type=float, default=5.0, help="output shard size in GiB")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the converted folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = convert(args)
    except ConversionError as error:
        print(f"conversion failed: {error}")
        return 1
    print("Converted LLaVA-UHD checkpoint")
    for key, value in summary.items():
        print(f"  {key:15s} {value if not isinstance(value, list) else ', '.join(value)}")
    if args.push_to_hub:
        from .publish import publish

        print(publish(args.output, args.push_to_hub, private=args.private))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
