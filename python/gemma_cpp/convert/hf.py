"""Hugging Face checkpoint folders: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json (pytorch_model.bin through torch, when installed)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from .safetensors_reader import SafetensorsFile


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
