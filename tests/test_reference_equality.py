"""Converted tiny original checkpoints reproduce the reference implementation's outputs (fixtures/original/ with a
byte-level BPE tokenizer, fixtures/original_vicuna/ with Vicuna's sentencepiece tokenizer)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion.convert_llava_uhd import convert

FIXTURE = Path(__file__).parent / "fixtures" / "original"
EXPECTED = load_file(FIXTURE / "expected.safetensors")
FACTS = json.loads((FIXTURE / "expected.json").read_text())
QUESTION = "What is on the table?"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple:
    output = tmp_path_factory.mktemp("converted")
    separators = FACTS["separator_ids"]
    convert(str(FIXTURE / "llava"), str(FIXTURE / "clip"), output, dtype="float32",
            slice_separator_id=separators["comma"], row_separator_id=separators["newline"])
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.fromarray(data.coffee()), text=prompt, return_tensors="pt")
    return model, processor, prompt, inputs


def test_prompt_and_input_ids_match_reference(converted):
    _, processor, prompt, inputs = converted
    assert prompt == processor.tokenizer.bos_token + FACTS["prompt"]  # the template writes the BOS the reference adds
    reference = EXPECTED["input_ids"][0].tolist()
    position = FACTS["image_token_position"]
    assert reference[position] == -200
    # The schema the reference built (`ind_tokens`, its separators patched to this tokenizer's ',' and '\n'): each
    # slice's 144 features then its separator, the overview last.
    assert FACTS["ind_tokens"] == [[14, 14, 201, 14, 14, 201]]
    image = processor.image_token_id
    schema = [i for separator in FACTS["ind_tokens"][0] for i in [image] * 144 + [separator]] + [image] * 144
    assert inputs["input_ids"][0].tolist() == reference[:position] + schema + reference[position + 1 :]
    assert inputs["input_ids"].shape[1] == FACTS["sequence_length"]
    assert inputs["slice_grid"].tolist() == [FACTS["grid_cols_rows"][::-1]]
    assert inputs["image_grid_hw"].tolist() == FACTS["feature_grid_hw"]


def test_image_features_match_reference(converted):
    model, _, _, inputs = converted
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"], inputs["slice_grid"]).pooler_output
    torch.testing.assert_close(torch.cat(features), EXPECTED["image_features"].flatten(0, 1), atol=1e-5, rtol=0)


def test_logits_and_greedy_generation_match_reference(converted):
    model, _, _, inputs = converted
    with torch.no_grad():
        logits = model(**inputs).logits
    vocab = EXPECTED["logits"].shape[-1]
    torch.testing.assert_close(logits[..., :vocab], EXPECTED["logits"], atol=1e-4, rtol=0)
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    # The reference (transformers 4.37, generating from embeddings) returns BOS + the new tokens.
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == EXPECTED["generated_ids"][0, 1:].tolist()


# ------------------------------------------------------------------------------------------------------------------
# The same end to end with Vicuna's real sentencepiece tokenizer (fixtures/original_vicuna/): a checkpoint laid out as
# the release (weights + tokenizer.model + tokenizer_config.json + special_tokens_map.json, no tokenizer.json).

VICUNA = Path(__file__).parent / "fixtures" / "original_vicuna"
VICUNA_EXPECTED = load_file(VICUNA / "expected.safetensors")
VICUNA_FACTS = json.loads((VICUNA / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def converted_vicuna(tmp_path_factory) -> tuple:
    original = tmp_path_factory.mktemp("original") / "llava"
    shutil.copytree(VICUNA / "llava", original)
    for item in (VICUNA.parent / "vicuna_tokenizer").iterdir():
        shutil.copy(item, original / item.name)
    output = tmp_path_factory.mktemp("converted-vicuna")
    # The separators are the converter's defaults, Vicuna's ',' (29892) and '\n' (13).
    convert(str(original), str(FIXTURE / "clip"), output, dtype="float32")
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VICUNA_FACTS["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.fromarray(data.coffee()), text=prompt, return_tensors="pt")
    return output, model, processor, prompt, inputs


def test_vicuna_checkpoint_ids_match_reference(converted_vicuna):
    output, _, processor, prompt, inputs = converted_vicuna
    assert not (output / "tokenizer.model").exists() and (output / "tokenizer.json").exists()
    assert prompt == "<s>" + VICUNA_FACTS["prompt"]
    reference, position = VICUNA_FACTS["input_ids"], VICUNA_FACTS["image_token_position"]
    assert reference[position] == -200 and reference[position + 1 : position + 3] == [29871, 13]  # "▁" "\n" after it
    # The schema the reference builds (`ind_tokens`): each slice's 144 features then its separator, the overview last.
    image = processor.image_token_id
    schema = [i for separator in VICUNA_FACTS["ind_tokens"][0] for i in [image] * 144 + [separator]] + [image] * 144
    assert inputs["input_ids"][0].tolist() == reference[:position] + schema + reference[position + 1 :]
    assert inputs["input_ids"].shape[1] == VICUNA_FACTS["sequence_length"]


def test_vicuna_checkpoint_logits_and_greedy_generation_match_reference(converted_vicuna):
    _, model, _, _, inputs = converted_vicuna
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = VICUNA_EXPECTED["logit_rows"]
    torch.testing.assert_close(logits[:, rows, :32000], VICUNA_EXPECTED["logits"], atol=1e-4, rtol=0)
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    # The reference (transformers 4.37, generating from embeddings) returns BOS + the new tokens.
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == VICUNA_FACTS["generated_ids"][1:]
