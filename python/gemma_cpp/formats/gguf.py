"""A bounded reader of GGUF files (versions 2 and 3, little-endian) and exact numpy
dequantization of the block formats Gemma GGUFs use.

The format (all integers little-endian):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x   { string key | u32 value_type | value }
    tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (default 32) | data section

    string = u64 length, then that many bytes of UTF-8 (no terminator)
    array  = u32 element_type, u64 count, count values (strings and arrays nest)

ne[0] is the fastest-moving dimension (the row length), so the numpy shape is
reversed(ne). A tensor's offset counts from the start of the data section and is a
multiple of the alignment.

Every count, length, offset and size is checked against the file size before it is used,
so a lying file raises GGUFError (a ValueError) naming the file and the field: never a
crash, an out-of-bounds read, or an allocation larger than the file.

Dequantization mirrors ggml's `dequantize_row_*` (and gguf-py's numpy port) operation for
operation in float32: float16 scales are widened to float32 first, then multiplied in the
same order, with no fused multiply-add, so results are bit-identical to
`gguf.quants.dequantize`. Each block format is one numpy structured dtype below
(BLOCK_DTYPES), which is the single description of its bytes in this module.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ._pages import release_pages

__all__ = [
    "GGUFError", "GGML_TYPES", "GGML_BLOCK_SIZES", "BLOCK_DTYPES", "GGUF_VALUE_TYPES",
    "TensorInfo", "GGUFFile", "dequantize", "quantized_blocks", "is_gguf",
]


class GGUFError(ValueError):
    """A GGUF file (or a raw tensor buffer) is malformed or unsupported."""


def is_gguf(path) -> bool:
    """A readable file that starts with the GGUF magic."""
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Type tables

# ggml type id -> (name, elements per block, bytes per block). Ids 4, 5 (Q4_2, Q4_3) and
# 31-33, 36-38 (removed repacked formats) are retired in ggml and rejected as unknown.
_GGML_TYPE_TABLE: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

GGML_TYPES: Dict[int, str] = {k: v[0] for k, v in _GGML_TYPE_TABLE.items()}
GGML_BLOCK_SIZES: Dict[int, Tuple[int, int]] = {k: (v[1], v[2]) for k, v in _GGML_TYPE_TABLE.items()}

# One packed block per format; offsets in bytes, sizes checked against the table below.
BLOCK_DTYPES: Dict[int, np.dtype] = {
    # F32 / F16 / BF16: one element per "block"; BF16 as its uint16 bit pattern.
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    30: np.dtype("<u2"),
    # Q4_0, 4.5 bits/weight: 0 d (f16) | 2 qs[16]; w = d * (q - 8);
    # element j < 16 is the low nibble of qs[j], element j + 16 the high nibble.
    2: np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    # Q4_1, 5 bits/weight: 0 d | 2 m | 4 qs[16]; w = d * q + m; nibbles as Q4_0.
    3: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
    # Q5_0, 5.5 bits/weight: 0 d | 2 qh (u32: bit j = 5th bit of element j) | 6 qs[16];
    # w = d * (q - 16).
    6: np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))]),
    # Q5_1, 6 bits/weight: 0 d | 2 m | 4 qh | 8 qs[16]; w = d * q + m.
    7: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))]),
    # Q8_0, 8.5 bits/weight: 0 d | 2 qs[32] (int8); w = d * q.
    8: np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
    # Q2_K, 2.625 bits/weight, 256 = 16 sub-blocks of 16: 0 scales[16] (low nibble the scale,
    # high the min) | 16 qs[64] | 80 d | 82 dmin; element 128 h + 32 j + l is
    # (qs[32 h + l] >> 2 j) & 3; w = (d * sc) * q - (dmin * m).
    10: np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2")]),
    # Q3_K, 3.4375 bits/weight, 256 = 16 sub-blocks of 16: 0 hmask[32] | 32 qs[64] |
    # 96 scales[12] (sixteen 6-bit scales, see _deq_q3_k) | 108 d; element 32 k + l has low
    # bits as Q2_K's and minus 4 unless bit k of hmask[l] is set; w = (d * (sc - 32)) * q.
    11: np.dtype([("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2")]),
    # Q4_K, 4.5 bits/weight, 256 = 8 sub-blocks of 32: 0 d | 2 dmin | 4 scales[12]
    # (eight 6-bit scales and eight 6-bit mins, packed, see k_scale_min) | 16 qs[128];
    # qs[32 i + l] holds element l of sub-block 2i (low nibble) and of 2i + 1 (high);
    # w = (d * sc) * q - (dmin * m).
    12: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))]),
    # Q5_K, 5.5 bits/weight: as Q4_K plus 16 qh[32]: bit s of qh[l] is the 5th bit of
    # element l of sub-block s; qs at 48.
    13: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (32,)),
                  ("qs", "u1", (128,))]),
    # Q6_K, 6.5625 bits/weight, 256 = two halves of 128: 0 ql[128] | 128 qh[64] |
    # 192 scales[16] (int8, one per 16 elements) | 208 d; w = (d * scale) * (q - 32), see
    # _deq_q6_k for the bit layout.
    14: np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")]),
}
for _t, _dt in BLOCK_DTYPES.items():
    assert _dt.itemsize == _GGML_TYPE_TABLE[_t][2], (_t, _dt.itemsize)
del _t, _dt

# GGUF metadata value types.
GGUF_VALUE_TYPES: Dict[int, str] = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}
_T_STRING, _T_ARRAY, _T_UINT32 = 8, 9, 4
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4            # GGML_MAX_DIMS
_MAX_NESTING = 16        # arrays of arrays; bounds recursion on a hostile file
_INT64_MAX = (1 << 63) - 1
# Smallest encodings, used to reject counts that cannot fit in the rest of the file before
# looping or allocating: a kv is key length + value type + 1 byte; a tensor info is
# name length + n_dims + type + offset; an array element that is a string is its length,
# an array is its element type + count.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MIN_ELEMENT_BYTES = {_T_STRING: 8, _T_ARRAY: 12}


# ---------------------------------------------------------------------------------------
# The file

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]   # numpy (row-major) order: reversed(ne)
    ggml_type: int
    type_name: str
    offset: int              # absolute byte offset of the data in the file
    nbytes: int


class _Cursor:
    """Sequential little-endian reads from a buffer with a bounds check before each one."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, field: str, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {field}: {problem}")

    def need(self, n: int, field: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos} but the file has "
                                   f"{self.size} bytes (truncated or a lying length)")

    def unpack(self, fmt: str, n: int, field: str):
        self.need(n, field)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, field: str) -> int:
        return self.unpack("<I", 4, field)

    def u64(self, field: str) -> int:
        return self.unpack("<Q", 8, field)

    def string(self, field: str) -> str:
        n = self.u64(f"{field} string length")
        self.need(n, f"{field} string length {n}")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(field, f"string is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def _strings(self, n: int, field: str) -> list:
        """n strings, as string() reads them but without building a field name per element
        (a vocabulary holds 262k): on any problem, string() rereads that element and raises
        its error."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        unpack = struct.unpack_from
        for i in range(n):
            if size - pos >= 8:
                (m,) = unpack("<Q", buf, pos)
                if m <= size - pos - 8:
                    try:
                        out.append(buf[pos + 8:pos + 8 + m].decode("utf-8"))
                        pos += 8 + m
                        continue
                    except UnicodeDecodeError:
                        pass
            self.pos = pos
            self.string(f"{field}[{i}]")  # raises: truncated, lying length or bad UTF-8
            raise AssertionError("unreachable")  # pragma: no cover
        self.pos = pos
        return out

    def count(self, n: int, min_bytes: int, field: str) -> None:
        """Reject a count whose elements cannot possibly fit in the rest of the file."""
        left = self.size - self.pos
        if n * min_bytes > left:
            raise self.fail(field, f"{n} elements of at least {min_bytes} bytes each cannot fit "
                                   f"in the {left} bytes left in the file")

    def value(self, vtype: int, field: str):
        """A scalar or string (arrays go through array())."""
        if vtype in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[vtype]
            v = self.unpack(fmt, struct.calcsize(fmt), field)
            return bool(v) if vtype == 7 else v
        if vtype == _T_STRING:
            return self.string(field)
        raise self.fail(f"{field} value type", f"unknown value type {vtype} (known: 0..12)")

    def array(self, etype: int, field: str, depth: int):
        """Reads count + elements (the element type already read); returns (value, etype)."""
        if depth > _MAX_NESTING:
            raise self.fail(field, f"arrays nested more than {_MAX_NESTING} deep")
        if etype not in GGUF_VALUE_TYPES:
            raise self.fail(f"{field} array element type", f"unknown value type {etype} (known: 0..12)")
        n = self.u64(f"{field} array count")
        if etype in _ARRAY_DTYPES:
            dt = np.dtype(_ARRAY_DTYPES[etype])
            self.count(n, dt.itemsize, f"{field} array count")
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
            self.pos += n * dt.itemsize
            return (a != 0 if etype == 7 else a), etype
        self.count(n, _MIN_ELEMENT_BYTES[etype], f"{field} array count")
        if etype == _T_STRING:
            return self._strings(n, field), etype
        out = []
        for i in range(n):
            inner = self.u32(f"{field}[{i}] array element type")
            out.append(self.array(inner, f"{field}[{i}]", depth + 1)[0])
        return out, etype


class GGUFFile:
    """Open a GGUF file read-only through one memory map.

    `metadata` maps keys to values (int, float, bool, str; numeric arrays as 1-D numpy
    arrays of the stored dtype, string arrays as list[str], nested arrays as lists);
    `metadata_types` gives each key's GGUF value type id (9 for arrays) and
    `metadata_array_types` each array's element type id. `tensors` maps names to
    TensorInfo in file order; `raw(name)` is a zero-copy uint8 view of a tensor's bytes and
    `dequantize(name)` a float32 copy of its values.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: Optional[mmap.mmap] = None
        size = os.path.getsize(self.path)
        if size == 0:
            raise GGUFError(f"{self.path}: magic: the file is empty, not a GGUF file")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(self._mm, len(self._mm))
        except BaseException:
            self.close()
            raise

    def _parse(self, buf, size: int) -> None:
        c = _Cursor(buf, size, self.path)
        c.need(4, "magic")
        magic = bytes(buf[0:4])
        if magic != _MAGIC:
            raise c.fail("magic", f"expected b'GGUF', found {magic!r}: not a GGUF file")
        c.pos = 4
        version = c.u32("version")
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise c.fail("version", f"{version:#010x} is a big-endian GGUF (version {swapped}); "
                                        f"only little-endian files are supported")
            raise c.fail("version", f"GGUF version {version} is not supported (only 2 and 3)")
        self.version = version
        n_tensors = c.u64("tensor_count")
        n_kv = c.u64("kv_count")
        c.count(n_kv, _MIN_KV_BYTES, "kv_count")
        c.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor_count")

        self.metadata: Dict[str, object] = {}
        self.metadata_types: Dict[str, int] = {}
        self.metadata_array_types: Dict[str, int] = {}
        for i in range(n_kv):
            key = c.string(f"metadata[{i}] key")
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r}", "duplicate key")
            field = f"metadata {key!r}"
            vtype = c.u32(f"{field} value type")
            if vtype == _T_ARRAY:
                etype = c.u32(f"{field} array element type")
                value, _ = c.array(etype, field, 1)
                self.metadata_array_types[key] = etype
            else:
                value = c.value(vtype, field)
            self.metadata[key] = value
            self.metadata_types[key] = vtype

        alignment = _DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            alignment = self.metadata["general.alignment"]
            t = self.metadata_types["general.alignment"]
            if t != _T_UINT32:
                raise c.fail("general.alignment", f"must be a UINT32, found value type "
                                                  f"{GGUF_VALUE_TYPES.get(t, t)}")
            if alignment <= 0 or alignment & (alignment - 1):
                raise c.fail("general.alignment", f"{alignment} is not a power of two > 0")
        self.alignment = alignment

        infos = []
        names = set()
        for i in range(n_tensors):
            name = c.string(f"tensor[{i}] name")
            if name in names:
                raise c.fail(f"tensor {name!r}", "duplicate tensor name")
            names.add(name)
            field = f"tensor {name!r}"
            n_dims = c.u32(f"{field} n_dims")
            if n_dims > _MAX_DIMS:
                raise c.fail(f"{field} n_dims", f"{n_dims} dimensions, at most {_MAX_DIMS} allowed")
            c.need(8 * n_dims, f"{field} dims")
            ne = struct.unpack_from(f"<{n_dims}Q", buf, c.pos)
            c.pos += 8 * n_dims
            n_elements = 1
            for d in ne:
                if d <= 0 or d > _INT64_MAX:
                    raise c.fail(f"{field} dims", f"dimension {d} in {list(ne)} is not in 1..2^63-1")
                n_elements *= d
                if n_elements > _INT64_MAX:
                    raise c.fail(f"{field} dims", f"{list(ne)} has more than 2^63-1 elements")
            ggml_type = c.u32(f"{field} type")
            if ggml_type not in _GGML_TYPE_TABLE:
                raise c.fail(f"{field} type", f"unknown ggml type {ggml_type}")
            type_name, block, type_size = _GGML_TYPE_TABLE[ggml_type]
            row_len = ne[0] if n_dims else 1
            if row_len % block:
                raise c.fail(f"{field} dims", f"row length {row_len} is not a multiple of the "
                                              f"{type_name} block size {block}")
            nbytes = n_elements // block * type_size
            offset = c.u64(f"{field} offset")
            if offset % alignment:
                raise c.fail(f"{field} offset", f"{offset} is not a multiple of the alignment {alignment}")
            infos.append((name, tuple(reversed(ne)), ggml_type, type_name, offset, nbytes))

        data_offset = -(-c.pos // alignment) * alignment
        self.data_offset = data_offset
        self.tensors: Dict[str, TensorInfo] = {}
        for name, shape, ggml_type, type_name, offset, nbytes in infos:
            start = data_offset + offset
            if start + nbytes > size:
                raise c.fail(f"tensor {name!r} offset",
                             f"data [{start}, {start + nbytes}) ({nbytes} bytes at offset {offset} in "
                             f"the data section at {data_offset}) runs past the end of the file "
                             f"({size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, type_name, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end0, n0), (start1, _, n1) in zip(spans, spans[1:]):
            if start1 < end0:
                raise c.fail(f"tensor {n1!r} offset", f"data overlaps tensor {n0!r}")

    # -- access -----------------------------------------------------------------------

    def _info(self, name: str) -> TensorInfo:
        if self._mm is None:
            raise ValueError(f"{self.path}: the file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view into the memory map (no copy)."""
        t = self._info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, name: str, start: int = 0, end: Optional[int] = None) -> None:
        """Drops bytes [start, end) of the tensor's data from this process's resident memory
        (the whole pages inside; they stay in the page cache, and a later read maps them
        again): a loader that has copied a tensor gives its pages back as it goes."""
        t = self._info(name)
        end = t.nbytes if end is None else min(end, t.nbytes)
        release_pages(self._mm, t.offset + start, t.offset + end)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor's values as a new float32 array of shape TensorInfo.shape."""
        t = self._info(name)
        return _dequantize(self.raw(name), t.ggml_type, t.shape, f"{self.path}: tensor {name!r}")

    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: general.architecture: missing or not a string")
        return arch

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Arrays from raw() still point into the map; it is unmapped when they go.
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={getattr(self, 'version', None)}, "
                f"tensors={len(getattr(self, 'tensors', {}))})")


# ---------------------------------------------------------------------------------------
# Blocks and dequantization

def _check_raw(raw: np.ndarray, ggml_type: int, shape, where: str):
    """Validates (raw, type, shape); returns (raw as flat uint8, n_elements, block, type_size)."""
    if ggml_type not in _GGML_TYPE_TABLE:
        raise GGUFError(f"{where}: unknown ggml type {ggml_type}")
    name, block, type_size = _GGML_TYPE_TABLE[ggml_type]
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise GGUFError(f"{where}: negative dimension in shape {shape}")
    n = math.prod(shape)
    row_len = shape[-1] if shape else 1
    if row_len % block:
        raise GGUFError(f"{where}: row length {row_len} is not a multiple of the {name} block size {block}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise GGUFError(f"{where}: raw bytes must be uint8, got {raw.dtype}")
    expected = n // block * type_size
    if raw.size != expected:
        raise GGUFError(f"{where}: {name} shape {shape} needs {expected} bytes, got {raw.size}")
    return np.ascontiguousarray(raw).reshape(-1), n, block, type_size


def quantized_blocks(raw: np.ndarray, ggml_type: int, n_rows: int, row_len: int) -> np.ndarray:
    """raw bytes of an [n_rows, row_len] tensor as a structured array
    [n_rows, row_len // block] of BLOCK_DTYPES[ggml_type] (a view when raw is contiguous)."""
    where = f"quantized_blocks({GGML_TYPES.get(ggml_type, ggml_type)})"
    flat, _, block, _ = _check_raw(raw, ggml_type, (n_rows, row_len), where)
    if ggml_type not in BLOCK_DTYPES:
        raise GGUFError(f"{where}: no block layout for this type")
    return flat.view(BLOCK_DTYPES[ggml_type]).reshape(n_rows, row_len // block)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] uint8: low nibbles then high nibbles."""
    q = np.empty(qs.shape[:-1] + (32,), np.uint8)
    np.bitwise_and(qs, 15, out=q[..., :16])
    np.right_shift(qs, 4, out=q[..., 16:])
    return q


# Each kernel writes one chunk: blocks b (structured, [n]) -> out float32 [n, block].

def _deq_q8_0(b, out):
    np.multiply(b["qs"], b["d"].astype(np.float32)[:, None], out=out)


def _deq_q4_0(b, out):
    q = _nibbles(b["qs"]).view(np.int8) - np.int8(8)
    np.multiply(b["d"].astype(np.float32)[:, None], q, out=out)


def _deq_q4_1(b, out):
    np.multiply(b["d"].astype(np.float32)[:, None], _nibbles(b["qs"]), out=out)
    out += b["m"].astype(np.float32)[:, None]


_BITS32 = np.arange(32, dtype=np.uint32)


def _q5(b):
    q = _nibbles(b["qs"])
    q |= ((b["qh"][:, None] >> _BITS32) & np.uint32(1)).astype(np.uint8) << np.uint8(4)
    return q


def _deq_q5_0(b, out):
    np.multiply(b["d"].astype(np.float32)[:, None], _q5(b).view(np.int8) - np.int8(16), out=out)


def _deq_q5_1(b, out):
    np.multiply(b["d"].astype(np.float32)[:, None], _q5(b), out=out)
    out += b["m"].astype(np.float32)[:, None]


def k_scale_min(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 packed bytes [..., 12] -> eight 6-bit scales and eight 6-bit mins
    (ggml's get_scale_min_k4): j < 4: sc = s[j] & 63, m = s[j+4] & 63;
    j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def _two_bit_quants(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K qs [n, 64] -> [n, 16, 16]: element 128 h + 32 j + l = (qs[32 h + l] >> 2 j) & 3."""
    n = len(qs)
    return ((qs.reshape(n, 2, 1, 32) >> _SHIFT_2BIT) & np.uint8(3)).reshape(n, 16, 16)


def _deq_q2_k(b, out):
    n = len(b)
    dl = b["d"].astype(np.float32)[:, None] * (b["scales"] & np.uint8(15)).astype(np.float32)
    ml = b["dmin"].astype(np.float32)[:, None] * (b["scales"] >> np.uint8(4)).astype(np.float32)
    o = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], _two_bit_quants(b["qs"]), out=o)
    o -= ml[:, :, None]


def _deq_q3_k(b, out):
    # Scale i: low 4 bits from byte i % 8 (i < 8: low nibble, else high), high 2 bits from
    # byte 8 + i % 4 at bits 2 (i // 4); stored with an offset of 32.
    n = len(b)
    s = b["scales"]
    low = np.concatenate([s[:, :8] & np.uint8(15), s[:, :8] >> np.uint8(4)], axis=1)
    high = (s[:, 8:12][:, None, :] >> _SHIFT_2BIT[0]) & np.uint8(3)  # [n, 4 shifts, 4 bytes]
    sc = (low | (high.reshape(n, 16) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = b["d"].astype(np.float32)[:, None] * sc.astype(np.float32)
    hbit = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)  # [n, 8, 32]
    q = _two_bit_quants(b["qs"]).view(np.int8) - ((hbit.reshape(n, 16, 16) ^ np.uint8(1)) << np.uint8(2)).view(np.int8)
    np.multiply(dl[:, :, None], q, out=out.reshape(n, 16, 16))


def _deq_k_4_5(b, out, q):
    n = len(b)
    sc, mn = k_scale_min(b["scales"])
    dl = b["d"].astype(np.float32)[:, None] * sc.astype(np.float32)
    ml = b["dmin"].astype(np.float32)[:, None] * mn.astype(np.float32)
    o = out.reshape(n, 8, 32)
    np.multiply(dl[:, :, None], q, out=o)
    o -= ml[:, :, None]


def _q4k_quants(b):
    n = len(b)
    qs = b["qs"].reshape(n, 4, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)
    np.bitwise_and(qs, 15, out=q[:, :, 0])
    np.right_shift(qs, 4, out=q[:, :, 1])
    return q.reshape(n, 8, 32)


_BITS8 = np.arange(8, dtype=np.uint8)[None, :, None]


def _deq_q4_k(b, out):
    _deq_k_4_5(b, out, _q4k_quants(b))


def _deq_q5_k(b, out):
    q = _q4k_quants(b)
    q |= ((b["qh"][:, None, :] >> _BITS8) & np.uint8(1)) << np.uint8(4)
    _deq_k_4_5(b, out, q)


_SHIFT_Q6 = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def _deq_q6_k(b, out):
    # Element 128 h + 32 j + l (half h, quarter j, l < 32) has low 4 bits
    # ql[64 h + 32 (j % 2) + l] >> (4 (j // 2)) and high 2 bits qh[32 h + l] >> 2 j;
    # element e uses scales[e // 16].
    n = len(b)
    ql = b["ql"].reshape(n, 2, 2, 32)
    q = np.empty((n, 2, 4, 32), np.uint8)
    np.bitwise_and(ql, 15, out=q[:, :, 0:2])
    np.right_shift(ql, 4, out=q[:, :, 2:4])
    q |= ((b["qh"].reshape(n, 2, 1, 32) >> _SHIFT_Q6) & np.uint8(3)) << np.uint8(4)
    q = q.view(np.int8) - np.int8(32)
    dl = b["d"].astype(np.float32)[:, None] * b["scales"].astype(np.float32)
    np.multiply(dl[:, :, None], q.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


_KERNELS: Dict[int, Callable[[np.ndarray, np.ndarray], None]] = {
    2: _deq_q4_0, 3: _deq_q4_1, 6: _deq_q5_0, 7: _deq_q5_1, 8: _deq_q8_0,
    10: _deq_q2_k, 11: _deq_q3_k, 12: _deq_q4_k, 13: _deq_q5_k, 14: _deq_q6_k,
}
_CHUNK_ELEMENTS = 1 << 18   # per kernel call: temporaries stay in cache


def _dequantize(raw: np.ndarray, ggml_type: int, shape, where: str) -> np.ndarray:
    flat, n, block, _ = _check_raw(raw, ggml_type, shape, where)
    shape = tuple(int(s) for s in shape)
    if ggml_type == 0:
        return flat.view("<f4").astype(np.float32).reshape(shape)
    if ggml_type == 1:
        return flat.view("<f2").astype(np.float32).reshape(shape)
    if ggml_type == 30:
        return (flat.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        raise GGUFError(f"{where}: dequantizing {GGML_TYPES[ggml_type]} is not supported "
                        f"(supported: F32, F16, BF16, "
                        f"{', '.join(GGML_TYPES[t] for t in _KERNELS)})")
    blocks = flat.view(BLOCK_DTYPES[ggml_type])
    out = np.empty((len(blocks), block), np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    with np.errstate(all="ignore"):   # inf/nan scales in a hostile file are data, not errors
        for i in range(0, len(blocks), step):
            kernel(blocks[i:i + step], out[i:i + step])
    return out.reshape(shape)


def dequantize(raw: np.ndarray, ggml_type: int, shape) -> np.ndarray:
    """raw bytes (uint8) of a tensor of ggml_type and numpy shape -> a new float32 array,
    bit-identical to gguf.quants.dequantize."""
    return _dequantize(raw, ggml_type, shape, f"dequantize({GGML_TYPES.get(ggml_type, ggml_type)})")
