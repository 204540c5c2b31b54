"""The offline default model: a tiny LLaVA-UHD trained from scratch with this project's recipe on the fine-detail task
(which fine pattern fills a framed panel; see the README's "The default model"). Its weights ship inside this
package, so `llava-uhd chat` and the examples work on a machine without network access."""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).parent
WEIGHTS = PACKAGE / "default_model_files"
# The Hub bundle: the package's files that `save_pretrained` copies next to the weights (they import each other only
# relatively). Listed here, where this module (loadable on its own) assembles folders; the package exports it.
BUNDLE_FILES = (
    "configuration_llava_uhd.py",
    "image_processing_llava_uhd.py",
    "layout_llava_uhd.py",
    "modeling_llava_uhd.py",
    "processing_llava_uhd.py",
)
CACHE_VARIABLE = "LLAVA_UHD_CACHE"

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """`$LLAVA_UHD_CACHE`, else `$XDG_CACHE_HOME/llava-uhd`, else `~/.cache/llava-uhd`. An empty (or blank) variable
    counts as unset, as the XDG convention has it, so `LLAVA_UHD_CACHE=""` never means the current folder."""
    value = os.environ.get(CACHE_VARIABLE, "")
    if value.strip():
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg.strip() and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "llava-uhd"


def _sources() -> dict[str, bytes]:
    """The default model's files by name: the shipped weights, tokenizer and processor files, this package's code."""
    paths = sorted(path for path in WEIGHTS.iterdir() if path.is_file()) + [PACKAGE / name for name in BUNDLE_FILES]
    return {path.name: path.read_bytes() for path in paths}


def _damaged(folder: Path, sources: dict[str, bytes]) -> list[str]:
    """Names of the files of `folder` that are missing or differ from `sources` (size, then every byte)."""
    damaged = []
    for name, data in sources.items():
        try:
            path = folder / name
            if path.stat().st_size != len(data) or path.read_bytes() != data:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged


def _staging(root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=".default-model-", dir=root))


def _assemble(folder: Path, sources: dict[str, bytes]) -> None:
    """Write `folder` in a staging folder next to it and rename it into place (atomic: a concurrent caller sees no
    folder or a whole one; if another process renamed its copy first, that copy is kept)."""
    staging = _staging(folder.parent)
    try:
        for name, data in sources.items():
            (staging / name).write_bytes(data)
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():  # not just another process assembling the same folder first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _repair(folder: Path, damaged: list[str], sources: dict[str, bytes]) -> None:
    """Replace each damaged file by a good copy written in a staging folder, with `os.replace` (atomic: a reader
    opens the old file or the whole new one; concurrent repairs write the same bytes)."""
    staging = _staging(folder.parent)
    try:
        for name in damaged:
            (staging / name).write_bytes(sources[name])
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the default model, ready for `from_pretrained(path, trust_remote_code=True)` with any Auto class
    and for `pipeline("image-text-to-text", model=path, trust_remote_code=True)`; with this package imported, the
    Auto classes and `LlavaUhdForConditionalGeneration.from_pretrained(path)` load it without `trust_remote_code`.

    The folder is the shipped weights, tokenizer and processor files plus this package's remote code, assembled in
    `cache_dir` (default: `default_cache_root()`, i.e. `$LLAVA_UHD_CACHE`, else `~/.cache/llava-uhd`; an empty
    variable counts as unset) under a name that changes with its contents. Every call checks the cached files byte
    for byte against the shipped ones (about 4 MB, milliseconds) and rewrites any that are missing or damaged (a
    logged warning), so a corrupted cache never answers. Concurrent callers are safe: the folder appears whole, by
    renaming a staging folder, and each rewritten file replaces the damaged one atomically.
    """
    if cache_dir is not None and not os.fspath(cache_dir).strip():
        raise ValueError(
            f"default_model_path: cache_dir is empty ({cache_dir!r}); pass a folder, or None for the default "
            f"(${CACHE_VARIABLE}, else ~/.cache/llava-uhd)"
        )
    sources = _sources()
    digest = hashlib.sha256()
    for name, data in sources.items():
        digest.update(name.encode() + b"\0" + data)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    folder = root / f"default-model-{digest.hexdigest()[:16]}"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the default model's cache {folder} is a file, not a folder; move it away")
    if not folder.is_dir():
        origin = "cache_dir" if cache_dir is not None else f"${CACHE_VARIABLE}"
        if cache_dir is None and not os.environ.get(CACHE_VARIABLE, "").strip():
            origin = f"the default; ${CACHE_VARIABLE} chooses another"
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"the default model's cache folder {root} ({origin}) is a file, not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file on its path, no permission...
            raise OSError(f"the default model's cache folder {root} ({origin}) cannot be created: {error}") from error
        _assemble(folder, sources)
    damaged = _damaged(folder, sources)
    if damaged:
        try:
            _repair(folder, damaged, sources)
        except OSError as error:
            raise OSError(
                f"the default model's cache {folder} is damaged ({', '.join(damaged)}) and could not be rewritten: "
                f"{error}; delete that folder, or set {CACHE_VARIABLE} to another folder"
            ) from error
        if _damaged(folder, sources):
            raise OSError(f"the default model's cache {folder} still differs from the shipped files after a rewrite")
        logger.warning("llava-uhd: rewrote damaged files of the cached default model in %s: %s", folder, damaged)
    return folder


__all__ = ["default_cache_root", "default_model_path"]
