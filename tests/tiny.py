"""Tiny random LLaVA-UHD parts built in code: a byte-level BPE tokenizer, configs, models and processors."""

import numpy as np
import torch
from PIL import Image
from skimage import data
from transformers import PreTrainedTokenizerFast

from modeling_llava_uhd import (
    LlavaUhdConfig,
    LlavaUhdForConditionalGeneration,
    LlavaUhdImageProcessor,
    LlavaUhdProcessor,
)
from training.tokenizer import SPECIAL_TOKENS, train_tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A cat, a dog, and a red square.",
    "Describe the image in detail. Count the objects. What number is written on the sign?",
    "astronaut, coffee, camera, chelsea, rocket, 0 1 2 3 4 5 6 7 8 9\n",
]


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS * 4, vocab_size)


def make_config(
    projector_type: str = "spatial_resampler", vocab_size: int = 400, text_model_type: str = "llama", **kwargs
) -> LlavaUhdConfig:
    tokenizer_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        patch_size=14,
        image_size=336,
    )
    text = dict(
        model_type=text_model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        bos_token_id=tokenizer_ids["<s>"],
        eos_token_id=tokenizer_ids["</s>"],
        pad_token_id=tokenizer_ids["<pad>"],
    )
    options = dict(image_token_id=tokenizer_ids["<image>"], resampler_num_heads=2, num_queries=16)
    options.update(kwargs)
    return LlavaUhdConfig(vision_config=vision, text_config=text, projector_type=projector_type, **options)


def make_model(projector_type: str = "spatial_resampler", seed: int = 0, **kwargs) -> LlavaUhdForConditionalGeneration:
    """A tiny random model; `kwargs` go to `make_config`."""
    torch.manual_seed(seed)
    model = LlavaUhdForConditionalGeneration(make_config(projector_type, **kwargs)).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model


def make_processor(num_queries: int = 16, **image_kwargs) -> LlavaUhdProcessor:
    return LlavaUhdProcessor(
        image_processor=LlavaUhdImageProcessor(**image_kwargs), tokenizer=make_tokenizer(), num_queries=num_queries
    )


def spatial_schema(processor: LlavaUhdProcessor, rows: int, cols: int) -> list[int]:
    """The ids an image of a `rows x cols` slice grid stands for, written out from REFERENCE.md apart from
    `LlavaUhdProcessor.schema_ids`: each row of slices is `crop , crop , ... crop \\n`, the overview's crop comes last
    (0 x 0, unsliced: the overview alone)."""
    crop = [processor.image_token_id] * processor.num_queries
    row = (crop + [processor.slice_separator_id]) * (cols - 1) + crop + [processor.row_separator_id]
    return row * rows + crop


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    """A real photo from scikit-image's bundled data, RGB, optionally resized to `size` (width, height)."""
    array = getattr(data, name)()
    image = Image.fromarray(array).convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A generated RGB image with structure at every scale (smooth gradient plus noise)."""
    noise = np.random.default_rng(seed).integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)[:, None]  # small temporaries
    image = np.empty((height, width, 3), np.uint8)
    for channel, base in enumerate((x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256)):
        image[..., channel] = np.minimum(base + noise[..., channel], 255)
    return Image.fromarray(image)
