"""LLaVA-UHD model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig, __version__

# Default queries per crop of each compression module (REFERENCE: release 12x12, paper 8x8).
DEFAULT_NUM_QUERIES = {"spatial_resampler": 144, "resampler": 64}
# The sub-config whose width sets the default resampler heads, one per 128 channels (REFERENCE): the release's spatial
# resampler follows the LLM (5120 // 128 = 40 for Vicuna-13B), the paper's perceiver the vision tower (1024 // 128 = 8).
HEADS_FOLLOW = {"spatial_resampler": "text_config", "resampler": "vision_config"}
RESAMPLER_HEAD_WIDTH = 128
# New embedding rows (`<image>`, `<pad>`) round the LLM's vocabulary up to a multiple of this, as transformers' LLaVA
# ports do (the converter and training both add them).
PAD_VOCAB_TO = 64

# CLIP ViT-L/14-336, the default vision tower (its `model_type` is `clip_vision_model`); Llama (Vicuna) the default LLM.
DEFAULT_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}
DEFAULT_TEXT_MODEL_TYPE = "llama"

# The model's auto classes in the Hub bundle (the config's `auto_map`, also when the bundle's code is loaded without the
# package). `AutoModel` gives the generating model, as MiniCPM-V does.
AUTO_MAP = {
    "AutoConfig": "configuration_llava_uhd.LlavaUhdConfig",
    "AutoModel": "modeling_llava_uhd.LlavaUhdForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_llava_uhd.LlavaUhdForConditionalGeneration",
}


@strict
class LlavaUhdConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaVA-UHD model: a CLIP vision tower run on variable-sized image slices, a resampler that
    compresses every slice to `num_queries` tokens, and a causal language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            CLIP vision config. Defaults to CLIP ViT-L/14-336.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of any causal language model. Defaults to Llama (Vicuna).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder token.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden layer of the vision tower whose patch features (CLS dropped) feed the resampler.
        projector_type (`str`, *optional*, defaults to `"spatial_resampler"`):
            `"spatial_resampler"`: the released spatially constrained resampler (every query attends to its own
            RoI-aligned box of the feature map). `"resampler"`: the paper's perceiver resampler (every query attends
            to the whole map).
        num_queries (`int`, *optional*):
            Tokens per crop; a square number. Defaults to 144 (`spatial_resampler`) or 64 (`resampler`).
        resampler_num_heads (`int`, *optional*):
            Attention heads of the resampler. Defaults to one per 128 channels of the LLM (`spatial_resampler`) or of
            the vision tower (`resampler`), as in the reference (at least one).
    """

    model_type = "llava_uhd"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    projector_type: Literal["spatial_resampler", "resampler"] = "spatial_resampler"
    num_queries: int | None = None
    resampler_num_heads: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = dict(DEFAULT_VISION_CONFIG)
        if self.text_config is None:
            self.text_config = {"model_type": DEFAULT_TEXT_MODEL_TYPE}
        if isinstance(self.vision_config, dict):
            self.vision_config = _sub_config("vision_config", self.vision_config, DEFAULT_VISION_CONFIG["model_type"])
        if isinstance(self.text_config, dict):
            self.text_config = _sub_config("text_config", self.text_config, DEFAULT_TEXT_MODEL_TYPE)
        super().__post_init__(**kwargs)
        if self.projector_type not in DEFAULT_NUM_QUERIES:
            raise ValueError(
                f"`projector_type` must be one of {sorted(DEFAULT_NUM_QUERIES)}, got {self.projector_type!r}."
            )
        if self.num_queries is None:
            self.num_queries = DEFAULT_NUM_QUERIES[self.projector_type]
        grid = round(self.num_queries**0.5)
        if grid * grid != self.num_queries:
            raise ValueError(f"`num_queries` must be a square number (a grid of queries), got {self.num_queries}.")
        hidden_size = self.text_config.hidden_size
        if self.resampler_num_heads is None:
            width = getattr(self, HEADS_FOLLOW[self.projector_type]).hidden_size
            self.resampler_num_heads = max(width // RESAMPLER_HEAD_WIDTH, 1)
        if hidden_size % self.resampler_num_heads:
            raise ValueError(
                f"`resampler_num_heads` ({self.resampler_num_heads}) must divide the text hidden size ({hidden_size})."
            )
        if hidden_size % 4:
            raise ValueError(f"The text hidden size must be a multiple of 4 for the 2-D sin-cos table, got {hidden_size}.")
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}


def _sub_config(name: str, values: dict, default_model_type: str) -> PreTrainedConfig:
    """`values` as the config of its `model_type` (`default_model_type` when it has none); an unknown type is refused
    by name."""
    values = {"model_type": default_model_type, **values}
    model_type = values["model_type"]
    if model_type not in CONFIG_MAPPING:
        part = "language model" if name == "text_config" else "vision tower"
        raise ValueError(
            f"`{name}.model_type` {model_type!r} is not a model type of transformers {__version__}: LLaVA-UHD's "
            f"{part} must be a transformers model (such as {default_model_type!r}), or one registered with "
            "`AutoConfig.register`."
        )
    return CONFIG_MAPPING[model_type](**values)


__all__ = ["LlavaUhdConfig"]
