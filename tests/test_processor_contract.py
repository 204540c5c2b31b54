"""LlavaUhdProcessor follows transformers' processor contract: keyword routes, token counts, offsets, batching."""

import logging
from itertools import groupby

import pytest
import torch
from tiny import gradient, make_processor
from transformers import pipeline

from modeling_llava_uhd import default_model_path
from processing.detail_task import make_sample

PROCESSOR = make_processor(num_queries=4)
I = PROCESSOR.image_token_id
TEXT = "<s>USER: <image>\nWhat is it? ASSISTANT:"
IMAGE = gradient(700, 300)


def run(**kwargs):
    return PROCESSOR(images=IMAGE, text=TEXT, **kwargs)


def test_every_keyword_route_changes_the_output():
    plain = run()
    # Text keywords: flat or in `text_kwargs`.
    length = len(plain["input_ids"][0])
    padding = {"padding": "max_length", "max_length": length + 5}
    for kwargs in (padding, {"text_kwargs": padding}):
        padded = run(**kwargs)
        assert len(padded["input_ids"][0]) == length + 5 and padded["attention_mask"][0].count(0) == 5, kwargs
    assert "attention_mask" not in run(return_attention_mask=False)
    assert run(add_special_tokens=False)["input_ids"] == plain["input_ids"]  # the text's own <s> is the BOS
    no_bos = PROCESSOR(images=IMAGE, text="USER: <image>", add_special_tokens=False)["input_ids"][0]
    assert no_bos[0] != PROCESSOR.tokenizer.bos_token_id
    # Image keywords: flat or in `images_kwargs`.
    for kwargs in ({"max_slice_nums": 1}, {"images_kwargs": {"max_slice_nums": 1}}):
        assert run(**kwargs)["slice_grid"].tolist() == [[0, 0]], kwargs
    assert plain["slice_grid"].tolist() != [[0, 0]]
    for kwargs in ({"do_rescale": False}, {"do_normalize": False}, {"rescale_factor": 1 / 128}, {"image_mean": 0.0}):
        assert not torch.equal(run(**kwargs)["pixel_values"], plain["pixel_values"]), kwargs
        assert not torch.equal(run(images_kwargs=kwargs)["pixel_values"], plain["pixel_values"]), kwargs


def test_keywords_given_twice_or_that_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="max_slice_nums was passed two times"):
        run(max_slice_nums=1, images_kwargs={"max_slice_nums": 2})
    with pytest.raises(ValueError, match="does not take \\['size'\\]"):
        run(size={"height": 224, "width": 224})
    with pytest.raises(ValueError, match="does not support \\['return_overflowing_tokens'\\]"):
        run(return_overflowing_tokens=True)


def test_an_unknown_keyword_is_warned_about(caplog):
    """As transformers' processors do: a warning names it, and it changes nothing."""
    with caplog.at_level(logging.WARNING):
        out = run(max_slices=1)
    assert "max_slices" in caplog.text and out["slice_grid"].tolist() != [[0, 0]]


def test_the_tokenizers_own_settings_are_the_defaults():
    processor = make_processor(num_queries=4)
    texts = ["USER: <image>\nHi ASSISTANT:", "USER: <image>\nA much longer question about it? ASSISTANT:"]
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side  # what a pipeline or TRL sets
        mask = processor(images=[IMAGE, IMAGE], text=texts, padding=True)["attention_mask"][0]
        assert (mask[0] == 0) == (side == "left") and (mask[-1] == 0) == (side == "right"), side
    processor.tokenizer.padding_side = "left"
    explicit = processor(images=[IMAGE, IMAGE], text=texts, padding=True, padding_side="right")  # as TRL asks
    assert explicit["attention_mask"][0][-1] == 0


@pytest.mark.parametrize("max_slice_nums", [None, 1, 4])
def test_num_multimodal_tokens_counts_what_the_processor_inserts(max_slice_nums):
    sizes = [(300, 200), (1088, 672), (200, 1600), (4000, 3000), (50, 50)]
    kwargs = {} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}
    counted = PROCESSOR._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes], **kwargs)
    for index, size in enumerate(sizes):
        out = PROCESSOR(images=gradient(*size), text="<s><image>", **kwargs)  # the BOS, then the image's tokens
        assert counted.num_image_tokens[index] == len(out["input_ids"][0]) - 1, size
        assert counted.num_image_patches[index] == len(out["image_grid_hw"]), size


def test_replacement_offsets_and_token_types_locate_the_images():
    text = "<s>USER: <image>\nand <image> too ASSISTANT:"
    out = PROCESSOR(
        images=[IMAGE, gradient(200, 200)], text=text, return_text_replacement_offsets=True,
        return_mm_token_type_ids=True, return_offsets_mapping=True,
    )  # fmt: skip
    spans = [entry["span"] for entry in out["text_replacement_offsets"][0]]
    assert [text[start:end] for start, end in spans] == ["<image>", "<image>"] and spans[0][0] == text.index("<image>")
    assert all(entry["new_span"] == entry["span"] for entry in out["text_replacement_offsets"][0])
    ids = out["input_ids"][0]
    # Token types mark each image's whole schema (image tokens and separators), as many as the count says.
    types = out["mm_token_type_ids"][0]
    counts = PROCESSOR._get_num_multimodal_tokens(image_sizes=[(300, 700), (200, 200)]).num_image_tokens
    assert sum(types) == sum(counts) and all(types[i] for i, token in enumerate(ids) if token == I)
    assert [len(list(run)) for marked, run in groupby(types) if marked] == counts
    # Offsets are in the text as written: every text token's characters are where the offsets say.
    for token, (start, end) in zip(ids, out["offset_mapping"][0]):
        if end > start:
            assert PROCESSOR.tokenizer.decode([token]).strip() in text[start:end].strip() or text[start:end].isspace()


def test_pipeline_batches_give_the_answers_of_single_prompts():
    """Prompts of different lengths (fine-detail task images of mixed sizes and aspect ratios, different questions)
    batched by transformers' pipeline are padded on the left: the answers do not depend on the batch size."""
    pipe = pipeline("image-text-to-text", model=str(default_model_path()))
    samples = [make_sample("test", index) for index in range(6)]
    assert len({sample.image.size for sample in samples}) > 1 and len({sample.question for sample in samples}) > 1
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": s.image}, {"type": "text", "text": s.question}]}]
        for s in samples
    ]
    answers = {}
    for batch_size in (1, 2, 3):
        out = pipe(text=chats, batch_size=batch_size, max_new_tokens=3, return_full_text=False)
        answers[batch_size] = [item[0]["generated_text"].strip() for item in out]
    assert answers[1] == answers[2] == answers[3]
    assert answers[1] == [sample.answer for sample in samples]  # the model reads these six correctly
