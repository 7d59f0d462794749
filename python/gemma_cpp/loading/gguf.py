"""A Gemma model from a GGUF file: the config from its metadata, the engine's weights from
its tensors.

Q8_0 tensors become our int8, Q4_0 our int4, Q4_1 our int4m and Q4_K / Q5_K / Q6_K our q4_k /
q5_k / q6_k without loss (the same values); Q4_0 and Q5_0 also become int8 without loss
(q - 8 and q - 16 fit). Every other type is read exactly (dequantized) and then quantized to
the format the policy names, or kept as float32 / bfloat16 when it names none; a load that
re-quantizes a tensor says so in one warning. GGUF norm weights already hold 1 + w, which is
what the engine takes."""
from __future__ import annotations

import collections
import warnings
from typing import Dict, Optional

import numpy as np

from .._dtypes import as_engine_dtype, canonical_dtype
from ..config import GemmaConfig, config_from_gguf
from ..formats.gguf import GGUFFile, dequantize, quantized_blocks
from ..generation import END_OF_TURN, GenerationConfig
from ..quant import ALL_FORMATS, GGML_TYPE_OF, GROUP, QuantizedWeight, format_for, kquant_from_gguf, pack_nibbles, \
    resolve_policy
from .layout import FLOAT_MATRICES, STACKED, LoadedModel, check_quantizable, interleaved, is_norm, quantized, \
    tensor_shapes

GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q8_0 = 2, 3, 6, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 12, 13, 14
# The types whose values a format holds (csrc/core/formats.h): imported without loss.
_KEPT = {GGML_TYPE_OF[name]: name for name in ALL_FORMATS}
_FLOAT_TYPES = ("F32", "F16", "BF16")

# Engine tensor name (under layers.N.) -> GGUF name (under blk.N.), as llama.cpp's converter
# names them; which of them a file has follows from its generation (layout.tensor_shapes).
_LAYER_NAMES = {"q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
                "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
                "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
                "post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight",
                "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
                # Gemma 4
                "layer_scalar": "layer_output_scale.weight", "ple_gate": "inp_gate.weight",
                "ple_out": "proj.weight", "ple_post_norm": "post_norm.weight", "router": "ffn_gate_inp.weight",
                "router_scale": "ffn_gate_inp.scale", "expert_scale": "ffn_down_exps.scale",
                "experts_gate_up": "ffn_gate_up_exps.weight", "experts_down": "ffn_down_exps.weight",
                "moe_pre_norm": "pre_ffw_norm_2.weight", "moe_dense_norm": "post_ffw_norm_1.weight",
                "moe_post_norm": "post_ffw_norm_2.weight"}
# Gemma 4's model-level tensors of the per-layer input embeddings.
_MODEL_NAMES = {"ple_embed": "per_layer_token_embd.weight", "ple_proj": "per_layer_model_proj.weight",
                "ple_norm": "per_layer_proj_norm.weight"}


# A GGUF file carries no generation config: the sampling values that Google's checkpoints of an
# architecture state in theirs. Gemma 3: every google/gemma-3-*-it generation_config.json holds
# do_sample true, top_k 64, top_p 0.95 (the 270M's too: the demo model's source). Gemma 1 and 2
# state none. Gemma 4's are not recorded here (not checked against Google's files).
SAMPLING_DEFAULTS = {"gemma3": {"top_k": 64, "top_p": 0.95}}


def stop_ids(g: GGUFFile, config: GemmaConfig) -> list:
    """The config's eos ids and the vocabulary's END_OF_TURN pieces: where generation stops."""
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        where = {t: i for i, t in enumerate(tokens) if t in END_OF_TURN}
        ids += [where[t] for t in END_OF_TURN if t in where and where[t] not in ids]
    return ids


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 packed bytes [..., 16] (element j low nibble, j + 16 high) -> [..., 32]."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _fp16_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


def _import_q8_0(raw: np.ndarray, rows: int, cols: int, fmt: str = "int8") -> QuantizedWeight:
    b = quantized_blocks(raw, GGML_Q8_0, rows, cols)
    return QuantizedWeight("int8", np.ascontiguousarray(b["qs"]).view(np.uint8).reshape(rows, cols),
                           _fp16_bits(b["d"]))


def _import_q5_0(raw: np.ndarray, rows: int, cols: int, fmt: str = "int8") -> QuantizedWeight:
    """Q5_0 (w = d * (q - 16), q in 0..31: four nibble bits, a fifth from qh) -> int8 with the
    same scales: q - 16 fits, so no value changes."""
    b = quantized_blocks(raw, GGML_Q5_0, rows, cols)
    fifth = ((b["qh"][..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
    q = (_nibbles(b["qs"]).astype(np.int16) | fifth) - 16
    return QuantizedWeight("int8", q.astype(np.int8).view(np.uint8).reshape(rows, cols), _fp16_bits(b["d"]))


def _import_q4_0(raw: np.ndarray, rows: int, cols: int, fmt: str) -> QuantizedWeight:
    b = quantized_blocks(raw, GGML_Q4_0, rows, cols)
    q, d = _nibbles(b["qs"]), _fp16_bits(b["d"])
    if fmt == "int8":  # d * (q - 8) with q - 8 in [-8, 7]: the same values as int8
        return QuantizedWeight("int8", (q.astype(np.int16) - 8).astype(np.int8).view(np.uint8).reshape(rows, cols), d)
    return QuantizedWeight("int4", pack_nibbles(q), d)


def _import_q4_1(raw: np.ndarray, rows: int, cols: int, fmt: str = "int4m") -> QuantizedWeight:
    """Q4_1 (w = d * q + m) -> int4m: the same d, m and q, the nibbles repacked into int4's
    block pairs."""
    b = quantized_blocks(raw, GGML_Q4_1, rows, cols)
    return QuantizedWeight("int4m", pack_nibbles(_nibbles(b["qs"])), _fp16_bits(b["d"]), _fp16_bits(b["m"]))


def _import_kquant(raw: np.ndarray, rows: int, cols: int, fmt: str) -> QuantizedWeight:
    """Q4_K / Q5_K / Q6_K -> q4_k / q5_k / q6_k: the same bytes, scales unpacked (quant.py)."""
    ggml_type = GGML_TYPE_OF[fmt]
    return kquant_from_gguf(quantized_blocks(raw, ggml_type, rows, cols), fmt)


# (GGUF type, format) -> the import that keeps every value (plain rows).
_IMPORTS = {(GGML_Q8_0, "int8"): _import_q8_0, (GGML_Q4_0, "int8"): _import_q4_0, (GGML_Q4_0, "int4"): _import_q4_0,
            (GGML_Q4_1, "int4m"): _import_q4_1, (GGML_Q5_0, "int8"): _import_q5_0,
            (GGML_Q4_K, "q4_k"): _import_kquant, (GGML_Q5_K, "q5_k"): _import_kquant,
            (GGML_Q6_K, "q6_k"): _import_kquant}


_CHUNK_ELEMENTS = 1 << 22  # weights per band: 16 MiB of float32, 4 MiB of Q8_0


def _banded(g: GGUFFile, gname: str, info, convert, shape=None) -> QuantizedWeight:
    """A matrix converted a band of rows at a time: convert(raw bytes of rows, n rows, cols)
    gives the band as a QuantizedWeight in the engine's row order, which is copied into place;
    then the band's file pages are given back (GGUFFile.release). So neither the whole tensor
    in another form (the 270M model's 168M-weight embedding as float32 or as a second copy)
    nor the file's pages beside our copy ever add to the peak memory: only a band does.
    shape: the matrix's (rows, cols) where the file's tensor has more axes (stacked experts)."""
    rows, cols = shape or info.shape
    row_bytes = info.nbytes // rows
    # Whole 16-row groups per band, so the bands' interleaved rows are the whole's.
    band = max(GROUP, _CHUNK_ELEMENTS // cols // GROUP * GROUP)
    raw = g.raw(gname)
    out = None
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        part = convert(raw[r0 * row_bytes: r1 * row_bytes], r1 - r0, cols)
        if out is None:
            out = [np.empty((rows,) + a.shape[1:], a.dtype) for a in part[1:]]
        for o, a in zip(out, part[1:]):
            o[r0:r1] = a
        g.release(gname, r0 * row_bytes, r1 * row_bytes)
    return QuantizedWeight(part[0], *out)


def _requantize(g: GGUFFile, gname: str, info, fmt: str, shape=None) -> QuantizedWeight:
    """Dequantized and quantized to fmt a band of rows at a time (_banded)."""
    def band(raw, rows, cols):
        return quantized(np.ascontiguousarray(dequantize(raw, info.ggml_type, (rows, cols)), dtype=np.float32), fmt)

    return _banded(g, gname, info, band, shape)


def resolve_gguf_policy(quantization) -> Optional[Dict[str, Optional[str]]]:
    """None for "auto" (each tensor by its GGUF type), else quant.resolve_policy's dict."""
    if isinstance(quantization, str) and quantization == "auto":
        return None
    return resolve_policy(quantization)


def _matrix_format(policy, info, engine_name: str) -> Optional[str]:
    """The format a matrix loads as: the policy's, or under "auto" (policy None) its GGUF
    type's own where we hold its values (Q8_0 int8, Q4_0 int4, Q4_1 int4m, Q4_K / Q5_K / Q6_K
    q4_k / q5_k / q6_k, Q5_0 int8), float for float tensors, and int8 for every other
    quantized type (Q2_K, Q3_K, ...)."""
    if policy is not None:
        return format_for(policy, engine_name)
    fmt = _KEPT.get(info.ggml_type)
    if fmt is None and info.type_name not in _FLOAT_TYPES:
        fmt = "int8"
    return fmt


def _lossless(info, fmt: Optional[str]) -> bool:
    """Whether a tensor of this GGUF type loads as fmt with its values unchanged."""
    return (info.ggml_type, fmt) in _IMPORTS or (fmt is None and info.type_name in _FLOAT_TYPES)


def _requantize_notice(path: str, changed: Dict[str, collections.Counter], asked: bool) -> Optional[str]:
    """One line naming the tensors a load re-quantized ({GGUF type: Counter of formats})."""
    if not changed:
        return None
    parts = ", ".join(f"{sum(c.values())} {t} to {'/'.join(sorted(c))}" for t, c in sorted(changed.items()))
    why = ("as the quantization asked; quantization='auto' keeps each tensor's own type where it can" if asked
           else "gemma_cpp has no kernels for these types")
    return f"{path}: re-quantized {parts} ({why})"


def _engine_weights(g: GGUFFile, config: GemmaConfig, target: str, policy, progress=None):
    """{engine name: array or QuantizedWeight}. Q8_0, Q4_0, Q4_1, Q5_0 and the K-quants Q4_K,
    Q5_K and Q6_K are imported without loss where the format holds their values, and
    re-quantized where it does not (one warning names what changed)."""
    changed: Dict[str, collections.Counter] = {}

    def tensor(gname: str, shape):
        if gname not in g.tensors:
            raise ValueError(f"{g.path}: GGUF file has no tensor {gname!r} (needed by {g.architecture()})")
        info = g.tensors[gname]
        if tuple(info.shape) != tuple(shape):
            raise ValueError(f"{g.path}: tensor {gname!r} has shape {tuple(info.shape)}, expected {tuple(shape)} "
                             "from the file's metadata")
        return info

    def matrix(gname: str, engine_name: str, shape, file_shape=None):
        """shape: the engine's (rows, cols); file_shape: the file's where it differs (the
        experts' [experts, rows per expert, cols])."""
        info = tensor(gname, file_shape or shape)
        fmt = _matrix_format(policy, info, engine_name)
        if fmt is not None:
            try:
                check_quantizable(gname, engine_name, shape, fmt, config, g.path)
            except ValueError:
                if policy is not None:
                    raise
                fmt = None  # "auto": the file's values, as float, where the engine cannot read them in place
        if fmt is not None and not _lossless(info, fmt) and info.type_name not in _FLOAT_TYPES:
            changed.setdefault(info.type_name, collections.Counter())[fmt] += 1
        # The lossless imports give plain rows; the engine takes them in its row order. (A
        # K-quant format is only ever the tensor's own type: policies cannot name one.)
        convert = _IMPORTS.get((info.ggml_type, fmt))
        if convert is not None:
            return _banded(g, gname, info, lambda raw, r, c: interleaved(convert(raw, r, c, fmt)), shape)
        if fmt is None:
            values = as_engine_dtype(g.dequantize(gname).reshape(shape), "float32", target)
            g.release(gname)
            return values
        return _requantize(g, gname, info, fmt, shape)

    def norm(gname: str, shape):
        tensor(gname, shape)
        return np.ascontiguousarray(g.dequantize(gname), dtype=np.float32)  # already 1 + w (Gemma 4: w)

    def float_matrix(gname: str, shape):
        """Gemma 4's router (layout.FLOAT_MATRICES): float, whatever the file's type
        (dequantized: the same values)."""
        values = g.dequantize(tensor(gname, shape).name)
        g.release(gname)
        return as_engine_dtype(values, "float32", target)

    def experts(i: int, short: str, shape):
        """[E * rows per expert, cols], one expert's rows after another's: the file's [E, rows, cols]
        tensor as it is, or for gate_up llama.cpp's other layout, ffn_gate_exps and ffn_up_exps
        [E, I, H] each, joined per expert (float, then quantized as the policy says: re-quantized
        where the file's type was quantized)."""
        E = config.num_experts
        stacked = (E, shape[0] // E, shape[1])
        gname = f"blk.{i}.{_LAYER_NAMES[short]}"
        if short == "experts_down" or gname in g.tensors or f"blk.{i}.ffn_gate_exps.weight" not in g.tensors:
            return matrix(gname, f"layers.{i}.{short}", shape, stacked)
        half = (E, shape[0] // E // 2, shape[1])
        infos = [tensor(f"blk.{i}.ffn_{n}_exps.weight", half) for n in ("gate", "up")]
        values = np.concatenate([g.dequantize(t.name) for t in infos], axis=1).reshape(shape)
        fmt = _matrix_format(policy, infos[0], f"layers.{i}.{short}")
        if fmt is None:
            return as_engine_dtype(values, "float32", target)
        check_quantizable(infos[0].name, f"layers.{i}.{short}", shape, fmt, config, g.path)
        if infos[0].type_name not in _FLOAT_TYPES:
            changed.setdefault(infos[0].type_name, collections.Counter())[fmt] += 2
        return quantized(values, fmt)

    V, H = config.vocab_size, config.hidden_size
    weights = {"embed": matrix("token_embd.weight", "embed", (V, H)),
               "final_norm": norm("output_norm.weight", (H,))}
    if not config.tie_word_embeddings:
        weights["lm_head"] = matrix("output.weight", "lm_head", (V, H))
    model_level, layers = tensor_shapes(config)
    for ename, shape in model_level.items():
        gname = _MODEL_NAMES[ename]
        weights[ename] = norm(gname, shape) if is_norm(ename) else matrix(gname, ename, shape)
    for i, per_layer in enumerate(layers):
        for short, shape in per_layer.items():
            gname, ename = f"blk.{i}.{_LAYER_NAMES[short]}", f"layers.{i}.{short}"
            if short == "layer_scalar" and gname not in g.tensors:
                weights[ename] = np.ones(shape, np.float32)  # optional in llama.cpp's loader: 1
            elif short in STACKED:
                weights[ename] = experts(i, short, shape)
            elif is_norm(ename):
                weights[ename] = norm(gname, shape)
            elif short in FLOAT_MATRICES:
                weights[ename] = float_matrix(gname, shape)
            else:
                weights[ename] = matrix(gname, ename, shape)
        if progress:
            progress(i + 1, config.num_hidden_layers)
    notice = _requantize_notice(g.path, changed, asked=policy is not None)
    if notice:
        warnings.warn(notice, stacklevel=5)  # from_pretrained's caller
    return weights


def load(path, dtype: Optional[str] = None, quantization="auto", config: Optional[GemmaConfig] = None,
         progress=None) -> LoadedModel:
    """A GGUF file (a path, or a GGUFFile already open).

    quantization "auto": Q8_0 -> int8, Q4_0 -> int4, Q4_1 -> int4m, Q4_K / Q5_K / Q6_K ->
    q4_k / q5_k / q6_k and Q5_0 -> int8, all unchanged; float tensors stay float; other types
    (Q2_K, Q3_K, ...) become int8, with a warning. A format name or a policy dict chooses the
    format of every matrix (None: float), with a warning naming the tensors whose values that
    changed. dtype: the float weight dtype (float32 unless given)."""
    policy = resolve_gguf_policy(quantization)  # fail on a bad name before reading the file
    target = "float32" if dtype in (None, "auto") else canonical_dtype(dtype)
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    try:
        config = config or config_from_gguf(g)
        weights = _engine_weights(g, config, target, policy, progress)
        generation = GenerationConfig(eos_token_id=stop_ids(g, config), pad_token_id=config.pad_token_id,
                                      bos_token_id=config.bos_token_id,
                                      sampling_defaults=dict(SAMPLING_DEFAULTS.get(g.architecture(), {})))
        has_vocab = "tokenizer.ggml.tokens" in g.metadata
    finally:
        if g is not path:
            g.close()
    return LoadedModel(config=config, weights=weights, dtype=target,
                       quantization=policy if policy is not None else "auto", heads={},
                       generation_config=generation, tokenizer=g.path if has_vocab else None,
                       name_or_path=g.path)
