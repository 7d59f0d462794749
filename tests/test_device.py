"""The decoder forward through its device interface (csrc/engine/device.h).

Model's layer loop, KV-cache bookkeeping and sampling decisions are written once and reach the
kernels only through a Device. The staged CPU device runs the same kernels but behaves as a
device with memory of its own: Model must upload, download and copy through it (nothing is
read in place), and every fresh allocation starts as NaN bytes, as a GPU's holds garbage. So
a model on the staged device gives the same bits as on the plain CPU device exactly when the
shared code moves every byte a GPU would need and reads nothing it did not write: the paths a
CUDA device takes, checked here on every CI run."""
import contextlib
import gc
import threading

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C

from conftest import random_batch, rel_err

WINDOW = 5  # conftest's Gemma 3 sliding window


@contextlib.contextmanager
def staged(ring=True, replay=False):
    _C._testing.set_staged_device(True, ring, replay)
    try:
        yield
    finally:
        _C._testing.set_staged_device(False, True, False)


def _pair(cls, folder, ring=True, replay=False, **kw):
    """The model on the plain CPU device and on the staged one (ring=False: with the CUDA
    device's KV cache, every slot of every layer kept; replay: decode steps replayed as the
    CUDA device's graphs are)."""
    plain = cls.from_pretrained(folder, **kw)
    with staged(ring, replay):
        other = cls.from_pretrained(folder, **kw)
    assert plain._engine.device_name == "cpu"
    want = "cpu (staged" + ("" if ring else ", flat cache") + (", replay" if replay else "") + ")"
    assert other._engine.device_name == want
    return plain, other


def _same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    assert not np.isnan(a).any(), f"{what}: NaN (a read of memory nothing wrote)"
    assert np.array_equal(a, b), f"{what}: staged differs from plain, max |diff| {np.abs(a - b).max()}"


@pytest.fixture(scope="module")
def gemma3(tiny):
    return tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020)


def test_staged_forward_matches_transformers(gemma3, torch):
    """An independent reference first: the staged device's logits are transformers'."""
    folder, ref = gemma3
    _, model = _pair(gemma_cpp.GemmaForCausalLM, folder)
    ids, mask = random_batch(0, 2, 4 * WINDOW, ref.config.vocab_size, pad_left=[3, 0])
    ours = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel_err(ours, want, mask.astype(bool)) < 1e-4


@pytest.mark.parametrize("arch,config", [("gemma", "mqa"), ("gemma2", "gqa"), ("gemma3", "q32")])
def test_forward_and_hidden_states_are_the_same_bits(tiny, arch, config):
    cls = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    folder, ref = tiny(cls, config, arch=arch)
    V = ref.config.vocab_size
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder)
    # 8 x 100 tokens: two prompt chunks (at most 512 tokens a step: 64 per row), the second partial.
    for B, L, pad in [(1, 7, None), (2, 13, [4, 0]), (8, 100, [0, 17, 0, 0, 3, 0, 0, 0])]:
        ids, mask = random_batch(B, B, L, V, pad_left=pad)
        _same(other(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits, f"{arch} logits {B}x{L}")
        # The last position only: gathered from the last chunk on the device.
        _same(other(ids, attention_mask=mask, logits_to_keep=1).logits,
              plain(ids, attention_mask=mask, logits_to_keep=1).logits, f"{arch} last logits {B}x{L}")
    ids, mask = random_batch(9, 2, 11, V, pad_right=[0, 3])
    plain, other = _pair(gemma_cpp.GemmaModel, folder)
    a = plain(ids, attention_mask=mask, output_hidden_states=True)
    b = other(ids, attention_mask=mask, output_hidden_states=True)
    _same(b.last_hidden_state, a.last_hidden_state, f"{arch} last hidden state")
    assert len(a.hidden_states) == len(b.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        _same(y, x, f"{arch} hidden state {i}")


@pytest.mark.parametrize("weights,kv,ring,replay", [
    ("float32", "float32", True, False), ("bfloat16", "bfloat16", True, False), ("int8", "int8", True, False),
    ("int4", "float32", True, False), ("float32", "float32", False, False), ("bfloat16", "bfloat16", False, False),
    ("float32", "float32", False, True), ("int8", "bfloat16", False, True), ("float32", "float32", True, True)])
def test_generate_past_the_sliding_buffer_is_the_same_bits(gemma3, weights, kv, ring, replay):
    """Decode far past 2 windows + a chunk, so that the sliding layers' buffers move their
    tails (KVCache::make_room's device copies), greedy and sampled, with the raw logits. Without
    the buffers (ring=False, the CUDA device's cache) the window rule alone must give the same
    bits. replay: every decode step after the first of its kind reruns the ops the first one
    recorded (as a CUDA graph replays its capture), so a per-step value that reached an op
    other than through device memory would give stale, wrong bits; a step that moves a ring
    buffer is not replayed."""
    folder, ref = gemma3
    kw = dict(kv_cache_dtype=kv, ring=ring, replay=replay)
    if weights.startswith("int"):
        kw["quantization"] = weights
    else:
        kw["dtype"] = weights
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder, **kw)
    ids, mask = random_batch(3, 3, 3 * WINDOW, ref.config.vocab_size, pad_left=[0, 4, 1])
    for gen in [dict(do_sample=False), dict(do_sample=True, temperature=1.5, top_k=0, seed=7)]:
        a = plain.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], output_logits=True,
                           return_dict_in_generate=True, **gen)
        b = other.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], output_logits=True,
                           return_dict_in_generate=True, **gen)
        _same(b.sequences, a.sequences, f"{weights}/{kv} {gen} tokens")
        assert len(a.logits) == len(b.logits) == 40
        for i, (x, y) in enumerate(zip(a.logits, b.logits)):
            _same(y, x, f"{weights}/{kv} {gen} logits of step {i}")
    replayed = other._engine.replayed_steps
    if not replay:
        assert replayed == 0
    elif ring:  # the sliding buffers move every few steps here (window 5): those steps run as they are
        assert 0 < replayed < 2 * 39
    else:  # two generate calls of 39 decode steps each: all but each call's first replayed
        assert replayed >= 2 * 37  # each call: the first step runs, the second is captured, the rest replay


def test_rows_that_finish_early_are_the_same_bits(gemma3):
    """Rows leave the batch at different steps (their own eos): the active rows' logits are
    gathered and laid out by the shared code on both devices."""
    folder, ref = gemma3
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder)
    ids, mask = random_batch(4, 4, 9, ref.config.vocab_size, pad_left=[0, 2, 0, 5])
    gen = dict(max_new_tokens=24, do_sample=True, temperature=2.0, top_k=0, seed=3)
    drawn = plain.generate(ids, attention_mask=mask, eos_token_id=[], **gen)[:, 9:]
    # Row 0's 3rd token and row 2's 13th as stop tokens: rows finish at different steps.
    eos = sorted({int(drawn[0, 2]), int(drawn[2, 12])})
    a = plain.generate(ids, attention_mask=mask, eos_token_id=eos, output_logits=True, return_dict_in_generate=True,
                       **gen)
    b = other.generate(ids, attention_mask=mask, eos_token_id=eos, output_logits=True, return_dict_in_generate=True,
                       **gen)
    _same(b.sequences, a.sequences, "tokens")
    finished = [np.isnan(x).all(axis=1) for x in a.logits]
    assert any(f.any() and not f.all() for f in finished), "degenerate: no row finished before the others"
    for i, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert np.array_equal(np.isnan(x), np.isnan(y))
        live = ~np.isnan(x).all(axis=1)
        _same(y[live], x[live], f"logits of step {i}")


def test_greedy_picks_on_the_device_are_the_same_bits(gemma3):
    """Greedy without penalties, logits or logprobs: a device with memory of its own picks the
    tokens itself (Device::argmax, only the ids come back), in generate and in the scheduler;
    the same tokens as the host's sampler, as the replayed steps of the flat cache give them."""
    folder, ref = gemma3
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder, ring=False, replay=True)
    ids, mask = random_batch(6, 3, 11, ref.config.vocab_size, pad_left=[0, 2, 5])
    for n in (1, 3):  # a lone row (the pooled scan on the host) and a batch
        kw = dict(attention_mask=mask[:n], max_new_tokens=30, eos_token_id=[], do_sample=False)
        _same(other.generate(ids[:n], **kw), plain.generate(ids[:n], **kw), f"greedy x{n}")
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, ref.config.vocab_size, size=k).tolist() for k in (2, 9, 20, 33)]

    def serve(model):
        with gemma_cpp.Engine(model, slots=3, slot_ctx=80, chunk_size=8) as engine:
            return [r.result(timeout=120) for r in [engine.submit(p, max_new_tokens=15, eos_token_id=[])
                                                     for p in prompts]]

    assert serve(other) == serve(plain)


def test_torch_outputs_stay_in_the_devices_memory(gemma3, torch):
    """return_tensors='pt' on a device with memory of its own: the logits and hidden states
    stay in that memory and reach torch through a DLPack capsule (a GPU's as CUDA tensors), the
    tensor owning it: it outlives the model, and its memory goes back to the device when torch
    lets go. The same values as the plain CPU's numpy outputs."""
    folder, ref = gemma3
    ids, mask = random_batch(7, 2, 13, ref.config.vocab_size, pad_left=[0, 4])
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder)
    for keep in (0, 1):
        want = plain(ids, attention_mask=mask, logits_to_keep=keep).logits
        got = other(ids, attention_mask=mask, logits_to_keep=keep, return_tensors="pt").logits
        assert isinstance(got, torch.Tensor) and got.device.type == "cpu" and got.dtype == torch.float32
        _same(got.numpy(), want, f"logits_to_keep={keep}")
    base, staged_base = _pair(gemma_cpp.GemmaModel, folder)
    want = base(ids, attention_mask=mask, output_hidden_states=True)
    got = staged_base(ids, attention_mask=mask, output_hidden_states=True, return_tensors="pt")
    _same(got.last_hidden_state.numpy(), want.last_hidden_state, "last hidden state")
    assert len(got.hidden_states) == len(want.hidden_states)
    for x, y in zip(want.hidden_states, got.hidden_states):
        _same(y.numpy(), x, "hidden states")
    # A capsule nobody consumed frees its memory itself.
    ids32, mask32 = other._prepare(ids, mask)
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(13, dtype=np.int32), ids32.shape))
    capsule, _ = other._engine.forward(ids32, mask32, positions, "logits", False, False, True)
    assert type(capsule).__name__ == "PyCapsule"
    del capsule
    # The tensor owns its memory: the model can go first; freeing the tensor then frees both.
    kept = other(ids, attention_mask=mask, return_tensors="pt").logits
    del other
    gc.collect()
    _same(kept.numpy(), plain(ids, attention_mask=mask).logits, "logits after the model went")
    del kept
    gc.collect()


@pytest.mark.parametrize("cls_name,config,labels", [("GemmaForSequenceClassification", "gqa", 3),
                                                     ("GemmaForTokenClassification", "mha", 5)])
def test_the_heads_are_the_same_bits(tiny, cls_name, config, labels):
    folder, ref = tiny(cls_name, config, num_labels=labels)
    ids, mask = random_batch(5, 3, 10, ref.config.vocab_size, pad_left=[0, 3, 6])
    plain, other = _pair(getattr(gemma_cpp, cls_name), folder)
    _same(other(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits, cls_name)


def test_serving_scheduler_is_the_same_bits(gemma3):
    """The continuous-batching scheduler on the staged device: requests that join while others
    decode and prefill in chunks, greedy and sampled, with logprobs, and a prefix reused from a
    finished request's slot, give the plain device's tokens and logprobs."""
    folder, ref = gemma3
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder)
    rng = np.random.default_rng(3)
    shared = rng.integers(3, ref.config.vocab_size, size=16).tolist()
    prompts = [rng.integers(3, ref.config.vocab_size, size=n).tolist() for n in (1, 5, 9, 23, 40)]
    prompts += [shared + [5, 6, 7], shared + [9]]  # the second reuses the first's 16-token prefix

    def run(model):
        out = []
        with gemma_cpp.Engine(model, slots=3, slot_ctx=96, chunk_size=8) as engine:
            reqs = [engine.submit(p, max_new_tokens=12 + i, eos_token_id=[], logprobs=2,
                                  **(dict(do_sample=True, temperature=1.2, top_k=0, seed=i) if i % 2 else {}))
                    for i, p in enumerate(prompts[:-2])]
            out += [(r.result(timeout=120), r.logprobs, r.top_logprobs) for r in reqs]
            # One token past its prompt (its sliding layers keep the prefix), then the reuse.
            for p, n in ((prompts[-2], 1), (prompts[-1], 10)):
                r = engine.submit(p, max_new_tokens=n, eos_token_id=[], logprobs=2)
                out.append((r.result(timeout=120), r.logprobs, r.top_logprobs))
            stats = engine.stats()
        return out, stats

    (a, sa), (b, sb) = run(plain), run(other)
    assert sa["peak_rows"] >= 2, "degenerate: requests never shared a step"
    assert sb["prefix_tokens"] == sa["prefix_tokens"] == 16, "the shared prefix was not reused"
    assert b == a
    # The CUDA device's cache keeps every slot (a row's prefix then survives any decode), and
    # its decode steps replay (a step of each batch size is recorded, the later ones replay it).
    with staged(ring=False, replay=True):
        flat = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    c, sc = run(flat)
    assert c == a
    assert sc["prefix_tokens"] == 16
    assert flat._engine.replayed_steps > 20


def test_a_scheduler_and_generate_share_a_replaying_device(gemma3):
    """generate() on one thread while the scheduler admits (clearing rows of the device's KV
    cache) and steps on its own: a device that queues a step's ops must see no other work
    in between (the scheduler touches device memory only under the model's lock). Every
    result is the plain CPU's. A smoke test of the locking: without the lock around the row
    clear, one run in three here ended in the devices' "from another thread during a step"
    error (uncaught on the scheduler's thread)."""
    folder, ref = gemma3
    plain, other = _pair(gemma_cpp.GemmaForCausalLM, folder, ring=False, replay=True)
    rng = np.random.default_rng(9)
    # Many short requests: many admissions (row clears) while generate() steps.
    prompts = [rng.integers(3, ref.config.vocab_size, size=k).tolist() for k in rng.integers(1, 6, size=80)]
    ids, mask = random_batch(10, 2, 9, ref.config.vocab_size, pad_left=[0, 3])
    gen = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[], do_sample=False)
    want_gen = plain.generate(ids, **gen)
    with gemma_cpp.Engine(plain, slots=2, slot_ctx=48, chunk_size=4) as engine:
        want = [engine.submit(p, max_new_tokens=2, eos_token_id=[]).result(timeout=120) for p in prompts]
    got_gen, errors, done = [], [], threading.Event()

    def generate_repeatedly():
        try:
            while not done.is_set():
                got_gen.append(other.generate(ids, **gen))
        except Exception as e:  # reported below
            errors.append(e)

    with gemma_cpp.Engine(other, slots=2, slot_ctx=48, chunk_size=4) as engine:
        t = threading.Thread(target=generate_repeatedly)
        t.start()
        got = [engine.submit(p, max_new_tokens=2, eos_token_id=[]).result(timeout=120) for p in prompts]
        done.set()
        t.join(timeout=120)
    assert not errors, errors
    assert got == want
    assert len(got_gen) >= 2
    for g in got_gen:
        _same(g, want_gen, "generate beside the scheduler")
