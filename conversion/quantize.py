"""Quantize a LLaVA-UHD folder's language model into a compressed-tensors checkpoint that vLLM serves.

    python -m conversion.quantize FOLDER --scheme {w8a8-int8,w4a16} --output DIR [--overwrite] [--device cpu]

Only the language model's linear layers are quantized, by round-to-nearest: `w8a8-int8` (int8 weights, one scale per
output channel; activations quantized per token at run time) or `w4a16` (int4 weights in groups of 128 along the
input, one scale per group; activations stay in 16 bits). The vision tower, the resampler and `lm_head` keep their
weights, and the checkpoint's `quantization_config` lists them in `ignore`. transformers loads the folder too (with
`compressed-tensors` installed), dequantizing the weights.

The weights stream: one source tensor at a time is read, quantized and written to shards of at most
`--max-shard-size` GiB. The output is written as the converter writes its own (`conversion.convert_llava_uhd`): in a
hidden staging folder, checked, then moved into place with a manifest; an earlier quantization there is replaced only
with `--overwrite`, and a folder holding anything else, or that is the source, is refused.
"""

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration

from .common import ConversionError, OneLineParser, one_line, print_summary, read_json, reported
from .convert_llava_uhd import ShardWriter, iter_tensors, weight_files
from .output import (
    MANIFEST,
    check_output,
    converted_files,
    move_into_place,
    staging_folder,
    tidy_siblings,
    write_manifest,
)

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

# `--scheme` -> (compressed-tensors preset, compressed-tensors format: how the weights are stored).
SCHEMES = {"w8a8-int8": ("W8A8", "int-quantized"), "w4a16": ("W4A16", "pack-quantized")}
# Not quantized: the tower and the resampler (any name holding them: transformers' `model.vision_tower.`, vLLM's
# `vision_tower.vision_model.`) and the LM head.
IGNORE = ["lm_head", r"re:.*vision_tower\..*", r"re:.*resampler\..*"]
TARGETS = ["Linear"]
# Source files not copied: the weights and the manifest are written anew, config.json gets the quantization config.
REWRITTEN = {"config.json", MANIFEST, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def quantization_config(scheme: str) -> "QuantizationConfig":
    """The checkpoint's compressed-tensors config for `--scheme` (an unknown one is refused, listing the known)."""
    if scheme not in SCHEMES:
        raise ConversionError(f"--scheme {scheme!r} is unknown; choose one of {', '.join(SCHEMES)}.")
    try:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    except ImportError as error:
        raise ConversionError('Quantizing needs compressed-tensors: pip install "llava-uhd[quant]".') from error
    preset, storage = SCHEMES[scheme]
    return QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, TARGETS)},
        ignore=IGNORE,
        format=storage,
        quantization_status=QuantizationStatus.COMPRESSED,
    )


def quantize_weight(weight: torch.Tensor, scheme: "QuantizationScheme", storage: str) -> dict[str, torch.Tensor]:
    """A linear layer's weight `[out, in]` as the tensors of its compressed module (names without the module's
    prefix), rounded to nearest with the symmetric min-max scales of `scheme`, stored as the compressed-tensors
    format `storage`; the scales are kept in the weight's dtype, and the weight is rounded with exactly those."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    full = values = weight.float()  # one float32 copy, for the scales and the rounding
    if args.strategy == QuantizationStrategy.GROUP:  # [out, in / group, group] -> scales [out, in / group]
        values, keepdim = full.unflatten(-1, (-1, args.group_size)), False
    else:  # one scale per output channel, [out, 1]
        keepdim = True
    scale, zero_point = calculate_qparams(values.amin(-1, keepdim=keepdim), values.amax(-1, keepdim=keepdim), args)
    scale = scale.to(weight.dtype)
    state = {"weight": full, "weight_scale": scale.float(), "weight_zero_point": zero_point}
    compressed = BaseCompressor.get_value_from_registry(storage).compress(state, scheme)
    if "weight_scale" in compressed:
        compressed["weight_scale"] = scale
    return compressed


def check_device(device: str, scheme: "QuantizationScheme", storage: str) -> torch.device:
    """`device` as a torch device, once a small weight was quantized there with `scheme`."""
    try:
        probe = torch.ones(32, 256, device=device) / 7
        for tensor in quantize_weight(probe.to(torch.bfloat16), scheme, storage).values():
            tensor.cpu()  # a device without storage (meta) fails here
    except (RuntimeError, ValueError, AssertionError, NotImplementedError) as error:
        raise ConversionError(
            f"--device {device!r} cannot run this scheme's quantization ({one_line(error)})."
        ) from error
    return probe.device


def source_config(folder: Path) -> dict:
    """The source's config.json, refused unless it is an unquantized LLaVA-UHD model."""
    if not (folder / "config.json").is_file():
        raise ConversionError(f"FOLDER {folder} has no config.json; expected a converted LLaVA-UHD folder.")
    config = read_json(folder / "config.json")
    if config.get("model_type") != LlavaUhdConfig.model_type:
        raise ConversionError(
            f"FOLDER {folder} holds a {config.get('model_type')!r} model, not {LlavaUhdConfig.model_type!r}."
        )
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "unknown method")
        raise ConversionError(
            f"FOLDER {folder} is already quantized ({method}); quantize the unquantized folder it came from."
        )
    return config


def quantized_layers(config: dict, scheme: "QuantizationScheme") -> dict[str, torch.Size]:
    """`{module name: weight shape}` of the layers the scheme quantizes (the `Linear` modules outside `ignore`), from
    the model built on the meta device; a width the scheme cannot group is refused, naming the layer."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.utils.match import match_named_modules

    with torch.device("meta"):
        model = LlavaUhdForConditionalGeneration(LlavaUhdConfig.from_dict(config))
    layers = {name: module.weight.shape for name, module in match_named_modules(model, TARGETS, ignore=IGNORE)}
    group = scheme.weights.group_size if scheme.weights.strategy == QuantizationStrategy.GROUP else None
    for name, shape in layers.items():
        if group and shape[-1] % group:
            raise ConversionError(
                f"{name} has {shape[-1]} inputs, not a multiple of this scheme's group of {group}; choose w8a8-int8."
            )
    return layers


def write_quantized_weights(
    staging: Path,
    source: Path,
    layers: dict[str, torch.Size],
    scheme: "QuantizationScheme",
    storage: str,
    device: torch.device,
    max_shard_size: float,
) -> list[str]:
    """Stream the source's tensors into shards in `staging`, the weights of `layers` quantized; returns the shard
    names. A layer the source lacks, or holds in another shape, is refused."""
    writer = ShardWriter(staging, int(max_shard_size * 2**30))
    found = set()
    for path in weight_files(source):
        for name, tensor in iter_tensors(path):
            module = name.removesuffix(".weight")
            if module not in layers:
                writer.add(name, tensor)
                continue
            if tensor.shape != layers[module]:
                raise ConversionError(
                    f"{path.name}: {name} is {tuple(tensor.shape)}, expected {tuple(layers[module])}."
                )
            found.add(module)
            for key, value in quantize_weight(tensor.to(device), scheme, storage).items():
                writer.add(f"{module}.{key}", value.cpu())
    if missing := sorted(set(layers) - found):
        raise ConversionError(f"FOLDER {source} lacks the weights of {len(missing)} layers: {', '.join(missing[:5])}.")
    return writer.finish()


def quantize(
    folder: str | Path,
    scheme: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    max_shard_size: float = 5.0,
) -> dict:
    """Quantize the LLaVA-UHD model in `folder` with `scheme` into `output`, as the command line does (its flags name
    the parameters); returns a summary."""
    config = quantization_config(scheme)
    (group,) = config.config_groups.values()
    storage = config.format
    if not 0 < max_shard_size < float("inf"):
        raise ConversionError(f"--max-shard-size must be a positive number of GiB, got {max_shard_size}.")
    source = Path(folder).expanduser().resolve()
    if not source.is_dir():
        raise ConversionError(f"FOLDER {folder!r}: no such folder.")
    output = Path(output).expanduser().resolve()
    tidy_siblings(output)
    check_output(output, {"FOLDER": source}, overwrite)
    model_config = source_config(source)
    target = check_device(device, group, storage)
    layers = quantized_layers(model_config, group)

    with staging_folder(output) as staging:
        shards = write_quantized_weights(staging, source, layers, group, storage, target, max_shard_size)
        for path in sorted(source.iterdir()):
            is_weights = path.suffix in {".safetensors", ".bin"}
            if path.is_file() and not path.name.startswith(".") and path.name not in REWRITTEN and not is_weights:
                shutil.copyfile(path, staging / path.name)
        (staging / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        from compressed_tensors.compressors import ModelCompressor

        ModelCompressor(quantization_config=config).update_config(str(staging))
        write_manifest(staging)
        converted_files(staging, hashes=False)
        check_output(output, {"FOLDER": source}, overwrite)  # again: the folder may have changed meanwhile
        move_into_place(staging, output)
    return {
        "scheme": f"{scheme} ({storage}, round-to-nearest)",
        "quantized": f"{len(layers)} linear layers of the language model",
        "ignored": ", ".join(IGNORE),
        "shards": shards,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m conversion.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", metavar="FOLDER", help="an unquantized LLaVA-UHD folder (a conversion's output)")
    parser.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    parser.add_argument("--output", required=True, help="folder to write the quantized model to (new or empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier quantization in --output, once the new one has succeeded",
    )
    parser.add_argument("--device", help="where the weights are rounded (cpu, cuda, ...)")
    parser.add_argument("--max-shard-size", type=float, help="output shard size in GiB")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    parser.set_defaults(**quantize.__kwdefaults__)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {name: getattr(args, name) for name in quantize.__kwdefaults__}  # the flags name the keywords
    summary = reported("quantization failed", lambda: quantize(args.folder, args.scheme, args.output, **options), args.debug)
    if summary is None:
        return 1
    print_summary(f"Quantized LLaVA-UHD checkpoint in {args.output}", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
