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
    transformers' GGUF tokenizer treats them (see ``_merge_space_runs``);
  * the piece at ``tokenizer.ggml.unknown_token_id`` becomes the UNKNOWN piece
    sentencepiece requires (Gemma files mark ``<unk>`` CONTROL).

With those, and the CONTROL / USER_DEFINED pieces matched whole on the raw text before
sentencepiece sees it (``GemmaTokenizer`` does that), the ids equal transformers'
GGUF tokenizer on Gemma 3 270M.

The ModelProto is serialized by hand (a few fields of sentencepiece_model.proto), so
protobuf is not needed at run time.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["sentencepiece_model_from_gguf", "tokenizer_config_from_gguf", "read_gguf_tokenizer"]

SPIECE_UNDERLINE = "\u2581"

# GGUF token types (llama.cpp's llama_token_type) equal sentencepiece's
# ModelProto.SentencePiece.Type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {NORMAL: "NORMAL", UNKNOWN: "UNKNOWN", CONTROL: "CONTROL", USER_DEFINED: "USER_DEFINED",
               UNUSED: "UNUSED", BYTE: "BYTE"}

# tokenizer.ggml.model values this module can rebuild: sentencepiece-style vocabularies.
SUPPORTED_MODELS = ("llama",)

_KEY = "tokenizer.ggml."

# sentencepiece_model.proto field numbers (all proto2).
# ModelProto: 1 pieces, 2 trainer_spec, 3 normalizer_spec.
# SentencePiece: 1 piece (string), 2 score (float), 3 type (enum).
# TrainerSpec: 3 model_type (BPE = 2), 4 vocab_size, 35 byte_fallback,
#   40..43 unk/bos/eos/pad ids, 45..48 unk/bos/eos/pad pieces.
# NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces.
_BPE = 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32 / int64 negatives take ten bytes, two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _str_field(field: int, value: str) -> bytes:
    return _len_field(field, value.encode("utf-8"))


_PIECE_TAG = _key(1, 2)
_SCORE_TAG = _key(2, 5)
_TYPE_TAG = _key(3, 0)


def _piece_message(piece: str, score: float, ptype: int) -> bytes:
    body = _str_field(1, piece) + _SCORE_TAG + struct.pack("<f", score) + _TYPE_TAG + _varint(ptype)
    return _PIECE_TAG + _varint(len(body)) + body


def _piece_messages(pieces, scores, types) -> list:
    """Every piece's message. Most pieces are short: their varints are one byte each, so
    their messages are assembled from bytes directly (the same bytes _piece_message writes;
    262k pieces build in a fraction of the time)."""
    score_bytes = np.asarray(scores, dtype="<f4").tobytes()
    out = []
    for i, (piece, ptype) in enumerate(zip(pieces, types)):
        raw = piece.encode("utf-8")
        body = 2 + len(raw) + 5 + 2  # piece tag + length, the piece, score tag + 4 bytes, type tag + type
        if len(raw) < 128 and 0 <= ptype < 128 and body < 128:
            out.append(b"".join((_PIECE_TAG, bytes((body,)), _PIECE_TAG, bytes((len(raw),)), raw, _SCORE_TAG,
                                 score_bytes[4 * i: 4 * i + 4], _TYPE_TAG, bytes((ptype,)))))
        else:
            out.append(_piece_message(piece, float(scores[i]), ptype))
    return out


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
            f"known GGUF token types are {sorted(_TYPE_NAMES.items())} ({bad.size} unknown in all)"
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

    unknown_typed = [i for i, t in enumerate(types) if t == UNKNOWN]
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

    pieces: list[str] = []
    seen: dict[str, int] = {}
    space_runs: list[int] = []
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"{source}: {key}[{i}] must be a string, got {type(token).__name__}")
        if types[i] == USER_DEFINED and " " in token:
            if not token.strip(" "):
                space_runs.append(i)
            token = token.replace(" ", SPIECE_UNDERLINE)
        if not token:
            raise ValueError(f"{source}: {key}[{i}] is empty; sentencepiece pieces must not be")
        first = seen.setdefault(token, i)
        if first != i:
            raise ValueError(f"{source}: {key}[{i}] ({token!r}) repeats token {first}; pieces must be unique")
        pieces.append(token)
    types[unk] = UNKNOWN
    _merge_space_runs(space_runs, types, scores)

    byte_ids = [i for i, t in enumerate(types) if t == BYTE]
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


def _merge_space_runs(space_runs: list[int], types: list[int], scores: list[float]) -> None:
    """Make the runs of spaces ordinary BPE pieces, ranked by their place in the file.

    transformers' GGUF tokenizer (``gemma_tokenizer`` in transformers/integrations/gguf)
    respells them with U+2581 and keeps them out of its added tokens, so BPE builds them
    by merges ranked by position: 32 spaces are two pieces of 16, where a USER_DEFINED
    piece (matched longest first, as llama.cpp does) would give 31 + 1, and a literal
    "▁▁" in the text is not an atom. A NORMAL piece whose score sits where its
    position does among the NORMAL pieces' scores gives sentencepiece's BPE the same
    merges. (Gemma: the runs are ids 138..167, before every NORMAL piece, whose scores
    fall by one per id; the runs get the scores those ids would have.)
    """
    normal = np.flatnonzero(np.asarray(types) == NORMAL)
    if not space_runs or normal.size == 0:
        return
    normal_scores = np.asarray(scores, dtype=np.float64)[normal]
    for i in space_runs:
        k = int(np.searchsorted(normal, i))
        if k == 0:
            score = normal_scores.max() + (normal[0] - i)
        elif k == normal.size:
            score = normal_scores.min() - (i - normal[-1])
        else:
            score = (normal_scores[k - 1] + normal_scores[k]) / 2
        scores[i] = float(np.float32(score))
        types[i] = NORMAL


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def sentencepiece_model_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> bytes:
    """The serialized sentencepiece ``ModelProto`` a GGUF's tokenizer metadata describes.

    ``metadata``: the GGUF key/value pairs (``GGUFFile(path).metadata``): string arrays
    as lists of str, numeric arrays as 1-D numpy arrays. ``source`` names the file in
    error messages. ``ValueError`` (naming the key) for a vocabulary that is not
    sentencepiece-style or for metadata that contradicts itself.
    """
    pieces, scores, types, ids = _pieces(metadata, source)
    add_prefix = _get(metadata, "add_space_prefix", source, required=False)
    add_prefix = False if add_prefix is None else _as_bool(add_prefix, _KEY + "add_space_prefix", source)

    out = _piece_messages(pieces, scores, types)

    trainer = [
        _int_field(3, _BPE),
        _int_field(4, len(pieces)),
        _int_field(35, 1 if BYTE in types else 0),
        _int_field(40, ids["unk"]),
        _str_field(45, pieces[ids["unk"]]),
    ]
    # Absent ids are -1 (sentencepiece's "disabled"); the pieces then keep their defaults.
    for name, id_field, piece_field in (("bos", 41, 46), ("eos", 42, 47), ("pad", 43, 48)):
        index = ids[name]
        trainer.append(_int_field(id_field, -1 if index is None else index))
        if index is not None:
            trainer.append(_str_field(piece_field, pieces[index]))
    out.append(_len_field(2, b"".join(trainer)))

    normalizer = _str_field(1, "identity") + _int_field(3, int(add_prefix)) + _int_field(4, 0) + _int_field(5, 1)
    out.append(_len_field(3, normalizer))
    return b"".join(out)


def tokenizer_config_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """The tokenizer settings a GGUF states, as ``tokenizer_config.json`` keys:
    bos/eos/unk/pad tokens, ``add_bos_token`` (default True, as llama.cpp for a
    sentencepiece vocabulary), ``add_eos_token`` (default False) and ``chat_template``
    (``tokenizer.chat_template``) when present."""
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
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{source}: 'tokenizer.chat_template' must be a string, got {type(template).__name__}")
        config["chat_template"] = template
    return config


def read_gguf_tokenizer(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """(sentencepiece model bytes, tokenizer config) of a GGUF file, for Gemma's tokenizer.

    ``ValueError`` for a file whose tokenizer adds a space prefix (Llama 2 style):
    Gemma's tokenizer never does, and GemmaTokenizer would silently give other ids."""
    from ..formats.gguf import GGUFFile

    path = os.fspath(path)
    with GGUFFile(path) as f:
        metadata = f.metadata
    data = sentencepiece_model_from_gguf(metadata, path)
    prefix = metadata.get(_KEY + "add_space_prefix")
    if prefix is not None and _as_bool(prefix, _KEY + "add_space_prefix", path):
        raise ValueError(
            f"{path}: {_KEY}add_space_prefix is true (a tokenizer that prepends a space, as Llama 2's); "
            "Gemma's tokenizer adds none, so GemmaTokenizer cannot reproduce this file's token ids"
        )
    return data, tokenizer_config_from_gguf(metadata, path)
