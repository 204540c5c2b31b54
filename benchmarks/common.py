"""Timing, tables, the machine's description and test photos shared by the benchmarks."""

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image


def median_seconds(
    functions: dict[str, Callable[[], object]], iterations: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median wall time of each function. One warm-up call each, then `iterations` rounds that call every function
    once in turn, so that a slow phase of a shared machine hits all of them alike."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()
    sync()
    for _ in range(iterations):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, numbers as given (format them before)."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def machine(device: str = "cpu") -> str:
    """CPU model, usable cores and torch threads (and the GPU when `device` is CUDA)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{model}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if str(device).startswith("cuda"):
        description += f", {torch.cuda.get_device_name(device)}"
    return description


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def photos(sizes: Sequence[tuple[int, int]]) -> list[Image.Image]:
    """scikit-image's bundled photos (cycled), RGB, resized with PIL bicubic to each `(width, height)`."""
    from skimage import data

    images = []
    for index, size in enumerate(sizes):
        photo = Image.fromarray(getattr(data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
        images.append(photo.resize(size, Image.Resampling.BICUBIC))
    return images


def parse_size(text: str) -> tuple[int, int]:
    """`"1088x672"` -> `(1088, 672)` (width x height)."""
    width, height = text.lower().split("x")
    return int(width), int(height)


def transformers_class(name: str) -> type:
    """`transformers.<name>`, without the log line it prints when it falls back to a PIL backend (the class's own
    name tells which one it is)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return getattr(importlib.import_module("transformers"), name)
    finally:
        logging.set_verbosity(verbosity)
