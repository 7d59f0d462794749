"""gemma_cpp's own checkpoint: the engine's weights already in its layout (quantized or
not) in one safetensors file, loaded by mmap without a copy, beside config.json and the
tokenizer files. `gemma-cpp convert` writes it; from_pretrained reads it.

model.safetensors holds tensors under the engine's names (embed, lm_head, final_norm,
layers.N.{q,k,v,o,gate,up,down,attn_norm,mlp_norm}) and the heads' (score.weight, score.bias):
  float matrices as F32 or BF16; norms as F32 holding (1 + w), ready for the engine;
  quantized matrices as NAME.quants (U8) and NAME.scales (U16: fp16 bits), and for int4m
  NAME.mins (U16: fp16 bits); K-quants (q4_k, q5_k, q6_k) as NAME.quants alone (their scales
  are inside); rows in the engine's 16-row interleaved groups, see quant.py.
  (The tensor names are the engine's: layout.py.)
__metadata__ (strings): format "gemma_cpp", format_version, dtype (the float weight dtype),
quantization (JSON policy), formats (JSON {name: int8 | int4 | int4m | q4_k | q5_k | q6_k}).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

from .._dtypes import as_float32, canonical_dtype
from ..config import load_config
from ..formats.gguf import is_gguf
from ..formats.safetensors import SafetensorsFile, write_safetensors
from ..generation import GenerationConfig
from ..quant import ALL_FORMATS, KQUANTS, QuantizedWeight, resolve_policy
from ..tokenizer import GemmaTokenizer
from . import gguf, hf
from .layout import LoadedModel, interleaved

FORMAT = "gemma_cpp"
# Version 2 added int4m tensors (NAME.mins). Version 3 stores quantized rows in the engine's
# 16-row interleaved groups (quant.py); versions 1 and 2 held plain rows, which load by a copy
# into that order. Version 4 added the K-quants (NAME.quants alone). A file is written with
# the lowest version that holds its tensors (without quantized tensors: 1, which every
# release reads).
VERSION = "4"
READABLE_VERSIONS = ("1", "2", "3", "4")
WEIGHTS = "model.safetensors"
# Files carried over from the source folder when present (config.json is rewritten).
CARRY = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def is_engine_checkpoint(folder: str) -> bool:
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path) or os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return False
    return SafetensorsFile(path).metadata.get("format") == FORMAT


def progress_bar(done: int, total: int, name: str, stream=sys.stderr) -> None:
    width = 30
    filled = width * done // total
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:40s}")
    if done == total:
        stream.write("\n")
    stream.flush()


def move_into_place(new: str, out: str) -> None:
    """Renames the finished folder `new` to `out` (same parent). An existing `out` (the caller
    checked --force) is moved aside first and deleted only once `new` is in place."""
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".gemma-cpp-old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "x"))
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def refuse_to_overwrite(out: str, force: bool) -> str:
    """The absolute path of an output folder, or FileExistsError when it exists and not force."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (pass --force / force=True to replace it)")
    return out


def save(src: str, out: str, dtype=None, quantization=None, force: bool = False, progress=progress_bar) -> str:
    """Convert a Hugging Face checkpoint folder or a GGUF file to our format in folder `out`.
    Written under a temporary name beside it and renamed at the end; an existing `out` is
    replaced only with force=True. quantization as from_pretrained's ("auto" for a GGUF file
    when None; "none" keeps floats)."""
    out = refuse_to_overwrite(out, force)
    src = os.fspath(src)
    if is_gguf(src):
        loaded = gguf.load(src, dtype, "auto" if quantization is None else None if quantization == "none"
                           else quantization)
        return write(loaded, out, progress)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such checkpoint folder or GGUF file")
    return write(hf.load(src, dtype, None if quantization in ("auto", "none") else quantization), out, progress)


def _tokenizer_files(loaded: LoadedModel, tmp: str) -> None:
    """The tokenizer and generation settings beside the weights: a folder's files as they are,
    a GGUF file's vocabulary rebuilt as tokenizer.model and its stop ids and sampling defaults
    as generation_config.json."""
    src = loaded.tokenizer
    if src is not None and os.path.isdir(src):
        for name in CARRY:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        return
    if src is not None:
        GemmaTokenizer.from_pretrained(src).save_pretrained(tmp)
    gc = loaded.generation_config
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gc.to_file_dict(), f, indent=2)


def write(loaded: LoadedModel, out: str, progress=progress_bar, extra=_tokenizer_files) -> str:
    """Writes a loaded model to folder `out` in our format: under a temporary name beside it,
    then moved into place (the caller decided whether `out` may be replaced). extra(loaded,
    folder) adds the tokenizer's files."""
    tensors, formats = [], {}
    for name, v in loaded.weights.items():
        if isinstance(v, tuple):
            v = QuantizedWeight.of(v)
            formats[name] = v.format
            tensors.append((name + ".quants", v.quants, "U8"))
            if v.scales is not None:
                tensors.append((name + ".scales", v.scales, "U16"))
            if v.mins is not None:
                tensors.append((name + ".mins", v.mins, "U16"))
        else:
            tensors.append((name, v, "BF16" if v.dtype == np.uint16 else "F32"))
    for name, (arr, dt) in loaded.heads.items():
        tensors.append((name, np.ascontiguousarray(as_float32(arr, dt)), "F32"))
    version = "1" if not formats else VERSION if set(formats.values()) & set(KQUANTS) else "3"
    metadata = {"format": FORMAT, "format_version": version, "dtype": loaded.dtype,
                "quantization": json.dumps(loaded.quantization), "formats": json.dumps(formats)}
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gemma-cpp-convert-", dir=parent)
    try:
        write_safetensors(os.path.join(tmp, WEIGHTS), tensors, metadata, progress)
        loaded.config.save_pretrained(tmp)
        extra(loaded, tmp)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tensor_bytes_by_format(folder: str) -> dict:
    """{weight format: bytes} of a folder in our format (float matrices by dtype, norms and
    heads as F32), or {} when the folder is not one."""
    if not is_engine_checkpoint(folder):
        return {}
    f = SafetensorsFile(os.path.join(folder, WEIGHTS))
    formats = json.loads(f.metadata.get("formats", "{}"))
    out = {}
    for name in f.names():
        base = name.rsplit(".", 1)[0] if name.endswith((".quants", ".scales", ".mins")) else name
        kind = formats.get(base) or {"F32": "float32", "BF16": "bfloat16"}.get(f.dtype_of(name), f.dtype_of(name))
        out[kind] = out.get(kind, 0) + f.get(name).nbytes
    return out


def load(folder: str, dtype=None, quantization=None, config=None) -> LoadedModel:
    """A folder in our format: the engine's weights as views into the file's memory map.
    Quantized tensors of version 1 and 2 files (plain rows) are copies in the engine's row
    order instead: converting such a file again makes it load by mmap. dtype and quantization,
    when given, must be what the file was converted with."""
    path = os.path.join(folder, WEIGHTS)
    f = SafetensorsFile(path)
    meta = f.metadata
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: gemma_cpp format version {version!r} is not one this gemma_cpp reads "
                         f"({', '.join(READABLE_VERSIONS)}); convert the original checkpoint again")
    try:
        target = canonical_dtype(meta["dtype"])
        policy = json.loads(meta["quantization"])
        policy = policy if policy == "auto" else resolve_policy(policy)  # auto: chosen per GGUF tensor type
        formats = json.loads(meta["formats"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: damaged gemma_cpp metadata ({e})") from None
    if not isinstance(formats, dict) or any(v not in ALL_FORMATS for v in formats.values()):
        raise ValueError(f"{path}: damaged gemma_cpp metadata (formats)")
    if dtype not in (None, "auto") and canonical_dtype(dtype) != target:
        raise ValueError(f"{folder} was converted with dtype {target}; convert again for {dtype}")
    requested = None if quantization is None or quantization == "auto" else resolve_policy(quantization)
    if requested and any(requested.values()) and requested != policy:
        raise ValueError(f"{folder} was converted with quantization {policy}; convert again to change it")
    weights, heads = {}, {}
    names = set(f.names())
    for name in sorted(names):
        if name.endswith((".scales", ".mins")):
            continue
        if name.endswith(".quants"):
            base = name[: -len(".quants")]
            if base in formats and formats[base] in KQUANTS:
                weights[base] = QuantizedWeight(formats[base], f.get(name))
                continue
            if base not in formats or base + ".scales" not in names:
                raise ValueError(f"{path}: tensor {name!r} has no format or no scales")
            mins = None
            if formats[base] == "int4m":
                if base + ".mins" not in names:
                    raise ValueError(f"{path}: int4m tensor {base!r} has no {base + '.mins'!r}")
                mins = f.get(base + ".mins")
            weights[base] = QuantizedWeight(formats[base], f.get(name), f.get(base + ".scales"), mins)
            if version in ("1", "2"):  # plain rows: into the engine's order (a copy, not a view)
                weights[base] = interleaved(weights[base])
        elif name.startswith("score."):
            heads[name] = (f.get(name), f.dtype_of(name))
        else:
            weights[name] = f.get(name)
    return LoadedModel(config=config or load_config(folder), weights=weights, dtype=target, quantization=policy,
                       heads=heads, generation_config=GenerationConfig.from_pretrained(folder), tokenizer=folder,
                       name_or_path=folder)
