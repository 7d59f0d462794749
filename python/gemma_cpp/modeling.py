"""GemmaModel and its three heads over the compiled engine.

Python owns names, configs, shapes and the small classification heads; the engine owns
every weight byte of the decoder and runs a whole forward (or a whole `generate`) per call,
with the GIL released."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from ._C import Engine, SamplingParams
from ._dtypes import as_float32
from .config import GemmaConfig
from .generation import GenerationConfig
from .loading import LoadedModel, engine_config, load
from .loading.layout import weight_formats
from .tokenizer.base import _check_return_tensors  # the tokenizers' rule: None, 'np', 'pt' or a TensorType


KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


class ModelOutput(dict):
    """A dict whose keys are also attributes (`out.logits`, `out["logits"]`), like
    transformers' ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _tensors(out, return_tensors, device: str = "cpu"):
    """out (an array or tensor, a tuple of them, or a ModelOutput of either) as return_tensors
    asks: numpy as it is, or torch tensors on the same memory (DLPack: nothing is copied), on
    the model's device (host arrays of a GPU model, such as token ids, are copied there)."""
    if return_tensors != "pt" or out is None:
        return out
    if isinstance(out, ModelOutput):
        return ModelOutput({k: _tensors(v, return_tensors, device) for k, v in out.items()})
    if isinstance(out, tuple):
        return tuple(_tensors(v, return_tensors, device) for v in out)
    try:
        import torch
    except ImportError as e:
        raise ImportError("return_tensors='pt' needs torch; install it or use return_tensors='np'") from e
    t = torch.from_dlpack(out)
    return t if device == "cpu" else t.to(device)


def parse_device(device) -> str:
    """'cpu', 'cuda' or 'cuda:N' (a torch.device works too), checked, as 'cpu' or 'cuda:N': on
    a machine where CUDA cannot run, 'cuda' raises RuntimeError saying why
    (gemma_cpp.cuda_status()); an index past the device count raises ValueError."""
    if device is None:
        return "cpu"
    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    from .cuda import cuda_status

    st = cuda_status()
    if not st["available"]:
        raise RuntimeError(f"device={text!r}: CUDA cannot run here: {st['reason']}")
    n = int(index or 0)
    if n >= st["device_count"]:
        raise ValueError(f"device={text!r}: this machine has {st['device_count']} CUDA device(s)")
    return f"cuda:{n}"


def _as_ids(x, name: str) -> np.ndarray:
    """int32 [B, L] from a list, a numpy array or a torch tensor (1-D means one row)."""
    if x is None:
        raise ValueError(f"{name} is required")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except ValueError:
        raise ValueError(f"{name}: rows have different lengths; pad them (tokenizer(..., padding=True))") from None
    if a.dtype == object:
        raise ValueError(f"{name}: rows have different lengths; pad them (tokenizer(..., padding=True))")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.bool_):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name}: values out of range")
    return np.ascontiguousarray(a, dtype=np.int32)


class GemmaPreTrainedModel:
    """Shared loading and the engine's forward; the subclasses add their head."""

    def __init__(self, loaded: LoadedModel, kv_cache_dtype: str = "float32", device="cpu"):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        self.device = parse_device(device)
        self.config: GemmaConfig = loaded.config
        # dtype: the float dtype of the activations and of every weight not quantized, as
        # transformers' dtype of a quantized model is its compute dtype; quantization: what each
        # group of weights runs as (loading.layout.weight_formats).
        self.dtype = loaded.dtype
        self.quantization = weight_formats(loaded.weights)
        self.name_or_path = loaded.name_or_path
        self.generation_config: GenerationConfig = loaded.generation_config
        self.kv_cache_dtype = kv_cache_dtype
        self._engine = Engine(engine_config(loaded.config, loaded.dtype, kv_cache_dtype), loaded.weights, self.device)
        self._load_head(loaded.name_or_path, loaded.heads)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=None, config: Optional[GemmaConfig] = None,
                        torch_dtype=None, quantization="auto", kv_cache_dtype: str = "float32",
                        gguf_file: Optional[str] = None, device=None, **kwargs):
        """Load a Hugging Face checkpoint folder (config.json + safetensors), a folder that
        `gemma-cpp convert` wrote, or a GGUF file (a path to it, or a folder and gguf_file=).

        dtype: 'float32', 'bfloat16', or None / 'auto' for the checkpoint's (float16 runs as
        float32). bfloat16 weights are used in place from the file's memory map.

        quantization: None, 'int8', 'int4' or 'int4m' (every linear layer and the embedding / LM head;
        norms stay float32), or a dict by group, e.g. {'layers': 'int4', 'embed': 'int8'}
        (groups: embed, attention, mlp, or layers for both). Unnamed groups keep dtype.
        'auto' (the default): none for a Hugging Face checkpoint; for a GGUF file every tensor
        in its own type, without loss: Q8_0 and Q5_0 as int8, Q4_0 as int4, Q4_1 as int4m,
        Q4_K / Q5_K / Q6_K as q4_k / q5_k / q6_k, float tensors as float; Q2_K and Q3_K are
        read exactly and quantized to int8 (a warning says so). None dequantizes a GGUF file
        to dtype (float32 by default).

        kv_cache_dtype: 'float32' (as transformers' float32 model), 'bfloat16' (half the
        memory for long prompts; keys and values rounded to bf16) or 'int8' (a quarter and a
        bit: blocks of 32 values with one fp16 scale, the values of GGUF's Q8_0; needs a
        head_dim that is a multiple of 32).

        device: 'cpu' (the default), 'cuda' or 'cuda:N': the weights are uploaded to that GPU
        once and every forward, generate() and head runs there; outputs come back as numpy
        (or, with return_tensors='pt', torch tensors on the CPU). float32, bfloat16, int8 and
        int4 weights run on CUDA, with a float32 or bfloat16 KV cache; int4m and the K-quants
        raise ValueError (quantize to int8 / int4 instead). Where CUDA cannot run, 'cuda' raises
        RuntimeError saying why, before any weight is read."""
        device = parse_device(device)  # before any weight is read
        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected argument(s): {', '.join(kwargs)}")
        if dtype is None and torch_dtype is not None:
            dtype = torch_dtype
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        loaded = load(pretrained_model_name_or_path, dtype=dtype, quantization=quantization, config=config,
                      gguf_file=gguf_file)
        return cls(loaded, kv_cache_dtype, device)

    def _load_head(self, name_or_path, heads):
        pass

    def _prepare(self, input_ids, attention_mask):
        ids = _as_ids(input_ids, "input_ids")
        mask = None if attention_mask is None else _as_ids(attention_mask, "attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match")
        if ids.shape[1] == 0:
            raise ValueError("input_ids: sequences must hold at least one token")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: length {ids.shape[1]} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids, mask

    def _run(self, ids, mask, output: str, last_only: bool = False, output_hidden_states: bool = False,
             return_tensors=None):
        """(the output, every layer's hidden states or None). The output is numpy; with
        return_tensors='pt' on a device with memory of its own (a GPU), a torch tensor left in
        that memory (DLPack, no copy), the hidden states then torch tensors on that device too."""
        # transformers' forward uses positions 0..L-1 whatever the mask says.
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
        on_device = return_tensors == "pt" and self._engine.device_name != "cpu"
        out, states = self._engine.forward(ids, mask, positions, output, last_only, output_hidden_states, on_device)
        if on_device:
            import torch

            out = torch.from_dlpack(out)
            if states is not None:
                states = torch.from_dlpack(states).to(out.device)
        return out, states

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def eval(self):
        """transformers' inference mode: a gemma_cpp model has no other, so this is the model."""
        return self

    def to(self, *args, **kwargs):
        """transformers' `to(device)`, `to(dtype)`, `to(device, dtype)`: the model itself when it
        already is on that device and runs in that dtype. Anything else raises ValueError saying
        how to load it so (the weights sit in the engine's layout for one device and format:
        moving them is a new load); a device CUDA cannot run on raises RuntimeError saying why."""
        from ._dtypes import canonical_dtype

        unknown = sorted(set(kwargs) - {"device", "dtype", "non_blocking", "copy"})
        if unknown:
            raise TypeError(f"to() got unexpected argument(s): {', '.join(unknown)}")
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            name = str(a)
            if name.startswith("torch.") or name.replace("torch.", "") in ("float32", "bfloat16", "float16", "float",
                                                                           "half", "fp32", "bf16", "f32"):
                dtype = a
            else:
                device = a
        if device is not None:
            target = parse_device(device)
            if target != self.device:
                raise ValueError(f"to({str(device)!r}): this model's weights are on {self.device}; load it there with "
                                 f"from_pretrained(..., device={target!r})")
        if dtype is not None:
            try:
                want = canonical_dtype(dtype)
            except ValueError:
                want = str(dtype).replace("torch.", "")
            if want != self.dtype:
                raise ValueError(f"to({str(dtype)!r}): this model runs in {self.dtype}; load it in another with "
                                 f"from_pretrained(..., dtype=...) or quantization=...")
        return self

    def __repr__(self):
        c = self.config
        return (f"{type(self).__name__}({self.name_or_path!r}, dtype={self.dtype}, quantization={self.quantization}, "
                f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, vocab={c.vocab_size})")


class GemmaModel(GemmaPreTrainedModel):
    """The decoder: `last_hidden_state` [B, L, hidden] after the final norm."""

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False, return_tensors=None):
        """last_hidden_state [B, L, hidden] (and with output_hidden_states, the embeddings' and
        every layer's output). return_tensors='pt': torch tensors on the same memory."""
        return_tensors = _check_return_tensors(return_tensors)
        ids, mask = self._prepare(input_ids, attention_mask)
        hidden, states = self._run(ids, mask, "hidden", output_hidden_states=output_hidden_states,
                                   return_tensors=return_tensors)
        out = ModelOutput(last_hidden_state=hidden)
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return _tensors(out, return_tensors, self.device)

    forward = __call__


class GemmaForCausalLM(GemmaPreTrainedModel):
    """Logits over the vocabulary through the tied embedding; `generate`."""

    def __call__(self, input_ids, attention_mask=None, logits_to_keep: int = 0, return_tensors=None):
        """logits [B, L, vocab] (numpy float32; return_tensors='pt': torch, on the same
        memory); logits_to_keep=1: the last position only."""
        return_tensors = _check_return_tensors(return_tensors)
        ids, mask = self._prepare(input_ids, attention_mask)
        if logits_to_keep not in (0, 1):
            raise ValueError("logits_to_keep must be 0 (all positions) or 1 (the last one)")
        logits, _ = self._run(ids, mask, "logits", last_only=logits_to_keep == 1, return_tensors=return_tensors)
        return _tensors(ModelOutput(logits=logits), return_tensors, self.device)

    forward = __call__

    def _sampling(self, generation_config: Optional[GenerationConfig] = None, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, **kwargs):
        """(the GenerationConfig with the model's defaults filled in and validated, the engine's
        SamplingParams for it): generate's arguments, and a scheduler request's (which may also
        set OpenAI's presence and frequency penalties, in [-2, 2])."""
        for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        gc = (generation_config or self.generation_config).updated(**kwargs)
        if gc.eos_token_id is None:
            gc.eos_token_id = self.config.eos_token_id
        if gc.pad_token_id is None:
            gc.pad_token_id = self.config.pad_token_id
        if gc.pad_token_id is None:
            eos = gc.eos_ids()
            gc.pad_token_id = eos[0] if eos else 0
        gc.validate()
        do_sample = bool(gc.do_sample) and gc.temperature > 0
        seed = gc.seed if gc.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        params = SamplingParams(
            max_new_tokens=int(gc.max_new_tokens), do_sample=do_sample, temperature=float(gc.temperature),
            top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            min_p=float(gc.min_p or 0.0), repetition_penalty=float(gc.repetition_penalty),
            eos_token_ids=gc.eos_ids(), pad_token_id=int(gc.pad_token_id), seed=seed,
            presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty))
        return gc, params

    def generate(self, input_ids=None, attention_mask=None, generation_config: Optional[GenerationConfig] = None,
                 streamer=None, callback: Optional[Callable[[np.ndarray], Any]] = None, return_tensors=None,
                 **kwargs) -> np.ndarray:
        """Prompt + new tokens, [B, L + steps] int64, as transformers' generate returns; with
        return_dict_in_generate=True an output with .sequences and (output_logits=True) .logits,
        a tuple of one [B, vocab] float32 array per step: the raw logits each token was drawn
        from (NaN in rows that had finished).

        Arguments as transformers': max_new_tokens, do_sample, temperature, top_k, top_p,
        min_p, repetition_penalty, eos_token_id, pad_token_id, and seed (same seed, same
        tokens). Rows that finish (eos) are filled with pad_token_id while others go on.
        streamer: an object with put(ids)/end() (transformers' TextStreamer works);
        callback: called with the new token of every row after each step. return_tensors='pt':
        the sequences (and logits) as torch tensors on the same memory."""
        return_tensors = _check_return_tensors(return_tensors)
        if isinstance(input_ids, dict):  # tokenizer output passed whole
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        gc, params = self._sampling(generation_config, **kwargs)
        ids, mask = self._prepare(input_ids, attention_mask)
        B, L = ids.shape
        eos = gc.eos_ids()
        if mask is None and gc.pad_token_id is not None and gc.pad_token_id not in eos and (ids == gc.pad_token_id).any():
            mask = (ids != gc.pad_token_id).astype(np.int32)  # as transformers infers it
        if mask is not None:
            m = mask != 0
            if (m[:, :-1] & ~m[:, 1:]).any():
                raise ValueError("generate needs left padding (a real token follows padding only): "
                                 "tokenize with padding_side='left'")
            if not m.any(axis=1).all():
                raise ValueError("attention_mask: a row has no real token")
        if L + gc.max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt length {L} + max_new_tokens {gc.max_new_tokens} exceeds "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        if streamer is not None:
            streamer.put(ids.astype(np.int64))

        def on_step(tokens):
            if streamer is not None:
                streamer.put(tokens.astype(np.int64))
            if callback is not None:
                callback(tokens)

        want_logits = gc.return_dict_in_generate and gc.output_logits
        new = self._engine.generate(ids, mask, params, on_step if (streamer or callback) else None, want_logits)
        if want_logits:
            new, logits = new
        if streamer is not None:
            streamer.end()
        sequences = np.concatenate([ids, new], axis=1).astype(np.int64)
        if not gc.return_dict_in_generate:
            return _tensors(sequences, return_tensors, self.device)
        return _tensors(ModelOutput(sequences=sequences, logits=tuple(logits) if want_logits else None),
                        return_tensors, self.device)


class _ScoreHead(GemmaPreTrainedModel):
    _bias = False

    def _load_head(self, folder, heads):
        if "score.weight" not in heads:
            raise ValueError(f"{folder}: missing tensor score.weight for {type(self).__name__}")
        w, dt = heads["score.weight"]
        n = self.config.num_labels
        if w.shape != (n, self.config.hidden_size):
            raise ValueError(f"{folder}: tensor 'score.weight' has shape {tuple(w.shape)}, expected "
                             f"({n}, {self.config.hidden_size}) (num_labels x hidden_size)")
        self._score_w = np.array(as_float32(w, dt), dtype=np.float32)
        self._score_b = None
        if self._bias:
            if "score.bias" not in heads:
                raise ValueError(f"{folder}: missing tensor score.bias for {type(self).__name__}")
            b, bdt = heads["score.bias"]
            if b.shape != (n,):
                raise ValueError(f"{folder}: tensor 'score.bias' has shape {tuple(b.shape)}, expected ({n},)")
            self._score_b = np.array(as_float32(b, bdt), dtype=np.float32)

    def _score(self, hidden: np.ndarray) -> np.ndarray:
        out = hidden @ self._score_w.T
        return out + self._score_b if self._score_b is not None else out


class GemmaForSequenceClassification(_ScoreHead):
    """`score` (no bias) at the rightmost non-pad token of each row: logits [B, num_labels]."""

    def __call__(self, input_ids, attention_mask=None, return_tensors=None):
        return_tensors = _check_return_tensors(return_tensors)
        ids, mask = self._prepare(input_ids, attention_mask)
        pad = self.config.pad_token_id
        B, L = ids.shape
        if pad is None:
            if B != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = np.full(B, L - 1)
        else:
            # transformers: the rightmost token that is not pad_token_id (left or right padding).
            last = (np.arange(L)[None, :] * (ids != pad)).argmax(axis=1)
        hidden, _ = self._run(ids, mask, "hidden")
        pooled = hidden[np.arange(B), last]
        return _tensors(ModelOutput(logits=self._score(pooled)), return_tensors, self.device)

    forward = __call__


class GemmaForTokenClassification(_ScoreHead):
    """`score` (with bias) at every position: logits [B, L, num_labels]."""

    _bias = True

    def __call__(self, input_ids, attention_mask=None, return_tensors=None):
        return_tensors = _check_return_tensors(return_tensors)
        ids, mask = self._prepare(input_ids, attention_mask)
        hidden, _ = self._run(ids, mask, "hidden")
        return _tensors(ModelOutput(logits=self._score(hidden)), return_tensors, self.device)

    forward = __call__
