"""Model card (README.md with Hub metadata) for a converted LLaVA-UHD folder."""

from pathlib import Path

from modeling_llava_uhd import LlavaUhdConfig

CITATION = """@inproceedings{guo2024llava-uhd,
  title={{LLaVA-UHD}: an LMM Perceiving Any Aspect Ratio and High-Resolution Images},
  author={Guo, Zonghao and Xu, Ruyi and Yao, Yuan and Cui, Junbo and Ni, Zanlin and Ge, Chunjiang and Chua, Tat-Seng and Liu, Zhiyuan and Huang, Gao},
  booktitle={ECCV},
  year={2024}
}"""


def source_name(source: str | Path) -> str:
    """A Hub id as it is; a local folder by its name only (its path would expose the converting machine's layout)."""
    return f"`{source}`" if isinstance(source, str) else f"the local folder `{source.name}`"


def write_model_card(folder: Path, config: LlavaUhdConfig, original: str | Path, vision_tower: str | Path) -> Path:
    """Write README.md into `folder`. `original` and `vision_tower` are the Hub ids the sources were downloaded from,
    or (a `Path`) the local folders they were read from; only Hub ids become `base_model` metadata."""
    hub_ids = [source for source in (original, vision_tower) if isinstance(source, str)]
    base_model = "".join(f"\n- {source}" for source in hub_ids)
    base_model = f"\nbase_model:{base_model}" if hub_ids else ""
    variant = (
        "release variant: spatially constrained resampler"
        if config.projector_type == "spatial_resampler"
        else "paper variant: perceiver resampler"
    )
    text = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0{base_model}
tags:
- llava-uhd
- llava
- vision-language
- image-text-to-text
- custom_code
---

# LLaVA-UHD ({variant}, {config.num_queries} tokens per slice)

[LLaVA-UHD](https://arxiv.org/abs/2403.11703) (ECCV 2024) reads images of any aspect ratio and high resolution:
each image is cut into up to 7 variable-sized slices plus an overview, every slice is compressed to
{config.num_queries} tokens, and the slices are laid out row by row in the language model's input.

Converted by the `llava-uhd` package (`python -m conversion.convert_llava_uhd`) from {source_name(original)}
(language model and resampler) and {source_name(vision_tower)} (vision tower). The code is in this repository: load it
with `trust_remote_code=True`.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("REPO", trust_remote_code=True, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained("REPO", trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is written on the sign?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or `pipeline("image-text-to-text", model="REPO", trust_remote_code=True)`.

## Citation

```bibtex
{CITATION}
```
"""
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path
