"""Compute at the paper's resolution: FLOPs and visual tokens of LLaVA-UHD, LLaVA-1.5 and LLaVA-NeXT.

    python -m benchmarks.flops [--llm 13b|7b] [--text-tokens 64] [--size 1088x672]

Every model is built on the meta device at real shapes (CLIP ViT-L/14-336, Vicuna-13B or -7B; no weights) and run
under `torch.utils.flop_counter.FlopCounterMode`, which counts the matmuls, convolutions and attention of what the
code actually executes (2 FLOPs per multiply-add; attention counted in full, causal masking not subtracted).
Counted per image: the vision encoder, the projector / resampler, and the LLM prefill over the visual tokens plus a
fixed text prompt (`--text-tokens`, the Vicuna system prompt and a short question are about 64), including the LM head
on the last position (what `generate` computes before the first token). Decoding is not counted.

* LLaVA-UHD paper: perceiver resampler, 64 queries, at most 6 slices, the image as given (`--size`);
* LLaVA-UHD release: spatially constrained resampler, 144 queries, at most 7 slices, the reference evaluation's
  pre-resize of the long side to 1024;
* LLaVA-1.5: transformers' `LlavaForConditionalGeneration` on one 336x336 image (576 tokens);
* LLaVA-NeXT: transformers' `LlavaNextForConditionalGeneration`, anyres on a 672x672 image (a 2x2 grid of 336 tiles
  plus the base image; its own unpadding and newline tokens decide the count).
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration, LlavaUhdImageProcessor
from modeling_llava_uhd.layout_llava_uhd import schema_token_counts

from .common import parse_size, print_table
from .vision import grouped_reference

VIT_L = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, patch_size=14, image_size=336,
)  # fmt: skip
LLMS = {
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def text_config(llm: str) -> dict:
    return dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, **LLMS[llm])


def count_flops(function, part: type | None = None) -> int | tuple[int, int]:
    """FLOPs of `function()`; with `part`, also those spent inside modules of that class."""
    with FlopCounterMode(display=False) as counter:
        function()
    if part is None:
        return counter.get_total_flops()
    return counter.get_total_flops(), sum(counter.get_flop_counts().get(part.__name__, {}).values())


def prefill_flops(model, language_model, sequence_length: int) -> int:
    """The LLM over `sequence_length` input embeddings, plus the LM head on the last position."""
    hidden_size = model.config.text_config.hidden_size
    embeds = torch.empty(1, sequence_length, hidden_size, device="meta")

    def run():
        hidden = language_model(inputs_embeds=embeds, use_cache=True).last_hidden_state  # a prefill fills a cache
        model.lm_head(hidden[:, -1:])

    return count_flops(run)


def llava_uhd(llm: str, projector_type: str, size: tuple[int, int], text_tokens: int) -> dict:
    paper = projector_type == "resampler"
    config = LlavaUhdConfig(
        vision_config=VIT_L, text_config=text_config(llm), projector_type=projector_type, image_token_id=32000
    )
    processor = LlavaUhdImageProcessor(max_slice_nums=6 if paper else 7, max_image_size=0 if paper else 1024)
    layout = processor.get_slice_layout(height=size[1], width=size[0])
    patch = processor.patch_size
    grid_hw = torch.tensor(
        [(h // patch, w // patch) for h, w in [layout.slice_size] * layout.num_slices + [layout.overview_size]]
    )
    slice_grid = torch.tensor([layout.grid or (0, 0)])
    with torch.device("meta"):
        model = LlavaUhdForConditionalGeneration(config)
    pixel_values = torch.empty(int(grid_hw.prod(-1).sum()), 3 * patch * patch, device="meta")
    vision, projector = count_flops(
        lambda: model.model.get_image_features(pixel_values, grid_hw, slice_grid), type(model.model.resampler)
    )
    reference = count_flops(lambda: grouped_reference(model, pixel_values, grid_hw))
    visual_tokens = sum(schema_token_counts(*(layout.grid or (0, 0)), config.num_queries))  # separators included
    crops = ", ".join(f"{h}x{w}" for h, w in grid_hw.unique(dim=0).tolist())
    return dict(
        name=f"LLaVA-UHD {'paper' if paper else 'release'} ({config.num_queries} queries)",
        input=f"{size[0]}x{size[1]}{'' if paper else ' -> 1024 long side'}",
        crops=f"{layout.num_crops} ({crops} patches)",
        vision=vision - projector,
        projector=projector,
        reference=reference,
        tokens=visual_tokens,
        llm=prefill_flops(model, model.model.language_model, visual_tokens + text_tokens),
    )


def llava_1_5(llm: str, text_tokens: int) -> dict:
    config = LlavaConfig(vision_config=VIT_L, text_config=text_config(llm), image_token_id=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    pixel_values = torch.empty(1, 3, 336, 336, device="meta")
    features = []
    vision, projector = count_flops(
        lambda: features.append(model.model.get_image_features(pixel_values).pooler_output),
        type(model.model.multi_modal_projector),
    )
    tokens = sum(f.shape[0] * f.shape[1] if f.dim() == 3 else f.shape[0] for f in features[0])
    return dict(
        name="LLaVA-1.5 (transformers)", input="336x336", crops="1 (24x24 patches)", vision=vision - projector,
        projector=projector, tokens=tokens, llm=prefill_flops(model, model.model.language_model, tokens + text_tokens),
    )  # fmt: skip


def llava_next(llm: str, text_tokens: int) -> dict:
    config = LlavaNextConfig(vision_config=VIT_L, text_config=text_config(llm), image_token_id=32000)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    pixel_values = torch.empty(1, 5, 3, 336, 336, device="meta")
    image_sizes = torch.tensor([[672, 672]])
    features = []
    vision, projector = count_flops(
        lambda: features.append(model.model.get_image_features(pixel_values, image_sizes).pooler_output),
        type(model.model.multi_modal_projector),
    )
    tokens = sum(f.shape[0] for f in features[0])
    return dict(
        name="LLaVA-NeXT anyres (transformers)", input="672x672", crops="5 (24x24 patches)", vision=vision - projector,
        projector=projector, tokens=tokens, llm=prefill_flops(model, model.model.language_model, tokens + text_tokens),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", choices=sorted(LLMS), default="13b")
    parser.add_argument("--text-tokens", type=int, default=64, help="text prompt length added to the visual tokens")
    parser.add_argument("--size", type=parse_size, default=(1088, 672), help="WIDTHxHEIGHT of the LLaVA-UHD image")
    args = parser.parse_args(argv)

    rows = [
        llava_uhd(args.llm, "resampler", args.size, args.text_tokens),
        llava_uhd(args.llm, "spatial_resampler", args.size, args.text_tokens),
        llava_1_5(args.llm, args.text_tokens),
        llava_next(args.llm, args.text_tokens),
    ]
    baseline = next(row for row in rows if row["name"].startswith("LLaVA-1.5"))
    total = lambda row: row["vision"] + row["projector"] + row["llm"]  # noqa: E731
    tflops = lambda flops: f"{flops / 1e12:.2f}"  # noqa: E731
    print(
        f"CLIP ViT-L/14-336 + Vicuna-{args.llm.upper()} shapes, meta device; LLM prefill over the visual tokens + "
        f"{args.text_tokens} text tokens; TFLOPs per image:"
    )
    print_table(
        ["model", "input", "crops", "visual tokens", "vision encoder", "projector", "LLM prefill", "total",
         "vs LLaVA-1.5"],
        [
            [row["name"], row["input"], row["crops"], row["tokens"], tflops(row["vision"]), tflops(row["projector"]),
             tflops(row["llm"]), tflops(total(row)), f"{total(row) / total(baseline):.0%}"]
            for row in rows
        ],
    )  # fmt: skip
    for row in rows[:2]:
        ours = row["vision"] + row["projector"]
        print(
            f"{row['name']}: vision encoder + projector {tflops(ours)} TFLOPs here, {tflops(row['reference'])} as the "
            "reference computes them (every ViT layer, queries projected per crop, the release's RoI pooling before "
            f"the key and value projections): {ours / row['reference']:.0%}."
        )
    return rows


if __name__ == "__main__":
    main()
