"""conversion/: original LLaVA-layout checkpoints -> Hub-native folders."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_model, make_tokenizer, photo
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPConfig, CLIPModel

from conversion.convert_llava_uhd import ConversionError, build_parser, convert, grow_embedding
from conversion.publish import main as publish_main
from modeling_llava_uhd import LlavaUhdConfig, LlavaUhdForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def original_key(name: str) -> str:
    """Our key -> the original LLaVA layout's key (the inverse of the converter's mapping)."""
    if name.startswith("model.resampler."):
        return name.replace("model.resampler.", "model.mm_projector.")
    return name.replace("model.language_model.", "model.")


def original_config(config: LlavaUhdConfig) -> dict:
    """The original LLaVA config.json of a model of `config`: the LLM's fields and the LLaVA (`mm_*`) ones."""
    text = config.text_config.to_dict()
    qwen = text["model_type"] == "qwen2"
    spatial = config.projector_type == "spatial_resampler"
    return {
        **{k: v for k, v in text.items() if k not in ("model_type", "architectures")},
        "architectures": ["LlavaQwen2ForCausalLM" if qwen else "LlavaLlamaForCausalLM"],
        "model_type": "llava_qwen2" if qwen else "llava_llama",
        "mm_projector_type": "adapt_spatial_resampler" if spatial else "resampler",
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_tower": "clip",
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048,
    }


def write_original(folder: Path, projector_type: str = "spatial_resampler", shards: int = 2, fmt: str = "safetensors",
                   llm: str = "llama") -> LlavaUhdForConditionalGeneration:
    """An original-layout checkpoint (+ a CLIP folder beside it) holding the weights of a tiny random model."""
    model = make_model(projector_type, seed=3, text_model_type=llm)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original_config(model.config)))
    make_tokenizer().save_pretrained(folder)
    state = {original_key(k): v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry these buffers
    names = sorted(state)
    for i in range(shards):
        part = {k: state[k].clone() for k in names[i::shards]}
        if fmt == "safetensors":
            save_file(part, folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
        else:  # "bin", or "legacy-bin": torch's pre-1.6 format, which cannot be memory-mapped
            torch.save(part, folder / f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin",
                       _use_new_zipfile_serialization=fmt == "bin")

    vision = model.config.vision_config.to_dict()
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=99)))
    prefix = "model.vision_tower."
    clip.vision_model.load_state_dict(
        {k.removeprefix(prefix): v for k, v in model.state_dict().items() if k.startswith(prefix)}
    )
    clip.save_pretrained(folder.parent / "clip")
    return model


def separator_ids() -> dict[str, int]:
    """The tiny tokenizer's ',' and '\n' ids (the converter defaults to Vicuna's, outside a tiny vocabulary)."""
    tokenizer = make_tokenizer()
    comma, newline = (tokenizer.encode("a" + c, add_special_tokens=False)[-1] for c in ",\n")
    return {"slice_separator_id": comma, "row_separator_id": newline}


def tiny_separators() -> list[str]:
    """`separator_ids` as command-line arguments."""
    ids = separator_ids()
    return ["--slice-separator-id", str(ids["slice_separator_id"]), "--row-separator-id", str(ids["row_separator_id"])]


def run_convert(tmp: Path, original: Path, output: str = "converted", **options) -> Path:
    convert(str(original), str(original.parent / "clip"), tmp / output, dtype="float32", **separator_ids(), **options)
    return tmp / output


def logits(folder: Path, image_name: str = "coffee") -> torch.Tensor:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=photo(image_name), text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("projector_type,fmt,llm", [("spatial_resampler", "safetensors", "llama"),
                                                     ("resampler", "bin", "llama"),
                                                     ("resampler", "legacy-bin", "llama"),
                                                     ("spatial_resampler", "safetensors", "qwen2")])
def test_convert_maps_every_weight(tmp_path, projector_type, fmt, llm):
    source = write_original(tmp_path / "original", projector_type, fmt=fmt, llm=llm)
    out = run_convert(tmp_path, tmp_path / "original")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaUhdForConditionalGeneration"]  # serving engines pick the model by it
    assert config["projector_type"] == projector_type
    assert config["text_config"]["model_type"] == llm
    assert config["num_queries"] == source.config.num_queries
    converted = AutoModelForImageTextToText.from_pretrained(out)
    mine, theirs = converted.state_dict(), source.state_dict()
    vocab = source.config.text_config.vocab_size
    for key, value in theirs.items():
        got = mine[key][:vocab] if key.endswith(("embed_tokens.weight", "lm_head.weight")) else mine[key]
        assert torch.equal(got, value), key
    processor = json.loads((out / "processor_config.json").read_text())
    assert ["--slice-separator-id", str(processor["slice_separator_id"]), "--row-separator-id",
            str(processor["row_separator_id"])] == tiny_separators()
    # Without overrides the converter records the ids the reference inserts for every tokenizer: Vicuna's , and \n.
    defaults = build_parser().parse_args(["--original", "o", "--vision-tower", "v", "--output", "x"])
    assert (defaults.slice_separator_id, defaults.row_separator_id) == (29892, 13)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card and "@inproceedings" in card
    # Local sources are named by their folder only: the card is published, the converting machine's paths are not.
    assert str(tmp_path) not in card and "base_model" not in card
    assert "the local folder `original`" in card and "the local folder `clip`" in card


def test_conversion_is_deterministic_and_round_trips(tmp_path):
    write_original(tmp_path / "original")
    first = run_convert(tmp_path, tmp_path / "original", "a", max_shard_size=0.0001)
    second = run_convert(tmp_path, tmp_path / "original", "b", max_shard_size=0.0001)
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert len(shards) > 1 and (first / "model.safetensors.index.json").is_file()
    for name in shards:
        assert hashlib.sha256((first / name).read_bytes()).digest() == hashlib.sha256((second / name).read_bytes()).digest()

    model = AutoModelForImageTextToText.from_pretrained(first)
    model.save_pretrained(tmp_path / "resaved")
    AutoProcessor.from_pretrained(first).save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(first), logits(tmp_path / "resaved"), atol=0, rtol=0)


def test_grown_embedding_rows_have_the_existing_rows_mean_and_scaled_covariance():
    """The rows the conversion appends are draws from a normal with the existing rows' mean and 1e-5 x their
    covariance, the same draws every time; the existing rows are kept, in the output dtype."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.2, 0.5]], dtype=torch.float64)
    weight = (torch.randn(3000, 3, generator=generator, dtype=torch.float64) @ mixing + torch.tensor([1.0, -2.0, 0.5]))
    weight = weight.to(torch.bfloat16)
    grown = grow_embedding(weight, 3000 + 20000, seed=1, dtype=torch.float32)
    assert grown.dtype == torch.float32 and torch.equal(grown[:3000], weight.float())
    assert torch.equal(grown, grow_embedding(weight, 23000, seed=1, dtype=torch.float32))
    old, new = weight.double(), grown[3000:].double()
    torch.testing.assert_close(new.mean(0), old.mean(0), atol=1e-4, rtol=0)  # ~5 standard errors
    expected = 1e-5 * torch.cov(old.T, correction=0)
    torch.testing.assert_close(torch.cov(new.T), expected, atol=0.05 * expected.abs().max(), rtol=0)


def test_tokenizer_gets_image_and_pad_tokens(tmp_path):
    write_original(tmp_path / "original")
    # An original tokenizer has neither <image> nor a pad token.
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "original" / name).unlink(missing_ok=True)
    plain.save_pretrained(tmp_path / "original")
    out = run_convert(tmp_path, tmp_path / "original")
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"  # batched generation pads on the left
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["pad_token_id"] == tokenizer.pad_token_id
    assert len({tokenizer.pad_token_id, config["image_token_id"], tokenizer.eos_token_id}) == 3
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["text_config"]["vocab_size"] >= len(processor.tokenizer)


def test_bad_inputs_give_clear_errors(tmp_path):
    write_original(tmp_path / "original")
    original = tmp_path / "original"
    from safetensors import safe_open

    def has_query(path):
        with safe_open(path, "pt") as f:
            return "model.mm_projector.query" in f.keys()

    shard = next(p for p in sorted(original.glob("*.safetensors")) if not has_query(p))

    # An unexpected key is listed.
    save_file({"model.mystery.weight": torch.zeros(2)}, original / "extra.safetensors")
    with pytest.raises(ConversionError, match=r"unmapped keys: extra.safetensors: model.mystery.weight"):
        run_convert(tmp_path, original, "x1")
    (original / "extra.safetensors").unlink()

    # A missing shard leaves keys missing, and they are listed.
    moved = shard.rename(tmp_path / shard.name)
    with pytest.raises(ConversionError, match=r"missing keys: .*model\."):
        run_convert(tmp_path, original, "x2")

    # With an index, the missing shard itself is named.
    index = {"weight_map": {"a": shard.name, "b": next(original.glob("*.safetensors")).name}}
    (original / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"lacks {shard.name}, named in model.safetensors.index.json"):
        run_convert(tmp_path, original, "x2")
    (original / "model.safetensors.index.json").unlink()

    # A truncated shard is named.
    moved.rename(shard)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a valid safetensors file"):
        run_convert(tmp_path, original, "x3")
    # Failed conversions leave nothing behind: no output folder, no staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "original"]


def test_unsupported_formats_and_missing_config(tmp_path):
    folder = tmp_path / "original"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.ckpt").write_bytes(b"x")
    (tmp_path / "clip").mkdir()
    with pytest.raises(ConversionError, match=r"No \*.safetensors or \*.bin weights.*model.ckpt"):
        run_convert(tmp_path, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="has no config.json"):
        run_convert(tmp_path, folder)


def test_stage1_projector_with_separate_llm(tmp_path):
    source = write_original(tmp_path / "original", shards=1)
    shard = next((tmp_path / "original").glob("*.safetensors"))
    from safetensors.torch import load_file

    state = load_file(shard)
    llm = tmp_path / "vicuna"
    llm.mkdir()
    save_file({k: v for k, v in state.items() if not k.startswith("model.mm_projector.")}, llm / "model.safetensors")
    torch.save({k: v for k, v in state.items() if k.startswith("model.mm_projector.")},
               tmp_path / "original" / "mm_projector.bin")
    shard.unlink()
    with pytest.raises(ConversionError, match="stage-1 folder"):
        run_convert(tmp_path, tmp_path / "original", "x")
    out = run_convert(tmp_path, tmp_path / "original", "converted", text_model=str(llm))
    converted = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(converted.model.resampler.query, source.model.resampler.query)


def test_publish_dry_run_lists_files(tmp_path, capsys):
    write_original(tmp_path / "original")
    out = run_convert(tmp_path, tmp_path / "original")
    assert publish_main([str(out), "org/llava-uhd-tiny", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "Would upload" in printed and "model.safetensors" in printed and "(private if created)" in printed
    assert publish_main([str(out), "org/llava-uhd-tiny", "--dry-run", "--public"]) == 0
    assert "(public if created)" in capsys.readouterr().out
    assert publish_main([str(tmp_path / "original"), "org/x", "--dry-run"]) == 1
    assert "not a finished conversion" in capsys.readouterr().err


@pytest.mark.slow  # its own Python process (the real-width tier runs the converter this way too)
def test_cli_entry_point_prints_summary(tmp_path):
    """`--dtype bfloat16`: the shards hold bfloat16 tensors, the original's values rounded (`from_pretrained` would
    cast float32 shards on load and hide an uncast file)."""
    original = write_original(tmp_path / "original").state_dict()
    result = subprocess.run(
        [sys.executable, "-m", "conversion.convert_llava_uhd", "--original", str(tmp_path / "original"),
         "--vision-tower", str(tmp_path / "clip"), "--output", str(tmp_path / "out"), "--dtype", "bfloat16",
         *tiny_separators()],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters" in result.stdout and "bfloat16" in result.stdout
    assert "You are using a model of type" not in result.stderr  # transformers reading `llava_llama` as a config
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    stored = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        stored |= load_file(shard)
    assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}
    unchanged = [name for name, tensor in stored.items() if original[name].shape == tensor.shape]  # not grown rows
    assert len(unchanged) >= len(stored) - 2
    for name in unchanged:
        assert torch.equal(stored[name], original[name].to(torch.bfloat16)), name


def test_sentencepiece_tokenizer_problems_are_named(tmp_path, monkeypatch):
    """A `tokenizer.model`-only original: without sentencepiece the error says what to install; a damaged file, a
    config that is not a sentencepiece BPE model, are named."""
    from conversion.tokenizer import prepare_tokenizer

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    source = ROOT / "tests" / "fixtures" / "vicuna_tokenizer"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    assert prepare_tokenizer(folder).convert_tokens_to_ids("<image>") == 32000

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "sentencepiece", None)
        with pytest.raises(ConversionError, match=r"needs `sentencepiece` and `protobuf`: pip install -e \"\.\[convert\]\""):
            prepare_tokenizer(folder)

    (folder / "tokenizer.model").write_bytes(b"\x0a\x05hello-not-a-model")
    with pytest.raises(ConversionError, match="tokenizer.model is not a sentencepiece model"):
        prepare_tokenizer(folder)


@pytest.mark.parametrize("model_type,architectures", [("llava_mistral", ["LlavaMistralForCausalLM"]), ("mpt", [])])
def test_unknown_llm_families_are_refused_naming_the_supported_ones(tmp_path, model_type, architectures):
    original = tmp_path / "original"
    write_original(original)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "model_type": model_type, "architectures": architectures}))
    with pytest.raises(ConversionError, match=f"LLM \\({model_type}.*\\) is not supported; supported: llama, qwen2"):
        run_convert(tmp_path, original)
    assert not (tmp_path / "converted").exists()
