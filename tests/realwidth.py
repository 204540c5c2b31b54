"""The real-width tier: a random checkpoint in the authors' layout at the release's shapes, and what transformers and
vLLM compute on its conversion.

The checkpoint: Vicuna-13B's width (hidden 5120, 40 heads, MLP 13824) with 2 layers and vocabulary 32000, the
144-query spatial resampler, bf16 in ~1 GB shards with an index, Vicuna's real `tokenizer.model` (no
`tokenizer.json`); beside it the whole CLIP ViT-L/14-336 as its own folder (`vision_model.*`, float32 as OpenAI ships
it). Written shard by shard: memory stays near one shard. Each step runs in a process of its own, one after another:

    python tests/realwidth.py checkpoint DIR                      # DIR/llava, DIR/clip
    python tests/realwidth.py transformers FOLDER IMAGE OUT.json  # the converted FOLDER from its Hub bundle alone
    python tests/realwidth.py vllm FOLDER IMAGE TRANSFORMERS.json OUT.json  # FOLDER untouched, in vLLM's CPU build

The last two write the prompt ids, greedy tokens and top-k log-probabilities (float32) of one request: a 1088x672
photo (7 crops, 1008 image tokens) and a question; `vllm` takes the prompt from the `transformers` step's result.
"""

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPConfig, CLIPVisionModel

# This package (and what imports it: the converter, test_conversion) is imported where needed: the transformers step
# must run without it.
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TEXT_CONFIG = dict(
    model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=2,
    num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip
INPUT_SHARD_BYTES = 2**30
OUTPUT_SHARD_GIB = 0.5  # the tier converts with `--max-shard-size 0.5`
SCRIPT = Path(__file__).resolve()
# Anonymous memory a conversion may need beyond its imports, one output shard and the largest tensor: the tokenizer,
# the model's skeleton on the meta device, the embedding growth's float64 buffers.
FIXED_OVERHEAD = 128 * 2**20
IMAGE_SIZE = (1088, 672)  # (width, height): 3 x 2 slices and the overview
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
NEW_TOKENS, TOP_K = 4, 20


def release_config():
    """The LLaVA-UHD config of the release at 2 LLM layers (the vision tower is the default, CLIP ViT-L/14-336)."""
    from modeling_llava_uhd import LlavaUhdConfig

    return LlavaUhdConfig(text_config=TEXT_CONFIG, projector_type="spatial_resampler", num_queries=144)


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values that keep activations near unit scale: matrices `randn / sqrt(fan_in)`, norm weights near 1, biases and
    other vectors small; the resampler's `pos_embed` is its fixed sin-cos table, as the authors' checkpoints hold
    it."""
    from modeling_llava_uhd.modeling_llava_uhd import sincos_position_table

    if name.endswith("pos_embed"):
        return sincos_position_table(shape[1], math.isqrt(shape[0]))
    noise = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        return noise.mul_(math.prod(shape[1:]) ** -0.5)
    is_norm = name.endswith(".weight") and any(part in name for part in ("norm", "ln_", "layrnorm"))
    return noise.mul_(0.02).add_(1.0 if is_norm else 0.0)


def write_shards(
    folder: Path, shapes: dict, dtype: torch.dtype, generator: torch.Generator, max_bytes: float = INPUT_SHARD_BYTES
) -> list[str]:
    """Random `shapes` (name -> shape, in order) as `dtype` safetensors shards of at most `max_bytes`, written one at a
    time, with `model.safetensors.index.json` when there are several; returns the file names."""
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    count = len(groups)
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    files = files if count > 1 else ["model.safetensors"]
    for file, names in zip(files, groups):
        shard = {name: random_weight(name, tuple(shapes[name]), generator).to(dtype) for name in names}
        save_file(shard, folder / file, metadata={"format": "pt"})
        del shard
    if count > 1:
        total = sum(math.prod(shape) * dtype.itemsize for shape in shapes.values())
        weight_map = {name: file for file, names in zip(files, groups) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """`folder/llava` (the authors' layout, bf16) and `folder/clip` (a CLIP folder, float32, one file); returns
    both."""
    from test_conversion import original_config, original_key

    from modeling_llava_uhd import LlavaUhdForConditionalGeneration

    config = release_config()
    llava, clip = folder / "llava", folder / "clip"
    llava.mkdir(parents=True)
    clip.mkdir()
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        ours = LlavaUhdForConditionalGeneration(config).state_dict()
        vision = CLIPVisionModel(config.vision_config).state_dict()
    shapes = {original_key(k): v.shape for k, v in ours.items() if not k.startswith("model.vision_tower.")}
    write_shards(llava, shapes, torch.bfloat16, generator)
    (llava / "config.json").write_text(json.dumps({**original_config(config), "torch_dtype": "bfloat16"}, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURES / "vicuna_tokenizer" / name, llava / name)

    # transformers 5's CLIPVisionModel names its weights without the `vision_model.` level CLIP checkpoints have.
    write_shards(clip, {f"vision_model.{k}": v.shape for k, v in vision.items()}, torch.float32, generator, math.inf)
    CLIPConfig(vision_config=config.vision_config.to_dict(), projection_dim=768).save_pretrained(clip)
    return llava, clip


def anon_rss(pid: int | str = "self") -> int:
    """Anonymous resident memory (`RssAnon`, bytes) of process `pid`; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return int(kb) * 1024


def run_measured(command: list[str], timeout: float, **kwargs) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `command` (output captured as text), sampling its RssAnon every 10 ms; returns the finished process, its
    peak anonymous memory in bytes and its wall time in seconds."""
    start, peak = time.monotonic(), 0
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    streams = {}
    reader = lambda name: streams.__setitem__(name, getattr(process, name).read())  # noqa: E731
    threads = [threading.Thread(target=reader, args=(name,)) for name in ("stdout", "stderr")]
    for thread in threads:
        thread.start()
    while process.poll() is None:
        peak = max(peak, anon_rss(process.pid))
        if time.monotonic() - start > timeout:
            process.kill()
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    result = subprocess.CompletedProcess(command, process.returncode, streams["stdout"], streams["stderr"])
    return result, peak, time.monotonic() - start


@dataclass
class Conversion:
    """A run of the converter's command line in a process of its own: its output folder, the finished process, its
    peak anonymous memory, that of the same command refused before it reads anything (its imports), its wall time."""

    output: Path
    result: subprocess.CompletedProcess
    peak: int
    imports: int
    wall: float

    def bound(self, shard_gib: float, largest: int) -> int:
        """The most anonymous memory streaming needs: the imports, one output shard of `shard_gib`, the largest
        tensor (`largest` bytes) and FIXED_OVERHEAD."""
        return self.imports + int(shard_gib * 2**30) + largest + FIXED_OVERHEAD


def convert_measured(original: Path, clip: Path, output: Path, *options: str, timeout: float = 900) -> Conversion:
    """`python -m conversion.convert_llava_uhd` on `original` and its CLIP folder `clip` into `output`, with
    `options`, its anonymous memory measured (see `Conversion`)."""
    command = [sys.executable, "-m", "conversion.convert_llava_uhd", "--original", str(original), "--vision-tower",
               str(clip), "--output", str(output), *options]  # fmt: skip
    refused, imports, _ = run_measured([*command, "--max-shard-size", "0"], timeout, cwd=ROOT)
    assert "--max-shard-size must be a positive number" in refused.stderr, refused.stderr[-3000:]
    result, peak, wall = run_measured(command, timeout, cwd=ROOT)
    return Conversion(output, result, peak, imports, wall)


def largest_tensor_bytes(folder: Path) -> int:
    """The size of the largest tensor in the safetensors files of `folder`, from their headers."""
    sizes = []
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        sizes += [info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items()
                  if name != "__metadata__"]  # fmt: skip
    return max(sizes)


def top_logprobs(scores: torch.Tensor) -> list[list[list[float]]]:
    """`[[token id, log-probability], ...]` of the TOP_K best tokens, per generated position, in float32."""
    steps = []
    for row in scores:
        values, ids = torch.log_softmax(row.float(), dim=-1).topk(TOP_K)
        steps.append([[int(i), float(v)] for i, v in zip(ids, values)])
    return steps


def transformers_step(folder: str, image: str, out: str) -> None:
    """The converted folder from its Hub bundle alone (this package made unimportable), in float32."""
    sys.modules["modeling_llava_uhd"] = None
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    ids = inputs["input_ids"][0].tolist()
    result = {
        "prompt": prompt.removeprefix(processor.tokenizer.bos_token),  # as vLLM takes it: its tokenizer adds the BOS
        "prompt_ids": ids,
        "crops": len(inputs["image_grid_hw"]),
        "image_tokens": ids.count(model.config.image_token_id),
        "tokens": generated.sequences[0, len(ids) :].tolist(),
        "logprobs": top_logprobs(torch.cat(generated.scores)),
    }
    Path(out).write_text(json.dumps(result) + "\n")


def vllm_step(folder: str, image: str, reference: str, out: str) -> None:
    """The converted folder, untouched, in vLLM (this package's plugin), float32, on the prompt of the
    `transformers_step` result `reference`."""
    from vllm import LLM, SamplingParams

    prompt = json.loads(Path(reference).read_text())["prompt"]
    llm = LLM(model=folder, dtype="float32", max_model_len=2048, max_num_batched_tokens=2048, enforce_eager=True,
              limit_mm_per_prompt={"image": 1}, mm_processor_cache_gb=0, seed=0)  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=TOP_K)
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": Image.open(image)}}, params)[0]
    steps = [sorted(step.items(), key=lambda item: -item[1].logprob)[:TOP_K] for step in output.outputs[0].logprobs]
    result = {
        "prompt_ids": list(output.prompt_token_ids),
        "tokens": list(output.outputs[0].token_ids),
        "logprobs": [[[int(i), float(p.logprob)] for i, p in step] for step in steps],
    }
    Path(out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    step, *arguments = sys.argv[1:]
    if step == "checkpoint":
        print(*write_checkpoint(Path(arguments[0])))
    else:
        {"transformers": transformers_step, "vllm": vllm_step}[step](*arguments)
