"""`llava-uhd` refuses what it should: a model's own code without `--trust-remote-code`, and every bad input, each
in one line on stderr with a non-zero exit, before any model loads; `--debug` shows the traceback instead."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from modeling_llava_uhd import cli, default_model_path
from modeling_llava_uhd import BUNDLE_FILES
from processing.detail_task import make_sample

ROOT = Path(__file__).resolve().parents[1]
DETAIL = ROOT / "examples" / "detail.png"
DETAIL_INDEX = 7  # examples/detail.png is test image 7 of the fine-detail task


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of `width` x `height`: 20000 x 20000 (400M pixels) is about 50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte "none", then the packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m modeling_llava_uhd.cli ARGS` in a fresh process; offline, with caches under `tmp_path`."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # where transformers would copy a model's own code
        "LLAVA_UHD_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "modeling_llava_uhd.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False,
    )  # fmt: skip


def assert_one_line_failure(returncode: int, stderr: str, *fragments: str) -> str:
    lines = stderr.splitlines()
    assert returncode != 0, stderr
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def code_folder(folder: Path, marker: Path) -> Path:
    """A model folder that is not LLaVA-UHD and names its own code (`auto_map`); importing it writes `marker`."""
    folder.mkdir()
    auto_map = {"AutoConfig": "payload.PayloadConfig", "AutoModelForImageTextToText": "payload.PayloadModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "payload", "auto_map": auto_map}))
    (folder / "payload.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return folder


def test_a_folders_own_code_runs_only_with_trust_remote_code(tmp_path):
    """2 bad inputs: a folder with `auto_map` code, without the flag (refused, code not run) and with it (code runs,
    as the user allowed; the payload is no model, so that also ends in one line)."""
    marker = tmp_path / "marker"
    folder = code_folder(tmp_path / "payload-model", marker)
    common = ("chat", "--model", str(folder), "--image", str(DETAIL), "--prompt", "What is it?")

    refused = run_cli(*common, tmp_path=tmp_path)
    assert_one_line_failure(refused.returncode, refused.stderr, "--trust-remote-code", "auto_map", "'payload'")
    assert not marker.exists()

    trusted = run_cli(*common, "--trust-remote-code", tmp_path=tmp_path)
    assert marker.read_text() == "ran"
    assert_one_line_failure(trusted.returncode, trusted.stderr, "llava-uhd chat: error:")


def test_a_llava_uhd_folder_loads_with_the_installed_classes_not_its_own_files(tmp_path):
    """A copy of the default model whose `.py` files write a marker: answered without the flag, marker never written
    (transformers 5 also prefers the installed classes; this guards the path that now loads them directly)."""
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(tmp_path / "source"), folder)
    marker = tmp_path / "marker"
    for name in BUNDLE_FILES:
        with open(folder / name, "a") as code:
            code.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n")
    sample = make_sample("test", DETAIL_INDEX)
    result = run_cli("chat", "--model", str(folder), "--image", str(DETAIL), "--prompt", sample.question,
                     tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == sample.answer
    assert not marker.exists()
    assert not (tmp_path / "hf-modules").exists()


def test_a_decompression_bomb_fails_in_one_line_in_a_real_process(tmp_path):
    """1 bad input through the real entry point: an image over Pillow's limit, where Pillow only warns (a real
    process prints warnings; pytest would catch them), ends in one line and exit 1. The in-process cases below
    cover the rest."""
    big = bilevel_png(tmp_path / "big.png", 10000, 10000)
    result = run_cli("slices", str(big), tmp_path=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_failure(result.returncode, result.stderr, "100,000,000 pixels", "decompression bomb")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-files")
    data = DETAIL.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.png").write_bytes(b"this is not an image " * 8)
    bilevel_png(folder / "bomb.png", 20000, 20000)  # over twice the limit: Pillow raises
    bilevel_png(folder / "big.png", 10000, 10000)  # over the limit: Pillow only warns
    (folder / "folder.png").mkdir()
    (folder / "llama").mkdir()
    (folder / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "empty-model").mkdir()
    (folder / "bad-json").mkdir()
    (folder / "bad-json" / "config.json").write_text("{not json")
    return folder


D = str(DETAIL)
CHAT = ("chat", "--image", D, "--prompt", "What pattern fills the framed panel?")
BAD_INPUTS = {  # name: (arguments, {bad files} filled in, fragments of the one line)
    "slices --num-queries -5": (["slices", D, "--num-queries", "-5"], ["--num-queries", ">= 1", "-5"]),
    "slices --num-queries 0": (["slices", D, "--num-queries", "0"], ["--num-queries", ">= 1, got 0"]),
    "slices --num-queries x": (["slices", D, "--num-queries", "x"], ["--num-queries", "'x'"]),
    "slices --max-slices 0": (["slices", D, "--max-slices", "0"], ["--max-slices", ">= 1, got 0"]),
    "slices --max-slices -3": (["slices", D, "--max-slices", "-3"], ["--max-slices", ">= 1, got -3"]),
    "slices --max-image-size 0": (["slices", D, "--max-image-size", "0"], ["--max-image-size", "'none'"]),
    "slices missing image": (["slices", "{}/missing.png"], ["missing.png", "does not exist"]),
    "slices folder as image": (["slices", "{}/folder.png"], ["folder.png", "is a folder"]),
    "slices corrupt image": (["slices", "{}/corrupt.png"], ["corrupt.png", "not an image file"]),
    "slices truncated image": (["slices", "{}/truncated.png"], ["truncated.png", "truncated"]),
    "slices bomb image": (["slices", "{}/bomb.png"], ["400,000,000 pixels", "decompression bomb"]),
    "slices big image": (["slices", "{}/big.png"], ["100,000,000 pixels", "decompression bomb"]),
    "no command": ([], ["llava-uhd: error:", "command"]),
    "chat --device foo": ([*CHAT, "--device", "foo"], ["--device 'foo'", "not a torch device"]),
    "chat --device meta": ([*CHAT, "--device", "meta"], ["--device meta"]),
    "chat --device cuda:99": ([*CHAT, "--device", "cuda:99"], ["--device cuda:99"]),
    "chat --dtype int8": ([*CHAT, "--dtype", "int8"], ["--dtype", "'int8'"]),
    "chat --max-new-tokens 0": ([*CHAT, "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1, got 0"]),
    "chat empty prompt": (["chat", "--image", D, "--prompt", "  "], ["--prompt is empty"]),
    "chat prompt with <image>": (["chat", "--image", D, "--prompt", "<image> what?"], ["image token '<image>'"]),
    "chat missing image": (["chat", "--image", "{}/missing.png", "--prompt", "What?"], ["does not exist"]),
    "chat corrupt image": (["chat", "--image", "{}/corrupt.png", "--prompt", "What?"], ["not an image file"]),
    "chat truncated image": (["chat", "--image", "{}/truncated.png", "--prompt", "What?"], ["truncated"]),
    "chat bomb image": (["chat", "--image", "{}/bomb.png", "--prompt", "What?"], ["decompression bomb"]),
    "chat non-LLaVA-UHD model": ([*CHAT, "--model", "{}/llama"], ["'llama'", "pass --trust-remote-code"]),
    "chat folder without config": ([*CHAT, "--model", "{}/empty-model"], ["without a config.json"]),
    "chat unreadable config": ([*CHAT, "--model", "{}/bad-json"], ["not readable JSON"]),
    "chat missing model folder": ([*CHAT, "--model", "./no/such/model"], ["'./no/such/model'", "no such folder"]),
}
if not torch.cuda.is_available():  # this torch build, or this machine, has no CUDA
    BAD_INPUTS["chat --device cuda"] = ([*CHAT, "--device", "cuda"], ["--device cuda", "CUDA is not available"])


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_in_one_line_before_the_model_loads(name, bad_files, tmp_path, monkeypatch, capfd):
    """28 bad inputs (29 where CUDA is unavailable): exit 2 (argument) or 1, one line on stderr naming the problem,
    nothing on stdout, and no model loaded."""
    arguments, fragments = BAD_INPUTS[name]
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(tmp_path))
    loaded = []
    monkeypatch.setattr(cli, "load_model", lambda *args: loaded.append(args), raising=False)
    code = cli.main([argument.replace("{}", str(bad_files)) for argument in arguments])
    captured = capfd.readouterr()
    assert code in (1, 2) and captured.out == ""
    assert_one_line_failure(code, captured.err, *fragments)
    assert loaded == []


def test_any_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch, capfd):
    """2 bad inputs (a missing image, an unexpected internal error): one line; with --debug (either place), raised."""
    missing = ["slices", "missing.png"]
    with pytest.raises(cli.CliError, match="does not exist"):
        cli.main([*missing, "--debug"])
    with pytest.raises(cli.CliError, match="does not exist"):
        cli.main(["--debug", *missing])

    def broken(layout, num_queries):
        raise RuntimeError("internal\nproblem")

    monkeypatch.setattr(cli, "image_token_cost", broken)
    capfd.readouterr()
    code = cli.main(["slices", D])
    line = assert_one_line_failure(code, capfd.readouterr().err, "RuntimeError: internal problem", "--debug")
    assert line.startswith("llava-uhd slices: error:")
    with pytest.raises(RuntimeError, match="internal"):
        cli.main(["slices", D, "--debug"])
