"""LlavaUhdModel / LlavaUhdForConditionalGeneration on tiny random configs."""

import pytest
import torch
from tiny import make_model, make_processor, photo
from transformers import GenerationMixin

from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration
from modeling_llava_uhd.modeling_llava_uhd import CACHE_NAME, never_generated

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module", params=["spatial_resampler", "resampler"])
def model(request):
    return make_model(request.param)


def _inputs(processor, images, texts=None, **kwargs):
    texts = texts or [processor.apply_chat_template(QUESTION, add_generation_prompt=True)] * len(images)
    return processor(images=images, text=texts, return_tensors="pt", **kwargs)


class CallCounter:
    """Records the input shape of every vision-tower pass (each pass enters the first encoder layer once)."""

    def __init__(self, vision_tower):
        self.shapes = []
        vision_tower.encoder.layers[0].register_forward_hook(
            lambda _m, args, _o: self.shapes.append(tuple(args[0].shape))
        )


def test_forward_shapes_and_image_features(model, processor):
    inputs = _inputs(processor, [photo("astronaut", (1088, 672))])
    out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"], inputs["slice_grid"])
    assert len(features.pooler_output) == 1
    crops = inputs["image_grid_hw"].shape[0]
    assert features.pooler_output[0].shape == (crops * model.config.num_queries, model.config.text_config.hidden_size)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == crops * model.config.num_queries


def test_vision_tower_runs_once_per_crop_shape_and_matches_per_crop(model, processor):
    images = [photo("astronaut", (1088, 672)), photo("coffee"), photo("camera", (300, 900))]
    inputs = processor.image_processor(images)
    counter = CallCounter(model.model.vision_tower)
    with torch.no_grad():
        grouped = model.get_image_features(**inputs).pooler_output
    distinct = {tuple(s) for s in inputs["image_grid_hw"].tolist()}
    assert len(counter.shapes) == len(distinct) < inputs["image_grid_hw"].shape[0]

    # One crop at a time through the same weights gives the same tokens.
    lengths = (inputs["image_grid_hw"].prod(-1)).tolist()
    single = []
    with torch.no_grad():
        for pixels, grid in zip(inputs["pixel_values"].split(lengths), inputs["image_grid_hw"]):
            out = model.get_image_features(pixels, grid[None], torch.zeros(1, 2, dtype=torch.long))
            single.append(out.pooler_output[0])
    torch.testing.assert_close(torch.cat(grouped), torch.cat(single), atol=1e-5, rtol=1e-5)


def test_position_embedding_interpolation_is_identity_at_native_grid(model):
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        native = tower(pixel_values=pixels).last_hidden_state
        interpolated = tower(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(native, interpolated, atol=0, rtol=0)


def test_mismatched_image_tokens_raise(model, processor):
    inputs = _inputs(processor, [photo("coffee")])
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids[0, first] = processor.tokenizer.unk_token_id
    with pytest.raises(ValueError, match=r"image tokens do not match.*\d+ `<image>` token"):
        model(**{**inputs, "input_ids": ids})
    with pytest.raises(ValueError, match="image_grid_hw"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("missing", [("image_grid_hw", "slice_grid"), ("image_grid_hw",), ("slice_grid",), "prompt"])
def test_generate_gives_the_errors_forward_gives(processor, missing):
    """Pixels without their grids, or a prompt of no tokens: `generate` (which encodes the images before its first
    forward) stops with forward's own message, not a `TypeError` or a reshape error from deep inside."""
    model = make_model()
    if missing == "prompt":
        inputs = {"input_ids": torch.empty(1, 0, dtype=torch.long)}
        message = r"^`input_ids` holds no tokens \(shape \(1, 0\)\): a prompt needs at least one\.$"
    else:
        inputs = {k: v for k, v in _inputs(processor, [photo("coffee", (300, 200))]).items() if k not in missing}
        message = r"^`pixel_values` needs the `image_grid_hw` and `slice_grid` of the image processor\.$"
    with pytest.raises(ValueError, match=message):
        model(**inputs)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2)
    if missing == "prompt":
        embeds = torch.empty(1, 0, model.config.text_config.hidden_size)
        with pytest.raises(ValueError, match=r"^`inputs_embeds` holds no tokens \(shape \(1, 0\)\)"):
            model(inputs_embeds=embeds)


@pytest.mark.parametrize("part, model_type", [("text_config", "vicuna"), ("vision_config", "clip_vision")])
def test_an_unknown_model_type_is_named(part, model_type):
    """Not a transformers model type: the config says which part, which type, and what it must be, instead of a bare
    `KeyError`."""
    message = rf"^`{part}.model_type` '{model_type}' is not a model type of transformers [\d.]+\w*: LLaVA-UHD's "
    message += "language model" if part == "text_config" else "vision tower"
    message += r" must be a transformers model \(such as '(llama|clip_vision_model)'\)"
    with pytest.raises(ValueError, match=message):
        LlavaUhdConfig(**{part: {"model_type": model_type}})


def test_inputs_embeds_path_matches_input_ids(model, processor):
    inputs = _inputs(processor, [photo("coffee")])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        by_ids = model(**inputs).logits
        by_embeds = model(
            inputs_embeds=embeds,
            pixel_values=inputs["pixel_values"],
            image_grid_hw=inputs["image_grid_hw"],
            slice_grid=inputs["slice_grid"],
            attention_mask=inputs["attention_mask"],
        ).logits
    torch.testing.assert_close(by_ids, by_embeds)


def test_save_load_gives_identical_logits(model, processor, tmp_path):
    inputs = _inputs(processor, [photo("astronaut", (700, 500))])
    model.save_pretrained(tmp_path)
    reloaded = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits, atol=0, rtol=0)
    assert torch.equal(reloaded.model.resampler.pos_embed, model.model.resampler.pos_embed)


def test_loss_and_gradients(processor):
    model = make_model().train()
    model.gradient_checkpointing_enable()  # `activation_checkpointing_enable` from transformers 5.24 on
    inputs = _inputs(processor, [photo("coffee")])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    resampler_grad = model.model.resampler.query.grad
    assert resampler_grad is not None and resampler_grad.abs().sum() > 0
    assert model.model.vision_tower.get_input_embeddings().weight.grad.abs().sum() > 0


def test_loss_ignores_each_images_whole_schema(processor):
    """Labels that are the input ids (TRL's stock collator without `assistant_only_loss`) lose the images' schemas,
    separators included (the reference ignores all image features): the loss is that of labels masked where the
    processor's `mm_token_type_ids` mark the schemas, which is not the loss with the separators kept."""
    model = make_model()
    images = [photo("astronaut", (1088, 672)), photo("coffee", (120, 90)), photo("camera", (300, 900))]
    inputs = _inputs(processor, images, return_mm_token_type_ids=True, padding=True)
    types = inputs.pop("mm_token_type_ids").bool()
    image_only = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    expected = inputs["input_ids"].masked_fill(types, -100)
    assert (image_only != expected).sum() > 2  # the schemas hold separators
    with torch.no_grad():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        torch.testing.assert_close(loss, model(**inputs, labels=expected).loss)
        kept = torch.nn.functional.cross_entropy(
            model(**inputs).logits[:, :-1].flatten(0, 1), image_only[:, 1:].flatten(), ignore_index=-100
        )
        assert not torch.isclose(loss, kept)


def test_generate_encodes_images_only_on_prefill(processor):
    model = make_model()
    inputs = _inputs(processor, [photo("coffee")])
    counter = CallCounter(model.model.vision_tower)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert len(counter.shapes) == len({tuple(s) for s in inputs["image_grid_hw"].tolist()})


def test_generate_without_cache_matches_cached(processor):
    model = make_model()
    inputs = _inputs(processor, [photo("coffee")])
    cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_matches_one_by_one(processor):
    model = make_model()
    images = [photo("astronaut", (1088, 672)), photo("coffee"), photo("camera", (200, 300))]
    questions = ["What is in the picture?", "Describe the image in detail.", "Count the objects."]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    batch = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    batched = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert batched[i, width:].tolist() == alone[0, single["input_ids"].shape[1] :].tolist()


def test_sampling_beam_search_and_text_only(processor):
    model = make_model()
    inputs = _inputs(processor, [photo("coffee")])
    torch.manual_seed(1)
    first = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(1)
    again = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(first, again)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2
    text = processor(text=["USER: Count the objects. ASSISTANT:"], return_tensors="pt")
    assert "pixel_values" not in text
    assert model.generate(**text, max_new_tokens=3, min_new_tokens=3).shape[1] == text["input_ids"].shape[1] + 3


def test_sdpa_matches_eager(processor, tmp_path):
    make_model().save_pretrained(tmp_path)
    inputs = _inputs(processor, [photo("coffee")])
    logits = {}
    for implementation in ("eager", "sdpa"):
        loaded = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation)
        assert loaded.config.text_config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded.eval()(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=1e-4)


def test_bfloat16_and_device_map(processor, tmp_path):
    """bfloat16 weights give float32's image features and logits to bfloat16's precision (measured: 0.019 on features
    up to 3.1, 0.005 on logits up to 0.7)."""
    make_model().save_pretrained(tmp_path)
    inputs = _inputs(processor, [photo("coffee")])
    model = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert model.dtype == torch.bfloat16
    reference = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out, expected = model(**inputs), reference(**inputs)
    assert out.logits.dtype == torch.bfloat16
    features = out.image_outputs.last_hidden_state
    torch.testing.assert_close(features.float(), expected.image_outputs.last_hidden_state, atol=0.05, rtol=0)
    torch.testing.assert_close(out.logits.float(), expected.logits, atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "decoding",
    [{"do_sample": False}, {"do_sample": True, "top_k": 0, "temperature": 1.0}, {"num_beams": 3, "do_sample": False}],
    ids=["greedy", "sampling", "beam_search"],
)
def test_generation_never_emits_the_image_or_pad_token(processor, decoding):
    """A model whose logits favour `<image>`, then `<pad>`: generation goes on with other tokens instead of emitting
    image tokens that no image stands behind (which stopped generation with an error before image tokens without
    features were embedded as text)."""
    model = make_model()
    image_id, pad_id = model.config.image_token_id, model.generation_config.pad_token_id
    favour(model, {image_id: 100.0, pad_id: 90.0})
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    with torch.no_grad():
        assert model(**inputs).logits[0, -1].topk(2).indices.tolist() == [image_id, pad_id]
    unsuppressed = GenerationMixin.generate(model, **inputs, max_new_tokens=3, do_sample=False)  # what it did before
    assert unsuppressed[0, inputs["input_ids"].shape[1]] == image_id

    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **decoding)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 5 and image_id not in new and pad_id not in new


def favour(model: LlavaUhdForConditionalGeneration, biases: dict[int, float]) -> None:
    """Give `model` a language modeling head with `biases` on these token ids, so that its logits favour them."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        for token, bias in biases.items():
            head.bias[token] = bias
    model.lm_head = head


def test_a_pad_that_is_also_the_eos_still_ends_generation(processor):
    """With `pad == eos` (a common setup) the pad is an end of sequence: it is not suppressed, so generation stops."""
    assert never_generated(7, eos_token_id=2, pad_token_id=2) == {7}
    assert never_generated(7, eos_token_id=[5, 2], pad_token_id=2) == {7}
    assert never_generated(7, eos_token_id=5, pad_token_id=2) == {7, 2}
    assert never_generated(7, eos_token_id=None, pad_token_id=None) == {7}
    model = make_model()
    eos = model.config.text_config.eos_token_id
    favour(model, {eos: 100.0})
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == [eos]  # stopped at once


@pytest.mark.parametrize("route", ["keyword", "generation_config"])
def test_the_callers_suppress_tokens_are_kept_beside_the_image_token(processor, route):
    """Logits favour `<image>`, then two ordinary tokens: the image token and the caller's suppressed token are both
    never emitted, so the third comes out."""
    model = make_model()
    image_id, caller, third = model.config.image_token_id, 50, 60
    favour(model, {image_id: 100.0, caller: 90.0, third: 80.0})
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    if route == "keyword":
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[caller])
    else:
        model.generation_config.suppress_tokens = [caller]
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert model.generation_config.suppress_tokens == [caller]  # the model's own config is left as it was
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == [third] * 3


def test_a_sequence_past_the_position_limit_warns(processor, caplog):
    model = make_model()
    model.config.text_config.max_position_embeddings = 64
    inputs = _inputs(processor, [photo("coffee", (300, 200))])  # 16 image tokens + the Vicuna prompt: > 64
    with caplog.at_level("WARNING"):
        model(**inputs)
    assert "more than the 64 the language model was trained with" in caplog.text


def test_a_siglip_vision_tower_generates_and_round_trips(processor, tmp_path):
    """Any vision tower with interpolated positions: SigLIP has no class token and another layer layout."""
    config = make_model().config.to_dict()
    config["vision_config"] = dict(
        model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, patch_size=14, image_size=336,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaUhdForConditionalGeneration(LlavaUhdConfig(**config)).eval()
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    inputs = _inputs(processor, [photo("coffee", (700, 300))])
    assert inputs["slice_grid"].prod() > 1  # sliced: crops of two shapes
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    model.save_pretrained(tmp_path)
    reloaded = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_decode_step_with_the_cache_equals_full_recompute(processor, name):
    """The KV cache is honoured under both of its names (`cache` from transformers 5.24 on, `past_key_values`)."""
    model = make_model()
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        cache = getattr(prefill, CACHE_NAME)
        token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=mask, **{name: cache}).logits[:, -1]
        full = model(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], token], 1), "attention_mask": mask})
    torch.testing.assert_close(step, full.logits[:, -1], atol=1e-5, rtol=1e-5)
    no_cache = model(input_ids=token, attention_mask=torch.ones_like(token)).logits[:, -1]
    assert not torch.allclose(no_cache, full.logits[:, -1], atol=1e-3)  # the context matters: the cache was used


def test_assisted_generation_equals_greedy(processor):
    """transformers' assisted decoding runs the assistant's prefill without images: their tokens embed as text."""
    model, assistant = make_model(seed=0), make_model(seed=1)
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    greedy = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("hidden_size, heads", [(5120, 40), (4096, 32), (256, 2), (128, 1), (64, 1)])
def test_spatial_resampler_heads_default_to_one_per_128_llm_channels(hidden_size, heads):
    """REFERENCE.md, release: the spatial resampler has D // 128 heads, D the LLM width (40 for Vicuna-13B's 5120),
    whatever the vision tower; a narrower LLM gets one."""
    text = {"model_type": "llama", "hidden_size": hidden_size, "num_attention_heads": 1}
    vision = {"hidden_size": 256, "num_attention_heads": 1}
    assert LlavaUhdConfig(text_config=text).resampler_num_heads == heads
    assert LlavaUhdConfig(text_config=text, vision_config=vision).resampler_num_heads == heads
    assert LlavaUhdConfig(text_config=text, resampler_num_heads=1).resampler_num_heads == 1  # an explicit count wins


@pytest.mark.parametrize("vision_size, heads", [(1024, 8), (256, 2), (96, 1)])
def test_perceiver_resampler_heads_default_to_one_per_128_vision_channels(vision_size, heads):
    """REFERENCE.md, paper: the perceiver resampler's heads are the vision width // 128 (CLIP ViT-L's 1024: 8 heads),
    not the LLM's (Vicuna-13B: 40); a narrower tower gets one. An explicit count, as every saved config has, wins."""
    text = {"model_type": "llama", "hidden_size": 5120, "num_attention_heads": 1}
    vision = {"hidden_size": vision_size, "num_attention_heads": 1}
    config = LlavaUhdConfig(text_config=text, vision_config=vision, projector_type="resampler")
    assert config.resampler_num_heads == heads
    if vision_size == 1024:  # the default vision tower is CLIP ViT-L/14-336
        assert LlavaUhdConfig(text_config=text, projector_type="resampler").resampler_num_heads == 8
    saved = LlavaUhdConfig(text_config=text, projector_type="resampler", resampler_num_heads=40).to_dict()
    assert LlavaUhdConfig(**saved).resampler_num_heads == 40


def test_resampler_positions_are_set_at_construction():
    from modeling_llava_uhd.modeling_llava_uhd import LlavaUhdResampler, sincos_position_table

    config = make_model().config
    resampler = LlavaUhdResampler(config)
    expected = sincos_position_table(config.text_config.hidden_size, 4)  # 16 queries: a 4x4 grid
    torch.testing.assert_close(resampler.pos_embed, expected)


def test_image_features_follow_the_configs_output_flags(processor):
    model = make_model()
    model.config.output_hidden_states = True
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"], inputs["slice_grid"])
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    plain = model.get_image_features(
        inputs["pixel_values"], inputs["image_grid_hw"], inputs["slice_grid"], output_hidden_states=False
    )
    assert plain.hidden_states is None


@pytest.mark.skipif(
    CACHE_NAME != "cache", reason="`past_key_values` is the cache's only name before transformers 5.24"
)
def test_past_key_values_is_deprecated_where_transformers_deprecates_it(processor):
    model = make_model()
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    cache = getattr(model(**inputs, use_cache=True), CACHE_NAME)
    with pytest.warns(FutureWarning, match="use `cache`"):
        model(input_ids=inputs["input_ids"][:, -1:], past_key_values=cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_position_warning_is_given_once_per_generate_call(processor, caplog, use_cache):
    """A generation that passes `max_position_embeddings` warns once per `generate` call, not once per new token."""
    model = make_model()
    inputs = _inputs(processor, [photo("coffee", (300, 200))])
    model.config.text_config.max_position_embeddings = inputs["input_ids"].shape[1] + 2  # passed at the 3rd token
    for call in (1, 2):
        with caplog.at_level("WARNING"):
            model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache)
        warnings = [record for record in caplog.records if "the language model was trained with" in record.message]
        assert len(warnings) == call
    with caplog.at_level("WARNING"):
        model(**inputs)  # within the limit: no warning
        model(input_ids=torch.cat([inputs["input_ids"]] * 2, 1))  # past it: each forward call warns
        model(input_ids=torch.cat([inputs["input_ids"]] * 2, 1))
    assert sum("the language model was trained with" in record.message for record in caplog.records) == 4
