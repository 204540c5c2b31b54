"""The tokenizer of an original checkpoint, as a fast tokenizer that tokenizes exactly as the authors' one did.

The released LLaVA-UHD (Vicuna-v1.5) ships a sentencepiece `tokenizer.model` and no `tokenizer.json`; the authors
ran it through transformers 4.37's slow `LlamaTokenizer`, i.e. sentencepiece itself. transformers 5 converts such a
file with BPE merges ranked by piece id, so runs of spaces tokenize differently (`"a  b"`: `▁a ▁▁ b` instead of
sentencepiece's `▁a ▁ ▁b`), and it loads a Llama `tokenizer.json` through a class that rebuilds its pre-tokenizer,
dropping the original `legacy` setting. Here the merges are ranked by sentencepiece's piece scores (sentencepiece
merges the highest-scoring pair first, leftmost among equals), and the dummy prefix is applied exactly as
sentencepiece and the slow tokenizer do: before every text (`legacy=True`) or only at the very start of the input
(`legacy=False`), whether or not the text starts with a space.
"""

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges
from transformers.utils import cached_file

from .common import ConversionError

SPIECE_UNDERLINE = "▁"
# sentencepiece's ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
BPE_MODEL = 2
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"
)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")


class TokenizerConversionError(ConversionError):
    """The original tokenizer cannot be read or reproduced; the message says why."""


def load_original_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder or Hub repo: its `tokenizer.json` when it has one (Qwen2, fast Llama exports),
    otherwise its sentencepiece `tokenizer.model` converted exactly (`sentencepiece_tokenizer`)."""
    files = {
        name: cached_file(str(source), name, _raise_exceptions_for_missing_entries=False) for name in TOKENIZER_FILES
    }
    if files["tokenizer.json"] is None and files["tokenizer.model"] is not None:
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
            if files[name] is not None:
                settings.update(json.loads(Path(files[name]).read_text(encoding="utf-8")))
        if "added_tokens_decoder" not in settings and files["added_tokens.json"] is not None:
            settings["added_tokens_decoder"] = _legacy_added_tokens(files["added_tokens.json"], settings)
        return sentencepiece_tokenizer(files["tokenizer.model"], settings)
    return AutoTokenizer.from_pretrained(source, config=model_config(source))


def model_config(source: str | Path) -> PreTrainedConfig:
    """The model config that `AutoTokenizer` reads beside a tokenizer, read as it reads it but without the warning its
    fallback gives for a model type transformers does not know (the originals' `llava_llama`, `llava_qwen2`)."""
    try:
        return AutoConfig.from_pretrained(source)
    except (ValueError, OSError):
        return PreTrainedConfig.from_dict(PreTrainedConfig.get_config_dict(source)[0])


def sentencepiece_tokenizer(model_file: str | Path, settings: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to the slow sentencepiece `LlamaTokenizer` of transformers 4.37 built from `model_file`
    and the original `tokenizer_config.json` / `special_tokens_map.json` values in `settings` (`legacy`,
    `add_bos_token`, `add_eos_token`, special tokens, `model_max_length`, `padding_side`, ...)."""
    proto = _read_model(model_file)
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != BPE_MODEL:
        raise TokenizerConversionError(f"{model_file} is not a BPE sentencepiece model; only BPE (Llama) is read.")
    if spec.name != "identity" or spec.precompiled_charsmap or spec.remove_extra_whitespaces:
        raise TokenizerConversionError(
            f"{model_file} normalizes its input ({spec.name!r}, "
            f"remove_extra_whitespaces={spec.remove_extra_whitespaces}); "
            "only the identity normalization of Llama tokenizers is supported."
        )
    if any(piece.type == USER_DEFINED for piece in proto.pieces):
        raise TokenizerConversionError(f"{model_file} has user-defined pieces, which are not supported.")

    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces if piece.type == NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=[p.piece for p in proto.pieces if p.type != NORMAL])
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))

    # transformers 4.37 reads a missing `legacy` as True. Spaces become "▁"; the first pre-tokenizer then puts a " "
    # (which the text no longer has) in front of each text (legacy) or of the input's first text only, and the second
    # turns it into the dummy-prefix "▁": unlike one Metaspace, this prepends even when the text starts with a space.
    legacy = settings.get("legacy")
    prepend = "never" if not spec.add_dummy_prefix else "always" if legacy in (None, True) else "first"
    backend.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme=prepend, split=False),
            pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=False),
        ]
    )
    strip = [decoders.Strip(content=" ", left=1, right=0)] if spec.add_dummy_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    special = [piece.piece for piece in proto.pieces if piece.type in (UNKNOWN, CONTROL)]
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    _add_tokens(backend, settings.get("added_tokens_decoder") or {}, [piece.piece for piece in proto.pieces])

    tokens = {
        name: _content(settings.get(name)) or default
        for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", unk), ("pad_token", None))
    }
    add_bos, add_eos = settings.get("add_bos_token", True), settings.get("add_eos_token", False)
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    single = [f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=single + [item.replace("$A", "$B").replace(":0", ":1") for item in single],
        special_tokens=[(token, vocab[token]) for token in {bos, eos}],
    )
    kept = {
        key: settings[key]
        for key in ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces")
        if settings.get(key) is not None
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: token for name, token in tokens.items() if token is not None},
        legacy=legacy,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        **kept,
    )


def _legacy_added_tokens(path: str | Path, settings: dict[str, Any]) -> dict[str, dict]:
    """`added_tokens.json` (`{token: id}`, the format before `added_tokens_decoder`) as `added_tokens_decoder`
    entries, read as transformers reads it: a token is special when `settings` name it."""
    try:
        tokens = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerConversionError(f"{path} could not be read as JSON ({error}).") from error
    if not isinstance(tokens, dict) or not all(isinstance(i, int) for i in tokens.values()):
        raise TokenizerConversionError(f"{path} is not a JSON object of token: id.")
    named = [settings.get(key) for key in SPECIAL_TOKEN_KEYS]
    special = {_content(token) for value in named for token in (value if isinstance(value, list) else [value])}
    return {str(index): {"content": token, "special": token in special} for token, index in tokens.items()}


def _add_tokens(backend: Tokenizer, decoder: dict, pieces: list[str]) -> None:
    """Add the original's added tokens (`added_tokens_decoder`: id -> `AddedToken` fields) at their ids, as
    transformers' loader keeps them: ids inside `tokenizer.model` must name its piece, the others must follow its
    pieces without gaps (the model's embedding rows are trained per id, so nothing is renumbered). They are matched
    on the raw text, as the slow tokenizer matched them (after the normalizer, spaces are `▁`, which `lstrip` and
    `rstrip` would not strip)."""
    fields = ("content", "single_word", "lstrip", "rstrip", "special")
    if not all(str(key).isdigit() for key in decoder):
        raise TokenizerConversionError(f"added_tokens_decoder has keys that are not token ids: {sorted(decoder)}.")
    for key, token in sorted(decoder.items(), key=lambda item: int(item[0])):
        index = int(key)
        if not isinstance(token, dict) or not isinstance(token.get("content"), str):
            raise TokenizerConversionError(f"added token {index} is {token!r}; expected an AddedToken object.")
        backend.add_tokens([AddedToken(**{key: token[key] for key in fields if key in token}, normalized=False)])
        given = backend.token_to_id(token["content"])
        if given == index:
            continue
        if index < len(pieces):
            reason = f"tokenizer.model gives that id to {pieces[index]!r}"
        else:
            reason = f"added ids must follow tokenizer.model's {len(pieces)} pieces without gaps or repeats"
        raise TokenizerConversionError(
            f"The original's added token {token['content']!r} has id {index}, but would get id {given}: {reason}."
        )


def _read_model(model_file: str | Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise TokenizerConversionError(
            "Reading a sentencepiece tokenizer.model needs `sentencepiece` and `protobuf`: "
            "pip install -e \".[convert]\" (or pip install sentencepiece protobuf)."
        ) from error
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as error:  # protobuf's DecodeError, or a file that is not a model at all
        raise TokenizerConversionError(f"{model_file} is not a sentencepiece model ({error}).") from error
    if not proto.pieces:
        raise TokenizerConversionError(f"{model_file} is not a sentencepiece model (it has no pieces).")
    return proto


def _content(token: str | dict | None) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string, or an `AddedToken` dict."""
    return token.get("content") if isinstance(token, dict) else token


def prepare_tokenizer(source: str | Path):
    """The original tokenizer (see `load_original_tokenizer`) with `<image>`, `<pad>` when it has no pad token, and
    left padding: batched generation (transformers' pipelines pad as the tokenizer says) needs it, and training
    collators ask for right padding themselves."""
    tokenizer = load_original_tokenizer(source)
    added = {}
    if "<image>" not in tokenizer.get_vocab():
        added["additional_special_tokens"] = ["<image>"]
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # `save_pretrained` writes init_kwargs
    return tokenizer


__all__ = ["TokenizerConversionError", "load_original_tokenizer", "prepare_tokenizer", "sentencepiece_tokenizer"]
