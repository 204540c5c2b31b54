"""Token-for-token equality with the authors' tokenization, with Vicuna's real sentencepiece `tokenizer.model`.

`fixtures/tokenization_reference.json` holds the ids (and labels) that the authors' `tokenizer_image_token`,
`preprocess_v1` and `preprocess_plain` built with transformers 4.37's slow tokenizer (see `fixtures/NOTES.md`); the
converter's tokenizer, the processor, the chat template and both training collators must reproduce every case.
"""

import json
import logging
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from conversion.common import ConversionError
from conversion.tokenizer import load_original_tokenizer, prepare_tokenizer
from modeling_llava_uhd import LlavaUhdImageProcessor, LlavaUhdProcessor
from modeling_llava_uhd import vllm_tokenization
from modeling_llava_uhd.vllm_tokenization import retokenize
from processing import convert_llava_row, make_collator, training_chat_template

FIXTURES = Path(__file__).parent / "fixtures"
VICUNA = FIXTURES / "vicuna_tokenizer"
REFERENCE = json.loads((FIXTURES / "tokenization_reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]
IMAGE_INDEX, IGNORE = REFERENCE["image_token_index"], REFERENCE["ignore_index"]
QUERIES = 4  # image tokens per image: images here are small and `max_slice_nums=1`, so one crop each
SPECIALS = ("<s>", "</s>", "<unk>", "<image>")


def vicuna_variant(folder: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A copy of the fixture tokenizer folder at `folder`, its tokenizer_config.json without the `drop` keys and
    updated with `changes`."""
    shutil.copytree(VICUNA, folder)
    config = {k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text()).items() if k not in drop}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
    return folder


def vicuna_folder(tmp_path: Path, legacy: bool) -> Path:
    """The fixture tokenizer folder with its `legacy` setting (the release's is False)."""
    return vicuna_variant(tmp_path / f"vicuna-legacy-{legacy}", legacy=legacy)


def build_processor(legacy_setting: bool, folder: Path) -> LlavaUhdProcessor:
    """The processor of a converted checkpoint whose original tokenizer (written in `folder`) has this `legacy`."""
    return LlavaUhdProcessor(
        image_processor=LlavaUhdImageProcessor(max_slice_nums=1),
        tokenizer=prepare_tokenizer(vicuna_folder(folder, legacy_setting)),
        num_queries=QUERIES,
        slice_separator_id=29892,
        row_separator_id=13,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def processor(request, tmp_path_factory) -> LlavaUhdProcessor:
    return build_processor(request.param, tmp_path_factory.mktemp("tokenizer"))


def legacy(processor: LlavaUhdProcessor) -> bool:
    return processor.tokenizer.init_kwargs["legacy"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / name)
    return folder


def cases(processor: LlavaUhdProcessor, *kinds: str) -> list[dict]:
    selected = [case for case in CASES if case["kind"] in kinds and case["legacy"] == legacy(processor)]
    assert selected
    return selected


def expected_ids(case: dict, image_token_id: int) -> list[int]:
    """The reference's ids with each -200 placeholder replaced by the image's `QUERIES` image tokens."""
    image = [image_token_id] * QUERIES
    return [i for token in case["input_ids"] for i in (image if token == IMAGE_INDEX else [token])]


def expected_labels(case: dict) -> list[int]:
    pairs = zip(case["input_ids"], case["labels"])
    return [i for token, label in pairs for i in ([IGNORE] * QUERIES if token == IMAGE_INDEX else [label])]


def test_fixture_covers_the_cases_the_issue_names():
    kinds = {case["kind"] for case in CASES}
    assert kinds == {"inference", "prompt", "train_v1", "train_plain"} and len(CASES) >= 40
    texts = json.dumps(CASES, ensure_ascii=False)
    for needle in ("  ", "\\n", "这", "🐱", "1,234", "\\t"):
        assert needle in texts, needle
    # The slow tokenizer gives the text after an image its dummy prefix: "\nWhat" -> ▁ <0x0A> What.
    first = next(case for case in CASES if case["kind"] == "inference")
    position = first["input_ids"].index(IMAGE_INDEX)
    assert first["input_ids"][position + 1 : position + 4] == [29871, 13, 5618]


def test_converted_tokenizer_keeps_the_original_settings(tmp_path, processor):
    tokenizer = processor.tokenizer
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["legacy"] is legacy(processor)
    assert saved["model_max_length"] == 2048 and saved["pad_token"] == "<unk>"
    assert saved["padding_side"] == "left"  # the release's is "right": batched generation needs left padding
    assert not (tmp_path / "tokenizer.model").exists()  # a fast tokenizer: the folder loads without sentencepiece
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("a  b", " A bus.", "x.  ASSISTANT:", "USER: hi</s>USER: yo", "\n\tTab"):
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_leading_space_and_text_after_special_tokens_follow_the_legacy_setting(processor):
    tokenizer = processor.tokenizer
    assert tokenizer(" A bus.")["input_ids"] == [1, 29871, 319, 3593, 29889]  # ▁ ▁A ▁bus .
    # After </s>: no dummy prefix with legacy=False ("USER" 11889), one with legacy=True ("▁US" "ER").
    after = tokenizer("</s>USER", add_special_tokens=False)["input_ids"]
    assert after == ([2, 3148, 1001] if legacy(processor) else [2, 11889])


def test_missing_settings_default_as_in_the_slow_tokenizer(tmp_path):
    """A tokenizer_config.json without `legacy`, `add_bos_token`, `add_eos_token`: legacy, BOS, no EOS (transformers
    4.37's defaults, which the authors ran)."""
    folder = vicuna_variant(tmp_path / "vicuna", drop=("legacy", "add_bos_token", "add_eos_token"))
    tokenizer = load_original_tokenizer(folder)
    assert tokenizer("</s>USER", add_special_tokens=False)["input_ids"] == [2, 3148, 1001]  # "▁US" "ER": legacy
    assert tokenizer("USER")["input_ids"] == [1, 3148, 1001]


@pytest.mark.parametrize("legacy", [False, True])
def test_decoding_drops_the_dummy_prefix(tmp_path, legacy):
    tokenizer = load_original_tokenizer(vicuna_folder(tmp_path, legacy))
    for text in ("Hello", "Hello world", "  two spaces", "a\nb"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCEPIECE.decode(ids[1:]) == text


def added_token(content: str, special: bool = True, **flags) -> dict:
    """An `added_tokens_decoder` entry as transformers writes it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special, **flags}


@pytest.mark.parametrize("form", ["added_tokens_decoder", "added_tokens.json"])
def test_added_tokens_keep_their_ids(tmp_path, form):
    """An original that added `<im_start>` (32000) and `<pad>` (32001) keeps both ids, as transformers' own loader
    does; `<image>` takes the next free id. The older `added_tokens.json` form is read when the config has no
    `added_tokens_decoder`, as transformers reads it."""
    folder = vicuna_variant(tmp_path / "vicuna", pad_token="<pad>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    added = {"32000": added_token("<im_start>"), "32001": added_token("<pad>"),
             "32002": added_token("<im_end>", special=False, normalized=True, rstrip=True)}
    if form == "added_tokens.json":
        del config["added_tokens_decoder"]
        (folder / "added_tokens.json").write_text(json.dumps({t["content"]: int(i) for i, t in added.items()}))
        special_tokens = json.loads((folder / "special_tokens_map.json").read_text())
        (folder / "special_tokens_map.json").write_text(json.dumps({**special_tokens, "pad_token": "<pad>"}))
    else:
        config["added_tokens_decoder"].update(added)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    expected = AutoTokenizer.from_pretrained(folder)  # transformers' own loader
    tokenizer = prepare_tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids(["<im_start>", "<pad>", "<im_end>", "<image>"])
    assert ids == [32000, 32001, 32002, 32003]
    assert tokenizer.pad_token_id == expected.pad_token_id == 32001
    contents = lambda t: {i: (str(a), a.special) for i, a in t.added_tokens_decoder.items() if i < 32003}  # noqa: E731
    assert contents(tokenizer) == contents(expected)
    tokenizer.save_pretrained(tmp_path / "converted")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "converted")  # as the converted folder loads
    for text in ("<im_start>user\nHi!<im_end>\n<im_start>assistant", "a<im_start>b <pad><pad>", "x <im_end> y"):
        assert tokenizer(text)["input_ids"] == expected(text)["input_ids"] == reloaded(text)["input_ids"], text
    assert tokenizer("<im_start>hi")["input_ids"] == [1, 32000, 2918]  # one token, and no dummy prefix after it


def test_added_tokens_that_cannot_keep_their_ids_are_refused(tmp_path):
    """4 bad inputs: an id past a gap, an id inside tokenizer.model naming another piece, a key that is no id, an
    added_tokens.json that is not {token: id}. transformers' loader renumbers the first two silently; the converter
    names them."""
    cases = [
        ({"32000": added_token("<im_start>"), "32005": added_token("<pad>")},
         r"'<pad>' has id 32005, but would get id 32001: added ids must follow tokenizer.model's 32000 pieces"),
        ({"5": added_token("<im_start>")}, r"'<im_start>' has id 5, .* tokenizer.model gives that id to '<0x02>'"),
        ({"first": added_token("<im_start>")}, r"added_tokens_decoder has keys that are not token ids: \['first'\]"),
    ]
    for index, (added, match) in enumerate(cases):
        folder = vicuna_variant(tmp_path / f"case{index}", drop=("added_tokens_decoder",))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
        with pytest.raises(ConversionError, match=match):
            prepare_tokenizer(folder)
    folder = vicuna_variant(tmp_path / "json", drop=("added_tokens_decoder",))
    (folder / "added_tokens.json").write_text(json.dumps(["<im_start>"]))
    with pytest.raises(ConversionError, match=r"added_tokens.json is not a JSON object of token: id"):
        prepare_tokenizer(folder)


def test_padding_follows_the_tokenizer_when_its_config_names_no_side(tmp_path):
    """A tokenizer saved without `padding_side`, then set to left (as transformers' pipelines do): the processor
    pads on the left."""
    tokenizer = load_original_tokenizer(vicuna_variant(tmp_path / "vicuna", drop=("padding_side",)))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert "padding_side" not in tokenizer.init_kwargs
    tokenizer.padding_side = "left"
    processor = LlavaUhdProcessor(image_processor=LlavaUhdImageProcessor(), tokenizer=tokenizer, num_queries=QUERIES,
                                  slice_separator_id=29892, row_separator_id=13)
    batch = processor(text=["Hi", "A longer prompt"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
    assert processor(text=["Hi", "A longer prompt"], padding=True, padding_side="right")["attention_mask"][0][-1] == 0


# Words, runs of spaces, punctuation, digits, newlines, tabs and non-ASCII (CJK, accents, emoji: byte fallback).
PIECES = st.sampled_from(
    [
        "the",
        "cat",
        "ASSISTANT",
        "USER:",
        "Hello",
        "aba",
        "lll",
        "ooo",
        "1,234",
        "3.14",
        "日本語",
        "中文",
        "é",
        "ß",
        "😀",
        "🐱🐶",
        "Ω",
        "\u3000",
        "\u200b",
        "'s",
        "--",
        "...",
    ]
)
SEPARATORS = st.sampled_from(["", " ", "  ", "   ", " " * 20, "\n", "\n\n", " \n ", "\t", ",", ", ", ". "])
TEXTS = st.one_of(
    st.lists(st.tuples(PIECES, SEPARATORS), max_size=12).map(lambda parts: "".join(a + b for a, b in parts)),
    st.text(alphabet=string.ascii_letters + string.digits + " \n\t,.!?'\"-" + "日本😀é", max_size=60),
)
SENTENCEPIECE = sentencepiece.SentencePieceProcessor(model_file=str(VICUNA / "tokenizer.model"))


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, leading=SEPARATORS)
def test_plain_text_tokenizes_as_sentencepiece(processor, text, leading):
    text = leading + text
    if any(special in text for special in SPECIALS):
        return  # transformers (4.37 too) splits special tokens out of the text; sentencepiece does not
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == SENTENCEPIECE.encode(text)


def test_inference_prompts_are_the_authors_ids(processor):
    image = Image.new("RGB", (40, 30))
    for case in cases(processor, "inference", "prompt"):
        count = case["prompt"].count("<image>")
        ids = processor(text=case["prompt"], images=[image] * count or None)["input_ids"][0]
        assert ids == expected_ids(case, processor.image_token_id), case["prompt"]


def test_chat_template_prompts_are_the_authors_ids(processor):
    """The chat template writes the BOS; the processor adds it once, whatever `add_special_tokens` says."""
    image = Image.new("RGB", (40, 30))
    for case in cases(processor, "inference"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == "<s>" + case["prompt"]
        for add_special_tokens in (True, False):
            ids = processor(text=prompt, images=image, add_special_tokens=add_special_tokens)["input_ids"][0]
            assert ids == expected_ids(case, processor.image_token_id), (case["question"], add_special_tokens)
        with_image = [{"role": "user", "content": [{"type": "image", "image": image}, *messages[0]["content"][1:]]}]
        tokenized = processor.apply_chat_template(
            with_image, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert tokenized["input_ids"][0] == expected_ids(case, processor.image_token_id)


def training_cases(processor) -> list[tuple[dict, str]]:
    """Training cases with their chat format: stage 1 (`preprocess_plain`) or stage 2 (`preprocess_v1`)."""
    selected = cases(processor, "train_v1", "train_plain")
    return [(case, "plain" if case["kind"] == "train_plain" else "chat") for case in selected]


def test_project_collator_builds_the_authors_samples(processor, image_folder):
    for case, chat_format in training_cases(processor):
        collator = make_collator(processor, chat_format=chat_format, max_slice_nums=1, on_bad_row="error")
        batch = collator([convert_llava_row(case["row"], image_folder)])
        assert batch["input_ids"][0].tolist() == expected_ids(case, processor.image_token_id), case["row"]
        assert batch["labels"][0].tolist() == expected_labels(case), case["row"]


def test_trl_stock_collator_builds_the_authors_samples(processor, image_folder):
    """TRL's own collator with the processor and its template (what TRL's scripts run): the same samples."""
    for case, chat_format in training_cases(processor):
        collator = DataCollatorForVisionLanguageModeling(
            processor=processor, assistant_only_loss=True, chat_template=training_chat_template(processor, chat_format)
        )
        row = convert_llava_row(case["row"], image_folder)
        batch = collator([{**row, "images": [Image.open(path) for path in row["images"]]}])
        assert batch["input_ids"][0].tolist() == expected_ids(case, processor.image_token_id), case["row"]
        assert batch["labels"][0].tolist() == expected_labels(case), case["row"]


def test_batched_training_samples_equal_the_samples_alone(processor, image_folder):
    rows = [convert_llava_row(case["row"], image_folder) for case, fmt in training_cases(processor) if fmt == "chat"]
    collator = make_collator(processor, max_slice_nums=1, on_bad_row="error")
    batch = collator(rows)
    for index, row in enumerate(rows):
        alone = collator([row])
        length = alone["input_ids"].shape[1]
        assert batch["input_ids"][index, :length].tolist() == alone["input_ids"][0].tolist()
        assert batch["labels"][index, :length].tolist() == alone["labels"][0].tolist()
        assert (batch["labels"][index, length:] == IGNORE).all()


def test_image_positions_are_never_trained_whatever_the_collator(processor, image_folder):
    """TRL's collator without `assistant_only_loss` labels every token, image tokens too: the model ignores those."""
    from tiny import make_model

    row = convert_llava_row(cases(processor, "train_v1")[0]["row"], image_folder)
    collator = DataCollatorForVisionLanguageModeling(processor=processor, chat_template=processor.chat_template)
    batch = collator([{**row, "images": [Image.open(path) for path in row["images"]]}])
    image_positions = batch["input_ids"] == processor.image_token_id
    assert (batch["labels"][image_positions] == processor.image_token_id).all()  # TRL leaves them as targets

    model = make_model(vocab_size=32064, image_token_id=processor.image_token_id, num_queries=QUERIES)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        loss = model(**inputs, labels=batch["labels"]).loss
        masked = batch["labels"].masked_fill(image_positions, IGNORE)
        assert torch.equal(loss, model(**inputs, labels=masked).loss)


REMOTE_SCRIPT = """
import json, sys
sys.modules["modeling_llava_uhd"] = None  # only the bundle's own code may run
from PIL import Image
from transformers import AutoProcessor

image = Image.new("RGB", (40, 30))
out = []
for folder in sys.argv[1:]:  # each holds a saved processor and cases.json
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for case in json.loads(open(folder + "/cases.json").read()):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        out.append(processor(text=prompt, images=image, max_slice_nums=1)["input_ids"][0])
print(json.dumps(out))
"""


def test_hub_bundle_processor_builds_the_authors_ids(tmp_path):
    """The saved folder's remote code, without this package, tokenizes as the reference too (both `legacy`
    settings, in one process)."""
    folders, expected = [], []
    for setting in (False, True):
        processor = build_processor(setting, tmp_path)
        folder = tmp_path / f"bundle-{setting}"
        processor.save_pretrained(folder)
        inference = cases(processor, "inference")
        (folder / "cases.json").write_text(json.dumps(inference))
        folders.append(str(folder))
        expected += [expected_ids(case, processor.image_token_id) for case in inference]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), *folders],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_a_prompt_tokenized_as_one_text_is_retokenized_as_the_reference(processor):
    """Serving engines (vLLM) tokenize the whole prompt before the processor sees it: with the release's
    `legacy=False` the text after `<image>` then lacks its `▁`. `retokenize` gives back the authors' ids."""
    prompts = [case for case in cases(processor, "inference", "prompt") if IMAGE_INDEX in case["input_ids"]]
    differed = 0
    for case in prompts:
        whole = processor.tokenizer(case["prompt"])["input_ids"]
        reference = [processor.image_token_id if token == IMAGE_INDEX else token for token in case["input_ids"]]
        differed += whole != reference
        assert retokenize(processor, whole) == reference, case["prompt"]
    if not legacy(processor):
        assert differed > len(prompts) // 2  # most of them needed it


def test_ids_that_cannot_be_read_back_are_kept_with_one_warning(processor, monkeypatch, caplog):
    """Ids that no text tokenizes to (here "▁h" "ello", where " hello" is "▁hello") are kept as the engine gave them,
    and the process is told so once, however many prompts have such a piece."""
    monkeypatch.setattr(vllm_tokenization, "_warned_unreadable", False)
    odd = [processor.image_token_id, *processor.tokenizer.convert_tokens_to_ids(["▁h", "ello"])]
    assert processor.tokenizer.decode(odd[1:]) == "hello" and processor.tokenizer.encode("hello")[-1] not in odd
    prompt = processor.tokenizer("USER:")["input_ids"] + odd
    with caplog.at_level(logging.WARNING, logger=vllm_tokenization.__name__):
        assert retokenize(processor, prompt) == prompt
        assert retokenize(processor, prompt + odd) == prompt + odd
    warnings = [record for record in caplog.records if record.name == vllm_tokenization.__name__]
    assert len(warnings) == 1 and "could not be read back" in warnings[0].getMessage()


def test_separators_read_from_the_tokenizer_are_the_reference_ids(processor):
    """The processor's default separators, read from the converted Vicuna tokenizer (either `legacy`), are the ids the
    reference inserts: 29892 (",") and 13 ("\\n")."""
    read = LlavaUhdProcessor(LlavaUhdImageProcessor(), processor.tokenizer, num_queries=QUERIES)
    assert (read.slice_separator_id, read.row_separator_id) == (29892, 13)
    assert read.schema_ids(1, 2) == processor.schema_ids(1, 2)
