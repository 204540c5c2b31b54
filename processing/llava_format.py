"""LLaVA-format data (`blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`, ...) as the `{"images", "messages"}`
rows TRL's `SFTTrainer` trains vision-language models on.

Rows keep image *paths*: nothing is decoded when the data is loaded. The images are opened by the data collator, in
the data-loader workers, when a batch needs them (see `processing.collator`).
"""

import json
import logging
import os
from collections import Counter
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
        self.reason = reason


def convert_llava_row(row: dict[str, Any], image_folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """One LLaVA-format row as a `{"id", "images", "messages"}` row.

    Every `<image>` is taken out of its turn's text and put first in that turn, as the reference does: the chat
    template renders it `<image>\\n` before the (stripped) text, or `<image>` alone when no text is left. A first turn
    that is the assistant's is dropped, as the reference drops it. Rows without `"image"` are text-only.

    Raises:
        BadRowError: unknown roles, no assistant answer, `<image>` placeholders that do not match the images, or an
            image file that does not exist.
    """
    row_id = str(row.get("id", "?"))
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = [os.path.join(image_folder, image) if image_folder else image for image in images]
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRowError(row_id, "malformed conversations", ": no `conversations` list")

    if isinstance(turns[0], dict) and ROLES.get(turns[0].get("from")) == "assistant":
        turns = turns[1:]  # as the reference, which skips a first turn that is not the human's
    messages, placeholders = [], 0
    for turn in turns:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        value = turn.get("value") if role else None
        if not isinstance(value, str):
            raise BadRowError(
                row_id, "malformed conversations", f": needs `from` in {sorted(ROLES)}, a str `value`: {turn!r}"
            )
        count = value.count(IMAGE_PLACEHOLDER)
        if count and role != "user":
            raise BadRowError(row_id, "malformed conversations", f": {IMAGE_PLACEHOLDER} outside a human turn")
        placeholders += count
        text = value.replace(IMAGE_PLACEHOLDER, "").strip() if count else value
        content = [{"type": "image", "text": None} for _ in range(count)]
        content += [{"type": "text", "text": text}] if text or not count else []
        messages.append({"role": role, "content": content})
    if placeholders != len(paths):
        raise BadRowError(row_id, "placeholders do not match images", f": {placeholders} for {len(paths)} image(s)")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRowError(row_id, "no assistant answer")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise BadRowError(row_id, "missing image file", f" {missing[0]!r}")
    return {"id": row_id, "images": paths, "messages": messages}


def load_llava_dataset(
    data_path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_bad_row: OnBadRow = "skip",
) -> Dataset:
    """Load a LLaVA-format JSON list or JSONL file into `{"id", "images", "messages"}` rows.

    Image files are checked to exist (a `stat`, not a decode). Bad rows are dropped with one warning that counts them
    by reason (`on_bad_row="skip"`) or stop the load with an error naming the first one (`"error"`).
    """
    with open(data_path, encoding="utf-8") as file:
        if str(data_path).endswith(".jsonl"):
            raw = [json.loads(line) for line in file if line.strip()]
        else:
            raw = json.load(file)
    if not isinstance(raw, list):
        raise ValueError(f"{data_path} must hold a JSON list of LLaVA-format rows, got {type(raw).__name__}.")

    rows, errors = [], []
    for row in raw:
        try:
            rows.append(convert_llava_row(row, image_folder))
        except BadRowError as error:
            if on_bad_row == "error":
                raise
            errors.append(error)
    if errors:
        reasons = Counter(error.reason for error in errors)
        logger.warning(
            f"Skipped {len(errors)} of {len(raw)} rows of {data_path} ({dict(reasons)}); first: {errors[0]}"
        )
    if not rows:
        raise ValueError(f"No usable rows in {data_path}.")
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
