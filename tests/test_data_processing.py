"""LLaVA-format data to TRL rows (`processing.llava_format`) and training batches (`processing.collator`)."""

import json
import logging

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from llava_data import draw, write_llava_dataset
from PIL import Image as PILImage
from tiny import make_model, make_processor, spatial_schema

from processing import BadRowError, convert_llava_row, load_llava_dataset, load_messages_dataset, make_collator
from processing.collator import training_chat_template

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def dataset(data):
    return load_llava_dataset(*data)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def image_ids(collator, image_path: str) -> list[int]:
    """The schema tokens of an image as the collator's processor (training settings) slices it."""
    processor = collator.collator.processor
    width, height = PILImage.open(image_path).size
    grid = processor.image_processor.get_slice_layout(height, width).grid or (0, 0)
    return spatial_schema(processor, *grid)


def check_batch_row(batch, index: int, pieces: list[tuple[list[int], bool]]) -> None:
    """Row `index` of `batch` is exactly `pieces` (token ids, trained or not) then padding."""
    ids = [token for piece, _ in pieces for token in piece]
    labels = [token if trained else -100 for piece, trained in pieces for token in piece]
    length = len(ids)
    assert batch["input_ids"][index, :length].tolist() == ids
    assert batch["labels"][index, :length].tolist() == labels
    assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
    assert (batch["labels"][index, length:] == -100).all()


def test_convert_llava_row_moves_the_image_first_and_maps_roles(tmp_path):
    draw("red", "square", (64, 64)).save(tmp_path / "a.png")
    row = {
        "id": 7,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "Describe the photo.\n<image>"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    converted = convert_llava_row(row, tmp_path)
    assert converted["id"] == "7" and converted["images"] == [str(tmp_path / "a.png")]
    assert [m["role"] for m in converted["messages"]] == ["user", "assistant", "user", "assistant"]
    assert converted["messages"][0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": "Describe the photo."},
    ]
    assert converted["messages"][2]["content"] == [{"type": "text", "text": "Sure?"}]
    text_only = convert_llava_row({"id": "t", "conversations": row["conversations"][2:]})
    assert text_only["images"] == []

    bad = {
        "malformed turn": {"id": "r", "image": "a.png", "conversations": [{"from": "bot", "value": "hi"}]},
        "placeholders do not match images": {"id": "r", "conversations": row["conversations"]},
        "no assistant answer": {"id": "r", "image": "a.png", "conversations": row["conversations"][:1]},
        "missing image file": {**row, "image": "nowhere.png"},
    }
    for reason, bad_row in bad.items():
        with pytest.raises(BadRowError, match=reason) as error:
            convert_llava_row(bad_row, tmp_path)
        assert error.value.reason == reason


def test_load_llava_dataset_keeps_paths_and_skips_or_fails_on_bad_rows(tmp_path, caplog):
    data, images = write_llava_dataset(tmp_path, num_images=3)
    rows = json.loads(data.read_text())
    rows += [{**rows[0], "id": "missing", "image": "gone.png"}, {"id": "broken", "conversations": []}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    with caplog.at_level(logging.WARNING, logger="processing.llava_format"):
        dataset = load_llava_dataset(jsonl, images)
    assert len(dataset) == len(rows) - 2
    assert "Skipped 2 of 7 rows" in caplog.text and "'missing image file': 1" in caplog.text
    # Lazy: rows hold paths, nothing is decoded.
    assert dataset[0]["images"] == [str(images / "000.png")] and dataset[len(dataset) - 1]["images"] == []
    with pytest.raises(BadRowError, match=f"Row missing \\({jsonl}, line 6\\): missing image file '.*gone.png'"):
        load_llava_dataset(jsonl, images, on_bad_row="error")


def test_chat_labels_are_the_assistant_answers_token_by_token(data, dataset, processor):
    collator = make_collator(processor, chat_format="chat", max_length=4096, dataset=dataset)
    by_id = {row["id"]: row for row in dataset}
    examples = [by_id["img-1"], by_id["two-turns"], by_id["text-only"], by_id["img-2"]]
    batch = collator(examples)
    bos, eos = processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id
    head = ([bos], False), (tokens(processor, SYSTEM + " USER: "), False)

    def answer(text):
        return tokens(processor, " " + text) + [eos], True

    for index, example_id, color_shape in ((0, "img-1", "green circle"), (3, "img-2", "blue square")):
        check_batch_row(
            batch,
            index,
            [
                *head,
                (image_ids(collator, by_id[example_id]["images"][0]), False),
                (tokens(processor, "\nWhat is in the picture? ASSISTANT:"), False),
                answer(f"A {color_shape}."),
            ],
        )
    check_batch_row(
        batch,
        1,
        [
            *head,
            (image_ids(collator, by_id["two-turns"]["images"][0]), False),
            (tokens(processor, "\nWhat color is it? ASSISTANT:"), False),
            answer("Red."),
            (tokens(processor, "USER: Count the objects. ASSISTANT:"), False),
            answer("1"),
        ],
    )
    text_only_prompt = tokens(processor, SYSTEM + " USER: Count 1 2 3 ASSISTANT:")
    check_batch_row(batch, 2, [([bos], False), (text_only_prompt, False), answer("4 5 6")])
    image_tokens = batch["input_ids"] == processor.image_token_id
    assert image_tokens.any() and (batch["labels"][image_tokens] == -100).all()
    # img-2 (300x500) is sliced: all its crops are there.
    assert batch["slice_grid"].tolist()[2] != [0, 0]
    assert int(image_tokens.sum()) == 16 * len(batch["image_grid_hw"])


def test_image_schemas_are_never_labelled_whatever_the_loss_mode(dataset, processor):
    """Without `assistant_only_loss` every text token is a label, but no token of an image's schema is: not its image
    tokens, not its separators (the reference labels all of an image's features -100)."""
    collator = make_collator(processor, assistant_only_loss=False, max_length=4096, dataset=dataset)
    by_id = {row["id"]: row for row in dataset}
    rows = [by_id["img-1"], by_id["text-only"], by_id["img-2"]]  # 700x400 and 300x500: both sliced
    batch = collator(rows)
    for index, row in enumerate(rows):
        ids = batch["input_ids"][index].tolist()
        length = int(batch["attention_mask"][index].sum())
        labels = ids[:length] + [-100] * (len(ids) - length)
        if row["images"]:
            schema = image_ids(collator, row["images"][0])
            start = ids.index(processor.image_token_id)
            assert ids[start : start + len(schema)] == schema
            labels[start : start + len(schema)] = [-100] * len(schema)
        assert batch["labels"][index].tolist() == labels, row["id"]
    separators = {processor.slice_separator_id, processor.row_separator_id}
    assert separators <= {*image_ids(collator, rows[0]["images"][0]), *image_ids(collator, rows[2]["images"][0])}


def test_plain_format_is_image_then_caption_overview_only(dataset, processor):
    collator = make_collator(processor, chat_format="plain", max_slice_nums=1, max_length=2048, dataset=dataset)
    by_id = {row["id"]: row for row in dataset}
    batch = collator([by_id["img-1"], by_id["img-2"]])
    assert batch["slice_grid"].tolist() == [[0, 0], [0, 0]]  # 700x400 too: overview only
    image = [processor.image_token_id] * 16  # the overview's 16 queries, no separator
    bos = processor.tokenizer.bos_token_id
    check_batch_row(batch, 0, [([bos], False), (image, False), (tokens(processor, "A green circle.\n"), True)])
    check_batch_row(batch, 1, [([bos], False), (image, False), (tokens(processor, "A blue square.\n"), True)])
    # The saved processor keeps its inference settings; only the collator's copy changed.
    assert processor.image_processor.max_slice_nums == 7 and processor.image_processor.max_image_size == 1024
    assert training_chat_template(processor, "chat").endswith(processor.chat_template)


def test_training_batches_skip_the_pre_resize_unless_asked(dataset, processor):
    """As the reference's training: no pre-resize by default (0), a long side when given; `None`, the former spelling
    of "no pre-resize", still means it, with a FutureWarning. The processor keeps its own setting (1024)."""
    row = next(row for row in dataset if row["images"])
    with PILImage.open(row["images"][0]) as image:
        image = image.convert("RGB")
    layouts = {}
    for max_image_size in (0, 1024, 500):
        batch = make_collator(processor, max_image_size=max_image_size, max_length=4096, dataset=dataset)([row])
        expected = processor.image_processor(image, max_image_size=max_image_size)
        assert torch.equal(batch["pixel_values"], expected["pixel_values"]), max_image_size
        layouts[max_image_size] = batch["image_grid_hw"].tolist()
    assert layouts[0] != layouts[1024] != layouts[500]
    assert make_collator(processor, dataset=dataset)([row])["image_grid_hw"].tolist() == layouts[0]
    with pytest.warns(FutureWarning, match="max_image_size=None"):
        legacy = make_collator(processor, max_image_size=None, dataset=dataset)
    assert legacy([row])["image_grid_hw"].tolist() == layouts[0]
    assert processor.image_processor.max_image_size == 1024


def test_truncation_keeps_every_image_token_or_refuses_the_row(dataset, processor, caplog):
    by_id = {row["id"]: row for row in dataset}
    full = make_collator(processor, max_length=4096, dataset=dataset)([by_id["two-turns"]])
    length = full["input_ids"].shape[1]
    cut = make_collator(processor, max_length=length - 3, dataset=dataset)([by_id["two-turns"]])
    assert cut["input_ids"].tolist() == full["input_ids"][:, : length - 3].tolist()
    assert cut["labels"].tolist() == full["labels"][:, : length - 3].tolist()
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    with torch.no_grad():
        assert make_model()(**cut).loss.isfinite()

    # max_length ends inside the image tokens: never truncated through them.
    image_start = full["input_ids"][0].tolist().index(processor.image_token_id)
    strict = make_collator(processor, max_length=image_start + 5, dataset=dataset, on_bad_row="error")
    with pytest.raises(BadRowError, match="Row two-turns: cannot be collated.*would cut through image tokens"):
        strict([by_id["two-turns"], by_id["text-only"]])
    # At the text-only row's length, every image row is cut through its image tokens (or its answer): the
    # replacements end on the text-only row, whole.
    text_only = make_collator(processor, dataset=dataset)([by_id["text-only"]])
    max_length = text_only["input_ids"].shape[1]
    assert image_start + 16 > max_length
    skipping = make_collator(processor, max_length=max_length, dataset=dataset, on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="processing.collator"):
        batch = skipping([by_id["two-turns"], by_id["text-only"]])
    assert batch["input_ids"].tolist() == text_only["input_ids"].tolist() * 2 and "pixel_values" not in batch
    assert batch["labels"].tolist() == text_only["labels"].tolist() * 2
    assert skipping.num_replaced >= 1 and f"({skipping.num_replaced} replaced so far" in caplog.text


def test_unreadable_images_are_replaced_or_raise(tmp_path, dataset, processor, caplog):
    good = tmp_path / "good.png"
    draw("red", "circle", (64, 48)).save(good)
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    rows = [{**dataset[0], "id": name, "images": [str(tmp_path / f"{name}.png")]} for name in ("garbage", "truncated")]

    strict = make_collator(processor, dataset=dataset, on_bad_row="error")
    for row in rows:
        with pytest.raises(BadRowError, match=f"Row {row['id']}: unreadable image"):
            strict([dataset[1], row])
    skipping = make_collator(processor, dataset=dataset, on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="processing.collator"):
        batch = skipping([rows[0], dataset[1], rows[1]])
    assert batch["input_ids"].shape[0] == 3 and skipping.num_replaced == 2
    assert "Row garbage: unreadable image" in caplog.text and "(2 replaced so far" in caplog.text
    with pytest.raises(ValueError, match="needs the `dataset`"):
        make_collator(processor, on_bad_row="skip")


def test_messages_datasets_from_the_hub_format_are_decoded_by_the_collator(tmp_path, processor):
    features = Features(
        {
            "images": List(Image()),
            "messages": List({"role": Value("string"), "content": Value("string")}),
        }
    )
    rows = {
        "images": [[draw("red", "square", (80, 60))], []],
        "messages": [
            [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red square."}],
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}],
        ],
    }
    (tmp_path / "hub").mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "hub" / "train.parquet")
    dataset = load_messages_dataset(str(tmp_path / "hub"))
    assert set(dataset[0]["images"][0]) == {"bytes", "path"}  # not decoded when read
    batch = make_collator(processor, dataset=dataset)([dataset[0], dataset[1]])
    assert batch["slice_grid"].tolist() == [[0, 0]]
    assert (batch["input_ids"] == processor.image_token_id).sum() == 16
    with pytest.raises(ValueError, match="no `messages` column"):
        load_messages_dataset(str(tmp_path / "hub"), columns=["images"])
