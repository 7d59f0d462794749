"""GemmaModel and its three heads over the compiled engine.

Python owns names, configs, shapes and the small classification heads; the engine owns
every weight byte of the decoder and runs a whole forward (or a whole `generate`) per call,
with the GIL released."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from . import _C
from ._dtypes import as_engine_dtype, as_float32, canonical_dtype, round_to
from .config import GemmaConfig, load_config
from .convert import engine_format
from .convert import gguf_model
from .convert.gguf import GGUFFile
from .convert.hf import Checkpoint
from .generation import GenerationConfig
from .quant import format_for, resolve_policy


class ModelOutput(dict):
    """A dict whose keys are also attributes (`out.logits`, `out["logits"]`), like
    transformers' ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# Tensors of a decoder layer: engine name -> transformers name (under model.layers.N.).
_LAYER_TENSORS = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
}
# Gemma 1 norms the MLP's input with the tensor Gemma 2/3 use after the attention.
_GEMMA1_NORMS = {"mlp_norm": "post_attention_layernorm.weight"}
_SANDWICH_NORMS = {
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}
_QK_NORMS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
_NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")
# Heads' tensors: loaded by the class that has the head, ignored (as transformers warns
# and ignores them) by the others.
_HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias")


def layer_tensors(c: GemmaConfig) -> Dict[str, str]:
    """A decoder layer's tensors for this config's generation: engine name -> transformers name."""
    names = dict(_LAYER_TENSORS)
    if c.model_type == "gemma":
        names.update(_GEMMA1_NORMS)
    else:
        names.update(_SANDWICH_NORMS)
    if c.model_type == "gemma3_text":
        names.update(_QK_NORMS)
    return names


def layer_shapes(c: GemmaConfig) -> Dict[str, Tuple[int, ...]]:
    """Engine name -> shape of a decoder layer's tensors."""
    H, F, hd = c.hidden_size, c.intermediate_size, c.head_dim
    qd, kd = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = {"q": (qd, H), "k": (kd, H), "v": (kd, H), "o": (H, qd), "gate": (F, H), "up": (F, H),
              "down": (H, F), "q_norm": (hd,), "k_norm": (hd,)}
    return {short: shapes.get(short, (H,)) for short in layer_tensors(c)}


def _expected_shapes(c: GemmaConfig) -> Dict[str, Tuple[int, ...]]:
    per_layer = layer_shapes(c)
    shapes = {"embed_tokens.weight": (c.vocab_size, c.hidden_size), "norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        for short, name in layer_tensors(c).items():
            shapes[f"layers.{i}.{name}"] = per_layer[short]
    return shapes


def engine_weights(folder: str, config: GemmaConfig, dtype: Optional[str], ckpt: Checkpoint,
                   policy: Optional[Dict[str, Optional[str]]] = None):
    """Checks a Hugging Face checkpoint's names and shapes against the config and gives the
    engine's weights: {engine name: array, or (format, quants, scales)}, norms as (1 + w).
    policy: quant.resolve_policy's {group: format}. Returns (weights, float weight dtype,
    the head tensors found)."""
    policy = policy or resolve_policy(None)
    if config.activation != "gelu_pytorch_tanh":
        raise ValueError(f"{folder}: activation {config.activation!r} is not supported (Gemma uses gelu_pytorch_tanh)")
    expected = _expected_shapes(config)
    # Accept both a base-model checkpoint (embed_tokens.weight) and a head's (model.embed_tokens.weight).
    names = {}
    unexpected, heads = [], {}
    for name in ckpt.names():
        if name in _HEAD_TENSORS:
            heads[name] = name
            continue
        base = name[len("model."):] if name.startswith("model.") else name
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
        raise ValueError(f"{folder}: checkpoint does not match its config.json ({'; '.join(parts)})")
    for base, name in names.items():
        shape = ckpt.shape_of(name)
        if tuple(shape) != expected[base]:
            raise ValueError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {tuple(shape)}, "
                             f"expected {expected[base]} from config.json")
        _, dt = ckpt.get(name)
        if dt not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {dt}; "
                             "expected float32, bfloat16 or float16")

    embed_dtype = ckpt.get(names["embed_tokens.weight"])[1]
    if dtype is None or dtype == "auto":
        target = "bfloat16" if embed_dtype == "bfloat16" else "float32"
    else:
        target = canonical_dtype(dtype)

    def matrix(base, engine_name):
        name = names.get(base, base)
        a, dt = ckpt.get(name)
        fmt = format_for(policy, engine_name)
        if fmt is None:
            out = as_engine_dtype(a, dt, target)
        else:
            if a.shape[1] % 32:
                raise ValueError(f"{folder}: cannot quantize {base!r} to {fmt}: its input size {a.shape[1]} is not "
                                 "a multiple of 32 (the block size); leave that group unquantized")
            src = a if dt == "bfloat16" else np.ascontiguousarray(as_float32(a, dt))
            out = _C.quantize(np.ascontiguousarray(src), fmt)  # bf16 bits are read as bf16
        if not (isinstance(out, np.ndarray) and np.may_share_memory(out, a)):
            ckpt.release(name)  # converted: the file's pages need not stay resident
        return out

    def norm(base):
        a, dt = ckpt.get(names[base])
        return np.ascontiguousarray(as_float32(a, dt) + np.float32(1.0))  # HF stores w; the engine takes 1 + w

    weights = {"embed": matrix("embed_tokens.weight", "embed"), "final_norm": norm("norm.weight")}
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in heads:
            raise ValueError(f"{folder}: config.json says tie_word_embeddings=false but the checkpoint "
                             "has no lm_head.weight")
        shape = tuple(ckpt.shape_of("lm_head.weight"))
        if shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"{ckpt.file_of('lm_head.weight')}: tensor 'lm_head.weight' has shape {shape}, "
                             f"expected {(config.vocab_size, config.hidden_size)}")
        weights["lm_head"] = matrix("lm_head.weight", "lm_head")
    for i in range(config.num_hidden_layers):
        for short, name in layer_tensors(config).items():
            base = f"layers.{i}.{name}"
            name = f"layers.{i}.{short}"
            weights[name] = norm(base) if short in _NORMS else matrix(base, name)
    return weights, target, {k: ckpt.get(k) for k in heads if k != "lm_head.weight"}


def engine_config(config: GemmaConfig, target: str) -> dict:
    """The engine's view of a config; target is the float weight dtype (the embedding scale is
    rounded to it, as transformers does)."""
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_theta": float(config.rope_theta),
        "embed_scale": round_to(config.hidden_size ** 0.5, target),
        "attn_scale": float(np.float32(config.head_dim ** -0.5)),
        "causal": not bool(getattr(config, "use_bidirectional_attention", False) or False),
    }
    if config.model_type == "gemma":
        return out
    # Gemma 2 / 3.
    out.update(
        attn_scale=float(np.float32(config.query_pre_attn_scalar ** -0.5)),
        attn_softcap=float(config.attn_logit_softcapping or 0.0),
        final_softcap=float(config.final_logit_softcapping or 0.0),
        sandwich_norms=True,
        layer_windows=config.layer_windows(),
    )
    if config.model_type == "gemma3_text":
        (theta, factor), (theta_local, factor_local) = (config.rope("full_attention"),
                                                        config.rope("sliding_attention"))
        out.update(rope_theta=theta, rope_factor=factor, rope_theta_local=theta_local,
                   rope_factor_local=factor_local, qk_norm=True)
    return out


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

    _head = None  # names of head tensors this class loads

    def __init__(self, config: GemmaConfig, engine, dtype: str, folder: Optional[str] = None,
                 quantization: Optional[Dict[str, Optional[str]]] = None):
        self.config = config
        self.dtype = dtype
        self.quantization = quantization or resolve_policy(None)
        self.name_or_path = folder
        self._engine = engine
        self.generation_config = GenerationConfig.from_pretrained(folder) if folder else GenerationConfig()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=None, config: Optional[GemmaConfig] = None,
                        torch_dtype=None, quantization="auto", kv_cache_dtype: str = "float32",
                        gguf_file: Optional[str] = None, **kwargs):
        """Load a Hugging Face checkpoint folder (config.json + safetensors), a folder that
        `gemma-cpp convert` wrote, or a GGUF file (a path to it, or a folder and gguf_file=).

        dtype: 'float32', 'bfloat16', or None / 'auto' for the checkpoint's (float16 runs as
        float32). bfloat16 weights are used in place from the file's memory map.

        quantization: None, 'int8', 'int4' or 'int4m' (every linear layer and the embedding / LM head;
        norms stay float32), or a dict by group, e.g. {'layers': 'int4', 'embed': 'int8'}
        (groups: embed, attention, mlp, or layers for both). Unnamed groups keep dtype.
        'auto' (the default): none for a Hugging Face checkpoint; for a GGUF file, Q8_0
        tensors load as int8, Q4_0 as int4 and Q4_1 as int4m without loss, float tensors stay float, and
        other types (Q4_K, Q5_0, Q6_K, ...) are read exactly and quantized to int8. None
        dequantizes a GGUF file to dtype (float32 by default).

        kv_cache_dtype: 'float32' (as transformers' float32 model) or 'bfloat16' (half the
        memory for long prompts; keys and values rounded to bf16)."""
        if kwargs:
            raise TypeError(f"from_pretrained() got unexpected argument(s): {', '.join(kwargs)}")
        path = os.fspath(pretrained_model_name_or_path)
        if gguf_file is not None:
            path = os.path.join(path, os.fspath(gguf_file))
        if dtype is None and torch_dtype is not None:
            dtype = torch_dtype
        if dtype is not None and dtype != "auto":
            canonical_dtype(dtype)  # fail on a bad name before reading gigabytes
        if kv_cache_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"kv_cache_dtype must be 'float32' or 'bfloat16', got {kv_cache_dtype!r}")
        if os.path.isfile(path) and gguf_model.is_gguf(path):
            return cls._from_gguf(path, dtype, config, quantization, kv_cache_dtype)
        if gguf_file is not None:
            raise FileNotFoundError(f"{path}: no such GGUF file")
        folder = path
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder or GGUF file (expected a checkpoint folder with "
                                    "config.json and model.safetensors, or a .gguf file; gemma_cpp never "
                                    "downloads from a hub)")
        if isinstance(quantization, str) and quantization == "auto":
            quantization = None
        policy = resolve_policy(quantization)  # fail on a bad name before reading gigabytes
        config = config or load_config(folder)
        if engine_format.is_engine_checkpoint(folder):
            weights, target, file_policy, heads = engine_format.load(folder, dtype, policy)
            policy = file_policy
        else:
            weights, target, heads = engine_weights(folder, config, dtype, Checkpoint(folder), policy)
        ecfg = dict(engine_config(config, target), kv_cache_dtype=kv_cache_dtype)
        model = cls(config, _C.Engine(ecfg, weights), target, folder, policy)
        model.kv_cache_dtype = kv_cache_dtype
        model._load_head(folder, heads)
        return model

    @classmethod
    def _from_gguf(cls, path, dtype, config, quantization, kv_cache_dtype):
        gguf_model.resolve_gguf_policy(quantization)  # fail on a bad name before reading the file
        with GGUFFile(path) as g:
            config = config or gguf_model.config_from_gguf(g)
            weights, target, policy = gguf_model.engine_weights_from_gguf(g, config, dtype, quantization)
            eos = gguf_model.stop_ids(g, config)
        ecfg = dict(engine_config(config, target), kv_cache_dtype=kv_cache_dtype)
        model = cls(config, _C.Engine(ecfg, weights), target, None, policy)
        model.name_or_path = path
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=config.pad_token_id,
                                                   bos_token_id=config.bos_token_id)
        model.kv_cache_dtype = kv_cache_dtype
        model._load_head(path, {})
        return model

    def _load_head(self, folder, heads):
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

    def _run(self, ids, mask, output: str, last_only: bool = False, output_hidden_states: bool = False):
        # transformers' forward uses positions 0..L-1 whatever the mask says.
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
        return self._engine.forward(ids, mask, positions, output, last_only, output_hidden_states)

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def __repr__(self):
        q = self.quantization if isinstance(self.quantization, str) else \
            {k: v for k, v in self.quantization.items() if v}
        c = self.config
        return (f"{type(self).__name__}({self.name_or_path!r}, dtype={self.dtype}, quantization={q or None}, "
                f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, vocab={c.vocab_size})")


class GemmaModel(GemmaPreTrainedModel):
    """The decoder: `last_hidden_state` [B, L, hidden] after the final norm."""

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        ids, mask = self._prepare(input_ids, attention_mask)
        hidden, states = self._run(ids, mask, "hidden", output_hidden_states=output_hidden_states)
        out = ModelOutput(last_hidden_state=hidden)
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out

    forward = __call__


class GemmaForCausalLM(GemmaPreTrainedModel):
    """Logits over the vocabulary through the tied embedding; `generate`."""

    def __call__(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        """logits [B, L, vocab] (numpy float32); logits_to_keep=1: the last position only."""
        ids, mask = self._prepare(input_ids, attention_mask)
        if logits_to_keep not in (0, 1):
            raise ValueError("logits_to_keep must be 0 (all positions) or 1 (the last one)")
        logits, _ = self._run(ids, mask, "logits", last_only=logits_to_keep == 1)
        return ModelOutput(logits=logits)

    forward = __call__

    def generate(self, input_ids=None, attention_mask=None, generation_config: Optional[GenerationConfig] = None,
                 streamer=None, callback: Optional[Callable[[np.ndarray], Any]] = None, **kwargs) -> np.ndarray:
        """Prompt + new tokens, [B, L + steps] int64, as transformers' generate returns.

        Arguments as transformers': max_new_tokens, do_sample, temperature, top_k, top_p,
        min_p, repetition_penalty, eos_token_id, pad_token_id, and seed (same seed, same
        tokens). Rows that finish (eos) are filled with pad_token_id while others go on.
        streamer: an object with put(ids)/end() (transformers' TextStreamer works);
        callback: called with the new token of every row after each step."""
        if isinstance(input_ids, dict):  # tokenizer output passed whole
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        gc = (generation_config or self.generation_config).updated(**kwargs)
        if gc.eos_token_id is None:
            gc.eos_token_id = self.config.eos_token_id
        if gc.pad_token_id is None:
            gc.pad_token_id = self.config.pad_token_id
        if gc.pad_token_id is None:
            eos = gc.eos_ids()
            gc.pad_token_id = eos[0] if eos else 0
        gc.validate()
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
        do_sample = bool(gc.do_sample) and gc.temperature > 0
        seed = gc.seed if gc.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        params = _C.SamplingParams(
            max_new_tokens=int(gc.max_new_tokens), do_sample=do_sample, temperature=float(gc.temperature),
            top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            min_p=float(gc.min_p or 0.0), repetition_penalty=float(gc.repetition_penalty),
            eos_token_ids=eos, pad_token_id=int(gc.pad_token_id), seed=seed)
        if streamer is not None:
            streamer.put(ids.astype(np.int64))

        def on_step(tokens):
            if streamer is not None:
                streamer.put(tokens.astype(np.int64))
            if callback is not None:
                callback(tokens)

        new = self._engine.generate(ids, mask, params, on_step if (streamer or callback) else None)
        if streamer is not None:
            streamer.end()
        return np.concatenate([ids, new], axis=1).astype(np.int64)


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

    def __call__(self, input_ids, attention_mask=None):
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
        return ModelOutput(logits=self._score(pooled))

    forward = __call__


class GemmaForTokenClassification(_ScoreHead):
    """`score` (with bias) at every position: logits [B, L, num_labels]."""

    _bias = True

    def __call__(self, input_ids, attention_mask=None):
        ids, mask = self._prepare(input_ids, attention_mask)
        hidden, _ = self._run(ids, mask, "hidden")
        return ModelOutput(logits=self._score(hidden))

    forward = __call__
