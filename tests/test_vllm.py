"""LLaVA-UHD in vLLM (the `vllm.general_plugins` entry point): greedy tokens equal transformers' `generate` for both
projector types and the default model, on images of many sizes submitted together; `max_slice_nums` per request;
serving logs no transformers warning. Slow tier: a converted folder at the release's widths, untouched, gives
transformers' prompt ids, greedy tokens and top-k log-probabilities.

Runs where vLLM is installed (`.ci/vllm.sh` builds that environment); skipped elsewhere.
"""

import gc
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster start, no fork

import torch
from realwidth import SCRIPT, run_measured
from tiny import gradient, make_config, make_processor, photo
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams

from conversion.tokenizer import prepare_tokenizer
from modeling_llava_uhd import (
    LlavaUhdForConditionalGeneration,
    LlavaUhdImageProcessor,
    LlavaUhdProcessor,
    default_model_path,
)

MAX_TOKENS = 8
# (width, height): unsliced small images, square, wide and tall strips, large photos (pre-resized, up to 7 slices).
SIZES = [
    (120, 90), (336, 336), (200, 500), (700, 700), (1200, 300), (300, 1200), (1024, 768), (768, 1024), (1500, 1100),
    (2000, 400), (420, 2100), (640, 480), (900, 500), (50, 60), (1800, 1800), (500, 340), (1100, 1500), (800, 200),
    (336, 900), (1300, 700), (260, 250), (960, 540),
]  # fmt: skip
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
QUESTIONS = ("What is in the picture?", "Describe the image in detail.", "Count the objects.")


def images() -> list:
    """Real photos and generated images, one per size."""
    return [photo(PHOTOS[i % len(PHOTOS)], size) if i % 3 else gradient(*size, seed=i) for i, size in enumerate(SIZES)]


def requests(processor) -> list[tuple[str, list, dict]]:
    """Prompts (chat template, the BOS left to vLLM's tokenizer), their images and image keywords: one image each,
    then prompts with two and three images; every fourth request unsliced (`max_slice_nums=1`: the overview alone, as
    small images are after the processor's pre-resize to 1024)."""
    pictures = images()
    groups = [[image] for image in pictures[:16]] + [pictures[16:18], pictures[18:21], [pictures[21], pictures[0]]]
    prompts = []
    for index, group in enumerate(groups):
        kwargs = {"max_slice_nums": 1} if index % 4 == 1 else {}
        prompts.append((chat_prompt(processor, len(group), QUESTIONS[index % len(QUESTIONS)]), group, kwargs))
    return prompts


def chat_prompt(processor, num_images: int, question: str) -> str:
    """The chat template's prompt for `num_images` images and `question`, the BOS left to vLLM's tokenizer."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return text.removeprefix(processor.tokenizer.bos_token)


def transformers_greedy(model, processor, prompt: str, group: list, **images_kwargs) -> tuple[list[int], list[int]]:
    """Prompt ids and greedy new tokens of transformers' `generate`, one request alone."""
    inputs = processor(images=group, text=prompt, return_tensors="pt", **images_kwargs)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1] :].tolist()


def tiny_model(projector_type: str) -> LlavaUhdForConditionalGeneration:
    """A tiny random model whose attention heads vLLM's CPU kernels take (head size 32; tests/tiny.py's is 16)."""
    torch.manual_seed(0)
    config = make_config(projector_type)
    config.text_config.num_attention_heads = config.text_config.num_key_value_heads = 2
    config.text_config.head_dim = config.text_config.hidden_size // 2
    model = LlavaUhdForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def engine(folder) -> LLM:
    return LLM(
        model=str(folder),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        limit_mm_per_prompt={"image": 3},
        seed=0,
    )


def vicuna_model_and_processor() -> tuple[LlavaUhdForConditionalGeneration, LlavaUhdProcessor]:
    """A tiny random model with Vicuna's real sentencepiece tokenizer (the release's `legacy=False`), whose prompts
    vLLM tokenizes differently from the reference unless the plugin retokenizes them."""
    tokenizer = prepare_tokenizer(Path(__file__).parent / "fixtures" / "vicuna_tokenizer")
    processor = LlavaUhdProcessor(image_processor=LlavaUhdImageProcessor(), tokenizer=tokenizer, num_queries=16)
    torch.manual_seed(0)
    config = make_config(vocab_size=len(tokenizer), image_token_id=processor.image_token_id)
    config.text_config.update(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": tokenizer.pad_token_id, "num_attention_heads": 2}
    )
    config.text_config.num_key_value_heads = 2
    config.text_config.head_dim = config.text_config.hidden_size // 2
    model = LlavaUhdForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The messages transformers logs while the block runs, those it logs once per process included."""
    logging.Logger.warning_once.cache_clear()  # transformers' `warning_once`: an lru_cache over the logger's calls
    messages, handler = [], logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module", params=["spatial_resampler", "resampler", "vicuna tokenizer", "default model"])
def served(request, tmp_path_factory):
    """(vLLM engine, transformers model, processor, what transformers logged while the engine started) of one model,
    the engine shared by the module's tests."""
    if request.param == "default model":
        folder = default_model_path()
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
    else:
        folder = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
        if request.param == "vicuna tokenizer":
            model, processor = vicuna_model_and_processor()
        else:
            model, processor = tiny_model(request.param), make_processor(num_queries=16)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    with transformers_warnings() as warnings:
        llm = engine(folder)
    yield llm, model, processor, warnings
    del llm
    gc.collect()


def test_greedy_tokens_equal_transformers_generate_batched(served):
    llm, model, processor, _ = served
    prompts = requests(processor)
    assert sum(len(group) for _, group, _ in prompts) >= 20
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(
        [{"prompt": p, "multi_modal_data": {"image": g}, "mm_processor_kwargs": k} for p, g, k in prompts], params
    )
    grids = set()
    for (prompt, group, kwargs), output in zip(prompts, outputs):
        expected_ids, expected_tokens = transformers_greedy(model, processor, prompt, group, **kwargs)
        grids.update(map(tuple, processor.image_processor(group, **kwargs)["slice_grid"].tolist()))
        assert output.prompt_token_ids == expected_ids
        assert list(output.outputs[0].token_ids) == expected_tokens, prompt
    assert (0, 0) in grids and len(grids) >= 5  # unsliced images and many slice layouts were served


def test_max_slice_nums_per_request(served):
    llm, model, processor, _ = served
    prompt, group, _ = requests(processor)[8]  # 1500 x 1100: six slices by default
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = llm.generate(
        [
            {"prompt": prompt, "multi_modal_data": {"image": group}, "mm_processor_kwargs": {"max_slice_nums": n}}
            for n in (1, 2, 7)
        ],
        params,
    )
    lengths = []
    for n, output in zip((1, 2, 7), outputs):
        expected_ids, expected_tokens = transformers_greedy(model, processor, prompt, group, max_slice_nums=n)
        assert output.prompt_token_ids == expected_ids
        assert list(output.outputs[0].token_ids) == expected_tokens
        lengths.append(len(expected_ids))
    assert lengths[0] < lengths[1] < lengths[2]


def test_engine_logs_no_transformers_warning(served):
    """vLLM loads configs without an attention implementation; the resampler inside it has one set, so neither the
    engine's start nor a request with an image (a new one: nothing cached) logs a warning from transformers, such as
    "You tried to access the `AttentionInterface` with a `config._attn_implementation` set to `None`"."""
    llm, _, processor, started = served
    image = gradient(730, 410, seed=99)
    with transformers_warnings() as serving:
        llm.generate(
            {"prompt": chat_prompt(processor, 1, QUESTIONS[0]), "multi_modal_data": {"image": image}},
            SamplingParams(max_tokens=1, temperature=0.0),
        )
    assert started == [] and serving == []


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


@pytest.mark.slow
def test_converted_folder_at_real_width_serves_what_transformers_computes(
    realwidth_conversion, realwidth_transformers, realwidth_photo, realwidth_dir
):
    """The converter's folder of the release-width checkpoint (tests/realwidth.py), untouched, in vLLM's CPU build
    (float32): transformers' prompt ids and greedy tokens, and its top-k log-probabilities within 1e-4, with no
    warning from transformers."""
    folder, out = realwidth_conversion.output, realwidth_dir / "vllm.json"
    before = folder_state(folder)
    command = [sys.executable, str(SCRIPT), "vllm", str(folder), str(realwidth_photo), str(realwidth_transformers)]
    # vLLM serves on one thread unless OMP_NUM_THREADS says otherwise: as many as transformers' step had.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result, peak, wall = run_measured([*command, str(out)], 1500, cwd=realwidth_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_state(folder) == before
    assert "AttentionInterface" not in result.stdout + result.stderr
    expected, served = json.loads(realwidth_transformers.read_text()), json.loads(out.read_text())
    assert served["prompt_ids"] == expected["prompt_ids"] and served["tokens"] == expected["tokens"]
    differences = []
    for theirs, ours in zip(expected["logprobs"], served["logprobs"], strict=True):
        theirs = dict(theirs)
        assert {token for token, _ in ours} == set(theirs)
        differences += [abs(logprob - theirs[token]) for token, logprob in ours]
    print(f"\nreal width: vLLM in {wall:.0f} s (peak RssAnon {peak / 2**30:.2f} GiB), {len(served['prompt_ids'])} "
          f"prompt ids, top-{len(ours)} log-probabilities within {max(differences):.1e} of transformers'")
    assert max(differences) < 1e-4
