"""A GGUF file's model metadata as the keys of a Hugging Face config.json (a plain dict), for
Gemma 1 / 2 / 3: what config.py builds a config from, and what the loaders read through it.

GGUF files record the shapes, the norms' epsilon and the RoPE base under `{arch}.*`; each
generation's values for what they do not record (query_pre_attn_scalar, the local RoPE base,
the softcaps' defaults, the layer pattern) are filled in as llama.cpp assumes them."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from .gguf import GGUFFile

# general.architecture -> (model_type, the transformers class of a causal LM of it).
ARCHITECTURES = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


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
    kw = dict(
        model_type=model_type,
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
        architectures=[causal_lm],
    )
    if kw["hidden_size"] != hidden:
        raise ValueError(f"{g.path}: {p}embedding_length is {kw['hidden_size']} but token_embd.weight has "
                         f"rows of {hidden}")
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
