"""LlavaUhdProcessor: spatial schema ids, Vicuna v1 chat template, assistant masks, batching, errors, save/load."""

from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from tiny import gradient, make_processor, make_tokenizer, spatial_schema
from transformers import AutoProcessor

from modeling_llava_uhd import LlavaUhdImageProcessor, LlavaUhdProcessor

PROCESSOR = make_processor(num_queries=2, max_image_size=0)
TOKENIZER = PROCESSOR.tokenizer
I, C, N = PROCESSOR.image_token_id, PROCESSOR.slice_separator_id, PROCESSOR.row_separator_id
# Images whose slice grid (rows, cols) is known (max_image_size=0): 1008x336 is exactly 3 crops of 336x336, etc.
IMAGES = {
    (0, 0): gradient(300, 200),
    (1, 3): gradient(1008, 336),
    (3, 1): gradient(336, 1008),
    (2, 3): gradient(1008, 672),
}
SCHEMAS = {  # num_queries = 2: ',' after each slice but a row's last, '\n' after every row's last slice, overview last
    (0, 0): [I, I],
    (1, 3): [I, I, C, I, I, C, I, I, N, I, I],
    (3, 1): [I, I, N, I, I, N, I, I, N, I, I],
    (2, 3): [I, I, C, I, I, C, I, I, N, I, I, C, I, I, C, I, I, N, I, I],
}
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def ids_of(text: str) -> list[int]:
    return TOKENIZER(text)["input_ids"]


def expand(ids: list[int], *schemas: list[int]) -> list[int]:
    """`ids` with its `<image>` ids replaced, in order, by `schemas`."""
    schemas, out = list(schemas), []
    for token in ids:
        out += schemas.pop(0) if token == I else [token]
    assert not schemas
    return out


# ---------------------------------------------------------------------------------------------------- schema


def test_default_separators_are_the_tokenizers_comma_and_newline():
    assert TOKENIZER.convert_ids_to_tokens([C, N]) == [",", "Ċ"]  # byte-level BPE spells "\n" as "Ċ"


@pytest.mark.parametrize("grid", SCHEMAS)
def test_schema_ids_are_exact(grid: tuple[int, int]):
    assert PROCESSOR.schema_ids(*grid) == SCHEMAS[grid] == spatial_schema(PROCESSOR, *grid)  # the tests' helper too
    text = "Look,<image>\n, at it"  # separator characters right next to the placeholder
    out = PROCESSOR(images=IMAGES[grid], text=text)
    assert out["slice_grid"].tolist() == [list(grid)]
    # Expansion happens on ids: the text around the placeholder is tokenized exactly as the tokenizer does alone.
    assert out["input_ids"] == [expand(ids_of(text), SCHEMAS[grid])]
    assert out["attention_mask"] == [[1] * len(out["input_ids"][0])]


def test_separators_are_inserted_as_ids_never_retokenized():
    slice_id, row_id = TOKENIZER.convert_tokens_to_ids(["Ġcat", "<pad>"])  # ids that no text here produces
    processor = LlavaUhdProcessor(
        PROCESSOR.image_processor, TOKENIZER, num_queries=1, slice_separator_id=slice_id, row_separator_id=row_id
    )
    schema = [I, slice_id, I, slice_id, I, row_id] * 2 + [I]
    assert processor.schema_ids(2, 3) == schema
    out = processor(images=IMAGES[(2, 3)], text="a,<image>\nb")
    assert out["input_ids"] == [expand(ids_of("a,<image>\nb"), schema)]


def test_several_images_per_prompt_in_order():
    images = [IMAGES[(1, 3)], IMAGES[(0, 0)], IMAGES[(3, 1)]]
    text = "<image> and <image>, then <image>"
    out = PROCESSOR(images=images, text=text, return_tensors="pt")
    assert out["input_ids"][0].tolist() == expand(ids_of(text), SCHEMAS[(1, 3)], SCHEMAS[(0, 0)], SCHEMAS[(3, 1)])
    alone = PROCESSOR.image_processor(images)
    assert all(torch.equal(out[key], alone[key]) for key in alone)


# ----------------------------------------------------------------------------------------------- chat template


def vicuna_v1(system: str, turns: list[tuple[str, str]], generation_prompt: bool = False) -> str:
    """LLaVA's `conv_vicuna_v1.get_prompt()`: SeparatorStyle.TWO with sep " " (after USER) and sep2 "</s>"."""
    seps = [" ", "</s>"]
    prompt = system + seps[0]
    for i, (role, message) in enumerate(turns):
        prompt += role + ": " + message + seps[i % 2]
    return prompt + ("ASSISTANT:" if generation_prompt else "")


def user(*items) -> dict:
    content = [{"type": "image"} if item is None else {"type": "text", "text": item} for item in items]
    return {"role": "user", "content": content}


CONVERSATIONS = {  # name: (messages, add_generation_prompt, system, Vicuna turns)
    "image_question": ([user(None, "What is it?")], True, SYSTEM, [("USER", "<image>\nWhat is it?")]),
    "text_only": ([{"role": "user", "content": "Hi there"}], True, SYSTEM, [("USER", "Hi there")]),
    "multi_turn_with_system": (
        [
            {"role": "system", "content": "Be brief."},
            user(None, "What is it?"),
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": [{"type": "text", "text": "It sleeps."}]},
        ],
        False,
        "Be brief.",
        [
            ("USER", "<image>\nWhat is it?"),
            ("ASSISTANT", "A cat."),
            ("USER", "And the dog?"),
            ("ASSISTANT", "It sleeps."),
        ],
    ),
    "two_images_then_generation": (
        [user(None, None, "Compare."), {"role": "assistant", "content": "Same."}, user("Why?")],
        True,
        SYSTEM,
        [("USER", "<image>\n<image>\nCompare."), ("ASSISTANT", "Same."), ("USER", "Why?")],
    ),
    # An image ending its turn is not followed by "\n" (the reference's image-only turn is "<image>").
    "text_before_image": ([user("Look: ", None)], False, SYSTEM, [("USER", "Look: <image>")]),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_is_vicuna_v1(name: str):
    messages, generation_prompt, system, turns = CONVERSATIONS[name]
    rendered = PROCESSOR.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert rendered == "<s>" + vicuna_v1(system, turns, generation_prompt)  # the BOS, which the processor adds once


def test_chat_template_literal_multi_turn():
    messages = CONVERSATIONS["multi_turn_with_system"][0]
    assert PROCESSOR.apply_chat_template(messages) == (
        "<s>Be brief. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And the dog? ASSISTANT: It sleeps.</s>"
    )
    with pytest.raises(TemplateError, match="Roles must be system \\(first\\), user or assistant, got tool"):
        PROCESSOR.apply_chat_template([{"role": "tool", "content": "x"}])


def _runs(mask: list[int], ids: list[int]) -> list[list[int]]:
    """The ids under each maximal run of 1s in `mask`."""
    runs, previous = [], 0
    for flag, token in zip(mask, ids):
        if flag and previous:
            runs[-1].append(token)
        elif flag:
            runs.append([token])
        previous = flag
    return runs


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_assistant_mask_covers_exactly_the_answers(padding_side: str):
    sliced = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": IMAGES[(2, 3)]}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat, a dog."},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "It sleeps.\n"},
    ]
    text_only = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "3"}]
    out = PROCESSOR.apply_chat_template(
        [sliced, text_only],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": padding_side},
    )
    answers = [[" A cat, a dog.</s>", " It sleeps.\n</s>"], [" 3</s>"]]
    rows = zip(out["input_ids"].tolist(), out["assistant_masks"].tolist(), out["attention_mask"].tolist(), answers)
    for ids, mask, attention, expected in rows:
        # Token by token: the masked ids are exactly each answer's own tokens (leading space and `</s>` included) ...
        assert _runs(mask, ids) == [TOKENIZER.encode(a, add_special_tokens=False) for a in expected]
        # ... each right after "ASSISTANT:", and never an image or padding token.
        starts = [i for i, flag in enumerate(mask) if flag and not mask[i - 1]]
        assert all(TOKENIZER.decode(ids[:start]).endswith("ASSISTANT:") for start in starts)
        assert all(not flag or (token != I and attended) for flag, token, attended in zip(mask, ids, attention))
    first = out["input_ids"][0].tolist()
    image_start = first.index(I)
    assert first[image_start : image_start + len(SCHEMAS[(2, 3)])] == SCHEMAS[(2, 3)] and first.count(I) == 7 * 2


# ------------------------------------------------------------------------------------------------------ batches


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_sides(padding_side: str):
    texts = ["<image> What is it?", "Hi", "<image><image>"]
    images = [IMAGES[(1, 3)], IMAGES[(0, 0)], IMAGES[(3, 1)]]
    out = PROCESSOR(images=images, text=texts, padding=True, padding_side=padding_side, return_tensors="pt")
    singles = [
        PROCESSOR(images=[images[0]], text=texts[0])["input_ids"][0],
        PROCESSOR(text=texts[1])["input_ids"][0],
        PROCESSOR(images=images[1:], text=texts[2])["input_ids"][0],
    ]
    width = max(map(len, singles))
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
    for row, mask, single in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), singles):
        pad = [TOKENIZER.pad_token_id] * (width - len(single))
        ones, zeros = [1] * len(single), [0] * len(pad)
        expected = (single + pad, ones + zeros) if padding_side == "right" else (pad + single, zeros + ones)
        assert (row, mask) == expected
    assert out["slice_grid"].tolist() == [[1, 3], [0, 0], [3, 1]]

    multiple = PROCESSOR(images=images, text=texts, padding="longest", pad_to_multiple_of=16, return_tensors="pt")
    assert multiple["input_ids"].shape[1] == -(-width // 16) * 16
    fixed = PROCESSOR(images=images, text=texts, padding="max_length", max_length=width + 3, return_tensors="pt")
    assert fixed["input_ids"].shape[1] == width + 3


def test_nested_and_flat_image_lists_agree():
    a, b, c = IMAGES[(1, 3)], IMAGES[(0, 0)], IMAGES[(2, 3)]
    texts = ["<image> hi", "text only", "<image> and <image>"]
    flat = PROCESSOR(images=[a, b, c], text=texts, padding=True, return_tensors="pt")
    nested = PROCESSOR(images=[[a], [], [b, c]], text=texts, padding=True, return_tensors="pt")
    assert flat.keys() == nested.keys()
    assert all(torch.equal(flat[key], nested[key]) for key in flat)
    assert I not in flat["input_ids"][1].tolist()
    assert flat["slice_grid"].tolist() == [[1, 3], [0, 0], [2, 3]]

    text_only = PROCESSOR(text=["Hi", "Count the objects."], padding=True)
    assert set(text_only.keys()) == {"input_ids", "attention_mask"}


# ------------------------------------------------------------------------------------------------------- errors


ONE = IMAGES[(0, 0)]


@pytest.mark.parametrize(
    "images, texts, message",
    [
        ([ONE], ["<image> a", "<image> b"], r"has 2 <image> placeholder\(s\) but 1 image\(s\) .*per sample: \[1, 1\]"),
        ([ONE] * 3, ["<image> a", "<image> b"], r"^The text has 2 <image> placeholder\(s\) but 3 image\(s\)"),
        ([ONE], ["no placeholder"], r"^The text has 0 <image> placeholder\(s\) but 1 image\(s\)"),
        (None, ["<image>"], r"^The text has 1 <image> placeholder\(s\) but 0 image\(s\)"),
        ([[ONE], [ONE, ONE]], ["<image> a", "<image> b"], r"^Sample 1: the text has 1 <image> .* but 2 image\(s\)"),
    ],
)
def test_placeholder_count_mismatch(images, texts: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        PROCESSOR(images=images, text=texts)


def test_truncation():
    texts = ["Count the objects. <image> What number is written on the sign?", "Describe the image."]
    images = [IMAGES[(1, 3)]]
    full = PROCESSOR(images=images, text=texts)["input_ids"]
    end = len(full[0]) - 5  # cuts the question after the image only
    out = PROCESSOR(images=images, text=texts, truncation=True, max_length=end)
    assert out["input_ids"] == [full[0][:end], full[1]]  # the short sample is untouched
    with pytest.raises(ValueError, match=r"^Sample 0: truncating its \d+ tokens to max_length=12 would cut through"):
        PROCESSOR(images=images, text=texts, truncation=True, max_length=12)
    with pytest.raises(ValueError, match=r"^Sample 1: truncating"):
        PROCESSOR(images=images, text=texts[::-1], truncation=True, max_length=12)
    # At the exact boundary: the schema's last token (the overview's second image token) kept, or refused.
    schema_end = full[0].index(I) + len(SCHEMAS[(1, 3)])
    assert full[0][schema_end - 1] == I and full[0][schema_end] != I
    out = PROCESSOR(images=images, text=texts, truncation=True, max_length=schema_end)
    assert out["input_ids"][0] == full[0][:schema_end]
    with pytest.raises(ValueError, match=rf"^Sample 0: truncating .* to max_length={schema_end - 1} would cut"):
        PROCESSOR(images=images, text=texts, truncation=True, max_length=schema_end - 1)

    left = make_processor(num_queries=2, max_image_size=0)
    left.tokenizer.truncation_side = "left"
    start = full[0].index(I)
    out = left(images=images, text=texts, truncation=True, max_length=len(full[0]) - start)
    assert out["input_ids"][0] == full[0][start:]  # the text before the image is dropped, the image kept
    with pytest.raises(ValueError, match=r"^Sample 0: truncating"):
        left(images=images, text=texts, truncation=True, max_length=len(full[0]) - start - 1)


def test_truncation_without_max_length_is_to_the_tokenizers_model_max_length():
    """As the tokenizer: `truncation=True` (and `padding="max_length"`) without `max_length` means its
    `model_max_length`, and cutting through an image is refused as with an explicit `max_length`."""
    processor = make_processor(num_queries=2, max_image_size=0)
    text = "Describe the image in detail. Count the objects. What number is written on the sign?"
    full = processor(text=text)["input_ids"][0]
    assert full == processor.tokenizer(text)["input_ids"]
    processor.tokenizer.model_max_length = len(full) - 4
    truncated = processor(text=text, truncation=True)["input_ids"][0]
    assert truncated == full[:-4] == processor.tokenizer(text, truncation=True)["input_ids"]
    assert processor(text=[text], truncation=True, max_length=len(full))["input_ids"][0] == full  # given: it wins
    padded = processor(text="Hi", padding="max_length")["attention_mask"][0]
    assert len(padded) == len(full) - 4 and padded.count(1) == len(ids_of("Hi"))
    with pytest.raises(ValueError, match=rf"^Sample 0: truncating its \d+ tokens to max_length={len(full) - 4} would"):
        processor(images=IMAGES[(1, 3)], text=text + " <image>", truncation=True)
    processor.tokenizer.model_max_length = int(1e30)  # the tokenizer's "no limit": nothing is cut
    assert processor(text=text, truncation=True)["input_ids"][0] == full


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_length": -5, "truncation": True}, "`max_length` must be a positive integer, got -5."),
        ({"max_length": 0, "truncation": True}, "`max_length` must be a positive integer, got 0."),
        ({"max_length": 0, "padding": "max_length"}, "`max_length` must be a positive integer, got 0."),
        ({"max_length": 12.5, "truncation": True}, "`max_length` must be a positive integer, got 12.5."),
        ({"pad_to_multiple_of": -8, "padding": True}, "`pad_to_multiple_of` must be a positive integer, got -8."),
        ({"pad_to_multiple_of": 0, "padding": True}, "`pad_to_multiple_of` must be a positive integer, got 0."),
        ({"text_kwargs": {"max_length": -1}}, "`max_length` must be a positive integer, got -1."),
    ],
)
def test_bad_numbers_are_refused_by_name(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=f"^{message}$".replace(".", r"\.")):
        PROCESSOR(text=["a short text", "a longer text than that"], **kwargs)


def test_a_bos_written_in_the_text_has_the_same_offsets_with_or_without_special_tokens():
    for text in ("<s>hi", "<s><s>hi", "<s>hi <image> there"):
        images = [IMAGES[(0, 0)]] if "<image>" in text else None
        outputs = [
            PROCESSOR(images=images, text=text, add_special_tokens=special, return_offsets_mapping=True)
            for special in (True, False)
        ]
        assert outputs[0]["input_ids"] == outputs[1]["input_ids"], text
        assert outputs[0]["offset_mapping"] == outputs[1]["offset_mapping"], text
        assert outputs[0]["offset_mapping"][0][0] == (0, 3), text  # the BOS is the text's "<s>"
    assert PROCESSOR(text="<s><s>hi")["input_ids"][0] == TOKENIZER("<s><s>hi", add_special_tokens=False)["input_ids"]


def test_padding_errors():
    processor = make_processor(num_queries=2)
    processor.tokenizer.pad_token = None
    assert processor(text=["same", "same"], padding=True)["input_ids"][0] == ids_of("same")  # nothing to pad
    with pytest.raises(ValueError, match="The tokenizer has no pad token"):
        processor(text=["short", "a longer text"], padding=True)
    with pytest.raises(ValueError, match="`padding='max_length'` needs `max_length`"):
        PROCESSOR(text="a", padding="max_length")
    with pytest.raises(ValueError, match="`padding` must be True, False"):
        PROCESSOR(text="a", padding="sideways")
    with pytest.raises(ValueError, match="`padding_side` must be 'left' or 'right', got 'middle'"):
        PROCESSOR(text=["a", "bb"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="`text` is required"):
        PROCESSOR(images=IMAGES[(0, 0)])
    with pytest.raises(TypeError, match="`text` must be a string or a list of strings"):
        PROCESSOR(text=[["nested"]])
    with pytest.raises(ValueError, match=r"^`text` is an empty list: pass at least one prompt\.$"):
        PROCESSOR(text=[], return_tensors="pt")  # the tokenizer itself fails on an empty batch (IndexError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slice_separator_id": -1}, r"`slice_separator_id` -1 is not an id of this 400-token tokenizer"),
        ({"row_separator_id": 400}, r"`row_separator_id` 400 is not an id of this 400-token tokenizer"),
        ({"image_token": "<img>"}, r"The tokenizer has no '<img>' token"),
        ({"tokenizer": None}, r"needs both an `image_processor` and a `tokenizer`"),
    ],
)
def test_bad_processor_settings(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        LlavaUhdProcessor(**{"image_processor": LlavaUhdImageProcessor(), "tokenizer": make_tokenizer(), **kwargs})


# --------------------------------------------------------------------------------------------------- save / load


def test_save_and_load_keep_schema_and_template(tmp_path: Path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    processor = LlavaUhdProcessor(
        LlavaUhdImageProcessor(max_slice_nums=4, max_image_size=0),
        make_tokenizer(),
        chat_template=template,
        num_queries=3,
        slice_separator_id=100,
        row_separator_id=101,
    )
    processor.save_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi"}]
    inputs = {"images": [IMAGES[(2, 3)]], "text": "Look: <image>", "return_tensors": "pt"}
    expected = processor(**inputs)
    assert expected["slice_grid"].tolist() == [[2, 2]]  # max_slice_nums=4: not the 2x3 grid of the default
    for reloaded in (LlavaUhdProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(reloaded).__name__ == "LlavaUhdProcessor"
        assert (reloaded.num_queries, reloaded.slice_separator_id, reloaded.row_separator_id) == (3, 100, 101)
        assert reloaded.image_token_id == I and reloaded.chat_template == template
        assert reloaded.apply_chat_template(messages) == "[user] Hi\n"
        assert reloaded.image_processor.max_slice_nums == 4 and reloaded.image_processor.max_image_size == 0
        again = reloaded(**inputs)
        assert all(torch.equal(expected[key], again[key]) for key in expected)
