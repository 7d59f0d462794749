"""The loading layer: a model from wherever it comes from, as one LoadedModel (layout.py).

One module per source, each with a `load` that returns a LoadedModel:
  hf             a Hugging Face checkpoint folder (safetensors, sharded, or pytorch_model.bin)
  gguf           a GGUF file (Gemma 1/2/3)
  engine_format  our own folder (`gemma-cpp convert`), read by mmap
  original       a gemma_pytorch checkpoint
layout.py holds what they share: the engine's tensor names and shapes per generation, its
EngineConfig, LoadedModel. `load` below picks the source for a path.

Imports run one way: cli -> modeling -> loading -> (config, tokenizer, quant, generation,
formats) -> _C.
"""
from __future__ import annotations

import os
from typing import Optional

from .._dtypes import canonical_dtype
from ..config import GemmaConfig
from ..formats.gguf import is_gguf
from . import engine_format, gguf, hf
from .layout import LoadedModel, engine_config

__all__ = ["LoadedModel", "engine_config", "load"]


def load(path, dtype=None, quantization="auto", config: Optional[GemmaConfig] = None,
         gguf_file: Optional[str] = None) -> LoadedModel:
    """A Hugging Face checkpoint folder, a folder `gemma-cpp convert` wrote, or a GGUF file (a
    path to it, or a folder and gguf_file=). Arguments as GemmaPreTrainedModel.from_pretrained's;
    bad names fail before any file is read."""
    path = os.fspath(path)
    if gguf_file is not None:
        path = os.path.join(path, os.fspath(gguf_file))
    if dtype is not None and dtype != "auto":
        canonical_dtype(dtype)
    if is_gguf(path):
        return gguf.load(path, dtype, quantization, config)
    if gguf_file is not None:
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder or GGUF file (expected a checkpoint folder with "
                                "config.json and model.safetensors, or a .gguf file; gemma_cpp never "
                                "downloads from a hub)")
    if isinstance(quantization, str) and quantization == "auto":
        quantization = None
    if engine_format.is_engine_checkpoint(path):
        return engine_format.load(path, dtype, quantization, config)
    return hf.load(path, dtype, quantization, config)
