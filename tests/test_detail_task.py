"""The synthetic fine-detail task the default model is trained on: deterministic, split, well-formed, and really
about detail (the overview loses what the slices keep)."""

import json

import numpy as np
import pytest
from PIL import Image

from modeling_llava_uhd import LlavaUhdImageProcessor
from processing import load_llava_dataset
from processing.detail_task import PATTERNS, QUESTIONS, make_sample, write_split
from training import default_model as recipe


def test_samples_are_deterministic_and_splits_differ():
    first, again = make_sample("train", 3), make_sample("train", 3)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.question, first.answer, first.panel_box) == (again.question, again.answer, again.panel_box)
    assert make_sample("test", 3).image.tobytes() != first.image.tobytes()
    with pytest.raises(ValueError, match="`split` must be one of"):
        make_sample("validation", 0)


def test_sizes_questions_answers_and_placement_vary():
    samples = [make_sample("train", index) for index in range(24)]
    sizes = [sample.image.size for sample in samples]
    assert all(1024 <= max(size) <= 1600 for size in sizes)
    assert {w > h for w, h in sizes} == {True, False} and any(w == h for w, h in sizes)
    assert {sample.answer for sample in samples} == set(PATTERNS)
    assert {sample.question for sample in samples} == set(QUESTIONS)
    for sample in samples:
        left, top, right, bottom = sample.panel_box
        assert 0 <= left < right <= sample.image.width and 0 <= top < bottom <= sample.image.height
        assert 0.6 <= (right - left) / sample.image.width <= 0.92
        assert 0.6 <= (bottom - top) / sample.image.height <= 0.92
    assert len({sample.panel_box[:2] for sample in samples}) == len(samples)


def panel_contrast(sample, height: int) -> float:
    """Luminance standard deviation inside the panel (frame excluded) with the image resized to `height`, as the
    image processor resizes (PIL bicubic)."""
    scale = height / sample.image.height
    resized = sample.image.resize((round(sample.image.width * scale), height), Image.Resampling.BICUBIC)
    left, top, right, bottom = (round(v * scale) for v in sample.panel_box)
    inner = np.asarray(resized.convert("L"), dtype=np.float32)[top:bottom, left:right]
    margin = max(3, (bottom - top) // 8)
    return float(inner[margin:-margin, margin:-margin].std())


@pytest.mark.parametrize("index", range(16))
def test_the_overview_loses_the_pattern_that_slices_keep(index):
    """At the slices' scale a striped, barred or checked panel keeps its contrast; at the overview's it is as flat as a
    plain one: the answer is in the slices only."""
    sample = make_sample("test", index)
    layout = LlavaUhdImageProcessor().get_slice_layout(sample.image.height, sample.image.width)
    sliced = panel_contrast(sample, layout.grid[0] * layout.slice_size[0])
    overview = panel_contrast(sample, layout.overview_size[0])
    if sample.answer == "plain":
        assert sliced < 1 and overview < 1, (sliced, overview)
    else:
        assert sliced > 25 and overview < sliced / 4, (sliced, overview)


def test_written_split_loads_as_training_rows(tmp_path):
    path = write_split(tmp_path, "train", 3)
    with open(path) as file:
        rows = json.load(file)
    assert [row["image"] for row in rows] == ["train/00000.png", "train/00001.png", "train/00002.png"]
    dataset = load_llava_dataset(path, tmp_path)
    assert len(dataset) == 3
    messages = dataset[0]["messages"]
    sample = make_sample("train", 0)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["type"] == "image"
    assert messages[0]["content"][1]["text"] == sample.question
    assert messages[1]["content"][0]["text"] == sample.answer
    assert Image.open(tmp_path / "train/00000.png").tobytes() == sample.image.tobytes()


def test_accuracy_is_exact_match_overall_and_per_expected_pattern():
    pairs = [("plain", "plain"), ("plain", "stripes"), ("stripes", "stripes"), ("checks", "plain"), ("bars", "bars ")]
    assert recipe.accuracy(pairs) == {"all": 0.4, "plain": 0.5, "stripes": 1.0, "checks": 0.0, "bars": 0.0}
    assert recipe.accuracy([("bars", "bars")]) == {"all": 1.0, "bars": 1.0}  # patterns never expected are left out


@pytest.mark.slow
def test_training_recipe_runs_end_to_end_on_a_few_images(tmp_path, monkeypatch):
    """`python -m training.default_model` in small: data, fresh start checkpoints, both runs through `training.sft`,
    evaluation of both."""
    monkeypatch.setattr(recipe, "SPLIT_SIZES", {"train": 6, "test": 2})
    results = recipe.main(["--work", str(tmp_path), "--eval-count", "2", "--max_steps", "2"])
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    for run in recipe.RUNS:
        assert (tmp_path / run / "model.safetensors").is_file()
        scores = results[run]["accuracy"]
        assert scores["all"] in (0.0, 0.5, 1.0) and set(scores) - {"all"} <= set(PATTERNS)  # 2 images evaluated
        assert saved[run]["accuracy"] == scores
    assert saved["overview"]["max_slice_nums"] == 1 and saved["slices"]["max_slice_nums"] == 7
    assert json.loads((tmp_path / "data" / "train.json").read_text())[5]["id"] == "train-00005"
