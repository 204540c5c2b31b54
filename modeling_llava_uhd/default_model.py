"""The offline default model: a tiny LLaVA-UHD trained from scratch with this project's recipe on the fine-detail task
(which fine pattern fills a framed panel; see the README's "The default model"). Its weights ship inside this
package, so `llava-uhd chat` and the examples work on a machine without network access."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).parent
WEIGHTS = PACKAGE / "default_model_files"
# The remote code a saved model carries (`save_pretrained` copies these files next to the weights).
CODE_FILES = (
    "configuration_llava_uhd.py",
    "image_processing_llava_uhd.py",
    "modeling_llava_uhd.py",
    "processing_llava_uhd.py",
)


def _cache_root() -> Path:
    if "LLAVA_UHD_CACHE" in os.environ:
        return Path(os.environ["LLAVA_UHD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-uhd"


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the default model, ready for `from_pretrained(path, trust_remote_code=True)` with any Auto class
    and for `pipeline("image-text-to-text", model=path, trust_remote_code=True)`.

    The folder is the shipped weights, tokenizer and processor files plus this package's remote code, assembled once
    in `cache_dir` (default: `$LLAVA_UHD_CACHE`, else `~/.cache/llava-uhd`) under a name that changes with its
    contents.
    """
    sources = sorted(path for path in WEIGHTS.iterdir() if path.is_file()) + [PACKAGE / name for name in CODE_FILES]
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    folder = root / f"default-model-{digest.hexdigest()[:16]}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".default-model-", dir=root))
    try:
        for source in sources:
            shutil.copyfile(source, staging / source.name)
        staging.rename(folder)
    except OSError:
        if not folder.is_dir():  # not just another process assembling the same folder first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


__all__ = ["default_model_path"]
