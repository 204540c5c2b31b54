"""LLaVA-format data (`blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`, ...) as the `{"images", "messages"}`
rows TRL's `SFTTrainer` trains vision-language models on.

Rows keep image *paths*: nothing is decoded when the data is loaded. The images are opened by the data collator, in
the data-loader workers, when a batch needs them (see `processing.collator`).
"""

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from datasets import Dataset, Image, List, load_dataset

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
OnBadRow = Literal["skip", "error"]


class BadRowError(ValueError):
    """A row that cannot be trained on; `reason` says why in a few words (the key of the skipped-rows count)."""

    def __init__(self, row_id: str, reason: str, detail: str = ""):
        super().__init__(f"Row {row_id}: {reason}{detail}")
        self.row_id, self.reason, self.detail = row_id, reason, detail

    def at(self, where: str) -> "BadRowError":
        """The same error naming where the row is (`"data.jsonl, line 4"`) besides its id."""
        row_id = f"at {where}" if self.row_id == "?" else f"{self.row_id} ({where})"
        return BadRowError(row_id, self.reason, self.detail)


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"`on_bad_row` must be 'skip' or 'error', got {on_bad_row!r}.")


def brief(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_paths(
    row_id: str, images: Any, image_folder: str | os.PathLike | None, allow_paths_outside_image_folder: bool
) -> list[str]:
    """The paths of a row's `image` field (missing, `null` or `""`: none), joined to `image_folder`."""
    if images is None or images == "":
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise BadRowError(
            row_id, "malformed image field", f": `image` must be a path or a list of paths, got {brief(images)}"
        )
    if not image_folder:
        return images
    paths = [os.path.join(image_folder, image) for image in images]
    if not allow_paths_outside_image_folder:
        # On the path as written: a `..` or an absolute path may leave the folder; symlinks inside it are followed.
        folder = os.path.abspath(image_folder)
        for image, path in zip(images, paths):
            if os.path.commonpath([folder, os.path.abspath(path)]) != folder:
                raise BadRowError(
                    row_id,
                    "image path outside image_folder",
                    f": {image!r} is not inside {os.fspath(image_folder)!r} (`allow_paths_outside_image_folder` "
                    "accepts it)",
                )
    return paths


def convert_llava_row(
    row: dict[str, Any],
    image_folder: str | os.PathLike | None = None,
    *,
    allow_paths_outside_image_folder: bool = False,
) -> dict[str, Any]:
    """One LLaVA-format row as a `{"id", "images", "messages"}` row.

    Every `<image>` is taken out of its turn's text and put first in that turn, as the reference does: the chat
    template renders it `<image>\\n` before the (stripped) text, or `<image>` alone when no text is left. A first turn
    that is the assistant's is dropped, as the reference drops it. Rows without `"image"` are text-only.

    Image paths are joined to `image_folder` and must stay inside it as written (no `..` out of it, no absolute path
    elsewhere; an absolute path inside it is accepted) unless `allow_paths_outside_image_folder`; symlinks inside the
    folder are followed, not checked. Without `image_folder`, paths are used as given (relative to the current
    directory).

    Raises:
        BadRowError: a row that is not a JSON object, an `image` field that is not a path or a list of paths, malformed
            conversations or turns, no assistant answer, `<image>` placeholders that do not match the images, an image
            path outside `image_folder`, or an image file that does not exist.
    """
    if not isinstance(row, dict):
        raise BadRowError("?", "not an object", f": a row must be a JSON object, got {brief(row)}")
    row_id = str(row.get("id", "?"))
    paths = _image_paths(row_id, row.get("image"), image_folder, allow_paths_outside_image_folder)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRowError(
            row_id, "malformed conversations", f": `conversations` must be a non-empty list, got {brief(turns)}"
        )

    if isinstance(turns[0], dict) and ROLES.get(str(turns[0].get("from"))) == "assistant":
        turns = turns[1:]  # as the reference, which skips a first turn that is not the human's
    messages, placeholders = [], 0
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRowError(row_id, "malformed turn", f": a turn must be a JSON object, got {brief(turn)}")
        speaker, value = turn.get("from"), turn.get("value")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(value, str):
            raise BadRowError(
                row_id, "malformed turn", f": needs `from` in {sorted(ROLES)} and a str `value`, got {brief(turn)}"
            )
        count = value.count(IMAGE_PLACEHOLDER)
        if count and role != "user":
            raise BadRowError(row_id, "malformed turn", f": {IMAGE_PLACEHOLDER} outside a human turn")
        placeholders += count
        text = value.replace(IMAGE_PLACEHOLDER, "").strip() if count else value
        content = [{"type": "image", "text": None} for _ in range(count)]
        content += [{"type": "text", "text": text}] if text or not count else []
        messages.append({"role": role, "content": content})
    if placeholders != len(paths):
        raise BadRowError(
            row_id,
            "placeholders do not match images",
            f": {placeholders} {IMAGE_PLACEHOLDER} for {len(paths)} image(s)",
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRowError(row_id, "no assistant answer")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise BadRowError(row_id, "missing image file", f" {missing[0]!r}")
    return {"id": row_id, "images": paths, "messages": messages}


def _json_problem(error: Exception) -> str:
    """What `json.loads` found wrong; Python's parser recurses per nesting level, so nesting as deep as its recursion
    limit is refused like any other invalid JSON."""
    if isinstance(error, RecursionError):
        return f"nested too deeply to parse (Python's recursion limit is {sys.getrecursionlimit()})"
    return str(error)


def _read_json_list(data_path: str | os.PathLike) -> list:
    """The rows of a JSON list file (none for an empty file)."""
    with open(data_path, "rb") as file:
        text = file.read()
    if not text.strip():
        return []
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(
            f"{data_path} is not valid JSON ({_json_problem(error)}). LLaVA-format data is a JSON list of rows, or "
            "JSONL (one row per line) in a file whose name ends in `.jsonl`."
        ) from None
    if not isinstance(raw, list):
        kind = type(raw).__name__
        raise ValueError(f"{data_path} must hold a JSON list of LLaVA-format rows, got {kind}.")  # noqa: TRY004
    return raw


def _read_rows(data_path: str | os.PathLike) -> Iterator[tuple[str, Any, BadRowError | None]]:
    """`(where, row, error)` for each row of a JSONL file (`where`: `"line 4"`; a line that does not parse gives an
    `error`) or of a JSON list (`"index 3"`)."""
    if not os.fspath(data_path).lower().endswith(".jsonl"):
        for index, row in enumerate(_read_json_list(data_path)):
            yield f"index {index}", row, None
        return
    with open(data_path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row, error = json.loads(line), None
            except (ValueError, RecursionError) as problem:  # JSONDecodeError, bytes that are not UTF-8, deep nesting
                row, error = None, BadRowError("?", "invalid JSON", f": {_json_problem(problem)}")
            yield f"line {number}", row, error


def load_llava_dataset(
    data_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_bad_row: OnBadRow = "skip",
    *,
    allow_paths_outside_image_folder: bool = False,
) -> Dataset:
    """Load a LLaVA-format JSON list or JSONL file into `{"id", "images", "messages"}` rows.

    Image files are checked to exist (a `stat`, not a decode) and, with `image_folder`, to be inside it (see
    [`convert_llava_row`]). Bad rows (see [`convert_llava_row`]; for JSONL also a line that is not valid JSON) are
    dropped with one warning that counts them by reason (`on_bad_row="skip"`) or stop the load with a [`BadRowError`]
    naming the file, the row (JSONL line number or JSON list index) and the reason (`"error"`).

    Raises:
        ValueError: a JSON file that does not parse or is not a list, a file without rows or without usable ones, an
            `image_folder` that is not a folder.
    """
    check_on_bad_row(on_bad_row)
    if image_folder and not os.path.isdir(image_folder):
        raise ValueError(f"`image_folder` {os.fspath(image_folder)!r} is not a folder.")
    rows, reasons, first, total = [], Counter(), None, 0
    for where, row, error in _read_rows(data_path):
        total += 1
        try:
            if error is not None:
                raise error
            rows.append(
                convert_llava_row(row, image_folder, allow_paths_outside_image_folder=allow_paths_outside_image_folder)
            )
        except BadRowError as bad:
            located = bad.at(f"{data_path}, {where}")
            if on_bad_row == "error":
                raise located from None
            reasons[bad.reason] += 1
            first = first or located
    if not total:
        raise ValueError(f"{data_path} holds no rows (an empty file or list).")
    if reasons:
        logger.warning(f"Skipped {reasons.total()} of {total} rows of {data_path} ({dict(reasons)}); first: {first}")
    if not rows:
        raise ValueError(f"No usable rows in {data_path}: all {total} were bad ({dict(reasons)}).")
    return Dataset.from_list(rows)


def load_messages_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    """A Hub (or local `datasets`) dataset already in messages form: a `messages` column and optionally `images` or
    `image`. Image columns are switched to undecoded (`{"bytes", "path"}`), so they too are decoded by the collator,
    per row, instead of when a row is read."""
    dataset = load_dataset(name, split=split, **kwargs)
    if "messages" not in dataset.column_names:
        raise ValueError(f"{name} has no `messages` column (columns: {dataset.column_names}).")
    for column in ("image", "images"):
        feature = dataset.features.get(column)
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


__all__ = ["BadRowError", "OnBadRow", "convert_llava_row", "load_llava_dataset", "load_messages_dataset"]
