#!/usr/bin/env bash
# The lmms-eval integration's tests (tests/test_lmms_eval.py; the core suite skips them) in an environment of their
# own: lmms-eval 0.7.3 needs torchvision, and no torchvision imports beside the core suite's torch 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-lmms
. .venv-lmms/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.14.1 torchvision==0.29.1
# lmms-eval 0.7.3 imports filelock._api (gone in filelock 4); its wandb needs protobuf < 7, which the generated code of
# sentencepiece 0.2.3 refuses (reading Vicuna's tokenizer.model).
pip install -q lmms-eval==0.7.3 -e ".[test]" "filelock<4" "sentencepiece<0.2.3"
python -c "import lmms_eval, torch, transformers; print('lmms-eval env: torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q tests/test_lmms_eval.py
