"""The converter and the publisher lose no data, never leave a half-written folder, upload only what a conversion
wrote (privately unless asked), and report every failure in one line on stderr."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from test_conversion import ROOT, run_convert, tiny_separators, write_original

import conversion.convert_llava_uhd as converter
from conversion.convert_llava_uhd import MANIFEST, ConversionError, converted_files, main, tidy_siblings
from conversion.publish import main as publish_main

SLOW_WRITES = """
import sys, time
import conversion.convert_llava_uhd as converter
save_file = converter.save_file
def slow_save_file(*args, **kwargs):  # each output shard is followed by a long pause: time to kill the conversion
    save_file(*args, **kwargs)
    time.sleep(120)
converter.save_file = slow_save_file
sys.exit(converter.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny original checkpoint (with `clip/` beside it) that the tests read but never change."""
    folder = tmp_path_factory.mktemp("source") / "original"
    write_original(folder)
    return folder


def cli(original: Path, output: Path, *extra: str) -> list[str]:
    return ["--original", str(original), "--vision-tower", str(original.parent / "clip"), "--output", str(output),
            "--dtype", "float32", *tiny_separators(), *extra]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_siblings(folder: Path) -> list[str]:
    """The converter's staging / aside folders next to `folder`."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.llava-uhd-"))


def fails_in_one_line(capfd, argv: list[str], match: str, tool=main) -> None:
    """`tool(argv)` fails with exit code 1, printing only one stderr line that matches `match`."""
    capfd.readouterr()  # what came before
    assert tool(argv) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(("conversion failed: ", "publish failed: ")), err
    assert re.search(match, err), err


def test_output_may_not_be_or_overlap_a_source(source, tmp_path, capfd):
    """6 bad inputs, each refused before anything is written; the sources stay byte for byte."""
    clip = source.parent / "clip"
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.safetensors").write_bytes(b"weights of somebody's LLM")
    before = contents(source.parent) | {f"llm/{k}": v for k, v in contents(llm).items()}
    cases = [
        (cli(source, source), r"--output .*original is the --original folder"),
        (cli(source, source, "--overwrite"), r"is the --original folder"),
        (cli(source, clip, "--overwrite"), r"--output .*clip is the --vision-tower folder"),
        (cli(source, source / "converted"), r"lies inside the --original folder"),
        (cli(source, source.parent, "--overwrite"), r"contains the --original folder"),
        (cli(source, llm, "--text-model", str(llm), "--overwrite"), r"is the --text-model folder"),
    ]
    for argv, match in cases:
        fails_in_one_line(capfd, argv, match)
    assert contents(source.parent) | {f"llm/{k}": v for k, v in contents(llm).items()} == before
    assert not (source / "converted").exists() and hidden_siblings(source) == hidden_siblings(clip) == []


def test_foreign_files_are_never_deleted(source, tmp_path, capfd):
    """3 bad inputs: a folder of other files (with and without --overwrite), a file as --output; all refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "other-model.safetensors").write_bytes(b"not the converter's")
    (tmp_path / "a-file").write_text("a file, not a folder")
    fails_in_one_line(capfd, cli(source, out), r"holds files the converter did not write \(notes.txt, other-model")
    fails_in_one_line(capfd, cli(source, out, "--overwrite"), r"holds files the converter did not write")
    fails_in_one_line(capfd, cli(source, tmp_path / "a-file"), r"--output .*a-file is a file")
    assert contents(tmp_path) == {"a-file": b"a file, not a folder", "out/notes.txt": b"mine",
                                  "out/other-model.safetensors": b"not the converter's"}


def test_failed_rerun_keeps_the_earlier_conversion(source, tmp_path, capfd):
    """4 bad re-runs into a good conversion: no --overwrite, --pad-vocab-to 0, an unmapped key and a mis-shaped
    tensor found after the new shards were written. The earlier conversion survives byte for byte."""
    out = run_convert(tmp_path, source, "out", max_shard_size=0.0002)
    before = contents(out)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shutil.copytree(source.parent / "clip", tmp_path / "clip")
    save_file({"model.mystery.weight": torch.zeros(2)}, broken / "zz-extra.safetensors")
    wrong = tmp_path / "wrong"
    shutil.copytree(source, wrong)
    save_file({"lm_head.weight": torch.zeros(3, 3)}, wrong / "zz-extra.safetensors")  # a second, mis-shaped copy
    cases = [
        (cli(source, out), r"holds an earlier conversion; pass --overwrite"),
        (cli(source, out, "--overwrite", "--pad-vocab-to", "0"), r"--pad-vocab-to must be a positive integer, got 0"),
        (cli(broken, out, "--overwrite"), r"unmapped keys: zz-extra.safetensors: model.mystery.weight"),
        (cli(wrong, out, "--overwrite"), r"shape mismatches: lm_head.weight"),
    ]
    for argv, match in cases:
        fails_in_one_line(capfd, argv, match)
        assert contents(out) == before and hidden_siblings(out) == []


def test_overwrite_replaces_only_after_success(source, tmp_path, monkeypatch, capfd):
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    # A failure at the very last step (the rename into place) puts the earlier conversion back.
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".out.llava-uhd-partial-"):
            raise OSError("disk went away")
        return rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", failing_rename)
        fails_in_one_line(capfd, cli(source, out, "--overwrite", "--dtype", "bfloat16"), "OSError: disk went away")
    assert contents(out) == before and hidden_siblings(out) == []

    # While the new conversion is written, the earlier one stays in place, untouched.
    seen = []
    move_into_place = converter.move_into_place

    def spy(staging: Path, output: Path) -> None:
        seen.append((contents(output) == before, converted_files(staging)))
        move_into_place(staging, output)

    monkeypatch.setattr(converter, "move_into_place", spy)
    assert main(cli(source, out, "--overwrite", "--dtype", "bfloat16")) == 0
    assert seen == [(True, sorted(before))]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16" and contents(out) != before
    assert hidden_siblings(out) == []


def test_killed_conversion_leaves_no_half_written_output(source, tmp_path):
    """SIGKILL in the middle of an --overwrite conversion: the earlier conversion stays; the next run clears the
    staging folder left behind."""
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITES, *cli(source, out, "--overwrite", "--max-shard-size", "0.0002")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.llava-uhd-partial-*/part-00000.tmp")):
            assert process.poll() is None and time.monotonic() < deadline, "the conversion never wrote a shard"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert contents(out) == before
    [staging] = hidden_siblings(out)  # it was killed mid-write
    assert staging.startswith(".out.llava-uhd-partial-")
    with pytest.raises(ConversionError, match="not a finished conversion"):  # nor can it be published
        converted_files(tmp_path / staging)

    run_convert(tmp_path, source, "out", overwrite=True)
    assert hidden_siblings(out) == [] and converted_files(out)


def test_tidy_puts_back_a_conversion_moved_aside(source, tmp_path):
    """A kill between moving the earlier conversion aside and moving the new one in: the next run puts it back."""
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.rename(tmp_path / f".out.llava-uhd-replaced-{dead.pid}-0000")
    (tmp_path / f".out.llava-uhd-partial-{dead.pid}-0001").mkdir()
    alive = tmp_path / f".out.llava-uhd-partial-{os.getpid()}-0002"  # a conversion still running
    alive.mkdir()
    (tmp_path / ".out.notes").write_text("not ours")
    tidy_siblings(out)
    assert contents(out) == before
    assert hidden_siblings(out) == [alive.name] and (tmp_path / ".out.notes").read_text() == "not ours"


def test_publish_uploads_only_a_finished_conversion(source, tmp_path, monkeypatch, capfd):
    """Only the files the conversion wrote are listed and uploaded, to a private repo unless --public. 7 bad inputs:
    no manifest (an interrupted or foreign folder), a missing shard, a truncated shard, a damaged shard of the same
    size, an unreadable config.json, a missing folder, a bad repo id."""
    good = run_convert(tmp_path, source, "good", max_shard_size=0.0002)
    written = sorted(p.name for p in good.iterdir())
    for name, data in {".env": b"HF_TOKEN=secret", "notes.txt": b"todo", "pytorch_model.bin": b"stale"}.items():
        (good / name).write_bytes(data)
    assert converted_files(good) == written and MANIFEST in written

    capfd.readouterr()
    assert publish_main([str(good), "org/llava-uhd-tiny", "--dry-run"]) == 0
    listed = [line.split()[0] for line in capfd.readouterr().out.splitlines()[1:]]
    assert listed == written

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: calls.append(kwargs) or "URL")
    monkeypatch.setattr(huggingface_hub, "create_commit",
                        lambda repo_id, operations, **kwargs: calls.append([op.path_in_repo for op in operations]))
    assert publish_main([str(good), "org/llava-uhd-tiny"]) == 0
    assert calls == [{"private": True, "exist_ok": True, "repo_type": "model"}, written]
    calls.clear()
    assert publish_main([str(good), "org/llava-uhd-tiny", "--public"]) == 0
    assert calls[0]["private"] is False

    shard = next(name for name in written if "-00002-of-" in name)

    def damaged(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    cases = [
        (damaged("no-manifest", lambda f: (f / MANIFEST).unlink()), "has no llava_uhd_conversion.json"),
        (damaged("no-shard", lambda f: (f / shard).unlink()), rf"{shard} is missing"),
        (damaged("short", lambda f: (f / shard).write_bytes((f / shard).read_bytes()[:100])),
         rf"{shard} has 100 bytes"),
        (damaged("garbage", lambda f: (f / shard).write_bytes(b"x" * (f / shard).stat().st_size)),
         rf"{shard} does not open as safetensors"),
        (damaged("config", lambda f: (f / "config.json").write_bytes(b"{" * (f / "config.json").stat().st_size)),
         "config.json could not be read as JSON"),
        (tmp_path / "nowhere", "nowhere is not a folder"),
    ]
    for folder, match in cases:
        fails_in_one_line(capfd, [str(folder), "org/x", "--dry-run"], match, tool=publish_main)
    fails_in_one_line(capfd, [str(good), "not a repo", "--dry-run"], "HFValidationError", tool=publish_main)

    # The command line: one line on stderr, non-zero exit.
    result = subprocess.run([sys.executable, "-m", "conversion.publish", str(tmp_path / "no-manifest"), "org/x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("publish failed: ") and "not a finished conversion" in result.stderr


def test_push_to_hub_is_private_and_checked_first(source, tmp_path, monkeypatch, capfd):
    """The converter's --push-to-hub uploads the same files privately; 1 bad input: a bad repo id, refused before
    converting."""
    fails_in_one_line(capfd, cli(source, tmp_path / "out", "--push-to-hub", "a/b/c"), r"--push-to-hub 'a/b/c' is not")
    assert not (tmp_path / "out").exists()
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: calls.append(kwargs) or "URL")
    monkeypatch.setattr(huggingface_hub, "create_commit",
                        lambda repo_id, operations, **kwargs: calls.append([op.path_in_repo for op in operations]))
    assert main(cli(source, tmp_path / "out", "--push-to-hub", "org/llava-uhd-tiny")) == 0
    assert calls[0]["private"] is True and calls[1] == converted_files(tmp_path / "out")


def test_cli_failures_are_one_line(source, tmp_path, monkeypatch, capfd):
    """15 bad inputs, each reported in one stderr line (exit code 1) with nothing written; --debug raises instead, and
    a usage error is one line too (exit code 2)."""
    clip = shutil.copytree(source.parent / "clip", tmp_path / "clip")  # beside the broken copies below
    bad_config = tmp_path / "bad-config"
    shutil.copytree(source, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llava_llama",')
    no_shard = tmp_path / "no-shard"
    shutil.copytree(source, no_shard)
    shards = sorted(p.name for p in no_shard.glob("*.safetensors"))
    (no_shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(enumerate(shards))}))
    (no_shard / shards[1]).unlink()
    out = tmp_path / "out"
    cases = [
        (["--original", "./typo", "--vision-tower", str(clip), "--output", str(out)], r"--original './typo': no such"),
        (["--original", str(tmp_path / "typo"), "--vision-tower", str(clip), "--output", str(out)], "no such folder"),
        (["--original", str(source), "--vision-tower", "~/typo", "--output", str(out)], "'~/typo': no such folder"),
        (["--original", str(source), "--vision-tower", "typo", "--output", str(out)], "'typo': no such folder"),
        (cli(source, out, "--text-model", "a/b/c"), "--text-model 'a/b/c': no such folder"),
        (cli(source / "config.json", out), "--original .*config.json' is a file"),
        (cli(bad_config, out), r"bad-config/config.json could not be read as JSON \(Expecting"),
        (cli(source, out, "--pad-vocab-to", "-64"), "--pad-vocab-to must be a positive integer, got -64"),
        (cli(source, out, "--max-shard-size", "0"), "--max-shard-size must be a positive number of GiB, got 0.0"),
        (cli(source, out, "--max-shard-size", "-1"), "got -1.0"),
        (cli(source, out, "--max-shard-size", "nan"), "got nan"),
        (cli(source, out, "--resampler-num-heads", "0"), "--resampler-num-heads must be a positive integer"),
        (cli(no_shard, out), rf"lacks {shards[1]}, named in model.safetensors.index.json"),
        (cli(source, clip / "config.json"), "--output .*config.json is a file"),
    ]
    for argv, match in cases:
        fails_in_one_line(capfd, argv, match)

    # A Hub id that cannot be downloaded (no network here: huggingface_hub's multi-line error is simulated).
    def unreachable(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    fails_in_one_line(capfd, cli(source, out)[:2] + ["--vision-tower", "nobody/nothing"] + cli(source, out)[4:],
                      r"--vision-tower 'nobody/nothing' is no local folder and could not be downloaded .* Check your")
    assert not out.exists() and hidden_siblings(out) == []

    # --debug shows the traceback instead; a usage error is one line too (exit code 2).
    with pytest.raises(ConversionError, match="no such folder"):
        main(cli(tmp_path / "typo", out, "--debug"))
    with pytest.raises(SystemExit) as exit_info:
        main(cli(source, out, "--pad-vocab-to", "sixty-four"))
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "argument --pad-vocab-to: invalid int value: 'sixty-four'" in err


def test_cli_error_is_one_line_on_stderr(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "conversion.convert_llava_uhd", "--original", "./typo", "--vision-tower", "clip",
         "--output", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "conversion failed: --original './typo': no such folder (and not a Hub repo id of the form org/name).\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_model_card_names_hub_ids_not_local_paths(source, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(source))
    out = tmp_path / "out"
    assert main(cli(source, out)[:1] + ["authors/llava-uhd-tiny"] + cli(source, out)[2:]) == 0
    card = (out / "README.md").read_text()
    assert "base_model:\n- authors/llava-uhd-tiny\ntags:" in card
    assert "from `authors/llava-uhd-tiny`" in card and "the local folder `clip` (vision tower)" in card
    assert str(source.parent) not in card and str(tmp_path) not in card
