"""Gemma tokenizers with the Hugging Face transformers API.

``GemmaTokenizer`` runs on ``sentencepiece`` (a runtime dependency) and reads
``tokenizer.model``, or a GGUF file's tokenizer metadata rebuilt as one
(``convert/gguf_tokenizer.py``); ``GemmaTokenizerFast`` runs on ``tokenizers`` (optional) and
reads ``tokenizer.json``, or builds one from ``tokenizer.model`` exactly as
transformers does. Both give the token ids of transformers' ``GemmaTokenizer``
(5.x, the tokenizers-backed class) on the same files.

How the sentencepiece path matches transformers
-----------------------------------------------
transformers treats every added token (the CONTROL and USER_DEFINED pieces of the
model, the named special tokens, and the ``added_tokens_decoder`` entries of
``tokenizer_config.json``) as an atom matched on the raw text, leftmost and then
longest first, and runs the BPE model only on the text in between. We do the same:
the text is split on those strings with one regex compiled from their trie, and
each remaining chunk goes to sentencepiece. The sentencepiece normalizer is forced
to Gemma's (identity, no dummy prefix, whitespace kept, spaces escaped as U+2581),
because transformers' Gemma tokenizer applies no other normalization whatever the
model file says. A USER_DEFINED piece that holds U+2581 (Gemma's runs of spaces,
"▁▁" .. 31 of them) is, for transformers, an added token matching a literal U+2581
and otherwise an ordinary BPE piece, so spaces are merged into runs (32 spaces: 16 +
16); sentencepiece would match it whole in the escaped text (31 + 1), so it is handed
to sentencepiece as a NORMAL piece ranked by its id (``_spiece_pieces_as_bpe``).
Decoding mirrors transformers' decoder chain (U+2581 -> space, byte pieces joined and
decoded as UTF-8 with one U+FFFD per byte of an invalid run).

Deliberate differences from transformers
----------------------------------------
- ``padding_side`` is "left" (transformers' Gemma class says so too; generation
  wants it), ``add_bos_token`` is True unless a config says otherwise, also for a
  bare ``tokenizer.model`` (transformers 5 adds no BOS there).
- Ids outside the vocabulary, ``max_length < 1``, ``padding="max_length"`` without
  ``max_length``, ragged batches with ``return_tensors`` and a system turn in
  Gemma 1/2 chats raise ``ValueError`` (transformers skips ids, ignores or builds
  object arrays, or raises jinja2's ``TemplateError``).
- ``lstrip`` / ``rstrip`` / ``single_word`` / ``normalized`` flags of added tokens are
  not honoured by ``GemmaTokenizer`` (Gemma's are all false); ``GemmaTokenizerFast``
  honours them through ``tokenizers``.
- Known Gemma chat templates are rendered by plain Python (no jinja2 needed);
  other templates need jinja2.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Iterable

import numpy as np

__all__ = [
    "BatchEncoding",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
    "GEMMA_CHAT_TEMPLATE",
    "GEMMA3_CHAT_TEMPLATE",
]

SPIECE_UNDERLINE = "\u2581"

# sentencepiece_model.proto, SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
_MODEL_BPE = 2

# transformers' VERY_LARGE_INTEGER / LARGE_INTEGER: a model_max_length above the
# latter means "no limit".
_VERY_LARGE_INTEGER = int(1e30)
_LARGE_INTEGER = int(1e20)

# Gemma 1 / Gemma 2 instruction-tuned models (google/gemma-2b-it, gemma-7b-it,
# gemma-2-*-it), verbatim from their tokenizer_config.json.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma 3 instruction-tuned models: a system turn is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

_KNOWN_TEMPLATES = {GEMMA_CHAT_TEMPLATE: "gemma", GEMMA3_CHAT_TEMPLATE: "gemma3"}


# --------------------------------------------------------------------------------------
# BatchEncoding
# --------------------------------------------------------------------------------------


class BatchEncoding(dict):
    """A dict of model inputs (``input_ids``, ``attention_mask``) with attribute access.

    Like transformers' ``BatchEncoding``: ``enc.input_ids`` is ``enc["input_ids"]``,
    ``enc.to(device)`` moves torch tensors, and ``model(**enc)`` works.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key {name!r}; keys: {list(self.keys())}") from None

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)

    def to(self, device: Any) -> "BatchEncoding":
        """Move every torch tensor to ``device`` (in place) and return self."""
        for key, value in self.items():
            if hasattr(value, "to") and not isinstance(value, (list, np.ndarray)):
                self[key] = value.to(device)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchEncoding":
        """Convert every value to ``tensor_type`` ("np" or "pt") in place."""
        for key, value in list(self.items()):
            self[key] = _to_tensor(value, tensor_type, key)
        return self


def _to_tensor(value: Any, tensor_type: str | None, name: str) -> Any:
    if tensor_type is None:
        return value
    if isinstance(value, list) and value and isinstance(value[0], list):
        lengths = {len(row) for row in value}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make one tensor of {name!r}: the sequences have different lengths {sorted(lengths)}; "
                "pass padding=True (or padding='max_length' with max_length) to pad them"
            )
    if tensor_type == "np":
        return np.asarray(value, dtype=np.int64)
    if tensor_type == "pt":
        try:
            import torch
        except ImportError as e:
            raise ImportError("return_tensors='pt' needs torch; install it or use return_tensors='np'") from e
        return torch.tensor(value, dtype=torch.long)
    raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {tensor_type!r}")


def _check_return_tensors(return_tensors: Any) -> str | None:
    if return_tensors is None:
        return None
    value = getattr(return_tensors, "value", return_tensors)  # transformers' TensorType enum
    if value not in ("np", "pt"):
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
    return value


# --------------------------------------------------------------------------------------
# tokenizer.model (a sentencepiece ModelProto), read with bounds checks
# --------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, end: int, path: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ValueError(f"{path}: truncated varint in the sentencepiece model")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"{path}: varint longer than 10 bytes in the sentencepiece model")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if not value:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _iter_fields(buf: bytes, start: int, end: int, path: str):
    """Yield (field, wire_type, value, field_start, field_end) of one protobuf message.

    value: int for varints, bytes for fixed32/fixed64, (start, end) for length-delimited.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end, path)
        elif wire == 2:
            n, pos = _read_varint(buf, pos, end, path)
            if n > end - pos:
                raise ValueError(f"{path}: field {field} says {n} bytes but only {end - pos} remain")
            value = (pos, pos + n)
            pos += n
        elif wire == 5:
            if end - pos < 4:
                raise ValueError(f"{path}: truncated fixed32 field {field}")
            value = buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            if end - pos < 8:
                raise ValueError(f"{path}: truncated fixed64 field {field}")
            value = buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"{path}: unsupported protobuf wire type {wire} in field {field}; not a sentencepiece model")
        yield field, wire, value, field_start, pos


class _SpModelFile:
    """The parts of a ``tokenizer.model`` we need: pieces, their types, the specs.

    ``sp_bytes`` is the model as handed to sentencepiece: the file itself, or the file
    with its normalizer spec replaced by Gemma's and its USER_DEFINED pieces holding
    U+2581 made NORMAL (``respelled``; unless ``spiece_user_defined_to_bpe`` is false,
    as for a model rebuilt from a GGUF), see the module docstring. Parsed with
    protobuf's compiled parser when ``protobuf`` is installed (a 256k-piece model in
    about 0.3 s), else with the bounded pure-Python reader below (about 2 s).
    """

    def __init__(self, data: bytes, path: str, use_protobuf: bool = True, spiece_user_defined_to_bpe: bool = True):
        self.path = path
        self.data = data
        parsed = _parse_model_protobuf(data, path) if use_protobuf else None
        if parsed is None:
            parsed = _parse_model_pure(data, path)
        self.pieces, self.types, spec, self.model_type, self.byte_fallback, get_scores, rewrite = parsed
        if not self.pieces:
            raise ValueError(f"{path}: the sentencepiece model holds no pieces")
        for i, t in enumerate(self.types):
            if t not in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
                raise ValueError(f"{path}: piece {i} ({self.pieces[i]!r}) has unknown type {t}")
        self.normalizer = spec
        gemma_shaped = (
            spec["name"] in ("identity", "")
            and not spec["charsmap"]
            and not spec["rule_tsv"]
            and not spec["add_dummy_prefix"]
            and not spec["remove_extra_whitespaces"]
            and spec["escape_whitespaces"]
        )
        self.normalizer_rewritten = not gemma_shaped
        # USER_DEFINED pieces holding U+2581 (Gemma's runs of spaces) become BPE pieces for
        # sentencepiece; see _spiece_pieces_as_bpe. A GGUF-rebuilt model has already had
        # its runs of spaces turned so (convert/gguf_tokenizer.py), and its other such
        # pieces stand for a literal space that transformers' GGUF tokenizer matches whole.
        self.respelled: dict[int, tuple[int, float]] = {}
        if spiece_user_defined_to_bpe and self.model_type == _MODEL_BPE:
            self.respelled = _spiece_pieces_as_bpe(self.pieces, self.types, get_scores)
        if gemma_shaped and not self.respelled:
            self.sp_bytes = data
        else:
            self.sp_bytes = rewrite(not gemma_shaped, self.respelled)
        self.id_of: dict[str, int] = {}
        for i, piece in enumerate(self.pieces):
            self.id_of.setdefault(piece, i)


def _spiece_pieces_as_bpe(
    pieces: list[str], types: list[int], get_scores: Callable[[], list[float]]
) -> dict[int, tuple[int, float]]:
    """{id: (NORMAL, score)} for the USER_DEFINED pieces that hold U+2581, so that
    sentencepiece's BPE builds them by merges, as transformers' BPE does.

    Gemma's runs of spaces ("▁▁" .. 31 of them; ids 138..167 in Gemma 3) are USER_DEFINED.
    transformers' GemmaTokenizer makes every USER_DEFINED piece an added token matched on
    the raw text (where a space is " ", so these never match spaces) and otherwise an
    ordinary BPE piece, with merges ranked by the id of the merged piece. Sentencepiece
    instead matches USER_DEFINED pieces whole, longest first, in the escaped text: 32
    spaces would be 31 + 1 where transformers merges 16 + 16. As NORMAL pieces whose score
    sits where their id sits among the NORMAL pieces' scores (which fall as ids rise in
    Gemma's models, as BPE training writes them), sentencepiece merges them in
    transformers' order. The raw-text matching stays: ``GemmaTokenizer`` registers these
    pieces as added tokens by their original type. USER_DEFINED pieces without U+2581 can
    never be seen by sentencepiece (the raw-text matcher takes every occurrence first),
    so they keep their type.
    """
    targets = [i for i, (p, t) in enumerate(zip(pieces, types)) if t == _USER_DEFINED and SPIECE_UNDERLINE in p]
    if not targets:
        return {}
    normal = np.flatnonzero(np.asarray(types) == _NORMAL)
    normal_scores = np.asarray(get_scores(), dtype=np.float64)[normal] if normal.size else None
    gaps: dict[int, list[int]] = {}
    for i in targets:  # ascending ids
        gaps.setdefault(int(np.searchsorted(normal, i)), []).append(i)
    out: dict[int, tuple[int, float]] = {}
    for k, ids in gaps.items():
        for j, i in enumerate(ids):
            if normal_scores is None:
                score = -float(i)
            elif k == 0:  # before every NORMAL piece: above the best score, one per id
                score = normal_scores.max() + (normal[0] - i)
            elif k == normal.size:  # after every NORMAL piece: below the worst score
                score = normal_scores.min() - (i - normal[-1])
            else:  # between two NORMAL pieces: evenly between their scores, in id order
                hi, lo = normal_scores[k - 1], normal_scores[k]
                score = hi - (hi - lo) * (j + 1) / (len(ids) + 1)
            out[i] = (_NORMAL, float(np.float32(score)))
    return out


# Gemma's NormalizerSpec: name "identity", add_dummy_prefix false,
# remove_extra_whitespaces false, escape_whitespaces true.
_GEMMA_NORMALIZER_SPEC = b"\x0a\x08identity\x18\x00\x20\x00\x28\x01"
_GEMMA_NORMALIZER_FIELD = b"\x1a" + bytes([len(_GEMMA_NORMALIZER_SPEC)]) + _GEMMA_NORMALIZER_SPEC


def _parse_model_protobuf(data: bytes, path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
        from google.protobuf.message import DecodeError
    except Exception:  # protobuf missing or too old for sentencepiece's generated module
        return None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    ns = proto.normalizer_spec
    spec = {
        "name": ns.name,
        "charsmap": len(ns.precompiled_charsmap),
        "add_dummy_prefix": ns.add_dummy_prefix,
        "remove_extra_whitespaces": ns.remove_extra_whitespaces,
        "escape_whitespaces": ns.escape_whitespaces,
        "rule_tsv": len(ns.normalization_rule_tsv),
    }

    def rewrite(normalizer: bool, respelled: Mapping[int, tuple[int, float]]) -> bytes:
        if normalizer:
            proto.normalizer_spec.Clear()
            proto.normalizer_spec.ParseFromString(_GEMMA_NORMALIZER_SPEC)
        for index, (ptype, score) in respelled.items():
            proto.pieces[index].type = ptype
            proto.pieces[index].score = score
        return proto.SerializeToString()

    def get_scores() -> list[float]:
        return [p.score for p in proto.pieces]

    return pieces, types, spec, proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback, get_scores, rewrite


def _parse_model_pure(data: bytes, path: str):
    pieces: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    spans: list[tuple[int, int, int, int]] = []  # per piece: field start, end; piece string start, end
    normalizer = None  # (value start, value end, field start, field end)
    trainer = None
    for field, wire, value, fstart, fend in _iter_fields(data, 0, len(data), path):
        if field == 1 and wire == 2:
            piece, ptype, score, text = "", _NORMAL, 0.0, (value[0], value[0])
            for f, w, v, _, _ in _iter_fields(data, value[0], value[1], path):
                if f == 1 and w == 2:
                    try:
                        piece = data[v[0] : v[1]].decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}: piece {len(pieces)} is not valid UTF-8 ({e})") from None
                    text = v
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    ptype = v
            pieces.append(piece)
            types.append(ptype)
            scores.append(score)
            spans.append((fstart, fend, *text))
        elif field == 2 and wire == 2:
            trainer = value
        elif field == 3 and wire == 2:
            normalizer = (value[0], value[1], fstart, fend)
    # proto2 defaults: add_dummy_prefix / remove_extra_whitespaces / escape_whitespaces
    # are true when absent.
    spec = {"name": "", "charsmap": 0, "add_dummy_prefix": 1, "remove_extra_whitespaces": 1,
            "escape_whitespaces": 1, "rule_tsv": 0}
    if normalizer is not None:
        for f, w, v, _, _ in _iter_fields(data, normalizer[0], normalizer[1], path):
            if f == 1 and w == 2:
                spec["name"] = data[v[0] : v[1]].decode("utf-8", "replace")
            elif f == 2 and w == 2:
                spec["charsmap"] = v[1] - v[0]
            elif f == 3 and w == 0:
                spec["add_dummy_prefix"] = v
            elif f == 4 and w == 0:
                spec["remove_extra_whitespaces"] = v
            elif f == 5 and w == 0:
                spec["escape_whitespaces"] = v
            elif f == 6 and w == 2:
                spec["rule_tsv"] = v[1] - v[0]
    model_type, byte_fallback = 1, False  # UNIGRAM is the proto default
    if trainer is not None:
        for f, w, v, _, _ in _iter_fields(data, trainer[0], trainer[1], path):
            if f == 3 and w == 0:
                model_type = v
            elif f == 35 and w == 0:
                byte_fallback = bool(v)

    def rewrite(normalizer_too: bool, respelled: Mapping[int, tuple[int, float]]) -> bytes:
        # Splice in new fields where the old ones were, so the bytes equal protobuf's
        # serialization of the same change (fields in number order, as sentencepiece writes).
        edits: list[tuple[int, int, bytes]] = []
        for index, (ptype, score) in respelled.items():
            fstart, fend, tstart, tend = spans[index]
            body = (b"\x0a" + _encode_varint(tend - tstart) + data[tstart:tend]
                    + b"\x15" + struct.pack("<f", score) + b"\x18" + _encode_varint(ptype))
            edits.append((fstart, fend, b"\x0a" + _encode_varint(len(body)) + body))
        tail = b""
        if normalizer_too:
            if normalizer is None:
                tail = _GEMMA_NORMALIZER_FIELD
            else:
                edits.append((normalizer[2], normalizer[3], _GEMMA_NORMALIZER_FIELD))
        out, pos = [], 0
        for start, end, new in sorted(edits):
            out += [data[pos:start], new]
            pos = end
        out += [data[pos:], tail]
        return b"".join(out)

    return pieces, types, spec, model_type, byte_fallback, lambda: scores, rewrite


# --------------------------------------------------------------------------------------
# Added-token matching
# --------------------------------------------------------------------------------------


def _trie_regex(tokens: Iterable[str]) -> re.Pattern | None:
    """One regex that finds the tokens leftmost-longest, as tokenizers' AddedVocabulary.

    Built from the trie of the tokens: every branch point is an alternation on
    distinct next characters, and a token that is a prefix of a longer one becomes
    a greedy optional group, so the regex engine tries the longer token first and
    backs off. Cost per text position is one trie walk, not one try per token
    (Gemma 3 has over 6000 control pieces).
    """
    trie: dict = {}
    for token in tokens:
        if not token:
            continue
        node = trie
        for ch in token:
            node = node.setdefault(ch, {})
        node[None] = True
    if not trie:
        return None

    def build(node: dict) -> str:
        terminal = None in node
        alts = [re.escape(ch) + build(child) for ch, child in node.items() if ch is not None]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return "(?:" + body + ")?" if terminal else body

    return re.compile(build(trie), re.DOTALL)


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with 'content'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    content = getattr(value, "content", None)  # a transformers / tokenizers AddedToken
    if isinstance(content, str):
        return content
    raise ValueError(f"a special token must be a string or a dict with 'content', got {value!r}")


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# The shared front end
# --------------------------------------------------------------------------------------


_CONFIG_KEYS = (
    "add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length",
    "bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "chat_template",
    "additional_special_tokens", "extra_special_tokens", "added_tokens_decoder",
)


class _GemmaTokenizerBase:
    """Everything but the backend: special tokens, configs, padding, chat."""

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    # ---- construction -------------------------------------------------------------

    def _init_front(
        self,
        *,
        pieces_vocab_size: int,
        piece_to_id: Mapping[str, int],
        default_special: Iterable[str],
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        bos_token: Any = "<bos>",
        eos_token: Any = "<eos>",
        pad_token: Any = "<pad>",
        unk_token: Any = "<unk>",
        mask_token: Any = None,
        additional_special_tokens: Iterable[Any] | None = None,
        extra_special_tokens: Iterable[Any] | Mapping | None = None,
        added_tokens_decoder: Mapping | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        chat_template: Any = None,
        name_or_path: str = "",
        **unused: Any,
    ) -> None:
        self.name_or_path = name_or_path
        self.init_kwargs = dict(unused)
        self._vocab_size = pieces_vocab_size
        self._piece_to_id = piece_to_id
        self.add_bos_token = True if add_bos_token is None else bool(add_bos_token)
        self.add_eos_token = False if add_eos_token is None else bool(add_eos_token)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = _VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)

        # Added tokens: id -> (content, special). Tokens already in the vocabulary keep
        # their id; new ones take the next ids, as in transformers.
        self._added: dict[int, tuple[str, bool]] = {}
        self._len = pieces_vocab_size
        self._added_ids: dict[str, int] = {}
        for key, entry in sorted((added_tokens_decoder or {}).items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry)
            special = bool(entry.get("special", False)) if isinstance(entry, Mapping) else bool(
                getattr(entry, "special", False)
            )
            index = int(key)
            if index < 0:
                raise ValueError(f"added_tokens_decoder: negative id {index} for {content!r}")
            self._register(content, special, index)

        self.bos_token = _token_content(bos_token)
        self.eos_token = _token_content(eos_token)
        self.pad_token = _token_content(pad_token)
        self.unk_token = _token_content(unk_token)
        if mask_token is None and "<mask>" in piece_to_id:  # transformers' Gemma default
            mask_token = "<mask>"
        self.mask_token = _token_content(mask_token)
        extras: list[str] = []
        for group in (additional_special_tokens, extra_special_tokens):
            if isinstance(group, Mapping):  # transformers 5 may store {name: token}
                group = list(group.values())
            for token in group or ():
                content = _token_content(token)
                if content and content not in extras:
                    extras.append(content)
        self.additional_special_tokens = extras
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token, *extras):
            if token:
                self._register(token, True, None)
        for token in default_special:
            if token in piece_to_id and token not in self._added_ids:
                self._register(token, True, None)
        self.chat_template = chat_template

    def _register(self, content: str | None, special: bool, index: int | None) -> None:
        if not content:
            return
        if index is None:
            index = self._added_ids.get(content)
            if index is None:
                index = self._piece_to_id.get(content)
            if index is None:
                index = max(len(self), self._vocab_size)
        elif content in self._added_ids and self._added_ids[content] != index:
            raise ValueError(
                f"added token {content!r} has two ids: {self._added_ids[content]} and {index}"
            )
        old = self._added.get(index)
        self._added[index] = (content, special or (old is not None and old[0] == content and old[1]))
        self._added_ids[content] = index
        self._len = max(self._len, index + 1)

    @staticmethod
    def _read_config(folder: str, kwargs: dict) -> dict:
        """tokenizer_config.json, then special_tokens_map.json, then chat_template.jinja;
        explicit kwargs win."""
        config: dict = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            raw = _load_json(cfg_path)
            config.update({k: raw[k] for k in _CONFIG_KEYS if k in raw})
        stm_path = os.path.join(folder, "special_tokens_map.json")
        if os.path.isfile(stm_path):
            for key, value in _load_json(stm_path).items():
                if key in _CONFIG_KEYS and key not in config:
                    config[key] = value
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if "chat_template" not in config and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        added_path = os.path.join(folder, "added_tokens.json")
        if os.path.isfile(added_path):
            decoder = dict(config.get("added_tokens_decoder") or {})
            for content, index in _load_json(added_path).items():
                decoder.setdefault(str(int(index)), {"content": content, "special": False})
            config["added_tokens_decoder"] = decoder
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            config["chat_template"] = named.get("default") or next(iter(named.values()), None)
        config.update(kwargs)
        return config

    # ---- vocabulary -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as in transformers."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._len

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._id_to_piece(i): i for i in range(self._vocab_size)}
        vocab.update(self._added_ids)
        return vocab

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def mask_token_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        return [content for _, (content, special) in sorted(self._added.items()) if special]

    @property
    def all_special_ids(self) -> list[int]:
        return [index for index, (_, special) in sorted(self._added.items()) if special]

    @property
    def added_tokens_decoder(self) -> dict[int, dict[str, Any]]:
        return {i: {"content": c, "special": s} for i, (c, s) in sorted(self._added.items())}

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {value!r}")
        self._truncation_side = value

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) to id(s); an unknown token maps to ``unk_token_id``."""
        if isinstance(tokens, str):
            index = self._added_ids.get(tokens)
            if index is None:
                index = self._piece_to_id.get(tokens)
            if index is None:
                unk = self._added_ids.get(self.unk_token) if self.unk_token else None
                if unk is None and self.unk_token is not None:
                    unk = self._piece_to_id.get(self.unk_token)
                return unk
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        """Id(s) to token string(s); ``ValueError`` for an id outside the vocabulary."""
        if _is_int(ids):
            return self._token_of(int(ids))
        ids = self._as_id_list(ids, "convert_ids_to_tokens")
        special = self._special_id_set() if skip_special_tokens else ()
        return [self._token_of(i) for i in ids if i not in special]

    def _token_of(self, index: int) -> str:
        added = self._added.get(index)
        if added is not None:
            return added[0]
        if 0 <= index < self._vocab_size:
            return self._id_to_piece(index)
        raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self) - 1})")

    def _special_id_set(self) -> set[int]:
        return {i for i, (_, special) in self._added.items() if special}

    def _as_id_list(self, ids: Any, what: str) -> list[int]:
        if _is_int(ids):
            return [int(ids)]
        if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch tensor
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise ValueError(f"{what} takes one sequence (1-D), got shape {ids.shape}; use batch_decode")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{what} takes integer ids, got dtype {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        out = []
        size = self._len
        for i in ids:
            if not _is_int(i):
                raise ValueError(f"{what} takes integer token ids, got {type(i).__name__} {i!r}")
            i = int(i)
            if i < 0 or i >= size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{size - 1})")
            out.append(i)
        return out

    # ---- encoding -------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Token strings of ``text`` (no BOS unless ``add_special_tokens``)."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return [self._token_of(i) for i in ids]

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ):
        """Token ids of one text: BOS (``add_bos_token``), the text, EOS (``add_eos_token``)."""
        _check_text(text)
        enc = self(
            text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
            return_tensors=return_tensors, return_attention_mask=False,
        )
        return enc["input_ids"]

    def _with_specials(self, ids: list[int], add_special_tokens: bool, limit: int | None, side: str) -> list[int]:
        prefix: list[int] = []
        suffix: list[int] = []
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                prefix = [self.bos_token_id]
            if self.add_eos_token and self.eos_token_id is not None:
                suffix = [self.eos_token_id]
        if limit is not None:
            room = max(0, limit - len(prefix) - len(suffix))
            if len(ids) > room:
                ids = ids[:room] if side == "right" else ids[len(ids) - room :]
        return prefix + ids + suffix

    def __call__(
        self,
        text: str | list[str] | tuple[str, ...],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize one text or a batch, as transformers' ``tokenizer(...)``.

        padding: False / "do_not_pad", True / "longest", or "max_length" (needs
        ``max_length``). truncation: True / "longest_first" / "only_first" cuts each
        sequence (special tokens included) to ``max_length`` on ``truncation_side``;
        ``max_length`` alone also truncates, as in transformers. return_tensors:
        None (lists), "np" or "pt" (a batch axis is added for a single text).
        """
        if kwargs:
            unsupported = sorted(kwargs)
            raise ValueError(f"unsupported argument(s) {unsupported} for a Gemma tokenizer call")
        tensor_type = _check_return_tensors(return_tensors)
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        for t in texts:
            _check_text(t)

        # Padding / truncation strategy, with transformers' rules.
        if max_length is not None:
            if not _is_int(max_length) or int(max_length) < 1:
                raise ValueError(f"max_length must be a positive int, got {max_length!r}")
            max_length = int(max_length)
            if padding is False and truncation is None:
                truncation = True
        if padding is True or padding == "longest":
            pad_mode = "longest"
        elif padding is False or padding is None or padding == "do_not_pad":
            pad_mode = None
        elif padding == "max_length":
            pad_mode = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is True or truncation in ("longest_first", "only_first"):
            truncate = True
        elif truncation is None or truncation is False or truncation == "do_not_truncate":
            truncate = False
        else:
            raise ValueError(
                f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', got {truncation!r}"
            )
        limit = max_length
        if limit is None and self.model_max_length <= _LARGE_INTEGER:
            limit = self.model_max_length
        if pad_mode == "max_length" and limit is None:
            raise ValueError("padding='max_length' needs max_length (or a finite model_max_length)")
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError("asked to pad but the tokenizer has no pad_token; set tokenizer.pad_token")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        seqs = [
            self._with_specials(self._encode_text(t), add_special_tokens, limit if truncate else None,
                                self.truncation_side)
            for t in texts
        ]
        masks = [[1] * len(s) for s in seqs]
        if pad_mode is not None:
            target = max((len(s) for s in seqs), default=0) if pad_mode == "longest" else limit
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            pad_id = self.pad_token_id
            for k, s in enumerate(seqs):
                n = target - len(s)
                if n > 0:
                    if side == "left":
                        seqs[k] = [pad_id] * n + s
                        masks[k] = [0] * n + masks[k]
                    else:
                        seqs[k] = s + [pad_id] * n
                        masks[k] = masks[k] + [0] * n

        out = BatchEncoding()
        want_mask = True if return_attention_mask is None else bool(return_attention_mask)
        if batched:
            out["input_ids"] = seqs
            if want_mask:
                out["attention_mask"] = masks
        else:
            out["input_ids"] = seqs[0] if tensor_type is None else seqs
            if want_mask:
                out["attention_mask"] = masks[0] if tensor_type is None else masks
        if tensor_type is not None:
            out.convert_to_tensors(tensor_type)
        return out

    # ---- decoding -------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of one sequence of ids (list, numpy array, 1-D torch tensor or an int)."""
        _ignore_decode_kwargs(kwargs)
        ids = self._as_id_list(token_ids, "decode")
        if skip_special_tokens:
            special = self._special_id_set()
            ids = [i for i in ids if i not in special]
        return self._decode_ids(ids)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """``decode`` of each row of a list of sequences or a 2-D array / tensor."""
        _ignore_decode_kwargs(kwargs)
        if hasattr(sequences, "detach") and hasattr(sequences, "cpu"):
            sequences = sequences.detach().cpu().numpy()
        if isinstance(sequences, np.ndarray) and sequences.ndim != 2:
            raise ValueError(f"batch_decode takes a 2-D array of ids, got shape {sequences.shape}")
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ---- chat -------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[Mapping[str, Any]] | list[list[Mapping[str, Any]]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        **template_kwargs: Any,
    ):
        """Render a chat (or a batch of chats) in Gemma's turn format and tokenize it.

        Renders exactly what Gemma's own jinja template does: ``<bos>``, then
        ``<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n`` per message with
        "assistant" written as "model", and ``<start_of_turn>model\\n`` when
        ``add_generation_prompt``. Roles must alternate user / model starting with
        user; a leading "system" message raises ``ValueError`` with Gemma 1/2's
        template and is folded into the first user turn with Gemma 3's. Which one
        applies comes from the tokenizer's ``chat_template`` (Gemma 1/2 when none is
        set, unless the vocabulary is Gemma 3's); another template is rendered with
        jinja2 when installed.

        As transformers 5: returns the string when ``tokenize=False``, else a
        ``BatchEncoding`` (``input_ids``, ``attention_mask``), or only the ids when
        ``return_dict=False``. The rendered text is tokenized without adding another BOS.
        """
        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError("apply_chat_template needs a non-empty list of messages (dicts with 'role' and 'content')")
        batched = isinstance(conversation[0], (list, tuple))
        chats = list(conversation) if batched else [conversation]
        rendered = [self._render_chat(chat, chat_template, add_generation_prompt, template_kwargs) for chat in chats]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(
            rendered if batched else rendered[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        return out if return_dict else out["input_ids"]

    def _render_chat(self, chat: Any, template: str | None, add_generation_prompt: bool, extra: dict) -> str:
        if not isinstance(chat, (list, tuple)) or not chat:
            raise ValueError("each conversation must be a non-empty list of messages")
        messages = []
        for m in chat:
            if not isinstance(m, Mapping):
                raise ValueError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
            messages.append({k: v for k, v in m.items() if v is not None})
        template = template if template is not None else self.chat_template
        if template is None:
            dialect = "gemma3" if "<start_of_image>" in self._piece_to_id else "gemma"
        else:
            dialect = _KNOWN_TEMPLATES.get(template)
        bos = self.bos_token or ""
        if dialect == "gemma":
            return _render_gemma(messages, bos, add_generation_prompt)
        if dialect == "gemma3":
            return _render_gemma3(messages, bos, add_generation_prompt)
        try:
            return _render_jinja(template, messages, add_generation_prompt, {**self.special_tokens_map, **extra})
        except ImportError:
            dialect = "gemma3" if "first_user_prefix" in template else "gemma"
            warnings.warn(
                "this tokenizer's chat_template is not one of Gemma's known templates and jinja2 is not installed; "
                f"rendering with the built-in {dialect!r} format (pip install jinja2 to render the template itself)",
                stacklevel=3,
            )
            render = _render_gemma3 if dialect == "gemma3" else _render_gemma
            return render(messages, bos, add_generation_prompt)

    # ---- saving ---------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        decoder = {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": s}
            for i, (c, s) in sorted(self._added.items())
        }
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": list(self.additional_special_tokens),
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": self.unk_token,
        }
        if self.mask_token is not None:
            config["mask_token"] = self.mask_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def _save_configs(self, folder: str) -> list[str]:
        written = []
        config_path = os.path.join(folder, "tokenizer_config.json")
        _write_atomic(config_path, (json.dumps(self._config_dict(), indent=2, ensure_ascii=False) + "\n").encode())
        written.append(config_path)
        stm_path = os.path.join(folder, "special_tokens_map.json")
        _write_atomic(stm_path, (json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n").encode())
        written.append(stm_path)
        return written

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, padding_side={self.padding_side!r}, add_bos_token={self.add_bos_token}, "
            f"add_eos_token={self.add_eos_token})"
        )

    # ---- backend hooks ----------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _id_to_piece(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise ValueError(
            f"text must be a str or a list of str, got {type(text).__name__}"
            + (" (token ids? pass them to decode)" if isinstance(text, (list, tuple)) else "")
        )


def _ignore_decode_kwargs(kwargs: dict) -> None:
    # Accepted for transformers compatibility; Gemma never cleans up spaces (transformers 5
    # ignores clean_up_tokenization_spaces for BPE models) nor spaces special tokens.
    unknown = set(kwargs) - {"clean_up_tokenization_spaces", "spaces_between_special_tokens"}
    if unknown:
        raise ValueError(f"unsupported decode argument(s) {sorted(unknown)}")


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_model_bytes(vocab_file: str, kwargs: dict) -> bytes:
    """The sentencepiece model in ``vocab_file``: a ``tokenizer.model``, or one rebuilt
    from a GGUF file's tokenizer metadata, whose settings (special tokens, add_bos_token,
    chat_template) then fill the ``kwargs`` the caller did not give."""
    if not _is_gguf(vocab_file):
        with open(vocab_file, "rb") as f:
            return f.read()
    from .gguf import read_gguf_tokenizer

    data, config = read_gguf_tokenizer(vocab_file)
    for key, value in config.items():
        kwargs.setdefault(key, value)
    return data


def _resolve_folder(path: str | os.PathLike, cls_name: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{cls_name}.from_pretrained: {path!r} does not exist. Pass a local folder holding tokenizer.model "
            "(and optionally tokenizer_config.json), or the path of a .model file; gemma_cpp never downloads "
            "from the Hugging Face Hub (use `huggingface-cli download` first)."
        )
    return path


# --------------------------------------------------------------------------------------
# Chat rendering (Gemma's templates in Python; any other template through jinja2)
# --------------------------------------------------------------------------------------


def _role(message: Mapping[str, Any]) -> str:
    role = message.get("role")
    if not isinstance(role, str):
        raise ValueError(f"a chat message needs a string 'role', got {message!r}")
    return role


def _check_alternation(role: str, index: int) -> None:
    if (role == "user") != (index % 2 == 0):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")


def _render_gemma(messages: list[dict], bos: str, add_generation_prompt: bool) -> str:
    """Gemma 1 / 2's template (GEMMA_CHAT_TEMPLATE), step for step."""
    if messages[0].get("role") == "system":
        raise ValueError("System role not supported")
    parts = [bos]
    for i, message in enumerate(messages):
        role = _role(message)
        _check_alternation(role, i)
        if role == "assistant":
            role = "model"
        content = message.get("content", "")
        if not isinstance(content, str):
            raise ValueError(
                f"Gemma's chat template takes string contents; message {i} has {type(content).__name__}"
            )
        parts.append("<start_of_turn>" + role + "\n" + content.strip() + "<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _render_gemma3(messages: list[dict], bos: str, add_generation_prompt: bool) -> str:
    """Gemma 3's template (GEMMA3_CHAT_TEMPLATE), step for step."""
    parts = [bos]
    prefix = ""
    loop_messages = messages
    if messages[0].get("role") == "system":
        content = messages[0].get("content", "")
        if isinstance(content, str):
            prefix = content + "\n\n"  # not stripped: the template adds it as is
        else:
            try:
                prefix = content[0]["text"] + "\n\n"
            except (TypeError, KeyError, IndexError):
                raise ValueError("a system message with list content needs a first item with 'text'") from None
        loop_messages = messages[1:]
    for i, message in enumerate(loop_messages):
        role = _role(message)
        _check_alternation(role, i)
        if role == "assistant":
            role = "model"
        parts.append("<start_of_turn>" + role + "\n" + (prefix if i == 0 else ""))
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content.strip())
        elif isinstance(content, (list, tuple, Mapping)):
            for item in content:
                if not isinstance(item, Mapping):
                    continue  # jinja: item['type'] is undefined, nothing is written
                if item.get("type") == "image":
                    parts.append("<start_of_image>")
                elif item.get("type") == "text":
                    text = item.get("text", "")
                    parts.append(text.strip() if isinstance(text, str) else str(text).strip())
        else:
            raise ValueError("Invalid content type")
        parts.append("<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    import jinja2  # noqa: F401  (ImportError is handled by the caller)
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


# --------------------------------------------------------------------------------------
# GemmaTokenizer: sentencepiece
# --------------------------------------------------------------------------------------


class GemmaTokenizer(_GemmaTokenizerBase):
    """Gemma's tokenizer over ``sentencepiece``, with transformers' API and ids.

    >>> tok = GemmaTokenizer.from_pretrained("path/to/gemma")
    >>> enc = tok(["Hello", "Hi there"], padding=True, return_tensors="np")
    >>> tok.decode(enc.input_ids[1], skip_special_tokens=True)
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(self, vocab_file: str | os.PathLike, **kwargs: Any):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - runtime dependency
            raise ImportError("GemmaTokenizer needs the `sentencepiece` package: pip install sentencepiece") from e
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"GemmaTokenizer: no sentencepiece model at {vocab_file!r}")
        data = _read_model_bytes(vocab_file, kwargs)
        self.vocab_file = vocab_file
        self._model = _SpModelFile(data, vocab_file, spiece_user_defined_to_bpe=not _is_gguf(vocab_file))
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._model.sp_bytes)
        except RuntimeError as e:
            raise ValueError(f"{vocab_file}: sentencepiece cannot load this model ({e})") from None
        if self._sp.get_piece_size() != len(self._model.pieces):
            raise ValueError(
                f"{vocab_file}: sentencepiece reports {self._sp.get_piece_size()} pieces, the file lists "
                f"{len(self._model.pieces)}"
            )
        kwargs.setdefault("name_or_path", vocab_file)
        self._init_front(
            pieces_vocab_size=len(self._model.pieces),
            piece_to_id=self._model.id_of,
            default_special=("<start_of_turn>", "<end_of_turn>"),
            **kwargs,
        )
        # Every CONTROL / USER_DEFINED piece (and the unknown piece) is an atom, as
        # transformers' conversion makes them added tokens.
        types = self._model.types
        for i, piece in enumerate(self._model.pieces):
            if types[i] in (_CONTROL, _USER_DEFINED) and piece not in self._added_ids:
                self._register(piece, types[i] == _CONTROL, i)
        self._rebuild_matcher()

    def _rebuild_matcher(self) -> None:
        self._matcher = _trie_regex(self._added_ids)

    def __getstate__(self) -> dict:
        # The sentencepiece processor does not pickle; it is rebuilt from the model bytes.
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state: dict) -> None:
        import sentencepiece as spm

        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._model.sp_bytes)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GemmaTokenizer":
        """Load from a folder with ``tokenizer.model`` (+ optional ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja``), from a
        ``.model`` file, or from a GGUF file (its ``tokenizer.ggml.*`` metadata rebuilt as a
        sentencepiece model; its settings are the config, files beside it are not read).
        Keyword arguments override the config (e.g. ``padding_side="right"``)."""
        path = _resolve_folder(pretrained_model_name_or_path, cls.__name__)
        if os.path.isdir(path):
            folder = path
            vocab_file = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(vocab_file):
                present = sorted(os.listdir(path))
                hint = (
                    " The folder has tokenizer.json: use GemmaTokenizerFast (needs `tokenizers`)."
                    if "tokenizer.json" in present else ""
                )
                ggufs = [name for name in present if name.endswith(".gguf")]
                if ggufs:
                    hint += f" To use a GGUF's tokenizer, pass the file: {os.path.join(path, ggufs[0])!r}."
                raise FileNotFoundError(
                    f"GemmaTokenizer.from_pretrained: no tokenizer.model in {path!r} (found: {present[:20]}).{hint}"
                )
        else:
            folder = os.path.dirname(path) or "."
            vocab_file = path
        if _is_gguf(vocab_file):
            # A GGUF is self-contained: its metadata is the config (see _read_model_bytes),
            # and the JSON files beside it may belong to another model.
            kwargs.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
            return cls(vocab_file, **kwargs)
        config = cls._read_config(folder, kwargs)
        config.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
        return cls(vocab_file, **config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained needs a folder, {folder!r} is a file")
        os.makedirs(folder, exist_ok=True)
        model_path = os.path.join(folder, "tokenizer.model")
        _write_atomic(model_path, self._model.data)
        return (model_path, *self._save_configs(folder))

    # ---- backend ----------------------------------------------------------------------

    def _id_to_piece(self, index: int) -> str:
        return self._model.pieces[index]

    def _encode_text(self, text: str) -> list[int]:
        sp = self._sp
        if self._matcher is None:
            return sp.encode(text) if text else []
        ids: list[int] = []
        pos = 0
        added = self._added_ids
        for m in self._matcher.finditer(text):
            if m.start() > pos:
                ids.extend(sp.encode(text[pos : m.start()]))
            ids.append(added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(sp.encode(text[pos:]))
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        # transformers' decoder chain: Replace("▁", " "), ByteFallback, Fuse. A run of byte
        # pieces is decoded together; if it is not valid UTF-8, each byte becomes U+FFFD.
        out: list[str] = []
        pending = bytearray()
        pieces = self._model.pieces
        for i in ids:
            added = self._added.get(i)
            token = added[0] if added is not None else pieces[i]
            byte = _byte_value(token) if _is_byte_token(token) else None
            if byte is not None:
                pending.append(byte)
                continue
            if pending:
                out.append(_flush_bytes(pending))
                pending = bytearray()
            out.append(token.replace(SPIECE_UNDERLINE, " "))
        if pending:
            out.append(_flush_bytes(pending))
        return "".join(out)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _byte_value(token: str) -> int | None:
    m = _BYTE_TOKEN.fullmatch(token)
    return int(m.group(1), 16) if m else None


def _flush_bytes(pending: bytearray) -> str:
    try:
        return pending.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(pending)


# --------------------------------------------------------------------------------------
# GemmaTokenizerFast: tokenizers
# --------------------------------------------------------------------------------------


def _generate_merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges from a vocabulary, ranked as transformers ranks them for Gemma:
    by the id of the merged piece, then by the lengths (and ids) of its two halves."""
    merges = []
    for merged, piece_id in vocab.items():
        local = []
        for k in range(1, len(merged)):
            left, right = merged[:k], merged[k:]
            if left in vocab and right in vocab:
                local.append((left, right, piece_id))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])))
    return [(left, right) for left, right, _ in merges]


def _tokenizers_from_spmodel(model: _SpModelFile, added: Mapping[int, tuple[str, bool]]):
    """Build the ``tokenizers.Tokenizer`` transformers' GemmaTokenizer builds from a
    ``tokenizer.model``: BPE with byte fallback over the pieces, merges from the
    vocabulary, spaces as U+2581, and the added tokens matched on raw text."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    for i, piece in enumerate(model.pieces):
        vocab.setdefault(piece, i)
    unk_ids = [i for i, t in enumerate(model.types) if t == _UNKNOWN]
    unk = model.pieces[unk_ids[0]] if unk_ids else "<unk>"
    tk = Tokenizer(
        BPE(vocab=vocab, merges=_generate_merges(vocab), fuse_unk=True, unk_token=unk, dropout=None,
            byte_fallback=True)
    )
    tk.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    # transformers' choice; a no-op after the normalizer has replaced every space.
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokens = []
    for index, (content, special) in sorted(added.items()):
        if index >= len(model.pieces):
            continue  # added below, in id order
        tokens.append(AddedToken(content, special=special, normalized=False))
    tk.add_tokens(tokens)
    extra = [(i, c, s) for i, (c, s) in sorted(added.items()) if i >= len(model.pieces)]
    for expected, (index, content, special) in enumerate(extra, start=len(model.pieces)):
        if index != expected:
            raise ValueError(f"added token {content!r} has id {index}; added ids must follow the vocabulary")
        tk.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tk


class GemmaTokenizerFast(_GemmaTokenizerBase):
    """Gemma's tokenizer over ``tokenizers`` (``tokenizer.json``), same API as GemmaTokenizer.

    Needs the optional ``tokenizers`` package. Without a ``tokenizer.json`` it builds
    the same tokenizer transformers builds from ``tokenizer.model``.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json", "vocab_file": "tokenizer.model"}

    def __init__(
        self,
        tokenizer_file: str | os.PathLike | None = None,
        vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                "GemmaTokenizerFast needs the optional `tokenizers` package (pip install tokenizers); "
                "GemmaTokenizer works with sentencepiece alone"
            ) from e
        if tokenizer_file is None and vocab_file is None:
            raise ValueError("GemmaTokenizerFast needs tokenizer_file (tokenizer.json) or vocab_file (tokenizer.model)")
        self.vocab_file = os.fspath(vocab_file) if vocab_file is not None else None
        self.tokenizer_file = os.fspath(tokenizer_file) if tokenizer_file is not None else None
        self._model: _SpModelFile | None = None
        if self.tokenizer_file is not None:
            if not os.path.isfile(self.tokenizer_file):
                raise FileNotFoundError(f"GemmaTokenizerFast: no tokenizer.json at {self.tokenizer_file!r}")
            try:
                self._tk = Tokenizer.from_file(self.tokenizer_file)
            except Exception as e:  # tokenizers raises a plain Exception on a bad file
                raise ValueError(f"{self.tokenizer_file}: tokenizers cannot load this file ({e})") from None
            self._tk.no_padding()
            self._tk.no_truncation()
            vocab = self._tk.get_vocab(with_added_tokens=False)
            base_size = self._tk.get_vocab_size(with_added_tokens=False)
            probe = self._tk.encode("", add_special_tokens=True).ids
            kwargs.setdefault("name_or_path", self.tokenizer_file)
        else:
            if not os.path.isfile(self.vocab_file):
                raise FileNotFoundError(f"GemmaTokenizerFast: no sentencepiece model at {self.vocab_file!r}")
            self._model = _SpModelFile(
                _read_model_bytes(self.vocab_file, kwargs), self.vocab_file,
                spiece_user_defined_to_bpe=not _is_gguf(self.vocab_file),
            )
            vocab = self._model.id_of
            base_size = len(self._model.pieces)
            probe = None
            kwargs.setdefault("name_or_path", self.vocab_file)
        self._id_to_piece_table = [""] * base_size
        for piece, index in vocab.items():
            if 0 <= index < base_size:
                self._id_to_piece_table[index] = piece
        # A tokenizer.json's post-processor tells whether it adds BOS / EOS; the config wins.
        if probe is not None:
            inferred_bos = bool(probe) and self._id_of(vocab, kwargs.get("bos_token", "<bos>")) == probe[0]
            inferred_eos = bool(probe) and self._id_of(vocab, kwargs.get("eos_token", "<eos>")) == probe[-1]
            kwargs.setdefault("add_bos_token", inferred_bos)
            kwargs.setdefault("add_eos_token", inferred_eos)
        if self.tokenizer_file is not None:
            # tokenizer.json's added tokens, then the config's (whose flags win).
            decoder = {
                str(index): {"content": token.content, "special": token.special}
                for index, token in self._tk.get_added_tokens_decoder().items()
            }
            decoder.update({str(k): v for k, v in (kwargs.get("added_tokens_decoder") or {}).items()})
            kwargs["added_tokens_decoder"] = decoder
        self._init_front(
            pieces_vocab_size=base_size,
            piece_to_id=vocab,
            default_special=("<start_of_turn>", "<end_of_turn>"),
            **kwargs,
        )
        if self._model is not None:
            types = self._model.types
            for i, piece in enumerate(self._model.pieces):
                if types[i] in (_CONTROL, _USER_DEFINED) and piece not in self._added_ids:
                    self._register(piece, types[i] == _CONTROL, i)
            self._tk = _tokenizers_from_spmodel(self._model, self._added)
        else:
            # Tokens the config adds but tokenizer.json lacks.
            from tokenizers import AddedToken

            known = self._tk.get_vocab(with_added_tokens=True)
            for index, (content, special) in sorted(self._added.items()):
                if content not in known:
                    if index != self._tk.get_vocab_size(with_added_tokens=True):
                        raise ValueError(
                            f"added token {content!r} has id {index}, but tokenizer.json would give it "
                            f"{self._tk.get_vocab_size(with_added_tokens=True)}"
                        )
                    self._tk.add_tokens([AddedToken(content, special=special, normalized=False)])
        # Our front end pads and truncates; the backend must not.
        self._tk.no_padding()
        self._tk.no_truncation()

    @staticmethod
    def _id_of(vocab: Mapping[str, int], token: Any) -> int | None:
        content = _token_content(token)
        return vocab.get(content) if content is not None else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GemmaTokenizerFast":
        """Load from a folder with ``tokenizer.json`` (or only ``tokenizer.model``) and the
        optional configs, or from a ``.json`` / ``.model`` / GGUF file."""
        path = _resolve_folder(pretrained_model_name_or_path, cls.__name__)
        tokenizer_file = vocab_file = None
        if os.path.isdir(path):
            folder = path
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                tokenizer_file = os.path.join(path, "tokenizer.json")
            if os.path.isfile(os.path.join(path, "tokenizer.model")):
                vocab_file = os.path.join(path, "tokenizer.model")
            if tokenizer_file is None and vocab_file is None:
                raise FileNotFoundError(
                    f"GemmaTokenizerFast.from_pretrained: neither tokenizer.json nor tokenizer.model in {path!r} "
                    f"(found: {sorted(os.listdir(path))[:20]})"
                )
        else:
            folder = os.path.dirname(path) or "."
            if _is_gguf(path):
                kwargs.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
                return cls(vocab_file=path, **kwargs)
            if path.endswith(".model"):
                vocab_file = path
            else:
                tokenizer_file = path
        config = cls._read_config(folder, kwargs)
        config.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
        return cls(tokenizer_file=tokenizer_file, vocab_file=vocab_file, **config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``tokenizer.json`` (+ ``tokenizer.model`` when known) and the configs."""
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained needs a folder, {folder!r} is a file")
        os.makedirs(folder, exist_ok=True)
        written = []
        json_path = os.path.join(folder, "tokenizer.json")
        _write_atomic(json_path, self._tk.to_str(pretty=False).encode("utf-8"))
        written.append(json_path)
        if self.vocab_file is not None and os.path.isfile(self.vocab_file):
            model_path = os.path.join(folder, "tokenizer.model")
            if self._model is not None:  # the file's bytes, or the model rebuilt from a GGUF
                _write_atomic(model_path, self._model.data)
            elif os.path.abspath(model_path) != os.path.abspath(self.vocab_file):
                with open(self.vocab_file, "rb") as f:
                    _write_atomic(model_path, f.read())
            written.append(model_path)
        return (*written, *self._save_configs(folder))

    @property
    def backend_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def _id_to_piece(self, index: int) -> str:
        return self._id_to_piece_table[index]

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids if text else []

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)
