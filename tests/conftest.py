"""Shared fixtures: tiny random Gemma checkpoints written by transformers (seeded), and the
transformers models themselves as the reference (eager attention, float32). torch and
transformers are imported by the fixtures that need them: a test that needs neither runs
without them."""

import numpy as np
import pytest

# Tiny shapes that still exercise every rule: MQA, GQA and MHA; a head_dim that is not
# hidden / heads; an odd vocabulary; K dimensions that are not multiples of the SIMD width.
CONFIGS = {
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "mha": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=20),
    # every input size a multiple of 32, so every matrix can be quantized
    "q32": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, vocab_size=1024),
}
BASE = dict(vocab_size=1001, hidden_size=72, intermediate_size=168, num_hidden_layers=3,
            max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, initializer_range=0.25)


# Gemma 2 / 3 extras on top of a CONFIGS entry: a sliding window shorter than the test
# sequences, both layer types, query_pre_attn_scalar != head_dim, soft-caps small enough to
# bend random logits (Gemma 2), two RoPE bases and a linear RoPE scaling (Gemma 3).
ARCH = {
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", dict(sliding_window=6, query_pre_attn_scalar=40, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=1.5, num_hidden_layers=4)),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=5, query_pre_attn_scalar=40, num_hidden_layers=4,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                     "sliding_attention"],
                                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 100000.0},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 1000.0}})),
}


def hf_config(name, arch="gemma", **extra):
    transformers = pytest.importorskip("transformers")
    cls_name, arch_extra = ARCH[arch]
    return getattr(transformers, cls_name)(**{**BASE, **CONFIGS[name], **arch_extra, **extra})


def _randomize_norms(model, seed):
    # transformers initialises RMSNorm weights to zero (scale 1); random ones test the (1 + w).
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def build(cls_name, config_name, folder, dtype=None, seed=0, arch="gemma", **extra):
    """A seeded random transformers model of class cls_name, saved to folder; returns the
    float32 eager model on those exact (possibly bf16-rounded) weights (dtype: a torch dtype,
    float32 when None)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    dtype = torch.float32 if dtype is None else dtype
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    cfg = hf_config(config_name, arch, **extra)
    model = cls(cfg).eval()
    _randomize_norms(model, seed)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(folder)
    ref = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return ref


@pytest.fixture(scope="session")
def torch():
    """torch, for the tests that need it (skipped without it)."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(cls_name, config_name, dtype=torch.float32, **extra) -> (folder, reference model); cached."""
    cache = {}

    def get(cls_name="GemmaForCausalLM", config_name="gqa", dtype=None, **extra):
        torch = pytest.importorskip("torch")
        dtype = torch.float32 if dtype is None else dtype
        key = (cls_name, config_name, str(dtype), tuple(sorted(extra.items())))
        if key not in cache:
            folder = str(tmp_path_factory.mktemp(f"{cls_name}-{config_name}"))
            cache[key] = (folder, build(cls_name, config_name, folder, dtype=dtype, **extra))
        return cache[key]

    return get


def rel_err(ours, ref, mask=None):
    """max |ours - ref| / max |ref| over the positions where mask is true."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask], ref[mask]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_batch(seed, B, L, vocab, pad_left=None, pad_right=None):
    """Random ids in [3, vocab) (no pad/eos/bos) and a mask with the given padding per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    for b, n in enumerate(pad_left or []):
        mask[b, :n] = 0
        ids[b, :n] = 0
    for b, n in enumerate(pad_right or []):
        if n:
            mask[b, L - n:] = 0
            ids[b, L - n:] = 0
    return ids, mask


def available_paths(setter, names):
    """The kernel paths among names that this CPU and build have (setter refuses the others
    with ValueError); leaves the automatic choice in place."""
    have = []
    for name in names:
        try:
            setter(name)
            have.append(name)
        except ValueError:
            pass
    setter("auto")
    return have


def _chat_model(tiny, tmp_path_factory, max_positions: int):
    import shutil

    import sentencepiece as spm

    import gemma_cpp
    from tiny_tokenizer import train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("serve-ckpt")
    sp = train_tiny_tokenizer(str(folder / "sp"))
    vocab = spm.SentencePieceProcessor(model_file=sp).get_piece_size()
    # initializer_range 0.05: logits flat enough that sampled choices differ.
    src, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=vocab, initializer_range=0.05,
                    max_position_embeddings=max_positions)
    shutil.copytree(src, folder / "model")
    shutil.copy(sp, folder / "model" / "tokenizer.model")
    path = str(folder / "model")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path, dtype="float32")
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def tiny_chat(tiny, tmp_path_factory):
    """A tiny Gemma 3 whose vocabulary is a trained tokenizer's (with Gemma's turn tokens); 2048
    positions: streams long enough to leave in the middle of. (path, model, tokenizer)"""
    return _chat_model(tiny, tmp_path_factory, 2048)


@pytest.fixture(scope="module")
def tiny_chat_long(tiny, tmp_path_factory):
    """tiny_chat with 32768 positions: a request of 30,000 new tokens runs for many seconds
    (the tiny model makes about a thousand a second), what the server tests that need requests
    still running or waiting for a slot take."""
    return _chat_model(tiny, tmp_path_factory, 32768)
