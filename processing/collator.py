"""Batches for `SFTTrainer`: TRL's vision-language collator with LLaVA-UHD's training formats and bad-row handling."""

import copy
import io
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Dataset
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from modeling_llava_uhd import LlavaUhdProcessor, UnusableSampleError
from modeling_llava_uhd.image_processing_llava_uhd import NO_PRE_RESIZE, legacy_max_image_size
from modeling_llava_uhd.layout_llava_uhd import image_schema_mask

from .llava_format import BadRowError, OnBadRow, brief, check_on_bad_row

logger = logging.getLogger(__name__)

# Stage 1 ("plain" in the reference): `<image>` then the caption then "\n"; the human's text is dropped and the loss
# covers the caption and its "\n". Contents are lists of typed items (TRL structures them before rendering). Like the
# chat template it starts with the BOS, which the processor adds once.
PLAIN_CHAT_TEMPLATE = (
    "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
ChatFormat = Literal["plain", "chat"]
_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# What a row can make the processor raise: `UnusableSampleError` (images that do not match its `<image>` placeholders,
# image tokens that do not fit in `max_length`) and the chat template's `raise_exception` (roles out of order). Any other
# error (a code regression, a template that does not compile) is nobody's row's fault and is raised at once.
_COLLATE_ERRORS = (UnusableSampleError, TemplateError)
IGNORE_INDEX = -100


def training_chat_template(processor: LlavaUhdProcessor, chat_format: ChatFormat) -> str:
    """The template a training batch is rendered with: stage 1's `"plain"` format, or the processor's own chat template
    (`"chat"`, Vicuna v1)."""
    if chat_format == "plain":
        return PLAIN_CHAT_TEMPLATE
    if chat_format == "chat":
        return processor.chat_template
    raise ValueError(f"`chat_format` must be 'plain' or 'chat', got {chat_format!r}.")


def open_image(image: Any) -> Image.Image:
    """Decode a path, an undecoded `datasets` image (`{"bytes", "path"}`) or a PIL image completely, so that a missing,
    corrupt or truncated file fails here, and no image (a null, or `{"bytes": None, "path": None}`) with a
    `ValueError`."""
    source = image
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
    if isinstance(source, (str, os.PathLike, io.BytesIO)):
        source = Image.open(source)
    elif not isinstance(source, Image.Image):
        raise ValueError(f"no image: expected a path, a PIL image or a `datasets` image, got {brief(image)}")
    source.load()
    return source


@dataclass
class LlavaUhdDataCollator:
    """
    TRL's [`DataCollatorForVisionLanguageModeling`] made safe for long runs on large LLaVA-format datasets.

    Rows hold image paths (or undecoded images); they are opened here, in the data-loader workers, when a batch is
    built. A row that cannot be used (an image that does not decode, image tokens that would not fit in
    `max_length`, placeholders that do not match its images, no supervised token left: every label -100, e.g. its
    answer truncated away by `max_length`) raises a [`BadRowError`] naming it (`on_bad_row="error"`), or is replaced
    by a random usable row of `dataset` with a warning that counts the replacements of this worker (`"skip"`), so the
    batch keeps its size and training its course (and its loss a number). Labels are -100 on every image's schema (its
    image tokens and separators, as the reference labels all of an image's features) whatever the loss mode.

    Args:
        collator: TRL's collator, built with the processor and chat template of the training stage.
        dataset: the dataset replacement rows are drawn from (required by `on_bad_row="skip"`).
        on_bad_row: `"skip"` or `"error"`.
        seed: seed of the replacement draws.
        max_replacements: draws for one row before giving up (a dataset of bad rows).
    """

    collator: DataCollatorForVisionLanguageModeling
    dataset: Dataset | None = None
    on_bad_row: OnBadRow = "skip"
    seed: int = 0
    max_replacements: int = 100
    num_replaced: int = field(default=0, init=False)

    def __post_init__(self):
        check_on_bad_row(self.on_bad_row)
        if self.on_bad_row == "skip" and self.dataset is None:
            raise ValueError("`on_bad_row='skip'` needs the `dataset` that replacement rows are drawn from.")
        self._rng = random.Random(self.seed)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._usable(example, alone=False) for example in examples]
        try:
            batch = self._collate(rows)
        except TemplateSyntaxError:
            raise
        except _COLLATE_ERRORS:
            # Some row cannot be processed (e.g. its image tokens do not fit in `max_length`): find it and replace it.
            # A failure that no single row causes is raised again by the second call.
            rows = [self._usable(row, alone=True) for row in rows]
            return self._collate(rows)
        unsupervised = [index for index, supervised in enumerate(self._supervised(batch)) if not supervised]
        if not unsupervised:
            return batch
        # Truncation is per row, so a row has the same labels alone as in the batch: checked alone, it is replaced.
        for index in unsupervised:
            rows[index] = self._usable(rows[index], alone=True)
        return self._collate(rows)

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        processor = self.collator.processor
        schema = image_schema_mask(
            batch["input_ids"], processor.image_token_id, batch.get("slice_grid"), processor.num_queries
        )
        batch["labels"][schema] = IGNORE_INDEX
        return batch

    @staticmethod
    def _supervised(batch: dict[str, Any]) -> list[bool]:
        """Whether each row of `batch` has a label to learn (a row of -100 only adds nothing, or NaN, to the loss)."""
        return (batch["labels"] != IGNORE_INDEX).any(dim=1).tolist()

    def _usable(self, example: dict[str, Any], alone: bool) -> dict[str, Any]:
        """`example` with its images decoded, or a replacement; `alone` also collates it on its own as a check."""
        failure = cause = None
        for _ in range(self.max_replacements):
            row_id = str(example.get("id", "?"))
            try:
                row = self._with_images(example)
            except _IMAGE_ERRORS as error:
                failure, cause = BadRowError(row_id, "unreadable image", f": {error}"), error
            else:
                if not alone:
                    return row
                try:
                    supervised = self._supervised(self._collate([row]))[0]
                except TemplateSyntaxError:
                    raise
                except _COLLATE_ERRORS as error:
                    failure, cause = BadRowError(row_id, "cannot be collated", f": {error}"), error
                else:
                    if supervised:
                        return row
                    failure, cause = BadRowError(row_id, "no supervised tokens", self._unsupervised_detail()), None
            if self.on_bad_row == "error":
                raise failure from cause
            self.num_replaced += 1
            logger.warning(f"{failure} Replaced by a random row ({self.num_replaced} replaced so far in this worker).")
            example = self.dataset[self._rng.randrange(len(self.dataset))]
        raise RuntimeError(
            f"{self.max_replacements} rows drawn in a row were unusable: check the dataset and the collator settings "
            f"(a failure every row meets is a bug, not bad data). The last one: {failure}"
        ) from cause

    def _unsupervised_detail(self) -> str:
        cut = f"its answer cut off by max_length={self.collator.max_length}, or " if self.collator.max_length else ""
        return f": every label is {IGNORE_INDEX} after collation ({cut}no assistant answer), nothing to learn"

    @staticmethod
    def _with_images(example: dict[str, Any]) -> dict[str, Any]:
        images = example.get("images")
        if images is None:
            images = [] if example.get("image") is None else [example["image"]]
        row = {key: value for key, value in example.items() if key != "image"}
        row["images"] = [open_image(image) for image in images]
        return row


def make_collator(
    processor: LlavaUhdProcessor,
    chat_format: ChatFormat = "chat",
    max_length: int | None = None,
    max_slice_nums: int | None = None,
    max_image_size: int = NO_PRE_RESIZE,
    assistant_only_loss: bool = True,
    pad_to_multiple_of: int | None = None,
    dataset: Dataset | None = None,
    on_bad_row: OnBadRow = "skip",
    seed: int = 0,
) -> LlavaUhdDataCollator:
    """The collator of a training stage.

    It works on a copy of `processor` (TRL's collator calls the processor itself and passes it no image keywords),
    so the processor saved with the model keeps its inference settings: `max_slice_nums` (1: overview only, stage 1;
    `None`: the processor's) and `max_image_size` (the long-side pre-resize of the reference's evaluation, which its
    training skipped: 0, no pre-resize) apply to training batches only.
    """
    processor = copy.deepcopy(processor)
    if max_slice_nums is not None:
        processor.image_processor.max_slice_nums = max_slice_nums
    processor.image_processor.max_image_size = legacy_max_image_size(max_image_size)
    collator = DataCollatorForVisionLanguageModeling(
        processor=processor,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        assistant_only_loss=assistant_only_loss,
        chat_template=training_chat_template(processor, chat_format),
    )
    return LlavaUhdDataCollator(collator, dataset=dataset, on_bad_row=on_bad_row, seed=seed)


__all__ = ["PLAIN_CHAT_TEMPLATE", "LlavaUhdDataCollator", "make_collator", "open_image", "training_chat_template"]
