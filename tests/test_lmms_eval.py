"""lmms-eval runs LLaVA-UHD as its authors evaluated it (`--model llava_uhd`, found through the package's entry point).

Two local lmms-eval tasks (YAML + a `datasets.save_to_disk` folder, `--include_path`) run through the real `lmms-eval`
command line, offline, with the bundled default model: the fine-detail test images (its score equals the project's
own evaluation, `training.default_model.predict`) and real photos under the VQAv2 protocol (beam search). Batch size 1
and 4 give the same answers. In process, the prompt and inputs built for a VQAv2 and a ScienceQA sample are the
authors': the ids their `tokenizer_image_token` made (fixture) or that their recipe gives with Vicuna's
sentencepiece model, the pre-resize and grid their `resize_image_keep_ratio` + `slice_image_minicpm` gave (fixture).

lmms-eval needs torchvision, which does not import beside the core suite's torch: these tests run in the environment
`.ci/lmms_eval.sh` builds and are skipped elsewhere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import sentencepiece
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from lmms_eval.api.instance import Instance
from PIL import Image
from tiny import make_model, photo

from conversion.tokenizer import prepare_tokenizer
from modeling_llava_uhd import LlavaUhdImageProcessor, LlavaUhdProcessor, default_model_path
from modeling_llava_uhd.lmms_eval_llava_uhd import LlavaUhd
from processing.detail_task import make_sample
from training.default_model import accuracy, predict

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZATION = json.loads((FIXTURES / "tokenization_reference.json").read_text(encoding="utf-8"))
LAYOUTS = json.loads((FIXTURES / "slice_layouts_reference.json").read_text())
DETAIL_IMAGES = 12
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
PHOTO_QUESTION = "What pattern fills the framed panel?"
IMAGE_INDEX = TOKENIZATION["image_token_index"]  # the authors' -200
QUERIES = 16
# The authors' Vicuna v1 prompt (`conv_templates["vicuna_v1"]`) around `<image>\n` + question (`model_vqa_*.py`).
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  num_beams: 1
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
# `uhd_detail` decodes with its own generation_kwargs (greedy, 4 tokens: as `predict`); `vqav2_uhd_photos` is named
# as a VQAv2 variant, so the default `protocol=authors` decodes it as the authors' VQAv2 script (3 beams, 128 tokens).
TASKS = ("uhd_detail", "vqav2_uhd_photos")


def write_task(folder: Path, task: str, rows: list[dict]) -> None:
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    DatasetDict({"test": Dataset.from_list(rows, features=features)}).save_to_disk(folder / f"{task}_data")
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=folder / f"{task}_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The default model's cache for these tests (`LLAVA_UHD_CACHE` of the command line runs)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    samples = [make_sample("test", index) for index in range(DETAIL_IMAGES)]
    write_task(folder, TASKS[0], [{"image": s.image, "question": s.question, "answer": s.answer} for s in samples])
    photos = [{"image": photo(name), "question": PHOTO_QUESTION, "answer": "plain"} for name in PHOTOS]
    write_task(folder, TASKS[1], photos)
    return folder


def run_lmms_eval(task_folder: Path, output: Path, batch_size: int, cache: Path) -> dict[str, list[dict]]:
    """Run the `lmms-eval` command line offline on both tasks with the default model (no `pretrained`); the logged
    samples by task, in document order, and the scores (`"results"`)."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **offline, "LLAVA_UHD_CACHE": str(cache)}
    command = [
        str(Path(sys.executable).with_name("lmms-eval")),
        *("--model", "llava_uhd", "--model_args", "device=cpu", "--tasks", ",".join(TASKS)),
        *("--include_path", str(task_folder), "--batch_size", str(batch_size)),
        *("--output_path", str(output), "--log_samples", "--verbosity", "WARNING"),
    ]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = {}
    for task in TASKS:
        (path,) = output.rglob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        logged[task] = sorted(rows, key=lambda row: row["doc_id"])
    (results,) = output.rglob("*_results.json")
    logged["results"] = json.loads(results.read_text())["results"]
    return logged


def answers(logged: dict, task: str) -> list[str]:
    return [row["filtered_resps"] for row in logged[task]]


@pytest.fixture(scope="module")
def runs(task_folder, cache, tmp_path_factory) -> dict[int, dict]:
    return {size: run_lmms_eval(task_folder, tmp_path_factory.mktemp(f"bs{size}"), size, cache) for size in (1, 4)}


def test_score_equals_the_projects_own_evaluation(runs, cache):
    pairs = predict(default_model_path(cache), DETAIL_IMAGES)
    assert answers(runs[4], "uhd_detail") == [answer for _, answer in pairs]
    expected = accuracy(pairs)["all"]
    for size, logged in runs.items():
        assert logged["results"]["uhd_detail"]["exact_match,none"] == pytest.approx(expected), size
    assert expected > 0.5  # the default model reads the slices: a real score, not a floor


def test_batch_size_does_not_change_answers(runs):
    for task in TASKS:
        assert answers(runs[1], task) == answers(runs[4], task), task
    expected = [make_sample("test", index).answer for index in range(DETAIL_IMAGES)]
    assert [row["target"] for row in runs[4]["uhd_detail"]] == expected


@pytest.mark.parametrize("protocol", ["authors", "task"])
def test_decoding_follows_the_protocol(runs, cache, protocol):
    """`protocol=authors` decodes a VQAv2 task as the authors' script (3 beams, 128 tokens) and a task they did not
    run with its own settings; `protocol=task` uses the task's settings for both. The answers are the command line's."""
    model = LlavaUhd(pretrained=str(default_model_path(cache)), device="cpu", batch_size=2, protocol=protocol)
    calls, generate = [], model.model.generate
    model.model.generate = lambda **inputs: calls.append(inputs) or generate(**inputs)
    photos = [{"image": photo(name)} for name in PHOTOS[:2]]
    detail = [{"image": make_sample("test", 0).image}]
    model.task_dict = {TASKS[1]: {"test": photos}, TASKS[0]: {"test": detail}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "num_beams": 1}
    requests = [request(TASKS[1], index, PHOTO_QUESTION, greedy) for index in range(2)]
    requests.append(request(TASKS[0], 0, make_sample("test", 0).question, greedy))
    answers_in_process = model.generate_until(requests)
    photo_decoding = (3, 128) if protocol == "authors" else (1, 4)
    assert [(call["num_beams"], call["max_new_tokens"]) for call in calls] == [photo_decoding, (1, 4)]
    assert answers_in_process == answers(runs[1], TASKS[1])[:2] + answers(runs[1], TASKS[0])[:1]


def request(task: str, doc_id: int, context: str, gen_kwargs: dict) -> Instance:
    def doc_to_visual(doc):
        return [doc["image"]]

    arguments = (context, gen_kwargs, doc_to_visual, doc_id, task, "test")
    return Instance(
        request_type="generate_until",
        arguments=arguments,
        idx=0,
        metadata={"task": task, "doc_id": doc_id, "repeats": 1},
    )


@pytest.fixture(scope="module")
def vicuna_model(tmp_path_factory) -> Path:
    """A tiny random LLaVA-UHD with Vicuna's real tokenizer (as the converter prepares it), saved as a folder."""
    folder = tmp_path_factory.mktemp("vicuna-uhd")
    tokenizer = prepare_tokenizer(FIXTURES / "vicuna_tokenizer")
    processor = LlavaUhdProcessor(
        image_processor=LlavaUhdImageProcessor(),
        tokenizer=tokenizer,
        num_queries=QUERIES,
        slice_separator_id=29892,
        row_separator_id=13,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<image>", "<pad>")}
    model = make_model(vocab_size=len(tokenizer), image_token_id=ids["<image>"])
    model.config.text_config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": ids["<pad>"]})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def authors_ids(question: str) -> list[int]:
    """The authors' ids for `question` at inference, by their recipe (`tokenizer_image_token`): the Vicuna v1 prompt
    split at `<image>`, each chunk tokenized by sentencepiece on its own, BOS first, -200 between the chunks."""
    spm = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "vicuna_tokenizer" / "tokenizer.model"))
    before, after = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:".split("<image>")
    return [1, *spm.encode(before), IMAGE_INDEX, *spm.encode(after)]


def authors_layout(width: int, height: int, pre_resize: bool) -> tuple[tuple[int, int], list[int] | None]:
    """The pre-resized size and the `[cols, rows]` grid the authors' code gave for a `width x height` image."""
    entry = next(e for e in LAYOUTS if (e["width"], e["height"], e["max_slice_nums"]) == (width, height, 7))
    if not pre_resize:
        return (width, height), entry["grid"]
    return tuple(entry["preresized_size"]), entry["preresized"]["grid"]


def schema(image_token_id: int, grid: list[int] | None) -> list[int]:
    """The spatial schema (REFERENCE.md): each slice's queries then ',' (29892) or, ending a row, '\\n' (13); then the
    overview's queries."""
    crop, (cols, rows) = [image_token_id] * QUERIES, grid or (0, 0)
    return [i for _ in range(rows) for col in range(cols) for i in crop + [29892 if col < cols - 1 else 13]] + crop


# A VQAv2 sample (lmms-eval's `vqav2_doc_to_text` with the task's default post-prompt) and a ScienceQA-IMG sample
# (`sqa_doc_to_text`: context, question, lettered options, then the letter instruction `model_vqa_science` appends).
VQA_DOC = {"question": "What color is the cup?"}
SQA_DOC = {"hint": "The cup is on a saucer.", "question": "Which colour is the cup?", "choices": ["red", "blue"]}
AUTHORS_QUESTIONS = {
    "vqav2_test": "What color is the cup?\nAnswer the question using a single word or phrase.",
    "scienceqa_img": "Context: The cup is on a saucer.\nWhich colour is the cup?\nA. red\nB. blue\n"
    "Answer with the option's letter from the given choices directly.",
}


@pytest.fixture(scope="module")
def task_configs() -> dict[str, dict]:
    """lmms-eval's own configs of the benchmark tasks (their `doc_to_text` functions and default prompt arguments)."""
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING")
    return {task: manager._get_config(task) for task in ("vqav2_test", "scienceqa_img")}


# `(num_beams, max_new_tokens)` in the authors' scripts: `scripts/v1_5/eval/{vqav2,sqa,mmbench}.sh` and the defaults of
# the scripts they call (`model_vqa_loader` 128 tokens, `model_vqa_science` and `model_vqa_mmbench` 1024).
AUTHORS_DECODING = {"vqav2_test": (3, 128), "scienceqa_img": (3, 1024), "mmbench_en_dev": (1, 1024)}


@pytest.mark.parametrize("task, doc", [("vqav2_test", VQA_DOC), ("scienceqa_img", SQA_DOC)], ids=["vqa", "choice"])
@pytest.mark.parametrize("pre_resize", [True, False], ids=["pre-resize", "mmbench-style"])
def test_prompt_and_inputs_are_the_authors(vicuna_model, task_configs, task, doc, pre_resize):
    config = task_configs[task]
    question = config["doc_to_text"](doc, config["lmms_eval_specific_kwargs"]["default"])
    assert question == AUTHORS_QUESTIONS[task]
    width, height = 1088, 672
    image = photo("astronaut", (width, height))
    model = LlavaUhd(pretrained=str(vicuna_model), device="cpu")
    task_name = task if pre_resize else "mmbench_en_dev"  # the authors evaluated MMBench without the pre-resize
    model.task_dict = {task_name: {"test": [{**doc, "image": image}]}}
    inputs, generate, _ = model.build_inputs([request(task_name, 0, question, {"max_new_tokens": 16})])

    # Prompt and ids: the authors' text, their ids with -200 expanded into the image's schema.
    assert model.prompt(question, 1) == f"<s>{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    size, grid = authors_layout(width, height, pre_resize)
    image_token_id = model.processor.image_token_id
    ids = authors_ids(question)
    if task == "vqav2_test":  # the recipe reproduces the ids the authors' code made (fixture)
        case = next(c for c in TOKENIZATION["cases"] if c["kind"] == "inference" and c["question"] == question)
        assert ids == case["input_ids"]
    expected = [i for token in ids for i in (schema(image_token_id, grid) if token == IMAGE_INDEX else [token])]
    assert inputs["input_ids"][0].tolist() == expected

    # Pixels: the image resized as `resize_image_keep_ratio` does (PIL bicubic), then sliced without a pre-resize.
    resized = image.resize(size, Image.Resampling.BICUBIC) if pre_resize else image
    reference = LlavaUhdImageProcessor(max_image_size=0)(resized, return_tensors="pt")
    assert inputs["slice_grid"].tolist() == [[grid[1], grid[0]] if grid else [0, 0]]
    assert torch.equal(inputs["pixel_values"], reference["pixel_values"])
    assert torch.equal(inputs["image_grid_hw"], reference["image_grid_hw"])
    num_beams, max_new_tokens = AUTHORS_DECODING[task_name]
    assert generate == {"do_sample": False, "num_beams": num_beams, "max_new_tokens": max_new_tokens}


@pytest.mark.parametrize("max_image_size, expected", [(None, 1024), ("none", 0), ("NONE", 0), (700, 700)])
def test_max_image_size_reaches_the_one_processor_per_call(max_image_size, expected):
    """The `max_image_size` model arg (lmms-eval passes `none` as the string) goes to the checkpoint's processor per
    call, which keeps its own setting (1024, used when the arg is not given); MMBench-style tasks never pre-resize."""
    model = LlavaUhd(device="cpu", **({} if max_image_size is None else {"max_image_size": max_image_size}))
    image = photo("astronaut", (1088, 672))
    model.task_dict = {task: {"test": [{"image": image}]} for task in ("vqav2_test", "mmbench_en_dev")}
    image_processor = model.processor.image_processor
    for task, size in (("vqav2_test", expected), ("mmbench_en_dev", 0)):
        inputs, _, _ = model.build_inputs([request(task, 0, "What is it?", {})])
        reference = LlavaUhdImageProcessor(max_image_size=size)(image, apply_exif_orientation=False)
        assert torch.equal(inputs["image_grid_hw"], reference["image_grid_hw"]), task
        assert torch.equal(inputs["pixel_values"], reference["pixel_values"]), task
    assert image_processor is model.processor.image_processor and image_processor.max_image_size == 1024


def test_authors_decoding_by_task_name():
    from modeling_llava_uhd.lmms_eval_llava_uhd import authors_decoding

    assert authors_decoding("vqav2_val").num_beams == 3 and authors_decoding("pope_adv").num_beams == 1
    assert authors_decoding("mme").num_beams == 5 and authors_decoding("mmbench_cn_dev").pre_resize is False
    assert authors_decoding("mmerealworld") is None and authors_decoding("seedbench") is None


def test_bad_model_args_are_named():
    with pytest.raises(ValueError, match=r"unknown model_args \['bogus'\]"):
        LlavaUhd(bogus=1)
    with pytest.raises(ValueError, match="protocol must be one of"):
        LlavaUhd(protocol="paper")
    with pytest.raises(ValueError, match="batch_size must be a number"):
        LlavaUhd(batch_size="auto")
