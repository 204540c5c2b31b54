"""GPU serving speed: LLaVA-UHD at 1088x672 next to transformers' LLaVA-1.5 at 336, same LLM shape, random weights.

    python -m benchmarks.gpu [--llm 7b 13b] [--attn sdpa flash_attention_2] [--new-tokens 128] [--iterations 3]
    python -m benchmarks.gpu --device cpu --tiny --iterations 1     # smoke run of the code path, no GPU needed

For each LLM shape (Vicuna-7B / -13B, CLIP ViT-L/14-336, bfloat16) and attention implementation
(flash-attention-2 only where `flash_attn` is installed):
* time to first token: `generate(max_new_tokens=1)` from preprocessed inputs on the device (vision encoder,
  projector and LLM prefill), median of `--iterations`;
* decode speed: `(new_tokens - 1) / (t(new_tokens) - t(1))`, greedy, `min_new_tokens` set so every run decodes all;
* peak GPU memory allocated during the longer run;
* preprocessing (CPU) is timed apart: `LlavaUhdImageProcessor` on the photo, transformers' `CLIPImageProcessor` for
  LLaVA-1.5.
The prompt is `--text-tokens` random text ids around the image's tokens (LLaVA-UHD: its spatial schema, with the
separators of the default model's tokenizer; LLaVA-1.5: 576). With random weights the tokens mean nothing; the speed is
that of the real shapes.
"""

import argparse
import gc
import importlib.util
import statistics
import time

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration, LlavaUhdImageProcessor
from modeling_llava_uhd.default_model import WEIGHTS
from modeling_llava_uhd.layout_llava_uhd import schema_ids
from modeling_llava_uhd.processing_llava_uhd import LlavaUhdProcessor

from .common import machine, parse_size, photos, print_table, transformers_class
from .flops import VIT_L, text_config
from .vision import CONFIGS

IMAGE_TOKEN_ID = 32000
TINY_LLM = dict(model_type="llama", vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=4096)  # fmt: skip


def build(model_class: type, llm: str, attn: str, device: str, dtype: torch.dtype):
    """A random-weight LLaVA-UHD or LLaVA-1.5 with CLIP ViT-L and the `llm` shape (`"tiny"`: tiny everything)."""
    vision = dict(VIT_L, **CONFIGS["tiny"]) if llm == "tiny" else VIT_L
    text = TINY_LLM if llm == "tiny" else text_config(llm)
    config_class = LlavaUhdConfig if model_class is LlavaUhdForConditionalGeneration else LlavaConfig
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    model.generation_config.pad_token_id = 0
    return model.eval()


def separator_ids() -> tuple[int, int]:
    """The slice and row separators of the default model's tokenizer, as its processor reads them (which ids they are
    changes no timing; the schema's length does)."""
    processor = LlavaUhdProcessor(LlavaUhdImageProcessor(), AutoTokenizer.from_pretrained(WEIGHTS))
    return processor.slice_separator_id, processor.row_separator_id


def inputs_for(model, image, text_tokens: int) -> tuple[dict, float]:
    """Model inputs for one image and `text_tokens` random text ids, and the preprocessing time in seconds."""
    separators = separator_ids() if isinstance(model, LlavaUhdForConditionalGeneration) else None
    start = time.perf_counter()
    if separators:
        features = dict(LlavaUhdImageProcessor()(image))
        rows, cols = features["slice_grid"][0].tolist()
        image_ids = schema_ids(rows, cols, model.config.num_queries, IMAGE_TOKEN_ID, *separators)
    else:
        processor = transformers_class("CLIPImageProcessor")(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )
        features = {"pixel_values": processor(image, return_tensors="pt")["pixel_values"]}
        image_ids = [IMAGE_TOKEN_ID] * 576
    seconds = time.perf_counter() - start
    text = torch.randint(100, 30000, (text_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids = torch.tensor([text[: text_tokens // 2] + image_ids + text[text_tokens // 2 :]])
    features["pixel_values"] = features["pixel_values"].to(model.dtype)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **features}
    return {key: value.to(model.device) for key, value in inputs.items()}, seconds


def measure(model, inputs: dict, new_tokens: int, iterations: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def generate(tokens: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        sync()
        return time.perf_counter() - start

    with torch.inference_mode():
        generate(2)  # warm-up
        first = statistics.median(generate(1) for _ in range(iterations))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        full = statistics.median(generate(new_tokens) for _ in range(iterations))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else float("nan")
    return dict(ttft=first, decode=(new_tokens - 1) / (full - first) if full > first else float("nan"), peak=peak)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", nargs="+", choices=["7b", "13b"], default=["7b", "13b"])
    parser.add_argument("--attn", nargs="+", default=None, help="attention implementations (default: sdpa, and "
                        "flash_attention_2 when flash_attn is installed)")  # fmt: skip
    parser.add_argument("--size", type=parse_size, default=(1088, 672), help="WIDTHxHEIGHT of LLaVA-UHD's photo")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to check the code path on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.gpu measures GPU speed and found no CUDA device. Run it on a GPU machine, or pass "
            "`--device cpu --tiny` for a smoke run of the code path."
        )
    if not args.device.startswith("cuda") and not args.tiny:
        raise SystemExit("Real 7B/13B shapes need a GPU: pass --tiny with --device cpu.")
    attns = args.attn or ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    dtype = getattr(torch, args.dtype)
    image = photos([args.size])[0]
    print(
        f"Machine: {machine(args.device)}; {args.dtype}, {args.new_tokens} new tokens, {args.text_tokens} text tokens"
    )

    models = [
        (LlavaUhdForConditionalGeneration, "LLaVA-UHD release", f"{args.size[0]}x{args.size[1]}"),
        (LlavaForConditionalGeneration, "LLaVA-1.5 (transformers)", "336x336"),
    ]
    rows = []
    for llm in ["tiny"] if args.tiny else args.llm:
        for attn in attns:
            for model_class, name, size in models:
                model = build(model_class, llm, attn, args.device, dtype)
                inputs, preprocess = inputs_for(model, image, args.text_tokens)
                result = measure(model, inputs, args.new_tokens, args.iterations, args.device)
                tokens = inputs["input_ids"].shape[1]
                rows.append(
                    dict(llm=llm, attn=attn, name=name, size=size, preprocess=preprocess, tokens=tokens, **result)
                )
                del model, inputs
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    print_table(
        ["LLM", "attention", "model", "image", "prompt tokens", "preprocess ms (CPU)", "time to first token ms",
         "decode tokens / s", "peak GiB"],
        [[row["llm"], row["attn"], row["name"], row["size"], row["tokens"], f"{1000 * row['preprocess']:.0f}",
          f"{1000 * row['ttft']:.0f}", f"{row['decode']:.1f}", f"{row['peak']:.1f}"] for row in rows],
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
