"""PyTorch LLaVA-UHD: CLIP on variable-sized image slices, a compressing resampler, and a causal language model."""

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_llava_uhd import LlavaUhdConfig
from .layout_llava_uhd import crops_per_image, encode_by_shape, image_schema_mask

logger = logging.get_logger(__name__)
# Pooling grids (width, height) of the spatial resampler's boxes, in the reference's order of preference.
POOLING_SIZES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))
# Crop shapes whose resampler constants (resized positions, RoIAlign maps) stay cached.
CACHE_SIZE = 128
# The KV cache's name in model arguments and outputs: `cache` since transformers 5.24, `past_key_values` before.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache under either of its names; `past_key_values` warns where transformers deprecates it (5.24 on)."""
    if past_key_values is not None and CACHE_NAME == "cache":
        message = "`past_key_values` is deprecated and will be removed in transformers 5.40: use `cache`."
        warnings.warn(message, FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


@dataclass
class LlavaUhdModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_outputs: `get_image_features` of the images of the input, when it had images.
    """

    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class LlavaUhdCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_outputs: `get_image_features` of the images of the input, when it had images.
    """

    image_outputs: BaseModelOutputWithPooling | None = None


def sincos_position_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table `[grid_size**2, embed_dim]`, rows row-major over the grid (MAE's layout: the first
    half of the channels encodes the column index, the second the row index; float32 numpy arithmetic)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float32) / np.float32(embed_dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    halves = []
    for coords in (cols.reshape(-1), rows.reshape(-1)):
        angles = np.einsum("m,d->md", coords, omega)
        halves += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(halves, axis=1).astype(np.float32))


def resize_position_table(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubically resize a square `[n * n, dim]` table to `[height * width, dim]` (align_corners=False), in float32."""
    size = math.isqrt(table.shape[0])
    grid = table.float().reshape(1, size, size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(height * width, -1).to(table.dtype)


def _bilinear_axis_weights(coords: torch.Tensor, length: int) -> torch.Tensor:
    """`[..., length]` weights of bilinear sampling at `coords` on one axis, with torchvision's RoIAlign border rules."""
    valid = (coords >= -1.0) & (coords <= length)
    coords = coords.clamp(min=0.0)
    low = coords.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coords), coords - low.float())
    weights = (
        F.one_hot(low, length).float() * (1.0 - frac)[..., None] + F.one_hot(high, length).float() * frac[..., None]
    )
    return weights * valid[..., None]


def roi_align_weights(start: torch.Tensor, extent: torch.Tensor, pooled: int, length: int) -> torch.Tensor:
    """RoIAlign along one axis as `[boxes, pooled, length]` weights: bin `p` of a box starting at `start` with size
    `extent` averages its adaptive number (`ceil(extent / pooled)`) of bilinear samples."""
    bin_size = extent / pooled
    samples = torch.ceil(extent / pooled).long().clamp(min=1)  # adaptive sampling ratio
    steps = torch.arange(int(samples.max()), dtype=torch.float32)
    bins = torch.arange(pooled, dtype=torch.float32)
    coords = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]) + (
        (steps + 0.5)[None, None, :] * bin_size[:, None, None] / samples[:, None, None].float()
    )
    used = steps[None, :] < samples[:, None]  # [boxes, steps]
    weights = _bilinear_axis_weights(coords, length) * used[:, None, :, None]
    return weights.sum(2) / samples[:, None, None].float()


def roi_align_matrix(boxes: torch.Tensor, height: int, width: int, pooled_h: int, pooled_w: int) -> torch.Tensor:
    """RoIAlign as a linear map: `[num_boxes * pooled_h * pooled_w, height * width]` such that multiplying a flattened
    `[height * width, C]` feature map by it gives `torchvision.ops.roi_align(..., (pooled_h, pooled_w),
    spatial_scale=1, sampling_ratio=-1, aligned=False)` for `boxes` `[num_boxes, 4]` (x1, y1, x2, y2), rows ordered
    (box, pooled row, pooled column). Bilinear sampling is separable, so each bin is an outer product."""
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    rows = roi_align_weights(y1, (y2 - y1).clamp(min=1.0), pooled_h, height)
    cols = roi_align_weights(x1, (x2 - x1).clamp(min=1.0), pooled_w, width)
    return torch.einsum("kpy,kqx->kpqyx", rows, cols).reshape(-1, height * width)


def window_boxes(height: int, width: int, num_windows: int) -> torch.Tensor:
    """The reference's `grid x grid` windows over an `height x width` map, `[num_windows, 4]` (x1, y1, x2, y2), with
    its exact float arithmetic (window height derived through the aspect ratio, `x2 = x1 + window width`)."""
    grid = math.isqrt(num_windows)
    aspect = width / height
    box_h = math.sqrt((height * width / num_windows) / aspect)
    box_w = box_h * aspect
    coords = [[j * box_w, i * box_h, j * box_w + box_w, i * box_h + box_h] for i in range(grid) for j in range(grid)]
    return torch.tensor(coords, dtype=torch.float32)


def best_pooling_size(height: int, width: int) -> tuple[int, int]:
    """`(rows, cols)` each box is pooled to: the candidate whose aspect ratio is closest to the feature map's."""
    log_ratio = math.log(width / height)
    best, min_error = (3, 3), float("inf")
    for cols, rows in POOLING_SIZES:
        error = abs(log_ratio - math.log(cols / rows))
        if error < min_error:
            best, min_error = (rows, cols), error
    return best


def never_generated(image_token_id: int, eos_token_id: int | list[int] | None, pad_token_id: int | None) -> set[int]:
    """Tokens generation must not emit: the image token (no image stands behind it) and the pad token, unless it
    also ends sequences."""
    ends = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    return {image_token_id} | ({pad_token_id} - ends - {None})




def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, `[batch, heads, positions, head_dim]` in, `[batch, positions, heads, head_dim]` out."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LlavaUhdResamplerAttention(nn.Module):
    """The resampler's cross-attention: `nn.MultiheadAttention`'s parameters (packed `in_proj_weight` and
    `in_proj_bias`, `out_proj`) and math, with the queries projected once for all crops and the keys and values
    projected before an optional linear reduction (the spatial resampler's RoI pooling), which is then applied to
    `h * w` projected positions instead of projecting `num_queries * pooled` pooled ones. The biases are added after
    the reduction, so the map is the same. The attention itself is the model's `attn_implementation`."""

    def __init__(self, config: LlavaUhdConfig):
        super().__init__()
        embed_dim = config.text_config.hidden_size
        self.config = config
        self.num_heads = config.resampler_num_heads
        self.scaling = 1 / math.sqrt(embed_dim // self.num_heads)  # SDPA's default, exactly
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pool=None) -> torch.Tensor:
        """`queries` `[num_queries, dim]` (shared by all crops), `keys` and `values` `[crops, positions, dim]` ->
        `[crops, num_queries, dim]`. With `pool` (`[crops, positions, dim]` -> `[crops, num_queries, pooled, dim]`),
        query k attends only to the pooled positions of its window k; without it, to all positions."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        crops, num_queries = len(keys), len(queries)
        query = F.linear(queries, w_q, b_q).expand(crops, -1, -1)
        key, value = F.linear(keys, w_k), F.linear(values, w_v)
        if pool is not None:  # one attention per (crop, window): its query against its pooled positions
            query = query.reshape(crops * num_queries, 1, -1)
            key, value = pool(key).flatten(0, 1), pool(value).flatten(0, 1)
        key, value = key + b_k, value + b_v  # b_k changes no output (softmax ignores a per-query constant)

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [batch, positions, dim] -> [batch, heads, positions, -1]
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, split_heads(query), split_heads(key), split_heads(value), None, scaling=self.scaling)
        return self.out_proj(out.reshape(crops, num_queries, -1))


class LlavaUhdResampler(nn.Module):
    """Compresses the `h x w` feature map of a crop into `num_queries` tokens with one cross-attention layer.

    `spatial_resampler` (release): query k attends only to the RoI-aligned features of window k of a
    `sqrt(num_queries)`-square grid of windows over the map. `resampler` (paper): every query attends to the whole
    map. Keys carry the fixed sin-cos table resized to `h x w`; queries carry it at the query grid.
    """

    def __init__(self, config: LlavaUhdConfig):
        super().__init__()
        embed_dim, kv_dim = config.text_config.hidden_size, config.vision_config.hidden_size
        self.num_queries = config.num_queries
        self.spatial = config.projector_type == "spatial_resampler"
        self.query = nn.Parameter(torch.empty(self.num_queries, embed_dim))
        table = sincos_position_table(embed_dim, math.isqrt(self.num_queries))
        self.register_buffer("pos_embed", table.to(self.query.device))  # `meta` when built without weights
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = LlavaUhdResamplerAttention(config)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self._cache = OrderedDict()

    def _cached(self, kind: str, height: int, width: int, dtype: torch.dtype, build) -> torch.Tensor:
        """Shape-dependent constants (least recently used ones dropped), rebuilt when `pos_embed` changes (a load)
        or for another device or dtype, and kept apart in inference mode (autograd may not use its tensors)."""
        pos_embed = self.pos_embed
        key = (kind, height, width, dtype, pos_embed.device, pos_embed.data_ptr(), pos_embed._version)
        key += (torch.is_inference_mode_enabled(),)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = build()
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _window_pooling(self, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoIAlign of every window as two axis maps, `[grid * pooled_h, height]` and `[grid * pooled_w, width]`: the
        windows of a grid row share their y extent and those of a grid column their x extent, so pooling all windows
        is `rows @ feature map @ cols.T`."""

        def build():
            grid = math.isqrt(self.num_queries)
            pooled_h, pooled_w = best_pooling_size(height, width)
            # The reference casts the boxes to the features' dtype before RoIAlign: keep that rounding.
            x1, y1, x2, y2 = window_boxes(height, width, self.num_queries).to(dtype).float().unbind(-1)
            rows = roi_align_weights(y1[::grid], (y2 - y1)[::grid].clamp(min=1.0), pooled_h, height)
            cols = roi_align_weights(x1[:grid], (x2 - x1)[:grid].clamp(min=1.0), pooled_w, width)
            return rows.flatten(0, 1).to(self.pos_embed.device), cols.flatten(0, 1).to(self.pos_embed.device)

        return self._cached("pool", height, width, dtype, build)

    def _pool_windows(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`[crops, height * width, dim]` -> `[crops, num_queries, pooled_h * pooled_w, dim]` (float32): the RoIAligned
        positions of each window, windows row-major."""
        rows, cols = self._window_pooling(height, width, x.dtype)
        grid, (pooled_h, pooled_w) = math.isqrt(self.num_queries), best_pooling_size(height, width)
        crops, dim = x.shape[0], x.shape[-1]
        x = rows @ x.float().view(crops, height, width * dim)  # [crops, grid * pooled_h, width * dim]
        x = cols @ x.view(crops, -1, width, dim)  # [crops, grid * pooled_h, grid * pooled_w, dim]
        x = x.view(crops, grid, pooled_h, grid, pooled_w, dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(crops, self.num_queries, pooled_h * pooled_w, dim)

    def forward(self, features: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`features` `[crops, height * width, kv_dim]` of same-shape crops -> `[crops, num_queries, embed_dim]`."""
        dtype = features.dtype
        key_pos = self._cached(
            "pos", height, width, dtype, lambda: resize_position_table(self.pos_embed, height, width).to(dtype)
        )
        values = self.ln_kv(self.kv_proj(features))
        queries = self.ln_q(self.query) + self.pos_embed.to(dtype)
        pool = (lambda x: self._pool_windows(x, height, width).to(dtype)) if self.spatial else None
        out = self.attn(queries, values + key_pos, values, pool)
        return self.ln_post(out) @ self.proj


class LlavaUhdPreTrainedModel(PreTrainedModel):
    config: LlavaUhdConfig
    config_class = LlavaUhdConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlavaUhdResampler"]
    # The vision tower and the resampler stay unquantized under a `quantization_config` (transformers' quantizers skip
    # what this lists, with the patterns of `llm_int8_skip_modules` / `modules_to_not_convert`, and the output
    # embeddings `lm_head` by themselves); loaded in float16, they are kept in float32.
    _keep_in_fp32_modules = [r"(model\.)?vision_tower", r"(model\.)?resampler"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LlavaUhdResamplerAttention):  # as `nn.MultiheadAttention` initialises itself
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, LlavaUhdResampler):
            embed_dim = module.query.shape[-1]
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, sincos_position_table(embed_dim, math.isqrt(module.num_queries)))
            init.normal_(module.proj, std=embed_dim**-0.5)


class LlavaUhdModel(LlavaUhdPreTrainedModel):
    """LLaVA-UHD without a language modeling head: vision tower, resampler and language model."""

    # Whether a `generate` call running now gave the `max_position_embeddings` warning (`None`: no call runs, and
    # every forward past the limit warns).
    _positions_warned: bool | None = None

    def __init__(self, config: LlavaUhdConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.resampler = LlavaUhdResampler(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.Tensor | None = None,
        slice_grid: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Encode packed crops (see `LlavaUhdImageProcessor`) into `num_queries` tokens per crop.

        Crops are grouped by patch grid: one vision-tower forward (positions interpolated to the grid) per distinct
        shape. The patch features of its hidden state `vision_feature_layer` (a class token, when the tower has one,
        dropped) feed the resampler. Returns `last_hidden_state`
        `[crops, num_queries, hidden]` and `pooler_output`: one `[crops_of_image * num_queries, hidden]` tensor per
        image, crops in schema order (slices row-major, then the overview). With `output_hidden_states` /
        `output_attentions`, `hidden_states[layer][crop]` and `attentions[layer][crop]` hold the tower's own outputs
        for each crop (crops differ in length). `image_grid_hw` and `slice_grid` are required (they are optional only
        so that their absence is reported as such, also when `generate` encodes the images).
        """
        if image_grid_hw is None or slice_grid is None:
            raise ValueError("`pixel_values` needs the `image_grid_hw` and `slice_grid` of the image processor.")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        num_states = self.config.vision_config.num_hidden_layers + 1  # the embeddings, then every layer's output
        if not -num_states <= layer < num_states:
            raise ValueError(f"`vision_feature_layer` must be in [{-num_states}, {num_states - 1}], got {layer}.")
        grid_hw = image_grid_hw.tolist()
        crop_lengths = [h * w for h, w in grid_hw]
        if sum(crop_lengths) != pixel_values.shape[0]:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[0]} patches but `image_grid_hw` describes {sum(crop_lengths)}."
            )
        image_crops = [crops_per_image(rows, cols) for rows, cols in slice_grid.tolist()]
        if sum(image_crops) != len(grid_hw):
            raise ValueError(
                f"`slice_grid` describes {sum(image_crops)} crops but `image_grid_hw` has {len(grid_hw)}."
            )

        wanted = []  # `output_hidden_states` / `output_attentions` of the call, else of the config
        for name in ("hidden_states", "attentions"):
            requested = kwargs.pop(f"output_{name}", None)
            if getattr(self.config, f"output_{name}", False) if requested is None else requested:
                wanted.append(name)
        per_crop = {name: [None] * len(grid_hw) for name in wanted}

        def encode(images: torch.Tensor, height: int, width: int, indices: list[int]) -> torch.Tensor:
            outputs = self.vision_tower(
                pixel_values=images,
                interpolate_pos_encoding=True,
                output_hidden_states=True,
                output_attentions="attentions" in wanted,
                return_dict=True,
                **kwargs,
            )
            for name in wanted:
                if outputs.get(name) is None:
                    raise ValueError(
                        f"The vision tower returned no {name}; load the model with attn_implementation='eager'."
                    )
                for position, index in enumerate(indices):
                    per_crop[name][index] = tuple(state[position] for state in outputs[name])
            return self.resampler(outputs.hidden_states[layer][:, -height * width :], height, width)

        pixel_values = pixel_values.to(self.vision_tower.dtype)
        tokens = encode_by_shape(pixel_values, grid_hw, self.config.vision_config.patch_size, encode)
        per_image = [t.flatten(0, 1) for t in tokens.split(image_crops)] if tokens is not None else []
        extra = {name: tuple(zip(*states)) for name, states in per_crop.items() if tokens is not None}
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=per_image, **extra)

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Boolean `[batch, seq]` mask of the `<image>` positions (from ids, or from embeddings when ids are absent)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        slice_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaUhdModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the KV cache; `past_key_values` is accepted as its other name, as transformers
            accepts both.
        """
        cache = _cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        name, tokens = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds[..., 0])
        if tokens.numel() == 0:
            raise ValueError(f"`{name}` holds no tokens (shape {tuple(tokens.shape)}): a prompt needs at least one.")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either `pixel_values` or pre-computed `mm_encoder_outputs`, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grid_hw, slice_grid, return_dict=True)

        # Without images, `<image>` tokens are embedded as the text tokens they are (as transformers' LLaVA models do:
        # an assistant model's prefill, a decode step); images must match them exactly.
        if image_outputs is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            num_features = sum(len(t) for t in image_outputs.pooler_output)
            num_tokens = int(mask.sum())
            if num_tokens != num_features:
                raise ValueError(
                    f"Image features and image tokens do not match: the input has {num_tokens} `<image>` token(s) but "
                    f"the images give {num_features} feature(s) ({self.config.num_queries} per crop). Build inputs "
                    "with LlavaUhdProcessor, and check its `num_queries` equals the model's."
                )
            if num_features:
                features = torch.cat(image_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None].to(inputs_embeds.device), features)

        length = inputs_embeds.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and length > limit and not self._positions_warned:
            logger.warning(
                f"The sequence has {length} positions, more than the {limit} the language model was trained with "
                "(`max_position_embeddings`): outputs past that are unreliable. Shorten the prompt, pass fewer "
                "images or lower `max_slice_nums`."
            )
            if self._positions_warned is not None:  # within `generate`: once per call, not once per token
                self._positions_warned = True
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return LlavaUhdModelOutputWithPast(**outputs, image_outputs=image_outputs)


class LlavaUhdForConditionalGeneration(LlavaUhdPreTrainedModel, GenerationMixin):
    """LLaVA-UHD with a language modeling head: answers about images of any aspect ratio and resolution."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LlavaUhdConfig):
        super().__init__(config)
        self.model = LlavaUhdModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, slice_grid: torch.Tensor, **kwargs
    ) -> BaseModelOutputWithPooling:
        """See [`LlavaUhdModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_grid_hw, slice_grid, **kwargs)

    def generate(self, *args, generation_config=None, **kwargs):
        """[`GenerationMixin.generate`] that never emits the image token, nor the pad token (unless it is an end of
        sequence), in any decoding mode: they are added to `suppress_tokens`. A sequence longer than
        `max_position_embeddings` is warned about once per call."""
        config = generation_config if generation_config is not None else self.generation_config
        blocked = never_generated(
            self.config.image_token_id,
            kwargs.get("eos_token_id", config.eos_token_id),
            kwargs.get("pad_token_id", config.pad_token_id),
        )
        already = kwargs.get("suppress_tokens") or config.suppress_tokens or []
        kwargs["suppress_tokens"] = sorted(blocked | set(already))
        self.model._positions_warned = False
        try:
            return super().generate(*args, generation_config=generation_config, **kwargs)
        finally:
            self.model._positions_warned = None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        slice_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaUhdCausalLMOutputWithPast:
        r"""
        pixel_values, image_grid_hw, slice_grid: packed crops from [`LlavaUhdImageProcessor`].
        cache: the KV cache (`past_key_values` is its other name).
        labels: token ids for the causal LM loss; -100 is ignored, and so are the images' schemas (image tokens and the
            separators between crops, as the reference ignores image features), whichever collator built the batch.

        Example:

        ```python
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written?"}]}]
        >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
        >>> answer = model.generate(**inputs, max_new_tokens=32)
        ```
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            slice_grid=slice_grid,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, kept])
        loss = None
        if labels is not None:
            ids = input_ids if input_ids is not None else labels
            schema = image_schema_mask(ids, self.config.image_token_id, slice_grid, self.config.num_queries)
            labels = labels.masked_fill(schema | (labels == self.config.image_token_id), -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return LlavaUhdCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = ["LlavaUhdForConditionalGeneration", "LlavaUhdModel", "LlavaUhdPreTrainedModel", "LlavaUhdResampler"]
