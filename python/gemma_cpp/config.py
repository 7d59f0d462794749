"""GemmaConfig: the Gemma 1 model configuration, read from and written to HF config.json.

A plain-Python mirror of ``transformers.GemmaConfig`` (transformers 5.24) with no torch or
transformers import. It accepts every config.json that transformers accepts for
``model_type="gemma"`` and writes files that transformers reads back to an equal config:

* the same fields and defaults, including the generic ``PreTrainedConfig`` ones a
  checkpoint carries (architectures, dtype, id2label / label2id, problem_type, ...);
* RoPE settings as 5.24 stores them: ``rope_parameters = {"rope_type": ..., "rope_theta": ...}``.
  Older files with a flat ``rope_theta`` key (and/or the older ``rope_scaling`` dict) are
  folded into ``rope_parameters`` by the same priority rules transformers uses;
* the legacy Gemma 1 hub value ``hidden_act="gelu"`` is read as ``"gelu_pytorch_tanh"`` with a
  warning, exactly as 5.24 does (the released weights were trained with tanh-GELU);
* keys we do not know are kept and written back (round trip), as transformers does.

Beyond the mirror, ``validate()`` (run on construction, load and save) rejects what the engine
cannot run faithfully: a non-tanh activation, RoPE scaling, attention biases, bidirectional
attention; and it names the field in every error.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import tempfile
import types
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

from ._config_fields import (GEMMA_FIELDS, SLIDING_FIELDS, TANH_GELU_NAMES, _LAYER_TYPES, Field, _activation_error,
                             _dtype_to_str, _got, _is_int, _is_real, _real, _type_name, _with_defaults)


__all__ = ["GemmaConfig", "Gemma2Config", "Gemma3TextConfig", "load_config", "PRESETS", "CONFIG_NAME",
           "SUPPORTED_MODEL_TYPES"]

CONFIG_NAME = "config.json"
SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma4_text")

_CANONICAL_ACTIVATION = "gelu_pytorch_tanh"  # the name `activation` gives (_config_fields.TANH_GELU_NAMES)

_DEFAULT_ROPE_THETA = 10_000.0
_SUPPORTED_ROPE_TYPES = ("default",)
# Keys transformers' default-RoPE validator expects; anything else draws its
# "Unrecognized keys" warning ("type" is the pre-4.4x spelling of "rope_type").
_KNOWN_ROPE_KEYS = ("rope_type", "rope_theta", "type", "partial_rotary_factor")


# Keys transformers consumes at load time and never serializes: runtime choices and hub
# bookkeeping. Dropping them keeps a loaded-then-saved file equal to what transformers writes.
_RUNTIME_KEYS = (
    "_commit_hash",
    "attn_implementation",
    "_attn_implementation_internal",
    "experts_implementation",
    "_experts_implementation_internal",
    "_post_init_done",
    "ignore_keys_at_rope_validation",
)

# Older or optional keys that do not belong to transformers' GemmaConfig but that our code
# reads: readable as attributes (None when absent) and serialized only when present in the
# input, exactly like any other extra key. hidden_activation: transformers 4.38-4.4x's
# Gemma-only activation field (ignored by 5.24). classifier_dropout: read by
# GemmaForTokenClassification when set.
_OPTIONAL_EXTRAS = ("hidden_activation", "classifier_dropout")

# JSON has no NaN / Infinity; transformers writes them as {"__float__": "NaN"}.
_FLOAT_TAG_KEY = "__float__"
_FLOAT_TAG_VALUES = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}

# model_type -> config class: each class registers itself when defined (_finish_class); Gemma 4's
# lives in config_gemma4.py, which the package imports.
CONFIG_CLASSES: Dict[str, type] = {}

# Architecture of the released Gemma 1 checkpoints (google/gemma-2b, google/gemma-7b and
# their -it / 1.1 variants, which share the shapes); every other field is its default.
PRESETS = types.MappingProxyType({
    name: types.MappingProxyType(dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv,
                                      architectures=["GemmaForCausalLM"]))
    for name, (hidden, ffn, layers, heads, kv) in {"gemma-2b": (2048, 16384, 18, 8, 1),
                                                   "gemma-7b": (3072, 24576, 28, 16, 16)}.items()
})


def _decode_special_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_FLOAT_TAG_KEY} and obj[_FLOAT_TAG_KEY] in _FLOAT_TAG_VALUES:
            return _FLOAT_TAG_VALUES[obj[_FLOAT_TAG_KEY]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def _encode_special_floats(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return {_FLOAT_TAG_KEY: "NaN"}
        if math.isinf(obj):
            return {_FLOAT_TAG_KEY: "Infinity" if obj > 0 else "-Infinity"}
        return obj
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


class GemmaConfig:
    """Configuration of a Gemma 1 model (``model_type="gemma"``), transformers-compatible.

    Construct with keyword arguments (the defaults are transformers', i.e. gemma-7b shapes),
    from a checkpoint with :meth:`from_pretrained`, or from a named architecture with
    :meth:`from_preset`. Attributes are plain and mutable; call :meth:`validate` after
    changing them (saving validates too). The fields are declared once, in FIELDS.
    """

    model_type = "gemma"
    _generation = "Gemma 1"
    FIELDS: Tuple[Field, ...] = GEMMA_FIELDS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._finish_class()

    @classmethod
    def _finish_class(cls) -> None:
        """The class's field names and its signature, from FIELDS; a class naming its own
        model_type is what config_class() gives for it."""
        if "model_type" in cls.__dict__:
            CONFIG_CLASSES[cls.model_type] = cls
        cls._FIELD_NAMES = frozenset(f.name for f in cls.FIELDS)
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in cls.FIELDS]
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        cls.__signature__ = inspect.Signature(params)

    def __init__(self, **kwargs: Any) -> None:
        object.__setattr__(self, "_extra", {})
        self.name_or_path = str(kwargs.pop("name_or_path", kwargs.pop("_name_or_path", "")))
        for key in _RUNTIME_KEYS:
            kwargs.pop(key, None)

        model_type = kwargs.pop("model_type", None)
        if model_type is not None and model_type != self.model_type:
            hint = (f"; use {CONFIG_CLASSES[model_type].__name__} (or load_config) for it"
                    if model_type in CONFIG_CLASSES else "")
            raise ValueError(
                f"model_type must be {self.model_type!r} ({self._generation}), {_got(model_type)}; "
                f"{type(self).__name__} supports model types [{self.model_type!r}]{hint}"
            )
        if kwargs.get("per_layer_config") is not None and "per_layer_config" not in self._FIELD_NAMES:
            raise ValueError(f"per_layer_config (heterogeneous layers) is not supported for {self._generation}")
        self._prepare(kwargs)

        # PreTrainedConfig: `torch_dtype` is the pre-5.0 name of `dtype`; `dtype` wins if both.
        torch_dtype = kwargs.pop("torch_dtype", None)
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = torch_dtype
        num_labels = kwargs.pop("num_labels", None)
        id2label = kwargs.pop("id2label", None)
        rope_parameters = kwargs.pop("rope_parameters", None)

        for f in self.FIELDS:
            if f.name in ("id2label", "rope_parameters"):
                continue
            value = kwargs.pop(f.name) if f.name in kwargs else copy.deepcopy(f.default)
            object.__setattr__(self, f.name, f.convert(value) if f.convert else value)

        # PreTrainedConfig: num_labels is not stored; it is len(id2label). With no id2label a
        # two-label map is made (so classifiers saved with 2 labels and no map still load).
        self.id2label = None
        if id2label is None:
            self.num_labels = num_labels if num_labels is not None else 2
        else:
            if not isinstance(id2label, dict):
                raise ValueError(f"id2label must be a dict mapping label ids to names, {_got(id2label)}")
            if num_labels is not None and num_labels != len(id2label):
                warnings.warn(
                    f"num_labels={num_labels!r} is incompatible with the id2label map of length "
                    f"{len(id2label)}; using id2label.",
                    UserWarning,
                    stacklevel=2,
                )
            self.id2label = {self._label_id(key): value for key, value in id2label.items()}

        self.rope_parameters = self._standardize_rope(rope_parameters, kwargs)

        for key, value in kwargs.items():
            self._extra[key] = value

        self.validate()

    # ----------------------------------------------------------------------------------------
    # construction helpers

    def _prepare(self, kwargs: Dict[str, Any]) -> None:
        """Generation-specific spellings, before the fields are read from kwargs.

        transformers 5.24 GemmaConfig.__post_init__ (#29402): the official Gemma 1 configs say
        "gelu" but the weights were trained with the tanh approximation."""
        if kwargs.get("hidden_act") == "gelu":
            warnings.warn(
                'Found hidden_act="gelu" in this Gemma config. This is a legacy value of the official '
                'releases but it is meant to target the tanh approximation. Setting hidden_act="gelu_pytorch_tanh" '
                "instead (as transformers does).",
                UserWarning,
                stacklevel=3,
            )
            kwargs["hidden_act"] = "gelu_pytorch_tanh"

    @staticmethod
    def _label_id(key: Any) -> int:
        # JSON object keys are strings: {"0": "neg"} -> {0: "neg"}, as transformers does.
        if _is_int(key):
            return key
        if isinstance(key, str):
            try:
                return int(key)
            except ValueError:
                pass
        raise ValueError(f"id2label keys must be integer label ids, got key {key!r} ({_type_name(key)})")

    @staticmethod
    def _standardize_rope(rope_parameters: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Fold legacy RoPE keys into one rope_parameters dict, with transformers 5.24's priority.

        Order (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a truthy `rope_scaling`
        (pre-5.0 name) replaces `rope_parameters`; then values inside the dict win over the flat
        `rope_theta` / `partial_rotary_factor` keys, which win over the default theta (1e4);
        `rope_type` defaults to the old `type` key, else "default".
        """
        rope_scaling = kwargs.pop("rope_scaling", None)
        params = rope_scaling or rope_parameters
        if params is None:
            params = {}
        if not isinstance(params, dict):
            name = "rope_scaling" if rope_scaling else "rope_parameters"
            raise ValueError(
                f"{name} must be a dict such as {{'rope_type': 'default', 'rope_theta': 10000.0}}, {_got(params)}"
            )
        params = copy.deepcopy(params)
        flat_theta = kwargs.pop("rope_theta", None)
        params.setdefault("rope_theta", flat_theta if flat_theta is not None else _DEFAULT_ROPE_THETA)
        if params["rope_theta"] is None:
            params["rope_theta"] = _DEFAULT_ROPE_THETA
        if _is_int(params["rope_theta"]):
            params["rope_theta"] = float(params["rope_theta"])
        partial = kwargs.pop("partial_rotary_factor", None)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
        params.setdefault("rope_type", params.get("type", "default"))
        return params

    # ----------------------------------------------------------------------------------------
    # attribute plumbing: unknown keys live in self._extra and read like attributes

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails. Private / dunder names never come from _extra
        # (copy and pickle probe for __setstate__ etc. before __init__ has run).
        if name.startswith("_"):
            raise AttributeError(name)
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        if name in _OPTIONAL_EXTRAS:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        cls_attr = getattr(type(self), name, None)
        if name.startswith("_") or name in self._FIELD_NAMES or name == "name_or_path" or isinstance(cls_attr, property):
            object.__setattr__(self, name, value)
        elif cls_attr is not None:
            raise AttributeError(f"{name!r} is a read-only attribute of {type(self).__name__}, not a config field")
        else:
            self._extra[name] = value

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_extra", {}):
            del self._extra[name]
        else:
            object.__delattr__(self, name)

    @property
    def extra(self) -> Dict[str, Any]:
        """Keys of the config.json this class does not model; written back by save_pretrained."""
        return self._extra

    # ----------------------------------------------------------------------------------------
    # derived properties

    @property
    def num_labels(self) -> Optional[int]:
        """Number of classification labels: len(id2label), None without one (transformers does not store it)."""
        return len(self.id2label) if self.id2label is not None else None

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        if not _is_int(num_labels) or num_labels < 0:
            raise ValueError(f"num_labels must be a non-negative int, {_got(num_labels)}")
        if self.id2label is None or len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = {name: i for i, name in self.id2label.items()}

    @property
    def torch_dtype(self) -> Optional[str]:
        """Pre-5.0 name of `dtype` (a string here: "bfloat16", "float32", ...)."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        self.dtype = _dtype_to_str(value)

    @property
    def rope_theta(self) -> float:
        """RoPE base: rope_parameters["rope_theta"] (a flat `rope_theta` key was folded in on load)."""
        theta = (self.rope_parameters or {}).get("rope_theta")
        return float(theta) if theta is not None else _DEFAULT_ROPE_THETA

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default"}
        self.rope_parameters["rope_theta"] = value

    @property
    def rope_scaling(self) -> Optional[Dict[str, Any]]:
        """Pre-5.0 name of `rope_parameters` (read-only alias)."""
        return self.rope_parameters

    @property
    def activation(self) -> str:
        """The MLP activation the model computes: always "gelu_pytorch_tanh" once validated.

        hidden_act spellings gelu_pytorch_tanh, gelu_python_tanh, gelu_new and gelu_fast are
        the same function (tanh-approximated GELU); the legacy "gelu" was mapped on load.
        """
        if self.hidden_act not in TANH_GELU_NAMES:
            raise ValueError(_activation_error("hidden_act", self.hidden_act))
        return _CANONICAL_ACTIVATION

    @property
    def num_queries_per_kv(self) -> int:
        """Query heads sharing one KV head: query head h reads KV head h // num_queries_per_kv."""
        return self.num_attention_heads // self.num_key_value_heads

    # ----------------------------------------------------------------------------------------
    # validation

    def validate(self) -> None:
        """Check every field (in FIELDS order), then the rules between fields; ValueError naming
        the field and the value on the first problem."""
        for f in self.FIELDS:
            if f.check is not None:
                f.check(self, f.name, getattr(self, f.name))
        self._validate_across()

    def _validate_across(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        hidden_activation = self._extra.get("hidden_activation")
        if hidden_activation is not None and hidden_activation not in TANH_GELU_NAMES:
            # transformers 4.38-4.4x ran `hidden_activation` when set (plain "gelu" meaning the
            # exact erf GELU there); 5.24 ignores it. A non-tanh value means the two disagree.
            raise ValueError(
                _activation_error("hidden_activation", hidden_activation)
                + "; older transformers versions ran hidden_activation, so this checkpoint's "
                "activation is ambiguous"
            )
        if "classifier_dropout" in self._extra:
            _real(0.0, low_open=False, high=1.0, optional=True)(self, "classifier_dropout",
                                                                 self._extra["classifier_dropout"])
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError(
                'problem_type="single_label_classification" requires num_labels > 1; for binary '
                'classification use num_labels=2, or problem_type="regression" for one output'
            )

    def _validate_rope(self) -> None:
        params = self.rope_parameters
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict, {_got(params)}")
        nested = [key for key, value in params.items() if isinstance(value, dict)]
        if nested:
            raise ValueError(
                f"rope_parameters is nested by layer type ({nested}); Gemma 1 uses one RoPE for every layer"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        for key in ("rope_type", "type"):
            value = params.get(key, rope_type)
            if value not in _SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_parameters[{key!r}]={value!r} is not supported for Gemma 1: the engine "
                    f"implements only {list(_SUPPORTED_ROPE_TYPES)} (unscaled) RoPE"
                )
        theta = params.get("rope_theta", _DEFAULT_ROPE_THETA)
        if not _is_real(theta) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"rope_theta (rope_parameters['rope_theta']) must be a positive float, {_got(theta)}")
        partial = params.get("partial_rotary_factor")
        if partial is not None:
            if not _is_real(partial) or not 0 < partial <= 1:
                raise ValueError(f"rope_parameters['partial_rotary_factor'] must be a float in (0, 1], {_got(partial)}")
            if partial != 1:
                warnings.warn(
                    f"partial_rotary_factor={partial} is ignored: Gemma rotates the full head_dim "
                    "(as transformers' GemmaRotaryEmbedding does)",
                    UserWarning,
                    stacklevel=3,
                )
        unknown = sorted(set(params) - set(_KNOWN_ROPE_KEYS))
        if unknown:
            warnings.warn(
                f"Unrecognized keys in rope_parameters for rope_type='default': {unknown}",
                UserWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------
    # sizes

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count of GemmaForCausalLM with these shapes (what transformers'
        ``model.num_parameters(exclude_embeddings=not include_embedding)`` reports).

        embed V*H; per layer q H*(n_h*d), k and v H*(n_kv*d) each, o (n_h*d)*H, gate and up
        H*F each, down F*H, two RMSNorm weights of H; the final norm H; an LM head V*H only when
        not tied (it is a Linear, so it stays counted when embeddings are excluded).
        """
        h, d = self.hidden_size, self.head_dim
        q_out = self.num_attention_heads * d
        kv_out = self.num_key_value_heads * d
        attention = h * q_out + 2 * h * kv_out + q_out * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        total = self.num_hidden_layers * per_layer + h
        if include_embedding:
            total += self.vocab_size * h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    # ----------------------------------------------------------------------------------------
    # presets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GemmaConfig":
        """Config of a released architecture: "gemma-2b" or "gemma-7b" (keyword overrides apply on top)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        kwargs = copy.deepcopy(dict(PRESETS[name]))
        kwargs.update(overrides)
        return cls(**kwargs)

    # ----------------------------------------------------------------------------------------
    # dict / json

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **kwargs: Any) -> "GemmaConfig":
        """Build from a config.json-shaped dict; keyword arguments override its keys."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"config_dict must be a dict, {_got(config_dict)}")
        merged = copy.deepcopy(config_dict)
        merged.update(kwargs)
        bad = [key for key in merged if not isinstance(key, str)]
        if bad:
            raise ValueError(f"config keys must be str, got {bad!r}")
        return cls(**merged)

    def to_dict(self) -> Dict[str, Any]:
        """Every field (as transformers' to_dict, less transformers_version when unknown), extras included."""
        out: Dict[str, Any] = {f.name: copy.deepcopy(getattr(self, f.name)) for f in self.FIELDS}
        if out["transformers_version"] is None:
            del out["transformers_version"]
        out["model_type"] = self.model_type
        for key, value in self._extra.items():
            out[key] = copy.deepcopy(value)
        return out

    def to_diff_dict(self) -> Dict[str, Any]:
        """to_dict() less the generic fields still at PreTrainedConfig's defaults: what config.json holds."""
        base = {f.name: f.base_default for f in self.FIELDS if f.generic}
        return {key: value for key, value in self.to_dict().items() if key not in base or value != base[key]}

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON text as transformers writes it (indent 2, sorted keys, NaN/inf tagged)."""
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(_encode_special_floats(data), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: Any) -> bool:
        # Provenance (name_or_path, the transformers_version that wrote the file) is not compared.
        if not isinstance(other, GemmaConfig):
            return NotImplemented
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("transformers_version", None)
        theirs.pop("transformers_version", None)
        return mine == theirs

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ----------------------------------------------------------------------------------------
    # files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> "GemmaConfig":
        """Read a checkpoint folder's config.json, a config .json file given by path, or a GGUF
        file's metadata (its path, or a folder and gguf_file=, as transformers takes it).

        Keyword arguments override keys of the file. Errors name the file. From a GGUF file,
        GemmaConfig.from_pretrained gives the config class of the file's generation.
        """
        path = os.fspath(pretrained_model_name_or_path)
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:
            path = os.path.join(path, os.fspath(gguf_file))
        if _starts_as_gguf(path):
            return cls._from_gguf(path, kwargs)
        if gguf_file is not None:
            raise FileNotFoundError(f"{path}: no such GGUF file")
        if os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path} is a folder but has no {CONFIG_NAME}; pass a Hugging Face checkpoint folder "
                    f"(config.json, *.safetensors, tokenizer.model) or the path of a config.json file"
                )
        elif os.path.isfile(path):
            file = path
        else:
            raise FileNotFoundError(
                f"no such file or folder: {path!r}. GemmaConfig.from_pretrained reads a local checkpoint "
                f"folder (or its {CONFIG_NAME}) and never downloads; fetch a hub model first, e.g. "
                f"`huggingface-cli download google/gemma-2b --local-dir gemma-2b`, then pass that folder"
            )
        try:
            with open(file, encoding="utf-8") as reader:
                data = json.load(reader)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not a valid JSON config: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file}: a config.json must hold a JSON object, got {_type_name(data)}")
        data = _decode_special_floats(data)
        data.update(kwargs)
        data.setdefault("name_or_path", path)
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err
        except TypeError as err:  # e.g. a key that clashes with a keyword parameter of __init__
            raise ValueError(f"{file}: {err}") from err

    @classmethod
    def _from_gguf(cls, path: str, overrides: Dict[str, Any]) -> "GemmaConfig":
        from .formats.gguf import GGUFFile
        from .formats.gguf_config import config_dict

        with GGUFFile(path) as g:
            data = config_dict(g)
        target = config_class(data.pop("model_type"), path)
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {target.model_type} model: read it with "
                             f"{target.__name__}.from_pretrained or gemma_cpp.AutoConfig.from_pretrained")
        data.update(overrides)
        data.setdefault("name_or_path", path)
        try:
            return target(**data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write `save_directory`/config.json (validated; temp file then rename). Returns its path."""
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise NotADirectoryError(f"save_pretrained expects a folder, but {folder!r} is a file")
        self.validate()
        text = self.to_json_string(use_diff=True)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, CONFIG_NAME)
        fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as writer:
                writer.write(text)
                writer.flush()
                os.fsync(writer.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target



GemmaConfig._finish_class()


# ---------------------------------------------------------------------------------------------
# Gemma 2 and Gemma 3 (text)


class _SlidingGemmaConfig(GemmaConfig):
    """What Gemma 2 and Gemma 3 add to Gemma 1 (SLIDING_FIELDS): four norms per layer,
    query_pre_attn_scalar, soft-capping, sliding-window layers listed in ``layer_types``. The
    activation field is ``hidden_activation`` (transformers' name for these generations); a
    ``hidden_act`` key in the file is read too (hub configs carry both)."""

    FIELDS = GEMMA_FIELDS + SLIDING_FIELDS
    _DEFAULT_PATTERN = 2  # every n-th layer is global

    def _prepare(self, kwargs: Dict[str, Any]) -> None:
        activation = kwargs.pop("hidden_activation", None)
        if activation is None:
            activation = kwargs.get("hidden_act", "gelu_pytorch_tanh")
        kwargs.setdefault("hidden_act", activation)
        if kwargs["hidden_act"] == "gelu":
            kwargs["hidden_act"] = activation = "gelu_pytorch_tanh"
        kwargs["hidden_activation"] = activation
        pattern = kwargs.pop("sliding_window_pattern", self._DEFAULT_PATTERN)
        layers = kwargs.get("num_hidden_layers", self._field("num_hidden_layers").default)
        if kwargs.get("layer_types") is None and _is_int(layers) and _is_int(pattern) and pattern > 0:
            kwargs["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(layers)]

    @classmethod
    def _field(cls, name: str) -> Field:
        return next(f for f in cls.FIELDS if f.name == name)

    def layer_windows(self) -> List[int]:
        """Per layer, the sliding window (0 for a global layer)."""
        w = self.sliding_window or 0
        return [w if t == "sliding_attention" else 0 for t in self.layer_types]

    def num_parameters(self, include_embedding: bool = True) -> int:
        # Two more norms per layer than Gemma 1.
        return super().num_parameters(include_embedding) + 2 * self.hidden_size * self.num_hidden_layers


class Gemma2Config(_SlidingGemmaConfig):
    """Configuration of a Gemma 2 model (``model_type="gemma2"``), read from transformers' files."""

    model_type = "gemma2"
    _generation = "Gemma 2"
    FIELDS = _with_defaults(GEMMA_FIELDS + SLIDING_FIELDS, vocab_size=256000, hidden_size=2304,
                            intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0)
    _DEFAULT_PATTERN = 2


class Gemma3TextConfig(_SlidingGemmaConfig):
    """Configuration of a Gemma 3 text model (``model_type="gemma3_text"``): per-head q/k norms and
    two RoPEs, ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`` (the
    older flat ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` keys are folded in as
    transformers does). RoPE types "default" and "linear" are supported."""

    model_type = "gemma3_text"
    _generation = "Gemma 3"
    FIELDS = _with_defaults(GEMMA_FIELDS + SLIDING_FIELDS, vocab_size=262208, hidden_size=2304,
                            intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, max_position_embeddings=131072)
    _DEFAULT_PATTERN = 6
    _DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}

    @staticmethod
    def _standardize_rope(rope_parameters: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        # transformers' Gemma3TextConfig.convert_rope_params_to_dict.
        rope_scaling = kwargs.pop("rope_scaling", None)
        params = copy.deepcopy(rope_parameters) if rope_parameters is not None else {}
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict keyed by layer type, {_got(params)}")
        for layer_type in _LAYER_TYPES:
            if params.get(layer_type) is None:
                params[layer_type] = {"rope_type": "default"}
            if not isinstance(params[layer_type], dict):
                raise ValueError(f"rope_parameters[{layer_type!r}] must be a dict, {_got(params[layer_type])}")
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"rope_scaling must be a dict, {_got(rope_scaling)}")
            params["full_attention"].update(rope_scaling)
        theta = kwargs.pop("rope_theta", None)
        local = kwargs.pop("rope_local_base_freq", None)
        params["full_attention"].setdefault("rope_theta", theta if theta is not None else 1_000_000.0)
        params["sliding_attention"].setdefault("rope_theta", local if local is not None else 10_000.0)
        for layer_type in _LAYER_TYPES:
            p = params[layer_type]
            p.setdefault("rope_type", p.get("type", "default"))
            if _is_int(p["rope_theta"]):
                p["rope_theta"] = float(p["rope_theta"])
        return params

    def _validate_rope(self) -> None:
        for layer_type, p, kind in rope_by_layer_type(self.rope_parameters, ("default", "linear"),
                                                      "the engine implements 'default' and 'linear' RoPE"):
            if kind == "linear":
                factor = p.get("factor")
                if not _is_real(factor) or not math.isfinite(factor) or factor <= 0:
                    raise ValueError(
                        f"rope_parameters[{layer_type!r}]['factor'] must be a positive float for linear RoPE, {_got(factor)}"
                    )

    def rope(self, layer_type: str) -> Tuple[float, float]:
        """(base, linear scaling factor) of a layer type's RoPE."""
        p = self.rope_parameters[layer_type]
        factor = float(p.get("factor", 1.0)) if p.get("rope_type", "default") == "linear" else 1.0
        return float(p["rope_theta"]), factor

    @property
    def rope_theta(self) -> float:
        return self.rope("full_attention")[0]

    def num_parameters(self, include_embedding: bool = True) -> int:
        # Per-head q and k norms.
        return super().num_parameters(include_embedding) + 2 * self.head_dim * self.num_hidden_layers




def config_class(model_type: Any, where: str = "config.json") -> type:
    """The config class of a model_type, or a ValueError naming the supported ones."""
    if model_type in CONFIG_CLASSES:
        return CONFIG_CLASSES[model_type]
    hint = ""
    if model_type == "gemma3":
        hint = ("; this is a Gemma 3 multimodal checkpoint: gemma_cpp runs Gemma 3 text models "
                "(model_type 'gemma3_text', e.g. gemma-3-270m and gemma-3-1b)")
    raise ValueError(f"{where}: unsupported model_type {model_type!r}; supported: {sorted(CONFIG_CLASSES)}{hint}")


def rope_by_layer_type(params: Any, kinds: Tuple[str, ...], supported: str):
    """(layer type, its RoPE dict, its rope_type) for each layer type of rope_parameters keyed by
    layer type (Gemma 3 and 4), each checked: a dict with a rope_type of `kinds` (`supported`
    says what runs) and a positive rope_theta; ValueError naming the key otherwise."""
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict, {_got(params)}")
    for layer_type in _LAYER_TYPES:
        p = params.get(layer_type)
        if not isinstance(p, dict):
            raise ValueError(f"rope_parameters[{layer_type!r}] must be a dict, {_got(p)}")
        kind = p.get("rope_type", "default")
        if kind not in kinds:
            raise ValueError(f"rope_parameters[{layer_type!r}]['rope_type']={kind!r} is not supported: {supported}")
        theta = p.get("rope_theta")
        if not _is_real(theta) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"rope_parameters[{layer_type!r}]['rope_theta'] must be a positive float, {_got(theta)}")
        yield layer_type, p, kind


def _starts_as_gguf(path: str) -> bool:
    # formats.gguf.is_gguf's test, here so that reading a config.json imports neither the GGUF
    # reader nor numpy (the GGUF path imports them when taken).
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def config_from_gguf(g) -> GemmaConfig:
    """The config of an open GGUF file (formats.gguf.GGUFFile), in the class of its generation."""
    from .formats.gguf_config import config_dict

    data = config_dict(g)
    target = config_class(data.pop("model_type"), g.path)
    return target(**data)


def load_config(pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> GemmaConfig:
    """Reads a checkpoint's config.json with the class its model_type names (Gemma 1, 2 or 3),
    or a GGUF file's metadata (a path to it, or a folder and gguf_file=)."""
    path = os.fspath(pretrained_model_name_or_path)
    if kwargs.get("gguf_file") is not None or _starts_as_gguf(path):
        return GemmaConfig.from_pretrained(path, **kwargs)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    model_type = "gemma"
    if os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as reader:
                data = json.load(reader)
            if isinstance(data, dict):
                model_type = data.get("model_type", "gemma")
        except (OSError, ValueError):
            pass  # GemmaConfig.from_pretrained reports the problem
    return config_class(model_type, file).from_pretrained(path, **kwargs)

