"""A Gemma model from a GGUF file: the config from its metadata, the engine's weights from
its tensors.

Q8_0 tensors become our int8, Q4_0 our int4 and Q4_1 our int4m without loss (same values: one
fp16 scale per block of 32, and Q4_1's fp16 min); Q4_0 and Q5_0 also become int8 without loss
(q - 8 and q - 16 fit). Every other type is read exactly (dequantized) and then quantized to
the format the policy names, or kept as float32 / bfloat16 when it names none. GGUF norm weights already hold 1 + w, which is what the engine
takes."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np

from .. import _C
from .._dtypes import as_engine_dtype, canonical_dtype
from ..config import Gemma2Config, Gemma3TextConfig, GemmaConfig
from ..quant import GROUP, format_for, pack_nibbles, resolve_policy
from .gguf import GGUFFile, dequantize

ARCHITECTURES = ("gemma", "gemma2", "gemma3")
GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q8_0 = 2, 3, 6, 8
_FLOAT_TYPES = ("F32", "F16", "BF16")

# Engine tensor name (under layers.N.) -> GGUF name (under blk.N.), by architecture.
_COMMON = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
           "up": "ffn_up", "down": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
_SANDWICH = {"post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}
_QK = {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
_NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")


def layer_names(arch: str) -> Dict[str, str]:
    names = dict(_COMMON)
    if arch in ("gemma2", "gemma3"):
        names.update(_SANDWICH)
    if arch == "gemma3":
        names.update(_QK)
    return names


def is_gguf(path) -> bool:
    """A file that starts with the GGUF magic."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _meta(g: GGUFFile, key: str, kind, default=None):
    """A numeric metadata value as kind (int or float); default when absent, an error naming
    the key when absent without a default or of the wrong type."""
    if key not in g.metadata:
        if default is None:
            raise ValueError(f"{g.path}: GGUF metadata has no {key!r}")
        return default
    value = g.metadata[key]
    numeric = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numeric):
        raise ValueError(f"{g.path}: GGUF metadata {key!r} must be {kind.__name__}, got {value!r}")
    return kind(value)


def _token_id(g: GGUFFile, name: str, default: Optional[int]) -> Optional[int]:
    value = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
    return int(value) if value is not None else default


def end_of_turn_id(g: GGUFFile) -> Optional[int]:
    """The id of the `<end_of_turn>` piece, looked up in the vocabulary."""
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        try:
            return tokens.index("<end_of_turn>")
        except ValueError:
            return None
    return None


def stop_ids(g: GGUFFile, config: GemmaConfig) -> list:
    """The config's eos ids and the vocabulary's `<end_of_turn>`: where generation stops."""
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    eot = end_of_turn_id(g)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids


def config_from_gguf(g: GGUFFile) -> GemmaConfig:
    """Gemma 1 / 2 / 3 config from `{arch}.*` metadata, with each generation's values for what
    GGUF files do not record (query_pre_attn_scalar, the local RoPE base, the layer pattern)."""
    arch = g.architecture()
    if arch not in ARCHITECTURES:
        raise ValueError(f"{g.path}: unsupported architecture {arch!r} (general.architecture); gemma_cpp "
                         f"runs {', '.join(ARCHITECTURES)}")
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{g.path}: GGUF file has no token_embd.weight tensor")
    emb = g.tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise ValueError(f"{g.path}: token_embd.weight must be 2-D, has shape {emb.shape}")
    vocab, hidden = emb.shape
    p = f"{arch}."
    heads = _meta(g, p + "attention.head_count", int)
    layers = _meta(g, p + "block_count", int)
    for name, v in (("attention.head_count", heads), ("block_count", layers)):
        if v <= 0:
            raise ValueError(f"{g.path}: GGUF metadata {p + name!r} must be positive, got {v}")
    head_dim = _meta(g, p + "attention.key_length", int, default=hidden // heads)
    kw = dict(
        vocab_size=int(vocab),
        hidden_size=int(_meta(g, p + "embedding_length", int)),
        intermediate_size=_meta(g, p + "feed_forward_length", int),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_meta(g, p + "attention.head_count_kv", int, default=heads),
        head_dim=head_dim,
        max_position_embeddings=_meta(g, p + "context_length", int, default=8192),
        rms_norm_eps=_meta(g, p + "attention.layer_norm_rms_epsilon", float, default=1e-6),
        pad_token_id=_token_id(g, "padding", 0),
        bos_token_id=_token_id(g, "bos", 2),
        eos_token_id=_token_id(g, "eos", 1),
        tie_word_embeddings="output.weight" not in g.tensors,
        architectures=[{"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                        "gemma3": "Gemma3ForCausalLM"}[arch]],
    )
    if kw["hidden_size"] != hidden:
        raise ValueError(f"{g.path}: {p}embedding_length is {kw['hidden_size']} but token_embd.weight has "
                         f"rows of {hidden}")
    if arch == "gemma":
        kw["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": _meta(g, p + "rope.freq_base", float, default=10000.0)}
        return GemmaConfig(**kw)
    # Gemma 2 and 3 scale scores by query_pre_attn_scalar ** -0.5: head_dim, except the 27B
    # models (46 and 62 layers), which use hidden / heads (as llama.cpp does).
    kw["query_pre_attn_scalar"] = hidden // heads if layers in (46, 62) else head_dim
    kw["sliding_window"] = _meta(g, p + "attention.sliding_window", int, default=4096)
    if arch == "gemma2":
        kw["attn_logit_softcapping"] = _meta(g, p + "attn_logit_softcapping", float, default=50.0)
        kw["final_logit_softcapping"] = _meta(g, p + "final_logit_softcapping", float, default=30.0)
        kw["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": _meta(g, p + "rope.freq_base", float, default=10000.0)}
        return Gemma2Config(**kw)
    full = {"rope_type": "default", "rope_theta": _meta(g, p + "rope.freq_base", float, default=1_000_000.0)}
    scaling = g.metadata.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{g.path}: {p}rope.scaling.type {scaling!r} is not supported (only linear)")
        full.update(rope_type="linear", factor=_meta(g, p + "rope.scaling.factor", float))
    kw["rope_parameters"] = {"full_attention": full,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    kw["final_logit_softcapping"] = kw["attn_logit_softcapping"] = None
    return Gemma3TextConfig(**kw)


def _nibbles_q4_0(raw: np.ndarray, rows: int, cols: int) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_0 blocks (fp16 d, 16 bytes: element j low nibble, j + 16 high) -> (q [rows, nb, 32]
    in 0..15, d as fp16 bits [rows, nb])."""
    nb = cols // 32
    b = raw.reshape(rows, nb, 18)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.uint16).reshape(rows, nb)
    qs = b[:, :, 2:]
    return np.concatenate([qs & 0xF, qs >> 4], axis=2), d


def _import_q5_0(raw: np.ndarray, rows: int, cols: int):
    """Q5_0 (fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles; w = d * (q - 16), q in 0..31)
    -> int8 with the same scales: q - 16 fits, so no value changes."""
    nb = cols // 32
    b = raw.reshape(rows, nb, 22)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.uint16).reshape(rows, nb)
    high = np.ascontiguousarray(b[:, :, 2:6]).view("<u4").reshape(rows, nb, 1)
    qs = b[:, :, 6:]
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).astype(np.int16)
    fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
    q = (low | fifth) - 16
    return "int8", q.astype(np.int8).view(np.uint8).reshape(rows, cols), d


def _import_q8_0(raw: np.ndarray, rows: int, cols: int):
    nb = cols // 32
    b = raw.reshape(rows, nb, 34)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.uint16).reshape(rows, nb)
    return "int8", np.ascontiguousarray(b[:, :, 2:]).reshape(rows, cols), d


def _import_q4_0(raw: np.ndarray, rows: int, cols: int, fmt: str):
    q, d = _nibbles_q4_0(raw, rows, cols)
    if fmt == "int8":  # d * (q - 8) with q - 8 in [-8, 7]: the same values as int8
        return "int8", (q.astype(np.int16) - 8).astype(np.int8).view(np.uint8).reshape(rows, cols), d
    return "int4", pack_nibbles(q), d


def _import_q4_1(raw: np.ndarray, rows: int, cols: int):
    """Q4_1 blocks (fp16 d, fp16 m, 16 bytes: element j low nibble, j + 16 high; w = d * q + m)
    -> int4m: the same d, m and q, the nibbles repacked into int4's block pairs."""
    nb = cols // 32
    b = raw.reshape(rows, nb, 20)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.uint16).reshape(rows, nb)
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.uint16).reshape(rows, nb)
    qs = b[:, :, 4:]
    return "int4m", pack_nibbles(np.concatenate([qs & 0xF, qs >> 4], axis=2)), d, m


_CHUNK_ELEMENTS = 1 << 23  # 32 MiB of float32 at a time


def _requantize(g: GGUFFile, gname: str, info, fmt: str):
    """Dequantize and quantize to fmt a band of rows at a time, so a large tensor (the 270M
    model's 168M-weight embedding) never exists whole as float32."""
    rows, cols = info.shape
    if rows * cols <= _CHUNK_ELEMENTS:
        return _C.quantize(np.ascontiguousarray(g.dequantize(gname), dtype=np.float32), fmt)
    raw = g.raw(gname)
    row_bytes = info.nbytes // rows
    # Whole 16-row groups per band, so the bands' interleaved rows concatenate unchanged.
    band = max(GROUP, _CHUNK_ELEMENTS // cols // GROUP * GROUP)
    parts = []
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        w = dequantize(raw[r0 * row_bytes: r1 * row_bytes], info.ggml_type, (r1 - r0, cols))
        parts.append(_C.quantize(np.ascontiguousarray(w, dtype=np.float32), fmt))
    return (fmt,) + tuple(np.concatenate([p[i] for p in parts]) for i in range(1, len(parts[0])))


def resolve_gguf_policy(quantization) -> Optional[Dict[str, Optional[str]]]:
    """None for "auto" (each tensor by its GGUF type), else quant.resolve_policy's dict."""
    if isinstance(quantization, str) and quantization == "auto":
        return None
    return resolve_policy(quantization)


def engine_weights_from_gguf(g: GGUFFile, config: GemmaConfig, dtype: Optional[str], quantization="auto",
                             progress=None):
    """{engine name: array or (format, quants, scales[, mins])}, the float dtype, and the policy
    used (a dict of group -> format, "auto" when chosen per tensor).

    quantization "auto": Q8_0 -> int8, Q4_0 -> int4 and Q4_1 -> int4m unchanged, Q5_0 -> int8
    unchanged; float tensors stay float; other types (Q4_K, Q6_K, ...) become int8. A format
    name or a policy dict chooses the format of every matrix (None: float); Q8_0, Q4_0, Q4_1
    and Q5_0 are imported without loss where the format holds their values, and re-quantized
    where it does not."""
    policy = resolve_gguf_policy(quantization)
    target = "float32" if dtype in (None, "auto") else canonical_dtype(dtype)
    arch = g.architecture()
    H, hd = config.hidden_size, config.head_dim
    shapes = {"q": (config.num_attention_heads * hd, H), "k": (config.num_key_value_heads * hd, H),
              "v": (config.num_key_value_heads * hd, H), "o": (H, config.num_attention_heads * hd),
              "gate": (config.intermediate_size, H), "up": (config.intermediate_size, H),
              "down": (H, config.intermediate_size), "q_norm": (hd,), "k_norm": (hd,)}

    def tensor(gname: str, shape):
        if gname not in g.tensors:
            raise ValueError(f"{g.path}: GGUF file has no tensor {gname!r} (needed by {arch})")
        info = g.tensors[gname]
        if tuple(info.shape) != tuple(shape):
            raise ValueError(f"{g.path}: tensor {gname!r} has shape {tuple(info.shape)}, expected {tuple(shape)} "
                             "from the file's metadata")
        return info

    def matrix(gname: str, engine_name: str, shape):
        info = tensor(gname, shape)
        rows, cols = shape
        if policy is None:  # auto
            fmt = {GGML_Q8_0: "int8", GGML_Q4_0: "int4", GGML_Q4_1: "int4m"}.get(info.ggml_type)
            if fmt is None and info.type_name not in _FLOAT_TYPES:
                fmt = "int8"
        else:
            fmt = format_for(policy, engine_name)
        if fmt is not None and cols % 32:
            raise ValueError(f"{g.path}: cannot quantize {gname!r} to {fmt}: its rows of {cols} are not a "
                             "multiple of 32")
        # The lossless imports give plain rows; the engine takes them in its row order.
        if fmt == "int8" and info.ggml_type == GGML_Q8_0:
            return _C.interleave(_import_q8_0(g.raw(gname), rows, cols))
        if fmt in ("int8", "int4") and info.ggml_type == GGML_Q4_0:
            return _C.interleave(_import_q4_0(g.raw(gname), rows, cols, fmt))
        if fmt == "int4m" and info.ggml_type == GGML_Q4_1:
            return _C.interleave(_import_q4_1(g.raw(gname), rows, cols))
        if fmt == "int8" and info.ggml_type == GGML_Q5_0:
            return _C.interleave(_import_q5_0(g.raw(gname), rows, cols))
        if fmt is None:
            return as_engine_dtype(g.dequantize(gname), "float32", target)
        return _requantize(g, gname, info, fmt)

    def norm(gname: str, shape):
        tensor(gname, shape)
        return np.ascontiguousarray(g.dequantize(gname), dtype=np.float32)  # already 1 + w

    V = config.vocab_size
    weights = {"embed": matrix("token_embd.weight", "embed", (V, H)),
               "final_norm": norm("output_norm.weight", (H,))}
    if not config.tie_word_embeddings:
        weights["lm_head"] = matrix("output.weight", "lm_head", (V, H))
    names = layer_names(arch)
    for i in range(config.num_hidden_layers):
        for short, gshort in names.items():
            gname, ename = f"blk.{i}.{gshort}.weight", f"layers.{i}.{short}"
            shape = shapes.get(short, (H,))
            weights[ename] = norm(gname, shape) if short in _NORMS else matrix(gname, ename, shape)
        if progress:
            progress(i + 1, config.num_hidden_layers)
    used = policy if policy is not None else "auto"
    return weights, target, used
