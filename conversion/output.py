"""The output folder of a conversion as a transaction: written into a hidden staging folder, listed in a manifest
(names, sizes, sha256), checked, and moved into place only when complete, so `--output` is never half-written. An
earlier conversion is replaced only as it was written; anything else in `--output` is refused and left untouched.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .common import ConversionError, read_json

try:
    import fcntl
except ImportError:  # Windows: no folder locks; process ids tell a killed writer's folders instead
    fcntl = None

# Written last into every converted folder: the names, sizes and sha256 of the files the conversion wrote (itself
# excluded).
MANIFEST = "llava_uhd_conversion.json"
# Hidden folders of a conversion in progress, of an earlier conversion being replaced, and of a conversion moving its
# files into an output that a rename cannot replace (see `in_place`). Each writer holds a lock on its folders, so a
# later run removes, puts back or completes only those of a killed writer (see `tidy_siblings`).
STAGING, REPLACED, MOVING = "partial", "replaced", "moving"


def in_place(output: Path) -> bool:
    """Whether `output` is a folder that a rename cannot replace: a mount point (bind mounts within one filesystem
    included, which `os.path.ismount` misses) or a folder whose parent we may not write. The conversion is then
    staged inside it, on its own filesystem, and its files are moved in one by one (`move_files_in`)."""
    if not output.is_dir():
        return False
    if not os.access(output.parent, os.W_OK | os.X_OK):
        return True
    try:
        mounts = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError:  # not Linux: compare devices
        return os.path.ismount(output)
    unescape = lambda field: re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), field)  # noqa: E731
    return any(unescape(line.split()[4]) == str(output) for line in mounts)


def hidden_place(output: Path, kind: str) -> tuple[Path, str]:
    """Where the hidden `kind` folders of `output` lie and how their names start (a process id and a random suffix
    follow): inside an `in_place` output, else beside it, named after it (shortened to leave room for the suffix
    whatever the name's length)."""
    if in_place(output):
        return output, f".llava-uhd-{kind}-"
    name = output.name
    if len(name) > 64:
        name = f"{name[:40]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return output.parent, f".{name}.llava-uhd-{kind}-"


def sibling(output: Path, kind: str) -> Path:
    """A new name for a hidden `kind` folder of this process (see `hidden_place`)."""
    folder, prefix = hidden_place(output, kind)
    return folder / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def locked(folder: Path) -> Iterator[bool]:
    """Hold an exclusive `flock` on `folder` while the block runs; the kernel drops it when this process dies, so
    other runs can tell a live writer's folders from a killed one's. Yields False where the filesystem has no such
    locks (some network filesystems). Raises BlockingIOError while another process holds it, FileNotFoundError when
    `folder` is gone or was replaced before the lock was taken."""
    if fcntl is None:
        yield False
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise
        except OSError:
            held = False
        if held and not os.path.samestat(os.fstat(descriptor), os.stat(folder)):
            raise FileNotFoundError(errno.ENOENT, "replaced while it was being locked", str(folder))
        yield held
    finally:
        os.close(descriptor)


def writer_alive(name: str, prefix: str) -> bool:
    """Whether the process whose id follows `prefix` in `name` still runs; unknown counts as running. Only where
    folders cannot be locked: a process id alone can be another process's (in a container the converter is often
    process 1)."""
    pid = name.removeprefix(prefix).split("-", 1)[0]
    if os.name != "posix" or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        return True
    return True


def tidy_siblings(output: Path) -> None:
    """Clear what killed conversions left (folders whose writer no longer holds them, see `locked`): their staging
    folders go; an earlier conversion moved aside to be replaced goes back into place when `output` is missing, and
    goes otherwise; a conversion killed while moving its files into an `in_place` output is completed."""
    for kind in (REPLACED, MOVING, STAGING):
        folder, prefix = hidden_place(output, kind)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
                continue
            try:
                with locked(path) as held:
                    if not held and writer_alive(path.name, prefix):
                        continue
                    if kind == MOVING:
                        with locked(output):
                            move_files_in(path, output)
                    elif kind == REPLACED and not output.exists():
                        path.rename(output)
                    else:
                        shutil.rmtree(path)
            except (BlockingIOError, FileNotFoundError):  # its writer runs, or another run tidies it
                continue


def check_output(output: Path, folders: dict[str, Path], overwrite: bool) -> None:
    """Refuse an `--output` that is a file, is / holds / lies inside a source folder, or holds anything but an earlier
    conversion (which only `overwrite` lets us replace, and only as the conversion wrote it: a file changed since,
    such as a hand-edited model card, is named and kept)."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file; expected a new or empty folder.")
    for flag, source in folders.items():
        if output == source:
            relation = "is"
        elif output.is_relative_to(source):
            relation = "lies inside"
        elif source.is_relative_to(output):
            relation = "contains"
        else:
            continue
        raise ConversionError(f"--output {output} {relation} the {flag} folder {source}; choose a separate folder.")
    if not output.is_dir():
        return
    try:
        entries = manifest_entries(output)
    except ConversionError:
        entries = {}
    files, folders_of_ours = {MANIFEST, *entries}, set()
    if in_place(output):  # our hidden folders in it, and a volume's own lost+found
        hidden = tuple(hidden_place(output, kind)[1] for kind in (STAGING, MOVING))
        folders_of_ours = {p.name for p in output.iterdir() if p.name.startswith(hidden) or p.name == "lost+found"}
    names = sorted(p.name for p in output.iterdir())
    foreign = [
        name for name in names
        if name not in folders_of_ours and (name not in files or not (output / name).is_file())
    ]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConversionError(
            f"--output {output} holds files the converter did not write ({listed}); choose a new or empty folder."
        )
    if MANIFEST not in names:
        return
    if not overwrite:
        raise ConversionError(
            f"--output {output} holds an earlier conversion; pass --overwrite to replace it once the new one succeeds."
        )
    changed = [problem for name, problem in differences(output, entries).items() if (output / name).exists()]
    if changed:
        raise ConversionError(
            f"--output {output}: {changed[0]}, so --overwrite would lose a change; move the file out of the folder "
            f"to keep it, or delete it."
        )


@contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A fresh hidden folder to write the conversion into (see `hidden_place`), locked while it exists; removed on
    exit unless moved into place."""
    with ExitStack() as stack:
        for attempt in range(3):
            staging = sibling(output, STAGING)
            staging.mkdir(parents=True)
            try:
                stack.enter_context(locked(staging))
                break
            except (BlockingIOError, FileNotFoundError):  # a run tidying up took it before we locked it
                if attempt == 2:
                    raise
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, output: Path) -> None:
    """Move the finished `staging` into place. Beside `output`, it is renamed to `output`: an earlier conversion there
    is moved aside first and removed last, so a kill at any moment leaves the old or the new conversion (or the old
    one aside, which `tidy_siblings` puts back). Inside an `in_place` output, its files are moved in one by one
    (`move_files_in`); a kill then leaves a move that `tidy_siblings` completes."""
    if staging.parent != output and output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        staging.rename(output)
        return
    try:
        with locked(output):  # while it changes: a later run puts it back or completes the move only if we are killed
            if staging.parent == output:
                moving = sibling(output, MOVING)
                staging.rename(moving)
                move_files_in(moving, output)
                return
            aside = sibling(output, REPLACED)
            output.rename(aside)
            try:
                staging.rename(output)
            except OSError:
                aside.rename(output)
                raise
            shutil.rmtree(aside)
    except BlockingIOError as error:
        raise ConversionError(f"--output {output} is being replaced by another conversion; try again.") from error


def move_files_in(moving: Path, output: Path) -> None:
    """Move the finished conversion in `moving` (inside `output`, whose lock the caller holds) into `output` file by
    file: the earlier conversion's files are removed first (its manifest last), the new manifest comes in last, so
    `output` is a finished conversion only once it is complete. Run again after a kill, it completes the move."""
    if (output / MANIFEST).is_file():
        for name in manifest_entries(output):
            (output / name).unlink(missing_ok=True)
        (output / MANIFEST).unlink()
    for name in manifest_entries(moving):
        if (moving / name).is_file():
            (moving / name).rename(output / name)
    (moving / MANIFEST).rename(output / MANIFEST)
    moving.rmdir()


def file_sha256(path: Path) -> str:
    """The sha256 of the file at `path` (hex), read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(2**23):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file in `folder` with its size and sha256 in its MANIFEST, so that an incomplete or changed copy can
    be told apart."""
    files = {
        path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def manifest_entries(folder: Path) -> dict[str, tuple[int, str | None]]:
    """`{file name: (size, sha256)}` of the files the conversion in `folder` wrote, from its manifest (one written
    before hashes were recorded gives sizes only: sha256 None)."""
    files = read_json(folder / MANIFEST).get("files")
    damaged = f'{folder / MANIFEST} is damaged: expected {{"files": {{file name: {{"size": ..., "sha256": ...}}}}}}.'
    if not isinstance(files, dict):
        raise ConversionError(damaged)
    entries = {}
    for name, entry in files.items():
        entry = {"size": entry} if isinstance(entry, int) else entry
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        plain = Path(name).name == name and name not in (".", "..", MANIFEST)
        if not (plain and isinstance(size, int) and (digest is None or re.fullmatch(r"[0-9a-f]{64}", str(digest)))):
            raise ConversionError(damaged)
        entries[name] = size, digest
    return entries


def differences(folder: Path, entries: dict[str, tuple[int, str | None]], hashes: bool = True) -> dict[str, str]:
    """`{file name: how it differs}` for the files of `folder` that are not as their manifest `entries` record them:
    missing, another size or (with `hashes`, where the manifest records one) another sha256."""
    problems = {}
    for name, (size, digest) in entries.items():
        path = folder / name
        if not path.is_file():
            problems[name] = f"{name} is missing"
        elif path.stat().st_size != size:
            problems[name] = f"{name} has {path.stat().st_size} bytes, not {size}"
        elif hashes and digest is not None and file_sha256(path) != digest:
            problems[name] = f"{name} differs from what the conversion wrote (sha256)"
    return problems


def converted_files(folder: str | Path, hashes: bool = True) -> list[str]:
    """The names of the files a conversion wrote into `folder` (its manifest included; nothing else the folder holds),
    once they are all there as recorded (sizes, and with `hashes` the sha256 where the manifest has them),
    `config.json` parses and the weights open: the index and every shard it names with their tensors, or the single
    `model.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder.")
    if not (folder / MANIFEST).is_file():
        raise ConversionError(
            f"{folder} has no {MANIFEST}: not a finished conversion (an interrupted or older one?); convert again."
        )
    entries = manifest_entries(folder)
    if problems := differences(folder, entries, hashes):
        raise ConversionError(f"{folder} is not the conversion its {MANIFEST} lists: {'; '.join(problems.values())}.")
    read_json(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.name in entries:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no `weight_map` object.")
        shards: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(name, set()).add(key)
    elif "model.safetensors" in entries:
        shards = {"model.safetensors": set()}
    else:
        raise ConversionError(f"{folder} has no weights: neither model.safetensors nor its index.")
    for name, keys in shards.items():
        if name not in entries:
            raise ConversionError(f"{index} names {name}, which is not among the files the conversion wrote.")
        try:
            with safe_open(folder / name, framework="pt") as shard:
                absent = sorted(keys - set(shard.keys()))
        except SafetensorError as error:
            raise ConversionError(f"{folder / name} does not open as safetensors: {error}") from error
        if absent:
            raise ConversionError(
                f"{folder / name} lacks {len(absent)} tensors {index.name} puts there: {absent[:5]}."
            )
    return sorted([*entries, MANIFEST])
