"""Quantized inference in transformers on the default model (its language model's widths are multiples of every
scheme's block): each `quantization_config` loads with the vision tower, the resampler and `lm_head` unquantized
(`LlavaUhdPreTrainedModel._keep_in_fp32_modules`) and answers as the unquantized model; `python -m
conversion.quantize` writes compressed-tensors checkpoints that transformers loads, and refuses bad input in one line
without writing a file.

Each scheme is skipped where its package is missing (bitsandbytes and compressed-tensors: `pip install -e ".[quant]"`;
torchao >= 0.18 apart, see docs/quantization.md); torchao's int4 weight-only kernels need CUDA.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_model, make_processor
from torch import nn
from transformers import AutoModelForImageTextToText

from benchmarks.quantization import CHECKPOINT_SCHEMES, CUDA_ONLY, QUANTIZATION_CONFIGS
from conversion.output import converted_files
from conversion.quantize import IGNORE
from conversion.quantize import main as quantize_main
from modeling_llava_uhd import LlavaUhdPreTrainedModel, default_model_path
from training.default_model import predict

PACKAGES = {"bnb": "bitsandbytes", "torchao": "torchao", "compressed": "compressed_tensors"}
COMPONENTS = ("vision_tower", "resampler", "lm_head", "language_model")
AGREEMENT_IMAGES = 24  # fine-detail test images whose answers are compared (slow tier)


def needs(scheme: str):
    """Skip unless `scheme`'s package is installed (and CUDA, for the schemes that need it)."""
    package = PACKAGES[scheme.split("-")[0]]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    if scheme in CUDA_ONLY and not torch.cuda.is_available():
        pytest.skip(f"{scheme} needs CUDA")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return default_model_path(tmp_path_factory.mktemp("cache"))


def component(name: str) -> str:
    return next(part for part in COMPONENTS if part in name.split("."))


def linear_kinds(model: nn.Module) -> dict[str, set[str]]:
    """`{component: kinds of its linear layers}`: "plain" (an `nn.Linear` holding a float `nn.Parameter`, no
    compressed-tensors scheme) or the layer's and weight's class names."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module._parameters.get("weight")
            plain = type(module) is nn.Linear and type(weight) is nn.Parameter and weight.is_floating_point()
            plain = plain and getattr(module, "quantization_scheme", None) is None
            kind = "plain" if plain else f"{type(module).__name__}/{type(weight).__name__}"
            kinds.setdefault(component(name), set()).add(kind)
    return kinds


def assert_only_the_language_model_is_quantized(model: nn.Module) -> None:
    kinds = linear_kinds(model)
    assert kinds["vision_tower"] == kinds["resampler"] == kinds["lm_head"] == {"plain"}, kinds
    assert "plain" not in kinds["language_model"], kinds


@pytest.mark.parametrize("scheme", list(QUANTIZATION_CONFIGS))
def test_every_scheme_loads_with_tower_resampler_and_lm_head_unquantized(scheme, folder):
    """The issue's report: NF4 failed in the 96-wide vision tower, 8-bit quantized the tower and the resampler."""
    needs(scheme)
    config = QUANTIZATION_CONFIGS[scheme](torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config).eval()
    assert_only_the_language_model_is_quantized(model)
    assert predict(folder, 2, quantization_config=config) == predict(folder, 2)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(QUANTIZATION_CONFIGS))
def test_greedy_answers_agree_with_the_unquantized_model(scheme, folder):
    needs(scheme)
    quantized = predict(folder, AGREEMENT_IMAGES, quantization_config=QUANTIZATION_CONFIGS[scheme](torch.float32))
    same = sum(a == b for a, b in zip(quantized, predict(folder, AGREEMENT_IMAGES)))
    assert same == AGREEMENT_IMAGES, f"{same}/{AGREEMENT_IMAGES}"


def test_a_skip_list_of_your_own_adds_to_the_default(folder):
    """Modules a user lists stay unquantized beside the tower and the resampler; a list of one's own replaces
    transformers' `lm_head` default, so it names `lm_head` when it should stay."""
    needs("bnb-int8")
    from transformers import BitsAndBytesConfig

    keep = ["model.language_model.layers.0", "lm_head"]
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config)
    kinds = linear_kinds(model)
    assert kinds["vision_tower"] == kinds["resampler"] == kinds["lm_head"] == {"plain"}, kinds
    layers = model.model.language_model.layers
    kinds = [
        {type(module).__name__ for module in layer.modules() if isinstance(module, nn.Linear)} for layer in layers
    ]
    assert kinds == [{"Linear"}, {"Linear8bitLt"}]


def test_clearing_the_default_quantizes_the_tower_too(folder, monkeypatch):
    needs("bnb-int8")
    from transformers import BitsAndBytesConfig

    monkeypatch.setattr(LlavaUhdPreTrainedModel, "_keep_in_fp32_modules", None)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    kinds = linear_kinds(model)
    assert "plain" not in kinds["vision_tower"] and "plain" not in kinds["resampler"], kinds


def test_float16_keeps_the_tower_and_resampler_in_float32(folder):
    """`_keep_in_fp32_modules`' other meaning: loaded in float16, the tower and the resampler stay float32, and the
    model answers as in float32."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float16)
    dtypes = {component(name): parameter.dtype for name, parameter in model.named_parameters()}
    assert dtypes == {
        "vision_tower": torch.float32, "resampler": torch.float32, "language_model": torch.float16,
        "lm_head": torch.float16,
    }  # fmt: skip
    assert predict(folder, 2, dtype=torch.float16) == predict(folder, 2)


# `python -m conversion.quantize`: compressed-tensors checkpoints.


@pytest.fixture(scope="module", params=CHECKPOINT_SCHEMES)
def checkpoint(request, folder, tmp_path_factory) -> tuple[str, Path]:
    needs("compressed-tensors")
    output = tmp_path_factory.mktemp(request.param) / "quantized"
    assert quantize_main([str(folder), "--scheme", request.param, "--output", str(output)]) == 0
    return request.param, output


def test_quantize_writes_the_language_model_quantized_and_transformers_loads_it(checkpoint, folder):
    scheme, output = checkpoint
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == IGNORE
    assert config["format"] == {"w8a8-int8": "int-quantized", "w4a16": "pack-quantized"}[scheme]
    assert sorted(converted_files(output)) == sorted(path.name for path in output.iterdir())  # all in its manifest
    source, written = load_file(folder / "model.safetensors"), load_file(output / "model.safetensors")
    for name, tensor in source.items():  # everything but the language model's linear layers as it was
        if component(name) != "language_model" or "_proj" not in name:
            assert torch.equal(written[name], tensor), name
    codes = {
        name: tensor.dtype
        for name, tensor in written.items()
        if component(name) == "language_model" and name.endswith(("_proj.weight", "_proj.weight_packed"))
    }
    assert set(codes.values()) == {torch.int8 if scheme == "w8a8-int8" else torch.int32}, codes

    model = AutoModelForImageTextToText.from_pretrained(output)
    assert_only_the_language_model_is_quantized(model)
    assert predict(output, 2) == predict(folder, 2)


@pytest.mark.slow
def test_quantized_checkpoints_answer_as_the_unquantized_model(checkpoint, folder):
    same = sum(a == b for a, b in zip(predict(checkpoint[1], AGREEMENT_IMAGES), predict(folder, AGREEMENT_IMAGES)))
    assert same == AGREEMENT_IMAGES, f"{same}/{AGREEMENT_IMAGES}"


def listing(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def bad_inputs(folder: Path, tmp: Path, quantized: Path) -> dict[str, tuple[list[str], str]]:
    """`{case: (arguments, what the one line says)}`."""
    narrow = tmp / "narrow"  # tests/tiny.py's widths (64) are no multiple of W4A16's group of 128
    make_model().save_pretrained(narrow)
    make_processor().save_pretrained(narrow)
    no_cuda = "cuda" if not torch.cuda.is_available() else "nosuchdevice"
    return {
        "already quantized": ([str(quantized), "--scheme", "w8a8-int8", "--output", str(tmp / "out")],
                              "is already quantized (compressed-tensors)"),
        "unknown scheme": ([str(folder), "--scheme", "w3a5", "--output", str(tmp / "out")],
                           "--scheme 'w3a5' is unknown; choose one of w8a8-int8, w4a16"),
        "device cannot run it": ([str(folder), "--scheme", "w4a16", "--output", str(tmp / "out"), "--device", no_cuda],
                                 f"--device '{no_cuda}' cannot run this scheme's quantization"),
        "output is the source": ([str(folder), "--scheme", "w8a8-int8", "--output", str(folder)],
                                 f"is the FOLDER folder {folder}; choose a separate folder"),
        "output inside the source": ([str(folder), "--scheme", "w8a8-int8", "--output", str(folder / "q")],
                                     "lies inside the FOLDER folder"),
        "widths the scheme cannot group": ([str(narrow), "--scheme", "w4a16", "--output", str(tmp / "out")],
                                           "has 64 inputs, not a multiple of this scheme's group of 128"),
        "not a LLaVA-UHD folder": ([str(tmp / "llama"), "--scheme", "w8a8-int8", "--output", str(tmp / "out")],
                                   "holds a 'llama' model, not 'llava_uhd'"),
        "no such folder": ([str(tmp / "missing"), "--scheme", "w8a8-int8", "--output", str(tmp / "out")],
                           "no such folder"),
    }  # fmt: skip


def test_bad_input_is_refused_in_one_line_and_writes_nothing(folder, tmp_path, capsys):
    """8 bad inputs: each exits 1 with one line on stderr naming the problem, and no file appears or changes (the
    default model's folder, the quantized folder, the output's parent)."""
    needs("compressed-tensors")
    quantized = tmp_path / "quantized"
    assert quantize_main([str(folder), "--scheme", "w8a8-int8", "--output", str(quantized)]) == 0
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = bad_inputs(folder, tmp_path, quantized)
    capsys.readouterr()
    for case, (arguments, message) in cases.items():
        before = listing(tmp_path), listing(folder)
        assert quantize_main(arguments) == 1, case
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("quantization failed: ") and message in error, (case, error)
        assert (listing(tmp_path), listing(folder)) == before, case


def test_an_earlier_quantization_is_replaced_only_with_overwrite(folder, tmp_path, capsys):
    needs("compressed-tensors")
    output = tmp_path / "quantized"
    arguments = [str(folder), "--scheme", "w8a8-int8", "--output", str(output)]
    assert quantize_main(arguments) == 0
    first = listing(output)
    assert quantize_main(arguments) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert quantize_main([*arguments[:2], "w4a16", *arguments[3:], "--overwrite"]) == 0
    assert listing(output) != first
    assert json.loads((output / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized"]  # no staging folder left beside it
