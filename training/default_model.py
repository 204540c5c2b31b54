"""The package's offline default model: a small LLaVA-UHD trained from scratch on the fine-detail task
(`processing.detail_task`) with our SFT recipe, next to the same model trained on overviews only, and the accuracy
of both on the held-out split.

    python -m training.default_model --work work/default-model --ship

writes the task's data, a fresh tiny ViT and LLM (and a tokenizer trained on the task's texts) to start from, trains
`training/configs/detail_task.yaml` with `training.sft` with slices and with `--max_slice_nums 1`, evaluates both
(`evaluation.json`) and, with `--ship`, makes the slices run `modeling_llava_uhd/default_model_files/`. Arguments
it does not know go to `training.sft` (e.g. `--max_steps 10`).
"""

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from modeling_llava_uhd import BUNDLE_FILES
from modeling_llava_uhd.default_model import WEIGHTS
from modeling_llava_uhd.processing_llava_uhd import SYSTEM_PROMPT
from processing.detail_task import PATTERNS, make_sample, vocabulary_corpus, write_images, write_rows

from .sft import main as sft_main
from .tokenizer import train_tokenizer

CONFIG = Path(__file__).parent / "configs" / "detail_task.yaml"
# The two runs: the default model (slices, as at inference) and the baseline (overview only); `max_slice_nums`.
RUNS = {"slices": None, "overview": 1}
SPLIT_SIZES = {"train": 2000, "test": 300}
SHARDS = 2  # processes writing the data
SUBSET = 48  # test images the shipped model's test re-evaluates


def build_start(folder: Path, seed: int = 0) -> None:
    """A fresh tiny CLIP ViT (patch 14, 24 x 24 positions) in `folder/vision` and a fresh tiny Llama with a tokenizer
    trained on the task's texts in `folder/text`: what `vision_model` and `text_model` of the configs point at."""
    turns = [f"USER: <image>\n{text} ASSISTANT: {text}</s>" for text in vocabulary_corpus()]
    tokenizer = train_tokenizer([SYSTEM_PROMPT, *turns] * 8, vocab_size=512)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            patch_size=14,
            image_size=336,
        )
    )
    text = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vision.save_pretrained(folder / "vision")
    text.save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "text")


def write_data(folder: Path) -> None:
    """The task's splits under `folder` (PNGs written by `SHARDS` processes, then one LLaVA-format JSON per split)."""
    for split, count in SPLIT_SIZES.items():
        bounds = np.linspace(0, count, SHARDS + 1).astype(int).tolist()
        with ProcessPoolExecutor(SHARDS) as pool:
            shards = pool.map(write_images, [folder] * SHARDS, [split] * SHARDS, bounds[:-1], bounds[1:])
            write_rows(folder, split, [row for rows in shards for row in rows])


def train_arguments(work: Path, run: str, overrides: list[str] = ()) -> list[str]:
    """`training.sft`'s arguments for `run` ("slices" or "overview") with everything under `work`, then `overrides`
    (more `training.sft` arguments)."""
    arguments = [
        "--config", str(CONFIG),
        "--vision_model", str(work / "start" / "vision"),
        "--text_model", str(work / "start" / "text"),
        "--data_path", str(work / "data" / "train.json"),
        "--image_folder", str(work / "data"),
        "--output_dir", str(work / run),
    ]  # fmt: skip
    if RUNS[run] is not None:
        arguments += ["--max_slice_nums", str(RUNS[run])]
    return arguments + list(overrides)


def predict(
    model_path: str | Path, count: int, max_slice_nums: int | None = None, batch_size: int = 8, **load_kwargs
) -> list[tuple[str, str]]:
    """`(expected, greedy)` answers of the model at `model_path` for the first `count` images of the test split;
    `load_kwargs` go to `from_pretrained` (a `quantization_config`, a `dtype`). The model is loaded outside inference
    mode: its buffers are then ordinary tensors, as they are for a user."""
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, **load_kwargs).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True, padding_side="left")
    pairs = []
    for start in range(0, count, batch_size):
        samples = [make_sample("test", index) for index in range(start, min(start + batch_size, count))]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
                add_generation_prompt=True,
            )
            for sample in samples
        ]
        inputs = processor(
            images=[sample.image for sample in samples], text=prompts, padding=True, max_slice_nums=max_slice_nums,
            return_tensors="pt",
        )  # fmt: skip
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        decoded = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        pairs += [(sample.answer, answer.strip()) for sample, answer in zip(samples, decoded, strict=True)]
    return pairs


def accuracy(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Exact-match accuracy of `predict`'s `(expected, answer)` pairs, overall (`"all"`) and per pattern."""
    hits = {pattern: [answer == pattern for expected, answer in pairs if expected == pattern] for pattern in PATTERNS}
    per_pattern = {pattern: float(np.mean(h)) for pattern, h in hits.items() if h}
    return {"all": float(np.mean([expected == answer for expected, answer in pairs]))} | per_pattern


def ship(work: Path) -> None:
    """Make `work`'s slices run (without its code files and training arguments) and `evaluation.json` the package's
    default model."""
    shutil.rmtree(WEIGHTS, ignore_errors=True)
    WEIGHTS.mkdir()
    for path in [*(work / "slices").iterdir(), work / "evaluation.json"]:
        if path.is_file() and path.name not in (*BUNDLE_FILES, "training_args.bin"):
            shutil.copyfile(path, WEIGHTS / path.name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/default-model"), help="data, start and runs")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="what to train")
    parser.add_argument("--eval-count", type=int, default=SPLIT_SIZES["test"], help="test images to evaluate on")
    parser.add_argument("--ship", action="store_true", help="make the slices run the package's default model")
    args, overrides = parser.parse_known_args(argv)  # the rest goes to `training.sft`, e.g. `--max_steps 10`

    if not (args.work / "data" / "test.json").is_file():
        write_data(args.work / "data")
    build_start(args.work / "start")
    command = " ".join(["python -m training.default_model", *(sys.argv[1:] if argv is None else argv)])
    results = {"command": command, "test_images": args.eval_count}
    for run in args.runs:
        start = time.perf_counter()
        sft_main(train_arguments(args.work, run, overrides))
        minutes = (time.perf_counter() - start) / 60
        pairs = predict(args.work / run, args.eval_count, RUNS[run])
        results[run] = {
            "max_slice_nums": RUNS[run] or 7,
            "train_minutes": round(minutes, 1),
            "accuracy": accuracy(pairs),
            f"accuracy_first_{SUBSET}": accuracy(pairs[:SUBSET])["all"],
        }
        print(json.dumps({run: results[run]}), flush=True)
    (args.work / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.ship:
        ship(args.work)
    return results


if __name__ == "__main__":
    main()
