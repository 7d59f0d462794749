"""The continuous-batching engine (gemma_cpp.Engine over csrc/engine/scheduler.h): a request's
tokens are the same bits alone, beside others that come and go, and as generate() gives them."""
import asyncio
import threading

import numpy as np
import pytest

import gemma_cpp

# Prompt lengths: one token, chunk boundaries (the tests' chunk is 8), past the sliding window
# (5) many times over.
LENGTHS = [1, 2, 5, 7, 8, 9, 13, 16, 17, 20, 24, 31, 33, 40, 47, 60]


@pytest.fixture(scope="module")
def gemma3(tiny):
    return tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020)


def _load(folder, weights="float32", **kw):
    if weights.startswith("int"):
        kw["quantization"] = weights
    else:
        kw["dtype"] = weights
    return gemma_cpp.GemmaForCausalLM.from_pretrained(folder, **kw)


def _requests(V, seed=0):
    """16 prompts of different lengths; even ones greedy, odd ones sampled with their own seed,
    budgets of 6-21 tokens (so that requests end at different iterations); every third asks
    for logprobs."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        kw = dict(max_new_tokens=6 + (i * 7) % 16, eos_token_id=[])
        if i % 2:
            kw.update(do_sample=True, temperature=1.3, top_k=0, seed=100 + i)
        if i % 3 == 0:
            kw.update(logprobs=3)
        out.append((rng.integers(3, V, size=n).tolist(), kw))
    return out


def _staggered(engine, reqs):
    """Submits reqs in three waves, each when an earlier request is part-way through, so that
    requests join while others decode and prefill; returns every request's tokens (with their
    logprobs, when asked for)."""
    handles = [engine.submit(p, **kw) for p, kw in reqs[:5]]
    while len(handles[0].tokens) < 2 and not handles[0].done:
        threading.Event().wait(0.001)
    handles += [engine.submit(p, **kw) for p, kw in reqs[5:11]]
    while len(handles[6].tokens) < 3 and not handles[6].done:
        threading.Event().wait(0.001)
    handles += [engine.submit(p, **kw) for p, kw in reqs[11:]]
    return [_outcome(h) for h in handles]


def _outcome(request):
    tokens = request.result(timeout=120)
    return (tokens, request.logprobs, request.top_logprobs) if request.logprobs else tokens


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_a_request_is_the_same_bits_alone_and_beside_others(gemma3, weights):
    folder, ref = gemma3
    model = _load(folder, weights)
    reqs = _requests(ref.config.vocab_size)
    with gemma_cpp.Engine(model, slots=8, slot_ctx=128, chunk_size=8) as engine:
        alone = [_outcome(engine.submit(p, **kw)) for p, kw in reqs]
        assert engine.stats()["peak_rows"] == 1
        together = _staggered(engine, reqs)
        stats = engine.stats()
    assert stats["peak_rows"] >= 5, "the staggered requests never ran together"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"{weights}: request {i} (prompt of {LENGTHS[i]} tokens) changed beside others"
    tokens = [a[0] if isinstance(a, tuple) else a for a in alone]
    assert [len(t) for t in tokens] == [kw["max_new_tokens"] for _, kw in reqs]
    assert len({tuple(t) for t in tokens}) == 16, "degenerate: requests generate alike"
    assert stats["running"] == stats["waiting"] == 0
    assert stats["requests"] == 32 and stats["prompt_tokens"] == 2 * sum(LENGTHS)
    assert stats["generated_tokens"] == 2 * sum(kw["max_new_tokens"] for _, kw in reqs)


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_batch_invariance_holds_for_every_kv_cache(tiny, kv):
    # head_dim 32: an int8 cache's block.
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020)
    model = _load(folder, "float32", kv_cache_dtype=kv)
    reqs = _requests(ref.config.vocab_size, seed=1)
    with gemma_cpp.Engine(model, slots=8, slot_ctx=128, chunk_size=8) as engine:
        alone = [_outcome(engine.submit(p, **kw)) for p, kw in reqs]
        assert _staggered(engine, reqs) == alone


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_requests_match_generate(gemma3, weights):
    # A prompt in one chunk (the default 128), as generate() takes it: the same tokens as
    # generate() on that prompt alone, greedy and seeded, and so transformers' (test_generate).
    folder, ref = gemma3
    model = _load(folder, weights)
    reqs = _requests(ref.config.vocab_size, seed=2)
    with gemma_cpp.Engine(model, slots=4, slot_ctx=128) as engine:
        ours = _staggered(engine, reqs)
    for i, (prompt, kw) in enumerate(reqs):
        gen_kw = {k: v for k, v in kw.items() if k != "logprobs"}
        want = model.generate(np.array([prompt]), **gen_kw)[0, len(prompt):].tolist()
        got = ours[i][0] if isinstance(ours[i], tuple) else ours[i]
        assert got == want, f"{weights}: request {i}"


def test_eos_stops_a_request_and_frees_its_slot(gemma3):
    folder, ref = gemma3
    model = _load(folder)
    prompt = np.random.default_rng(3).integers(3, ref.config.vocab_size, size=9).tolist()
    free = model.generate(np.array([prompt]), max_new_tokens=12, eos_token_id=[])[0, 9:].tolist()
    eos = free[4]
    stop_at = free.index(eos)
    with gemma_cpp.Engine(model, slots=1, slot_ctx=64) as engine:
        r = engine.submit(prompt, max_new_tokens=12, eos_token_id=[eos])
        assert r.result(timeout=60) == free[:stop_at + 1] and r.finish_reason == "stop"
        r2 = engine.submit(prompt, max_new_tokens=3, eos_token_id=[])
        assert r2.result(timeout=60) == free[:3] and r2.finish_reason == "length"


def test_cancel_ends_a_request_and_frees_its_slot(tiny):
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020, max_position_embeddings=4096)
    model = _load(folder)
    prompt = list(range(3, 20))
    # A budget of 4,000 tokens (seconds of decoding): the cancel always arrives first, even when
    # this thread waits for a core (100 tokens of the tiny model once finished before it did).
    with gemma_cpp.Engine(model, slots=1, slot_ctx=4096) as engine:
        long = engine.submit(prompt, max_new_tokens=4000, eos_token_id=[])
        queued = engine.submit(prompt, max_new_tokens=100, eos_token_id=[])  # waits for the one slot
        first = [next(long), next(long)]
        long.cancel()
        queued.cancel()
        rest = list(long)  # what came before the cancel reached the loop, then the end
        assert long.finish_reason == "cancelled" and len(first + rest) < 4000
        assert queued.result(timeout=60) == [] and queued.finish_reason == "cancelled"
        after = engine.submit(prompt, max_new_tokens=5, eos_token_id=[]).result(timeout=60)
        n = min(5, len(long.tokens))  # the slot starts afresh: the same first tokens
        assert len(after) == 5 and after[:n] == long.tokens[:n]
        stats = engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0


def test_async_readers_get_the_same_tokens(gemma3):
    folder, ref = gemma3
    model = _load(folder)
    reqs = _requests(ref.config.vocab_size, seed=4)[:6]
    with gemma_cpp.Engine(model, slots=3, slot_ctx=128, chunk_size=8) as engine:
        want = [engine.submit(p, **kw).result(timeout=60) for p, kw in reqs]

        async def read(p, kw):
            return [t async for t in engine.submit(p, **kw)]

        async def main():
            return await asyncio.gather(*(read(p, kw) for p, kw in reqs))

        assert asyncio.run(main()) == want

        async def walk_away():  # a reader cancelled mid-stream cancels its request
            # As many tokens as the slot holds; the reader is cancelled as soon as it has one
            # (a fixed sleep let a fast machine finish the whole request first).
            r = engine.submit(reqs[0][0], max_new_tokens=128 - len(reqs[0][0]), eos_token_id=[])
            seen = []

            async def drain():
                async for t in r:
                    seen.append(t)

            reader = asyncio.ensure_future(drain())
            for _ in range(30000):  # 30 s at most
                if seen:
                    break
                await asyncio.sleep(0.001)
            assert seen and not reader.done(), "the request ended before its reader could walk away"
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            return r

        r = asyncio.run(walk_away())
        r.result(timeout=30)
        assert r.finish_reason in ("cancelled", "length")
        assert engine.stats()["running"] == 0


def test_bad_requests_fail_before_any_work(gemma3):
    folder, ref = gemma3
    model = _load(folder)
    V = ref.config.vocab_size
    with gemma_cpp.Engine(model, slots=2, slot_ctx=40) as engine:
        with pytest.raises(ValueError, match=r"a prompt of 35 tokens \+ max_new_tokens 6 exceeds a slot's context of 40"):
            engine.submit(list(range(3, 38)), max_new_tokens=6)
        with pytest.raises(ValueError, match="the prompt is empty"):
            engine.submit([], max_new_tokens=2)
        with pytest.raises(ValueError, match=rf"prompt token {V} at position 1 is outside the vocabulary \[0, {V}\)"):
            engine.submit([5, V], max_new_tokens=2)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            engine.submit([5, 6], max_new_tokens=0)
        with pytest.raises(ValueError, match="temperature"):
            engine.submit([5, 6], temperature=-1.0)
        with pytest.raises(ValueError, match="one sequence of token ids"):
            engine.submit(np.zeros((2, 3), np.int64))
        with pytest.raises(TypeError, match="output_logits"):
            engine.submit([5, 6], output_logits=True, return_dict_in_generate=True)
        assert engine.stats()["requests"] == 0
        assert engine.submit(np.array([[5, 6]]), max_new_tokens=2).result(timeout=30) != []
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([5, 6])
    max_pos = ref.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gemma_cpp.Engine(model, slot_ctx=max_pos + 1)
    with pytest.raises(ValueError, match="slots"):
        gemma_cpp.Engine(model, slots=0)
    with pytest.raises(ValueError, match="not both"):
        gemma_cpp.Engine(model, ctx_size=64, slot_ctx=32)
    with gemma_cpp.Engine(model, slots=4, ctx_size=100) as engine:
        assert engine.slot_ctx == 25
    with pytest.raises(TypeError, match="GemmaForCausalLM"):
        gemma_cpp.Engine(object())


def test_more_requests_than_slots_all_complete(gemma3):
    folder, ref = gemma3
    model = _load(folder, "int8")
    reqs = _requests(ref.config.vocab_size, seed=5)
    with gemma_cpp.Engine(model, slots=2, slot_ctx=128, chunk_size=16) as engine:
        out = engine.generate([p for p, _ in reqs[:1]] * 3, max_new_tokens=4, eos_token_id=[])
        assert out[0] == out[1] == out[2] and len(out[0]) == 4
        handles = [engine.submit(p, **kw) for p, kw in reqs]
        assert [len(h.result(timeout=120)) for h in handles] == [kw["max_new_tokens"] for _, kw in reqs]


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def test_logprobs_are_the_models_log_softmax(gemma3):
    folder, ref = gemma3
    model = _load(folder)
    prompt = np.random.default_rng(6).integers(3, ref.config.vocab_size, size=11).tolist()
    with gemma_cpp.Engine(model, slots=2, slot_ctx=64) as engine:
        r = engine.submit(prompt, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=2.0, top_k=0,
                          seed=9, logprobs=5)
        tokens = r.result(timeout=60)
        plain = engine.submit(prompt, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=2.0, top_k=0,
                              seed=9)
        assert plain.result(timeout=60) == tokens and plain.logprobs == []  # asking changes nothing drawn
    # The reference: one forward over prompt + tokens, log-softmax at each drawing position.
    logits = model(np.array([prompt + tokens]))["logits"][0]
    assert len(r.logprobs) == len(r.top_logprobs) == 6
    for i, tok in enumerate(tokens):
        want = _log_softmax(logits[len(prompt) - 1 + i])
        assert abs(r.logprobs[i] - want[tok]) < 1e-4
        top = r.top_logprobs[i]
        order = np.argsort(-want, kind="stable")[:5]
        assert [t for t, _ in top] == order.tolist()
        np.testing.assert_allclose([lp for _, lp in top], want[order], atol=1e-4)
    with gemma_cpp.Engine(model, slots=1, slot_ctx=64) as engine:
        with pytest.raises(ValueError, match="logprobs"):
            engine.submit(prompt, logprobs=21)


def test_presence_and_frequency_penalties_follow_their_formula(gemma3):
    # Greedy with OpenAI's penalties, against a numpy loop over the model's own logits:
    # logit -= presence * (count > 0) + frequency * count, counting the new tokens only.
    folder, ref = gemma3
    model = _load(folder)
    rng = np.random.default_rng(8)
    changed = 0
    # The random model repeats one token with a lead of ~13 logits: a count of 6-8 overtakes it.
    for presence, frequency in ((2.0, 1.5), (0.0, 2.0), (1.0, 1.8), (-0.5, 0.0)):
        prompt = rng.integers(3, ref.config.vocab_size, size=7).tolist()
        with gemma_cpp.Engine(model, slots=1, slot_ctx=64) as engine:
            ours = engine.submit(prompt, max_new_tokens=12, eos_token_id=[], presence_penalty=presence,
                                 frequency_penalty=frequency).result(timeout=60)
            changed += ours != engine.submit(prompt, max_new_tokens=12, eos_token_id=[]).result(timeout=60)
        seq, counts = list(prompt), {}
        for _ in range(12):
            x = model(np.array([seq]))["logits"][0, -1].astype(np.float64)
            for t, c in counts.items():
                x[t] -= presence * (c > 0) + frequency * c
            t = int(np.argmax(x))
            counts[t] = counts.get(t, 0) + 1
            seq.append(t)
        assert ours == seq[len(prompt):], (presence, frequency)
    assert changed >= 3, "the penalties changed almost nothing: the test would not see them"
    with gemma_cpp.Engine(model, slots=1, slot_ctx=64) as engine:
        with pytest.raises(ValueError, match=r"presence_penalty must be a number in \[-2, 2\]"):
            engine.submit([5, 6], presence_penalty=3)


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_prefix_reuse_is_exact_and_only_where_valid(gemma3, weights):
    # Chunks of 8, a sliding window of 5: a finished request's row keeps its whole prompt
    # chunks, and a request sharing them recomputes only the rest, with the same tokens as a
    # cold start; a row whose sliding layers moved past the shared part gives nothing.
    folder, ref = gemma3
    model = _load(folder, weights)
    rng = np.random.default_rng(12)
    V = ref.config.vocab_size
    shared = rng.integers(3, V, size=37).tolist()
    first = shared + rng.integers(3, V, size=3).tolist()       # 40 tokens: chunks of 8 up to 40
    second = shared[:35] + rng.integers(3, V, size=9).tolist()  # shares 35 tokens: 4 whole chunks
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.5, top_k=0, seed=3, logprobs=2)

    def run(engine, prompt, **over):  # tokens and their logprobs: the bits, not only the draws
        r = engine.submit(prompt, **dict(kw, **over))
        return r.result(timeout=60), r.logprobs, r.top_logprobs

    with gemma_cpp.Engine(model, slots=1, slot_ctx=128, chunk_size=8) as cold:
        want = run(cold, second)
        assert cold.stats()["prefix_hits"] == 0
    with gemma_cpp.Engine(model, slots=1, slot_ctx=128, chunk_size=8) as engine:
        engine.submit(first, max_new_tokens=1, eos_token_id=[]).result(timeout=60)
        assert run(engine, second) == want
        st = engine.stats()
        assert (st["prefix_hits"], st["prefix_tokens"]) == (1, 32)
        assert st["prompt_tokens"] == len(first) + len(second) - 32
        # That request decoded 6 tokens past its prompt: its sliding layers moved on from slot
        # 40 - window + 1, so the same prompt gets nothing from the row now ...
        assert run(engine, second, max_new_tokens=1)[0] == want[0][:1]
        assert engine.stats()["prefix_hits"] == 1
        # ... but after one that stopped at its prompt it gets all its whole chunks (40 of 44:
        # its last token is always computed).
        assert run(engine, second) == want
        assert (engine.stats()["prefix_hits"], engine.stats()["prefix_tokens"]) == (2, 32 + 40)
    # With free rows to choose from, a request goes to the one holding its prefix.
    with gemma_cpp.Engine(model, slots=3, slot_ctx=128, chunk_size=8) as engine:
        other = rng.integers(3, V, size=30).tolist()
        engine.submit(other, max_new_tokens=1, eos_token_id=[]).result(timeout=60)
        engine.submit(first, max_new_tokens=1, eos_token_id=[]).result(timeout=60)
        engine.submit(rng.integers(3, V, size=20).tolist(), max_new_tokens=1, eos_token_id=[]).result(timeout=60)
        assert run(engine, second) == want
        assert engine.stats()["prefix_tokens"] == 32


def test_close_ends_every_request(tiny):
    # Readers waiting on requests (running and queued) when the engine closes see them end as
    # cancelled; nothing hangs. The requests ask for 30,000 tokens, half a minute's decoding
    # for the tiny model: the running one is still running when close() comes, however long
    # this process waits for a core meanwhile (100 tokens took 0.1 s, and under pytest-xdist,
    # beside another worker, the request sometimes ended first).
    folder, _ = tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020, max_position_embeddings=32768)
    model = _load(folder)
    engine = gemma_cpp.Engine(model, slots=1, slot_ctx=32768)
    running = engine.submit(list(range(3, 12)), max_new_tokens=30000, eos_token_id=[])
    queued = engine.submit(list(range(3, 12)), max_new_tokens=30000, eos_token_id=[])
    next(running)
    got = {}

    def read(name, r):
        got[name] = list(r)

    readers = [threading.Thread(target=read, args=(n, r), daemon=True)
               for n, r in (("running", running), ("queued", queued))]
    for t in readers:
        t.start()
    engine.close()
    for t in readers:
        t.join(30)
        assert not t.is_alive(), "a reader still waits after close()"
    assert running.finish_reason == queued.finish_reason == "cancelled"
    assert queued.tokens == [] and len(running.tokens) < 30000
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([5, 6])
