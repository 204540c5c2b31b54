"""The shipped default model: assembled offline, loads through the Auto classes and `pipeline` from its own remote
code, reaches the accuracy it reports, answers README's main command, and is what its reproduction command builds."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image
from transformers import AutoTokenizer

from modeling_llava_uhd import default_model_path
from modeling_llava_uhd.cli import main as cli
from modeling_llava_uhd.default_model import CODE_FILES, WEIGHTS
from processing.detail_task import make_sample
from training import default_model as recipe
from training.model import build_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "detail.png"
EXAMPLE_INDEX = 7  # examples/detail.png is test image 7 of the fine-detail task (see examples/README.md)
EVALUATION = json.loads((WEIGHTS / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return default_model_path(tmp_path_factory.mktemp("cache"))


def test_folder_is_assembled_once_with_weights_and_remote_code(folder):
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", *CODE_FILES} <= names
    assert default_model_path(folder.parent) == folder
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20


def test_reported_accuracy_is_reproduced_and_slicing_wins(folder):
    pairs = recipe.predict(folder, recipe.SUBSET)
    reported = EVALUATION["slices"][f"accuracy_first_{recipe.SUBSET}"]
    assert abs(recipe.accuracy(pairs)["all"] - reported) <= 1 / recipe.SUBSET, (pairs, reported)
    assert EVALUATION["test_images"] == recipe.SPLIT_SIZES["test"]
    assert EVALUATION["slices"]["accuracy"]["all"] >= EVALUATION["overview"]["accuracy"]["all"] + 0.3


REMOTE_SCRIPT = """
import sys
sys.modules["modeling_llava_uhd"] = None  # only the folder's own code may run
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

folder, image, question = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
pipe = pipeline("image-text-to-text", model=model, processor=processor)
chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}]}]
print("ANSWER", pipe(text=chat, max_new_tokens=4, return_full_text=False)[0]["generated_text"].strip())
"""


def test_loads_offline_without_the_package_and_answers_through_a_pipeline(folder):
    sample = make_sample("test", EXAMPLE_INDEX)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), str(folder), str(EXAMPLE), sample.question],
        capture_output=True, text=True, cwd=folder, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ANSWER {sample.answer}\n" in result.stdout


def test_readme_main_command_is_answered_correctly(capsys, monkeypatch, tmp_path):
    """README's main job: `llava-uhd chat` with no `--model` answers the bundled example."""
    sample = make_sample("test", EXAMPLE_INDEX)
    assert Image.open(EXAMPLE).tobytes() == sample.image.tobytes()
    readme = (ROOT / "README.md").read_text()
    main_job = readme.split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    command = main_job.split("&& llava-uhd ", 1)[1]
    assert command == f'chat --image examples/detail.png --prompt "{sample.question}"'
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(tmp_path))
    monkeypatch.chdir(ROOT)
    assert cli(["chat", "--image", "examples/detail.png", "--prompt", sample.question]) == 0
    assert capsys.readouterr().out.strip() == sample.answer


def test_reproduction_command_builds_the_shipped_configuration(tmp_path):
    """The documented command's start checkpoints and recipe give the shipped model's configuration and tokenizer."""
    assert EVALUATION["command"] == "python -m training.default_model --work work/default-model --ship"
    recipe.build_start(tmp_path)
    options = yaml.safe_load(recipe.CONFIG.read_text())
    model, processor = build_model(
        str(tmp_path / "vision"), str(tmp_path / "text"), options["projector_type"], options["num_queries"]
    )
    model.config.save_pretrained(tmp_path / "built")
    built, shipped = (json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "built", WEIGHTS))
    for key in ("projector_type", "num_queries", "image_token_id", "vision_feature_layer"):
        assert built[key] == shipped[key], key
    for sub in ("vision_config", "text_config"):
        ignored = {"_name_or_path", "transformers_version", "dtype", "architectures"}
        assert {k: v for k, v in built[sub].items() if k not in ignored} == {
            k: v for k, v in shipped[sub].items() if k not in ignored
        }, sub
    assert processor.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(WEIGHTS).get_vocab()
