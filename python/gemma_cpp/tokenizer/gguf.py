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

Gemma 4 (``tokenizer.ggml.model = "gemma4"``)
--------------------------------------------
llama.cpp writes Gemma 4's ``tokenizer.json`` as it is: the pieces (U+2581 for spaces, no
respelling), their types, scores that are all -1000 and say nothing, and the BPE merges
(``tokenizer.ggml.merges``, "left right", best first), which alone give the merge order.
transformers builds a ``tokenizers`` BPE from those merges; ``GemmaTokenizerFast`` does the
same and follows any list exactly. For sentencepiece the merges become scores (``_bpe_scores``):

- a piece scores minus the rank of the first merge that can make it on text: one whose two
  halves BPE can hold there (single characters, byte-fallback tokens, pieces such merges make);
- a multi-character piece that no such merge makes never comes out of BPE; sentencepiece is
  handed it under a name no text can spell (it starts with a space, and sentencepiece has
  escaped every space as U+2581 before it merges), so it never builds it either. The
  ``tokenizer.model`` written back keeps its real name, scored below every merge (read back
  alone, sentencepiece may then build it last: GemmaTokenizerFast's saved ``tokenizer.json``
  keeps the merges themselves);
- UNUSED pieces are ordinary pieces (transformers puts them in the vocabulary; sentencepiece
  would split them again after merging);
- a list that merges byte-fallback tokens cannot be followed (sentencepiece falls back to bytes
  after merging): ``GemmaTokenizer`` refuses it (``SentencePieceModel.sp_refusal``).

sentencepiece then joins the best-scored adjacent pair whose join is a piece, transformers'
BPE the best-ranked adjacent pair the list holds, both leftmost on a tie: the ids agree while
sentencepiece never joins a pair the list lacks. Two kinds of list make sure of it, and the
tests check both against transformers:

1. lists with every split of each piece they make into two pieces, grouped by piece, as
   transformers' ``generate_merges`` writes them. Gemma 4's reads as one (its first merge joins
   31 newlines and one into the run of 32, the longer left half first, as that function orders);
2. lists as a BPE trainer writes them: each merge joins pieces made by earlier merges, learnt
   where that split arose, and the text of a piece, until it is merged, is split as the piece's
   own text alone would be, so no other split of it ever meets.

What is left, precisely. (a) A hand-ordered list in which a piece's own text does not reach its
listed split: with "h e", "t h", "th e" in that order BPE leaves "the" as t|he (no "t he"
merge) and sentencepiece joins t + he, a piece. (b) Among the merges of one piece,
sentencepiece takes the leftmost pending pair and the list its own order; that matters only
where two different splits of one (periodic) piece overlap, symbols x|y|z with x+y = y+z
(ab|aba|ba in ababa), which no test text produced.
``GemmaTokenizerFast`` has neither limit.

``add_bos_token`` is False for Gemma 4 whatever the file says, as in transformers (the chat
template writes ``<bos>``; llama.cpp forces BOS on instead), and the token types alone decide
which added tokens are special (llama.cpp took them from ``tokenizer.json``; no MEDIA_MARKERS).
A vocabulary with a repeated piece (seen in some Gemma 4 files, which llama.cpp refuses too) is
refused: sentencepiece needs unique pieces, and transformers would keep only the later id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from ..formats.gguf import GGUFFile
from .spmodel import (BYTE, CONTROL, MODEL_BPE, NORMAL, PIECE_TYPES, SPIECE_UNDERLINE, UNKNOWN, UNUSED, USER_DEFINED,
                      SentencePieceModel, model_proto, rank_as_merges, set_gemma_normalizer)

__all__ = ["model_proto_from_gguf", "sentencepiece_model_from_gguf", "tokenizer_config_from_gguf",
           "read_gguf_tokenizer", "read_gguf_model"]

# tokenizer.ggml.model values this module can rebuild: sentencepiece-style vocabularies, Gemma 1-3's
# (scores give the merge order) and Gemma 4's (tokenizer.ggml.merges gives it).
SUPPORTED_MODELS = ("llama", "gemma4")

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


def _check_model(metadata: Mapping[str, Any], source: str) -> str:
    model = _get(metadata, "model", source)
    if model not in SUPPORTED_MODELS:
        raise ValueError(
            f"{source}: {_KEY}model is {model!r}; only sentencepiece-style vocabularies "
            f"({', '.join(repr(m) for m in SUPPORTED_MODELS)}, as Gemma's GGUF files state) can be rebuilt"
        )
    return model


def _tokens(metadata: Mapping[str, Any], source: str) -> Sequence:
    _check_model(metadata, source)
    tokens = _get(metadata, "tokens", source)
    key = _KEY + "tokens"
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
        raise ValueError(f"{source}: {key!r} must be an array of strings, got {type(tokens).__name__}")
    if len(tokens) == 0:
        raise ValueError(f"{source}: {key!r} is empty")
    return tokens


class _Vocabulary(NamedTuple):
    """A GGUF's vocabulary, checked and corrected for sentencepiece (see the module docstring)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    ids: dict[str, int | None]  # unk / bos / eos / pad
    merges: list[tuple[str, str]] | None  # Gemma 4's BPE merges, best first; None for "llama"
    sp_names: dict[int, str]  # pieces handed to sentencepiece under another name: {id: name}
    sp_refusal: str | None  # why sentencepiece cannot give the merges' ids, if it cannot


def _pieces(metadata: Mapping[str, Any], source: str) -> _Vocabulary:
    """The vocabulary from the metadata, checked and corrected."""
    model = _check_model(metadata, source)
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
    # Gemma 1-3 files only: their converter read tokenizer.model and wrote U+2581 in USER_DEFINED
    # pieces as spaces. Gemma 4's copies tokenizer.json as it is, and transformers takes it so.
    for i in np.flatnonzero(types_raw == USER_DEFINED).tolist() if model == "llama" else ():
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
    ids = {"unk": unk, "bos": bos, "eos": eos, "pad": pad}
    if model != "gemma4":
        return _Vocabulary(pieces, scores, types, ids, None, {}, None)
    # transformers puts UNUSED pieces in the BPE vocabulary like any other; sentencepiece would
    # split them again after merging.
    types = [NORMAL if t == UNUSED else t for t in types]
    merges, merge_ids = _merges(metadata, seen, source)
    scores, sp_names, refusal = _bpe_scores(pieces, types, merge_ids, source)
    return _Vocabulary(pieces, scores, types, ids, merges, sp_names, refusal)


def _merges(metadata: Mapping[str, Any], index: Mapping[str, int], source: str):
    """tokenizer.ggml.merges as (left, right) pairs, best first, each half and their join a
    token (transformers' BPE refuses a file otherwise), and the three ids of each as an
    (n_merges, 3) array. Whole-list checks first (Gemma 4 has 514,906), the offender after."""
    key = _KEY + "merges"
    raw = _get(metadata, "merges", source, required=False)
    if raw is None:
        raise ValueError(
            f"{source}: {_KEY}model is 'gemma4' but there is no {key!r}; a Gemma 4 vocabulary's merge order "
            "is in that list alone (its scores are all equal)"
        )
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (Sequence, np.ndarray)):
        raise ValueError(f"{source}: {key!r} must be an array of strings, got {type(raw).__name__}")
    if len(raw) and set(map(type, raw)) != {str}:
        k = next(k for k, m in enumerate(raw) if not isinstance(m, str))
        raise ValueError(f"{source}: {key}[{k}] must be a string, got {type(raw[k]).__name__}")
    # One split of the whole list, not one per merge (a third of the load time of Gemma 4's 514,906
    # merges): joined by a separator no merge holds, every merge must give exactly two halves.
    n = len(raw)
    parts: list[str] = []
    for sep in "\x1f\x1e\x1d\x00":
        joined = sep.join(raw)
        if joined.count(sep) == max(n - 1, 0):
            parts = joined.replace(sep, " ").split(" ") if n else []
            break
    if len(parts) != 2 * n or "" in parts:
        k = next(k for k, m in enumerate(raw) if len(h := m.split(" ")) != 2 or not h[0] or not h[1])
        raise ValueError(f"{source}: {key}[{k}] is {raw[k]!r}; a merge is two tokens joined by one space")
    lefts, rights = parts[0::2], parts[1::2]
    ids = np.empty((n, 3), dtype=np.int64)
    for j, column in enumerate((lefts, rights, map(str.__add__, lefts, rights))):
        ids[:, j] = np.fromiter(map(index.get, column, repeat(-1)), dtype=np.int64, count=n)
    pairs = list(zip(lefts, rights))
    if (ids < 0).any():
        k, j = (int(x) for x in np.argwhere(ids < 0)[0])
        left, right = pairs[k]
        token = (left, right, left + right)[j]
        raise ValueError(f"{source}: {key}[{k}] ({raw[k]!r}) needs the token {token!r}, which is not in {_KEY}tokens")
    return pairs, ids


def _bpe_scores(pieces: list[str], types: list[int], ids: np.ndarray,
                source: str) -> tuple[list[float], dict[int, str], str | None]:
    """Scores under which sentencepiece merges in the list's order, the pieces it must not see
    by their names, and why it cannot follow the list at all, if it cannot (module docstring).
    ``ids``: (left, right, merged) per merge, best first (_merges).

    "Symbols" are the tokens BPE can hold on the text between added tokens (transformers' BPE
    sees no CONTROL / USER_DEFINED string there: it matched them first): NORMAL single
    characters but a space (the normalizer made every space U+2581), the byte-fallback tokens,
    and what merges of two symbols make. A merge's halves are shorter than what it makes, so
    the symbols are found one piece length at a time."""
    n, n_merges = len(pieces), len(ids)
    types_arr = np.asarray(types)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=n)
    # tokenizers keeps the last rank of a pair listed twice.
    last = dict(zip(zip(ids[:, 0].tolist(), ids[:, 1].tolist()), range(n_merges)))
    ranks = np.fromiter(last.values(), dtype=np.int64, count=len(last))
    ranks.sort()
    left, right, merged = ids[ranks, 0], ids[ranks, 1], ids[ranks, 2]

    symbol = (types_arr == BYTE) | ((types_arr == NORMAL) & (lengths == 1))
    space = [i for i, p in enumerate(pieces) if p == " "]
    symbol[space] = False  # the normalizer made every space U+2581
    # A merge that makes a CONTROL / USER_DEFINED / UNKNOWN token never applies: the text BPE sees
    # cannot hold that token's string.
    makes_text = np.isin(types_arr[merged], (NORMAL, BYTE))
    first = np.full(n, n_merges, dtype=np.int64)  # rank of the first merge that makes each piece
    merged_length = lengths[merged]
    for length in np.unique(merged_length):
        at = np.flatnonzero((merged_length == length) & makes_text)
        at = at[symbol[left[at]] & symbol[right[at]]]
        np.minimum.at(first, merged[at], ranks[at])
        symbol[merged[at]] = True

    byte_merge = None
    applies = np.flatnonzero(symbol[left] & symbol[right] & makes_text)
    has_byte = ((types_arr[left[applies]] == BYTE) | (types_arr[right[applies]] == BYTE)
                | (types_arr[merged[applies]] == BYTE))
    if has_byte.any():
        k = applies[np.flatnonzero(has_byte)[0]]
        byte_merge = (int(left[k]), int(right[k]), int(merged[k]))

    scores = np.zeros(n, dtype=np.float64)
    normal = (types_arr == NORMAL) & (lengths > 1)
    made = normal & (first < n_merges)
    scores[made] = -first[made]
    # No merge makes these: ranked after every merge in the model file, and nameless to
    # sentencepiece (a leading space, which no escaped text holds).
    unmade = np.flatnonzero(normal & ~made)
    scores[unmade] = -(n_merges + unmade)
    sp_names: dict[int, str] = {}
    taken = set(pieces)
    for i in unmade.tolist():
        name = f" {i}"
        while name in taken:
            name = " " + name
        taken.add(name)
        sp_names[i] = name

    refusal = None
    if byte_merge is not None:
        a, b, c = byte_merge
        refusal = (f"{source}: {_KEY}merges merges byte-fallback tokens ({pieces[a]!r} + {pieces[b]!r} -> "
                   f"{pieces[c]!r}); sentencepiece never does (it falls back to bytes after merging), so "
                   "GemmaTokenizer cannot give this file's ids. Use GemmaTokenizerFast, which applies the "
                   "merges as listed.")
    return scores.tolist(), sp_names, refusal


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def model_proto_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF"):
    """(the sentencepiece ``ModelProto`` a GGUF's tokenizer metadata describes, its pieces, their
    types). ``metadata``: the GGUF key/value pairs (``GGUFFile(path).metadata``): string arrays
    as lists of str, numeric arrays as 1-D numpy arrays. ``source`` names the file in error
    messages. ``ValueError`` (naming the key) for a vocabulary that is not sentencepiece-style
    or for metadata that contradicts itself. For Gemma 4 the scores come from the merges and
    every piece keeps its name (what a ``tokenizer.model`` written back holds)."""
    proto, vocab = _model_proto(metadata, source)
    return proto, vocab.pieces, vocab.types


def _model_proto(metadata: Mapping[str, Any], source: str):
    vocab = _pieces(metadata, source)
    pieces, scores, types, ids = vocab.pieces, vocab.scores, vocab.types, vocab.ids
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
    return proto, vocab


def sentencepiece_model_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> bytes:
    """The serialized ModelProto of model_proto_from_gguf: a ``tokenizer.model``'s bytes."""
    return model_proto_from_gguf(metadata, source)[0].SerializeToString()


def tokenizer_config_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """The tokenizer settings a GGUF states, as ``tokenizer_config.json`` keys:
    bos/eos/unk/pad tokens, ``add_bos_token`` (default True, as llama.cpp for a
    sentencepiece vocabulary; always False for Gemma 4, as transformers), ``add_eos_token``
    (default False) and ``chat_template`` (``tokenizer.chat_template``) when present, and
    ``added_tokens_decoder`` marking Gemma 1-3's media markers special (MEDIA_MARKERS)."""
    tokens = _tokens(metadata, source)
    model = _get(metadata, "model", source)
    n = len(tokens)
    config: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _special_id(metadata, key, n, source)
        config[name] = tokens[index] if index is not None else None
    for name, default in (("add_bos_token", True), ("add_eos_token", False)):
        value = _get(metadata, name, source, required=False)
        config[name] = default if value is None else _as_bool(value, _KEY + name, source)
    if model == "gemma4":
        # transformers' answer: Gemma 4's chat template writes <bos> itself, so the tokenizer adds
        # none, although llama.cpp's converter writes add_bos_token = true (and llama.cpp forces it).
        config["add_bos_token"] = False
    types = _get(metadata, "token_type", source, required=False)
    if model == "llama" and types is not None and len(types) == n:
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
    Gemma's tokenizer never does, and GemmaTokenizer would silently give other ids. A Gemma 4
    model carries the file's merges (``model.merges``, what GemmaTokenizerFast runs) and, when
    sentencepiece cannot follow them, says why in ``model.sp_refusal`` (GemmaTokenizer raises
    it)."""
    path = os.fspath(path)
    with GGUFFile(path) as f:
        metadata = f.metadata
    proto, vocab = _model_proto(metadata, path)
    prefix = metadata.get(_KEY + "add_space_prefix")
    if prefix is not None and _as_bool(prefix, _KEY + "add_space_prefix", path):
        raise ValueError(
            f"{path}: {_KEY}add_space_prefix is true (a tokenizer that prepends a space, as Llama 2's); "
            "Gemma's tokenizer adds none, so GemmaTokenizer cannot reproduce this file's token ids"
        )
    sp_bytes = None
    if vocab.sp_names:  # Gemma 4's pieces no merge makes: renamed for sentencepiece alone
        for i, name in vocab.sp_names.items():
            proto.pieces[i].piece = name
        sp_bytes = proto.SerializeToString()
        for i in vocab.sp_names:
            proto.pieces[i].piece = vocab.pieces[i]
    model = SentencePieceModel.from_proto(proto, path, vocab.pieces, vocab.types, merges=vocab.merges,
                                          sp_bytes=sp_bytes, sp_refusal=vocab.sp_refusal)
    return model, tokenizer_config_from_gguf(metadata, path)


def read_gguf_tokenizer(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """(``tokenizer.model`` bytes, tokenizer config) of a GGUF file (see read_gguf_model)."""
    model, config = read_gguf_model(path)
    return model.data, config
