"""Streaming conversion: peak memory follows the shard size, not the model size."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_conversion import original_key, tiny_separators, write_original
from tiny import make_config

from modeling_llava_uhd import LlavaUhdForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import resource, sys
from conversion.convert_llava_uhd import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
assert main(sys.argv[1:]) == 0
print("RSS_MB", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_big_original(folder: Path, shard_mb: int = 48) -> int:
    """An original checkpoint of ~400 MB (8 LLM layers of width 1024) in shards of ~`shard_mb` MB; returns bytes."""
    small = folder.parent / "small"
    write_original(small)  # tokenizer and CLIP folder (next to it) to reuse
    config = make_config(num_queries=144, resampler_num_heads=8)
    config.text_config.hidden_size = 1024
    config.text_config.intermediate_size = 2816
    config.text_config.num_hidden_layers = 8
    config.text_config.num_attention_heads = 8
    config.text_config.num_key_value_heads = 8
    config.text_config.head_dim = 128
    with torch.device("meta"):
        shapes = LlavaUhdForConditionalGeneration(config).state_dict()
    folder.mkdir()
    original_config = json.loads((small / "config.json").read_text())
    original_config.update(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        head_dim=128,
    )
    (folder / "config.json").write_text(json.dumps(original_config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((small / name).read_bytes())
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, total, index = {}, 0, 0, 0
    for key, meta in shapes.items():
        if key.startswith("model.vision_tower."):
            continue
        tensor = torch.randn(meta.shape, generator=generator) * 0.02
        shard[original_key(key)] = tensor
        shard_bytes += tensor.numel() * 4
        if shard_bytes >= shard_mb * 2**20:
            save_file(shard, folder / f"model-{index:05d}.safetensors")
            total, index, shard, shard_bytes = total + shard_bytes, index + 1, {}, 0
    save_file(shard, folder / f"model-{index:05d}.safetensors")
    return total + shard_bytes


def rss_mb(original: Path, output: Path, clip: Path, shard_gib: float) -> tuple[float, float]:
    """Peak RSS (MB) of a conversion in a fresh process: after the imports, and at the end."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, "--original", str(original), "--vision-tower", str(clip), "--output",
         str(output), "--dtype", "float32", "--max-shard-size", str(shard_gib), *tiny_separators()],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, peak = result.stdout.split("RSS_MB")[1].split()
    return float(before), float(peak)


def test_peak_memory_stays_near_one_shard(tmp_path):
    model_bytes = write_big_original(tmp_path / "big")
    clip = tmp_path / "clip"
    write_original(tmp_path / "tiny")
    tiny_before, tiny_peak = rss_mb(tmp_path / "tiny", tmp_path / "out_tiny", clip, 0.05)
    before, peak = rss_mb(tmp_path / "big", tmp_path / "out_big", clip, 0.05)
    model_mb, shard_mb = model_bytes / 2**20, 0.05 * 1024
    print(f"model {model_mb:.0f} MB in {len(list((tmp_path / 'big').iterdir())) - 3} shards, output shards "
          f"{shard_mb:.0f} MB: peak RSS {before:.0f} MB after imports -> {peak:.0f} MB "
          f"(+{peak - before:.0f} MB; a tiny model: +{tiny_peak - tiny_before:.0f} MB)")
    assert len(list((tmp_path / "out_big").glob("*.safetensors"))) >= 6
    assert peak - before < 4 * shard_mb < model_mb / 2
