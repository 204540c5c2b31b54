"""Image preprocessing: `LlavaUhdImageProcessor` against the reference pipeline and transformers' processors.

    python -m benchmarks.preprocess [--iterations 7] [--images 8] [--size 1088x672] [--batch 32]

Rows, all on the same PIL images and in one process:
* reference: the reference evaluation's preprocessing written out step by step (long side to 1024, overview from a
  copy, one resize cut into slices with `crop`, each crop CLIP-normalised as transformers' `CLIPImageProcessor` does
  it, in float64 then float32, and stacked); its layouts come from our `get_slice_layout`, which the tests check
  against the reference. Its output must equal ours bit for bit, which is checked here.
* ours, and ours without the long-side pre-resize (the same resampling work as MiniCPM-V's processor);
* transformers' `LlavaNextImageProcessor` (LLaVA-1.6 settings: 336 crops, anyres grids up to 672x672) and
  `MiniCPMV4_6ImageProcessor` set to LLaVA-UHD's slicing (336, at most 7 slices), each with the backend that
  transformers picks here (PIL without torchvision);
* the PIL bicubic resizes alone that ours (and the reference) must do: a floor for any bit-exact pipeline.
"""

import argparse
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from modeling_llava_uhd import LlavaUhdImageProcessor
from modeling_llava_uhd.layout_llava_uhd import images_from_patches

from .common import machine, median_seconds, parse_size, photos, print_table, transformers_class

MIXED_SIZES = [
    (640, 480), (480, 640), (1024, 768), (1920, 1080), (1080, 1920), (800, 600), (1280, 720), (336, 336),
    (2048, 1536), (1088, 672), (672, 1088), (500, 375), (3000, 2000), (1000, 1000), (400, 1200), (1600, 400),
]  # fmt: skip


def reference_pipeline(images: list[Image.Image], processor: LlavaUhdImageProcessor) -> list[list[torch.Tensor]]:
    """Per image, its crops `[3, h, w]` (slices row-major, then the overview), computed as the reference does."""
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)

    def clip_preprocess(crops: list[Image.Image]) -> torch.Tensor:
        arrays = []
        for crop in crops:
            array = (np.asarray(crop) * processor.rescale_factor).astype(np.float32)  # rescale in float64
            arrays.append(((array - mean) / std).transpose(2, 0, 1))
        return torch.tensor(np.stack(arrays))

    outputs = []
    for image in images:
        layout = processor.get_slice_layout(image.height, image.width)
        height, width = layout.image_size
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        overview_h, overview_w = layout.overview_size
        overview = image.copy().resize((overview_w, overview_h), Image.Resampling.BICUBIC)
        slices = []
        if layout.grid is not None:
            (rows, cols), (slice_h, slice_w) = layout.grid, layout.slice_size
            refined = image.resize((slice_w * cols, slice_h * rows), Image.Resampling.BICUBIC)
            boxes = [
                (j * slice_w, i * slice_h, (j + 1) * slice_w, (i + 1) * slice_h)
                for i in range(rows)
                for j in range(cols)
            ]
            slices = list(clip_preprocess([refined.crop(box) for box in boxes]))
        outputs.append(slices + list(clip_preprocess([overview])))
    return outputs


def resampling_only(images: list[Image.Image], processor: LlavaUhdImageProcessor) -> None:
    """The PIL resizes of our pipeline and nothing else."""
    for image in images:
        layout = processor.get_slice_layout(image.height, image.width)
        height, width = layout.image_size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        if layout.grid is not None:
            (rows, cols), (slice_h, slice_w) = layout.grid, layout.slice_size
            image.resize((slice_w * cols, slice_h * rows), Image.Resampling.BICUBIC)
        image.resize(layout.overview_size[::-1], Image.Resampling.BICUBIC)


def crops_of(output, patch: int) -> list[torch.Tensor]:
    """Our packed `pixel_values` back into `[3, h, w]` crops."""
    grid = output["image_grid_hw"].tolist()
    chunks = output["pixel_values"].split([h * w for h, w in grid])
    return [images_from_patches(c[None], h, w, patch)[0] for c, (h, w) in zip(chunks, grid)]


def anchors() -> dict[str, object]:
    """transformers' processors, whichever backend it picks here (PIL without torchvision)."""
    llava_next = transformers_class("LlavaNextImageProcessor")(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    minicpm = transformers_class("MiniCPMV4_6ImageProcessor")(scale_resolution=336, max_slice_nums=7)
    return {
        f"transformers {type(llava_next).__name__} (LLaVA-1.6)": llava_next,
        f"transformers {type(minicpm).__name__} (336, 7 slices)": minicpm,
    }


def pipelines(images: list[Image.Image]) -> dict[str, Callable[[], object]]:
    ours = LlavaUhdImageProcessor()
    rows = {
        "reference pipeline (written out)": lambda: reference_pipeline(images, ours),
        "LlavaUhdImageProcessor": lambda: ours(images),
        "LlavaUhdImageProcessor, no pre-resize": lambda: ours(images, max_image_size=0),
    }
    for name, processor in anchors().items():
        rows[name] = lambda processor=processor: processor(images, return_tensors="pt")
    rows["PIL resizes only (floor of ours)"] = lambda: resampling_only(images, ours)
    return rows


def check_identical(images: list[Image.Image]) -> int:
    """Our pixel values equal the reference pipeline's bit for bit; returns the number of crops compared."""
    processor = LlavaUhdImageProcessor()
    ours = crops_of(processor(images), processor.patch_size)
    reference = [crop for crops in reference_pipeline(images, processor) for crop in crops]
    if len(ours) != len(reference) or not all(torch.equal(a, b) for a, b in zip(ours, reference)):
        raise AssertionError("LlavaUhdImageProcessor's pixel values differ from the reference pipeline's.")
    return len(ours)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--images", type=int, default=8, help="photos of --size per round")
    parser.add_argument("--size", type=parse_size, default=(1088, 672), help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--batch", type=int, default=32, help="mixed-size photos in the batch run (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every row is single-threaded PIL/numpy work; keep torch from competing

    runs = {
        f"{args.images} photos of {args.size[0]}x{args.size[1]}": photos([args.size] * args.images),
        f"batch of {args.batch} mixed-size photos": photos(
            [MIXED_SIZES[i % len(MIXED_SIZES)] for i in range(args.batch)]
        ),
    }
    compared = sum(check_identical(images) for images in runs.values() if images)
    print(f"Machine: {machine()}")
    print(f"Output identical to the reference pipeline, bit for bit: {compared} crops compared.\n")
    results = {}
    for title, images in runs.items():
        if not images:
            continue
        seconds = median_seconds(pipelines(images), args.iterations)
        reference = seconds["reference pipeline (written out)"]
        floor = seconds["PIL resizes only (floor of ours)"]
        rows = [
            [name, f"{1000 * t / len(images):.1f}", f"{len(images) / t:.1f}", f"{reference / t:.2f}x"]
            for name, t in seconds.items()
        ]
        print(f"{title}, median of {args.iterations}:")
        print_table(["pipeline", "ms / image", "images / s", "speed vs reference"], rows)
        reference_rest, ours_rest = reference - floor, seconds["LlavaUhdImageProcessor"] - floor
        print(
            f"Beyond the PIL resizes both must do: reference {1000 * reference_rest / len(images):.1f} ms / image, "
            f"ours {1000 * ours_rest / len(images):.1f} ms / image ({reference_rest / max(ours_rest, 1e-9):.1f}x).\n"
        )
        results[title] = seconds
    return results


if __name__ == "__main__":
    main()
