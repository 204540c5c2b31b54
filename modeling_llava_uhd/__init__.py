"""LLaVA-UHD for Hugging Face transformers: any aspect ratio, high-resolution image understanding.

Importing the package registers the classes with the transformers Auto classes. The files in this folder are also
the Hub bundle: `save_pretrained` copies them, so a saved model loads with `trust_remote_code=True` anywhere.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_llava_uhd import LlavaUhdConfig
from .default_model import BUNDLE_FILES, default_model_path
from .image_processing_llava_uhd import LlavaUhdImageProcessor, SliceLayout
from .modeling_llava_uhd import LlavaUhdForConditionalGeneration, LlavaUhdModel, LlavaUhdPreTrainedModel
from .processing_llava_uhd import LlavaUhdProcessor, UnusableSampleError

__version__ = "0.1.0"

AutoConfig.register(LlavaUhdConfig.model_type, LlavaUhdConfig, exist_ok=True)
AutoModel.register(LlavaUhdConfig, LlavaUhdForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(LlavaUhdConfig, LlavaUhdForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(LlavaUhdConfig, LlavaUhdImageProcessor, exist_ok=True)
AutoProcessor.register(LlavaUhdConfig, LlavaUhdProcessor, exist_ok=True)

# Registered classes make `save_pretrained` copy their files (and those they import) next to the weights. The model's
# `auto_map` is the config's own (`AUTO_MAP`); the processors' entries are the ones this registration writes.
LlavaUhdConfig.register_for_auto_class()
LlavaUhdForConditionalGeneration.register_for_auto_class()
LlavaUhdImageProcessor.register_for_auto_class()
LlavaUhdProcessor.register_for_auto_class()

__all__ = [
    "BUNDLE_FILES",
    "LlavaUhdConfig",
    "LlavaUhdForConditionalGeneration",
    "LlavaUhdImageProcessor",
    "LlavaUhdModel",
    "LlavaUhdPreTrainedModel",
    "LlavaUhdProcessor",
    "SliceLayout",
    "UnusableSampleError",
    "default_model_path",
]
