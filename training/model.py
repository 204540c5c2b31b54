"""LLaVA-UHD models to train: a fresh one from a CLIP and an LLM checkpoint (stage 1 starts there) or a saved one
(stage 2 from stage 1's output, fine-tuning a converted model), which components train, and how many parameters do."""

from collections.abc import Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel

from conversion.tokenizer import prepare_tokenizer
from modeling_llava_uhd import (
    LlavaUhdConfig,
    LlavaUhdForConditionalGeneration,
    LlavaUhdImageProcessor,
    LlavaUhdProcessor,
)
from modeling_llava_uhd.configuration_llava_uhd import PAD_VOCAB_TO
from modeling_llava_uhd.modeling_llava_uhd import LlavaUhdResampler

# The parts of the model, as named in its parameter names (PEFT's wrappers only add prefixes and suffixes).
COMPONENTS = ("vision_tower", "resampler", "language_model", "lm_head")


def build_model(
    vision_model: str,
    text_model: str,
    projector_type: str = "spatial_resampler",
    num_queries: int | None = None,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
) -> tuple[LlavaUhdForConditionalGeneration, LlavaUhdProcessor]:
    """A LLaVA-UHD model from a CLIP checkpoint (a full `CLIPModel` or a `CLIPVisionModel`) and a causal LM
    checkpoint, with a freshly initialised resampler, and its processor.

    The LLM's tokenizer gets `<image>` (and `<pad>` when it has none); the embeddings grow to a multiple of 64 rows.
    The two checkpoints are loaded once: the model is assembled from them, not copied.
    """
    tokenizer = prepare_tokenizer(text_model)
    kwargs = {"dtype": dtype} | ({"attn_implementation": attn_implementation} if attn_implementation else {})
    vision = CLIPVisionModel.from_pretrained(vision_model, **kwargs)
    text = AutoModelForCausalLM.from_pretrained(text_model, **kwargs)
    config = LlavaUhdConfig(
        vision_config=vision.config,
        text_config=text.config,
        projector_type=projector_type,
        num_queries=num_queries,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = LlavaUhdForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = text.base_model
    model.lm_head = text.get_output_embeddings()
    resampler = LlavaUhdResampler(config)
    resampler.apply(model._init_weights)
    model.model.resampler = resampler.to(vision.dtype)
    model.generation_config = text.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_VOCAB_TO)
    processor = LlavaUhdProcessor(
        image_processor=LlavaUhdImageProcessor(), tokenizer=tokenizer, num_queries=config.num_queries
    )
    return model, processor


def load_model(path: str, **kwargs) -> tuple[LlavaUhdForConditionalGeneration, LlavaUhdProcessor]:
    """A saved LLaVA-UHD model (stage 1's output, a converted checkpoint) and its processor; `kwargs` go to
    `from_pretrained` (`dtype`, `attn_implementation`, `quantization_config`, `device_map`)."""
    return LlavaUhdForConditionalGeneration.from_pretrained(path, **kwargs), LlavaUhdProcessor.from_pretrained(path)


def component_of(parameter_name: str) -> str:
    """The component (one of `COMPONENTS`) a parameter belongs to."""
    parts = parameter_name.split(".")
    for component in COMPONENTS:
        if component in parts:
            return component
    raise ValueError(f"Parameter {parameter_name!r} belongs to none of {COMPONENTS}.")


def set_trainable(model: nn.Module, components: Iterable[str]) -> None:
    """Train exactly the parameters of `components` and freeze all the others."""
    components = set(components)
    if unknown := components - set(COMPONENTS):
        raise ValueError(f"Unknown component(s) {sorted(unknown)}; choose among {COMPONENTS}.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(component_of(name) in components)


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`{component: (trainable, total)}` parameter counts (the full sizes under DeepSpeed ZeRO-3)."""
    counts = {component: [0, 0] for component in COMPONENTS}
    for name, parameter in model.named_parameters():
        size = getattr(parameter, "ds_numel", parameter.numel())
        count = counts[component_of(name)]
        count[0] += size if parameter.requires_grad else 0
        count[1] += size
    return {component: (trainable, total) for component, (trainable, total) in counts.items()}


def format_parameter_counts(counts: dict[str, tuple[int, int]]) -> str:
    """A table of `parameter_counts`, with a total row."""
    rows = [*counts.items(), ("total", tuple(map(sum, zip(*counts.values(), strict=True))))]
    lines = [f"{'component':<16}{'trainable':>16}{'total':>16}"]
    lines += [f"{component:<16}{trainable:>16,}{total:>16,}" for component, (trainable, total) in rows]
    return "\n".join(lines)


__all__ = [
    "COMPONENTS",
    "build_model",
    "component_of",
    "format_parameter_counts",
    "load_model",
    "parameter_counts",
    "set_trainable",
]
