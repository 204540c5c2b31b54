"""Generated LLaVA-format training data (drawn shapes, captions that name them) and a tiny LLM checkpoint."""

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tiny import make_config, make_tokenizer
from transformers import LlamaForCausalLM

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "circle")
# Small (not sliced), wide and tall (sliced into 2 or 3 crops at the default 336 scale).
SIZES = ((200, 150), (700, 400), (300, 500))


def draw(color: str, shape: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    box = [size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4]
    pen = ImageDraw.Draw(image)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLORS[color])
    return image


def write_llava_dataset(folder: Path, num_images: int = 12, text_only: bool = True) -> tuple[Path, Path]:
    """`folder/data.json` in LLaVA format over `folder/images`: captions of drawn shapes (the `<image>` placeholder
    before or after the question, as in the 558K and 665K files), a two-turn row, and a text-only row."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images):
        color, shape = list(COLORS)[index % len(COLORS)], SHAPES[index % len(SHAPES)]
        draw(color, shape, SIZES[index % len(SIZES)]).save(images / f"{index:03d}.png")
        question = "What is in the picture?"
        rows.append(
            {
                "id": f"img-{index}",
                "image": f"{index:03d}.png",
                "conversations": [
                    {"from": "human", "value": f"{question}\n<image>" if index % 2 else f"<image>\n{question}"},
                    {"from": "gpt", "value": f"A {color} {shape}."},
                ],
            }
        )
    rows.append(
        {
            "id": "two-turns",
            "image": "000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Count the objects."},
                {"from": "gpt", "value": "1"},
            ],
        }
    )
    if text_only:
        rows.append(
            {
                "id": "text-only",
                "conversations": [{"from": "human", "value": "Count 1 2 3"}, {"from": "gpt", "value": "4 5 6"}],
            }
        )
    data = folder / "data.json"
    data.write_text(json.dumps(rows))
    return data, images


def save_text_model(folder: Path, vocab_size: int = 400) -> Path:
    """A tiny random Llama causal LM and its (400-token) tokenizer, as a fresh model's `text_model`."""
    torch.manual_seed(0)
    LlamaForCausalLM(make_config(vocab_size=vocab_size).text_config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
