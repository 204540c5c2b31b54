"""LLaVA-UHD in vLLM: vLLM's CLIP and language models around this package's resampler and processor.

Registered with vLLM by the `vllm.general_plugins` entry point (`modeling_llava_uhd.vllm_plugin:register`), so
`vllm serve <converted folder>` and `LLM(model=<converted folder>)` load it. Not part of the Hub bundle.
"""

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.clip import CLIPVisionEmbeddings, CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from .layout_llava_uhd import crops_per_image, encode_by_shape
from .modeling_llava_uhd import LlavaUhdResampler, never_generated, resize_position_table
from .processing_llava_uhd import LlavaUhdProcessor
from .vllm_tokenization import retokenize


class LlavaUhdVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's patch and position embeddings for a crop of any patch grid: the position table is bicubically resized
    to the crop's grid, as transformers' CLIP does with `interpolate_pos_encoding=True`."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        table = self.position_embedding.weight
        grid = resize_position_table(table[1:], height // self.patch_size, width // self.patch_size)
        embeddings = torch.cat([self.class_embedding.expand(batch, 1, -1), patches], dim=1)
        return embeddings + torch.cat([table[:1], grid])


class LlavaUhdProcessingInfo(BaseProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> LlavaUhdProcessor:
        return self.ctx.get_hf_processor(**kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, **kwargs: object) -> int:
        """Tokens an image stands for in the sequence (its schema: image tokens and separators)."""
        return self.get_hf_processor()._get_num_multimodal_tokens([[image_height, image_width]], **kwargs)[
            "num_image_tokens"
        ][0]

    def get_image_size_with_most_features(self) -> ImageSize:
        """The image size whose layout has the most crops (the first found): long side `max_image_size` (or, when
        images are not pre-resized, large enough for every slice), short side any multiple of the patch size."""
        image_processor = self.get_hf_processor().image_processor
        scale, patch = image_processor.scale_resolution, image_processor.patch_size
        long_side = image_processor.max_image_size or scale * (image_processor.max_slice_nums + 1)
        sizes = [(long_side, short) for short in range(patch, long_side + 1, patch)]
        sizes += [(short, long) for long, short in sizes]
        width, height = max(sizes, key=lambda size: image_processor.get_slice_layout(size[1], size[0]).num_crops)
        return ImageSize(width=width, height=height)

    def get_max_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class LlavaUhdDummyInputsBuilder(BaseDummyInputsBuilder[LlavaUhdProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width,
            height=size.height,
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class LlavaUhdMultiModalProcessor(BaseMultiModalProcessor[LlavaUhdProcessingInfo]):
    """Images are sliced by `LlavaUhdImageProcessor` (through the processor, which pairs them with `<image>`
    placeholders); each `<image>` of the prompt becomes the processor's `schema_ids`, of which only the image tokens
    take image features (the separators are text)."""

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """vLLM tokenizes the prompt as one text; the reference tokenizes the text after each `<image>` on its own
        (with Vicuna's `legacy=False` tokenizer that text starts with `▁`): see `retokenize`."""
        return retokenize(self.info.get_hf_processor(), prompt)

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        slice_grid = hf_inputs.get("slice_grid", torch.empty(0, 2, dtype=torch.long))
        crops = torch.tensor([crops_per_image(rows, cols) for rows, cols in slice_grid.tolist()], dtype=torch.long)
        patches = hf_inputs.get("image_grid_hw", torch.empty(0, 2, dtype=torch.long)).prod(-1)
        patches_per_image = torch.tensor([int(chunk.sum()) for chunk in patches.split(crops.tolist())])
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", patches_per_image),
            "image_grid_hw": MultiModalFieldConfig.flat_from_sizes("image", crops),
            "slice_grid": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor()

        def schema(item_idx: int) -> PromptUpdateDetails:
            rows, cols = out_mm_kwargs["image"][item_idx]["slice_grid"].data.tolist()
            return PromptUpdateDetails.select_token_id(processor.schema_ids(rows, cols), processor.image_token_id)

        return [PromptReplacement(modality="image", target=[processor.image_token_id], replacement=schema)]


@MULTIMODAL_REGISTRY.register_processor(
    LlavaUhdMultiModalProcessor, info=LlavaUhdProcessingInfo, dummy_inputs=LlavaUhdDummyInputsBuilder
)
class LlavaUhdForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """LLaVA-UHD for vLLM: vLLM's CLIP (positions resized per crop) up to `vision_feature_layer`, this package's
    `LlavaUhdResampler`, and the language model vLLM registers for `text_config`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # transformers 5 saves the CLIP tower without its `vision_model.` level; older checkpoints have it.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.vision_model.": "vision_tower.vision_model.",
            "model.vision_tower.": "vision_tower.vision_model.",
            "model.resampler.": "resampler.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("LLaVA-UHD only takes images.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text_config, vision_config = config.text_config, config.vision_config
        self.configure_mm_token_handling(text_config.vocab_size, [config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(
                vision_config,
                quant_config=vllm_config.quant_config,
                num_hidden_layers_override=get_layer_index(
                    config.vision_feature_layer, vision_config.num_hidden_layers
                ),
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.vision_tower.vision_model.embeddings = LlavaUhdVisionEmbeddings(vision_config)
            # The resampler's attention is `config._attn_implementation`, which transformers sets when it loads a model
            # and vLLM leaves unset: SDPA, transformers' own default, so both compute the resampler alike.
            resampler_config = copy.deepcopy(config)
            resampler_config._attn_implementation = "sdpa"
            self.resampler = LlavaUhdResampler(resampler_config)
        with self._mark_language_model(vllm_config):
            architectures = text_config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=architectures,
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # As the transformers model's `generate`: never the image token, nor a pad token that does not end sequences.
        self.suppressed_tokens = sorted(
            never_generated(
                config.image_token_id, text_config.eos_token_id, getattr(text_config, "pad_token_id", None)
            )
        )

    def _encode_crop_group(self, images: torch.Tensor, height: int, width: int, indices: list[int]) -> torch.Tensor:
        """Same-shape crops -> `[crops, num_queries, hidden]`: CLIP up to the feature layer, class token dropped."""
        features = self.vision_tower(images.to(self.vision_tower.dtype))[:, -height * width :]
        return self.resampler(features, height, width)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        image_grid_hw, slice_grid = kwargs["image_grid_hw"].tolist(), kwargs["slice_grid"].tolist()
        patch = self.config.vision_config.patch_size
        tokens = encode_by_shape(pixel_values, image_grid_hw, patch, self._encode_crop_group)
        return [image.flatten(0, 1) for image in tokens.split([crops_per_image(*grid) for grid in slice_grid])]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            logits[..., self.suppressed_tokens] = -math.inf
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
