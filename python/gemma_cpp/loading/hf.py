"""Hugging Face checkpoint folders: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json (pytorch_model.bin through torch, when installed), turned into
the engine's weights: names and shapes checked against the config, norms as (1 + w) (Gemma 4's as w), matrices
in the engine's dtype or quantized by the policy."""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from .._dtypes import as_engine_dtype, as_float32, canonical_dtype
from ..config import GemmaConfig, load_config
from ..formats.safetensors import SafetensorsFile
from ..generation import GenerationConfig
from ..quant import format_for, resolve_policy
from .layout import FLOAT_MATRICES, STACKED, LoadedModel, check_quantizable, is_norm, quantized, tensor_shapes

# Tensors of a decoder layer: engine name -> transformers name (under model.layers.N.).
# Gemma 1 norms the MLP's input with the tensor Gemma 2/3 apply to the attention's output.
_LAYER_NAMES = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "layer_scalar": "layer_scalar",  # Gemma 4: a [1] buffer, no .weight
    "ple_gate": "per_layer_input_gate.weight",
    "ple_out": "per_layer_projection.weight",
    "ple_post_norm": "post_per_layer_input_norm.weight",
    "router": "router.proj.weight",
    "router_scale": "router.scale",
    "expert_scale": "router.per_expert_scale",
    "experts_gate_up": "experts.gate_up_proj",  # [E, 2 I, H] in the file, [E * 2 I, H] in the engine
    "experts_down": "experts.down_proj",  # [E, H, I] in the file, [E * H, I] in the engine
    "moe_pre_norm": "pre_feedforward_layernorm_2.weight",
    "moe_dense_norm": "post_feedforward_layernorm_1.weight",
    "moe_post_norm": "post_feedforward_layernorm_2.weight",
}
# Gemma 4's model-level tensors of the per-layer input embeddings: engine name -> transformers name.
_PLE_NAMES = {"ple_embed": "embed_tokens_per_layer.weight", "ple_proj": "per_layer_model_projection.weight",
              "ple_norm": "per_layer_projection_norm.weight"}
_GEMMA1_MLP_NORM = "post_attention_layernorm.weight"
# Heads' tensors: loaded by the class that has the head, ignored (as transformers warns
# and ignores them) by the others.
HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias")


def layer_names(c: GemmaConfig, per_layer: Dict[str, Tuple[int, ...]]) -> Dict[str, str]:
    """A decoder layer's tensors (per_layer: its {engine name: shape}, layout.tensor_shapes):
    engine name -> transformers name."""
    names = {short: _LAYER_NAMES[short] for short in per_layer}
    if c.model_type == "gemma":
        names["mlp_norm"] = _GEMMA1_MLP_NORM
    return names


def expected_shapes(c: GemmaConfig, tensors=None) -> Dict[str, Tuple[int, ...]]:
    """Every base-model tensor of a checkpoint for this config: transformers name (without the
    `model.` prefix) -> shape. tensors: layout.tensor_shapes(c), when the caller has it."""
    model_level, layers = tensors or tensor_shapes(c)
    shapes = {"embed_tokens.weight": (c.vocab_size, c.hidden_size), "norm.weight": (c.hidden_size,)}
    for name, shape in model_level.items():
        shapes[_PLE_NAMES[name]] = shape
    for i, per_layer in enumerate(layers):
        for short, name in layer_names(c, per_layer).items():
            shape = per_layer[short]
            if short in STACKED:
                shape = (c.num_experts, shape[0] // c.num_experts, shape[1])
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


# A Gemma 4 multimodal checkpoint (Gemma4ForConditionalGeneration) keeps its text decoder under
# model.language_model. and its towers beside it; the engine runs the text decoder.
_TEXT_PREFIX = "model.language_model."
_TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


class Checkpoint:
    """All tensors of a checkpoint folder by name, read lazily from their files.

    `get(name)` returns (array, dtype name) where the array is a view into the file's
    memory map when possible (bfloat16 as uint16 bits)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where: Dict[str, object] = {}
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            self._read_index(index)
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            for n in f.names():
                self._where[n] = f
        elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
            self._read_bin(os.path.join(folder, "pytorch_model.bin"))
        else:
            raise FileNotFoundError(
                f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                "(expected a Hugging Face checkpoint folder, as written by save_pretrained)")

    def _read_index(self, index: str):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object")
        files: Dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard name {shard!r} for {name!r} must be a file in the folder")
            if shard not in files:
                files[shard] = SafetensorsFile(os.path.join(self.folder, shard))
            if name not in files[shard]:
                raise ValueError(f"{index}: tensor {name!r} is not in shard {shard}")
            self._where[name] = files[shard]

    def _read_bin(self, path: str):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path}: reading pytorch_model.bin needs torch (pip install torch); "
                              "safetensors checkpoints do not") from None
        # weights_only: never execute code from the file.
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch's unpickler: refuses code, reports corrupt files
            raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: expected a dict of tensors")
        self._torch = {}
        for name, t in sd.items():
            if t.dtype == torch.bfloat16:
                self._torch[name] = (t.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16")
            else:
                self._torch[name] = (t.contiguous().numpy(), str(t.dtype).replace("torch.", ""))
            self._where[name] = None

    def names(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def shape_of(self, name: str) -> Tuple[int, ...]:
        f = self._where[name]
        return f.shape_of(name) if f is not None else tuple(self._torch[name][0].shape)

    def get(self, name: str) -> Tuple[np.ndarray, str]:
        f = self._where[name]
        if f is None:
            return self._torch[name]
        return f.get(name), f.dtype_of(name)

    def release(self, name: str) -> None:
        """See SafetensorsFile.release (a no-op for .bin checkpoints)."""
        f = self._where[name]
        if f is not None:
            f.release(name)

    def file_of(self, name: str) -> str:
        f = self._where[name]
        return f.path if f is not None else os.path.join(self.folder, "pytorch_model.bin")


def engine_weights(source, config: GemmaConfig, dtype: Optional[str], policy: Dict[str, Optional[str]],
                   where: str):
    """Checks a checkpoint's names and shapes against the config and gives the engine's weights
    (layout.py), norms as (1 + w). source: a Checkpoint, or anything with its names() /
    shape_of / get / release / file_of. policy: quant.resolve_policy's {group: format}.
    Returns (weights, float weight dtype, the head tensors found {name: (array, dtype)})."""
    if config.activation != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: activation {config.activation!r} is not supported (Gemma uses gelu_pytorch_tanh)")
    tensors = tensor_shapes(config)  # the engine's list, read once
    expected = expected_shapes(config, tensors)
    # Accept both a base-model checkpoint (embed_tokens.weight) and a head's (model.embed_tokens.weight).
    names = {}
    unexpected, heads, towers = [], {}, []
    for name in source.names():
        if name in HEAD_TENSORS:
            heads[name] = name
            continue
        if name.startswith(_TOWERS):
            towers.append(name)
            continue
        base = (name[len(_TEXT_PREFIX):] if name.startswith(_TEXT_PREFIX)
                else name[len("model."):] if name.startswith("model.") else name)
        if base in expected:
            names[base] = name
        elif base.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; recomputed here
        else:
            unexpected.append(name)
    missing = [n for n in expected if n not in names]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise ValueError(f"{where}: checkpoint does not match its config.json ({'; '.join(parts)})")
    if towers:
        warnings.warn(f"{where}: the text decoder only: {len(towers)} tensors of the vision and audio towers are "
                      "left out (gemma_cpp runs text)", UserWarning, stacklevel=3)
    for base, name in names.items():
        shape = source.shape_of(name)
        if tuple(shape) != expected[base]:
            raise ValueError(f"{source.file_of(name)}: tensor {name!r} has shape {tuple(shape)}, "
                             f"expected {expected[base]} from config.json")
        _, dt = source.get(name)
        if dt not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{source.file_of(name)}: tensor {name!r} has dtype {dt}; "
                             "expected float32, bfloat16 or float16")

    embed_dtype = source.get(names["embed_tokens.weight"])[1]
    if dtype is None or dtype == "auto":
        target = "bfloat16" if embed_dtype == "bfloat16" else "float32"
    else:
        target = canonical_dtype(dtype)

    def matrix(name, engine_name):
        a, dt = source.get(name)
        if a.ndim == 3:  # the experts' stacked matrices, one after the other
            a = a.reshape(-1, a.shape[-1])
        fmt = format_for(policy, engine_name)
        if fmt is None:
            out = as_engine_dtype(a, dt, target)
        else:
            check_quantizable(name, engine_name, a.shape, fmt, config, where)
            out = quantized(a if dt == "bfloat16" else as_float32(a, dt), fmt)  # bf16 bits are read as bf16
        if not (isinstance(out, np.ndarray) and np.may_share_memory(out, a)):
            source.release(name)  # converted: the file's pages need not stay resident
        return out

    # HF stores a norm's w; Gemma 1-3 multiply by 1 + w, Gemma 4 by w (its layer scalar too).
    plus_one = np.float32(0.0 if config.model_type == "gemma4_text" else 1.0)

    def norm(name):
        a, dt = source.get(name)
        return np.ascontiguousarray(as_float32(a, dt) + plus_one)

    def float_matrix(name):  # in the float dtype, never quantized (layout.FLOAT_MATRICES)
        a, dt = source.get(name)
        out = as_engine_dtype(a, dt, target)
        if not np.may_share_memory(out, a):
            source.release(name)
        return out

    weights = {"embed": matrix(names["embed_tokens.weight"], "embed"), "final_norm": norm(names["norm.weight"])}
    for engine_name in tensors[0]:
        name = names[_PLE_NAMES[engine_name]]
        weights[engine_name] = norm(name) if is_norm(engine_name) else matrix(name, engine_name)
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in heads:
            raise ValueError(f"{where}: config.json says tie_word_embeddings=false but the checkpoint "
                             "has no lm_head.weight")
        shape = tuple(source.shape_of("lm_head.weight"))
        if shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"{source.file_of('lm_head.weight')}: tensor 'lm_head.weight' has shape {shape}, "
                             f"expected {(config.vocab_size, config.hidden_size)}")
        weights["lm_head"] = matrix("lm_head.weight", "lm_head")
    for i in range(config.num_hidden_layers):
        for short, name in layer_names(config, tensors[1][i]).items():
            engine_name, name = f"layers.{i}.{short}", names[f"layers.{i}.{name}"]
            weights[engine_name] = (norm(name) if is_norm(engine_name) else float_matrix(name)
                                    if short in FLOAT_MATRICES else matrix(name, engine_name))
    return weights, target, {k: source.get(k) for k in heads if k != "lm_head.weight"}


def load(folder: str, dtype: Optional[str] = None, quantization=None,
         config: Optional[GemmaConfig] = None) -> LoadedModel:
    """A Hugging Face checkpoint folder. quantization: None, a format name or a policy dict
    (quant.resolve_policy); dtype: 'float32', 'bfloat16', or None / 'auto' for the
    checkpoint's (float16 runs as float32)."""
    policy = resolve_policy(quantization)  # fail on a bad name before reading gigabytes
    config = config or load_config(folder)
    weights, target, heads = engine_weights(Checkpoint(folder), config, dtype, policy, folder)
    return LoadedModel(config=config, weights=weights, dtype=target, quantization=policy, heads=heads,
                       generation_config=GenerationConfig.from_pretrained(folder), tokenizer=folder,
                       name_or_path=folder)
