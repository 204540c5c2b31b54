"""Bad training data never stops or corrupts a load or a batch by accident: malformed rows, image paths that leave
`image_folder`, rows with nothing left to learn after truncation (issue 13)."""

import io
import json
import logging
import os
import re
from collections import Counter

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from jinja2.exceptions import TemplateSyntaxError
from llava_data import draw, write_llava_dataset
from tiny import make_model, make_processor

from processing import BadRowError, convert_llava_row, load_llava_dataset, make_collator
from training.sft import LlavaUhdArguments, load_training_dataset

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]
TEXT_TURNS = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
# (reason, JSONL line) of each kind of bad row; `bad_lines` adds an absolute path to a real file outside the folder.
BAD_LINES = [
    ("not an object", "null"),
    ("not an object", "[1, 2]"),
    ("not an object", '"a caption"'),
    ("malformed image field", json.dumps({"id": "image-5", "image": 5, "conversations": TURNS})),
    ("malformed image field", json.dumps({"id": "image-ints", "image": [1, 2], "conversations": TURNS})),
    ("malformed conversations", json.dumps({"id": "conv-str", "conversations": "Hi"})),
    ("malformed conversations", json.dumps({"id": "conv-none"})),
    ("malformed turn", json.dumps({"id": "turn-str", "conversations": ["Hi", TEXT_TURNS[1]]})),
    ("malformed turn", json.dumps({"id": "no-from", "conversations": [{"value": "Hi"}, TEXT_TURNS[1]]})),
    ("malformed turn", json.dumps({"id": "no-value", "conversations": [{"from": "human"}, TEXT_TURNS[1]]})),
    ("malformed turn", json.dumps({"id": "list-from", "conversations": [{"from": ["human"], "value": "Hi"}]})),
    ("invalid JSON", '{"id": "cut", "conversations": ['),
    (
        "placeholders do not match images",
        json.dumps({"id": "two-images", "image": ["000.png", "001.png"], "conversations": TURNS}),
    ),
    (
        "image path outside image_folder",
        json.dumps({"id": "dotdot", "image": "../outside.png", "conversations": TURNS}),
    ),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good rows (`data.json`) over `images/`, and a real image next to that folder, outside it."""
    root = tmp_path_factory.mktemp("safety")
    write_llava_dataset(root, num_images=2)
    draw("red", "square", (40, 30)).save(root / "outside.png")
    return root


def good_rows(folder) -> list[dict]:
    return json.loads((folder / "data.json").read_text())


def bad_lines(folder) -> list[tuple[str, str]]:
    absolute = json.dumps({"id": "absolute", "image": str(folder / "outside.png"), "conversations": TURNS})
    return [*BAD_LINES, ("image path outside image_folder", absolute)]


def write_jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_drops_every_kind_of_bad_row_with_one_warning_counting_them_by_reason(folder, tmp_path, caplog):
    good, bad = good_rows(folder), bad_lines(folder)
    lines = [json.dumps(row) for row in good]
    lines[1:1] = [line for _, line in bad]  # after the first good row: line numbers 2 to len(bad) + 1
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="processing.llava_format"):
        dataset = load_llava_dataset(data, folder / "images")
    assert dataset["id"] == [row["id"] for row in good]
    (record,) = [record for record in caplog.records if record.name == "processing.llava_format"]
    assert f"Skipped {len(bad)} of {len(lines)} rows of {data}" in record.message
    for reason, count in Counter(reason for reason, _ in bad).items():
        assert f"'{reason}': {count}" in record.message
    assert f"first: Row at {data}, line 2: not an object: a row must be a JSON object, got None" in record.message

    # The same rows as a JSON list (where a line cannot be cut): the same counts, rows named by their index.
    listed = good[:1] + [json.loads(line) for reason, line in bad if reason != "invalid JSON"]
    (tmp_path / "data.json").write_text(json.dumps(listed))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processing.llava_format"):
        assert load_llava_dataset(tmp_path / "data.json", folder / "images")["id"] == [good[0]["id"]]
    assert f"Skipped {len(listed) - 1} of {len(listed)} rows" in caplog.text
    assert f"first: Row at {tmp_path / 'data.json'}, index 1: not an object" in caplog.text


@pytest.mark.parametrize("index", range(len(BAD_LINES) + 1))
def test_error_names_the_file_the_row_and_the_reason(folder, tmp_path, index):
    reason, line = bad_lines(folder)[index]
    good = good_rows(folder)[0]
    data = write_jsonl(tmp_path / "data.jsonl", [json.dumps(good), "", line])
    where = re.escape(f"{data}, line 3")
    with pytest.raises(BadRowError, match=f"^Row (at {where}|.* \\({where}\\)): {reason}"):
        load_llava_dataset(data, folder / "images", on_bad_row="error")
    if reason != "invalid JSON":
        (tmp_path / "data.json").write_text(f"[{json.dumps(good)}, {line}]")
        where = re.escape(f"{tmp_path / 'data.json'}, index 1")
        with pytest.raises(BadRowError, match=f"^Row (at {where}|.* \\({where}\\)): {reason}") as error:
            load_llava_dataset(tmp_path / "data.json", folder / "images", on_bad_row="error")
        assert error.value.reason == reason


def test_files_that_are_not_rows_fail_naming_the_file(folder, tmp_path):
    cases = {
        "empty.json": ("", "holds no rows"),
        "empty.jsonl": ("\n\n", "holds no rows"),
        "empty-list.json": ("[]", "holds no rows"),
        "object.json": ('{"id": 1}', "must hold a JSON list of LLaVA-format rows, got dict"),
        "lines.json": ('{"id": 1}\n{"id": 2}\n', "is not valid JSON .*`.jsonl`"),
        "text.json": ("id,image\n1,a.png\n", "is not valid JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        for on_bad_row in ("skip", "error"):
            with pytest.raises(ValueError, match=f"{tmp_path / name}.*{message}"):
                load_llava_dataset(tmp_path / name, folder / "images", on_bad_row=on_bad_row)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["null", "5"])
    with pytest.raises(ValueError, match=f"No usable rows in {all_bad}: all 2 were bad \\({{'not an object': 2}}\\)"):
        load_llava_dataset(all_bad, folder / "images")
    good = write_jsonl(tmp_path / "good.jsonl", [json.dumps(good_rows(folder)[0])])
    with pytest.raises(ValueError, match="`on_bad_row` must be 'skip' or 'error', got 'drop'"):
        load_llava_dataset(good, folder / "images", on_bad_row="drop")
    with pytest.raises(ValueError, match=f"`image_folder` '{tmp_path / 'nowhere'}' is not a folder"):
        load_llava_dataset(good, tmp_path / "nowhere")


def test_json_nested_too_deeply_is_invalid_json_naming_the_file_and_line(folder, tmp_path, caplog):
    """3 bad inputs (issue 21, defect 14: a bare `RecursionError` aborted the load): a JSONL line of 100,000 nested
    lists, one of nested objects (each an invalid-JSON row: skipped and counted, or a `BadRowError` naming the file and
    line), and a JSON list file nested as deep (a `ValueError` naming the file)."""
    depth = 100_000
    deep = ["[" * depth + "]" * depth, '{"a": ' * depth + "1" + "}" * depth]
    good = json.dumps(good_rows(folder)[0])
    data = write_jsonl(tmp_path / "data.jsonl", [good, *deep])
    with caplog.at_level(logging.WARNING, logger="processing.llava_format"):
        assert len(load_llava_dataset(data, folder / "images")) == 1
    assert f"Skipped 2 of 3 rows of {data} ({{'invalid JSON': 2}})" in caplog.text
    for line in (2, 3):
        lines = [good, deep[line - 2]] if line == 2 else [good, good, deep[1]]
        write_jsonl(data, lines)
        with pytest.raises(BadRowError, match=f"^Row at {re.escape(str(data))}, line {line}: invalid JSON: nested"):
            load_llava_dataset(data, folder / "images", on_bad_row="error")
    (tmp_path / "deep.json").write_text(f"[{good}, {deep[0]}]")
    for on_bad_row in ("skip", "error"):
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'deep.json'))} is not valid JSON \\(nested"):
            load_llava_dataset(tmp_path / "deep.json", folder / "images", on_bad_row=on_bad_row)


def test_more_images_than_placeholders_is_a_bad_row_at_load(folder, tmp_path, caplog):
    row = {"id": "two-images", "image": ["000.png", "001.png"], "conversations": TURNS}  # both files exist
    unplaced = {"id": "no-placeholder", "image": "000.png", "conversations": TEXT_TURNS}
    data = write_jsonl(tmp_path / "data.jsonl", [json.dumps(item) for item in (good_rows(folder)[0], row, unplaced)])
    with caplog.at_level(logging.WARNING, logger="processing.llava_format"):
        assert len(load_llava_dataset(data, folder / "images")) == 1
    assert "'placeholders do not match images': 2" in caplog.text
    with pytest.raises(
        BadRowError, match=r"Row two-images \(.*line 2\): placeholders do not match images: 1 <image> for 2 image\(s\)"
    ):
        load_llava_dataset(data, folder / "images", on_bad_row="error")
    alone = write_jsonl(tmp_path / "unplaced.jsonl", [json.dumps(unplaced)])
    with pytest.raises(BadRowError, match=r"Row no-placeholder .*: placeholders do not match images: 0 <image> for 1"):
        load_llava_dataset(alone, folder / "images", on_bad_row="error")


def test_image_paths_stay_inside_image_folder_unless_allowed(folder, tmp_path):
    images, outside = folder / "images", folder / "outside.png"
    escaping = {"../outside.png": outside, str(outside): outside}
    for image, path in escaping.items():
        row = {"id": "r", "image": image, "conversations": TURNS}
        with pytest.raises(BadRowError, match=f"image path outside image_folder: {image!r} is not inside") as error:
            convert_llava_row(row, images)
        assert error.value.reason == "image path outside image_folder"
        converted = convert_llava_row(row, images, allow_paths_outside_image_folder=True)
        assert os.path.samefile(converted["images"][0], path)
    # Without `image_folder` paths are taken as given; a `..` that comes back inside is inside; symlinks are followed.
    assert convert_llava_row({"image": str(outside), "conversations": TURNS})["images"] == [str(outside)]
    own = tmp_path / "images"
    (own / "sub").mkdir(parents=True)
    draw("blue", "circle", (40, 30)).save(own / "a.png")
    (own / "link.png").symlink_to(outside)
    for image in ("sub/../a.png", "link.png"):
        assert convert_llava_row({"image": image, "conversations": TURNS}, own)["images"] == [str(own / image)]

    # The training recipe: refused (here with `on_bad_row="error"`) unless its field allows it.
    rows = [{"id": name, "image": image, "conversations": TURNS} for name, image in zip("ab", escaping)]
    data = write_jsonl(tmp_path / "data.jsonl", [json.dumps(row) for row in rows])
    args = LlavaUhdArguments(data_path=str(data), image_folder=str(images), on_bad_row="error")
    with pytest.raises(BadRowError, match="Row a .*line 1.*image path outside image_folder: '../outside.png'"):
        load_training_dataset(args)
    args.allow_paths_outside_image_folder = True
    assert load_training_dataset(args)["id"] == ["a", "b"]


def test_a_sibling_folder_sharing_the_name_prefix_is_outside_and_an_absolute_path_inside_is_inside(
    tmp_path, monkeypatch
):
    """2 bad inputs: `../images2/secret.png` and its absolute path, with `image_folder="images"` (a prefix check of the
    path would let them through), refused; an absolute path inside the folder is accepted."""
    monkeypatch.chdir(tmp_path)
    for folder in ("images", "images2"):
        (tmp_path / folder).mkdir()
    draw("red", "square", (40, 30)).save(tmp_path / "images" / "a.png")
    draw("blue", "circle", (40, 30)).save(tmp_path / "images2" / "secret.png")
    for image in ("../images2/secret.png", str(tmp_path / "images2" / "secret.png")):
        with pytest.raises(BadRowError, match=f"image path outside image_folder: {re.escape(repr(image))} is not"):
            convert_llava_row({"id": "r", "image": image, "conversations": TURNS}, "images")
    inside = str(tmp_path / "images" / "a.png")
    assert convert_llava_row({"image": inside, "conversations": TURNS}, "images")["images"] == [inside]


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def rows():
    """A short text-only row and one whose question is so long that `max_length` cuts its whole answer."""
    short = convert_llava_row({"id": "short", "conversations": TEXT_TURNS})
    long = [{"from": "human", "value": "Count " + "1 2 3 " * 40}, TEXT_TURNS[1]]
    return short, convert_llava_row({"id": "long-question", "conversations": long})


def test_a_row_whose_answer_is_truncated_away_is_a_bad_row(processor, rows, caplog):
    short, long = rows
    max_length = make_collator(processor, on_bad_row="error")([short])["input_ids"].shape[1]
    strict = make_collator(processor, max_length=max_length, on_bad_row="error")
    expected = strict([short])
    with pytest.raises(BadRowError, match=f"Row long-question: no supervised tokens.*max_length={max_length}"):
        strict([short, long])

    skipping = make_collator(processor, max_length=max_length, dataset=Dataset.from_list([short]), on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="processing.collator"):
        batch = skipping([long, short, long])
    assert skipping.num_replaced == 2 and "Row long-question: no supervised tokens" in caplog.text
    assert "(2 replaced so far in this worker)" in caplog.text
    for index in range(3):  # every row is the short one now, labels included
        assert batch["input_ids"][index].tolist() == expected["input_ids"][0].tolist()
        assert batch["labels"][index].tolist() == expected["labels"][0].tolist()
    assert (batch["labels"] != -100).any(dim=1).all()
    with torch.no_grad():
        assert make_model()(**skipping([long, long])).loss.isfinite()


def test_failures_that_no_row_causes_are_raised_not_replaced(processor, rows):
    short, long = rows
    # A chat template that does not compile fails every row: a bug, raised at once instead of blamed on the rows.
    broken = make_collator(processor, dataset=Dataset.from_list([short]), on_bad_row="skip")
    broken.collator.chat_template = "{% if %}"
    with pytest.raises(TemplateSyntaxError):
        broken([short])
    assert broken.num_replaced == 0
    # A bug in the processor (any error but `UnusableSampleError`) is raised at once, not read as unusable rows.
    buggy = make_collator(processor, dataset=Dataset.from_list([short]), on_bad_row="skip")

    def bug(*args, **kwargs):
        raise ValueError("a code regression")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(processor), "_pad", bug)
        with pytest.raises(ValueError, match="a code regression"):
            buggy([short])
    assert buggy.num_replaced == 0
    # A dataset without a usable row: the draws stop, naming the last failure.
    hopeless = make_collator(processor, max_length=20, dataset=Dataset.from_list([long]), on_bad_row="skip")
    hopeless.max_replacements = 3
    with pytest.raises(RuntimeError, match="3 rows drawn in a row were unusable.*Row long-question: no supervised"):
        hopeless([long])


def test_a_null_image_in_a_messages_dataset_is_a_bad_row(processor, caplog):
    """2 bad inputs: in a real `List(Image(decode=False))` column, a null and `{"bytes": None, "path": None}` (issue
    21, defect 2: an `AttributeError` stopped training): a `BadRowError` naming the row, or replaced under `skip`."""
    png = io.BytesIO()
    draw("red", "square", (80, 60)).save(png, format="PNG")
    features = Features(
        {
            "id": Value("string"),
            "images": List(Image(decode=False)),
            "messages": List({"role": Value("string"), "content": Value("string")}),
        }
    )
    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red square."}]
    images = [[{"bytes": png.getvalue(), "path": None}], [None], [{"bytes": None, "path": None}]]
    dataset = Dataset.from_dict(
        {"id": ["good", "null", "empty"], "images": images, "messages": [messages] * 3}, features=features
    )
    good, null, empty = dataset
    assert null["images"] == [None] and empty["images"] == [{"bytes": None, "path": None}]

    strict = make_collator(processor, on_bad_row="error")
    for row, got in ((null, "None"), (empty, "{'bytes': None, 'path': None}")):
        message = f"^Row {row['id']}: unreadable image: no image: .* got {re.escape(got)}$"
        with pytest.raises(BadRowError, match=message):
            strict([good, row])
    expected = strict([good])
    skipping = make_collator(processor, dataset=dataset.select([0]), on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="processing.collator"):
        batch = skipping([null, good, empty])
    assert skipping.num_replaced == 2 and "Row null: unreadable image" in caplog.text
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist() * 3
    assert torch.equal(batch["pixel_values"], torch.cat([expected["pixel_values"]] * 3))
