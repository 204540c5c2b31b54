"""The converter and the publisher lose no data, never leave a half-written folder, upload only what a conversion
wrote (privately unless asked), and report every failure in one line on stderr."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from test_conversion import ROOT, run_convert, tiny_separators, write_original

import conversion.convert_llava_uhd as converter
import conversion.output as output_folder
from conversion.common import ConversionError
from conversion.convert_llava_uhd import main
from conversion.output import MANIFEST, converted_files, tidy_siblings
from conversion.publish import main as publish_main

HOLD = """
import sys, time
from contextlib import ExitStack
from pathlib import Path
from conversion.output import locked
with ExitStack() as stack:  # a conversion that still runs holds its folders
    assert all(stack.enter_context(locked(Path(folder))) for folder in sys.argv[1:])
    print("holding", flush=True)
    time.sleep(300)
"""
PAUSE_AT_RENAME = """
import sys, time
from pathlib import Path
import conversion.convert_llava_uhd as converter
rename = Path.rename
matched = []
def rename_and_pause(self, target):  # a long pause after the chosen rename: time to kill the conversion
    renamed = rename(self, target)
    matched.append({matches})
    if sum(matched) == {count} and matched[-1]:
        print({say!r}, flush=True)
        time.sleep(300)
    return renamed
Path.rename = rename_and_pause
sys.exit(converter.main(sys.argv[1:]))
"""
# Once the earlier conversion is moved aside; after 3 files went into an output staged in place.
PAUSE_ASIDE = PAUSE_AT_RENAME.format(matches='".llava-uhd-replaced-" in Path(target).name', count=1, say="aside")
PAUSE_MOVE = PAUSE_AT_RENAME.format(matches='self.parent.name.startswith(".llava-uhd-moving-")', count=3, say="moving")
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


def test_tidy_tells_killed_writers_by_their_locks_not_their_process_ids(source, tmp_path):
    """Folders of killed conversions are cleared even when their process id names a live process (a reused id; in a
    container the converter is often process 1): an earlier conversion moved aside goes back, a staging folder goes.
    Those a live writer holds are left, until it dies."""
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    out.rename(tmp_path / f".out.llava-uhd-replaced-{os.getpid()}-0000")
    (tmp_path / ".out.llava-uhd-partial-1-0001").mkdir()
    (tmp_path / ".out.notes").write_text("not ours")
    tidy_siblings(out)
    assert contents(out) == before and hidden_siblings(out) == []

    # A live conversion between moving the earlier one aside and moving the new one in.
    aside = tmp_path / f".out.llava-uhd-replaced-{os.getpid()}-0002"
    staging = tmp_path / ".out.llava-uhd-partial-1-0003"
    out.rename(aside)
    staging.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(aside), str(staging)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == "holding\n"
        tidy_siblings(out)
        assert not out.exists() and hidden_siblings(out) == sorted([aside.name, staging.name])
    finally:
        writer.kill()
        writer.wait()
    tidy_siblings(out)
    assert contents(out) == before and hidden_siblings(out) == []
    assert (tmp_path / ".out.notes").read_text() == "not ours"


def test_without_folder_locks_process_ids_decide(source, tmp_path, monkeypatch):
    """Where folders cannot be locked (Windows, some network filesystems), the writer's process id decides: a dead
    writer's folders are cleared, a live one's kept."""
    monkeypatch.setattr(output_folder, "fcntl", None)
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.rename(tmp_path / f".out.llava-uhd-replaced-{dead.pid}-0000")
    (tmp_path / f".out.llava-uhd-partial-{dead.pid}-0001").mkdir()
    alive = tmp_path / f".out.llava-uhd-partial-{os.getpid()}-0002"
    alive.mkdir()
    tidy_siblings(out)
    assert contents(out) == before and hidden_siblings(out) == [alive.name]


@pytest.mark.slow  # its own Python processes: several seconds each
def test_conversion_killed_as_process_1_is_tidied(source, tmp_path):
    """The converter as process 1 of its PID namespace (as in a container), killed between moving the earlier
    conversion aside and moving the new one in: the next run (where a process 1 runs too) puts the earlier one back and
    removes the staging folder."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"],
                                                          capture_output=True, check=False).returncode != 0:
        pytest.skip("PID namespaces (unshare -p) are not available here")
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    process = subprocess.Popen(
        ["unshare", "-p", "-f", "--mount-proc", "--kill-child", sys.executable, "-c", PAUSE_ASIDE,
         *cli(source, out, "--overwrite")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout.readline() == "aside\n"
        [child] = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    assert [re.sub(r"-[0-9a-f]{8}$", "", name) for name in hidden_siblings(out)] == [
        ".out.llava-uhd-partial-1", ".out.llava-uhd-replaced-1"
    ]
    tidy_siblings(out)
    assert contents(out) == before and hidden_siblings(out) == []


def test_publish_uploads_only_a_finished_conversion(source, tmp_path, monkeypatch, capfd):
    """Only the files the conversion wrote are listed and uploaded, to a private repo unless --public. 10 bad inputs:
    no manifest (an interrupted or foreign folder), a missing shard, a truncated shard, a shard with one byte of
    tensor data flipped, a zero-filled tokenizer.json (both of the same size, caught by their hashes), a damaged shard
    and an unreadable config.json of the same size under an older manifest (sizes only), a damaged manifest, a missing
    folder, a bad repo id. Nothing is uploaded from a folder that fails."""
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

    def flip_last_byte(path: Path) -> None:  # tensor data: the file still opens as safetensors
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))

    def sizes_only(folder: Path) -> None:  # the manifest as converters before hashes wrote it
        files = json.loads((folder / MANIFEST).read_text())["files"]
        (folder / MANIFEST).write_text(json.dumps({"files": {name: entry["size"] for name, entry in files.items()}}))

    def garbage_under_sizes_only(name: str) -> Callable[[Path], None]:
        return lambda folder: (sizes_only(folder), (folder / name).write_bytes(b"{" * (folder / name).stat().st_size))

    cases = [
        (damaged("no-manifest", lambda f: (f / MANIFEST).unlink()), "has no llava_uhd_conversion.json"),
        (damaged("no-shard", lambda f: (f / shard).unlink()), rf"{shard} is missing"),
        (damaged("short", lambda f: (f / shard).write_bytes((f / shard).read_bytes()[:100])),
         rf"{shard} has 100 bytes"),
        (damaged("flipped", lambda f: flip_last_byte(f / shard)), rf"{shard} differs from what the conversion wrote"),
        (damaged("zeros", lambda f: (f / "tokenizer.json").write_bytes(bytes((f / "tokenizer.json").stat().st_size))),
         "tokenizer.json differs from what the conversion wrote"),
        (damaged("garbage", garbage_under_sizes_only(shard)), rf"{shard} does not open as safetensors"),
        (damaged("config", garbage_under_sizes_only("config.json")), "config.json could not be read as JSON"),
        (damaged("manifest", lambda f: (f / MANIFEST).write_text('{"files": {"config.json": {"size": 1}, "x": "y"}}')),
         "llava_uhd_conversion.json is damaged"),
        (tmp_path / "nowhere", "nowhere is not a folder"),
    ]
    calls.clear()
    for folder, match in cases:
        fails_in_one_line(capfd, [str(folder), "org/x", "--dry-run"], match, tool=publish_main)
        fails_in_one_line(capfd, [str(folder), "org/x"], match, tool=publish_main)
    fails_in_one_line(capfd, [str(good), "not a repo", "--dry-run"], "HFValidationError", tool=publish_main)
    assert calls == []
    # An older manifest (sizes only) is still read.
    sizes_only(good)
    assert converted_files(good) == written and publish_main([str(good), "org/llava-uhd-tiny"]) == 0

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


@pytest.mark.slow  # its own Python processes: several seconds each
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


def test_overwrite_keeps_a_file_changed_since_the_conversion(source, tmp_path, capfd):
    """2 bad inputs: --overwrite over a conversion whose model card was edited by hand, to the same size and to
    another size: refused, naming the file, which stays. An older manifest (sizes only) is still read."""
    out = run_convert(tmp_path, source, "out")
    card = (out / "README.md").read_bytes()
    same_size = card.replace(b"LLaVA-UHD", b"LLAVA-UHD", 1)
    (out / "README.md").write_bytes(same_size)
    fails_in_one_line(capfd, cli(source, out, "--overwrite"),
                      r"--output .*out: README.md differs from what the conversion wrote \(sha256\), so --overwrite")
    assert (out / "README.md").read_bytes() == same_size and hidden_siblings(out) == []

    files = json.loads((out / MANIFEST).read_text())["files"]
    (out / MANIFEST).write_text(json.dumps({"files": {name: entry["size"] for name, entry in files.items()}}))
    (out / "README.md").write_bytes(card + b"\nMy notes.\n")
    grown = rf"README.md has {len(card) + 11} bytes, not {len(card)}, so --overwrite would lose a change"
    fails_in_one_line(capfd, cli(source, out, "--overwrite"), grown)
    assert (out / "README.md").read_bytes() == card + b"\nMy notes.\n"
    (out / "README.md").write_bytes(card)
    assert main(cli(source, out, "--overwrite")) == 0
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert files["README.md"] == {"size": len(card), "sha256": hashlib.sha256(card).hexdigest()}


def test_files_written_into_output_during_the_conversion_survive(source, tmp_path, monkeypatch, capfd):
    """2 changes to --output while an --overwrite conversion runs (a new file, an edited model card): the last check
    before the move refuses, and the file and the earlier conversion stay as they are."""
    out = run_convert(tmp_path, source, "out")
    before = contents(out)
    write_manifest = converter.write_manifest
    changes = [
        ("notes.txt", b"mine", r"holds files the converter did not write \(notes.txt\)"),
        ("README.md", b"my card", r"README.md has 7 bytes"),
    ]
    for name, data, match in changes:
        def meddling(folder: Path, name=name, data=data) -> None:  # the user writes into --output meanwhile
            (out / name).write_bytes(data)
            write_manifest(folder)

        with monkeypatch.context() as patch:
            patch.setattr(converter, "write_manifest", meddling)
            fails_in_one_line(capfd, cli(source, out, "--overwrite", "--dtype", "bfloat16"), match)
        assert contents(out) == {**before, name: data} and hidden_siblings(out) == []
        if name in before:
            (out / name).write_bytes(before[name])
        else:
            (out / name).unlink()


@pytest.mark.parametrize("length", [240, 255])
def test_output_names_of_any_legal_length(source, tmp_path, length):
    """A 240- or 255-character --output name: the staging and aside folders' names stay short."""
    out = tmp_path / ("n" * length)
    assert main(cli(source, out)) == 0 and converted_files(out)
    assert main(cli(source, out, "--overwrite", "--dtype", "bfloat16")) == 0 and converted_files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n" * length]


@pytest.fixture(params=["tmpfs", "bind"])
def volume(request, tmp_path) -> Path:
    """An empty mount point at tmp_path/volume, as a container volume: a tmpfs, or a bind mount of a folder of the
    same filesystem (which `os.path.ismount` does not see). Skipped where mounting is not permitted."""
    path = tmp_path / "a volume"  # /proc/self/mountinfo writes the space as \040
    path.mkdir()
    if request.param == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(path)]
    else:
        (tmp_path / "host").mkdir()
        command = ["mount", "--bind", str(tmp_path / "host"), str(path)]
    if shutil.which("mount") is None or subprocess.run(command, capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting is not permitted here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_mount_point_as_output_is_staged_inside_it(source, tmp_path, volume, monkeypatch, capfd):
    """An empty mount point (with the volume's own lost+found) as --output: the conversion is staged inside it, on its
    own filesystem, and moved in; --overwrite then replaces it there."""
    (volume / "lost+found").mkdir()
    staged = []
    write_manifest = converter.write_manifest

    def spy(folder: Path) -> None:
        staged.append((folder.parent, folder.stat().st_dev))
        write_manifest(folder)

    monkeypatch.setattr(converter, "write_manifest", spy)
    assert main(cli(source, volume)) == 0
    assert staged == [(volume, volume.stat().st_dev)]
    written = converted_files(volume)
    assert sorted(p.name for p in volume.iterdir()) == sorted([*written, "lost+found"])
    fails_in_one_line(capfd, cli(source, volume), "holds an earlier conversion; pass --overwrite")

    assert main(cli(source, volume, "--overwrite", "--dtype", "bfloat16", "--max-shard-size", "0.0002")) == 0
    assert json.loads((volume / "config.json").read_text())["dtype"] == "bfloat16"
    written = converted_files(volume)
    assert sorted(p.name for p in volume.iterdir()) == sorted([*written, "lost+found"]) and len(written) > 12
    assert os.path.ismount(volume) or volume.stat().st_dev == tmp_path.stat().st_dev  # still mounted


@pytest.mark.slow  # its own Python processes: several seconds each
def test_a_move_into_a_mount_point_killed_halfway_is_completed(source, tmp_path, volume):
    """SIGKILL while an --overwrite conversion moves its files into a mount point one by one: the folder is no
    finished conversion then, and the next run completes the move."""
    assert main(cli(source, volume)) == 0
    reference = tmp_path / "reference"
    assert main(cli(source, reference, "--dtype", "bfloat16")) == 0
    process = subprocess.Popen([sys.executable, "-c", PAUSE_MOVE, *cli(source, volume, "--overwrite", "--dtype",
                                "bfloat16")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline() == "moving\n"
    finally:
        process.kill()
        process.wait()
    with pytest.raises(ConversionError, match="not a finished conversion"):
        converted_files(volume)
    tidy_siblings(volume)
    assert contents(volume) == contents(reference)


def test_an_output_whose_parent_we_may_not_write_is_staged_inside_it(source, tmp_path, monkeypatch):
    """An existing --output in a folder we may not write (so no staging folder beside it, nor a rename): staged
    inside, and moved in."""
    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    access, write_manifest, staged = os.access, converter.write_manifest, []
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out.parent and access(path, mode))
    spy = lambda folder: staged.append(folder.parent) or write_manifest(folder)  # noqa: E731
    monkeypatch.setattr(converter, "write_manifest", spy)
    assert main(cli(source, out)) == 0 and converted_files(out) and staged == [out]
    assert sorted(p.name for p in tmp_path.joinpath("parent").iterdir()) == ["out"]


def test_a_staging_folder_taken_before_it_is_locked_is_replaced(source, tmp_path, monkeypatch):
    """Another run tidying up removes our new staging folder in the instant before we lock it: the conversion takes
    a fresh one."""
    locked, taken = output_folder.locked, []

    def racing(folder: Path):
        if ".llava-uhd-partial-" in folder.name and not taken:
            taken.append(folder.name)
            shutil.rmtree(folder)
        return locked(folder)

    monkeypatch.setattr(output_folder, "locked", racing)
    assert main(cli(source, tmp_path / "out")) == 0 and converted_files(tmp_path / "out") and len(taken) == 1
    assert hidden_siblings(tmp_path / "out") == []
