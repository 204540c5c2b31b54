"""The demo page in a real browser: Playwright drives Debian's chromium (Playwright's own browser download cannot be
reached here). It uploads examples/detail.png, asks the README's question, waits for the streamed answer, then moves
`max_slice_nums` to 1 and reads the overview-only token count back. `.ci/demo.sh` runs it; skipped without Gradio,
Playwright or chromium. The page's screenshot goes to `$DEMO_SCREENSHOT` when set (docs/images/demo.png is one):
`DEMO_SCREENSHOT=docs/images/demo.png python -m pytest -q tests/test_demo_browser.py`.
"""

import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modeling_llava_uhd import LlavaUhdForConditionalGeneration, LlavaUhdProcessor, default_model_path
from modeling_llava_uhd.demo import build_app, bundled_examples

ROOT = Path(__file__).resolve().parents[1]
# Headless, and nothing that reaches for the network (this machine has none).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 60_000


def test_upload_ask_and_move_the_slider(tmp_path):
    path = default_model_path(tmp_path / "cache")
    model = LlavaUhdForConditionalGeneration.from_pretrained(path).eval()
    processor = LlavaUhdProcessor.from_pretrained(path)
    image = Image.open(ROOT / "examples" / "detail.png")

    def tokens(max_slice_nums: int) -> int:
        sizes = [[image.height, image.width]]
        return processor._get_num_multimodal_tokens(sizes, max_slice_nums=max_slice_nums)["num_image_tokens"][0]

    app = build_app(model, processor, bundled_examples())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    screenshot = tmp_path / "demo.png"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app.local_url, wait_until="domcontentloaded")  # not networkidle: Gradio keeps a stream open
            page.wait_for_selector("#image input[type=file]", state="attached")
            page.locator("#image input[type=file]").set_input_files(ROOT / "examples" / "detail.png")
            heading = page.locator("#tokens h3")
            heading.wait_for()
            assert heading.inner_text() == f"{tokens(7)} tokens"
            assert "LLaVA-1.5 at 336 px: 576 tokens" in page.locator("#tokens").inner_text()

            page.get_by_label("Question").fill("Which pattern is inside the frame?")
            page.get_by_label("Question").press("Enter")
            page.wait_for_selector("#chat .bot:has-text('checks')")
            page.wait_for_selector("#figures :text('time_to_first_token_s')")
            page.screenshot(path=screenshot, full_page=True)

            page.locator("#max-slice-nums input[type=range]").focus()
            page.keyboard.press("Home")  # the slider's lowest value: 1, the overview alone
            page.wait_for_selector(f"#tokens h3:text-is('{tokens(1)} tokens')")
            assert tokens(1) == processor.num_queries
            assert "not sliced: the overview alone" in page.locator("#tokens").inner_text()

            page.get_by_text("What is on the table?").click()  # the second example: its image and question
            page.wait_for_selector("#tokens:has-text('600×400 px')")
            assert page.get_by_label("Question").input_value() == "What is on the table?"
            browser.close()
    finally:
        app.close()
    with Image.open(screenshot) as shot:
        assert shot.width == 1400 and shot.height >= 1000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["DEMO_SCREENSHOT"])
