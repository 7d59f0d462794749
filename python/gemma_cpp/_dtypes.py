"""Weight dtypes of the engine: float32, and bfloat16 carried as uint16 bit patterns
(numpy has no bfloat16)."""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "bfloat16")
_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
            "bfloat16": "bfloat16", "bf16": "bfloat16"}


def canonical_dtype(dtype) -> str:
    """'float32' or 'bfloat16' from a name, an alias, or a torch dtype."""
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    if name not in _ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)} "
                         "(or 'auto' / None for the checkpoint's own)")
    return _ALIASES[name]


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    if bits.size >= 1 << 20:  # large tensors: widened by the engine's threads
        from ._C import bf16_to_f32

        return bf16_to_f32(np.ascontiguousarray(bits, dtype=np.uint16))
    u = bits.astype(np.uint32)
    u <<= 16  # in place: one float32-sized array, no second temporary
    return u.view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of a stored tensor; a view when it is float32 already."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(a)
    if a.dtype == np.float32:
        return a
    return a.astype(np.float32)


def as_engine_dtype(a: np.ndarray, dtype: str, target: str) -> np.ndarray:
    """The tensor in the engine's weight dtype `target`, C-contiguous; no copy when the
    stored dtype is already the target."""
    if target == "bfloat16":
        out = a if dtype == "bfloat16" else f32_to_bf16_bits(as_float32(a, dtype))
    else:
        out = as_float32(a, dtype)
    return np.ascontiguousarray(out)


def round_to(x: float, target: str) -> float:
    """A Python float rounded to the weight dtype (transformers computes the embedding
    scale in the weight dtype: sqrt(3072) = 55.4256 is 55.5 in bfloat16)."""
    f = np.float32(x)
    if target == "bfloat16":
        f = bf16_bits_to_f32(f32_to_bf16_bits(np.array([f])))[0]
    return float(f)
