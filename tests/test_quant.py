"""int8 / int4 / int4m weights: formats against the numpy mirror, kernels against float64,
models against their float32 selves."""
import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C
from gemma_cpp._C import _testing
from gemma_cpp.quant import deinterleave, dequantize, interleave, quantize, resolve_policy, unpack_nibbles
from conftest import available_paths, random_batch

FORMATS = ["int8", "int4", "int4m"]


def awkward_matrix(rows, K, seed):
    """Random rows over many magnitudes, plus blocks that are all equal, all zero, hold one
    huge value, or values near fp16's smallest scales."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, K)) * 10.0 ** rng.integers(-4, 4, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.37
    w[1 % rows, :32] = 0.0
    w[2 % rows, 5] = 6.0e4
    w[3 % rows, :32] *= 1e-5
    w[4 % rows, 32:64] = -2.5
    return w


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("K", [32, 64, 96, 640, 2048])
def test_cpp_quantizer_matches_numpy_mirror_byte_for_byte(fmt, K):
    w = awkward_matrix(9, K, K)
    ours = _C.quantize(w, fmt)
    mirror = quantize(w, fmt)
    assert ours[0] == mirror[0] == fmt
    assert len(ours) == len(mirror) == (4 if fmt == "int4m" else 3)
    for a, b in zip(ours[1:], mirror[1:]):  # quants, scales (, mins)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_testing.dequantize(ours, K), dequantize(mirror, K))
    # bf16 input is quantized from its exact float32 values
    from gemma_cpp._dtypes import bf16_bits_to_f32, f32_to_bf16_bits
    bits = f32_to_bf16_bits(w)
    np.testing.assert_array_equal(_C.quantize(bits, fmt)[1], quantize(bf16_bits_to_f32(bits), fmt)[1])


@pytest.mark.parametrize("fmt, rows, K", [("int8", 37, 96), ("int4", 48, 160), ("int4m", 16, 64), ("int8", 5, 64)])
def test_rows_are_interleaved_in_groups_of_16(fmt, rows, K):
    """quant.h's row order, checked position by position from its definition: in a whole group
    g, quant word c (4 bytes) of row 16 g + i sits at byte 64 c + 4 i of the group, scale b at
    16 b + i; rows after the last whole group are plain. deinterleave undoes it."""
    plain = quantize(awkward_matrix(rows, K, rows + K), fmt)
    plain = (fmt,) + deinterleave(plain)[1:]
    ours = _C.quantize(awkward_matrix(rows, K, rows + K), fmt)
    q, d = plain[1], plain[2]
    qb, nb, full = q.shape[1], d.shape[1], rows // 16 * 16
    flat_q, flat_d = ours[1].reshape(-1), ours[2].reshape(-1)
    for r in range(rows):
        g, i = divmod(r, 16)
        for c in range(qb // 4):
            at = g * 16 * qb + 64 * c + 4 * i if r < full else r * qb + 4 * c
            np.testing.assert_array_equal(flat_q[at: at + 4], q[r, 4 * c: 4 * c + 4])
        for b in range(nb):
            assert flat_d[g * 16 * nb + 16 * b + i if r < full else r * nb + b] == d[r, b]
    if fmt == "int4m":
        flat_m = ours[3].reshape(-1)
        for r in range(full):
            g, i = divmod(r, 16)
            assert all(flat_m[g * 16 * nb + 16 * b + i] == plain[3][r, b] for b in range(nb))
    # The numpy mirror and the engine's threaded version (GGUF imports, older files), both ways.
    for a, b, c in zip(interleave(plain)[1:], _C.interleave(plain)[1:], ours[1:]):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    for a, b in zip(_C.interleave(ours, to_groups=False)[1:], plain[1:]):
        np.testing.assert_array_equal(a, b)
    # One row back (the embedding lookup) and the whole matrix, from the interleaved bytes.
    np.testing.assert_array_equal(_testing.dequantize(ours, K), dequantize(ours, K))


def test_values_are_gguf_q8_0_q4_0_and_q4_1():
    """The `gguf` package's own quantizers (numpy ports of ggml's) give the same values."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = awkward_matrix(6, 256, 7)
    for fmt, qtype in (("int8", gguf.GGMLQuantizationType.Q8_0), ("int4", gguf.GGMLQuantizationType.Q4_0),
                       ("int4m", gguf.GGMLQuantizationType.Q4_1)):
        theirs = quants.dequantize(quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(dequantize(quantize(w, fmt), 256), theirs)


def quant_bound(x, wd, terms=None):
    """|y - x . wd^T| for the quantized kernel. Activations are rounded per block b of 32 to
    multiples of dx_b = amax_b / 127, an error of at most dx_b / 2 per element, so
    |error| <= sum_b dx_b / 2 * sum_{i in b} |w_i|; float32 sums of K terms add at most
    K * 2^-23 * sum |x_i| t_i (a loose gamma_K), t_i the magnitude of what the kernel adds
    for weight i: |w_i| (default), or |d q_i| + |m| for int4m (term_magnitudes), whose
    products and offsets are summed apart and may cancel."""
    T, K = x.shape
    dx = np.abs(x.reshape(T, K // 32, 32)).max(axis=2).astype(np.float64) / 127
    wabs = np.abs(wd).reshape(wd.shape[0], K // 32, 32).sum(axis=2)
    terms = np.abs(wd) if terms is None else terms
    return dx / 2 @ wabs.T + K * 2.0 ** -23 * (np.abs(x).astype(np.float64) @ terms.T)


def term_magnitudes(qw, K):
    """|d q_i| + |m_b| of an int4m weight (float64 [rows, K]); |w| for the other formats."""
    if qw[0] != "int4m":
        return np.abs(dequantize(qw, K)).astype(np.float64)
    qw = deinterleave(qw)
    rows, nb = qw[2].shape
    d = qw[2].view(np.float16).astype(np.float64)[..., None]
    m = qw[3].view(np.float16).astype(np.float64)[..., None]
    q = unpack_nibbles(qw[1], nb).astype(np.float64)
    return (np.abs(d * q) + np.abs(m) + np.zeros_like(q)).reshape(rows, K)


def quant_paths():
    return available_paths(_testing.set_quant_matmul_path, ("scalar", "avx2", "avx512_vnni"))


@pytest.mark.parametrize("path", quant_paths())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T, K, N", [(1, 32, 3), (1, 2048, 37), (2, 96, 10), (4, 640, 8), (7, 256, 9), (33, 128, 5),
                                     # 16-row groups: 4 side by side (decode), single ones, then the tail
                                     (1, 640, 200), (1, 2080, 80), (1, 96, 16), (3, 2080, 67), (5, 96, 48)])
def test_quantized_matmul_within_bound(path, fmt, T, K, N):
    rng = np.random.default_rng(T * 7 + K + N)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    check_within_bound(path, x, quantize(rng.standard_normal((N, K)).astype(np.float32), fmt))


def check_within_bound(path, x, qw):
    """x . qw^T on the pinned path, every output written (poisoned first) and within the bound
    of the float64 product on the dequantized weights."""
    T, K = x.shape
    wd = dequantize(qw, K).astype(np.float64)
    out = np.full((T, wd.shape[0]), np.nan, np.float32)
    _testing.set_quant_matmul_path(path)
    try:
        _testing.matmul(x, qw, out)
    finally:
        _testing.set_quant_matmul_path("auto")
    assert np.isfinite(out).all()
    assert np.all(np.abs(out - x.astype(np.float64) @ wd.T) <= quant_bound(x, wd, term_magnitudes(qw, K)))


def offset_matrix(rows, K, seed):
    """Rows with a shift of their own (-6..6) on top of unit noise: int4m blocks whose min
    dominates their steps, as in Q4_1 tensors of real models."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, K)) * rng.uniform(0.05, 2, (rows, 1)) + rng.uniform(-6, 6, (rows, 1))
    return w.astype(np.float32)


@pytest.mark.parametrize("path", quant_paths())
@pytest.mark.parametrize("K", [96, 640, 2080])  # 3, 20 and 65 blocks: a lone last block, and not
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 15, 16, 33])
def test_int4m_matmul_every_path_within_bound(path, T, K):
    """int4m on each integer path (pinned, so T >= 16 stays off AMX too): decode (T = 1: 8-row
    groups, then the rows left over), the multi-token kernel (T 2..15) and T >= 16, against
    float64 on the dequantized weights; N = 37 leaves 5 rows after the groups of 8 / 4."""
    rng = np.random.default_rng(T * 131 + K)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    check_within_bound(path, x, quantize(offset_matrix(37, K, T + K), "int4m"))


@pytest.mark.parametrize("path", quant_paths() + ["auto"])
@pytest.mark.parametrize("T, K", [(1, 96), (1, 2080), (4, 640), (15, 2080), (16, 96), (40, 2080)])
def test_int4_is_int4m_with_min_minus_8d(path, T, K):
    """The kernels take int4 as int4m with the offset -8 d: the same matrix given as int4m with
    mins = -8 d (exact in fp16) gives bit-identical outputs on every path (auto: AMX from 16
    tokens where the CPU has it)."""
    rng = np.random.default_rng(T + K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    q4 = quantize(rng.standard_normal((70, K)).astype(np.float32), "int4")
    mins = (q4[2].view(np.float16) * np.float16(-8)).view(np.uint16)
    as4m = ("int4m", q4[1], q4[2], mins)
    np.testing.assert_array_equal(dequantize(as4m, K), dequantize(q4, K))
    _testing.set_quant_matmul_path(path)
    try:
        a, b = _testing.matmul(x, q4), _testing.matmul(x, as4m)
    finally:
        _testing.set_quant_matmul_path("auto")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_testing.dequantize(as4m, K), _testing.dequantize(q4, K))


def cosine_rows(a, b):
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# Measured on this random model (init 0.05, 384 positions): int8 worst-row cosine 0.9999,
# int4 0.981, int4m 0.983; top-1 agreement 100% for all three. Random weights keep much of each token's own
# embedding in its output, which makes top-1 easy; test_2b_shaped_layer_int8 below checks
# the layer's own contribution instead. int4 bounds leave margin under what we measured.
BOUNDS = {"int8": (0.999, 0.99), "int4": (0.97, 0.95), "int4m": (0.97, 0.95)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_logits_stay_close_to_float32(tiny, fmt):
    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    f32 = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    q = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization=fmt)
    assert q.quantization == {"embed": fmt, "attention": fmt, "mlp": fmt}
    ids, _ = random_batch(40, 6, 64, ref.config.vocab_size)  # 384 positions
    a, b = f32(ids).logits, q(ids).logits
    cos_min, top1_min = BOUNDS[fmt]
    assert cosine_rows(a, b).min() >= cos_min
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= top1_min


def test_2b_shaped_layer_int8(tmp_path):
    """One decoder layer of Gemma-2B's shape (hidden 2048, 8 heads x 256, 1 KV head, ffn
    16384), random weights at transformers' init scale: what the layer adds to the residual
    stream, int8 against float32, over 64 positions: cosine >= 0.999 at every position."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    H, F, hd, V = 2048, 16384, 256, 512
    cfg = gemma_cpp.GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=1,
                                num_attention_heads=8, num_key_value_heads=1, head_dim=hd,
                                max_position_embeddings=128)
    cfg.save_pretrained(tmp_path)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    p = "model.layers.0."
    save_file({"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H),
               p + "self_attn.q_proj.weight": w(8 * hd, H), p + "self_attn.k_proj.weight": w(hd, H),
               p + "self_attn.v_proj.weight": w(hd, H), p + "self_attn.o_proj.weight": w(H, 8 * hd),
               p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
               p + "mlp.down_proj.weight": w(H, F), p + "input_layernorm.weight": w(H),
               p + "post_attention_layernorm.weight": w(H)}, tmp_path / "model.safetensors")
    ids = rng.integers(0, V, size=(1, 64))
    outs = []
    for q in (None, "int8"):
        m = gemma_cpp.GemmaModel.from_pretrained(tmp_path, quantization=q)
        hs = m(ids, output_hidden_states=True).hidden_states
        outs.append(hs[1] - hs[0])  # the layer's contribution
    assert cosine_rows(outs[0], outs[1]).min() >= 0.999


def test_mixed_policy_and_greedy_generation(tiny):
    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization={"layers": "int4", "embed": "int8"})
    assert m.quantization == {"embed": "int8", "attention": "int4", "mlp": "int4"}
    # 2 x 7 prompt tokens: under the 16 from which prefill moves to AMX tiles, so the batch
    # and the lone row run the same integer kernels and must agree exactly.
    ids, mask = random_batch(41, 2, 7, ref.config.vocab_size, pad_left=[0, 3])
    out = m.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert out.shape == (2, 7 + 24)
    alone = m.generate(ids[1:, 3:], max_new_tokens=24, eos_token_id=[])
    np.testing.assert_array_equal(alone[0, -24:], out[1, -24:])


@pytest.mark.parametrize("cls_name, extra", [("GemmaForSequenceClassification", dict(num_labels=3)),
                                             ("GemmaForTokenClassification", dict(num_labels=4)),
                                             ("GemmaForCausalLM", {})])
def test_every_head_runs_quantized(tiny, cls_name, extra):
    folder, ref = tiny(cls_name, "q32", initializer_range=0.05, **extra)
    ids, mask = random_batch(42, 3, 12, ref.config.vocab_size, pad_left=[0, 2, 5])
    heads = {"GemmaForCausalLM": gemma_cpp.GemmaModel}
    cls = heads.get(cls_name, getattr(gemma_cpp, cls_name))
    f32 = cls.from_pretrained(folder, dtype="float32")
    q8 = cls.from_pretrained(folder, quantization="int8")
    key = "last_hidden_state" if cls is gemma_cpp.GemmaModel else "logits"
    a, b = f32(ids, attention_mask=mask)[key], q8(ids, attention_mask=mask)[key]
    real = mask.astype(bool) if a.ndim == 3 else slice(None)
    assert cosine_rows(a[real], b[real]).min() >= 0.999


def test_bad_quantization_arguments(tiny):
    folder, _ = tiny("GemmaForCausalLM", "q32")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization="int3")
    with pytest.raises(ValueError, match="unknown group"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization={"lm": "int8"})
    odd, _ = tiny("GemmaForCausalLM", "gqa")  # hidden 72: not a multiple of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(odd, quantization="int8")
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.quantize(np.ones((2, 40), np.float32), "int8")
    with pytest.raises(ValueError, match="expected one of 'int8', 'int4', 'int4m', 'q4_k', 'q5_k', 'q6_k'"):
        _C.quantize(np.ones((2, 64), np.float32), "q5")
    q = quantize(np.ones((2, 64), np.float32), "int4m")
    with pytest.raises(ValueError, match=r"\(format, quants, scales, mins\)"):
        _testing.matmul(np.ones((1, 64), np.float32), q[:3])
    with pytest.raises(ValueError, match="mins must be"):
        _testing.matmul(np.ones((1, 64), np.float32), q[:3] + (q[3][:, :1].copy(),))
    assert resolve_policy(None) == {"embed": None, "attention": None, "mlp": None, "experts": None,
                                    "per_layer_inputs": None}
    # "layers": every group but the embedding, Gemma 4's experts and per-layer inputs included
    assert resolve_policy({"layers": "int4", "embed": "int8"}) == {"embed": "int8", "attention": "int4",
                                                                  "mlp": "int4", "experts": "int4",
                                                                  "per_layer_inputs": "int4"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T, K, N", [(16, 64, 32), (33, 256, 70), (64, 2048, 96), (16, 96, 37), (40, 2080, 70),
                                     (16, 96, 53)])  # AMX takes 32 rows; a whole group + 5 plain rows remain
def test_quantized_prefill_on_amx_within_bound(fmt, T, K, N):
    """From 16 tokens on, where AMX exists, quantized weights are dequantized to bf16 into
    AMX tiles: the product is then of bf16(x) and bf16(d * q), summed in float32, so the
    reference is float64 on exactly those values and the bound is gamma_K (rows past the
    last multiple of 32 take the integer path: the activation-rounding bound)."""
    if _testing.bf16_matmul_path() != "amx":
        pytest.skip("this CPU has no AMX: quantized prefill runs on the integer kernels tested above")
    from gemma_cpp._dtypes import bf16_bits_to_f32, f32_to_bf16_bits

    rng = np.random.default_rng(T + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = offset_matrix(N, K, T + K + N) if fmt == "int4m" else rng.standard_normal((N, K)).astype(np.float32)
    qw = quantize(w, fmt)
    wd = dequantize(qw, K)
    out = np.full((T, N), np.nan, np.float32)
    _testing.matmul(x, qw, out)
    assert np.isfinite(out).all()
    n32 = N - N % 32
    xb = bf16_bits_to_f32(f32_to_bf16_bits(x)).astype(np.float64)
    wb = bf16_bits_to_f32(f32_to_bf16_bits(wd[:n32])).astype(np.float64)
    gamma = K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
    assert np.all(np.abs(out[:, :n32] - xb @ wb.T) <= gamma * (np.abs(xb) @ np.abs(wb).T))
    rest = wd[n32:].astype(np.float64)
    bound = quant_bound(x, rest, term_magnitudes(qw, K)[n32:])
    assert np.all(np.abs(out[:, n32:] - x.astype(np.float64) @ rest.T) <= bound)
