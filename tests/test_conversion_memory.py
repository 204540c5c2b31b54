"""Streaming conversion: peak memory follows the shard size and the largest tensor, not the model size."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from realwidth import FIXTURES, convert_measured, largest_tensor_bytes, write_shards
from test_conversion import original_config, original_key, write_original
from tiny import make_config

from modeling_llava_uhd import LlavaUhdForConditionalGeneration


def write_big_original(folder: Path, shard_mb: int = 48) -> int:
    """An original checkpoint of ~690 MB (float32, 8 LLM layers of width 1024 and Vicuna's 32000-token vocabulary and
    tokenizer, for which the conversion grows the embeddings to 32064 rows) in shards of ~`shard_mb` MB; returns its
    size in bytes."""
    write_original(folder.parent / "small")  # and its CLIP folder beside it, to reuse
    config = make_config(num_queries=144, resampler_num_heads=8, vocab_size=32000)
    config.text_config.update(
        {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 8, "head_dim": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    )  # fmt: skip
    with torch.device("meta"):
        shapes = LlavaUhdForConditionalGeneration(config).state_dict()
    shapes = {original_key(k): v.shape for k, v in shapes.items() if not k.startswith("model.vision_tower.")}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(original_config(config)))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURES / "vicuna_tokenizer" / name, folder / name)
    write_shards(folder, shapes, torch.float32, torch.Generator().manual_seed(0), shard_mb * 2**20)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


@pytest.mark.slow
def test_peak_memory_stays_near_one_shard_plus_the_largest_tensor(tmp_path):
    """Anonymous memory (RssAnon, sampled) over the converter's own imports stays below one output shard plus the
    largest tensor (the grown embedding) and a small fixed overhead: the embeddings grow without float64 copies or a
    covariance matrix of them."""
    model_bytes = write_big_original(tmp_path / "big")
    shard_gib = 0.05
    run = convert_measured(tmp_path / "big", tmp_path / "clip", tmp_path / "out", "--dtype", "float32",
                           "--max-shard-size", str(shard_gib))  # fmt: skip
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    largest = largest_tensor_bytes(tmp_path / "out")
    assert largest == 32064 * 1024 * 4
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(f"model {mib(model_bytes)}, output shards {mib(shard_gib * 2**30)}, largest tensor {mib(largest)}: peak "
          f"RssAnon {mib(run.peak)}, {mib(run.imports)} of it the imports; {run.wall:.0f} s")  # fmt: skip
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 6
    assert run.peak - run.imports < run.bound(shard_gib, largest) - run.imports < model_bytes / 2
