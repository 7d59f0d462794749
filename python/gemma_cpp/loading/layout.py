"""The engine's side of a model, shared by every source: the tensors the engine takes for a
config (names and shapes, once per generation), its EngineConfig, and LoadedModel, what each
source (hf, gguf, engine_format, original) hands to the model classes.

Engine tensor names: `embed` [vocab, hidden] (also the LM head when tied), `lm_head` (untied
only), `final_norm` [hidden], and `layers.N.<name>` for the names of `layer_shapes`. Matrices
are [out, in], as float32, bfloat16 bits (uint16) or a QuantizedWeight; norms are float32
holding (1 + w), as the engine applies them. Each source maps its own tensor names onto these.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .._C import EngineConfig, interleave, model_tensors, quantize
from .._dtypes import round_to
from ..config import GemmaConfig
from ..generation import GenerationConfig
from ..quant import LAYER_GROUP, QuantizedWeight

# The float32 vectors of a model and its layers: the norms (1 + w for Gemma 1-3, w for Gemma 4)
# and Gemma 4's layer scalar and router scales.
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "layer_scalar",
         "ple_norm", "ple_post_norm", "router_scale", "expert_scale", "moe_pre_norm", "moe_dense_norm",
         "moe_post_norm")
# Gemma 4's router: kept in the float dtype (a few rows, run on every token), never quantized; its
# group in model.quantization.
FLOAT_MATRICES = {"router": "experts"}
# Gemma 4's experts, stacked: [experts x rows per expert, cols] in the engine, one expert's rows
# after another's (a file may hold them as [experts, rows per expert, cols]).
STACKED = ("experts_gate_up", "experts_down")


def check_quantizable(name: str, engine_name: str, shape, fmt: str, config: GemmaConfig, where: str) -> None:
    """A ValueError naming the tensor when it cannot be quantized to fmt: its rows (cols) must be
    a multiple of 32, the block size; the engine reads an expert's gate, up and down rows of the
    stacked matrices in place, so each must be whole 16-row groups."""
    if shape[-1] % 32:
        raise ValueError(f"{where}: cannot quantize {name!r} to {fmt}: its input size {shape[-1]} is not a multiple "
                         "of 32 (the block size); leave that group unquantized")
    short = engine_name.rsplit(".", 1)[-1]
    # The engine reads each expert's gate, up (I rows each) and down (hidden rows) in place.
    experts = getattr(config, "num_experts", None) or 1
    rows = {"experts_gate_up": shape[0] // experts // 2, "experts_down": shape[0] // experts}.get(short, 16)
    if rows % 16:
        raise ValueError(f"{where}: cannot quantize {name!r} to {fmt}: the engine reads each expert's rows of it in "
                         f"place, {rows} at a time, and a quantized matrix's rows go in groups of 16; leave the "
                         "experts group unquantized")

Shape = Tuple[int, ...]


def tensor_shapes(c: GemmaConfig) -> Tuple[Dict[str, Shape], List[Dict[str, Shape]]]:
    """The tensors the engine takes for this config, as its generation declares them
    (csrc/engine/generation.h; models/gemma.cpp for Gemma 1-3, models/gemma4.cpp), read from the
    engine once: the model's own beyond embed, lm_head and final_norm (Gemma 4's per-layer input
    embeddings), and per layer {name: shape}.

    Every generation's layer has the seven matrices (a Gemma 4 layer that shares keys and values
    has no k or v), attn_norm (before attention) and mlp_norm (before the MLP). Gemma 2, 3 and 4
    add post_attn_norm and post_mlp_norm (the sandwich norms on the blocks' outputs); Gemma 3
    and 4 add q_norm and k_norm, per head [head_dim]."""
    model: Dict[str, Shape] = {}
    layers: List[Dict[str, Shape]] = [{} for _ in range(c.num_hidden_layers)]
    for name, shape in model_tensors(engine_config(c, "float32")):
        if name.startswith("layers."):
            _, layer, short = name.split(".", 2)
            layers[int(layer)][short] = tuple(shape)
        elif name not in ("embed", "lm_head", "final_norm"):
            model[name] = tuple(shape)
    return model, layers


def layer_shapes(c: GemmaConfig, layer: int = 0) -> Dict[str, Shape]:
    """Layer `layer`'s tensors (tensor_shapes): engine name -> shape."""
    return tensor_shapes(c)[1][layer]


def is_norm(engine_name: str) -> bool:
    """A norm's engine name (`final_norm`, `layers.3.attn_norm`, ...): float32 (1 + w)."""
    return engine_name == "final_norm" or engine_name.rsplit(".", 1)[-1] in NORMS


def quantized(w: np.ndarray, fmt: str) -> QuantizedWeight:
    """A float32 (or bfloat16-bits) matrix quantized by the engine's threaded quantizer (the
    bytes of quant.quantize, its numpy mirror)."""
    return QuantizedWeight.of(quantize(np.ascontiguousarray(w), fmt))


def interleaved(qw) -> QuantizedWeight:
    """A quantized weight with plain rows in the engine's 16-row groups (threaded)."""
    return QuantizedWeight.of(interleave(tuple(qw)))


Weights = Dict[str, Union[np.ndarray, QuantizedWeight]]


@dataclasses.dataclass
class LoadedModel:
    """A model as a source read it, ready for the engine.

    config: the model's config. weights: {engine name: array or QuantizedWeight} (see the
    module docstring). dtype: the float weight dtype, 'float32' or 'bfloat16'. quantization:
    the policy used, {group: format or None} (quant.resolve_policy), or "auto" when chosen per
    GGUF tensor type. heads: the classification heads' tensors, {name: (array, dtype name)}.
    generation_config: the defaults generate() starts from. tokenizer: where
    GemmaTokenizer.from_pretrained finds the tokenizer (a folder or a GGUF file), or None.
    name_or_path: what the model was loaded from."""

    config: GemmaConfig
    weights: Weights
    dtype: str
    quantization: Union[str, Dict[str, Optional[str]]]
    heads: Dict[str, Tuple[np.ndarray, str]]
    generation_config: GenerationConfig
    tokenizer: Optional[str]
    name_or_path: str


def weight_formats(weights: Weights) -> Dict[str, Union[str, Dict[str, int]]]:
    """What runs, per tensor group: {"embed": ..., "attention": ..., "mlp": ...} (and "lm_head"
    when it is not the embedding). A group whose matrices share one format has its name
    ("float32", "bfloat16", "int8", "int4", "int4m", "q4_k", "q5_k", "q6_k"); a mixed group
    (a Q4_K_M GGUF file's, say) has {format: number of matrices}. Norms are always float32."""
    counts: Dict[str, Dict[str, int]] = {}
    for name, w in weights.items():
        if is_norm(name):
            continue
        short = name.rsplit(".", 1)[-1]
        if name in ("embed", "lm_head"):
            group = name
        elif short in FLOAT_MATRICES:
            group = FLOAT_MATRICES[short]
        else:
            group = LAYER_GROUP[short]
        if isinstance(w, tuple):
            fmt = str(w[0])
        else:
            fmt = "bfloat16" if np.asarray(w).dtype == np.uint16 else "float32"
        per = counts.setdefault(group, {})
        per[fmt] = per.get(fmt, 0) + 1
    order = ("embed", "attention", "mlp", "lm_head", "per_layer_inputs", "experts")
    return {g: (next(iter(counts[g])) if len(counts[g]) == 1 else dict(sorted(counts[g].items())))
            for g in order if g in counts}


def engine_config(config: GemmaConfig, dtype: str, kv_cache_dtype: str = "float32") -> EngineConfig:
    """The engine's view of a config. dtype: the float weight dtype (the embedding scale is
    rounded to it, as transformers does)."""
    fields = dict(
        generation="gemma",  # Gemma 1, 2 and 3: csrc/engine/models/gemma.cpp
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(config.rope_theta),
        rope_theta_local=float(config.rope_theta),
        embed_scale=round_to(config.hidden_size ** 0.5, dtype),
        attn_scale=float(np.float32(config.head_dim ** -0.5)),
        causal=not bool(getattr(config, "use_bidirectional_attention", False) or False),
        kv_cache_dtype=kv_cache_dtype,
    )
    if config.model_type == "gemma4_text":  # csrc/engine/models/gemma4.cpp
        full, local = config.rope("full_attention"), config.rope("sliding_attention")
        fields.update(
            generation="gemma4",
            causal=True,  # use_bidirectional_attention "vision" concerns image tokens only
            attn_scale=1.0,
            final_softcap=float(config.final_logit_softcapping or 0.0),
            sandwich_norms=True,
            qk_norm=True,
            v_norm=True,
            k_eq_v=bool(config.attention_k_eq_v),
            layer_windows=config.layer_windows(),
            layer_head_dims=[config.layer_head_dim(i) for i in range(config.num_hidden_layers)],
            layer_kv_heads=[config.layer_kv_heads(i) for i in range(config.num_hidden_layers)],
            kv_sources=config.kv_sharing(),
            ple_dim=config.hidden_size_per_layer_input,
            ple_vocab=config.vocab_size_per_layer_input if config.hidden_size_per_layer_input else 0,
            ple_embed_scale=round_to(config.hidden_size_per_layer_input ** 0.5, dtype),
            ple_proj_scale=float(np.float32(config.hidden_size ** -0.5)),
            ple_input_scale=float(np.float32(2.0 ** -0.5)),
            num_experts=config.num_experts if config.enable_moe_block else 0,
            top_k_experts=config.top_k_experts if config.enable_moe_block else 0,
            moe_intermediate=config.moe_intermediate_size if config.enable_moe_block else 0,
            router_input_scale=float(np.float32(config.hidden_size ** -0.5)),
            layer_intermediate_sizes=[config.layer_intermediate_size(i) for i in range(config.num_hidden_layers)],
            rope_theta=full["theta"], rope_partial=full["partial_rotary_factor"],
            rope_theta_local=local["theta"], rope_partial_local=local["partial_rotary_factor"],
        )
        return EngineConfig(**fields)
    if config.model_type != "gemma":  # Gemma 2 / 3
        fields.update(
            attn_scale=float(np.float32(config.query_pre_attn_scalar ** -0.5)),
            attn_softcap=float(config.attn_logit_softcapping or 0.0),
            final_softcap=float(config.final_logit_softcapping or 0.0),
            sandwich_norms=True,
            layer_windows=config.layer_windows(),
        )
    if config.model_type == "gemma3_text":
        (theta, factor), (theta_local, factor_local) = (config.rope("full_attention"),
                                                        config.rope("sliding_attention"))
        fields.update(rope_theta=theta, rope_factor=factor, rope_theta_local=theta_local,
                      rope_factor_local=factor_local, qk_norm=True)
    return EngineConfig(**fields)
