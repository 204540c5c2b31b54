"""The grouped vision path (the whole vision tower, its feature layer, the resampler) equals the stock computation."""

import pytest
import torch
from tiny import make_model, make_processor, photo
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration
from modeling_llava_uhd import modeling_llava_uhd as modeling
from modeling_llava_uhd.modeling_llava_uhd import LlavaUhdResamplerAttention


@pytest.fixture(scope="module")
def inputs():
    images = [photo("astronaut", (1088, 672)), photo("coffee"), photo("camera", (300, 900))]
    return make_processor().image_processor(images)


def stock_features(model, inputs, layer: int = -2) -> torch.Tensor:
    """Every crop through the tower's own transformers forward (all layers, interpolated positions), then its patch
    features (CLIP's class token dropped) at hidden state `layer` through the resampler."""
    inner, patch = model.model, model.config.vision_config.patch_size
    grid = inputs["image_grid_hw"].tolist()
    tokens = []
    for pixels, (height, width) in zip(inputs["pixel_values"].split([h * w for h, w in grid]), grid):
        image = pixels.view(1, height, width, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
        image = image.reshape(1, 3, height * patch, width * patch)
        states = inner.vision_tower(pixel_values=image, interpolate_pos_encoding=True, output_hidden_states=True)
        tokens.append(inner.resampler(states.hidden_states[layer][:, -height * width :], height, width))
    return torch.cat(tokens)


def features(model, inputs, **kwargs) -> torch.Tensor:
    return model.get_image_features(**inputs, **kwargs).last_hidden_state


@pytest.mark.parametrize("projector_type", ["spatial_resampler", "resampler"])
@pytest.mark.parametrize("layer", [-2, -1, 0, 1])
def test_matches_the_stock_vision_tower(inputs, projector_type, layer):
    model = make_model(projector_type)
    with torch.no_grad():
        torch.testing.assert_close(
            features(model, inputs, vision_feature_layer=layer),
            stock_features(model, inputs, layer),
            atol=1e-5,
            rtol=1e-5,
        )


def test_one_vision_tower_forward_per_crop_shape(inputs):
    model = make_model()
    shapes = []
    model.model.vision_tower.register_forward_hook(
        lambda _module, _args, kwargs, _output: shapes.append(tuple(kwargs["pixel_values"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        features(model, inputs)
    grids = [tuple(grid) for grid in inputs["image_grid_hw"].tolist()]
    patch = model.config.vision_config.patch_size
    expected = {(grids.count(grid), 3, grid[0] * patch, grid[1] * patch) for grid in set(grids)}
    assert len(shapes) == len(expected) and set(shapes) == expected
    with pytest.raises(ValueError, match="vision_feature_layer"):
        features(model, inputs, vision_feature_layer=model.config.vision_config.num_hidden_layers + 1)


def test_image_features_return_the_towers_hidden_states_and_attentions(inputs):
    model = make_model()
    model.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.get_image_features(**inputs, output_hidden_states=True, output_attentions=True)
    grids = inputs["image_grid_hw"].tolist()
    layers = model.config.vision_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for crop, (height, width) in enumerate(grids):
        assert out.hidden_states[0][crop].shape == (1 + height * width, model.config.vision_config.hidden_size)
        heads = model.config.vision_config.num_attention_heads
        assert out.attentions[-1][crop].shape == (heads, 1 + height * width, 1 + height * width)
    # The features come from the hidden state `vision_feature_layer` (-2), class token dropped.
    first = out.hidden_states[-2][0][1:][None]
    height, width = grids[0]
    torch.testing.assert_close(model.model.resampler(first, height, width)[0], out.last_hidden_state[0])
    plain = model.get_image_features(**inputs)
    assert plain.hidden_states is None and plain.attentions is None


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_resampler_attention_is_multihead_attention(implementation):
    config = make_model().config
    config._attn_implementation = implementation
    dim, heads = config.text_config.hidden_size, config.resampler_num_heads
    torch.manual_seed(0)
    ours, torch_attention = LlavaUhdResamplerAttention(config), torch.nn.MultiheadAttention(dim, heads)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in torch_attention.state_dict().items()
    }
    ours.load_state_dict(torch_attention.state_dict())
    queries, keys, values = torch.randn(5, dim), torch.randn(3, 7, dim), torch.randn(3, 7, dim)
    expected = torch_attention(
        queries[:, None].expand(-1, 3, -1), keys.transpose(0, 1), values.transpose(0, 1), need_weights=False
    )[0]
    torch.testing.assert_close(ours(queries, keys, values), expected.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_set_attn_implementation_reaches_the_resampler(inputs, monkeypatch):
    """`set_attn_implementation` switches the resampler's attention too (it reads the model's setting per call), and
    the eager and SDPA paths give the same features."""
    model = make_model()
    sdpa = features(model, inputs)
    calls, original = [], modeling.eager_attention_forward

    def eager(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", eager)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(features(model, inputs), sdpa, atol=1e-5, rtol=1e-5)
    assert "LlavaUhdResamplerAttention" in calls


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_resampler_runs_the_chosen_attention(inputs, monkeypatch, implementation):
    """Eager and SDPA give equal features, so the outputs cannot tell which ran: every attention function the
    resampler could call records it, and only the model's `attn_implementation` may."""
    calls = []

    def spy(name, function):
        def recorded(module, *args, **kwargs):
            if isinstance(module, LlavaUhdResamplerAttention):
                calls.append(name)
            return function(module, *args, **kwargs)

        return recorded

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy("sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"]))
    monkeypatch.setattr(modeling, "eager_attention_forward", spy("eager", modeling.eager_attention_forward))
    model = make_model()
    model.set_attn_implementation(implementation)
    features(model, inputs)
    assert calls and set(calls) == {implementation}


def test_constants_from_inference_mode_are_not_reused_by_autograd(inputs):
    model = make_model()
    with torch.inference_mode():
        features(model, inputs)
    model.train()
    features(model, inputs).sum().backward()
    assert model.model.resampler.query.grad.abs().sum() > 0


def siglip_model():
    config = make_model().config.to_dict()
    config["vision_config"] = {
        "model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "patch_size": 14, "image_size": 336,
    }  # fmt: skip
    torch.manual_seed(0)
    return LlavaUhdForConditionalGeneration(LlavaUhdConfig(**config)).eval()


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_the_tower_runs_whole_through_its_own_forward(inputs, tower):
    """Layer -2 of a 3-layer tower: every layer runs, once per crop shape, and the features are those of the whole
    tower's hidden state -2, for CLIP and SigLIP alike; the tower is left as it was (no per-call surgery)."""
    model = make_model() if tower == "clip" else siglip_model()
    vision = model.model.vision_tower
    layers = next(module for name, module in vision.named_modules() if name.endswith("encoder.layers"))
    modules_before = list(vision.modules())
    runs = []
    layers[-1].register_forward_hook(lambda *args: runs.append("last"))
    with torch.no_grad():
        ours = features(model, inputs)
        assert len(runs) == len({tuple(shape) for shape in inputs["image_grid_hw"].tolist()})
        expected = stock_features(model, inputs, model.config.vision_feature_layer)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert len(layers) == 3 and list(vision.modules()) == modules_before
