"""The real-width tier (`pytest -m slow`): the user's own path at the release's shapes (tests/realwidth.py, fixtures in
conftest.py). The converter streams and maps every weight; the converted folder runs in transformers from its Hub
bundle alone. The same folder in vLLM: tests/test_vllm.py."""

import json
import math

import pytest
import torch
from realwidth import NEW_TOKENS, OUTPUT_SHARD_GIB, TOP_K, largest_tensor_bytes
from safetensors import safe_open
from test_conversion import original_key

pytestmark = pytest.mark.slow


def test_converter_streams_at_real_width(realwidth_conversion):
    """Peak anonymous memory: the imports, one output shard, the largest tensor and a small fixed overhead, not the
    2.7 GB model (4.6 GiB before the embeddings grew without float64 copies of themselves)."""
    run = realwidth_conversion
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    largest = largest_tensor_bytes(run.output)
    assert largest == 32064 * 5120 * 2  # the grown embeddings, bf16
    assert run.peak < run.bound(OUTPUT_SHARD_GIB, largest), (run.peak, run.imports)
    config = json.loads((run.output / "config.json").read_text())
    assert config["architectures"] == ["LlavaUhdForConditionalGeneration"]
    assert run.result.stderr.strip() == ""  # no warnings, no progress bars (not a terminal)


def test_converted_weights_are_the_originals(realwidth_conversion, realwidth_checkpoint):
    """Every converted tensor is its original in bf16 (CLIP's from float32; the embeddings' first 32000 rows), read
    one at a time."""
    output, llava, clip = realwidth_conversion.output, realwidth_checkpoint / "llava", realwidth_checkpoint / "clip"
    llava_map = json.loads((llava / "model.safetensors.index.json").read_text())["weight_map"]
    weight_map = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    for name, file in sorted(weight_map.items()):
        with safe_open(output / file, "pt") as converted:
            tensor = converted.get_tensor(name)
        if name.startswith("model.vision_tower."):
            path, key = clip / "model.safetensors", name.replace("model.vision_tower.", "vision_model.")
        else:
            key = original_key(name)
            path = llava / llava_map[key]
        with safe_open(path, "pt") as original:
            expected = original.get_tensor(key).to(torch.bfloat16)
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor[: len(expected)], expected), name
    assert len(weight_map) == 391 + 35  # CLIP ViT-L/14-336's vision model; 2 LLM layers, resampler, embeddings


def test_transformers_runs_the_converted_folder_from_its_hub_bundle(realwidth_transformers):
    """A 1088x672 photo: 7 crops, 1008 image tokens; greedy tokens are the best of their step's top-k."""
    result = json.loads(realwidth_transformers.read_text())
    assert result["crops"] == 7 and result["image_tokens"] == 7 * 144 == 1008
    assert len(result["tokens"]) == NEW_TOKENS == len(result["logprobs"])
    for token, step in zip(result["tokens"], result["logprobs"]):
        ids, logprobs = zip(*step)
        assert len(ids) == TOP_K and ids[0] == token and list(logprobs) == sorted(logprobs, reverse=True)
        assert -math.log(32064) + 1 < logprobs[0] < 0  # sane logits: above uniform, short of certainty
