"""Fuzz harnesses: each takes one input (bytes) and either succeeds or raises one of the
exceptions its API documents for bad input (ValueError and its kin, naming the problem).
Anything else (another exception, a crash, a hang, memory past the limit) is a finding.

Run one with atheris (coverage-guided): python fuzz/run.py NAME [libFuzzer flags]; the
tests replay fuzz/corpus/NAME/* through the same functions (tests/test_fuzz_corpus.py).

  gguf          GGUFFile on the bytes, every tensor dequantized, then the GGUF model loaded
                and run on two tokens
  safetensors   SafetensorsFile on the bytes, then from_pretrained on a folder holding them
                beside a tiny config.json, and a forward
  ourformat     our converted format: a folder whose model.safetensors is the bytes
  spmodel       a sentencepiece model (tokenizer.model) from the bytes, then encode / decode
  tokenizer     the demo model's tokenizer on the bytes as text: encode, then decode, which
                must give the text back
  chat          the default chat template on messages built from the bytes
  engine        _C.Engine from a config and arrays drawn from the bytes (wrong shapes, dtypes,
                strides, slices of larger buffers), then a forward on drawn ids
  generate      a tiny model's generate with sampling arguments drawn from the bytes
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
import tempfile

import numpy as np

import gemma_cpp
from gemma_cpp import _C

# Where a harness writes its files: one folder per process, reused input after input.
_WORK = tempfile.mkdtemp(prefix="gemma-cpp-fuzz-")
API_ERRORS = (ValueError, TypeError)  # what the Python API raises for bad arguments


class Draw:
    """Values drawn from the input bytes, in order; zeros once they run out."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def bytes(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += n
        return out.ljust(n, b"\0")

    def int(self, lo: int, hi: int) -> int:
        return lo + int.from_bytes(self.bytes(4), "little") % (hi - lo + 1)

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def float(self) -> float:
        # Ordinary values most of the time; the edges (0, negatives, inf, nan, huge) too.
        raw = struct.unpack("<f", self.bytes(4))[0]
        return self.pick([raw, 0.0, 1.0, -1.0, 0.5, float("inf"), float("nan"), 1e30, raw % 2.0])

    def text(self, n: int) -> str:
        return self.bytes(n).decode("utf-8", errors="replace")

    def rest(self) -> bytes:
        out = self.data[self.at:]
        self.at = len(self.data)
        return out


def _write(name: str, data: bytes) -> str:
    path = os.path.join(_WORK, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---- a tiny model of our own (no torch): the fixed half of several harnesses

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, architectures=["GemmaForCausalLM"])


def tiny_tensors(seed: int = 0) -> list:
    """[(name, array, dtype)] of a tiny Gemma 1 checkpoint in transformers' names."""
    rng = np.random.default_rng(seed)
    c = TINY
    H, F, hd, V = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    out = [("model.embed_tokens.weight", w(V, H), "F32"), ("model.norm.weight", w(H), "F32")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", w(c["num_attention_heads"] * hd, H), "F32"),
                (p + "self_attn.k_proj.weight", w(c["num_key_value_heads"] * hd, H), "F32"),
                (p + "self_attn.v_proj.weight", w(c["num_key_value_heads"] * hd, H), "F32"),
                (p + "self_attn.o_proj.weight", w(H, c["num_attention_heads"] * hd), "F32"),
                (p + "mlp.gate_proj.weight", w(F, H), "F32"), (p + "mlp.up_proj.weight", w(F, H), "F32"),
                (p + "mlp.down_proj.weight", w(H, F), "F32"), (p + "input_layernorm.weight", w(H), "F32"),
                (p + "post_attention_layernorm.weight", w(H), "F32")]
    return out


@functools.lru_cache(maxsize=1)
def tiny_folder() -> str:
    from gemma_cpp.formats.safetensors import write_safetensors

    folder = os.path.join(_WORK, "tiny")
    os.makedirs(folder, exist_ok=True)
    gemma_cpp.GemmaConfig(**TINY).save_pretrained(folder)
    write_safetensors(os.path.join(folder, "model.safetensors"), tiny_tensors(), {"format": "pt"})
    return folder


@functools.lru_cache(maxsize=1)
def tiny_model():
    return gemma_cpp.GemmaForCausalLM.from_pretrained(tiny_folder())


def _run_model(model) -> None:
    V = model.config.vocab_size
    logits = model([[min(2, V - 1), min(5, V - 1)]]).logits
    assert logits.shape == (1, 2, V)


# ---- the harnesses

def fuzz_gguf(data: bytes) -> None:
    from gemma_cpp.formats.gguf import GGUFFile
    from gemma_cpp.loading import gguf as gguf_model

    path = _write("m.gguf", data)
    try:
        with GGUFFile(path) as g:
            for name, t in g.tensors.items():
                if math.prod(t.shape) <= 1 << 20:
                    g.dequantize(name)
            loaded = gguf_model.load(g, None, "auto")
        model = gemma_cpp.GemmaForCausalLM(loaded)
    except ValueError:
        return
    _run_model(model)


def fuzz_safetensors(data: bytes) -> None:
    from gemma_cpp.formats.safetensors import SafetensorsFile

    folder = os.path.join(_WORK, "st")
    path = _write("st/model.safetensors", data)
    if not os.path.exists(os.path.join(folder, "config.json")):
        gemma_cpp.GemmaConfig(**TINY).save_pretrained(folder)
    try:
        f = SafetensorsFile(path)
        for name in f.names():
            f.get(name)
        model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    except (ValueError, KeyError, FileNotFoundError):
        return
    _run_model(model)


def fuzz_ourformat(data: bytes) -> None:
    folder = os.path.join(_WORK, "ours")
    _write("ours/model.safetensors", data)
    if not os.path.exists(os.path.join(folder, "config.json")):
        gemma_cpp.GemmaConfig(**TINY).save_pretrained(folder)
    try:
        model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    except (ValueError, KeyError, FileNotFoundError):
        return
    _run_model(model)


def fuzz_spmodel(data: bytes) -> None:
    d = Draw(data)
    text = d.text(d.int(0, 64))
    folder = os.path.join(_WORK, "sp")
    _write("sp/tokenizer.model", d.rest())
    try:
        tok = gemma_cpp.GemmaTokenizer.from_pretrained(folder)
    except ValueError:
        return
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids), ids
    tok.decode(ids)


@functools.lru_cache(maxsize=1)
def demo_tokenizer():
    from gemma_cpp._demo import demo_model_path

    return gemma_cpp.GemmaTokenizer.from_pretrained(demo_model_path())


def fuzz_tokenizer(data: bytes) -> None:
    tok = demo_tokenizer()
    text = data.decode("utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    back = tok.decode(ids)
    # Gemma's model normalizes nothing and falls back to bytes: every text comes back, but for
    # the text of special tokens, which the encoder matches as those tokens.
    assert back == text, (text, back)


_ROLES = ["user", "assistant", "system", "model", "tool", "", "<start_of_turn>", "user\n"]


def fuzz_chat(data: bytes) -> None:
    tok = demo_tokenizer()
    d = Draw(data)
    messages = []
    for _ in range(d.int(0, 6)):
        kind = d.int(0, 9)
        if kind == 0:  # not a dict at all
            messages.append(d.pick([None, 3, "text", ["a"], {"role": "user"}]))
            continue
        content = d.text(d.int(0, 40))
        if kind == 1:
            content = [{"type": "text", "text": content}]
        elif kind == 2:
            content = d.pick([None, 5, {"x": 1}])
        messages.append({"role": d.pick(_ROLES), "content": content})
    try:
        out = tok.apply_chat_template(messages, tokenize=bool(d.int(0, 1)), add_generation_prompt=bool(d.int(0, 1)))
    except API_ERRORS:
        return
    assert isinstance(out, (str, list, dict)), type(out)  # text, ids, or a BatchEncoding


_DTYPES = [np.float32, np.float32, np.float32, np.uint16, np.float64, np.int8, np.int32]


def _array(d: Draw, shape, rng):
    """An array for a weight of `shape`, sometimes wrong: its shape, dtype, strides, or a slice
    of a larger buffer (a view starting inside it)."""
    shape = list(shape)
    kind = d.int(0, 11)
    if kind == 0 and shape:
        shape[d.int(0, len(shape) - 1)] += d.pick([-1, 1, 7])
    dtype = d.pick(_DTYPES) if kind == 1 else np.float32
    shape = [max(0, s) for s in shape]
    if kind == 2 and len(shape) == 2:  # a transposed (non-contiguous) view
        return np.zeros(shape[::-1], dtype).T
    if kind == 3:  # a slice inside a larger buffer: contiguous rows, offset start
        big = rng.standard_normal([s + 2 for s in shape]).astype(np.float32)
        return big[(slice(1, -1),) * len(shape)] if shape else big
    if kind == 4 and len(shape) == 2:  # every other column
        return rng.standard_normal([shape[0], shape[1] * 2]).astype(np.float32)[:, ::2]
    return (rng.standard_normal(shape) * 0.1).astype(dtype)


def fuzz_engine(data: bytes) -> None:
    from gemma_cpp.loading.layout import engine_config, layer_shapes

    d = Draw(data)
    rng = np.random.default_rng(d.int(0, 1000))
    heads = d.pick([1, 2, 3, 4])
    kw = dict(TINY, vocab_size=d.pick([1, 2, 17, 64]), hidden_size=d.pick([8, 16, 32, 33]),
              intermediate_size=d.pick([8, 16, 64]), num_hidden_layers=d.pick([1, 2]), num_attention_heads=heads,
              num_key_value_heads=d.pick([1, heads, 2]), head_dim=d.pick([8, 16, 32]),
              max_position_embeddings=d.pick([4, 16, 64]))
    try:
        config = gemma_cpp.GemmaConfig(**kw)
        ec = engine_config(config, "float32")
        for field in ("rms_norm_eps", "embed_scale", "attn_softcap", "final_softcap", "attn_scale"):
            if d.int(0, 7) == 0:
                setattr(ec, field, d.float())
    except API_ERRORS:
        return
    weights = {"embed": _array(d, (kw["vocab_size"], kw["hidden_size"]), rng),
               "final_norm": _array(d, (kw["hidden_size"],), rng)}
    for i in range(kw["num_hidden_layers"] + d.pick([0, 0, 0, -1, 1])):
        for short, shape in layer_shapes(config).items():
            if d.int(0, 40) != 0:  # now and then a tensor is missing
                weights[f"layers.{i}.{short}"] = _array(d, shape, rng)
    try:
        engine = _C.Engine(ec, weights)
    except API_ERRORS:
        return
    L = d.int(1, 6)
    ids = np.array([[d.int(-2, kw["vocab_size"] + 1) for _ in range(L)]], np.int32)
    try:
        out, _ = engine.forward(ids, None, np.tile(np.arange(L, dtype=np.int32), (1, 1)), "logits", False, False)
    except API_ERRORS:
        return
    assert out.shape == (1, L, kw["vocab_size"])


def fuzz_generate(data: bytes) -> None:
    model = tiny_model()
    d = Draw(data)
    kw = {}
    for name, draw in (("max_new_tokens", lambda: d.pick([0, 1, 3, -1, 10 ** 9, 2.5, None])),
                       ("do_sample", lambda: d.pick([True, False, None, 1, "yes"])),
                       ("temperature", d.float), ("top_k", lambda: d.pick([0, 1, 5, -3, 10 ** 6, 1.5, None])),
                       ("top_p", d.float), ("min_p", d.float), ("repetition_penalty", d.float),
                       ("eos_token_id", lambda: d.pick([[], [1], 1, [-1], [10 ** 6], "x", None])),
                       ("seed", lambda: d.pick([0, 7, -1, 2 ** 70, None])),
                       ("pad_token_id", lambda: d.pick([0, -1, 63, 64, None]))):
        if d.int(0, 2) == 0:
            kw[name] = draw()
    L = d.int(1, 8)
    ids = [[d.int(-1, 64) for _ in range(L)] for _ in range(d.int(1, 3))]
    try:
        out = model.generate(ids, **kw)
    except API_ERRORS:
        return
    out = np.asarray(out)
    assert out.shape[0] == len(ids) and out.shape[1] >= L


HARNESSES = {"gguf": fuzz_gguf, "safetensors": fuzz_safetensors, "ourformat": fuzz_ourformat,
             "spmodel": fuzz_spmodel, "tokenizer": fuzz_tokenizer, "chat": fuzz_chat, "engine": fuzz_engine,
             "generate": fuzz_generate}


def corpus_dir(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", name)


def seeds(name: str) -> list:
    """The saved inputs of a harness, in name order: (file name, bytes)."""
    folder = corpus_dir(name)
    if not os.path.isdir(folder):
        return []
    out = []
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as fh:
            out.append((f, fh.read()))
    return out


def describe(data: bytes) -> str:
    return json.dumps(data[:64].decode("latin-1")) + (f" ... ({len(data)} bytes)" if len(data) > 64 else "")
