"""Batch invariance: a decode row's logits are the same bits whether it is decoded alone or
beside other rows. Kernels are chosen by the kind of work (decode or prefill), never by how
many rows share a step (kernels.h, Work); the serving scheduler relies on it."""
import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C
from gemma_cpp._C import _testing
from conftest import available_paths

QUANT_PATHS = ("auto", "scalar", "avx2", "avx512_vnni")
BF16_PATHS = ("auto", "generic", "avx512_bf16", "amx")


def _weights(fmt, rng, N, K):
    w = rng.standard_normal((N, K)).astype(np.float32)
    if fmt == "float32":
        return w
    if fmt == "bfloat16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    return _C.quantize(w, fmt)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4", "int4m"])
def test_decode_matmul_rows_do_not_depend_on_the_batch(fmt):
    # 59 rows: three interleaved groups of 16 and a plain tail of 11; K = 96: three blocks of
    # 32, so int4's last block pair is a lone block. 16 rows of x: AMX's threshold included.
    rng = np.random.default_rng(7)
    N, K = 59, 96
    w = _weights(fmt, rng, N, K)
    x = (rng.standard_normal((16, K)) * 3).astype(np.float32)
    quantized = fmt.startswith("int")
    setter = _testing.set_quant_matmul_path if quantized else _testing.set_bf16_matmul_path
    paths = ["auto"] if fmt == "float32" else available_paths(setter, QUANT_PATHS if quantized else BF16_PATHS)
    try:
        for path in paths:
            if fmt != "float32":
                setter(path)
            full = _testing.matmul(x, w, decode=True)
            assert np.isfinite(full).all()
            for T in (1, 2, 3, 4, 5, 8, 13, 15):
                np.testing.assert_array_equal(_testing.matmul(x[:T], w, decode=True), full[:T],
                                              err_msg=f"{fmt} on {path}: the first {T} rows")
            for t in (0, 6, 15):
                np.testing.assert_array_equal(_testing.matmul(x[t:t + 1], w, decode=True)[0], full[t],
                                              err_msg=f"{fmt} on {path}: row {t} alone")
            # The same rows in another order: each row's bits are its own.
            perm = rng.permutation(16)
            np.testing.assert_array_equal(_testing.matmul(x[perm], w, decode=True), full[perm])
    finally:
        if fmt != "float32":
            setter("auto")


def test_pooled_argmax_is_the_first_maximum():
    rng = np.random.default_rng(3)
    n = 262144 + 5
    for case in range(6):
        x = rng.standard_normal(n).astype(np.float32)
        if case == 1:  # ties across the pool's parts: the first index wins
            x[[70000, 10, 200000]] = 9.0
        if case == 2:  # NaNs are skipped, even a whole part of them
            x[:100000] = np.nan
        if case == 3:
            x[:] = -np.inf
        if case == 4:
            x[:] = np.nan
            x[123456] = -5.0
        if case == 5:
            x[n - 1] = 50.0
        want = 0 if np.isnan(x).all() else int(np.nanargmax(x))
        assert _testing.argmax(x, pooled=True) == want, case
        assert _testing.argmax(x, pooled=False) == want, case
    assert _testing.argmax(np.full(40000, np.nan, np.float32), pooled=True) == 0


@pytest.fixture(scope="module")
def gemma3_tail(tiny):
    # Gemma 3 with sliding windows, every input size a multiple of 32, and a vocabulary of
    # 1020 = 63 groups of 16 + a tail of 12 rows (the tail kernels in the LM head).
    return tiny("Gemma3ForCausalLM", "q32", arch="gemma3", vocab_size=1020)


def _decode_logits(model, ids, mask=None, n=5, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, np.stack(out.logits, axis=1)  # [B, steps, vocab]


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_generate_logits_are_the_same_bits_alone_and_in_any_batch(gemma3_tail, weights):
    folder, ref = gemma3_tail
    kw = dict(quantization=weights) if weights.startswith("int") else dict(dtype=weights)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, **kw)
    rng = np.random.default_rng(11)
    V = ref.config.vocab_size
    ids = rng.integers(3, V, size=(16, 20)).astype(np.int64)
    alone = [_decode_logits(model, ids[r:r + 1]) for r in range(16)]
    for B in (2, 7, 16):
        seqs, logits = _decode_logits(model, ids[:B])
        for r in range(B):
            np.testing.assert_array_equal(seqs[r], alone[r][0][0], err_msg=f"{weights}: row {r} of {B}")
            np.testing.assert_array_equal(logits[r], alone[r][1][0], err_msg=f"{weights}: row {r} of {B}")
    # Left padding (prompts of 6-20 tokens in one batch): each row still decodes its own bits.
    lengths = rng.integers(6, 21, size=16)
    padded = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        padded[r, 20 - n:] = ids[r, :n]
        mask[r, 20 - n:] = 1
    seqs, logits = _decode_logits(model, padded, mask)
    for r in (0, 5, 15):
        seq_alone, logits_alone = _decode_logits(model, ids[r:r + 1, :lengths[r]])
        np.testing.assert_array_equal(seqs[r, 20:], seq_alone[0, lengths[r]:], err_msg=f"{weights}: padded row {r}")
        np.testing.assert_array_equal(logits[r], logits_alone[0], err_msg=f"{weights}: padded row {r}")
    assert len({tuple(s) for s in seqs[:, 20:].tolist()}) > 8, "degenerate: rows generate alike"


def test_batched_sampling_draws_each_row_from_its_own_stream(gemma3_tail):
    # Rows sample on the thread pool; a row's draws depend on the seed and its row only.
    folder, ref = gemma3_tail
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids = np.random.default_rng(5).integers(3, ref.config.vocab_size, size=(8, 12)).astype(np.int64)
    kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=1.5, top_k=0, seed=42)
    batch = model.generate(ids, **kw)
    again = model.generate(ids, **kw)
    np.testing.assert_array_equal(batch, again)
    first = model.generate(ids[:1], **kw)  # row 0's stream is the same with or without the others
    np.testing.assert_array_equal(first[0], batch[0])
    assert len({tuple(r) for r in batch[:, 12:].tolist()}) == 8


def test_output_logits_match_transformers(tiny):
    torch = pytest.importorskip("torch")
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids = np.random.default_rng(2).integers(3, ref.config.vocab_size, size=(2, 9)).astype(np.int64)
    seqs, ours = _decode_logits(model, ids, n=6)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids), do_sample=False, max_new_tokens=6, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=ref.config.vocab_size + 5,
                              pad_token_id=0)
    np.testing.assert_array_equal(seqs, theirs.sequences.numpy())
    want = torch.stack(theirs.logits, dim=1).numpy()
    assert ours.shape == want.shape == (2, 6, ref.config.vocab_size)
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()


def test_output_logits_of_finished_rows_are_nan(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids = np.random.default_rng(13).integers(3, ref.config.vocab_size, size=(2, 6)).astype(np.int64)
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6 + 1])  # row 0 stops at its 2nd new token
    if eos in free[1, 6:].tolist():
        pytest.skip("the stop token also appears in row 1")
    out = model.generate(ids, max_new_tokens=8, eos_token_id=[eos], output_logits=True, return_dict_in_generate=True)
    assert len(out.logits) == out.sequences.shape[1] - 6 == 8
    assert np.isfinite(out.logits[1][0]).all() and np.isnan(out.logits[2][0]).all()
    assert all(np.isfinite(step[1]).all() for step in out.logits)
    assert int(np.argmax(out.logits[1][0])) == eos
    # Without return_dict_in_generate, the ids alone (as transformers).
    plain = model.generate(ids, max_new_tokens=8, eos_token_id=[eos], output_logits=True)
    np.testing.assert_array_equal(plain, out.sequences)
