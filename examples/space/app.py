"""A Hugging Face Space for a LLaVA-UHD model: the package's demo page, as `llava-uhd demo` serves it.

The Space's variable MODEL names the converted repo to serve (unset: the bundled default model); the example images
are the ones uploaded next to this file. It runs on the Space's GPU when it has one. How to publish: docs/demo.md.
"""

import os
from pathlib import Path

import torch

from modeling_llava_uhd.demo import bundled_examples, launch

launch(
    os.environ.get("MODEL") or None,
    device="cuda" if torch.cuda.is_available() else "cpu",
    examples=bundled_examples(Path(__file__).parent),
)
