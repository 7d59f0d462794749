"""The config fields, each declared once: its name, its default (transformers'), its conversion
on construction and its check. config.py builds the config classes from these lists (their
signature, to_dict's keys and order, validate()); transformers' PreTrainedConfig fields are
marked `generic`, and to_diff_dict leaves one out while it holds PreTrainedConfig()'s value."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Optional, Tuple

# Names transformers' ACT2FN maps to the tanh approximation of GELU,
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GELUTanh (torch's approximate="tanh"),
# its pure-Python twin, NewGELUActivation and FastGELUActivation (same formula, constants
# pre-folded). These are the only activations the engine implements. Plain "gelu" is the
# exact erf GELU in ACT2FN and is accepted only as the legacy hidden_act value (config.py).
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _activation_error(field: str, value: Any) -> str:
    return (
        f"{field}={value!r} is not supported: the engine implements only the tanh-approximated "
        f"GELU that Gemma was trained with ({', '.join(TANH_GELU_NAMES)}; hidden_act='gelu' is read "
        f"as 'gelu_pytorch_tanh' on load)"
    )


def _type_name(value: Any) -> str:
    return type(value).__name__


def _got(value: Any) -> str:
    return f"got {value!r} ({_type_name(value)})"


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but True is not a layer count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dtype_to_str(value: Any) -> Any:
    """torch.bfloat16 -> "bfloat16" without importing torch (as transformers' dict_dtype_to_str)."""
    if value is None or isinstance(value, str):
        return value
    text = str(value)
    if text.startswith("torch."):
        return text.split(".", 1)[1]
    return value  # left for validate() to reject with the field name


_UNSET = object()


class Field:
    """One config field. check(config, name, value) raises ValueError naming the field;
    convert(value) runs on construction (JSON spellings transformers accepts);
    base_default: for a generic field, PreTrainedConfig()'s value when it differs from the
    constructor default (id2label and label2id, made from num_labels=2)."""

    __slots__ = ("name", "default", "check", "convert", "generic", "base_default")

    def __init__(self, name: str, default: Any, check=None, convert=None, generic: bool = False,
                 base_default: Any = _UNSET):
        self.name, self.default, self.check, self.convert = name, default, check, convert
        self.generic = generic
        self.base_default = default if base_default is _UNSET else base_default

    def with_default(self, default: Any) -> "Field":
        return Field(self.name, default, self.check, self.convert, self.generic, self.base_default)


def _with_defaults(fields: Tuple[Field, ...], **defaults: Any) -> Tuple[Field, ...]:
    unknown = set(defaults) - {f.name for f in fields}
    assert not unknown, unknown
    return tuple(f.with_default(defaults[f.name]) if f.name in defaults else f for f in fields)


# ---- conversions

def _float_if_int(value: Any) -> Any:
    # transformers' strict fields reject an int where a float is due; json may hold "0" for
    # 0.0, so we accept it and store a float, which transformers then reads back.
    return float(value) if _is_int(value) else value


def _list_if_tuple(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---- checks

def _positive_int(config, name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, {_got(value)}")


def _even_positive_int(config, name: str, value: Any) -> None:
    _positive_int(config, name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (RoPE rotates pairs of halves), got {value}")


def _non_negative_int(config, name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, {_got(value)}")


def _optional_positive_int(config, name: str, value: Any) -> None:
    if value is not None and (not _is_int(value) or value <= 0):
        raise ValueError(f"{name} must be a positive int or None, {_got(value)}")


def _real(low: float, low_open: bool, high: float = math.inf, optional: bool = False, what: Optional[str] = None):
    """A finite number in the range; `what` overrides the message's description."""
    if what is None:
        if low_open and low == 0 and high == math.inf:
            what = "a positive float"
        elif high == math.inf:
            what = f"a float >= {low}"
        else:
            what = f"a float in [{low}, {high}]"

    def check(config, name: str, value: Any) -> None:
        if optional and value is None:
            return
        ok = _is_real(value) and math.isfinite(value) and value <= high
        ok = ok and (value > low if low_open else value >= low)
        if not ok:
            raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, {_got(value)}")

    return check


def _boolean(optional: bool = False, unsupported: Optional[str] = None):
    """A bool (or None); `unsupported`: why True cannot run, if it cannot."""

    def check(config, name: str, value: Any) -> None:
        if not (isinstance(value, bool) or (optional and value is None)):
            kind = "a bool or None" if optional else "a bool"
            raise ValueError(f"{name} must be {kind}, {_got(value)}")
        if value and unsupported:
            raise ValueError(f"{name}=True is not supported: {unsupported}")

    return check


def _is_encoder_decoder(config, name: str, value: Any) -> None:
    _boolean()(config, name, value)
    if value:
        raise ValueError(f"{name} must be False: Gemma is a decoder-only model")


def _token_id(config, name: str, value: Any) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an int or None, {_got(value)}")
    _warn_outside_vocab(config, name, value)


def _warn_outside_vocab(config, name: str, value: int) -> None:
    if not 0 <= value < config.vocab_size:
        # transformers warns rather than fails: hub configs hold e.g. pad_token_id=-1.
        warnings.warn(
            f"{name}={value} is outside the vocabulary [0, {config.vocab_size}); this may result "
            "in unexpected behaviour.",
            UserWarning,
            stacklevel=4,
        )


def _eos_token_id(config, name: str, value: Any) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not _is_int(item):
                raise ValueError(f"{name} must be an int, a list of ints or None, got {value!r} "
                                 f"(item {i} is {_type_name(item)})")
            _warn_outside_vocab(config, name, item)
    elif value is not None:
        if not _is_int(value):
            raise ValueError(f"{name} must be an int, a list of ints or None, {_got(value)}")
        _warn_outside_vocab(config, name, value)


def _tanh_gelu(config, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, {_got(value)}")
    if value not in TANH_GELU_NAMES:
        raise ValueError(_activation_error(name, value))


def _rope(config, name: str, value: Any) -> None:
    config._validate_rope()


def _optional_str(what: str):
    def check(config, name: str, value: Any) -> None:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be {what} or None, {_got(value)}")

    return check


def _str_list(config, name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, list) or not all(isinstance(a, str) for a in value)):
        raise ValueError(f"{name} must be a list of str or None, {_got(value)}")


def _id2label(config, name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict mapping int label ids to names, {_got(value)}")
    for key, label in value.items():
        if not _is_int(key):
            raise ValueError(f"{name} keys must be ints, got key {key!r} ({_type_name(key)})")
        if not isinstance(label, str):
            raise ValueError(f"{name} values must be str label names, got {label!r} for id {key}")


def _label2id(config, name: str, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict mapping label names to ids or None, {_got(value)}")


def _problem_type(config, name: str, value: Any) -> None:
    if value is not None and value not in _PROBLEM_TYPES:
        raise ValueError(f"{name} must be one of {list(_PROBLEM_TYPES)} or None, {_got(value)}")


def _layer_types(config, name: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) != config.num_hidden_layers or any(t not in _LAYER_TYPES
                                                                                   for t in value):
        raise ValueError(f"{name} must list one of {list(_LAYER_TYPES)} for each of the {config.num_hidden_layers} "
                         f"layers, {_got(value)}")


_LAYER_TYPES = ("sliding_attention", "full_attention")

# Gemma-specific fields and the generic PreTrainedConfig fields, in to_dict() order; the
# defaults are transformers' (gemma-7b shapes).
GEMMA_FIELDS: Tuple[Field, ...] = (
    Field("vocab_size", 256000, _positive_int),
    Field("hidden_size", 3072, _positive_int),
    Field("intermediate_size", 24576, _positive_int),
    Field("num_hidden_layers", 28, _positive_int),
    Field("num_attention_heads", 16, _positive_int),
    Field("num_key_value_heads", 16, _positive_int),
    Field("head_dim", 256, _even_positive_int),
    Field("hidden_act", "gelu_pytorch_tanh", _tanh_gelu),
    Field("max_position_embeddings", 8192, _positive_int),
    Field("initializer_range", 0.02, _real(0.0, low_open=False), _float_if_int),
    Field("rms_norm_eps", 1e-6, _real(0.0, low_open=True), _float_if_int),
    Field("use_cache", True, _boolean()),
    Field("pad_token_id", 0, _token_id),
    Field("eos_token_id", 1, _eos_token_id, _list_if_tuple),
    Field("bos_token_id", 2, _token_id),
    Field("tie_word_embeddings", True, _boolean()),
    Field("rope_parameters", None, _rope),  # folded from the legacy keys by _standardize_rope
    Field("attention_bias", False, _boolean(unsupported="Gemma's q/k/v/o projections have no bias and "
                                                        "neither does the engine")),
    Field("attention_dropout", 0.0, _real(0.0, low_open=False, high=1.0)),
    Field("use_bidirectional_attention", None, _boolean(optional=True, unsupported="the engine's attention is causal")),
    Field("transformers_version", None, _optional_str("a str")),
    Field("architectures", None, _str_list, _list_if_tuple, generic=True),
    Field("output_hidden_states", False, _boolean(), generic=True),
    Field("output_attentions", False, _boolean(), generic=True),
    Field("return_dict", True, _boolean(), generic=True),
    Field("dtype", None, _optional_str("a str such as 'bfloat16'"), _dtype_to_str, generic=True),
    Field("chunk_size_feed_forward", 0, _non_negative_int, generic=True),
    Field("is_encoder_decoder", False, _is_encoder_decoder, generic=True),
    Field("id2label", None, _id2label, generic=True, base_default={0: "LABEL_0", 1: "LABEL_1"}),
    Field("label2id", None, _label2id, generic=True, base_default={"LABEL_0": 0, "LABEL_1": 1}),
    Field("problem_type", None, _problem_type, generic=True),
)

# What Gemma 2 and Gemma 3 add: the activation under transformers' name for these
# generations, the score scale, the sliding window and which layers use it, the soft-caps.
SLIDING_FIELDS: Tuple[Field, ...] = (
    Field("hidden_activation", "gelu_pytorch_tanh", _tanh_gelu),
    Field("query_pre_attn_scalar", 256, _real(0.0, low_open=True, what="a positive number")),
    Field("sliding_window", 4096, _optional_positive_int),
    Field("layer_types", None, _layer_types, _list_if_tuple),  # None: every n-th layer is global
    Field("final_logit_softcapping", None, _real(0.0, low_open=True, optional=True)),
    Field("attn_logit_softcapping", None, _real(0.0, low_open=True, optional=True)),
)


# ---- Gemma 4

# Per-layer values a Gemma 4 config may give a layer (transformers' per_layer_config: the
# full-attention layers' own head size and KV heads).
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


def _gemma4_bidirectional(config, name: str, value: Any) -> None:
    if value not in (None, "vision", "all"):
        raise ValueError(f"{name} must be 'all', 'vision' or None, {_got(value)}")
    if value == "all":
        raise ValueError(f"{name}='all' is not supported: the engine's Gemma 4 attention is causal ('vision' concerns "
                         "image tokens only, which a text model never sees)")


def _int_keys(value: Any) -> Any:
    """per_layer_config as JSON holds it ({"05": {...}}) with int layer indices, as transformers reads it."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, overrides in value.items():
        try:
            out[int(key)] = copy.deepcopy(overrides)
        except (TypeError, ValueError):
            out[key] = copy.deepcopy(overrides)  # left for the check to name
    return out


def _per_layer_config(config, name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of layer index -> overrides, {_got(value)}")
    for layer, overrides in value.items():
        if not _is_int(layer) or not 0 <= layer < config.num_hidden_layers:
            raise ValueError(f"{name}: {layer!r} is not a layer index in [0, {config.num_hidden_layers})")
        if not isinstance(overrides, dict) or set(overrides) - set(PER_LAYER_KEYS):
            raise ValueError(f"{name}[{layer}]: a layer may override only {list(PER_LAYER_KEYS)}, {_got(overrides)}")
        for key, v in overrides.items():
            (_even_positive_int if key == "head_dim" else _positive_int)(config, f"{name}[{layer}][{key!r}]", v)


def _field_of(fields: Tuple[Field, ...], name: str) -> Field:
    return next(f for f in fields if f.name == name)


# transformers 5.25's Gemma4TextConfig: Gemma 1's fields less hidden_act (Gemma 4 names the
# activation hidden_activation), with its defaults (E2B-like shapes), then what Gemma 4 adds.
# global_head_dim / num_global_key_value_heads are keywords that become per_layer_config.
GEMMA4_FIELDS: Tuple[Field, ...] = tuple(
    Field("use_bidirectional_attention", None, _gemma4_bidirectional) if f.name == "use_bidirectional_attention" else f
    for f in _with_defaults(tuple(f for f in GEMMA_FIELDS if f.name != "hidden_act"), vocab_size=262144,
                            hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, max_position_embeddings=131072)
) + (
    Field("hidden_activation", "gelu_pytorch_tanh", _tanh_gelu),
    Field("sliding_window", 512, _positive_int),
    _field_of(SLIDING_FIELDS, "layer_types"),
    _field_of(SLIDING_FIELDS, "final_logit_softcapping"),
    Field("vocab_size_per_layer_input", 262144, _positive_int),
    Field("hidden_size_per_layer_input", 256, _non_negative_int),  # 0: no per-layer embeddings
    Field("attention_k_eq_v", False, _boolean()),
    Field("num_kv_shared_layers", 0, _non_negative_int),
    Field("enable_moe_block", False, _boolean()),
    Field("use_double_wide_mlp", False, _boolean()),
    Field("num_experts", None, _optional_positive_int),
    Field("top_k_experts", None, _optional_positive_int),
    Field("moe_intermediate_size", None, _optional_positive_int),
    Field("per_layer_config", None, _per_layer_config, _int_keys),
)
