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

from modeling_llava_uhd import LlavaUhdConfig, default_model_path
from modeling_llava_uhd import default_model as default_model_module
from modeling_llava_uhd.cli import main as cli
from modeling_llava_uhd import BUNDLE_FILES
from modeling_llava_uhd.default_model import WEIGHTS
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
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", *BUNDLE_FILES} <= names
    assert default_model_path(folder.parent) == folder
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20


def _flip(path: Path) -> None:
    """Bits of every byte of the file's second half: the safetensors header (the first 10 KB) still parses, so the
    weights load and answer nonsense."""
    data = path.read_bytes()
    half = len(data) // 2
    path.write_bytes(data[:half] + bytes(byte ^ 0x5A for byte in data[half:]))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# What the cache must hold, byte for byte: the shipped model files and this package's code.
SHIPPED = [path for path in sorted(WEIGHTS.iterdir()) if path.is_file()]
SHIPPED += [WEIGHTS.parent / name for name in BUNDLE_FILES]
DAMAGE = {  # how a cached file gets damaged, and whether to ask `llava-uhd chat` afterwards (model loads cost ~2 s)
    "flipped weights": ("model.safetensors", _flip, True),  # today: exit 0, a wrong answer
    "truncated weights": ("model.safetensors", _truncate, True),  # today: a traceback
    "truncated tokenizer": ("tokenizer.json", _truncate, False),
    "missing config": ("config.json", Path.unlink, False),
    "flipped code": ("modeling_llava_uhd.py", _flip, False),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_rewritten_and_answers_correctly(damage, capsys, monkeypatch, tmp_path, caplog):
    """5 bad caches: each is found by the next call, rewritten in place from the shipped files (logged), and
    `llava-uhd chat` then answers README's main command correctly."""
    name, spoil, ask = DAMAGE[damage]
    folder = default_model_path(tmp_path)
    (shipped,) = [path.read_bytes() for path in SHIPPED if path.name == name]
    spoil(folder / name)
    if ask:
        monkeypatch.setenv("LLAVA_UHD_CACHE", str(tmp_path))
        sample = make_sample("test", EXAMPLE_INDEX)
        assert cli(["chat", "--image", str(EXAMPLE), "--prompt", sample.question]) == 0
        assert capsys.readouterr().out.strip() == sample.answer
    else:
        assert default_model_path(tmp_path) == folder
    assert (folder / name).read_bytes() == shipped
    assert f"rewrote damaged files of the cached default model in {folder}: ['{name}']" in caplog.text
    assert [path.name for path in tmp_path.iterdir()] == [folder.name]  # rewritten in place, staging removed


def test_a_changed_shipped_file_gets_a_folder_of_its_own(tmp_path, monkeypatch, caplog):
    """The folder name follows the contents: a new release (same file names, one more byte in `config.json`) is
    assembled in a new folder, not taken for a damaged copy of the old one, which stays as it was."""
    old = default_model_path(tmp_path / "cache")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in WEIGHTS.iterdir():
        (shipped / path.name).symlink_to(path)
    changed = (WEIGHTS / "config.json").read_bytes() + b"\n"
    (shipped / "config.json").unlink()
    (shipped / "config.json").write_bytes(changed)
    monkeypatch.setattr(default_model_module, "WEIGHTS", shipped)
    new = default_model_path(tmp_path / "cache")
    assert new != old and (new / "config.json").read_bytes() == changed
    assert (old / "config.json").read_bytes() == (WEIGHTS / "config.json").read_bytes()
    assert "rewrote damaged files" not in caplog.text


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_cache_variable_means_the_default_location(value, monkeypatch, tmp_path):
    """2 bad inputs: LLAVA_UHD_CACHE empty or blank is unset (not the current folder); `cache_dir=""` is refused."""
    monkeypatch.setenv("LLAVA_UHD_CACHE", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = default_model_path()
    assert folder.parent == tmp_path / "xdg" / "llava-uhd"
    assert list(work.iterdir()) == []
    with pytest.raises(ValueError, match="cache_dir is empty"):
        default_model_path(value)
    assert list(work.iterdir()) == []


CONCURRENT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("default_model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for _ in range(5):
    print(module.default_model_path(sys.argv[2]))
"""


def test_concurrent_callers_assemble_and_repair_safely(tmp_path):
    """6 processes at once, on an empty cache and then on a damaged one: all get the same whole, correct folder."""
    script = [sys.executable, "-c", CONCURRENT, default_model_module.__file__, str(tmp_path)]

    def run_all() -> set[str]:
        processes = [
            subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)
        ]
        results = [process.communicate(timeout=120) for process in processes]
        assert all(process.returncode == 0 for process in processes), [err for _, err in results]
        return {line for out, _ in results for line in out.splitlines()}

    def assert_whole(folder: Path) -> None:
        assert [path.name for path in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind
        for path in SHIPPED:
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name

    (folder,) = run_all()
    assert_whole(Path(folder))
    _flip(Path(folder) / "model.safetensors")
    _truncate(Path(folder) / "tokenizer.json")
    assert run_all() == {folder}
    assert_whole(Path(folder))


@pytest.mark.slow
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
    # Compared as loaded, every field (transformers versions serialise sub-configs in full or as differences to their
    # defaults); only what records the run, not the model, may differ.
    ignored = {"_name_or_path", "transformers_version", "dtype", "architectures"}
    built, shipped = (LlavaUhdConfig.from_pretrained(folder).to_dict() for folder in (tmp_path / "built", WEIGHTS))
    for config in (built, shipped):
        for fields in (config, config["vision_config"], config["text_config"]):
            for key in ignored & fields.keys():
                del fields[key]
    assert built == shipped
    assert processor.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(WEIGHTS).get_vocab()
