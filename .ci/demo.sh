#!/usr/bin/env bash
# CI for the web demo: an environment of its own (the demo extra, Gradio; Playwright driving Debian's chromium, as
# Playwright's own browser download cannot be reached), then the API tests and the real-browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    apt-get update -q && apt-get install -y -q chromium
fi
python3 -m venv .venv-demo
. .venv-demo/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,demo]" playwright
python -c "import gradio, playwright.sync_api; print('gradio', gradio.__version__)"
chromium --version 2>/dev/null | grep -i chromium  # the browser test must run here, not skip
python -m pytest -q tests/test_demo.py tests/test_demo_browser.py
