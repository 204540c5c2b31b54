"""Every benchmark runs once on small inputs so that none of them can rot. These are smoke runs, not measurements."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import flops, gpu, preprocess, quantization, serving, vision
from benchmarks.common import median_seconds, photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_preprocess_runs_and_checks_identity():
    results = preprocess.main(["--iterations", "1", "--images", "1", "--batch", "2"])
    assert all("LlavaUhdImageProcessor" in seconds for seconds in results.values())


def test_vision_runs_and_agrees():
    rows = vision.main(["--config", "tiny", "--images", "1", "--iterations", "1", "--device", "cpu", "--threads", "1"])
    paths = ["per-crop loop (reference)", "grouped by shape, same computation", "get_image_features (ours)"]
    assert list(rows) == paths
    assert all(row["seconds"] > 0 for row in rows.values())
    # float32: the reference's computation and ours agree to rounding.
    assert max(row["difference"] for row in rows.values()) < 1e-5, rows


@pytest.mark.slow  # four full-size models traced on the meta device: about 10 s
def test_flops_table_counts():
    rows = {row["name"].split(" (")[0]: row for row in flops.main(["--llm", "7b"])}
    tokens = {name: row["tokens"] for name, row in rows.items()}
    assert tokens == {"LLaVA-UHD paper": 7 * 64 + 6, "LLaVA-UHD release": 7 * 144 + 6, "LLaVA-1.5": 576,
                      "LLaVA-NeXT anyres": 48 * 48 + 48 + 576}  # fmt: skip
    assert all(row["vision"] > 0 and row["projector"] > 0 and row["llm"] > 0 for row in rows.values())


def test_gpu_refuses_without_cuda_and_runs_tiny_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.main(["--device", "cuda"])
    rows = gpu.main(["--device", "cpu", "--tiny", "--iterations", "1", "--new-tokens", "2", "--dtype", "float32",
                     "--threads", "1"])  # fmt: skip
    assert [row["name"] for row in rows] == ["LLaVA-UHD release", "LLaVA-1.5 (transformers)"]


def test_serving_rows_share_one_thread_setting(monkeypatch, capsys):
    """Every row of the serving benchmark computes on `--threads` threads (issue 21, C: vLLM bound one thread while
    `generate` took every core): torch's in this process, and vLLM's worker bound to as many cores."""
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    cores = serving.usable_cores()
    assert serving.parse_args([]).threads == max(1, len(cores) - 1)
    for threads in (0, len(cores) + 1):
        with pytest.raises(SystemExit):
            serving.parse_args(["--threads", str(threads)])
    settings = serving.pin_threads(1)
    assert torch.get_num_threads() == 1
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[0])
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert settings == f"1 compute thread(s) per row: torch.set_num_threads(1); VLLM_CPU_OMP_THREADS_BIND={cores[0]}"
    serving.check_threads(1)
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="torch runs 2 threads in this process, not 1"):
        serving.check_threads(1)

    torch.set_num_threads(1)
    args = serving.parse_args(["--max-tokens", "2", "--batch-size", "2"])
    folder = str(serving.default_model_path())
    rows = serving.transformers_rows(folder, serving.request_prompt(folder), photos([(224, 224), (500, 300)]), args)
    assert list(rows) == [serving.ANCHOR, "transformers generate, batched"]
    assert all(seconds > 0 for seconds in median_seconds(rows, 1).values())


def test_serving_runs_with_vllm():
    """The whole benchmark, tiny, as its own process, as it is run (runs where vLLM is installed: `.ci/vllm.sh`).
    Not in this process: once an in-process vLLM engine has bound threads (tests/test_vllm.py), vLLM turns
    `torch.set_num_threads` into a no-op for the rest of the process."""
    pytest.importorskip("vllm")
    tiny = ["--requests", "2", "--max-tokens", "2", "--batch-size", "2", "--passes", "1", "--threads", "1"]
    command = [sys.executable, "-m", "benchmarks.serving", *tiny]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[-3:] == [serving.ANCHOR, "transformers generate, batched", "vLLM (continuous batching)"], rows
    rates = [float(row.split("|")[2]) for row in rows[-3:]]
    assert all(rate > 0 for rate in rates), rows
    assert "torch.set_num_threads(1); VLLM_CPU_OMP_THREADS_BIND=" in result.stdout and "| 1.00x" in result.stdout


def test_quantization_weights_table_from_the_shapes():
    rows = {row["model"].split()[0]: row for row in quantization.main(["weights"])}
    assert 26.5 < rows["13B"]["bf16"] < 27.5 and 14 < rows["7B"]["bf16"] < 14.5  # the "about 26 GB"
    for row in rows.values():
        assert row["w4a16"] < row["bnb-nf4"] < row["w8a8-int8"] == row["torchao-int8"] < row["bnb-int8"] < row["bf16"]
