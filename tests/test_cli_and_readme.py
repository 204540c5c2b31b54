"""The `llava-uhd` CLI and the README's set-up commands."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from tiny import make_model, make_processor

from modeling_llava_uhd import BUNDLE_FILES, LlavaUhdForConditionalGeneration, LlavaUhdProcessor
from modeling_llava_uhd.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "coffee.jpg"


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.DOTALL)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _setup_commands()
    assert "llava-uhd chat --image examples/detail.png" in main_job  # answered: tests/test_default_model.py
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_slices_prints_layout_and_draws_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["slices", str(EXAMPLE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 row(s) x 3 column(s) = 6 slices" in printed
    assert "1008 image + 6 separator" in printed
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (682, 1024, 3)
    red_column = drawn[:, round(1024 / 3)]
    assert (red_column[:, 0] > 200).mean() > 0.9 and (red_column[:, 1] < 80).mean() > 0.9


def test_slices_options_and_errors(tmp_path, capsys):
    assert main(["slices", str(EXAMPLE), "--max-slices", "1", "--num-queries", "64"]) == 0
    printed = capsys.readouterr().out
    assert "not sliced" in printed and "64 image + 0 separator" in printed
    assert main(["slices", str(EXAMPLE), "--max-image-size", "none"]) == 0
    assert "sliced at: 600x400" in capsys.readouterr().out
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main(["slices", str(broken)]) == 1
    error = f"llava-uhd slices: error: image {str(broken)!r} is not an image file Pillow can read (corrupt or "
    assert capsys.readouterr().err == error + "unknown format)\n"  # one line


def test_chat_answers_with_a_saved_model_without_running_its_code(tmp_path, capsys):
    """A folder saved by this package carries its `.py` files; `chat` loads it with the installed classes, no flag."""
    folder, marker = tmp_path / "model", tmp_path / "marker"
    make_model().save_pretrained(folder)
    make_processor().save_pretrained(folder)
    planted = sorted(folder.glob("*.py"))
    assert {path.name for path in planted} == set(BUNDLE_FILES)
    for path in planted:
        path.write_text(path.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    code = main(
        ["chat", "--model", str(folder), "--image", str(EXAMPLE), "--prompt", "What is it?", "--max-new-tokens", "3"]
    )
    assert code == 0
    answer = capsys.readouterr().out
    assert not marker.exists()
    # The answer is the model's greedy continuation of the chat prompt, decoded.
    model = LlavaUhdForConditionalGeneration.from_pretrained(folder).eval()
    processor = LlavaUhdProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(EXAMPLE), text=prompt, return_tensors="pt")
    new_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(new_tokens, skip_special_tokens=True).strip() + "\n" != "\n"
