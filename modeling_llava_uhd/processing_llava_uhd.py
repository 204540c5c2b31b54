"""Processor for LLaVA-UHD: tokenizer + image processor + Vicuna v1 chat template."""

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import LARGE_INTEGER

from .image_processing_llava_uhd import LlavaUhdImageProcessorKwargs, _check_positive_int
from .layout_llava_uhd import schema_ids, schema_token_counts

# Vicuna v1 (LLaVA-1.5) conversation format. It starts with the BOS, as the reference's samples do (the processor adds
# it once, so TRL's `add_special_tokens=False` and a plain processor call agree). `<image>` is followed by "\n" unless
# it ends its turn (the reference's "<image>\n" + question, and "<image>" alone). `{% generation %}` marks what the
# assistant says, so `return_assistant_tokens_mask` (and TRL's `assistant_only_loss`) covers exactly the answers and
# their `</s>`.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATE = (
    f'{{%- set system = "{SYSTEM_PROMPT}" -%}}'
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ system + ' ' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:' }}"
    "{%- generation -%}{{ ' ' + render(message['content']) + '</s>' }}{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('Roles must be system (first), user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class UnusableSampleError(ValueError):
    """A sample the processor cannot turn into model inputs: its images do not match its `<image>` placeholders, or
    `max_length` would cut through its image tokens. The message names the sample."""


class LlavaUhdProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: LlavaUhdImageProcessorKwargs
    # The text keywords the processor applies, with their defaults (a keyword given as `None` takes its default): the
    # schema is expanded on ids, so truncation, padding and offsets are computed on the expanded sequence.
    # transformers' other text keywords (pairs, targets, overflow, ...) cannot apply and are refused.
    _defaults = {
        "text_kwargs": {
            "padding": False,
            "truncation": False,
            "max_length": None,
            "pad_to_multiple_of": None,
            "padding_side": None,
            "add_special_tokens": True,
            "return_attention_mask": True,
            "return_offsets_mapping": False,
            "return_mm_token_type_ids": False,
            "return_text_replacement_offsets": False,
            "return_tensors": None,
            "verbose": True,
        }
    }


class LlavaUhdProcessor(ProcessorMixin):
    r"""
    LLaVA-UHD processor: slices images with [`LlavaUhdImageProcessor`] and expands every `<image>` of the text into
    the spatial schema, token ids in place: for each row of slices, each slice's `num_queries` image tokens followed
    by `slice_separator_id` (between the slices of a row) or `row_separator_id` (after a row's last slice), then the
    overview's `num_queries` image tokens. Separators are inserted as ids, never re-tokenized, as in the reference.

    Args:
        image_processor ([`LlavaUhdImageProcessor`]): the image processor.
        tokenizer: a tokenizer that has the `image_token` as a special token.
        chat_template (`str`, *optional*): defaults to the Vicuna v1 template.
        image_token (`str`, *optional*, defaults to `"<image>"`): the image placeholder token.
        num_queries (`int`, *optional*, defaults to 144): tokens per crop (the model's `num_queries`).
        slice_separator_id (`int`, *optional*): id between slices of a row (`,`; 29892 for Vicuna). Defaults to the
            tokenizer's id of `,` after a word.
        row_separator_id (`int`, *optional*): id after each row of slices (`\n`; 13 for Vicuna). Defaults to the
            tokenizer's id of `\n` after a word.
    """

    valid_processor_kwargs = LlavaUhdProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_queries: int = 144,
        slice_separator_id: int | None = None,
        row_separator_id: int | None = None,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("LlavaUhdProcessor needs both an `image_processor` and a `tokenizer`.")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it first: "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})`."
            )
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_queries = num_queries
        self.slice_separator_id = _char_id(tokenizer, ",") if slice_separator_id is None else slice_separator_id
        self.row_separator_id = _char_id(tokenizer, "\n") if row_separator_id is None else row_separator_id
        for name in ("slice_separator_id", "row_separator_id"):
            if not 0 <= getattr(self, name) < len(tokenizer):
                raise ValueError(
                    f"`{name}` {getattr(self, name)} is not an id of this {len(tokenizer)}-token tokenizer."
                )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def schema_ids(self, rows: int, cols: int) -> list[int]:
        """Token ids one image stands for in the sequence (see `schema_ids`)."""
        return schema_ids(
            rows, cols, self.num_queries, self.image_token_id, self.slice_separator_id, self.row_separator_id
        )

    def __call__(
        self,
        images: ImageInput | list[ImageInput] | None = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[LlavaUhdProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text`, slice `images` and expand each `<image>` of the text into its schema tokens.

        Images are matched to `<image>` placeholders in order: either a flat list over the whole batch, or one list per
        text. Keywords are merged as transformers' processors merge them (`text_kwargs` / `images_kwargs` or flat, the
        tokenizer's own settings as defaults, a keyword given twice refused, an unknown one warned about and ignored):
        the text ones are `padding`, `truncation` (to `max_length`, by default the tokenizer's `model_max_length`, as
        the tokenizer does; it refuses to cut through an image's tokens), `pad_to_multiple_of`, `padding_side`,
        `add_special_tokens`, `return_attention_mask`, `return_offsets_mapping`, `return_text_replacement_offsets`,
        `return_mm_token_type_ids`; the image ones are [`LlavaUhdImageProcessor`]'s (`max_slice_nums` trades detail
        for tokens).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when there are images, `pixel_values`,
            `image_grid_hw` and `slice_grid` (see [`LlavaUhdImageProcessor`]).
        """
        texts = _text_batch(text)
        settings, images_kwargs = self._settings(kwargs)
        with_offsets = settings["return_offsets_mapping"] or settings["return_text_replacement_offsets"]
        ids, offsets, spans = self._tokenize(texts, settings["add_special_tokens"], with_offsets)
        images = [image for group in self._assign_images(images, [len(s) for s in spans]) for image in group]
        data = dict(self.image_processor(images, **images_kwargs)) if images else {}
        grids = iter(data["slice_grid"].tolist() if images else [])
        max_length = settings["max_length"] if settings["truncation"] else None
        rows = [self._expand(index, *row, grids, max_length) for index, row in enumerate(zip(ids, offsets))]
        data.update(self._pad(rows, settings))
        if settings["return_text_replacement_offsets"]:  # the schema goes in as ids: every placeholder keeps its span
            token = self.image_token
            data["text_replacement_offsets"] = [
                [{"type": "image", "span": s, "new_span": s, "text": token, "replacement": token} for s in row]
                for row in spans
            ]
        tensor_type = settings["return_tensors"]
        return BatchFeature(data, tensor_type=tensor_type, skip_tensor_conversion=self.skip_tensor_conversion)

    def _settings(self, kwargs: dict) -> tuple[dict, dict]:
        """This call's text settings (its text keywords over their defaults, see `LlavaUhdProcessorKwargs`) and image
        keywords; `_pad` checks the padding ones. As the tokenizer, `max_length` defaults to its `model_max_length`
        (when that is set) for truncation and `padding="max_length"`."""
        merged = self._merge_kwargs(
            LlavaUhdProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        given, defaults = merged["text_kwargs"], LlavaUhdProcessorKwargs._defaults["text_kwargs"]
        if refused := sorted(
            key for key, value in given.items() if key not in defaults and value not in (None, False)
        ):
            raise ValueError(f"LlavaUhdProcessor does not support {refused} (the schema is expanded on token ids).")
        settings = {key: default if given.get(key) is None else given[key] for key, default in defaults.items()}
        for key in ("max_length", "pad_to_multiple_of"):
            if settings[key] is not None:
                _check_positive_int(key, settings[key])
        for key in ("padding", "truncation"):  # PaddingStrategy / TruncationStrategy, or their string values
            settings[key] = getattr(settings[key], "value", settings[key])
        settings["truncation"] = settings["truncation"] not in (False, "do_not_truncate")
        if settings["max_length"] is None and (settings["truncation"] or settings["padding"] == "max_length"):
            limit = self.tokenizer.model_max_length
            settings["max_length"] = limit if limit <= LARGE_INTEGER else None
        images_kwargs = {key: value for key, value in merged["images_kwargs"].items() if key != "return_tensors"}
        return settings, images_kwargs

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """Tokens each image of `(height, width)` stands for in the sequence (its schema, separators included) and its
        crops, with this call's image keywords (`max_slice_nums`, `max_image_size`)."""
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(LlavaUhdProcessorKwargs, **kwargs)["images_kwargs"]
        layouts = [
            self.image_processor.get_slice_layout(
                height, width, images_kwargs.get("max_slice_nums"), images_kwargs.get("max_image_size")
            )
            for height, width in image_sizes
        ]
        tokens = [sum(schema_token_counts(*(layout.grid or (0, 0)), self.num_queries)) for layout in layouts]
        return MultiModalData(num_image_tokens=tokens, num_image_patches=[layout.num_crops for layout in layouts])

    def _tokenize(
        self, texts: list[str], add_special_tokens: bool, return_offsets_mapping: bool
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, `<image>` placeholders as one image token each, and the
        character span of every placeholder of each text.

        As the reference's `tokenizer_image_token`, the text between placeholders is tokenized chunk by chunk, so every
        chunk starts as a text of its own (a sentencepiece tokenizer puts its dummy prefix `▁` there); only the first
        chunk gets the tokenizer's special tokens. A BOS written at the start of a text (chat templates write one) is
        that BOS: a text gets it once, whether `add_special_tokens` asks for it too or not.
        """
        bos, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        leading_bos = [bool(bos) and text.startswith(bos) for text in texts]
        chunks = [text[len(bos) if lead else 0 :].split(self.image_token) for text, lead in zip(texts, leading_bos)]

        def encode(pieces: list[str], special: bool) -> list[tuple[list[int], list]]:
            if not pieces:
                return []
            encoded = self.tokenizer(
                pieces,
                add_special_tokens=special,
                return_offsets_mapping=return_offsets_mapping,
                return_attention_mask=False,
            )
            ids = encoded["input_ids"]
            maps = encoded["offset_mapping"] if return_offsets_mapping else [[(0, 0)] * len(row) for row in ids]
            return list(zip(ids, maps))

        heads = encode([pieces[0] for pieces in chunks], add_special_tokens)
        adds_bos = add_special_tokens and self.tokenizer("")["input_ids"][:1] == [bos_id]
        tails = iter(encode([piece for pieces in chunks for piece in pieces[1:]], False))
        all_ids, all_offsets, all_spans = [], [], []
        for pieces, lead, head in zip(chunks, leading_bos, heads):
            position = len(bos) if lead else 0
            ids, offsets, spans = [], [], []
            for index, piece in enumerate(pieces):
                chunk_ids, chunk_offsets = next(tails) if index else head
                if index:
                    ids.append(self.image_token_id)
                    offsets.append((0, 0))
                    spans.append((position - len(self.image_token), position))
                ids += chunk_ids
                # Offsets into the whole text; tokens of no characters (the dummy prefix, specials) point nowhere.
                offsets += [(position + a, position + b) if b > a else (0, 0) for a, b in chunk_offsets]
                position += len(piece) + len(self.image_token)
            if lead:  # the BOS written in the text, in place of the one the tokenizer added
                if adds_bos:
                    ids, offsets = ids[1:], offsets[1:]
                ids, offsets = [bos_id, *ids], [(0, len(bos)), *offsets]
            all_ids.append(ids)
            all_offsets.append(offsets)
            all_spans.append(spans)
        return all_ids, all_offsets, all_spans

    def _assign_images(self, images, counts: list[int]) -> list[list]:
        """Group images per text, checking them against the number of `<image>` placeholders of each text."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) == len(counts) and all(isinstance(group, (list, tuple)) for group in images) and images
        if nested:
            groups = [list(group) for group in images]
            for sample, (group, count) in enumerate(zip(groups, counts)):
                if len(group) != count:
                    raise UnusableSampleError(
                        f"Sample {sample}: the text has {count} {self.image_token} placeholder(s) but "
                        f"{len(group)} image(s) were given for it."
                    )
            return groups
        flat = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if len(flat) != sum(counts):
            raise UnusableSampleError(
                f"The text has {sum(counts)} {self.image_token} placeholder(s) but {len(flat)} image(s) were given; "
                f"placeholders per sample: {counts}."
            )
        groups, start = [], 0
        for count in counts:
            groups.append(flat[start : start + count])
            start += count
        return groups

    def _expand(self, sample: int, ids: list[int], offsets: list, grids, max_length: int | None) -> dict[str, list]:
        """One text's ids with every image token expanded into the schema of the next grid of `grids`, with offsets
        and token types (1 on a schema), truncated to `max_length` (never through a schema: see `_truncation`)."""
        row = {"input_ids": [], "offset_mapping": [], "mm_token_type_ids": []}
        for token, offset in zip(ids, offsets):
            expanded = self.schema_ids(*next(grids)) if token == self.image_token_id else [token]
            row["input_ids"] += expanded
            row["offset_mapping"] += [tuple(offset)] * len(expanded)  # an image token's offsets are (0, 0)
            row["mm_token_type_ids"] += [int(token == self.image_token_id)] * len(expanded)
        if max_length is not None and len(row["input_ids"]) > max_length:
            kept = self._truncation(sample, row["mm_token_type_ids"], max_length)
            row = {name: column[kept] for name, column in row.items()}
        return row

    def _truncation(self, sample: int, types: list[int], max_length: int) -> slice:
        """The positions kept by truncating to `max_length` on the tokenizer's truncation side; cutting into an
        image's schema (`types` 1) is refused."""
        left = getattr(self.tokenizer, "truncation_side", "right") == "left"
        kept = slice(len(types) - max_length, None) if left else slice(0, max_length)
        dropped = types[: len(types) - max_length] if left else types[max_length:]
        if 1 in dropped:
            raise UnusableSampleError(
                f"Sample {sample}: truncating its {len(types)} tokens to max_length={max_length} would cut through "
                f"image tokens. Raise `max_length`, pass fewer images, or lower `max_slice_nums`."
            )
        return kept

    def _pad(self, rows: list[dict[str, list]], settings: dict) -> dict[str, list]:
        """The columns of the expanded `rows` that `settings` asks for: ids padded by the tokenizer, attention masks,
        offsets and token types padded alike."""
        ids, padding = [row["input_ids"] for row in rows], settings["padding"]
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(
                f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}."
            )
        if padding == "max_length" and settings["max_length"] is None:
            raise ValueError("`padding='max_length'` needs `max_length`: the tokenizer has no `model_max_length`.")
        if (side := settings["padding_side"] or self.tokenizer.padding_side) not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {side!r}.")
        if self.tokenizer.pad_token_id is None and padding not in (False, "do_not_pad"):
            # The tokenizer refuses to pad without a pad token, even a batch that needs no padding: that one passes.
            target = settings["max_length"] if padding == "max_length" else max(map(len, ids))
            multiple = settings["pad_to_multiple_of"] or 1
            if any(len(row) < -(-target // multiple) * multiple for row in ids):
                raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` to pad a batch.")
            padding = False
        padded = self.tokenizer.pad(
            {"input_ids": ids},
            padding=padding,
            max_length=settings["max_length"] if padding == "max_length" else None,
            pad_to_multiple_of=settings["pad_to_multiple_of"],
            padding_side=settings["padding_side"],
            return_attention_mask=True,
        )
        masks, columns = padded["attention_mask"], {"input_ids": padded["input_ids"]}
        if settings["return_attention_mask"]:
            columns["attention_mask"] = masks
        alike = (
            ("offset_mapping", (0, 0), "return_offsets_mapping"),
            ("mm_token_type_ids", 0, "return_mm_token_type_ids"),
        )
        for name, pad, flag in alike:  # padded where the tokenizer padded
            if settings[flag]:
                values = [iter(row[name]) for row in rows]
                columns[name] = [[next(v) if m else pad for m in mask] for v, mask in zip(values, masks)]
        return columns

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.image_processor.model_input_names]


def _text_batch(text: str | list[str] | None) -> list[str]:
    """`text` as a non-empty list of prompts."""
    if text is None:
        raise ValueError("`text` is required: a prompt (or list of prompts) with one `<image>` per image.")
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("`text` must be a string or a list of strings.")
    if not texts:
        raise ValueError("`text` is an empty list: pass at least one prompt.")
    return texts


def _char_id(tokenizer, char: str) -> int:
    """Id of `char` as a token of its own after a word (`,` -> 29892 and `\\n` -> 13 with Vicuna's tokenizer)."""
    word = tokenizer.encode("a", add_special_tokens=False)
    ids = tokenizer.encode("a" + char, add_special_tokens=False)
    if len(ids) != len(word) + 1 or ids[: len(word)] != word:
        raise ValueError(f"{char!r} is not a single token for this tokenizer; pass its separator id explicitly.")
    return ids[-1]


__all__ = ["LlavaUhdProcessor", "UnusableSampleError"]
