"""A bounded reader of .safetensors files that hands out zero-copy views of one memory map,
and a streaming writer.

The format: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype": str, "shape": [int], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets count from the end of the header. Every field is checked against the
file before use: a lying file raises ValueError naming the file and the tensor, never an
out-of-bounds read. As the format requires, the tensors' data must tile the data section:
no holes, no overlaps, no bytes after the last tensor that the header does not account for. (We parse the header ourselves instead of safetensors.safe_open because
that returns copies; a view lets a bf16 checkpoint run straight from the page cache.)
"""
from __future__ import annotations

import json
import mmap
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from ._pages import release_pages

# dtype name -> (numpy dtype of the stored bits, element size). BF16 has no numpy dtype:
# it is handed out as uint16 bit patterns and named "bfloat16" by dtype_of().
_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U16": (np.uint16, 2),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsFile:
    """Open a .safetensors file: `names()`, `dtype_of(name)`, `shape_of(name)`, `get(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"{self.path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_len = 8 + n, size - 8 - n
        self._info: Dict[str, Tuple[str, Tuple[int, ...], int]] = {}
        for name, info in header.items():
            self._info[name] = self._check(name, info, data_len, data_start)
        self._check_tiling(header, data_len)
        self._size = size
        self._mmap = None
        if size > 0:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _check(self, name, info, data_len, data_start):
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: entry must be an object")
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise ValueError(f"{where}: data_offsets {offs!r} are outside the data section ({data_len} bytes)")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPES[dtype][1] != offs[1] - offs[0]:
            raise ValueError(f"{where}: {offs[1] - offs[0]} bytes do not hold a {dtype} tensor of shape {shape}")
        return dtype, tuple(shape), data_start + offs[0]

    def _check_tiling(self, header: dict, data_len: int) -> None:
        """The tensors' byte ranges, in order, must cover [0, data_len) exactly once."""
        pos = 0
        for begin, end, name in sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()):
            where = f"{self.path}: tensor {name!r}: data [{begin}, {end})"
            if begin < pos:
                raise ValueError(f"{where} overlaps the tensor before it, which ends at {pos}")
            if begin > pos:
                raise ValueError(f"{where} leaves a hole of {begin - pos} bytes before it (the format has none)")
            pos = end
        if pos != data_len:
            raise ValueError(f"{self.path}: {data_len - pos} bytes after the last tensor's data that the header "
                             "does not account for")

    def names(self) -> Iterator[str]:
        return iter(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def dtype_of(self, name: str) -> str:
        """'float32', 'float16', 'bfloat16', ... (numpy names; bf16 is stored as uint16)."""
        d = self._info[name][0]
        return "bfloat16" if d == "BF16" else np.dtype(_DTYPES[d][0]).name

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return self._info[name][1]

    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process's resident memory (they stay in the
        page cache): for tensors that were converted into new arrays and are not read again."""
        if self._mmap is None:
            return
        dtype, shape, offset = self._info[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1] if shape else _DTYPES[dtype][1]
        release_pages(self._mmap, offset, offset + nbytes)

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the memory map (bf16: uint16 bits)."""
        dtype, shape, offset = self._info[name]
        npdt = _DTYPES[dtype][0]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count == 0:
            return np.zeros(shape, dtype=npdt)
        return np.frombuffer(self._mmap, dtype=npdt, count=count, offset=offset).reshape(shape)


def write_safetensors(path: str, tensors, metadata: Dict[str, str], progress: Optional[Callable] = None) -> None:
    """tensors: [(name, array, safetensors dtype name)], one tensor at a time (no copy of the
    whole model in memory); progress(done, total, name). The data starts 8-byte aligned and
    the tensors go by element size, largest first (in the given order within a size), so each
    one starts at a multiple of its element size with no padding between them."""
    tensors = sorted(tensors, key=lambda t: -_DTYPES[t[2]][1])
    header, offset = {"__metadata__": metadata}, 0
    for name, arr, dt in tensors:
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for i, (name, arr, _) in enumerate(tensors):
            f.write(np.ascontiguousarray(arr).data)
            if progress:
                progress(i + 1, len(tensors), name)
        f.flush()
        os.fsync(f.fileno())
