"""One compute thread per pytest-xdist worker; and the real-width tier's steps as session fixtures (tests/realwidth.py),
shared by its transformers and vLLM tests: each runs once, in a process of its own, after the one it needs, so their
memory never adds up."""

import os
import sys

# Two pytest-xdist workers on two cores (README's `-n 2`): each worker, and each process a test starts, computes on one
# thread, so the workers do not oversubscribe the cores. Set before torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from realwidth import IMAGE_SIZE, OUTPUT_SHARD_GIB, ROOT, SCRIPT, convert_measured, run_measured  # noqa: E402
from tiny import photo  # noqa: E402


@pytest.fixture(scope="session")
def realwidth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("realwidth")


@pytest.fixture(scope="session")
def realwidth_checkpoint(realwidth_dir):
    """The random checkpoint: `llava/` (the authors' layout) and `clip/` in `realwidth_dir`."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # the checkout's modules
    command = [sys.executable, str(SCRIPT), "checkpoint", str(realwidth_dir)]
    result, peak, wall = run_measured(command, 900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\nreal width: checkpoint written in {wall:.0f} s (peak RssAnon {peak / 2**30:.2f} GiB)")
    return realwidth_dir


@pytest.fixture(scope="session")
def realwidth_conversion(realwidth_checkpoint):
    """The converter's command line on it into `converted/`, bf16, 0.5 GiB output shards (`realwidth.Conversion`)."""
    run = convert_measured(realwidth_checkpoint / "llava", realwidth_checkpoint / "clip",
                           realwidth_checkpoint / "converted", "--dtype", "bfloat16", "--max-shard-size",
                           str(OUTPUT_SHARD_GIB))  # fmt: skip
    print(f"\nreal width: converted in {run.wall:.0f} s (peak RssAnon {run.peak / 2**30:.2f} GiB, "
          f"{run.imports / 2**30:.2f} GiB of it the imports)")  # fmt: skip
    return run


@pytest.fixture(scope="session")
def realwidth_photo(realwidth_dir):
    path = realwidth_dir / "astronaut.png"
    photo("astronaut", IMAGE_SIZE).save(path)
    return path


@pytest.fixture(scope="session")
def realwidth_transformers(realwidth_conversion, realwidth_photo, realwidth_dir):
    """transformers' result on the converted folder (`realwidth.transformers_step`), as a path to its JSON file."""
    assert realwidth_conversion.result.returncode == 0, realwidth_conversion.result.stderr[-3000:]
    out = realwidth_dir / "transformers.json"
    folder = realwidth_conversion.output
    result, peak, wall = run_measured(
        [sys.executable, str(SCRIPT), "transformers", str(folder), str(realwidth_photo), str(out)],
        900,
        cwd=realwidth_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\nreal width: transformers in {wall:.0f} s (peak RssAnon {peak / 2**30:.2f} GiB)")
    return out
