"""A synthetic fine-detail task: which fine pattern fills a framed panel in a large image. A single low-resolution
view cannot tell; LLaVA-UHD's slices can.

Every image (any of seven aspect ratios, long side 1024 to 1600 px) has a drawn background of soft gradients and
large translucent shapes, and a framed panel (60-90% of each side, anywhere) filled with horizontal stripes,
vertical bars, a checkerboard, or their flat mean colour, in two random colours. The pattern's period is 3 pixels
at the image processor's default resolution (long side 1024, up to 7 slices): the slices (scale 0.8 to 1.1 of that)
keep it; the overview (336 x 336 pixels' worth of area, scale 0.33 to 0.45) blurs every pattern into the same flat
colour, so without slices the answer is a guess.

`write_split(folder, "train", 2000)` writes the images and a LLaVA-format JSON (`processing.load_llava_dataset`
reads it). Everything is a function of `(split, index)`: a split is the same on every machine and the splits never
share an image.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (2, 1), (1, 2))  # width : height
LONG_SIDES = (1024, 1600)  # inclusive range of the long side, px
PROCESSED_LONG_SIDE = 1024  # the image processor's `max_image_size`: sizes below are in its pixels
PATTERNS = ("stripes", "bars", "checks", "plain")  # horizontal lines, vertical lines, a checkerboard, flat
PERIOD = 3  # the patterns' period in processed pixels
PANEL_FRACTION = (0.6, 0.9)  # the panel's sides, as fractions of the image's
QUESTIONS = (
    "What pattern fills the framed panel?",
    "Which pattern is inside the frame?",
    "Describe the pattern of the panel in one word.",
)
SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclass(frozen=True)
class DetailSample:
    """One image, its question and the answer: the pattern of the framed panel."""

    image: Image.Image
    question: str
    answer: str
    panel_box: tuple[int, int, int, int]  # left, top, right, bottom (original pixels), frame included


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"`split` must be one of {sorted(SPLIT_SEEDS)}, got {split!r}.")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A diagonal gradient between two random colours with a few large translucent ellipses and rectangles."""
    low, high = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = low + t[..., None] * (high - low)
    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    overlay = Image.new("RGBA", image.size)
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.integers(2, 6)):
        w, h = (rng.uniform(0.1, 0.4) * max(width, height) for _ in range(2))
        x, y = rng.uniform(-w / 2, width - w / 2), rng.uniform(-h / 2, height - h / 2)
        fill = (*rng.integers(30, 226, size=3).tolist(), int(rng.integers(60, 160)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=fill)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _pattern(name: str, size: tuple[int, int], period: int, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """`size` (height, width) RGB pixels of pattern `name`; "plain" is the other patterns' mean colour."""
    on = period // 2
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]]
    lines = {
        "stripes": ys % period < on,
        "bars": xs % period < on,
        "checks": (ys % period < on) ^ (xs % period < on),
    }
    if name == "plain":
        mean = (on * dark + (period - on) * light) / period
        return np.broadcast_to(mean.round(), (*size, 3)).astype(np.uint8)
    return np.where(lines[name][..., None], dark, light).astype(np.uint8)


def make_sample(split: str, index: int) -> DetailSample:
    """Sample `index` of `split`, the same on every call and machine."""
    rng = _rng(split, index)
    ratio_w, ratio_h = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]
    long_side = int(rng.integers(LONG_SIDES[0], LONG_SIDES[1] + 1))
    scale = long_side / PROCESSED_LONG_SIDE  # original pixels per processed pixel
    width, height = (round(long_side * r / max(ratio_w, ratio_h)) for r in (ratio_w, ratio_h))
    image = _background(rng, width, height)

    # The panel: a pattern of two random colours in a dark frame, over a random part of the image.
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    period = max(2, round(PERIOD * scale))
    panel_w, panel_h = (int(rng.uniform(*PANEL_FRACTION) * side) // period * period for side in (width, height))
    frame = max(2, round(2 * scale))
    left, top = int(rng.integers(0, width - panel_w - 2 * frame)), int(rng.integers(0, height - panel_h - 2 * frame))
    dark, light = rng.integers(0, 90, size=3), rng.integers(170, 256, size=3)
    box = (left, top, left + panel_w + 2 * frame, top + panel_h + 2 * frame)
    frame_colour = tuple(rng.integers(0, 60, size=3).tolist())
    ImageDraw.Draw(image).rectangle((*box[:2], box[2] - 1, box[3] - 1), fill=frame_colour)
    panel = _pattern(pattern, (panel_h, panel_w), period, dark, light)
    image.paste(Image.fromarray(panel, "RGB"), (left + frame, top + frame))
    question = QUESTIONS[rng.integers(len(QUESTIONS))]
    return DetailSample(image, question, pattern, box)


def llava_row(split: str, index: int, sample: DetailSample) -> dict:
    """The LLaVA-format row of a sample (image path relative to the split's folder)."""
    conversations = [
        {"from": "human", "value": "<image>\n" + sample.question},
        {"from": "gpt", "value": sample.answer},
    ]
    return {"id": f"{split}-{index:05d}", "image": f"{split}/{index:05d}.png", "conversations": conversations}


def write_images(folder: str | os.PathLike, split: str, start: int, stop: int) -> list[dict]:
    """Write samples `start .. stop - 1` of `split` as PNGs under `folder/split/` (images already there are kept) and
    return their LLaVA-format rows."""
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    rows = []
    for index in range(start, stop):
        sample = make_sample(split, index)
        path = os.path.join(folder, split, f"{index:05d}.png")
        if not os.path.exists(path):
            sample.image.save(path, compress_level=1)
        rows.append(llava_row(split, index, sample))
    return rows


def write_split(folder: str | os.PathLike, split: str, count: int) -> str:
    """Write the first `count` samples of `split` (`write_images`) and their rows as `folder/split.json`; returns the
    JSON's path."""
    return write_rows(folder, split, write_images(folder, split, 0, count))


def write_rows(folder: str | os.PathLike, split: str, rows: list[dict]) -> str:
    """Write `rows` as `folder/split.json`, the LLaVA-format JSON `processing.load_llava_dataset` reads."""
    json_path = os.path.join(folder, f"{split}.json")
    with open(json_path, "w") as file:
        json.dump(rows, file, indent=1)
    return json_path


def vocabulary_corpus() -> list[str]:
    """Every text the task uses, for training a tokenizer that knows it."""
    return [*QUESTIONS, *PATTERNS]


__all__ = [
    "PATTERNS",
    "QUESTIONS",
    "DetailSample",
    "llava_row",
    "make_sample",
    "vocabulary_corpus",
    "write_images",
    "write_rows",
    "write_split",
]
