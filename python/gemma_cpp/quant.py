"""int8, int4 and int4m weight formats: the numpy mirror of csrc/cpu/quant.h (the test oracle)
and the policy of which tensors a model quantizes.

int8 has the values of GGUF Q8_0, int4 those of Q4_0 and int4m those of Q4_1: blocks of 32
weights along a row, one fp16 scale d each (int4m: and one fp16 min m); int8 w = d * q
(q in [-127, 127]), int4 w = d * (q - 8), int4m w = d * q + m (q in [0, 15]; the product and
the sum each rounded to float32, as ggml). int4 is int4m with m = -8 d.
A quantized matrix is a QuantizedWeight: the tuple (format, quants, scales), or
(format, quants, scales, mins), with names for its parts (the engine takes any such tuple;
csrc/bindings/common.h reads it):
  int8:  quants int8-valued uint8 [rows, K], scales uint16 (fp16 bits) [rows, K / 32]
  int4:  quants uint8 [rows, ceil(K / 64) * 32]: byte j of block pair p holds element j of
         block 2p in its low nibble and of block 2p + 1 in its high nibble.
  int4m: quants as int4, scales as int4, mins uint16 (fp16 bits) [rows, K / 32].
q4_k, q5_k and q6_k hold the values of GGUF Q4_K, Q5_K and Q6_K (super-blocks of 256 with
6-bit sub-block scales and mins, or int8 sub-block scales, and fp16 super-scales): one array,
(format, quants), quants uint8 [rows, K / 256 * B], each row its super-blocks of B bytes, the
scales unpacked in front of the file's quant bytes (csrc/cpu/quant.h has the byte map;
`kquant_from_gguf` builds it, `dequantize` reads it). They are imported, never quantized here.
Rows go in groups of 16 (csrc/cpu/quant.h): inside each whole group the rows are interleaved,
the quants 4 bytes at a time ([row bytes / 4][16][4]) and the scales and mins per block
([K / 32][16]); the rows % 16 rows after the last whole group stay plain. `interleave` and
`deinterleave` move between that order and plain rows; the shapes do not change.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np

from ._C import weight_formats
from .formats.gguf import k_scale_min

# The engine's table of weight formats (csrc/core/formats.h), by name: every list below is
# read from it.
FORMAT_TABLE: Dict[str, dict] = {f["name"]: f for f in weight_formats()}
BLOCK = 32
SUPER = 256  # a K-quant super-block
GROUP = 16  # rows per interleaved group
META = 20   # a K-quant super-block's scale bytes in our rows
FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f["quantize_on_load"])  # what a model can be quantized to
KQUANTS = tuple(n for n, f in FORMAT_TABLE.items() if f["block"] == SUPER)  # what GGUF files bring, kept as they are
ALL_FORMATS = FORMATS + KQUANTS
KQUANT_BYTES = {n: FORMAT_TABLE[n]["block_bytes"] for n in KQUANTS}  # per super-block, meta included
BITS_PER_WEIGHT = {n: f["bits_per_weight"] for n, f in FORMAT_TABLE.items()}
# The GGUF tensor type whose values each format holds (formats/gguf.py's type numbers).
GGML_TYPE_OF = {n: f["ggml_type"] for n, f in FORMAT_TABLE.items()}


class QuantizedWeight(tuple):
    """(format, quants, scales[, mins]): a quantized matrix in the engine's layout, with names.

    A tuple, so that it crosses into the engine as it is and unpacks as (fmt, q, d[, m]);
    `mins` is int4m's and None otherwise. `shape` is the (rows, cols) of the matrix it holds."""

    __slots__ = ()

    def __new__(cls, format: str, quants: np.ndarray, scales: Optional[np.ndarray] = None,
                mins: Optional[np.ndarray] = None):
        if format not in ALL_FORMATS:
            raise ValueError(f"unknown quantization {format!r}: expected one of {', '.join(ALL_FORMATS)}")
        if format in KQUANTS:
            if scales is not None or mins is not None:
                raise ValueError(f"a {format} weight is (format, quants): its scales are inside the quants")
            return super().__new__(cls, (format, quants))
        if scales is None:
            raise ValueError(f"an {format} weight is (format, quants, scales[, mins])")
        if (mins is None) == (format == "int4m"):
            raise ValueError("an int4m weight is (format, quants, scales, mins); int8 and int4 have no mins")
        parts = (format, quants, scales) if mins is None else (format, quants, scales, mins)
        return super().__new__(cls, parts)

    @classmethod
    def of(cls, parts) -> "QuantizedWeight":
        """A QuantizedWeight from any (format, quants, scales[, mins]) sequence."""
        return parts if isinstance(parts, cls) else cls(*parts)

    def __getnewargs__(self):
        return tuple(self)

    format = property(lambda self: self[0])
    quants = property(lambda self: self[1])
    scales = property(lambda self: self[2] if len(self) >= 3 else None)
    mins = property(lambda self: self[3] if len(self) == 4 else None)

    @property
    def shape(self) -> Tuple[int, int]:
        if self.format in KQUANTS:
            return self.quants.shape[0], self.quants.shape[1] // KQUANT_BYTES[self.format] * SUPER
        return self.scales.shape[0], self.scales.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self[1:])

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.format!r}, shape={self.shape})"


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"expected a [rows, K] matrix with K a multiple of {BLOCK}, got shape {w.shape}")
    return w.reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def quantize_int8(w: np.ndarray) -> QuantizedWeight:
    """As ggml's quantize_row_q8_0_ref: d = amax / 127 (float32), q = roundf(x / d)."""
    x = _blocks(w)
    d = (np.abs(x).max(axis=2) / np.float32(127)).astype(np.float32)
    v = (x * _inverse(d)[..., None]).astype(np.float32)
    q = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)  # half away from zero, exactly
    return interleave(QuantizedWeight("int8", q.astype(np.int8).view(np.uint8).reshape(w.shape[0], -1),
                                      d.astype(np.float16).view(np.uint16)))


def quantize_int4(w: np.ndarray) -> QuantizedWeight:
    """As ggml's quantize_row_q4_0_ref: d = (value of largest magnitude) / -8,
    q = min(15, trunc(x / d + 8.5)), each step rounded to float32."""
    x = _blocks(w)
    rows, nb, _ = x.shape
    vmax = np.take_along_axis(x, np.abs(x).argmax(axis=2)[..., None], axis=2)[..., 0]
    d = (vmax / np.float32(-8)).astype(np.float32)
    v = ((x * _inverse(d)[..., None]).astype(np.float32) + np.float32(8.5)).astype(np.float32)
    q = np.minimum(15, np.trunc(v)).astype(np.uint8)
    return interleave(QuantizedWeight("int4", pack_nibbles(q), d.astype(np.float16).view(np.uint16)))


def quantize_int4m(w: np.ndarray) -> QuantizedWeight:
    """As ggml's quantize_row_q4_1_ref: d = (max - min) / 15, m = min,
    q = min(15, trunc((x - min) / d + 0.5)), each step rounded to float32."""
    x = _blocks(w)
    lo, hi = x.min(axis=2), x.max(axis=2)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    v = (((x - lo[..., None]).astype(np.float32) * _inverse(d)[..., None]).astype(np.float32) + np.float32(0.5))
    q = np.minimum(15, np.trunc(v.astype(np.float32))).astype(np.uint8)
    return interleave(QuantizedWeight("int4m", pack_nibbles(q), d.astype(np.float16).view(np.uint16),
                                      lo.astype(np.float16).view(np.uint16)))


def _regroup(a: np.ndarray, unit: int, to_groups: bool) -> np.ndarray:
    """Rows of `a` (2-D; bytes or uint16) between plain order and 16-row groups interleaved
    `unit` elements at a time; the rows % 16 after the last whole group are kept as they are."""
    a = np.ascontiguousarray(a)
    rows, cols = a.shape
    full, n = rows // GROUP * GROUP, cols // unit
    out = np.empty_like(a)
    out[full:] = a[full:]
    plain, grouped = (full // GROUP, GROUP, n, unit), (full // GROUP, n, GROUP, unit)
    src, dst = (plain, grouped) if to_groups else (grouped, plain)
    out[:full].reshape(dst)[...] = a[:full].reshape(src).transpose(0, 2, 1, 3)
    return out


def _move(qw, to_groups: bool) -> QuantizedWeight:
    qw = QuantizedWeight.of(qw)
    q, d = qw.quants, qw.scales
    if qw.format in KQUANTS:
        if q.ndim != 2 or q.shape[1] % KQUANT_BYTES[qw.format]:
            raise ValueError(f"{qw.format} quants must be [rows, super-blocks * {KQUANT_BYTES[qw.format]}], "
                             f"got {q.shape}")
        return QuantizedWeight(qw.format, _regroup(q, 4, to_groups))
    if q.ndim != 2 or d.ndim != 2 or q.shape[0] != d.shape[0] or q.shape[1] % 4:
        raise ValueError(f"a quantized weight's quants and scales must be [rows, bytes] and [rows, blocks], "
                         f"got {q.shape} and {d.shape}")
    return QuantizedWeight(qw.format, _regroup(q, 4, to_groups),
                           *(_regroup(a, 1, to_groups) for a in qw[2:]))


def interleave(qw) -> QuantizedWeight:
    """A quantized weight in plain row order -> the engine's order (16-row groups)."""
    return _move(qw, True)


def deinterleave(qw) -> QuantizedWeight:
    """A quantized weight in the engine's order -> plain rows (row r is quants[r], scales[r])."""
    return _move(qw, False)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [rows, nb, 32] in 0..15 -> int4's bytes [rows, ceil(nb / 2) * 32]: block 2p in the low
    nibbles of pair p, block 2p + 1 in the high (a lone last block pairs with zeros)."""
    rows, nb, _ = q.shape
    if nb % 2:
        q = np.concatenate([q, np.zeros((rows, 1, BLOCK), np.uint8)], axis=1)
    pairs = q.reshape(rows, -1, 2, BLOCK)
    return np.ascontiguousarray(pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(rows, -1)


def unpack_nibbles(q: np.ndarray, nb: int) -> np.ndarray:
    """int4's bytes [rows, ceil(nb / 2) * 32] -> q [rows, nb, 32] uint8 in 0..15."""
    pairs = q.reshape(q.shape[0], -1, BLOCK)
    return np.stack([pairs & 0xF, pairs >> 4], axis=2).reshape(q.shape[0], -1, BLOCK)[:, :nb]


def quantize(w: np.ndarray, fmt: str) -> QuantizedWeight:
    """The numpy mirror of the engine's quantizer (_C.quantize): the same bytes."""
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w)
    if fmt == "int4m":
        return quantize_int4m(w)
    raise ValueError(f"unknown quantization {fmt!r}: expected one of {', '.join(FORMATS)}")


# ---- K-quants: GGUF blocks -> our rows (plain order), and back to floats.

def kquant_from_gguf(blocks: np.ndarray, fmt: str) -> QuantizedWeight:
    """GGUF Q4_K / Q5_K / Q6_K blocks, a structured array [rows, K / 256] (formats.gguf's
    BLOCK_DTYPES), -> the q4_k / q5_k / q6_k weight in plain rows: per super-block the meta
    (d, dmin or 0, the unpacked scales and mins) and then the block's quant bytes unchanged."""
    rows, nsb = blocks.shape
    out = np.zeros((rows, nsb, KQUANT_BYTES[fmt]), np.uint8)
    out[..., 0:2] = np.ascontiguousarray(blocks["d"]).view(np.uint8).reshape(rows, nsb, 2)
    if fmt == "q6_k":
        out[..., 4:20] = blocks["scales"].view(np.uint8)
        out[..., META:META + 128] = blocks["ql"]
        out[..., META + 128:] = blocks["qh"]
    else:
        out[..., 2:4] = np.ascontiguousarray(blocks["dmin"]).view(np.uint8).reshape(rows, nsb, 2)
        out[..., 4:12], out[..., 12:20] = k_scale_min(blocks["scales"])
        out[..., META:META + 128] = blocks["qs"]
        if fmt == "q5_k":
            out[..., META + 128:] = blocks["qh"]
    return QuantizedWeight(fmt, out.reshape(rows, -1))


def _kquant_values(q: np.ndarray, fmt: str) -> np.ndarray:
    """Our plain K-quant rows [rows, nsb * B] -> float32 [rows, nsb * 256], as ggml rounds."""
    rows = q.shape[0]
    b = q.reshape(rows, -1, KQUANT_BYTES[fmt])
    nsb = b.shape[1]
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)[..., None]
    qs = b[..., META:]
    if fmt == "q6_k":
        sc = np.ascontiguousarray(b[..., 4:20]).view(np.int8).astype(np.float32)  # [rows, nsb, 16]
        ql, qh = qs[..., :128].reshape(rows, nsb, 2, 2, 32), qs[..., 128:].reshape(rows, nsb, 2, 1, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=3)           # [.., half, quarter, 32]
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        v = ((low | (high << 4)).astype(np.int8) - 32).reshape(rows, nsb, 16, 16).astype(np.float32)
        return ((d * sc)[..., None] * v).reshape(rows, -1)
    sc, mn = b[..., 4:12].astype(np.float32), b[..., 12:20].astype(np.float32)
    dmin = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)[..., None]
    pairs = qs[..., :128].reshape(rows, nsb, 4, 1, 32)
    v = np.concatenate([pairs & 15, pairs >> 4], axis=3).reshape(rows, nsb, 8, 32)
    if fmt == "q5_k":
        v = v | (((qs[..., 128:][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
    d1, m1 = (d * sc).astype(np.float32), (dmin * mn).astype(np.float32)
    return ((d1[..., None] * v.astype(np.float32)).astype(np.float32) - m1[..., None]).reshape(rows, -1)


def dequantize(qw, cols: int) -> np.ndarray:
    qw = deinterleave(qw)
    if qw.format in KQUANTS:
        return _kquant_values(qw.quants, qw.format).reshape(-1, cols)
    fmt, q, d = qw[:3]
    rows, nb = d.shape
    scale = d.view(np.float16).astype(np.float32)[..., None]
    if fmt == "int8":
        v = q.view(np.int8).reshape(rows, nb, BLOCK).astype(np.float32)
    elif fmt == "int4":
        v = unpack_nibbles(q, nb).astype(np.float32) - 8
    else:  # int4m: w = d q + m, the product and the sum each rounded to float32
        m = qw.mins.view(np.float16).astype(np.float32)[..., None]
        return (unpack_nibbles(q, nb).astype(np.float32) * scale + m).astype(np.float32).reshape(rows, cols)
    return (v * scale).astype(np.float32).reshape(rows, cols)


# ---- policy: which tensors of a model get which format.

PolicyLike = Union[None, str, Dict[str, Optional[str]]]
_GROUPS = ("embed", "attention", "mlp", "experts", "per_layer_inputs")
LAYER_GROUP = {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
               "gate": "mlp", "up": "mlp", "down": "mlp", "experts_gate_up": "experts", "experts_down": "experts",
               "ple_embed": "per_layer_inputs", "ple_proj": "per_layer_inputs", "ple_gate": "per_layer_inputs",
               "ple_out": "per_layer_inputs"}
_LAYERS = ("attention", "mlp", "experts", "per_layer_inputs")


def resolve_policy(quantization: PolicyLike) -> Dict[str, Optional[str]]:
    """{group: format or None} for the groups embed (the embedding, which is also the tied LM
    head), attention (q, k, v, o), mlp (gate, up, down), and Gemma 4's experts (their stacked
    gate / up and down) and per_layer_inputs (the per-layer embedding table, its projection, and
    each layer's gate and output projection of it). Norms and Gemma 4's router always stay float.

    "int8" / "int4" / "int4m" quantize every group; a dict sets groups one by one, e.g.
    {"layers": "int4", "embed": "int8"} ("layers" means every group but embed); groups it does
    not name stay in the model's float dtype."""
    if quantization is None:
        return dict.fromkeys(_GROUPS)
    if isinstance(quantization, str):
        if quantization not in FORMATS:
            raise ValueError(f"unknown quantization {quantization!r}: expected one of {', '.join(FORMATS)}, "
                             "or a dict such as {'layers': 'int4', 'embed': 'int8'}")
        return dict.fromkeys(_GROUPS, quantization)
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization must be None, a format name or a dict, got {type(quantization).__name__}")
    out = dict.fromkeys(_GROUPS)
    for key, fmt in quantization.items():
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"quantization[{key!r}]: unknown format {fmt!r}: expected one of {', '.join(FORMATS)} or None")
        if key == "layers":
            out.update(dict.fromkeys(_LAYERS, fmt))
        elif key in _GROUPS:
            out[key] = fmt
        else:
            raise ValueError(f"quantization: unknown group {key!r}: expected one of layers, {', '.join(_GROUPS)}")
    return out


def format_for(policy: Dict[str, Optional[str]], engine_name: str) -> Optional[str]:
    """The format for an engine tensor name ('embed', 'lm_head', 'layers.3.gate', ...)."""
    if engine_name in ("embed", "lm_head"):
        return policy["embed"]
    return policy[LAYER_GROUP[engine_name.rsplit(".", 1)[-1]]]
