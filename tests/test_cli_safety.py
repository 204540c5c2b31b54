"""`llava-uhd` refuses what it should: a model's own code without `--trust-remote-code`, and every bad input, each
in one line on stderr with a non-zero exit, before any model loads; `--debug` shows the traceback instead."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

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


@pytest.mark.slow  # its own Python processes: several seconds each
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
    os.mkfifo(folder / "fifo.png")  # reading it waits for a writer forever
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "socket.png"))
    shutil.copy(DETAIL, folder / "photo.png")  # the user's photo: never written
    (folder / "link.png").symlink_to(folder / "photo.png")
    os.link(folder / "photo.png", folder / "hard.png")
    (folder / "existing.png").write_bytes(b"a file the user wrote")
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
    "slices FIFO image": (["slices", "{}/fifo.png"], ["fifo.png", "is a FIFO (named pipe), not an image file"]),
    "slices socket image": (["slices", "{}/socket.png"], ["socket.png", "is a socket or a device"]),
    "slices device image": (["slices", "/dev/zero"], ["'/dev/zero' is a character device, not an image file"]),
    "chat FIFO image": (["chat", "--image", "{}/fifo.png", "--prompt", "What?"], ["is a FIFO (named pipe)"]),
    "slices --out the input": (["slices", "{}/photo.png", "--out", "{}/photo.png"], ["is the input image"]),
    "slices --out the input, --overwrite": (
        ["slices", "{}/photo.png", "--out", "{}/photo.png", "--overwrite"], ["photo.png' is the input image"]
    ),
    "slices --out a symlink to the input": (
        ["slices", "{}/photo.png", "--out", "{}/link.png", "--overwrite"], ["link.png' is the input image"]
    ),
    "slices --out a hard link to the input": (
        ["slices", "{}/photo.png", "--out", "{}/hard.png", "--overwrite"], ["hard.png' is the input image"]
    ),
    "slices --out the input by another path": (
        ["slices", "{}/link.png", "--out", "{}/folder.png/../photo.png", "--overwrite"], ["is the input image"]
    ),
    "slices --out an existing file": (
        ["slices", D, "--out", "{}/existing.png"], ["existing.png' exists; pass --overwrite to replace it"]
    ),
    "slices --out without extension": (["slices", D, "--out", "{}/name"], ["an image file extension", "got none"]),
    "slices --out unknown extension": (["slices", D, "--out", "{}/a.xyz"], ["image file extension", "got '.xyz'"]),
    "slices --out a folder": (["slices", D, "--out", "{}/folder.png"], ["folder.png' is a folder; name the image"]),
    "slices --out in a missing folder": (["slices", D, "--out", "{}/no/a.png"], ["the folder", "does not exist"]),
    "slices --out a FIFO, --overwrite": (
        ["slices", D, "--out", "{}/fifo.png", "--overwrite"], ["fifo.png' is a FIFO (named pipe), not a file"]
    ),
}
if not torch.cuda.is_available():  # this torch build, or this machine, has no CUDA
    BAD_INPUTS["chat --device cuda"] = ([*CHAT, "--device", "cuda"], ["--device cuda", "CUDA is not available"])


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry of `folder` (recursively) and the bytes of its regular files."""
    return {str(path): path.read_bytes() if path.is_file() else None for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_in_one_line_before_the_model_loads(name, bad_files, tmp_path, monkeypatch, capfd):
    """43 bad inputs (44 where CUDA is unavailable): exit 2 (argument) or 1, one line on stderr naming the problem,
    nothing on stdout, no model loaded, and no file created or changed."""
    arguments, fragments = BAD_INPUTS[name]
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(tmp_path))
    loaded = []
    monkeypatch.setattr(cli, "load_model", lambda *args: loaded.append(args), raising=False)
    before = contents(bad_files)
    code = cli.main([argument.replace("{}", str(bad_files)) for argument in arguments])
    captured = capfd.readouterr()
    assert code in (1, 2) and captured.out == ""
    assert_one_line_failure(code, captured.err, *fragments)
    assert loaded == []
    assert contents(bad_files) == before


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


def test_out_is_written_whole_and_replaces_a_file_only_with_overwrite(tmp_path, monkeypatch, capfd):
    """`--out` goes through a staging file renamed into place: a failed write leaves the old file as it was and no
    staging file behind; `--overwrite` replaces a file; any image extension Pillow writes is accepted."""
    out = tmp_path / "grid.png"
    out.write_bytes(b"the user's file")
    assert cli.main(["slices", D, "--out", str(out), "--overwrite"]) == 0
    with Image.open(out) as drawn:
        assert drawn.format == "PNG" and drawn.size == (682, 1024)
    assert cli.main(["slices", D, "--out", str(tmp_path / "grid.JPG")]) == 0
    with Image.open(tmp_path / "grid.JPG") as drawn:
        assert drawn.format == "JPEG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.JPG", "grid.png"]

    def fail_midway(image, file, **kwargs):
        file.write(b"half an image")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    out.write_bytes(b"the user's file")
    capfd.readouterr()
    code = cli.main(["slices", D, "--out", str(out), "--overwrite"])
    assert_one_line_failure(code, capfd.readouterr().err, "No space left on device")
    assert out.read_bytes() == b"the user's file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.JPG", "grid.png"]


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        return server.getsockname()[1]


# `llava-uhd ARGS` after the slow imports (torch, transformers), printing how long `main` took.
TIMED_MAIN = """
import sys, time, torch, transformers
from modeling_llava_uhd import cli
start = time.monotonic()
code = cli.main(sys.argv[1:])
print(f"{time.monotonic() - start:.1f}")
sys.exit(code)
"""


def hub_cache(home: Path, repo: str) -> None:
    """The default model as Hub repo `repo` in the Hugging Face cache under `home` (`HF_HOME`), as if downloaded."""
    commit = "0" * 40
    cache = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(default_model_path(home / "source"), cache / "snapshots" / commit)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)


@pytest.mark.slow  # its own Python processes: several seconds each
def test_a_hub_model_fails_fast_in_one_line_when_the_hub_cannot_be_reached(tmp_path):
    """3 bad inputs, the Hub at a closed port (issue 21, defect 16: 12 retry lines over ~30 s): `--model org/name`
    with and without `--trust-remote-code`, and with `HF_HUB_OFFLINE=1`, each one line within 10 s; a model in the
    local cache is still answered, from the cache, with nothing on stderr."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")} | {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "LLAVA_UHD_CACHE": str(tmp_path / "cache"),
    }
    sample = make_sample("test", DETAIL_INDEX)
    chat = ("chat", "--image", D, "--prompt", sample.question)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", TIMED_MAIN, *chat, *args], capture_output=True, text=True,
                              cwd=ROOT, env=env | extra, timeout=300, check=False)  # fmt: skip

    for args, extra, reason in (
        ((), {}, "the Hub at http://127.0.0.1:"),
        (("--trust-remote-code",), {}, "did not answer"),
        ((), {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ):
        result = run("--model", "org/name", *args, **extra)
        assert_one_line_failure(result.returncode, result.stderr, "'org/name' is not in the local Hub cache", reason)
        assert float(result.stdout) < 10, result.stdout
    hub_cache(tmp_path / "hf", "org/name")
    answered = run("--model", "org/name")
    assert answered.returncode == 0 and answered.stderr == "", answered.stderr[-2000:]
    assert answered.stdout.splitlines()[0] == sample.answer


@pytest.mark.slow  # its own Python processes: several seconds each
def test_a_chat_template_that_never_finishes_is_stopped_in_one_line(tmp_path):
    """1 bad input (issue 21, defect 17: `chat` hung): a model folder whose chat template nests two 100,000-step
    loops (10^10 steps; Jinja's sandbox bounds each `range` only) is stopped after `TEMPLATE_SECONDS` (1 s here), in
    one line, in a real process (the time limit is a signal)."""
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(tmp_path / "source"), folder)
    (folder / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    code = "import sys; from modeling_llava_uhd import cli; cli.TEMPLATE_SECONDS = 1; sys.exit(cli.main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "chat", "--model", str(folder), "--image", D, "--prompt", "What?"],
        capture_output=True, text=True, cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=120, check=False,
    )  # fmt: skip
    assert result.stdout == ""
    assert_one_line_failure(result.returncode, result.stderr, f"the chat template of {str(folder)!r} ran for over 1 s")


def test_a_cache_variable_naming_a_file_is_named_in_the_error(tmp_path, monkeypatch, capfd):
    """2 bad inputs: `LLAVA_UHD_CACHE` a file, or a path through a file: one line naming the variable."""
    (tmp_path / "file").write_text("not a folder")
    for value, problem in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot be")):
        monkeypatch.setenv("LLAVA_UHD_CACHE", str(value))
        code = cli.main([*CHAT])
        assert_one_line_failure(code, capfd.readouterr().err, f"{value} ($LLAVA_UHD_CACHE)", problem)
    assert (tmp_path / "file").read_text() == "not a folder"
