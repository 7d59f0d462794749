"""A sentencepiece model rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.model``. For a sentencepiece vocabulary (llama.cpp calls
it ``tokenizer.ggml.model = "llama"``; Gemma files say so too) it stores the pieces,
their scores and their types, and the special-token ids. That is all a sentencepiece
BPE ``ModelProto`` needs, so we write one back and hand it to sentencepiece:

- model type BPE, ``byte_fallback`` on when the vocabulary has its 256 byte pieces;
- normalizer "identity": no dummy prefix (unless ``tokenizer.ggml.add_space_prefix``
  says so), whitespace kept as is, spaces escaped as U+2581;
- pieces in file order with the stored scores (the merge priorities of BPE) and types.
  GGUF token types are sentencepiece's (1 NORMAL, 2 UNKNOWN, 3 CONTROL,
  4 USER_DEFINED, 5 UNUSED, 6 BYTE), with two corrections the files need:
  * llama.cpp writes U+2581 in a USER_DEFINED piece as a real space (Gemma's
    "\u2581\u2581" ... pieces are stored as "  " ...); it is written back, since
    sentencepiece matches pieces against the escaped text, and a piece that is only
    spaces becomes a NORMAL piece ranked by its position, because that is how
    transformers' GGUF tokenizer treats them (``spmodel.rank_as_merges``);
  * the piece at ``tokenizer.ggml.unknown_token_id`` becomes the UNKNOWN piece
    sentencepiece requires (Gemma files mark ``<unk>`` CONTROL).

With those, and the CONTROL / USER_DEFINED pieces matched whole on the raw text before
sentencepiece sees it (``GemmaTokenizer`` does that), the ids equal transformers'
GGUF tokenizer on Gemma 3 270M.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..formats.gguf import GGUFFile
from .spmodel import (BYTE, CONTROL, MODEL_BPE, NORMAL, PIECE_TYPES, SPIECE_UNDERLINE, UNKNOWN, USER_DEFINED,
                      SentencePieceModel, model_proto, rank_as_merges, set_gemma_normalizer)

__all__ = ["model_proto_from_gguf", "sentencepiece_model_from_gguf", "tokenizer_config_from_gguf",
           "read_gguf_tokenizer", "read_gguf_model"]

# tokenizer.ggml.model values this module can rebuild: sentencepiece-style vocabularies.
SUPPORTED_MODELS = ("llama",)

_KEY = "tokenizer.ggml."

# Gemma's media markers: the tokenizer.json Google publishes with each Gemma 3 / 3n checkpoint
# marks them special, but sentencepiece types them USER_DEFINED (as it does `<table>` and the
# runs of newlines, which are text), so a GGUF cannot say so. A GGUF's tokenizer marks them
# special too, as the checkpoint's own tokenizer does: decode(skip_special_tokens=True) drops
# them.
MEDIA_MARKERS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_audio>",
                 "<end_of_audio>", "<audio_soft_token>")


# --------------------------------------------------------------------------------------
# Reading and checking the metadata
# --------------------------------------------------------------------------------------


def _get(metadata: Mapping[str, Any], name: str, source: str, required: bool = True) -> Any:
    key = _KEY + name
    if key not in metadata:
        if required:
            raise ValueError(f"{source}: no {key!r} in the GGUF metadata; cannot rebuild its tokenizer")
        return None
    return metadata[key]


def _as_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{source}: {key!r} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _as_bool(value: Any, key: str, source: str) -> bool:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{source}: {key!r} must be a bool, got {type(value).__name__} {value!r}")


def _numeric_array(value: Any, key: str, source: str, n: int, kind: str) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, (np.ndarray, Sequence)):
        raise ValueError(f"{source}: {key!r} must be an array of {kind}, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nesting
        raise ValueError(f"{source}: {key!r} must be a flat array of {kind}") from None
    if arr.ndim != 1:
        raise ValueError(f"{source}: {key!r} must be a 1-D array, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(
            f"{source}: {key!r} has {len(arr)} entries but {_KEY}tokens has {n}; the lengths must agree"
        )
    if n and kind == "integers" and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{source}: {key!r} must hold integers, got dtype {arr.dtype}")
    if n and kind == "numbers" and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{source}: {key!r} must hold numbers, got dtype {arr.dtype}")
    return arr


def _special_id(metadata: Mapping[str, Any], name: str, n: int, source: str) -> int | None:
    value = _get(metadata, name, source, required=False)
    if value is None:
        return None
    index = _as_int(value, _KEY + name, source)
    if not 0 <= index < n:
        raise ValueError(f"{source}: {_KEY + name} is {index}, outside the vocabulary (0..{n - 1})")
    return index


def _check_model(metadata: Mapping[str, Any], source: str) -> None:
    model = _get(metadata, "model", source)
    if model not in SUPPORTED_MODELS:
        raise ValueError(
            f"{source}: {_KEY}model is {model!r}; only sentencepiece-style vocabularies "
            f"({', '.join(repr(m) for m in SUPPORTED_MODELS)}, as Gemma's GGUF files state) can be rebuilt"
        )


def _tokens(metadata: Mapping[str, Any], source: str) -> Sequence:
    _check_model(metadata, source)
    tokens = _get(metadata, "tokens", source)
    key = _KEY + "tokens"
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
        raise ValueError(f"{source}: {key!r} must be an array of strings, got {type(tokens).__name__}")
    if len(tokens) == 0:
        raise ValueError(f"{source}: {key!r} is empty")
    return tokens


def _pieces(metadata: Mapping[str, Any], source: str):
    """(pieces, scores, types, special ids) from the metadata, checked and corrected."""
    tokens = _tokens(metadata, source)
    key = _KEY + "tokens"
    n = len(tokens)

    types_raw = _numeric_array(_get(metadata, "token_type", source), _KEY + "token_type", source, n, "integers")
    bad = np.flatnonzero((types_raw < NORMAL) | (types_raw > BYTE))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{source}: {_KEY}token_type[{i}] is {int(types_raw[i])} (token {tokens[i]!r}); "
            f"known GGUF token types are {sorted(PIECE_TYPES.items())} ({bad.size} unknown in all)"
        )
    types = types_raw.astype(np.int64).tolist()

    scores_raw = _get(metadata, "scores", source, required=False)
    if scores_raw is None:
        # llama.cpp reads a missing score as 0; for BPE merges the file order is the
        # order that matters (it is Gemma's merge order), so rank by position instead.
        scores = [0.0 if t != NORMAL else -float(i) for i, t in enumerate(types)]
    else:
        arr = _numeric_array(scores_raw, _KEY + "scores", source, n, "numbers").astype(np.float32)
        finite = np.isfinite(arr)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{source}: {_KEY}scores[{i}] is {arr[i]} (token {tokens[i]!r}); scores must be finite")
        scores = arr.tolist()

    unk = _special_id(metadata, "unknown_token_id", n, source)
    bos = _special_id(metadata, "bos_token_id", n, source)
    eos = _special_id(metadata, "eos_token_id", n, source)
    pad = _special_id(metadata, "padding_token_id", n, source)

    unknown_typed = np.flatnonzero(types_raw == UNKNOWN).tolist()
    if unk is None:
        if len(unknown_typed) != 1:
            raise ValueError(
                f"{source}: no {_KEY}unknown_token_id and {len(unknown_typed)} tokens of type UNKNOWN; "
                "sentencepiece needs exactly one unknown token"
            )
        unk = unknown_typed[0]
    else:
        others = [i for i in unknown_typed if i != unk]
        if others:
            raise ValueError(
                f"{source}: {_KEY}unknown_token_id is {unk} but token {others[0]} ({tokens[others[0]]!r}) "
                "is also typed UNKNOWN; sentencepiece allows one unknown token"
            )

    # Whole-list checks first (a 262k-piece vocabulary), the first offender named after.
    pieces = list(tokens)
    if set(map(type, pieces)) != {str}:
        i = next(i for i, t in enumerate(pieces) if not isinstance(t, str))
        raise ValueError(f"{source}: {key}[{i}] must be a string, got {type(pieces[i]).__name__}")
    space_runs: list[int] = []
    for i in np.flatnonzero(types_raw == USER_DEFINED).tolist():
        if " " in pieces[i]:
            if not pieces[i].strip(" "):
                space_runs.append(i)
            pieces[i] = pieces[i].replace(" ", SPIECE_UNDERLINE)
    seen = dict(zip(pieces, range(n)))
    if len(seen) != n or "" in seen:
        first: dict[str, int] = {}
        for i, token in enumerate(pieces):
            if not token:
                raise ValueError(f"{source}: {key}[{i}] is empty; sentencepiece pieces must not be")
            if first.setdefault(token, i) != i:
                raise ValueError(f"{source}: {key}[{i}] ({token!r}) repeats token {first[token]}; "
                                 "pieces must be unique")
    types[unk] = UNKNOWN
    # The runs of spaces become ordinary BPE pieces ranked by their place in the file: that
    # is how transformers' GGUF tokenizer (``gemma_tokenizer`` in transformers/integrations/
    # gguf) treats them, respelled with U+2581 and kept out of its added tokens, so that BPE
    # builds them by merges (32 spaces are two pieces of 16, where a USER_DEFINED piece,
    # matched longest first as llama.cpp does, would give 31 + 1).
    for i, score in rank_as_merges(space_runs, types, scores).items():
        scores[i] = score
        types[i] = NORMAL

    byte_ids = np.flatnonzero(np.asarray(types) == BYTE).tolist()
    if byte_ids:
        expected = {f"<0x{b:02X}>" for b in range(256)}
        names = {pieces[i] for i in byte_ids}
        if names != expected:
            odd = sorted(names - expected)[:3]
            missing = sorted(expected - names)[:3]
            raise ValueError(
                f"{source}: {_KEY}token_type marks {len(byte_ids)} tokens BYTE; byte fallback needs "
                f"exactly <0x00>..<0xFF>: unexpected {odd}, missing {missing}"
            )
    return pieces, scores, types, {"unk": unk, "bos": bos, "eos": eos, "pad": pad}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def model_proto_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF"):
    """(the sentencepiece ``ModelProto`` a GGUF's tokenizer metadata describes, its pieces, their
    types). ``metadata``: the GGUF key/value pairs (``GGUFFile(path).metadata``): string arrays
    as lists of str, numeric arrays as 1-D numpy arrays. ``source`` names the file in error
    messages. ``ValueError`` (naming the key) for a vocabulary that is not sentencepiece-style
    or for metadata that contradicts itself."""
    pieces, scores, types, ids = _pieces(metadata, source)
    add_prefix = _get(metadata, "add_space_prefix", source, required=False)
    add_prefix = False if add_prefix is None else _as_bool(add_prefix, _KEY + "add_space_prefix", source)

    proto = model_proto()
    add = proto.pieces.add
    for piece, score, ptype in zip(pieces, scores, types):
        add(piece=piece, score=score, type=ptype)
    trainer = proto.trainer_spec
    trainer.model_type = MODEL_BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = BYTE in types
    trainer.unk_id, trainer.unk_piece = ids["unk"], pieces[ids["unk"]]
    # Absent ids are -1 (sentencepiece's "disabled"); the pieces then keep their defaults.
    for name in ("bos", "eos", "pad"):
        index = ids[name]
        setattr(trainer, f"{name}_id", -1 if index is None else index)
        if index is not None:
            setattr(trainer, f"{name}_piece", pieces[index])
    set_gemma_normalizer(proto.normalizer_spec, add_dummy_prefix=add_prefix)
    return proto, pieces, types


def sentencepiece_model_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> bytes:
    """The serialized ModelProto of model_proto_from_gguf: a ``tokenizer.model``'s bytes."""
    return model_proto_from_gguf(metadata, source)[0].SerializeToString()


def tokenizer_config_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """The tokenizer settings a GGUF states, as ``tokenizer_config.json`` keys:
    bos/eos/unk/pad tokens, ``add_bos_token`` (default True, as llama.cpp for a
    sentencepiece vocabulary), ``add_eos_token`` (default False) and ``chat_template``
    (``tokenizer.chat_template``) when present, and ``added_tokens_decoder`` marking Gemma's
    media markers special (MEDIA_MARKERS)."""
    tokens = _tokens(metadata, source)
    n = len(tokens)
    config: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _special_id(metadata, key, n, source)
        config[name] = tokens[index] if index is not None else None
    for name, default in (("add_bos_token", True), ("add_eos_token", False)):
        value = _get(metadata, name, source, required=False)
        config[name] = default if value is None else _as_bool(value, _KEY + name, source)
    types = _get(metadata, "token_type", source, required=False)
    if types is not None and len(types) == n:
        wanted = set(MEDIA_MARKERS)
        markers = {str(i): {"content": t, "special": True} for i, t in enumerate(tokens)
                   if t in wanted and int(types[i]) in (CONTROL, USER_DEFINED)}
        if markers:
            config["added_tokens_decoder"] = markers
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{source}: 'tokenizer.chat_template' must be a string, got {type(template).__name__}")
        config["chat_template"] = template
    return config


def read_gguf_model(path: str | os.PathLike) -> tuple[SentencePieceModel, dict[str, Any]]:
    """(the sentencepiece model, tokenizer config) of a GGUF file, for Gemma's tokenizer.

    ``ValueError`` for a file whose tokenizer adds a space prefix (Llama 2 style):
    Gemma's tokenizer never does, and GemmaTokenizer would silently give other ids."""
    path = os.fspath(path)
    with GGUFFile(path) as f:
        metadata = f.metadata
    proto, pieces, types = model_proto_from_gguf(metadata, path)
    prefix = metadata.get(_KEY + "add_space_prefix")
    if prefix is not None and _as_bool(prefix, _KEY + "add_space_prefix", path):
        raise ValueError(
            f"{path}: {_KEY}add_space_prefix is true (a tokenizer that prepends a space, as Llama 2's); "
            "Gemma's tokenizer adds none, so GemmaTokenizer cannot reproduce this file's token ids"
        )
    return SentencePieceModel.from_proto(proto, path, pieces, types), tokenizer_config_from_gguf(metadata, path)


def read_gguf_tokenizer(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """(``tokenizer.model`` bytes, tokenizer config) of a GGUF file (see read_gguf_model)."""
    model, config = read_gguf_model(path)
    return model.data, config
