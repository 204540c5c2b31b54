"""Processor for LLaVA-UHD: tokenizer + image processor + Vicuna v1 chat template."""

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import LARGE_INTEGER

from .image_processing_llava_uhd import LlavaUhdImageProcessorKwargs, _check_positive_int

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


def schema_ids(
    rows: int, cols: int, num_queries: int, image_token_id: int, slice_separator_id: int, row_separator_id: int
) -> list[int]:
    """The spatial schema of a `rows x cols` slice grid (0 x 0: unsliced): each row's slices as `num_queries` image
    tokens followed by the slice separator (the row separator after the row's last slice), then the overview."""
    crop = [image_token_id] * num_queries
    ids = []
    for _ in range(rows):
        for col in range(cols):
            ids += crop + [slice_separator_id if col < cols - 1 else row_separator_id]
    return ids + crop


class LlavaUhdProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: LlavaUhdImageProcessorKwargs
    _defaults = {}  # a TypedDict does not inherit it, and transformers before 5.24 reads it


# Text keywords the processor applies itself: the schema is expanded on ids, so padding, truncation and offsets are
# computed on the expanded sequence. transformers' other text keywords (pairs, targets, overflow, ...) do not apply.
TEXT_OPTIONS = {
    "padding": False,
    "truncation": None,
    "max_length": None,
    "pad_to_multiple_of": None,
    "padding_side": None,
    "add_special_tokens": True,
    "return_attention_mask": True,
    "return_offsets_mapping": False,
    "return_tensors": None,
    "verbose": True,
}
OUTPUT_FLAGS = ("return_text_replacement_offsets", "return_mm_token_type_ids")


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
        if text is None:
            raise ValueError("`text` is required: a prompt (or list of prompts) with one `<image>` per image.")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        if not texts:
            raise ValueError("`text` is an empty list: pass at least one prompt.")
        merged = self._merge_kwargs(
            LlavaUhdProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        options, flags = self._text_options(merged)
        images_kwargs = {key: value for key, value in merged["images_kwargs"].items() if key != "return_tensors"}
        return_offsets_mapping = options["return_offsets_mapping"]
        encoded_ids, encoded_offsets, placeholders = self._tokenize(
            texts, options["add_special_tokens"], return_offsets_mapping or flags["return_text_replacement_offsets"]
        )
        counts = [len(spans) for spans in placeholders]
        flat_images = [image for group in self._assign_images(images, counts) for image in group]
        data, grids = {}, []
        if flat_images:
            image_inputs = self.image_processor(flat_images, **images_kwargs)
            data.update(image_inputs)
            grids = image_inputs["slice_grid"].tolist()

        input_ids, offsets, types = [], [], []  # types: 1 on an image's schema (image tokens and separators)
        image_index = 0
        for sample, (ids, sample_map) in enumerate(zip(encoded_ids, encoded_offsets)):
            sample_ids, sample_offsets, sample_types = [], [], []
            for token, offset in zip(ids, sample_map):
                if token == self.image_token_id:
                    schema = self.schema_ids(*grids[image_index])
                    image_index += 1
                    sample_ids += schema
                    sample_offsets += [(0, 0)] * len(schema)
                    sample_types += [1] * len(schema)
                else:
                    sample_ids.append(token)
                    sample_offsets.append(tuple(offset))
                    sample_types.append(0)
            kept = slice(None)
            max_length = options["max_length"]
            if options["truncation"] and max_length is not None and len(sample_ids) > max_length:
                kept = self._truncation(sample, sample_types, max_length)
            input_ids.append(sample_ids[kept])
            offsets.append(sample_offsets[kept])
            types.append(sample_types[kept])

        data.update(
            self._pad(
                input_ids,
                offsets,
                types,
                options["padding"],
                options["max_length"],
                options["pad_to_multiple_of"],
                options["padding_side"],
            )
        )
        if not return_offsets_mapping:
            data.pop("offset_mapping")
        if not options["return_attention_mask"]:
            data.pop("attention_mask")
        if flags["return_text_replacement_offsets"]:
            # Offsets refer to the text as written: the schema goes in as ids, so no character moves and every
            # placeholder keeps its span.
            token = self.image_token
            data["text_replacement_offsets"] = [
                [
                    {"type": "image", "span": span, "new_span": span, "text": token, "replacement": token}
                    for span in spans
                ]
                for spans in placeholders
            ]
        if not flags["return_mm_token_type_ids"]:
            data.pop("mm_token_type_ids")
        return BatchFeature(
            data=data, tensor_type=options["return_tensors"], skip_tensor_conversion=self.skip_tensor_conversion
        )

    def _text_options(self, merged: dict) -> tuple[dict, dict]:
        """The text keywords this processor applies (with their defaults) and the output flags, from merged kwargs;
        text keywords that cannot apply to an expanded sequence are refused. As the tokenizer, `max_length` defaults to
        its `model_max_length` (when that is set) for truncation and `padding="max_length"`."""
        text_kwargs = dict(merged["text_kwargs"])
        flags = {key: bool(text_kwargs.pop(key, merged.get(key))) for key in OUTPUT_FLAGS}
        options = {key: text_kwargs.pop(key, default) for key, default in TEXT_OPTIONS.items()}
        options = {key: default if options[key] is None else options[key] for key, default in TEXT_OPTIONS.items()}
        if refused := sorted(key for key, value in text_kwargs.items() if value not in (None, False)):
            raise ValueError(f"LlavaUhdProcessor does not support {refused} (the schema is expanded on token ids).")
        for key in ("padding", "truncation"):  # PaddingStrategy / TruncationStrategy, or their string values
            options[key] = getattr(options[key], "value", options[key])
        options["truncation"] = options["truncation"] not in (None, False, "do_not_truncate")
        for key in ("max_length", "pad_to_multiple_of"):
            if options[key] is not None:
                _check_positive_int(key, options[key])
        limit = self.tokenizer.model_max_length
        if options["max_length"] is None and (options["truncation"] or options["padding"] == "max_length"):
            options["max_length"] = limit if limit <= LARGE_INTEGER else None
        return options, flags

    def retokenize(self, input_ids: list[int]) -> list[int]:
        """The ids of a prompt tokenized as one text (as serving engines such as vLLM do) made the ids this processor
        gives: the text after each `<image>` tokenized as a text of its own, as the reference does (with the release's
        `legacy=False` sentencepiece tokenizer, it starts with the dummy prefix `▁` only then). The ids before the first
        `<image>` are kept. Each piece's text is read back from its ids (decoded from its `<image>` on, so the decoder
        drops no space; a leading space is the tokenizer's own prefix when the text without it gives the same ids); a
        piece whose text cannot be read back exactly is kept as it came."""
        image = self.image_token_id
        starts = [index for index, token in enumerate(input_ids) if token == image]
        ids = list(input_ids[: starts[0]] if starts else input_ids)
        for start, end in zip(starts, [*starts[1:], len(input_ids)]):
            piece = list(input_ids[start:end])
            text = self.tokenizer.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text = text[len(self.image_token) :]
            candidates = [text, text[1:]] if text.startswith(" ") else [text]
            read = [
                t
                for t in candidates
                if self.tokenizer(self.image_token + t, add_special_tokens=False)["input_ids"] == piece
            ]
            ids += self._tokenize([self.image_token + read[0]], False, False)[0][0] if read else piece
        return ids

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
        tokens = [len(self.schema_ids(*(layout.grid or (0, 0)))) for layout in layouts]
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

    def _pad(self, input_ids, offsets, types, padding, max_length, pad_to_multiple_of, padding_side) -> dict:
        lengths = [len(ids) for ids in input_ids]
        if padding is True or padding == "longest":
            target = max(lengths, default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("`padding='max_length'` needs `max_length`: the tokenizer has no `model_max_length`.")
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(
                f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}."
            )
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {side!r}.")
        if target is not None and self.tokenizer.pad_token_id is None and any(n < target for n in lengths):
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` to pad a batch.")
        columns = {  # name: (rows, padding value)
            "input_ids": (input_ids, self.tokenizer.pad_token_id),
            "attention_mask": ([[1] * len(ids) for ids in input_ids], 0),
            "offset_mapping": (offsets, (0, 0)),
            "mm_token_type_ids": (types, 0),
        }
        out = {}
        for name, (rows, value) in columns.items():
            pads = [[value] * max((target or 0) - len(row), 0) for row in rows]
            out[name] = [pad + row if side == "left" else row + pad for row, pad in zip(rows, pads)]
        return out

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.image_processor.model_input_names]


def _char_id(tokenizer, char: str) -> int:
    """Id of `char` as a token of its own after a word (`,` -> 29892 and `\\n` -> 13 with Vicuna's tokenizer)."""
    word = tokenizer.encode("a", add_special_tokens=False)
    ids = tokenizer.encode("a" + char, add_special_tokens=False)
    if len(ids) != len(word) + 1 or ids[: len(word)] != word:
        raise ValueError(f"{char!r} is not a single token for this tokenizer; pass its separator id explicitly.")
    return ids[-1]


__all__ = ["LlavaUhdProcessor", "UnusableSampleError"]
