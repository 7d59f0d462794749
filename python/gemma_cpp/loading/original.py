"""Original gemma_pytorch checkpoints (the `model_state_dict` of a .ckpt / .pt file): loaded
for the engine through the Hugging Face names, or converted to a Hugging Face folder or to our
format.

gemma_pytorch names its tensors as transformers does (model.layers.N.self_attn.o_proj...,
model.norm.weight, norms centred on zero) except: q, k and v are one fused
`self_attn.qkv_proj.weight` whose rows are q (heads x head_dim), then k, then v (kv heads x
head_dim each); the embedding is `embedder.weight`; `freqs_cis` is a buffer. Its int8
variant stores every matrix as int8 `weight` plus a per-row float `weight_scaler`
(w = weight * scaler). The file is read with torch.load(weights_only=True): no code in it
ever runs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np

from ..config import GemmaConfig
from ..formats.safetensors import write_safetensors
from ..generation import GenerationConfig
from ..quant import resolve_policy
from ..tokenizer import GemmaTokenizer
from . import engine_format, hf
from .layout import LoadedModel

SIZES = {"2b": "gemma-2b", "7b": "gemma-7b"}


def _numpy(t, name: str, path: str):
    """(array, safetensors dtype) of a torch tensor: F32 as float32, BF16 as its bits."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16"
    if t.dtype in (torch.float32, torch.float16, torch.float64):
        return t.float().contiguous().numpy(), "F32"
    if t.dtype == torch.int8:
        return t.contiguous().numpy(), "I8"
    raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected float32, bfloat16 or int8")


def read_state_dict(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError("reading gemma_pytorch checkpoints needs torch (pip install torch==2.13.0)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from None
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict with a 'model_state_dict' of tensors")
    return sd


def to_hf_tensors(sd, config: GemmaConfig, path: str) -> Dict[str, tuple]:
    """{transformers name: (array, dtype)}; int8 matrices dequantized with their scalers."""
    import torch

    nH, nKV, hd, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    out = {}
    for name, t in sd.items():
        if name == "freqs_cis" or name.endswith("weight_scaler"):
            continue
        if t.dtype == torch.int8:
            scaler = sd.get(name + "_scaler")
            if scaler is None or scaler.shape != (t.shape[0],):
                raise ValueError(f"{path}: int8 tensor {name!r} needs a per-row {name}_scaler of shape ({t.shape[0]},)")
            t = t.float() * scaler.float()[:, None]
        hf = "model.embed_tokens.weight" if name == "embedder.weight" else name
        if "qkv_proj" in name:
            rows = (nH + 2 * nKV) * hd
            if tuple(t.shape) != (rows, H):
                raise ValueError(f"{path}: {name!r} has shape {tuple(t.shape)}, expected {(rows, H)} "
                                 f"(q, k, v rows for {nH} heads, {nKV} kv heads of {hd})")
            q, k, v = torch.split(t, [nH * hd, nKV * hd, nKV * hd], dim=0)
            for part, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                key = hf.replace("qkv_proj", part)
                out[key] = _numpy(tensor, key, path)
        else:
            out[hf] = _numpy(t, hf, path)
    return out


def read(ckpt: str, size: Optional[str] = None, config_path: Optional[str] = None):
    """(config, {transformers name: (array, safetensors dtype)}) of a gemma_pytorch checkpoint,
    checked against the config. size: '2b' or '7b' (the presets), or config_path: a
    config.json for other shapes."""
    if (size is None) == (config_path is None):
        raise ValueError("give exactly one of size ('2b' or '7b') and a config.json")
    if size is not None:
        if size.lower() not in SIZES:
            raise ValueError(f"unknown size {size!r}: expected one of {', '.join(SIZES)}")
        config = GemmaConfig.from_preset(SIZES[size.lower()])
    else:
        config = GemmaConfig.from_pretrained(config_path)
    tensors = to_hf_tensors(read_state_dict(ckpt), config, ckpt)
    expected = {"model." + k: v for k, v in hf.expected_shapes(config).items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k][0].shape)} (expected {expected[k]})" for k in expected
             if k in tensors and tuple(tensors[k][0].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{ckpt}: does not match the config: " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing[:6])}",
                              unexpected and f"unexpected {', '.join(unexpected[:6])}",
                              wrong and f"wrong shapes {', '.join(wrong[:6])}") if part))
    config.architectures = ["GemmaForCausalLM"]
    config.torch_dtype = "bfloat16" if any(dt == "BF16" for _, dt in tensors.values()) else "float32"
    return config, tensors


class _Tensors:
    """The tensors of a read checkpoint as hf.engine_weights reads a folder's."""

    _DTYPES = {"F32": "float32", "BF16": "bfloat16"}

    def __init__(self, tensors, path: str):
        self._t, self.path = tensors, path

    def names(self):
        return list(self._t)

    def shape_of(self, name):
        return tuple(self._t[name][0].shape)

    def get(self, name):
        a, dt = self._t[name]
        return a, self._DTYPES[dt]

    def release(self, name):
        pass

    def file_of(self, name):
        return self.path


def load(ckpt: str, size: Optional[str] = None, config_path: Optional[str] = None, dtype=None,
         quantization=None, tokenizer: Optional[str] = None) -> LoadedModel:
    """A gemma_pytorch checkpoint for the engine (a GemmaForCausalLM); tokenizer: where its
    tokenizer.model is, when there is one."""
    policy = resolve_policy(quantization)
    config, tensors = read(ckpt, size, config_path)
    weights, target, heads = hf.engine_weights(_Tensors(tensors, ckpt), config, dtype, policy, ckpt)
    return LoadedModel(config=config, weights=weights, dtype=target, quantization=policy, heads=heads,
                       generation_config=GenerationConfig(), tokenizer=tokenizer, name_or_path=ckpt)


def convert(ckpt: str, out: str, size: Optional[str] = None, config_path: Optional[str] = None,
            tokenizer: Optional[str] = None, to: str = "hf", quantization=None, dtype=None,
            force: bool = False, progress=None) -> str:
    """Write a Hugging Face folder (to='hf': config.json, model.safetensors, tokenizer files)
    or our format (to='gemma_cpp') from a gemma_pytorch checkpoint. size: '2b' or '7b' (the
    presets), or config_path: a config.json for other shapes."""
    if to not in ("hf", "gemma_cpp"):
        raise ValueError(f"to must be 'hf' or 'gemma_cpp', got {to!r}")
    out = engine_format.refuse_to_overwrite(out, force)

    def save_tokenizer(_, folder):
        if tokenizer is not None:
            GemmaTokenizer.from_pretrained(tokenizer).save_pretrained(folder)

    if to == "gemma_cpp":
        loaded = load(ckpt, size, config_path, dtype, quantization, tokenizer)
        return engine_format.write(loaded, out, progress=None, extra=save_tokenizer)
    config, tensors = read(ckpt, size, config_path)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gemma-cpp-convert-", dir=parent)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"),
                          [(k, a, dt) for k, (a, dt) in tensors.items()], {"format": "pt"}, progress)
        config.save_pretrained(tmp)
        save_tokenizer(None, tmp)
        engine_format.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
