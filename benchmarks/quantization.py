"""Quantized inference: weights per scheme for 7B and 13B, accuracy on the fine-detail task, and measurements at the
release's real widths, each against the unquantized anchor of the same run.

    python -m benchmarks.quantization weights                    # GB of weights per scheme, from the shapes
    python -m benchmarks.quantization detail [--images 48]       # the default model on the fine-detail task
    python -m benchmarks.quantization realwidth [--work DIR]     # Vicuna-13B width, whole CLIP ViT-L/14-336

Schemes: transformers' `quantization_config`s (bitsandbytes NF4 and int8, torchao int8 and int4 weight-only) and the
compressed-tensors checkpoints of `python -m conversion.quantize` (W8A8-int8, W4A16) loaded by transformers. torchao's
`Int4WeightOnlyConfig` needs CUDA; on a CPU `torchao-intx4` runs int4 weights through `IntxWeightOnlyConfig` (int4
values stored one per byte). `realwidth` builds the random release-width checkpoint of `tests/realwidth.py`, converts
it, and runs every scheme in a process of its own (the 1088x672 photo, 7 crops): its peak resident memory, the time
of a forward pass over the prompt (median of `--iterations`), and, over the prompt's last `--positions` positions,
how often the top-1 token equals bf16's and the largest difference of log-probability over bf16's top-20 tokens.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion.quantize import SCHEMES, quantize
from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration, default_model_path

from .common import machine, photos, print_table
from .flops import LLMS, VIT_L, text_config

ROOT = Path(__file__).resolve().parents[1]
REALWIDTH = ROOT / "tests" / "realwidth.py"
QUESTION = "What is in the picture?"
TOP_K = 20


def bnb_nf4(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def bnb_int8(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def torchao_int8(dtype: torch.dtype):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def torchao_int4(dtype: torch.dtype):
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int4WeightOnlyConfig(group_size=128))


def torchao_intx4(dtype: torch.dtype):
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup
    from transformers import TorchAoConfig

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


# transformers' `quantization_config` of each scheme, for a model loaded in `dtype`.
QUANTIZATION_CONFIGS: dict[str, Callable[[torch.dtype], object]] = {
    "bnb-nf4": bnb_nf4,
    "bnb-int8": bnb_int8,
    "torchao-int8": torchao_int8,
    "torchao-int4": torchao_int4,  # CUDA only (torchao 0.18's int4 kernels)
    "torchao-intx4": torchao_intx4,
}
CHECKPOINT_SCHEMES = tuple(SCHEMES)  # `python -m conversion.quantize`, loaded by transformers
CUDA_ONLY = {"torchao-int4"}


def schemes(device: str) -> list[str]:
    """The schemes that run on `device`, unquantized first."""
    names = ["none", *QUANTIZATION_CONFIGS, *CHECKPOINT_SCHEMES]
    return [name for name in names if device.startswith("cuda") or name not in CUDA_ONLY]


# Bytes per weight of a quantized `[out, in]` linear layer, from its shape: codes, then scales (and zero points).
LINEAR_BYTES: dict[str, Callable[[int, int], float]] = {
    "bf16": lambda out, inp: 2 * out * inp,
    "bnb-int8": lambda out, inp: out * inp + 4 * out,  # int8, a float32 scale per row
    "bnb-nf4": lambda out, inp: out * inp / 2 + 4 * out * inp / 64,  # 4-bit, a float32 absmax per 64
    "torchao-int8": lambda out, inp: out * inp + 2 * out,  # int8, a bf16 scale per row
    "torchao-int4": lambda out, inp: out * inp / 2 + 4 * out * inp / 128,  # 4-bit, bf16 scale and zero per 128
    "w8a8-int8": lambda out, inp: out * inp + 2 * out,  # int8, a bf16 scale per output channel
    "w4a16": lambda out, inp: out * inp / 2 + 2 * out * inp / 128 + 16,  # 4-bit packed, a bf16 scale per 128
}


def weights_table() -> list[dict]:
    """GB of weights (1e9 bytes) of the 7B and 13B releases per scheme: the language model's linear layers as the
    scheme stores them, everything else (embeddings, norms, vision tower, resampler, LM head) in bf16."""
    rows = []
    for llm in ("7b", "13b"):
        config = LlavaUhdConfig(vision_config=VIT_L, text_config=text_config(llm), num_queries=144)
        with torch.device("meta"):
            model = LlavaUhdForConditionalGeneration(config)
        linears = [m.weight.shape for n, m in model.model.language_model.named_modules() if isinstance(m, nn.Linear)]
        other = sum(p.numel() for p in model.parameters()) - sum(out * inp for out, inp in linears)
        row = {"model": f"{llm.upper()} ({LLMS[llm]['hidden_size']} wide, {LLMS[llm]['num_hidden_layers']} layers)"}
        for scheme, linear in LINEAR_BYTES.items():
            row[scheme] = (2 * other + sum(linear(out, inp) for out, inp in linears)) / 1e9
        rows.append(row)
    return rows


def loading(folder: Path, scheme: str, dtype: torch.dtype, checkpoints: dict[str, Path]) -> tuple[Path, dict]:
    """What to load for `scheme`: the folder (a compressed-tensors scheme: its quantized folder) and the keywords
    besides it (a transformers scheme: its `quantization_config` for `dtype`)."""
    if scheme in checkpoints:
        return checkpoints[scheme], {}
    return folder, {} if scheme == "none" else {"quantization_config": QUANTIZATION_CONFIGS[scheme](dtype)}


def load(folder: Path, scheme: str, dtype: torch.dtype, checkpoints: dict[str, Path]):
    """The model of `folder` under `scheme` in `dtype` (see `loading`)."""
    folder, kwargs = loading(folder, scheme, dtype, checkpoints)
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def quantized_checkpoints(folder: Path, work: Path) -> dict[str, Path]:
    """`python -m conversion.quantize` of `folder` with each compressed-tensors scheme, into `work`."""
    outputs = {}
    for scheme in CHECKPOINT_SCHEMES:
        outputs[scheme] = work / scheme
        if not outputs[scheme].exists():
            quantize(folder, scheme, outputs[scheme])
    return outputs


def detail(images: int, device: str) -> list[dict]:
    """Exact-match accuracy on the first `images` fine-detail test images of the default model (float32, as shipped)
    under every scheme, and how many answers equal the unquantized model's."""
    from training.default_model import predict

    folder = default_model_path()
    rows, anchor = [], None
    with tempfile.TemporaryDirectory() as work:
        checkpoints = quantized_checkpoints(folder, Path(work))
        for scheme in schemes(device):
            start = time.perf_counter()
            source, kwargs = loading(folder, scheme, torch.float32, checkpoints)
            pairs = predict(source, images, **kwargs)
            answers = [answer for _, answer in pairs]
            anchor = anchor or answers
            rows.append({
                "scheme": scheme,
                "accuracy": sum(expected == answer for expected, answer in pairs) / len(pairs),
                "same answer as unquantized": sum(a == b for a, b in zip(answers, anchor)),
                "seconds": time.perf_counter() - start,
            })  # fmt: skip
    return rows


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, those of a tensor subclass's inner tensors (torchao's quantized weights) included."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def measure(folder: str, scheme: str, image: str, out: str, iterations: int, positions: int, work: str) -> None:
    """One scheme on the real-width folder, bf16, in this process: the bytes of its state dict after the passes (a
    compressed-tensors checkpoint is dequantized by then), the median time of a forward pass over the prompt with the
    photo, the log-probabilities of the prompt's last `positions` positions
    (saved to `out`.pt) and this process's peak resident memory (`out`, JSON)."""
    checkpoints = {scheme: Path(work) / scheme} if scheme in CHECKPOINT_SCHEMES else {}
    model = load(Path(folder), scheme, torch.bfloat16, checkpoints)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=photos([tuple(map(int, image.split("x")))]), text=prompt, return_tensors="pt")
    seconds = []
    with torch.inference_mode():
        for _ in range(iterations + 1):  # the first is a warm-up
            start = time.perf_counter()
            logits = model(**inputs, logits_to_keep=positions).logits[0].float()
            seconds.append(time.perf_counter() - start)
    torch.save(torch.log_softmax(logits, dim=-1), f"{out}.pt")
    result = {
        "weights": sum(tensor_bytes(tensor) for tensor in model.state_dict().values()),
        "seconds": statistics.median(seconds[1:]),
        "crops": len(inputs["image_grid_hw"]),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(out).write_text(json.dumps(result) + "\n")


def realwidth(work: Path, device: str, iterations: int, positions: int, size: str) -> list[dict]:
    """The real-width checkpoint (`tests/realwidth.py`) converted, quantized, and every scheme measured (`measure`),
    one process each, one after another; ratios against bf16."""
    converted = work / "converted"
    if not converted.exists():
        subprocess.run([sys.executable, str(REALWIDTH), "checkpoint", str(work)], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "conversion.convert_llava_uhd", "--original", str(work / "llava"),
                        "--vision-tower", str(work / "clip"), "--output", str(converted), "--dtype", "bfloat16"],
                       cwd=ROOT, check=True)  # fmt: skip
    quantized_checkpoints(converted, work)
    rows, anchor = [], None
    for scheme in schemes(device):
        out = work / f"{scheme}.json"
        command = [sys.executable, "-m", "benchmarks.quantization", "measure", str(converted), scheme, size, str(out),
                   str(iterations), str(positions), str(work)]  # fmt: skip
        subprocess.run(command, cwd=ROOT, check=True)
        result = json.loads(out.read_text())
        logprobs = torch.load(f"{out}.pt")
        anchor = anchor or (result, logprobs)
        top = anchor[1].topk(TOP_K, dim=-1).indices
        rows.append({
            "scheme": "bf16" if scheme == "none" else scheme,
            "weights in memory": f"{result['weights'] / 2**30:.2f} GiB ({result['weights'] / anchor[0]['weights']:.2f}x)",
            "peak RSS": f"{result['peak'] / 2**30:.2f} GiB ({result['peak'] / anchor[0]['peak']:.2f}x)",
            "time / image": f"{result['seconds']:.1f} s ({result['seconds'] / anchor[0]['seconds']:.2f}x)",
            "top-1 = bf16": f"{int((logprobs.argmax(-1) == anchor[1].argmax(-1)).sum())}/{len(logprobs)}",
            "largest log-prob difference": float((logprobs.gather(-1, top) - anchor[1].gather(-1, top)).abs().max()),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("weights")
    detail_parser = commands.add_parser("detail")
    detail_parser.add_argument("--images", type=int, default=48)
    real = commands.add_parser("realwidth")
    real.add_argument("--work", type=Path, default=Path("work/quantization"))
    real.add_argument("--iterations", type=int, default=2)
    real.add_argument("--positions", type=int, default=16)
    real.add_argument("--size", default="1088x672")
    one = commands.add_parser("measure")  # one scheme in a process of its own (`realwidth` runs it)
    for name in ("folder", "scheme", "size", "out", "iterations", "positions", "work"):
        one.add_argument(name)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.command == "measure":
        return measure(args.folder, args.scheme, args.size, args.out, int(args.iterations), int(args.positions),
                       args.work)  # fmt: skip
    print(machine(device))
    if args.command == "weights":
        rows = weights_table()
    elif args.command == "detail":
        rows = detail(args.images, device)
        print(f"the default model (float32), the first {args.images} fine-detail test images")
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = realwidth(args.work, device, args.iterations, args.positions, args.size)
        print(f"real width: {args.size} photo, bf16, forward over the prompt (median of {args.iterations}); "
              f"top-1 and log-probabilities over the prompt's last {args.positions} positions")  # fmt: skip
    print_table(list(rows[0]), [[f"{v:.3g}" if isinstance(v, float) else v for v in row.values()] for row in rows])
    return rows


if __name__ == "__main__":
    main()
