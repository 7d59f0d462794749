"""Gemma4TextConfig: the Gemma 4 text decoder's configuration (model_type "gemma4_text"), a
plain-Python mirror of transformers 5.25's Gemma4TextConfig; a Gemma 4 multimodal checkpoint's
config.json (model_type "gemma4", Gemma4ForConditionalGeneration) reads as its text_config.

What Gemma 4 adds to the earlier generations' fields: per-layer input embeddings
(hidden_size_per_layer_input, vocab_size_per_layer_input), KV sharing in the last layers
(num_kv_shared_layers) with the double-wide MLP there (use_double_wide_mlp), full-attention layers
whose values are their keys (attention_k_eq_v) with their own head size and KV heads, a RoPE
per layer type (the full layers' "proportional": only the first partial_rotary_factor of the
pairs rotate), and the mixture-of-experts block (enable_moe_block, num_experts, top_k_experts,
moe_intermediate_size). The full layers' head size and KV heads are given either as the
keywords global_head_dim (default 512) and num_global_key_value_heads (used only with
attention_k_eq_v), as released config.json files hold them, or as per_layer_config
({layer: {"head_dim": ..., "num_key_value_heads": ...}}), as transformers 5.25 writes them;
both read to the same config, which writes the second.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List

from ._config_fields import GEMMA4_FIELDS, PER_LAYER_KEYS, _got, _is_int, _is_real
from .config import CONFIG_CLASSES, GemmaConfig, rope_by_layer_type

__all__ = ["Gemma4TextConfig"]

_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}}
_PATTERN = 6  # by default every 6th layer is a full-attention one


class Gemma4TextConfig(GemmaConfig):
    """Configuration of a Gemma 4 text model (``model_type="gemma4_text"``), read from
    transformers' files (a Gemma 4 multimodal checkpoint's config gives its text_config).

    Unlike transformers, ``head_dim`` and ``num_key_value_heads`` read the sliding layers' values
    without an error; ``layer_head_dim(i)`` and ``layer_kv_heads(i)`` give each layer's."""

    model_type = "gemma4_text"
    _generation = "Gemma 4"
    FIELDS = GEMMA4_FIELDS

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("model_type") == "gemma4":
            # Gemma4ForConditionalGeneration: the text decoder's part; the vision and audio
            # towers' configs are left out (the engine runs text).
            text = kwargs.get("text_config")
            if not isinstance(text, dict):
                raise ValueError(f"a model_type 'gemma4' config holds its text model in text_config, {_got(text)}")
            name = kwargs.get("name_or_path", kwargs.get("_name_or_path", ""))
            kwargs = copy.deepcopy(text)
            kwargs.setdefault("model_type", self.model_type)
            kwargs.setdefault("name_or_path", name)
        super().__init__(**kwargs)

    def _prepare(self, kwargs: Dict[str, Any]) -> None:
        """transformers' Gemma4TextConfig.__post_init__: the default layer types (the last one
        always full attention), the default RoPE per layer type, and the full layers' head size
        and KV heads as per_layer_config (overrides equal to the global value dropped)."""
        layers = kwargs.get("num_hidden_layers", 30)
        if kwargs.get("layer_types") is None and _is_int(layers) and layers > 0:
            kwargs["layer_types"] = ["sliding_attention" if (i + 1) % _PATTERN else "full_attention"
                                     for i in range(layers)]
        types = kwargs.get("layer_types")
        if isinstance(types, (list, tuple)) and types and types[-1] != "full_attention":
            warnings.warn(f"Last layer must use `full_attention`, but got `{types[-1]}`. Forcing last layer to "
                          "`full_attention` (as transformers does).", UserWarning, stacklevel=4)
            kwargs["layer_types"] = list(types[:-1]) + ["full_attention"]
        global_head_dim = kwargs.pop("global_head_dim", 512)
        global_kv = kwargs.pop("num_global_key_value_heads", None)
        if kwargs.get("per_layer_config") is None and isinstance(kwargs.get("layer_types"), (list, tuple)):
            overrides: Dict[str, Any] = {"head_dim": global_head_dim}
            if kwargs.get("attention_k_eq_v", False) and global_kv is not None:
                overrides["num_key_value_heads"] = global_kv
            kwargs["per_layer_config"] = {i: dict(overrides) for i, t in enumerate(kwargs["layer_types"])
                                          if t == "full_attention"}

    @staticmethod
    def _standardize_rope(rope_parameters: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        # Gemma 4 has no legacy RoPE keys to fold in (transformers' convert_rope_params_to_dict).
        return copy.deepcopy(_DEFAULT_ROPE if rope_parameters is None else rope_parameters)

    def validate(self) -> None:
        super().validate()
        # Overrides equal to the global value are dropped, empty ones too (as transformers).
        globals_ = {key: getattr(self, key) for key in PER_LAYER_KEYS}
        self.per_layer_config = {layer: kept for layer, o in sorted(self.per_layer_config.items())
                                 if (kept := {k: v for k, v in o.items() if v != globals_[k]})}
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by layer {i}'s "
                                 f"num_key_value_heads ({self.layer_kv_heads(i)})")
        if self.num_kv_shared_layers > self.num_hidden_layers:
            raise ValueError(f"num_kv_shared_layers ({self.num_kv_shared_layers}) exceeds num_hidden_layers "
                             f"({self.num_hidden_layers})")
        self.kv_sharing()  # every shared layer type has a producer
        if self.enable_moe_block and None in (self.num_experts, self.top_k_experts, self.moe_intermediate_size):
            raise ValueError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size, got "
                             f"{self.num_experts}, {self.top_k_experts}, {self.moe_intermediate_size}")
        if self.enable_moe_block and self.top_k_experts > self.num_experts:
            raise ValueError(f"top_k_experts ({self.top_k_experts}) exceeds num_experts ({self.num_experts})")

    def _validate_rope(self) -> None:
        for layer_type, p, _ in rope_by_layer_type(self.rope_parameters, ("default", "proportional"),
                                                   "Gemma 4 uses 'default' and 'proportional' RoPE"):
            partial = p.get("partial_rotary_factor", 1.0)
            if not _is_real(partial) or not 0 <= partial <= 1:
                raise ValueError(f"rope_parameters[{layer_type!r}]['partial_rotary_factor'] must be in [0, 1], "
                                 f"{_got(partial)}")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        # JSON keys: zero-padded so that they sort as numbers, as transformers writes them.
        width = len(str(max(self.per_layer_config))) if self.per_layer_config else 1
        out["per_layer_config"] = {str(i).zfill(width): o for i, o in out["per_layer_config"].items()}
        return out

    # ----------------------------------------------------------------------------------------
    # per layer

    def layer_head_dim(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("num_key_value_heads", self.num_key_value_heads)

    def layer_windows(self) -> List[int]:
        """Per layer, the sliding window (0 for a full-attention layer)."""
        return [self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types]

    def kv_sharing(self) -> List[int]:
        """Per layer, the layer whose keys and values it attends over: itself, or for the last
        num_kv_shared_layers layers the last earlier layer of the same type (transformers'
        kv_sharing_modes "reuse" / "store")."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        source = list(range(self.num_hidden_layers))
        for i in range(first, self.num_hidden_layers):
            earlier = [j for j in range(first) if self.layer_types[j] == self.layer_types[i]]
            if not earlier:
                raise ValueError(f"layer {i} ({self.layer_types[i]}) shares keys and values, but no layer before "
                                 f"the shared ones (the first {first}) is of its type")
            source[i] = earlier[-1]
        return source

    def layer_intermediate_size(self, layer: int) -> int:
        """The dense MLP's width: doubled on the KV-shared layers with use_double_wide_mlp."""
        shared = layer >= self.num_hidden_layers - self.num_kv_shared_layers
        return self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)

    def rope(self, layer_type: str) -> Dict[str, float]:
        """A layer type's RoPE: its base and the fraction of the pairs that rotate."""
        p = self.rope_parameters[layer_type]
        partial = p.get("partial_rotary_factor", 1.0) if p.get("rope_type") == "proportional" else 1.0
        return {"theta": float(p["rope_theta"]), "partial_rotary_factor": float(partial)}

    @property
    def activation(self) -> str:
        return "gelu_pytorch_tanh"  # hidden_activation, checked to be a tanh-GELU name

    @property
    def rope_theta(self) -> float:
        return self.rope("full_attention")["theta"]

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count of Gemma4ForCausalLM with these shapes (transformers'
        ``model.num_parameters(exclude_embeddings=not include_embedding)``; the per-layer
        embedding table is an embedding too, layer_scalar a buffer)."""
        H, P, L, Hq = self.hidden_size, self.hidden_size_per_layer_input, self.num_hidden_layers, self.num_attention_heads
        sharing = self.kv_sharing()
        total = H  # the final norm
        if P:
            total += L * P * H + P  # per_layer_model_projection, per_layer_projection_norm
        for i in range(L):
            D, KV = self.layer_head_dim(i), self.layer_kv_heads(i)
            total += 2 * Hq * D * H + D + 4 * H  # q, o, q_norm; the four block norms
            if sharing[i] == i:  # a layer with keys and values of its own
                v = not (self.attention_k_eq_v and self.layer_types[i] == "full_attention")
                total += (1 + v) * KV * D * H + D  # k (and v), k_norm
            total += 3 * H * self.layer_intermediate_size(i)
            if P:
                total += 2 * P * H + H  # per_layer_input_gate, per_layer_projection, post_per_layer_input_norm
            if self.enable_moe_block:
                E, I = self.num_experts, self.moe_intermediate_size
                total += E * H + H + E + 3 * E * I * H + 3 * H  # router, experts, their three norms
        if include_embedding:
            total += self.vocab_size * H + (self.vocab_size_per_layer_input * L * P if P else 0)
        if not self.tie_word_embeddings:
            total += self.vocab_size * H
        return total


CONFIG_CLASSES["gemma4"] = Gemma4TextConfig  # a multimodal checkpoint's config reads as its text part
