"""generate: greedy parity with transformers, batching, sampling processors and streaming."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gemma_cpp
from gemma_cpp import _C
from gemma_cpp._C import _testing
from conftest import random_batch

N_NEW = 32


def hf_generate(ref, ids, mask=None, **kw):
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                           do_sample=False, max_new_tokens=N_NEW, pad_token_id=ref.config.pad_token_id, **kw)
    return out.numpy()


@pytest.mark.parametrize("config_name", ["mqa", "gqa", "mha"])
def test_greedy_matches_transformers_single_prompt(tiny, config_name):
    folder, ref = tiny("GemmaForCausalLM", config_name)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(11, 1, 7, ref.config.vocab_size)
    # eos that never wins keeps all 32 steps comparable; then the config's own eos.
    theirs = hf_generate(ref, ids, eos_token_id=ref.config.vocab_size + 5)
    ours = model.generate(ids, max_new_tokens=N_NEW, eos_token_id=[])
    assert ours.shape == theirs.shape == (1, 7 + N_NEW)
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(ours[0, 7:].tolist())) > 3, "degenerate test model: generation repeats one token"


def test_greedy_matches_transformers_left_padded_batch_and_per_row(tiny):
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(12, 3, 10, ref.config.vocab_size, pad_left=[0, 4, 7])
    theirs = hf_generate(ref, ids, mask, eos_token_id=ref.config.vocab_size + 5)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[])
    np.testing.assert_array_equal(ours, theirs)
    for b in range(3):
        row = ids[b, mask[b] == 1][None]
        alone = model.generate(row, max_new_tokens=N_NEW, eos_token_id=[])
        np.testing.assert_array_equal(alone[0, -N_NEW:], ours[b, -N_NEW:])


def test_eos_stops_rows_and_pads_like_transformers(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(13, 2, 6, ref.config.vocab_size, pad_left=[0, 2])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[])
    # Make the 3rd new token of row 0 and the 6th of row 1 stop tokens: both rows end early.
    eos = [int(free[0, 6 + 2]), int(free[1, 6 + 5])]
    theirs = hf_generate(ref, ids, mask, eos_token_id=eos)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=eos)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape[1] < 6 + N_NEW


def test_generate_accepts_tokenizer_style_dict_and_streams(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids, mask = random_batch(14, 2, 5, ref.config.vocab_size, pad_left=[0, 1])
    seen = []
    out = model.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=8, eos_token_id=[],
                         callback=lambda toks: seen.append(toks.copy()))
    assert len(seen) == 8
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 5:])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, v):
            self.puts.append(np.asarray(v))

        def end(self):
            self.ended = True

    rec = Recorder()
    out1 = model.generate(ids[:1], max_new_tokens=5, eos_token_id=[], streamer=rec)
    assert rec.ended and len(rec.puts) == 6
    np.testing.assert_array_equal(rec.puts[0], ids[:1])  # the prompt first, like transformers
    np.testing.assert_array_equal(np.concatenate(rec.puts[1:]), out1[0, 5:])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids, _ = random_batch(15, 2, 6, ref.config.vocab_size)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[])
    a = model.generate(ids, seed=123, **kw)
    b = model.generate(ids, seed=123, **kw)
    c = model.generate(ids, seed=124, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = model.generate(ids, max_new_tokens=16, eos_token_id=[])
    topk1 = model.generate(ids, do_sample=True, top_k=1, temperature=0.7, seed=5, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(topk1, greedy)


def _params(**kw):
    base = dict(max_new_tokens=1, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, eos_token_ids=[], pad_token_id=0, seed=7)
    base.update(kw)
    return _C.SamplingParams(**base)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_sampled_frequencies_follow_softmax_of_scaled_logits():
    """200,000 draws over 8 tokens at temperature 0.7. Each frequency is binomial with
    sd = sqrt(p (1-p) / n) <= 0.0012; a bound of 5 sd (0.006) fails by chance with
    probability < 1e-5 per token, and the seed is fixed."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(8).astype(np.float32) * 2
    n = 200_000
    draws = _testing.sample(logits, n, _params(temperature=0.7))
    freq = np.bincount(draws, minlength=8) / n
    expect = _softmax(logits.astype(np.float64) / 0.7)
    assert np.abs(freq - expect).max() < 0.006


def test_top_p_and_min_p_never_leave_their_set():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)
    p = _softmax(logits.astype(np.float64))
    order = np.argsort(-p)
    # top-p 0.6: the smallest prefix (by descending probability) whose mass reaches 0.6.
    above = np.concatenate([[0], np.cumsum(p[order])[:-1]])
    top_p_set = set(order[above < 0.6].tolist())
    draws = _testing.sample(logits, 20000, _params(top_p=0.6))
    assert set(draws.tolist()) <= top_p_set
    assert len(set(draws.tolist())) == len(top_p_set)  # and every member is reachable
    # min-p 0.2: tokens with probability >= 0.2 * the largest.
    min_p_set = set(np.nonzero(p >= 0.2 * p.max())[0].tolist())
    draws = _testing.sample(logits, 20000, _params(min_p=0.2))
    assert set(draws.tolist()) <= min_p_set
    # top-k 3 keeps exactly the three largest.
    draws = _testing.sample(logits, 20000, _params(top_k=3))
    assert set(draws.tolist()) == set(order[:3].tolist())


def test_repetition_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(30) * 2).astype(np.float32)
    history = [3, 3, 7, 11, 0]
    proc = RepetitionPenaltyLogitsProcessor(penalty=1.7)
    penalized = proc(torch.tensor([history]), torch.tensor(logits[None].copy()))[0].numpy()
    # Greedy after the penalty picks transformers' argmax...
    got = _testing.sample(logits, 1, _params(do_sample=False, repetition_penalty=1.7), history)
    assert got[0] == int(np.argmax(penalized))
    # ...and sampling follows the penalized distribution (same 5-sd bound as above).
    n = 100_000
    freq = np.bincount(_testing.sample(logits, n, _params(repetition_penalty=1.7), history), minlength=30) / n
    assert np.abs(freq - _softmax(penalized.astype(np.float64))).max() < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5, do_sample=True), "temperature"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=-1, do_sample=True), "top_k"),
    (dict(min_p=2.0, do_sample=True), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=200), "max_position_embeddings"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        model.generate([[5, 6, 7]], **kwargs)


def test_generate_refuses_right_padding(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="left padding"):
        model.generate([[5, 6, 0]], attention_mask=[[1, 1, 0]], max_new_tokens=2)


def test_repetition_penalty_generate_matches_transformers_with_left_padding(tiny):
    """transformers skips the left padding of each row when penalising (prompt_ignore_length)."""
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(16, 2, 8, ref.config.vocab_size, pad_left=[0, 3])
    theirs = hf_generate(ref, ids, mask, eos_token_id=ref.config.vocab_size + 5, repetition_penalty=1.8)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, eos_token_id=[], repetition_penalty=1.8)
    np.testing.assert_array_equal(ours, theirs)


def test_top_k_none_turns_top_k_off(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=3.0, eos_token_id=[], seed=3)
    assert (model.generate([[5, 6]], top_k=None, **kw) == model.generate([[5, 6]], top_k=0, **kw)).all()
    assert (model.generate([[5, 6]], top_k=np.int64(1), **kw) == model.generate([[5, 6]], max_new_tokens=12,
                                                                                  eos_token_id=[])).all()


def test_untied_lm_head_is_used(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mha", tie_word_embeddings=False)
    assert not ref.config.tie_word_embeddings
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(17, 1, 9, ref.config.vocab_size)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    from conftest import rel_err
    assert rel_err(model(ids).logits, theirs) <= 1e-4


def test_bf16_kv_cache_stays_close_and_generates(tiny):
    """Keys and values rounded to bf16 (relative error <= 2^-9 each): logits stay within
    1% of the float32 cache's at every real position, and greedy decoding runs."""
    from conftest import rel_err

    folder, ref = tiny("GemmaForCausalLM", "gqa", initializer_range=0.05)
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, kv_cache_dtype="bfloat16")
    assert b.kv_cache_dtype == "bfloat16"
    ids, mask = random_batch(18, 2, 30, ref.config.vocab_size, pad_left=[0, 7])
    real = mask.astype(bool)
    la, lb = a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits
    assert 0 < rel_err(lb, la, real) <= 1e-2
    out = b.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert out.shape == (2, 46)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, kv_cache_dtype="int4")


def test_int8_kv_cache_stays_close_and_generates(tiny):
    """Keys and values as Q8_0 blocks of 32 (error <= amax / 254 per value, 2^-8 of the
    block's largest where bf16 errs by 2^-9 of each value): logits stay within 1% of the
    float32 cache's (measured 0.18%, bf16's 0.05%), the int8 cache's own prefill and decode
    agree, and a head_dim that is not a multiple of 32 is refused."""
    from conftest import rel_err

    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, kv_cache_dtype="int8")
    assert b.kv_cache_dtype == "int8"
    ids, mask = random_batch(19, 2, 40, ref.config.vocab_size, pad_left=[0, 9])
    real = mask.astype(bool)
    la, lb = a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits
    assert 0 < rel_err(lb, la, real) <= 1e-2
    out = b.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (2, 52)
    # The last generated token's logits from a forward over the whole sequence (prefill reads
    # the int8 cache) match the decode step's choice where it is not a near-tie.
    full = b(out[:, :-1], attention_mask=np.concatenate([mask, np.ones((2, 11), mask.dtype)], axis=1)).logits[:, -1]
    top2 = np.sort(full, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert clear.any() and (full.argmax(-1)[clear] == out[clear, -1]).all()
    odd, _ = tiny("GemmaForCausalLM", "gqa")  # head_dim 24
    with pytest.raises(ValueError, match="multiple of 32"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(odd, kv_cache_dtype="int8")


def test_eval_to_and_the_streamer_as_transformers(tiny_chat, torch, capsys):
    # transformers: eval() and to(its device / dtype) return the model; TextStreamer prints the
    # prompt too unless skip_prompt=True. Here the same, and what cannot be done in place says how.
    transformers = pytest.importorskip("transformers")
    folder, model, tok = tiny_chat
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager")
    assert ref.eval() is ref and ref.to("cpu") is ref and ref.to(torch.float32) is ref
    assert model.eval() is model and model.dtype == "float32"
    for args, kwargs in (((), {"device": "cpu"}), (("cpu",), {}), ((torch.float32,), {}), (("cpu", torch.float32), {}),
                         ((torch.device("cpu"),), {}), ((), {"dtype": "float32", "non_blocking": True})):
        assert model.to(*args, **kwargs) is model
    with pytest.raises(ValueError, match=r"runs in float32; load it in another with from_pretrained\(\.\.\., dtype="):
        model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        model.to("tpu")
    with pytest.raises((RuntimeError, ValueError), match="CUDA cannot run here|load it there with"):
        model.to("cuda")
    with pytest.raises(TypeError, match="memory_format"):
        model.to("cpu", memory_format=None)
    # The same printed text as transformers' streamer, prompt or not (ours prints each token's
    # text at once; theirs waits for a word's end: the whole is the same).
    ids = tok("Hello there, how")["input_ids"]
    for kwargs in ({}, {"skip_prompt": True}, {"skip_prompt": True, "skip_special_tokens": True}):
        model.generate([ids], max_new_tokens=6, eos_token_id=[], streamer=gemma_cpp.TextStreamer(tok, **kwargs))
        ours = capsys.readouterr().out
        ref.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                     streamer=transformers.TextStreamer(tok, **kwargs))
        assert ours == capsys.readouterr().out, kwargs
    with pytest.raises(ValueError, match="streams one sequence, and generate\\(\\) was given 2"):
        model.generate([ids, ids], max_new_tokens=2, streamer=gemma_cpp.TextStreamer(tok))
