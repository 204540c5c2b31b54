"""The training recipes (`training.sft`) end to end with TRL's `SFTTrainer` on tiny models and generated data (CPU)."""

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from llava_data import save_text_model, write_llava_dataset
from peft import PeftModel
from safetensors.torch import load_file

from modeling_llava_uhd import LlavaUhdForConditionalGeneration
from training.model import COMPONENTS, component_of, load_model
from training.sft import build_trainer, main, parse_args, quantization_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
CLIP = ROOT / "tests" / "fixtures" / "original" / "clip"  # a full (tiny) CLIPModel checkpoint, like OpenAI's
# The recipes as they are, on a CPU: float32, no TF32, no data-loader workers, a step logged every step.
CPU = [
    "--use_cpu",
    "true",
    "--bf16",
    "false",
    "--tf32",
    "false",
    "--dtype",
    "float32",
    "--dataloader_num_workers",
    "0",
]
CPU += ["--logging_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    data_path, images = write_llava_dataset(tmp_path_factory.mktemp("data"))
    return ["--data_path", str(data_path), "--image_folder", str(images)]


def run(config: str, output_dir: Path, *args: str) -> tuple:
    """`training.sft.main` on a recipe; returns the trainer and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = main(["--config", str(CONFIGS / config), "--output_dir", str(output_dir), *CPU, *args])
    return trainer, printed.getvalue()


def losses(trainer) -> dict[int, float]:
    """The training loss logged at each step."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def components(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if component_of(key) == name}


def printed_counts(printed: str) -> dict[str, tuple[int, int]]:
    """The trainable and total parameters per component, from the table `main` prints."""
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] and line.split()[0] in COMPONENTS]
    return {name: (int(trainable.replace(",", "")), int(total.replace(",", ""))) for name, trainable, total in rows}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data) -> SimpleNamespace:
    """Stage 1 from a CLIP checkpoint and an LLM checkpoint, with the weights before and after training."""
    root = tmp_path_factory.mktemp("stage1")
    text_model = save_text_model(root / "llm", vocab_size=384)  # fewer rows than tokens: the embeddings grow
    argv = ["--config", str(CONFIGS / "stage1_pretrain.yaml"), "--output_dir", str(root / "out"), *CPU, *data]
    argv += ["--vision_model", str(CLIP), "--text_model", str(text_model), "--num_queries", "16", "--max_steps", "12"]
    trainer = build_trainer(*parse_args(argv))
    before = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    trainer.train()
    trainer.save_model()
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    return SimpleNamespace(
        output_dir=root / "out", before=before, after=trainer.model.state_dict(), trainable=trainable
    )


@pytest.mark.slow
def test_stage1_builds_a_fresh_model_and_trains_only_the_resampler(stage1):
    resampler = {key for key in stage1.before if component_of(key) == "resampler"}
    assert stage1.trainable == resampler - {"model.resampler.pos_embed"}  # the sin-cos table is a fixed buffer
    changed = {key for key, value in stage1.before.items() if not torch.equal(value, stage1.after[key])}
    assert changed == stage1.trainable

    model = LlavaUhdForConditionalGeneration.from_pretrained(stage1.output_dir)
    assert model.config.image_token_id == 4 and model.config.num_queries == 16
    assert model.config.text_config.vocab_size == 448  # 400 tokens rounded up to a multiple of 64
    clip = load_file(CLIP / "model.safetensors")
    for key, value in components(model.state_dict(), "vision_tower").items():
        assert torch.equal(value, clip[key.replace("model.vision_tower.", "vision_model.")]), key
    assert (stage1.output_dir / "processor_config.json").is_file()
    assert (stage1.output_dir / "modeling_llava_uhd.py").is_file()  # the remote code travels with the model


@pytest.mark.slow
def test_stage2_from_stage1_learns_with_the_vit_frozen(tmp_path, data, stage1):
    trainer, printed = run(
        "stage2_finetune.yaml",
        tmp_path,
        *data,
        "--model_name_or_path",
        str(stage1.output_dir),
        "--max_steps",
        "30",
        "--learning_rate",
        "1e-3",
    )
    counts = printed_counts(printed)
    assert counts["vision_tower"][0] == 0
    assert all(counts[name][0] == counts[name][1] > 0 for name in ("resampler", "language_model", "lm_head"))
    history = list(losses(trainer).values())
    assert len(history) == 30 and sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5, history
    start = LlavaUhdForConditionalGeneration.from_pretrained(stage1.output_dir).state_dict()
    end = LlavaUhdForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    for key, value in components(start, "vision_tower").items():
        assert torch.equal(value, end[key]), key
    assert not torch.equal(start["lm_head.weight"], end["lm_head.weight"])


def lora_from(stage1, steps: int) -> list[str]:
    """The arguments of a short LoRA run (small rank, high learning rate) on stage 1's output."""
    return ["--model_name_or_path", str(stage1.output_dir), "--max_steps", str(steps), "--gradient_accumulation_steps",
            "1", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-3"]  # fmt: skip


@pytest.mark.slow
def test_lora_adapter_reloads_and_merges_to_the_same_logits(tmp_path, data, stage1):
    trainer, printed = run(
        "stage2_lora.yaml",
        tmp_path,
        *data,
        *lora_from(stage1, steps=8),
    )
    counts = printed_counts(printed)
    assert counts["vision_tower"][0] == counts["lm_head"][0] == 0
    assert 0 < counts["language_model"][0] < counts["language_model"][1] and counts["resampler"][0] > 0
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {component_of(key) for key in saved} == {"language_model", "resampler"}
    assert all("lora_" in key for key in saved if component_of(key) == "language_model")

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    trained = trainer.model.eval()
    base = LlavaUhdForConditionalGeneration.from_pretrained(stage1.output_dir).eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)
        reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, LlavaUhdForConditionalGeneration)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_exactly(tmp_path, data, stage1):
    common = ["--model_name_or_path", str(stage1.output_dir), "--max_steps", "4", "--learning_rate", "1e-3", *data]
    saving = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2"]
    straight, _ = run("stage2_finetune.yaml", tmp_path / "a", *common, *saving)
    resumed, _ = run(
        "stage2_finetune.yaml",
        tmp_path / "b",
        *common,
        "--resume_from_checkpoint",
        str(tmp_path / "a" / "checkpoint-2"),
    )
    assert losses(resumed)[3] == losses(straight)[3] and losses(resumed)[4] == losses(straight)[4]


def test_qlora_without_bitsandbytes_says_what_to_install(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable
    with pytest.raises(RuntimeError, match=r"bitsandbytes, which is not installed: `pip install \"llava-uhd\[quant\]\"`"):
        run("stage2_qlora.yaml", tmp_path, *data, "--model_name_or_path", str(tmp_path))


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_the_adapter_reloads(tmp_path, data, stage1):
    """The QLoRA recipe on a CPU (bitsandbytes' CPU backend): the LLM's linear layers in 4-bit, the ViT, the resampler
    and the LM head not; the loss goes down; the saved adapter reloads onto the 4-bit model to the same logits."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    trainer, _ = run(
        "stage2_qlora.yaml",
        tmp_path,
        *data,
        *lora_from(stage1, steps=12),
        "--dtype",
        "bfloat16",  # the recipe's: TRL casts QLoRA's trainable parameters (LoRA, the resampler) to bfloat16
    )
    quantized = {component_of(name) for name, module in trainer.model.named_modules() if isinstance(module, Linear4bit)}
    assert quantized == {"language_model"}
    history = list(losses(trainer).values())
    assert len(history) == 12 and sum(history[-3:]) < sum(history[:3]), history

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits
        _, _, recipe = parse_args(["--config", str(CONFIGS / "stage2_qlora.yaml"), *CPU, "--dtype", "bfloat16"])
        quantization = quantization_config(recipe)
        base, _ = load_model(
            str(stage1.output_dir), quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
        )
        reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
        drift = (reloaded(**inputs).logits - expected).abs().max()
        with reloaded.disable_adapter():
            effect = (reloaded(**inputs).logits - expected).abs().max()
    assert drift < 1e-2 and effect > 10 * drift, (drift, effect)  # bfloat16 rounding; the adapter's own effect


def test_recipes_give_the_paper_hyperparameters_on_8_gpus():
    recipes = {path.stem: yaml.safe_load(path.read_text()) for path in CONFIGS.glob("stage*.yaml")}
    assert sorted(recipes) == ["stage1_pretrain", "stage2_finetune", "stage2_lora", "stage2_qlora"]

    def global_batch(recipe, gpus):
        return recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * gpus

    stage1, stage2 = recipes["stage1_pretrain"], recipes["stage2_finetune"]
    assert global_batch(stage1, 8) == 256 and global_batch(stage2, 8) == 128
    assert global_batch(recipes["stage2_lora"], 1) == global_batch(recipes["stage2_qlora"], 1) == 128
    assert (stage1["learning_rate"], stage2["learning_rate"]) == (1e-3, 2e-5)
    assert stage1["train_components"] == ["resampler"] and stage1["max_slice_nums"] == 1
    assert stage1["chat_format"] == "plain" and stage2["chat_format"] == "chat"
    assert sorted(stage2["train_components"]) == ["language_model", "lm_head", "resampler"]
    assert stage2["max_length"] == 2048 and recipes["stage2_qlora"]["load_in_4bit"]
    for recipe in recipes.values():
        assert recipe["num_train_epochs"] == 1 and recipe["lr_scheduler_type"] == "cosine"
        assert recipe["warmup_steps"] == 0.03 and recipe["assistant_only_loss"]
        assert recipe["bf16"] and recipe["tf32"] and recipe["gradient_checkpointing"]
    for name in ("zero2", "zero3", "fsdp"):
        launch = ClusterConfig.from_yaml_file(ROOT / "training" / "accelerate" / f"{name}.yaml")
        assert launch.num_processes == 8 and launch.mixed_precision == "bf16"
        if name != "fsdp":
            assert launch.deepspeed_config["zero_stage"] == int(name[-1])
    assert "LlavaUhdResampler" in launch.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]


@pytest.mark.slow
def test_accelerate_launch_trains_on_two_processes(tmp_path, data, stage1):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_CPU",
        "mixed_precision": "no",
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "use_cpu": True,
    }
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(launch))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "launch.yaml")]
    command += ["-m", "training.sft", "--config", str(CONFIGS / "stage2_finetune.yaml"), *CPU, *data]
    command += [
        "--model_name_or_path",
        str(stage1.output_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "3",
    ]
    command += ["--per_device_train_batch_size", "2"]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("vision_tower") == 1  # the counts are printed by the main process only
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # One step of 2 processes x 2 rows is 4 of the 14 rows: 0.2857 epoch.
    assert "'epoch': '0.2857'" in result.stdout + result.stderr
