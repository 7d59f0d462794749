"""The sentencepiece model file (`tokenizer.model`, a serialized ModelProto): read and written
with sentencepiece's own proto (`sentencepiece_model_pb2`, on protobuf), and the model handed
to sentencepiece so that it gives transformers' ids.

transformers' Gemma tokenizer applies no normalization whatever the model file says, so a file
with another normalizer is handed over with Gemma's (identity, no dummy prefix, whitespace kept,
spaces escaped as U+2581). A USER_DEFINED piece that holds U+2581 (Gemma's runs of spaces,
"▁▁" .. 31 of them) is, for transformers, an added token matching a literal U+2581 and
otherwise an ordinary BPE piece, so spaces are merged into runs (32 spaces: 16 + 16);
sentencepiece would match it whole in the escaped text (31 + 1), so it is handed over as a
NORMAL piece ranked where its id sits (`rank_as_merges`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SPIECE_UNDERLINE = "\u2581"

# ModelProto.SentencePiece.Type (GGUF token types use the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PIECE_TYPES = {NORMAL: "NORMAL", UNKNOWN: "UNKNOWN", CONTROL: "CONTROL", USER_DEFINED: "USER_DEFINED",
               UNUSED: "UNUSED", BYTE: "BYTE"}
# TrainerSpec.ModelType
MODEL_BPE = 2


def set_gemma_normalizer(spec, add_dummy_prefix: bool = False) -> None:
    """Gemma's NormalizerSpec: name "identity", no dummy prefix, extra whitespace kept, spaces
    escaped as U+2581. Every field is written (proto2 defaults would say otherwise)."""
    spec.Clear()
    spec.name = "identity"
    spec.add_dummy_prefix = add_dummy_prefix
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = True


def rank_as_merges(ids: Iterable[int], types: Sequence[int], scores: Sequence[float]) -> Dict[int, float]:
    """Scores that make the pieces `ids` rank among the NORMAL pieces where their ids sit, as
    transformers' BPE ranks merges by the merged piece's id: {id: score}.

    NORMAL pieces' scores fall as ids rise in Gemma's models (as BPE training writes them). A
    piece before every NORMAL piece scores above the best, one per id; one after every NORMAL
    piece below the worst, one per id; pieces between two NORMAL pieces are spread evenly
    between their scores, in id order (never a tie)."""
    ids = sorted(ids)
    normal = np.flatnonzero(np.asarray(types) == NORMAL)
    if not ids:
        return {}
    if normal.size == 0:
        return {i: float(np.float32(-float(i))) for i in ids}
    normal_scores = np.asarray(scores, dtype=np.float64)[normal]
    gaps: Dict[int, List[int]] = {}
    for i in ids:
        gaps.setdefault(int(np.searchsorted(normal, i)), []).append(i)
    out: Dict[int, float] = {}
    for k, members in gaps.items():
        for j, i in enumerate(members):
            if k == 0:
                score = normal_scores.max() + (normal[0] - i)
            elif k == normal.size:
                score = normal_scores.min() - (i - normal[-1])
            else:
                hi, lo = normal_scores[k - 1], normal_scores[k]
                score = hi - (hi - lo) * (j + 1) / (len(members) + 1)
            out[i] = float(np.float32(score))
    return out


def model_proto():
    """An empty ModelProto (sentencepiece's generated class, on protobuf: imported on first use,
    which keeps both out of `import gemma_cpp`)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    return pb.ModelProto()


def parse(data: bytes, path: str):
    """A ModelProto from a file's bytes; ValueError naming the file when they are not one."""
    from google.protobuf.message import DecodeError

    proto = model_proto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    return proto


class SentencePieceModel:
    """A sentencepiece model: its pieces, their types, its normalizer, and `sp_bytes`, the model
    as handed to sentencepiece (see the module docstring; `respelled` says which pieces it made
    NORMAL, {id: (NORMAL, score)}). `data` is the file's bytes, written back unchanged on save.

    spiece_user_defined_to_bpe: False for a model rebuilt from a GGUF, whose runs of spaces
    are NORMAL already (tokenizer/gguf.py) and whose other U+2581 pieces stand for a literal
    space that transformers' GGUF tokenizer matches whole.

    A Gemma 4 GGUF's model (tokenizer/gguf.py) also carries `merges`, the file's BPE merges
    (best first; None otherwise), `sp_bytes` given apart when sentencepiece must see some
    pieces under other names, and `sp_refusal`: why sentencepiece cannot give the merges' ids,
    if it cannot. Reading `sp_bytes` then raises ValueError with that reason."""

    def __init__(self, data: bytes, path: str, spiece_user_defined_to_bpe: bool = True,
                 proto=None, pieces: Optional[List[str]] = None,
                 types: Optional[List[int]] = None, *, merges: Optional[List[Tuple[str, str]]] = None,
                 sp_bytes: Optional[bytes] = None, sp_refusal: Optional[str] = None):
        self.path = path
        self.data = data
        self.merges = merges
        self.sp_refusal = sp_refusal
        proto = proto if proto is not None else parse(data, path)
        self.pieces = pieces if pieces is not None else [p.piece for p in proto.pieces]
        self.types = types if types is not None else [p.type for p in proto.pieces]
        if not self.pieces:
            raise ValueError(f"{path}: the sentencepiece model holds no pieces")
        for i, t in enumerate(self.types):
            if t not in PIECE_TYPES:
                raise ValueError(f"{path}: piece {i} ({self.pieces[i]!r}) has unknown type {t}")
            # protobuf hands a string field that is not UTF-8 over as bytes (found by fuzzing:
            # such a piece broke the added-token matcher with a TypeError).
            if not isinstance(self.pieces[i], str):
                raise ValueError(f"{path}: piece {i} ({self.pieces[i]!r}) is not valid UTF-8")
        ns = proto.normalizer_spec
        self.normalizer = {"name": ns.name, "charsmap": len(ns.precompiled_charsmap),
                           "add_dummy_prefix": ns.add_dummy_prefix,
                           "remove_extra_whitespaces": ns.remove_extra_whitespaces,
                           "escape_whitespaces": ns.escape_whitespaces, "rule_tsv": len(ns.normalization_rule_tsv)}
        self.model_type = proto.trainer_spec.model_type
        self.byte_fallback = proto.trainer_spec.byte_fallback
        gemma_shaped = (ns.name in ("identity", "") and not ns.precompiled_charsmap and not ns.normalization_rule_tsv
                        and not ns.add_dummy_prefix and not ns.remove_extra_whitespaces and ns.escape_whitespaces)
        self.normalizer_rewritten = not gemma_shaped
        self.respelled: Dict[int, Tuple[int, float]] = {}
        if spiece_user_defined_to_bpe and self.model_type == MODEL_BPE:
            runs = [i for i, (p, t) in enumerate(zip(self.pieces, self.types))
                    if t == USER_DEFINED and SPIECE_UNDERLINE in p]
            if runs:
                scores = [p.score for p in proto.pieces]
                self.respelled = {i: (NORMAL, s) for i, s in rank_as_merges(runs, self.types, scores).items()}
        if sp_bytes is not None:
            self._sp_bytes = sp_bytes
        elif gemma_shaped and not self.respelled:
            self._sp_bytes = data
        else:
            if not gemma_shaped:
                set_gemma_normalizer(proto.normalizer_spec)
            for index, (ptype, score) in self.respelled.items():
                proto.pieces[index].type = ptype
                proto.pieces[index].score = score
            self._sp_bytes = proto.SerializeToString()
        self.id_of: Dict[str, int] = {}
        for i, piece in enumerate(self.pieces):
            self.id_of.setdefault(piece, i)

    @property
    def sp_bytes(self) -> bytes:
        """The model as handed to sentencepiece; ValueError (`sp_refusal`) when sentencepiece
        cannot give this vocabulary's ids."""
        if self.sp_refusal is not None:
            raise ValueError(self.sp_refusal)
        return self._sp_bytes

    @classmethod
    def from_proto(cls, proto, path: str, pieces: List[str], types: List[int], *,
                   merges: Optional[List[Tuple[str, str]]] = None, sp_bytes: Optional[bytes] = None,
                   sp_refusal: Optional[str] = None):
        """A model built in memory (a GGUF's vocabulary): its bytes are the proto's serialization."""
        return cls(proto.SerializeToString(), path, spiece_user_defined_to_bpe=False, proto=proto, pieces=pieces,
                   types=types, merges=merges, sp_bytes=sp_bytes, sp_refusal=sp_refusal)
