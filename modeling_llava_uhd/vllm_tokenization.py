"""Prompt ids for serving engines that tokenize a prompt as one text (vLLM): made the ids the reference gives.

Used by the vLLM integration (`vllm_llava_uhd.py`); importable without vLLM. Not part of the Hub bundle.
"""

from transformers.utils import logging

from .processing_llava_uhd import LlavaUhdProcessor

logger = logging.get_logger(__name__)
# Whether this process was told that a piece of a prompt could not be read back (it is told once).
_warned_unreadable = False


def retokenize(processor: LlavaUhdProcessor, input_ids: list[int]) -> list[int]:
    """The ids of a prompt tokenized as one text (as serving engines such as vLLM do) made the ids `processor` gives:
    the text after each `<image>` tokenized as a text of its own, as the reference does (with the release's
    `legacy=False` sentencepiece tokenizer, it starts with the dummy prefix `▁` only then). The ids before the first
    `<image>` are kept. Each piece's text is read back from its ids (decoded from its `<image>` on, so the decoder
    drops no space; a leading space is the tokenizer's own prefix when the text without it gives the same ids); a
    piece whose text cannot be read back exactly is kept as it came, with a warning (once per process)."""
    global _warned_unreadable
    tokenizer, image_token = processor.tokenizer, processor.image_token
    starts = [index for index, token in enumerate(input_ids) if token == processor.image_token_id]
    ids = list(input_ids[: starts[0]] if starts else input_ids)
    for start, end in zip(starts, [*starts[1:], len(input_ids)]):
        piece = list(input_ids[start:end])
        text = tokenizer.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = text[len(image_token) :]
        candidates = [text, text[1:]] if text.startswith(" ") else [text]
        read = [t for t in candidates if tokenizer(image_token + t, add_special_tokens=False)["input_ids"] == piece]
        if read:
            ids += processor._tokenize([image_token + read[0]], False, False)[0][0]
            continue
        if not _warned_unreadable:
            _warned_unreadable = True
            logger.warning(
                f"The text after {image_token} in a prompt ({text[:40]!r}...) could not be read back from its ids: "
                "they are kept as the engine tokenized them, which can differ from the reference's tokenization. "
                "(Warned once per process.)"
            )
        ids += piece
    return ids
