"""What the conversion tools share: their error type, JSON reading, and one-line command-line errors."""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ConversionError(ValueError):
    """The original checkpoint cannot be converted; the message says what is wrong."""


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a ConversionError naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} could not be read as JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, expected an object.")
    return data


class OneLineParser(argparse.ArgumentParser):
    """An argument parser that reports usage errors in one line on stderr (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error: Exception) -> str:
    """An error as one line: its message, led by its type unless it is one of ours."""
    text = str(error) if isinstance(error, ConversionError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def reported(failure: str, action: Callable[[], T], debug: bool = False) -> T | None:
    """`action()`; if it fails, `None` once `{failure}: {the error}` is printed on one line of stderr (with `debug`,
    the error is raised instead, traceback and all)."""
    try:
        return action()
    except Exception as error:
        if debug:
            raise
        print(f"{failure}: {one_line(error)}", file=sys.stderr)
        return None


def print_summary(title: str, summary: dict) -> None:
    """A command's result: `title`, then one indented line per entry (lists joined with commas)."""
    print(title)
    width = max(map(len, summary)) + 1
    for key, value in summary.items():
        print(f"  {key:{width}s} {', '.join(value) if isinstance(value, list) else value}")
