"""Vision path (vision tower + resampler): grouped crops against a per-crop loop on the same weights.

    python -m benchmarks.vision [--config small|vit-l|tiny] [--images 2] [--iterations 5] [--device cpu]
                                [--dtype float32] [--threads N]

Rows, on the crops of `--images` photos of `--size` (default 1088x672: 6 slices of 23x24 patches + an 18x30 overview
each after the reference's pre-resize), all with the same random weights:
* per-crop loop (reference): what the reference does for every crop: one vision-tower forward (transformers' CLIP,
  position embeddings interpolated, all hidden states returned) and one resampler call computed the reference's
  way (positions resized and RoIAlign built per call, keys and values pooled, then projected by
  `nn.MultiheadAttention`, queries projected per crop);
* grouped, same computation: one such forward per distinct crop shape (what this package did before);
* `get_image_features` (ours): one vision-tower forward per shape, the feature layer read from the tower's own hidden
  states; queries projected once, keys and values projected before the (separable) RoI pooling, position tables and
  RoIAlign maps cached per shape; the tower runs whole, through its own forward.
Configs: `small` has ViT-L's depth (24 layers) at 128 wide (2 heads of 64) and a 512-wide resampler (4 heads of 128),
so it runs on a CPU; `vit-l` is CLIP ViT-L/14-336 with a 5120-wide resampler (13B), the real sizes; `tiny` is the
test suite's.
"""

import argparse

import torch
from torch.nn import functional as F

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration, LlavaUhdImageProcessor
from modeling_llava_uhd.layout_llava_uhd import images_from_patches
from modeling_llava_uhd.modeling_llava_uhd import (
    LlavaUhdResampler,
    best_pooling_size,
    resize_position_table,
    roi_align_matrix,
    window_boxes,
)

from .common import machine, median_seconds, parse_size, photos, print_table

CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=2),
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}
RESAMPLER_WIDTH = {"tiny": 64, "small": 512, "vit-l": 5120}


def build_model(name: str, projector_type: str, device: str, dtype: torch.dtype) -> LlavaUhdForConditionalGeneration:
    """Vision tower and resampler of config `name` with random weights (the resampler's heads by the config's rule for
    `projector_type`); a one-layer language model of the resampler's width (only its embeddings matter here)."""
    width = RESAMPLER_WIDTH[name]
    heads = max(width // 128, 1)  # the language model's, as for Vicuna: heads of 128
    config = LlavaUhdConfig(
        vision_config=dict(model_type="clip_vision_model", patch_size=14, image_size=336, **CONFIGS[name]),
        text_config=dict(
            model_type="llama", hidden_size=width, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=heads, vocab_size=512,
        ),
        projector_type=projector_type,
        image_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaUhdForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def reference_resampler(resampler: LlavaUhdResampler, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference's resampler computation with our parameters: nothing cached, dense RoIAlign before the
    projections, `nn.MultiheadAttention`."""
    crops, dtype, num_queries = features.shape[0], features.dtype, resampler.num_queries
    values = resampler.ln_kv(resampler.kv_proj(features))
    keys = values + resize_position_table(resampler.pos_embed, height, width).to(dtype)
    queries = resampler.ln_q(resampler.query) + resampler.pos_embed.to(dtype)
    if resampler.spatial:
        boxes = window_boxes(height, width, num_queries).to(dtype).float()
        pooling = roi_align_matrix(boxes, height, width, *best_pooling_size(height, width)).to(features.device)
        keys, values = (
            (pooling @ x.float()).to(dtype).reshape(crops * num_queries, -1, x.shape[-1]) for x in (keys, values)
        )
        queries = queries.repeat(crops, 1)[None]  # one query per (crop, window)
    else:
        queries = queries[:, None].expand(-1, crops, -1)
    attn = resampler.attn  # `nn.MultiheadAttention`'s parameters, through its functional form
    out, _ = F.multi_head_attention_forward(
        queries, keys.transpose(0, 1), values.transpose(0, 1), queries.shape[-1], attn.num_heads,
        attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias,
        training=False, need_weights=False,
    )  # fmt: skip
    out = out.reshape(crops, num_queries, -1) if resampler.spatial else out.transpose(0, 1)
    return resampler.ln_post(out) @ resampler.proj


def reference_crops(model, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Same-shape crops `[crops, height * width, 3 * patch**2]` through the stock CLIP forward and the reference's
    resampler computation."""
    inner, patch = model.model, model.config.vision_config.patch_size
    images = images_from_patches(patches, height, width, patch).to(inner.vision_tower.dtype)
    states = inner.vision_tower(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True)
    hidden = states.hidden_states[model.config.vision_feature_layer][:, 1:]
    return reference_resampler(inner.resampler, hidden, height, width)


def per_crop_loop(model, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
    grid = image_grid_hw.tolist()
    crops = pixel_values.split([h * w for h, w in grid])
    return torch.cat([reference_crops(model, crop[None], h, w) for crop, (h, w) in zip(crops, grid)])


def grouped_reference(model, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
    grid = image_grid_hw.tolist()
    crops = pixel_values.split([h * w for h, w in grid])
    groups: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(grid):
        groups.setdefault(tuple(shape), []).append(index)
    tokens = [None] * len(grid)
    for (height, width), indices in groups.items():
        out = reference_crops(model, torch.stack([crops[i] for i in indices]), height, width)
        for index, crop_tokens in zip(indices, out):
            tokens[index] = crop_tokens
    return torch.stack(tokens)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Prints the table; returns each path's `seconds` (median) and `difference` (max abs difference to ours)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--projector", choices=["spatial_resampler", "resampler"], default="spatial_resampler")
    parser.add_argument("--images", type=int, default=2, help="photos whose crops are encoded per round")
    parser.add_argument("--size", type=parse_size, default=(1088, 672), help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--iterations", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    model = build_model(args.config, args.projector, args.device, dtype)
    inputs = LlavaUhdImageProcessor()(photos([args.size] * args.images)).to(args.device)
    pixel_values, grid, slice_grid = inputs["pixel_values"], inputs["image_grid_hw"], inputs["slice_grid"]
    rows = {
        "per-crop loop (reference)": lambda: per_crop_loop(model, pixel_values, grid),
        "grouped by shape, same computation": lambda: grouped_reference(model, pixel_values, grid),
        "get_image_features (ours)": lambda: (
            model.get_image_features(pixel_values, grid, slice_grid).last_hidden_state
        ),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    with torch.inference_mode():
        ours = rows["get_image_features (ours)"]()
        differences = {name: (function() - ours).abs().max().item() for name, function in rows.items()}
        seconds = median_seconds(rows, args.iterations, sync)

    crops = len(grid)
    shapes = sorted({tuple(shape) for shape in grid.tolist()})
    print(f"Machine: {machine(args.device)}; {args.device}, {args.dtype}")
    print(
        f"{args.config} vision tower + {args.projector} ({RESAMPLER_WIDTH[args.config]} wide): {crops} crops of "
        f"{args.images} photos of {args.size[0]}x{args.size[1]}, {len(shapes)} shapes {shapes}; median of "
        f"{args.iterations}:"
    )
    anchor = seconds["per-crop loop (reference)"]
    print_table(
        ["path", "crops / s", "speed vs per-crop loop", "max abs difference to ours"],
        [[name, f"{crops / t:.1f}", f"{anchor / t:.2f}x", f"{differences[name]:.1e}"] for name, t in seconds.items()],
    )
    return {name: {"seconds": t, "difference": differences[name]} for name, t in seconds.items()}


if __name__ == "__main__":
    main()
