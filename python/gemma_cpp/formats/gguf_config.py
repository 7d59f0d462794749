"""A GGUF file's model metadata as the keys of a Hugging Face config.json (a plain dict), for
Gemma 1 / 2 / 3 / 4: what config.py builds a config from, and what the loaders read through it.

GGUF files record the shapes, the norms' epsilon and the RoPE base under `{arch}.*`; each
generation's values for what they do not record (query_pre_attn_scalar, the local RoPE base,
the softcaps' defaults, the layer pattern) are filled in as llama.cpp assumes them."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from .gguf import GGUFFile

# general.architecture -> (model_type, the transformers class of a causal LM of it).
ARCHITECTURES = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "gemma4": ("gemma4_text", "Gemma4ForCausalLM")}


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


def _per_layer(g: GGUFFile, key: str, layers: int, kind=int):
    """A value given per layer or once (an array of one value per layer, or a scalar) as a
    list of `layers` values; None when the key is absent."""
    if key not in g.metadata:
        return None
    value = g.metadata[key]
    if isinstance(value, (list, np.ndarray)):
        values = list(value)
        if len(values) != layers:
            raise ValueError(f"{g.path}: GGUF metadata {key!r} has {len(values)} values for {layers} layers")
        if kind is bool:
            return [bool(v) for v in values]
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v > 0
                   for v in values):
            raise ValueError(f"{g.path}: GGUF metadata {key!r} must hold positive integers, got {values!r}")
        return [int(v) for v in values]
    return [_meta(g, key, kind)] * layers


def _token_id(g: GGUFFile, name: str, default: Optional[int]) -> Optional[int]:
    value = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
    return int(value) if value is not None else default


def config_dict(g: GGUFFile) -> Dict[str, Any]:
    """The config.json keys (model_type included) of a Gemma GGUF file; ValueError naming the
    file and key for another architecture or metadata that contradicts the tensors."""
    arch = g.architecture()
    if arch not in ARCHITECTURES:
        raise ValueError(f"{g.path}: unsupported architecture {arch!r} (general.architecture); gemma_cpp "
                         f"runs {', '.join(ARCHITECTURES)}")
    model_type, causal_lm = ARCHITECTURES[arch]
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
    if arch == "gemma4":  # per layer, as _gemma4 reads them
        head_dim, ffn, kv_heads = 0, 0, 0
    else:
        ffn = _meta(g, p + "feed_forward_length", int)
        kv_heads = _meta(g, p + "attention.head_count_kv", int, default=heads)
    kw = dict(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=int(_meta(g, p + "embedding_length", int)),
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_meta(g, p + "context_length", int, default=8192),
        rms_norm_eps=_meta(g, p + "attention.layer_norm_rms_epsilon", float, default=1e-6),
        pad_token_id=_token_id(g, "padding", 0),
        bos_token_id=_token_id(g, "bos", 2),
        eos_token_id=_token_id(g, "eos", 1),
        tie_word_embeddings="output.weight" not in g.tensors,
        architectures=[causal_lm],
    )
    if kw["hidden_size"] != hidden:
        raise ValueError(f"{g.path}: {p}embedding_length is {kw['hidden_size']} but token_embd.weight has "
                         f"rows of {hidden}")
    if arch == "gemma4":
        return _gemma4(g, kw)
    if arch == "gemma":
        kw["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": _meta(g, p + "rope.freq_base", float, default=10000.0)}
        return kw
    # Gemma 2 and 3 scale scores by query_pre_attn_scalar ** -0.5: head_dim, except the 27B
    # models (46 and 62 layers), which use hidden / heads (as llama.cpp does).
    kw["query_pre_attn_scalar"] = hidden // heads if layers in (46, 62) else head_dim
    kw["sliding_window"] = _meta(g, p + "attention.sliding_window", int, default=4096)
    if arch == "gemma2":
        kw["attn_logit_softcapping"] = _meta(g, p + "attn_logit_softcapping", float, default=50.0)
        kw["final_logit_softcapping"] = _meta(g, p + "final_logit_softcapping", float, default=30.0)
        kw["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": _meta(g, p + "rope.freq_base", float, default=10000.0)}
        return kw
    full = {"rope_type": "default", "rope_theta": _meta(g, p + "rope.freq_base", float, default=1_000_000.0)}
    scaling = g.metadata.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{g.path}: {p}rope.scaling.type {scaling!r} is not supported (only linear)")
        full.update(rope_type="linear", factor=_meta(g, p + "rope.scaling.factor", float))
    kw["rope_parameters"] = {"full_attention": full,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    kw["final_logit_softcapping"] = kw["attn_logit_softcapping"] = None
    return kw


def _gemma4(g: GGUFFile, kw: Dict[str, Any]) -> Dict[str, Any]:
    """Gemma 4's config from what llama.cpp's converter writes (docs/design/gemma4.md, sec. 3):
    the sliding layers' head size as key_length_swa and the full layers' as key_length; KV heads
    and the MLP's width once or per layer (double on the KV-shared layers with the double-wide
    MLP); the layer types as sliding_window_pattern (true: sliding); the full layers'
    proportional RoPE as the rope_freqs tensor (1 for the pairs that rotate, 1e30 for those
    that do not); values taken from keys where a full layer has no attn_v tensor; the experts'
    counts. Norm weights are stored as w, as Gemma 4 applies them."""
    p, L = "gemma4.", kw["num_hidden_layers"]
    head_dim = _meta(g, p + "attention.key_length_swa", int, default=256)
    global_head_dim = _meta(g, p + "attention.key_length", int, default=512)
    pattern = _per_layer(g, p + "attention.sliding_window_pattern", L, bool)
    if pattern is None:  # transformers' default: every 6th layer, and the last, full attention
        pattern = [(i + 1) % 6 != 0 for i in range(L)]
    layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    shared = _meta(g, p + "attention.shared_kv_layers", int, default=0)
    if not 0 <= shared <= L:
        raise ValueError(f"{g.path}: GGUF metadata {p}attention.shared_kv_layers is {shared} for {L} layers")
    sliding = [i for i, s in enumerate(pattern) if s]
    full = [i for i, s in enumerate(pattern) if not s]
    kv = _per_layer(g, p + "attention.head_count_kv", L) or [kw["num_attention_heads"]] * L
    ffn = _per_layer(g, p + "feed_forward_length", L)
    if ffn is None:
        raise ValueError(f"{g.path}: GGUF metadata has no {p + 'feed_forward_length'!r}")
    first_shared = L - shared
    double = shared > 0 and ffn[first_shared:] == [2 * ffn[0]] * shared
    want = [ffn[0] * (2 if double and i >= first_shared else 1) for i in range(L)]
    if ffn != want:
        raise ValueError(f"{g.path}: GGUF metadata {p}feed_forward_length {ffn} is neither one width nor one "
                         "doubled on the KV-shared layers")
    # A full layer with keys of its own but no attn_v takes its values from its keys.
    k_eq_v = any(f"blk.{i}.attn_k.weight" in g.tensors and f"blk.{i}.attn_v.weight" not in g.tensors
                 for i in full)
    kv_sliding = kv[sliding[0]] if sliding else kv[0]
    per_layer_config = {i: {"head_dim": global_head_dim, "num_key_value_heads": kv[i]} for i in full}
    for i in sliding:
        if kv[i] != kv_sliding:
            per_layer_config[i] = {"num_key_value_heads": kv[i]}
    ple = _meta(g, p + "embedding_length_per_layer_input", int, default=0)
    if ple:
        if "per_layer_token_embd.weight" not in g.tensors:
            raise ValueError(f"{g.path}: {p}embedding_length_per_layer_input is {ple} but the file has no "
                             "per_layer_token_embd.weight tensor")
        kw["vocab_size_per_layer_input"] = int(g.tensors["per_layer_token_embd.weight"].shape[0])
    experts = _meta(g, p + "expert_count", int, default=0)
    moe = dict(enable_moe_block=experts > 0)
    if experts:
        moe.update(num_experts=experts, top_k_experts=_meta(g, p + "expert_used_count", int),
                   moe_intermediate_size=_meta(g, p + "expert_feed_forward_length", int))
    softcap = _meta(g, p + "final_logit_softcapping", float, default=0.0)
    kw.update(
        head_dim=head_dim,
        num_key_value_heads=kv_sliding,
        intermediate_size=ffn[0],
        layer_types=layer_types,
        per_layer_config=per_layer_config,
        sliding_window=_meta(g, p + "attention.sliding_window", int, default=512),
        num_kv_shared_layers=shared,
        use_double_wide_mlp=double,
        attention_k_eq_v=k_eq_v,
        hidden_size_per_layer_input=ple,
        final_logit_softcapping=softcap or None,
        rope_parameters={
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": _meta(g, p + "rope.freq_base_swa", float, default=10_000.0)},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": _rotary_fraction(g, global_head_dim),
                               "rope_theta": _meta(g, p + "rope.freq_base", float, default=1_000_000.0)}},
        **moe,
    )
    return kw


def _rotary_fraction(g: GGUFFile, head_dim: int) -> float:
    """The full layers' partial_rotary_factor: from rope_freqs (its leading 1s are the pairs
    that rotate; the converter writes 1e30, an angle of about 0, for the others), else from
    rope.dimension_count."""
    if "rope_freqs.weight" in g.tensors:
        f = np.asarray(g.dequantize("rope_freqs.weight"), dtype=np.float64).reshape(-1)
        if f.size != head_dim // 2:
            raise ValueError(f"{g.path}: rope_freqs.weight has {f.size} values, expected {head_dim // 2} "
                             f"(half the full layers' head size {head_dim})")
        rotating = int(np.argmax(f != 1.0)) if (f != 1.0).any() else f.size
        if not (np.all(f[:rotating] == 1.0) and np.all(f[rotating:] >= 1e20)):
            raise ValueError(f"{g.path}: rope_freqs.weight is not proportional RoPE's (leading 1s, then "
                             f"values of about 1e30): {f.tolist()[:8]} ...")
        return 2 * rotating / head_dim
    rot = _meta(g, "gemma4.rope.dimension_count", int, default=head_dim)
    return min(rot, head_dim) / head_dim
