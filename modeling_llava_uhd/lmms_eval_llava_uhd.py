"""LLaVA-UHD for lmms-eval, evaluated the way its authors evaluated it.

    lmms-eval --model llava_uhd --model_args pretrained=<folder or Hub repo> --tasks vqav2_test --batch_size 8

lmms-eval finds the model through this package's `lmms_eval.models` entry point (`manifest`). Every sample goes
through the authors' evaluation path (`llava/eval/model_vqa_loader.py`, `model_vqa_science.py` and
`model_vqa_mmbench.py` of the reference's `LLaVA-UHD-v1` branch): the long-side pre-resize to 1024, slicing, the
Vicuna v1 prompt with `<image>\\n` before the task's question (lmms-eval's default post-prompts are the authors'),
and, with `protocol=authors` (the default), the decoding their benchmark scripts set (`AUTHORS_PROTOCOL`).
`protocol=task` decodes with the task's own `generation_kwargs` instead. Batches are left-padded; the batch size
does not change answers.
"""

import json
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from .default_model import default_model_path
from .image_processing_llava_uhd import NO_PRE_RESIZE

MODEL_ID = "llava_uhd"


def manifest():
    """lmms-eval's registration of this model (the package's `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # imported late: lmms_eval.models loads the entry points

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaUhd")


@dataclass(frozen=True)
class Decoding:
    """One benchmark's settings in the authors' scripts (`scripts/v1_5/eval/*.sh`, all at temperature 0)."""

    num_beams: int
    max_new_tokens: int
    pre_resize: bool = True  # `resize_image_keep_ratio(image, 1024)` before slicing


# By lmms-eval task name (a task or its variants, `name_*`). VQA-style sets run `model_vqa_loader` (128 new tokens),
# ScienceQA `model_vqa_science` and MMBench `model_vqa_mmbench` (1024 new tokens; MMBench's images are not
# pre-resized).
AUTHORS_PROTOCOL = {
    "vqav2": Decoding(num_beams=3, max_new_tokens=128),
    "gqa": Decoding(num_beams=3, max_new_tokens=128),
    "textvqa": Decoding(num_beams=3, max_new_tokens=128),
    "vizwiz_vqa": Decoding(num_beams=3, max_new_tokens=128),
    "scienceqa": Decoding(num_beams=3, max_new_tokens=1024),
    "mme": Decoding(num_beams=5, max_new_tokens=128),
    "pope": Decoding(num_beams=1, max_new_tokens=128),
    "mmbench": Decoding(num_beams=1, max_new_tokens=1024, pre_resize=False),
}
PROTOCOLS = ("authors", "task")
DEFAULT_MAX_NEW_TOKENS = 128  # `model_vqa_loader`'s, for tasks that name none


def authors_decoding(task: str) -> Decoding | None:
    """The authors' settings for lmms-eval task `task` (`None`: a benchmark their scripts do not cover)."""
    for name, decoding in AUTHORS_PROTOCOL.items():
        if task == name or task.startswith(name + "_"):
            return decoding
    return None


class LlavaUhd(lmms):
    """lmms-eval model for LLaVA-UHD checkpoints (`LlavaUhdForConditionalGeneration`).

    Args:
        pretrained: a model folder or Hub repo; `None` is the package's offline default model.
        protocol: `"authors"` decodes as the authors' benchmark scripts did for the benchmarks they ran
            (`AUTHORS_PROTOCOL`; other tasks as `"task"`); `"task"` uses each task's `generation_kwargs`.
        max_image_size: the long-side pre-resize (`"none"` or 0: off); defaults to the checkpoint's processor's
            (1024, the authors' value).
        max_slice_nums: most slices per image; defaults to the checkpoint's processor's (7).
        batch_size: samples generated together (left-padded).
        device, dtype, revision, trust_remote_code: passed to `from_pretrained` (`device` defaults to CUDA when
            there is one; `dtype` `"auto"` keeps the checkpoint's).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        protocol: str = "authors",
        max_image_size: int | str | None = None,
        max_slice_nums: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes it for `batch_size=auto`, which is refused
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"llava_uhd: unknown model_args {sorted(kwargs)}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"llava_uhd: protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("llava_uhd: batch_size must be a number (`auto` is not supported)")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"llava_uhd: batch_size must be at least 1, got {batch_size}")
        self.protocol = protocol
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = str(default_model_path()) if pretrained is None else pretrained
        options = {"revision": revision, "trust_remote_code": trust_remote_code}
        self._model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **options).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(path, padding_side="left", **options)
        if isinstance(max_image_size, str) and max_image_size.lower() == "none":
            max_image_size = NO_PRE_RESIZE
        self.max_image_size = max_image_size  # `None`: the processor's own
        self.max_slice_nums = max_slice_nums

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def prompt(self, question: str, num_images: int) -> str:
        """The Vicuna v1 prompt of the authors' evaluation: `<image>\\n` per image (none for a text-only sample, as
        ScienceQA's), then the task's question."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def settings(self, task: str, gen_kwargs: dict) -> tuple[dict, int | None, list[str]]:
        """`generate` keywords, the pre-resize (`None`: the processor's) and the stop strings for a request of `task`
        with the task's `gen_kwargs`."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        decoding = authors_decoding(task) if self.protocol == "authors" else None
        if decoding is not None:
            generate = {"do_sample": False, "num_beams": decoding.num_beams, "max_new_tokens": decoding.max_new_tokens}
            return generate, self.max_image_size if decoding.pre_resize else NO_PRE_RESIZE, until
        temperature = float(gen_kwargs.get("temperature") or 0)
        generate = {
            "do_sample": temperature > 0,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        }
        if temperature > 0:
            generate.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        return generate, self.max_image_size, until

    def build_inputs(self, requests: list[Instance]) -> tuple[dict, dict, list[str]]:
        """Model inputs (left-padded) for requests of one task with the same `gen_kwargs`, the `generate` keywords
        and the stop strings."""
        _, gen_kwargs, _, _, task, _ = requests[0].args
        generate, max_image_size, until = self.settings(task, gen_kwargs)
        prompts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            prompts.append(self.prompt(context, len(visuals)))
            images += visuals
        inputs = self.processor(
            images=images or None,
            text=prompts,
            padding=True,
            max_image_size=max_image_size,
            max_slice_nums=self.max_slice_nums,
            apply_exif_orientation=False,  # the pixels as stored, as the authors' `Image.open` read them
            return_tensors="pt",
        )
        return inputs.to(self._device), generate, until

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups = {}  # (task, generation kwargs) -> request indices, in order: a batch shares its decoding
        for index, request in enumerate(requests):
            key = (request.args[4], json.dumps(request.args[1], sort_keys=True, default=str))
            groups.setdefault(key, []).append(index)
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_uhd")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                inputs, generate, until = self.build_inputs([requests[i] for i in batch])
                output = self._model.generate(**inputs, **generate)
                texts = self.processor.batch_decode(
                    output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for index, text in zip(batch, texts, strict=True):
                    for stop in until:
                        text = text.split(stop)[0]
                    answers[index] = text.strip()
                    self.cache_hook.add_partial("generate_until", requests[index].args[:2], answers[index])
                progress.update(len(batch))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "llava_uhd generates answers (generate_until); loglikelihood tasks are not supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llava_uhd answers single-round tasks (generate_until)")


__all__ = ["AUTHORS_PROTOCOL", "Decoding", "LlavaUhd", "authors_decoding", "manifest"]
