"""Supervised fine-tuning of LLaVA-UHD with TRL's `SFTTrainer`: both training stages of the paper, LoRA and QLoRA.

    python -m training.sft --config training/configs/stage2_finetune.yaml [--any_field value ...]
    accelerate launch --config_file training/accelerate/zero2.yaml -m training.sft --config ...

Fields come from three dataclasses: `LlavaUhdArguments` below (model assembly, data, freezing), TRL's `SFTConfig`
(every `TrainingArguments` field, `max_length`, `assistant_only_loss`, ...) and TRL's `ModelConfig`
(`model_name_or_path`, `dtype`, `attn_implementation`, `use_peft`, `lora_*`, `load_in_4bit`, ...). Command-line
values override the YAML file's.
"""

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from datasets import Dataset
from transformers import BitsAndBytesConfig
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from modeling_llava_uhd.image_processing_llava_uhd import NO_PRE_RESIZE
from processing import load_llava_dataset, load_messages_dataset, make_collator

from .model import build_model, format_parameter_counts, load_model, parameter_counts, set_trainable


@dataclass
class LlavaUhdArguments:
    """What the LLaVA-UHD recipes add to TRL's `SFTConfig` and `ModelConfig`."""

    vision_model: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint of a fresh model (stage 1), e.g. openai/clip-vit-large-patch14-336."},
    )
    text_model: str | None = field(
        default=None, metadata={"help": "Causal LM checkpoint of a fresh model (stage 1), e.g. lmsys/vicuna-13b-v1.5."}
    )
    projector_type: Literal["spatial_resampler", "resampler"] = field(
        default="spatial_resampler", metadata={"help": "Compression module of a fresh model."}
    )
    num_queries: int | None = field(default=None, metadata={"help": "Tokens per crop of a fresh model."})
    train_components: list[str] = field(
        default_factory=lambda: ["resampler"],
        metadata={
            "help": "Components that train, the others are frozen: vision_tower, resampler, language_model, lm_head. "
            "Ignored with `use_peft`, where LoRA's targets and `lora_modules_to_save` decide."
        },
    )
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON list or JSONL file."})
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "Folder the `image` paths of `data_path` are in; a path that leaves it (`..`, absolute) is a bad "
            "row. Without it, paths are used as given (relative to the current directory)."
        },
    )
    allow_paths_outside_image_folder: bool = field(
        default=False,
        metadata={"help": "Accept `image` paths of `data_path` that leave `image_folder` (`..`, absolute paths)."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub or local `datasets` dataset in messages form (instead of `data_path`)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name`."})
    on_bad_row: Literal["skip", "error"] = field(
        default="skip",
        metadata={
            "help": "Malformed rows, rows with missing or unreadable images, that cannot be collated or that keep no "
            "supervised token (answer cut off by `max_length`): skip them (counted warnings; at batch time a random "
            "usable row takes the place) or stop with an error naming the row."
        },
    )
    chat_format: Literal["plain", "chat"] = field(
        default="chat",
        metadata={"help": "'plain': <image>caption\\n (stage 1); 'chat': the processor's Vicuna v1 template."},
    )
    max_slice_nums: int | None = field(
        default=None, metadata={"help": "Most slices per training image; 1 gives the overview only (stage 1)."}
    )
    max_image_size: int = field(
        default=NO_PRE_RESIZE,
        metadata={"help": "Long side training images are resized to before slicing; 0 (the reference) keeps them."},
    )


def load_training_dataset(args: LlavaUhdArguments) -> Dataset:
    if (args.data_path is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of `data_path` (LLaVA-format JSON/JSONL) and `dataset_name`.")
    if args.data_path is not None:
        return load_llava_dataset(
            args.data_path,
            args.image_folder,
            on_bad_row=args.on_bad_row,
            allow_paths_outside_image_folder=args.allow_paths_outside_image_folder,
        )
    return load_messages_dataset(args.dataset_name, split=args.dataset_split)


def quantization_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for QLoRA (`load_in_4bit`) or 8-bit LoRA, or `None`. The model keeps its vision tower,
    resampler and LM head unquantized by itself (`LlavaUhdPreTrainedModel._keep_in_fp32_modules`)."""
    config = get_quantization_config(model_args)
    if config is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            "QLoRA (`load_in_4bit` / `load_in_8bit`) quantizes the LLM with bitsandbytes, which is not installed: "
            '`pip install "llava-uhd[quant]"` (bitsandbytes >= 0.46.1 trains on CPU and CUDA). Without it, train LoRA '
            "on the unquantized model: `--config training/configs/stage2_lora.yaml`."
        )
    return config


def build_trainer(args: LlavaUhdArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    """The model (fresh or loaded, frozen as asked), the data and the collator of a stage, in TRL's `SFTTrainer`."""
    load_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation}
    if args.vision_model or args.text_model:
        if not (args.vision_model and args.text_model) or model_args.model_name_or_path:
            raise ValueError("Give `vision_model` and `text_model` (a fresh model) or `model_name_or_path`, not both.")
        if model_args.load_in_4bit or model_args.load_in_8bit:
            raise ValueError("QLoRA fine-tunes a saved model (`model_name_or_path`), not a fresh one.")
        model, processor = build_model(
            args.vision_model, args.text_model, args.projector_type, args.num_queries, **load_kwargs
        )
    elif model_args.model_name_or_path:
        quantization = quantization_config(model_args)
        if quantization is not None:
            load_kwargs |= {
                "quantization_config": quantization,
                "device_map": {"": training_args.device},
            }
        model, processor = load_model(model_args.model_name_or_path, **load_kwargs)
    else:
        raise ValueError("Give `model_name_or_path`, or `vision_model` and `text_model` for a fresh model.")
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        set_trainable(model, args.train_components)

    dataset = load_training_dataset(args)
    collator = make_collator(
        processor,
        chat_format=args.chat_format,
        max_length=training_args.max_length,
        max_slice_nums=args.max_slice_nums,
        max_image_size=args.max_image_size,
        assistant_only_loss=training_args.assistant_only_loss,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
        dataset=dataset,
        on_bad_row=args.on_bad_row,
        seed=training_args.seed,
    )
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=peft_config,
    )


def parse_args(argv: list[str] | None = None) -> tuple[LlavaUhdArguments, SFTConfig, ModelConfig]:
    return TrlParser((LlavaUhdArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> SFTTrainer:
    args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(args, training_args, model_args)
    if trainer.accelerator.is_main_process:
        print(format_parameter_counts(parameter_counts(trainer.model)), flush=True)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
