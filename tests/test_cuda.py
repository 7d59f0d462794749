"""CUDA kernels, op by op: each against the CPU engine's result and against a float64 numpy
reference on fresh random inputs, with tolerances derived from the operands. The device
outputs are filled with NaN bytes before every op (the test hooks in csrc/bindings/cuda.cpp
do it), so an element a kernel does not write fails the isfinite checks.

Without a usable GPU every GPU test skips with gemma_cpp.cuda_status()'s reason. What runs
everywhere: the status API, the CPU engine, and the float64 references themselves checked
against the CPU engine's twins, so that a GPU run starts from oracles known to be right.

U below is float32's unit roundoff 2^-24; gamma(n) = n U / (1 - n U) bounds the relative
error of an n-term float32 sum in any order (Higham, Thm 3.1)."""
import os
import zlib

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C
from gemma_cpp._C import _testing
from gemma_cpp._dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from gemma_cpp.quant import deinterleave, quantize
from gemma_cpp.quant import dequantize as dequantize_q

STATUS = gemma_cpp.cuda_status()
BUILT = STATUS["built"]
gpu = pytest.mark.skipif(not STATUS["available"], reason=f"CUDA not available: {STATUS['reason']}")
built = pytest.mark.skipif(not BUILT, reason=f"built without CUDA: {STATUS['reason']}")

U = 2.0 ** -24


def gamma(n):
    return n * U / (1 - n * U)


def rng_for(*key):
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def bf16_round(x):
    return bf16_bits_to_f32(f32_to_bf16_bits(np.asarray(x, np.float32)))


def assert_within(got, ref, bound, what):
    got = np.asarray(got)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: {np.size(got) - np.isfinite(got).sum()} non-finite (unwritten?) elements"
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
                                  f"(got {got[worst]!r}, ref {ref[worst]!r})")


# ---------------------------------------------------------------------------------------
# float64 references (the CPU engine's rules), with their error bounds for float32 kernels

def rmsnorm_ref(x, w, eps):
    """x * rsqrt(mean(x^2) + eps) * w and the bound: sum of H squares gamma(H + 1), mean,
    + eps, sqrt (halves the relative error, adds U), reciprocal, two products:
    |err| <= ((H + 1) / 2 + 6) U |ref|."""
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + np.float64(np.float32(eps)))
    ref = x64 * inv * w.astype(np.float64)
    H = x.shape[-1]
    return ref, ((H + 1) / 2 + 6) * 1.01 * U * np.abs(ref) + 1e-38


def geglu_ref(a, b):
    """gelu_tanh(a) * b and the bound. The kernels compute a / (1 + exp(z)), z = -2u(a) in
    float32: z carries <= 5U |z| absolute error (a^2, fma, the product, the two rounded
    constants), which exp turns into relative error; expf adds 2 ulp (4U), then 1 + e, the
    division and the product one U each: |err| <= (5 |z| + 8) U |ref|, plus 2^-120 |b| for
    results at the edge of float32's range (exp(z) overflows past z = 88.7)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (a64 + 0.044715 * a64 ** 3)
    with np.errstate(over="ignore"):
        ref = a64 / (1 + np.exp(-2 * u)) * b64  # = 0.5 a (1 + tanh u) b without its cancellation
    return ref, (5 * np.abs(2 * u) + 8) * 1.01 * U * np.abs(ref) + 2.0 ** -120 * (1 + np.abs(b64))


def inv_freq_table(hd, theta=10000.0, factor=1.0):
    """The engine's float32 table: 1 / theta ** (2i / hd), then / factor (Model::Model)."""
    e = (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)).astype(np.float32)
    f = (np.float32(1) / np.power(np.float32(theta), e, dtype=np.float32)).astype(np.float32)
    return (f / np.float32(factor)).astype(np.float32) if factor != 1.0 else f


def rope_ref(x, pos, inv_freq, n_heads, norm=None, eps=1e-6):
    """x [M, n_heads * hd] rotated (half-split layout) in float64, the angle float32(pos) *
    inv_freq rounded to float32 as both engines compute it; optional per-head RMSNorm first.
    Bound per element: cos / sin within 2 ulp (4U) each, two products and a sum (3U), on
    |x1 cos| + |x2 sin|; a norm first adds its own relative bound on x1 and x2."""
    M = x.shape[0]
    hd = x.shape[1] // n_heads
    half = hd // 2
    v = x.reshape(M, n_heads, hd).astype(np.float64)
    rel = 7.0
    if norm is not None:
        v = v / np.sqrt((v * v).mean(axis=-1, keepdims=True) + np.float64(np.float32(eps))) * norm.astype(np.float64)
        rel += (hd + 1) / 2 + 6
    ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32).astype(np.float64)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = v[..., :half], v[..., half:]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    mag = np.concatenate([np.abs(x1 * c) + np.abs(x2 * s), np.abs(x2 * c) + np.abs(x1 * s)], axis=-1)
    return ref.reshape(M, -1), (rel * 1.01 * U * mag + 1e-38).reshape(M, -1)


def visible(q_slot, S, valid, causal, window, end_slot):
    """The slots a query at q_slot sees (Model::attention): causal k <= q (else k < end_slot),
    window: q - window < k (and k < q + window when not causal), and valid[k]."""
    k = np.arange(S)
    vis = valid[:S].astype(bool) & (k <= q_slot if causal else k < end_slot)
    if window > 0:
        vis &= k > q_slot - window
        if not causal:
            vis &= k < q_slot + window
    return vis


def attention_ref(q, K, V, valid, q_slots, n_heads, scale, softcap=0.0, window=0, causal=True, end_slot=None):
    """One cache row. q [Tq, n_heads * hd] at slots q_slots; K, V [n_kv, S, hd]; valid [S].
    Returns out [Tq, n_heads * hd] and the bound.

    Bound for float32 kernels: a score s_j = scale q.k_j carries
    d_j <= gamma(hd) scale sum_e |q_e k_je| + 2U |s_j| (the scaling, tanh's 2 ulp; tanh's
    slope is <= 1); exp turns it into relative error, and normalised probabilities carry
    <= 2 max_j d_j + 6U; the weighted sum over n keys adds gamma(n + 2), the split-K merge
    8U: |err| <= (2 (2 D + 6U) + gamma(n + 2) + 8U) sum_j p_j |v_jd|. A query that sees no
    key is 0 exactly."""
    n_kv, S, hd = K.shape
    group = n_heads // n_kv
    Tq = q.shape[0]
    qh = q.reshape(Tq, n_heads, hd).astype(np.float64)
    out = np.zeros((Tq, n_heads, hd))
    bound = np.zeros((Tq, n_heads, hd))
    end = S if end_slot is None else end_slot
    for t in range(Tq):
        vis = visible(q_slots[t], S, valid, causal, window, end)
        idx = np.nonzero(vis)[0]
        if idx.size == 0:
            continue
        for h in range(n_heads):
            k = K[h // group, idx].astype(np.float64)
            v = V[h // group, idx].astype(np.float64)
            raw = k @ qh[t, h] * scale
            s = softcap * np.tanh(raw / softcap) if softcap > 0 else raw
            d = gamma(hd) * scale * (np.abs(k) @ np.abs(qh[t, h])) + 2 * U * np.abs(s)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ v
            rel = 2 * (2 * d.max() + 6 * U) + gamma(idx.size + 2) + 8 * U
            bound[t, h] = 2 * rel * (p @ np.abs(v)) + 1e-30
    return out.reshape(Tq, -1), bound.reshape(Tq, -1)


def quant_ints(w, K):
    """(quants as integers [rows, K], scales as float64 [rows, K / 32]) of a quantized tuple,
    from the layout in gemma_cpp.quant (int4: low nibbles block 2p, high nibbles 2p + 1), rows
    in plain order."""
    fmt, q, d = deinterleave(w)
    rows, nb = d.shape
    if fmt == "int8":
        qi = q.view(np.int8).astype(np.int64)
    else:
        pairs = q.reshape(rows, -1, 32)
        blocks = np.stack([pairs & 15, pairs >> 4], axis=2).reshape(rows, -1, 32)[:, :nb]
        qi = blocks.reshape(rows, -1).astype(np.int64) - 8
    return qi, d.view(np.float16).astype(np.float64)


def quant_acts(x):
    """The activation quantization of both engines, in float32 as they round it:
    dx = amax / 127, q = clip(rint(x * (127 / amax)), -127, 127) per block of 32."""
    T, K = x.shape
    xb = x.reshape(T, K // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        ida = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((xb * ida[..., None]).astype(np.float32)), -127, 127).astype(np.int64)
    return q.reshape(T, K), (amax / np.float32(127)).astype(np.float32).astype(np.float64)


def gemv_quant_ref(x, w):
    """y = sum_b dx_b dw_b sum_j qx_j qw_j in float64 (the integer sums are exact in both
    engines) and the bound: each term is an exact integer times two float32 roundings, and
    at most 2 K / 32 terms (half-block chunks) are summed in float32:
    |err| <= gamma(K / 16 + 2) sum_b dx_b |dw_b| sum_j |qx_j qw_j|."""
    T, K = x.shape
    qx, dx = quant_acts(x)
    qw, dw = quant_ints(w, K)
    nb = K // 32
    isum = np.einsum("tbj,nbj->tnb", qx.reshape(T, nb, 32), qw.reshape(-1, nb, 32))
    asum = np.einsum("tbj,nbj->tnb", np.abs(qx).reshape(T, nb, 32), np.abs(qw).reshape(-1, nb, 32))
    scale = dx[:, None, :] * dw[None, :, :]
    return (isum * scale).sum(-1), gamma(K // 16 + 2) * 1.01 * (asum * np.abs(scale)).sum(-1) + 1e-38


def dense_ref(x, w):
    """x @ w.T in float64 (w float32, or bf16 bits: x rounded to bf16 first) and
    gamma(K) sum |x w|."""
    if w.dtype == np.uint16:
        xv, wv = bf16_round(x).astype(np.float64), bf16_bits_to_f32(w).astype(np.float64)
    else:
        xv, wv = x.astype(np.float64), w.astype(np.float64)
    return xv @ wv.T, gamma(x.shape[1]) * 1.01 * (np.abs(xv) @ np.abs(wv).T) + 1e-38


def splitmix64(z):
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def uniform_ref(seed, stream, step):
    """The GPU sampler's u: 53 bits of splitmix64(splitmix64(splitmix64(seed) + stream) + step)."""
    m = (1 << 64) - 1
    h = splitmix64((splitmix64((splitmix64(seed) + stream) & m) + step) & m)
    return (h >> 11) * 2.0 ** -53


def kept_ref(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """(z, kept mask, probabilities of the kept set) of one row under the sampler's rules:
    z = logits / temperature in float32; top-k keeps values >= the k-th largest; top-p the
    smallest best-first set of mass >= top_p (ties with its last member kept); min-p keeps
    exp(z - max) >= min_p."""
    z = (logits / np.float32(temperature)).astype(np.float32) if temperature != 1.0 else logits.astype(np.float32)
    zd = z.astype(np.float64)
    keep = ~np.isnan(zd)
    if 0 < top_k < z.size:
        keep &= zd >= np.sort(zd[keep])[::-1][top_k - 1]
    m = zd[keep].max()
    mass = np.where(keep, np.exp(zd - m), 0.0)
    if top_p < 1.0:
        order = np.argsort(-zd[keep], kind="stable")
        vals = zd[keep][order]
        cum = np.cumsum(mass[keep][order])
        last = np.searchsorted(cum, top_p * cum[-1])  # first index with cum >= top_p * total
        keep &= zd >= vals[min(last, vals.size - 1)]
    if min_p > 0.0:
        keep &= np.exp(zd - m) >= min_p
    p = np.where(keep, mass, 0.0)
    return z, keep, p / p.sum()


# ---------------------------------------------------------------------------------------
# Everywhere: the status API, the CPU engine, the references against the CPU twins

def test_a_gpu_run_that_finds_no_gpu_fails():
    # gpu_check.sh sets GEMMA_CPP_REQUIRE_GPU=1: there, every @gpu test skipping (a driver too
    # old for the runtime, a build without CUDA) must fail the run instead of looking green.
    if os.environ.get("GEMMA_CPP_REQUIRE_GPU") == "1":
        assert STATUS["available"], f"GEMMA_CPP_REQUIRE_GPU=1 but CUDA cannot run: {STATUS['reason']}"


def test_cuda_status_gives_a_reason_and_the_cpu_engine_runs():
    s = gemma_cpp.cuda_status()
    assert set(s) >= {"available", "built", "reason", "device_count", "device", "compute_capability"}
    assert isinstance(gemma_cpp.cuda_available(), bool) and gemma_cpp.cuda_available() == s["available"]
    assert isinstance(s["reason"], str) and s["reason"].strip()
    if not s["available"]:
        assert s["built"] or "without CUDA" in s["reason"]
        if s["built"]:  # the hooks refuse with the same reason instead of crashing
            with pytest.raises(RuntimeError, match="CUDA is not available"):
                _testing.cuda_op_rmsnorm(np.ones((1, 4), np.float32), np.ones(4, np.float32), 1e-6)
    # The CPU engine, whatever the GPU status: a kernel and a two-layer model end to end.
    rng = rng_for("cpu")
    x, w = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((5, 64)).astype(np.float32)
    ref, bound = dense_ref(x, w)
    assert_within(_testing.matmul(x, w), ref, bound, "cpu matmul")
    engine, _ = tiny_engine(rng)
    ids = rng.integers(0, 50, (2, 6)).astype(np.int32)
    pos = np.tile(np.arange(6, dtype=np.int32), (2, 1))
    logits, _ = engine.forward(ids, None, pos, "logits", False, False)
    assert logits.shape == (2, 6, 50) and np.isfinite(logits).all()
    params = _C.SamplingParams(4, False, 1.0, 0, 1.0, 0.0, 1.0, [], 0, 0)
    assert engine.generate(ids, None, params, None).shape == (2, 4)


def tiny_engine(rng, H=64, n_heads=4, n_kv=2, hd=16, window=0, softcap=0.0, layers=2):
    """A random float32 engine whose layer 0 exposes its attention: o_proj is the identity
    and down_proj zero, so hidden_states[1] - hidden_states[0] is layer 0's attention output."""
    V, F = 50, 32
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=layers, num_attention_heads=n_heads,
               num_key_value_heads=n_kv, head_dim=hd, max_position_embeddings=64, rms_norm_eps=1e-6,
               rope_theta=10000.0, embed_scale=8.0, attn_scale=float(np.float32(hd ** -0.5)), causal=True,
               attn_softcap=softcap, layer_windows=[window] * layers)
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
    weights = {"embed": f(V, H), "final_norm": np.ones(H, np.float32)}
    for layer in range(layers):
        p = f"layers.{layer}."
        weights.update({p + "q": f(n_heads * hd, H), p + "k": f(n_kv * hd, H), p + "v": f(n_kv * hd, H),
                        p + "o": np.eye(H, dtype=np.float32), p + "gate": f(F, H), p + "up": f(F, H),
                        p + "down": np.zeros((H, F), np.float32), p + "attn_norm": np.ones(H, np.float32),
                        p + "mlp_norm": np.ones(H, np.float32)})
    return _C.Engine(cfg, weights), (cfg, weights)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (3, 0.0), (0, 1.5), (4, 2.0)])
def test_attention_reference_matches_cpu_engine(window, softcap):
    """attention_ref (with rope_ref and rmsnorm_ref) reproduces the CPU engine's attention on
    a one-block model: GQA, left padding with cumsum positions, a sliding window, soft-capping.
    The engine runs float32 matmuls on top of the kernels' error, so the tolerance is a
    loose 1e-4 relative: a wrong masking or grouping rule is off by O(1)."""
    rng = rng_for("attn-cpu", window, softcap)
    n_heads, n_kv, hd, H = 4, 2, 16, 64
    engine, (cfg, w) = tiny_engine(rng, H, n_heads, n_kv, hd, window, softcap)
    B, L = 2, 9
    ids = rng.integers(0, cfg["vocab_size"], (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[1, :3] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    _, hs = engine.forward(ids, mask, pos, "hidden", False, True)
    att = hs[1].astype(np.float64) - hs[0]
    inv = inv_freq_table(hd)
    for b in range(B):
        x0 = hs[0][b].astype(np.float32)
        h, _ = rmsnorm_ref(x0, np.ones(H, np.float32), 1e-6)
        q = h @ w["layers.0.q"].astype(np.float64).T
        k = h @ w["layers.0.k"].astype(np.float64).T
        v = h @ w["layers.0.v"].astype(np.float64).T
        q, _ = rope_ref(q.astype(np.float32), pos[b], inv, n_heads)
        k, _ = rope_ref(k.astype(np.float32), pos[b], inv, n_kv)
        K = k.reshape(L, n_kv, hd).transpose(1, 0, 2)
        Vc = v.reshape(L, n_kv, hd).transpose(1, 0, 2)
        ref, _ = attention_ref(q, K, Vc, mask[b].astype(np.uint8), np.arange(L), n_heads, cfg["attn_scale"],
                               softcap, window)
        tol = 1e-4 * (1 + np.abs(ref))
        assert np.all(np.abs(att[b] - ref) <= tol), np.abs(att[b] - ref).max()


def test_references_match_the_cpu_kernels():
    """The float64 references against the CPU engine's own kernels, within the bounds the
    GPU tests use (the CPU kernels round the same way, so the same bounds hold)."""
    rng = rng_for("refs")
    x = (rng.standard_normal((5, 2048)) * rng.uniform(0.1, 10, (5, 1))).astype(np.float32)
    w = (1 + rng.standard_normal(2048) * 0.3).astype(np.float32)
    ref, bound = rmsnorm_ref(x, w, 1e-6)
    assert_within(_testing.cpu_op_rmsnorm(x, w, 1e-6), ref, bound, "cpu rmsnorm")
    ref, bound = rmsnorm_ref(x, np.ones(2048, np.float32), 1e-6)  # no weight (Gemma 4's value norm)
    assert_within(_testing.cpu_op_rmsnorm(x, None, 1e-6), ref, bound, "cpu rmsnorm without a weight")

    a = (rng.standard_normal(5000) * 3).astype(np.float32)
    b = rng.standard_normal(5000).astype(np.float32)
    ref, bound = geglu_ref(a, b)
    assert_within(_testing.cpu_op_geglu(a, b), ref, bound, "cpu geglu")

    hd, nh = 64, 3
    q = rng.standard_normal((7, nh * hd)).astype(np.float32)
    pos = rng.integers(0, 8192, 7).astype(np.int32)
    inv = inv_freq_table(hd)
    ref, bound = rope_ref(q, pos, inv, nh)
    assert_within(_testing.cpu_op_rope(q, nh, pos, inv), ref, bound, "cpu rope")

    for fmt in ("int8", "int4"):
        xq = (rng.standard_normal((3, 96)) * 4).astype(np.float32)
        wq = quantize(rng.standard_normal((11, 96)).astype(np.float32), fmt)
        ref, bound = gemv_quant_ref(xq, wq)
        _testing.set_quant_matmul_path("scalar")  # the integer path (AMX dequantizes to bf16 instead)
        try:
            assert_within(_testing.matmul(xq, wq), ref, bound, f"cpu {fmt} matmul")
        finally:
            _testing.set_quant_matmul_path("auto")


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_k=5), dict(top_p=0.6), dict(temperature=1.5, min_p=0.2),
                                    dict(top_k=8, top_p=0.8, min_p=0.01)])
def test_kept_set_reference_contains_cpu_draws(params):
    """Every token the CPU sampler draws lies in kept_ref's set (the CPU cuts top-p ties by
    index, the reference keeps them whole: a superset)."""
    rng = rng_for("kept", tuple(sorted(params.items())))
    logits = (rng.standard_normal(300) * 2).astype(np.float32)
    p = _C.SamplingParams(1, True, params.get("temperature", 1.0), params.get("top_k", 0), params.get("top_p", 1.0),
                          params.get("min_p", 0.0), 1.0, [], 0, 7)
    draws = _testing.sample(logits, 300, p)
    _, keep, _ = kept_ref(logits, **params)
    assert keep[draws].all()


@built
def test_sample_uniform_matches_python_mirror():
    for seed, stream, step in [(0, 0, 0), (1, 2, 3), (2 ** 63 + 5, 7, 10 ** 9), (123, 2 ** 40, 2 ** 64 - 1)]:
        assert _testing.cuda_sample_uniform(seed, stream, step) == uniform_ref(seed, stream, step)


# ---------------------------------------------------------------------------------------
# GPU: each op against the CPU engine and float64

def weight_of(fmt, rows, K, rng):
    w = (rng.standard_normal((rows, K)) * rng.uniform(0.1, 3, (rows, 1))).astype(np.float32)
    if fmt == "float32":
        return w
    if fmt == "bfloat16":
        return f32_to_bf16_bits(w)
    return _C.quantize(w, fmt)


def rows_of(w, K):
    """The float32 rows of a table as the CPU reads them (weight_row)."""
    if isinstance(w, tuple):
        return _testing.dequantize(w, K)
    return bf16_bits_to_f32(w) if w.dtype == np.uint16 else w


@gpu
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
def test_embed(fmt):
    """Exact: a row dequantized (one product) then scaled (one product), as the CPU does."""
    rng = rng_for("embed", fmt)
    V, H = 301, 96  # 3 blocks of 32: int4's lone last block
    table = weight_of(fmt, V, H, rng)
    ids = np.concatenate([[0, V - 1], rng.integers(0, V, 13)]).astype(np.int32)
    scale = 55.5
    out = _testing.cuda_op_embed(table, ids, scale)
    cpu = (rows_of(table, H)[ids] * np.float32(scale)).astype(np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, cpu)


@gpu
@pytest.mark.parametrize("T, H", [(1, 2048), (7, 100), (3, 3072), (65, 256)])
def test_rmsnorm(T, H):
    rng = rng_for("rmsnorm", T, H)
    x = (rng.standard_normal((T, H)) * rng.uniform(0.01, 100, (T, 1))).astype(np.float32)
    w = (1 + rng.standard_normal(H) * 0.3).astype(np.float32)
    ref, bound = rmsnorm_ref(x, w, 1e-6)
    out = _testing.cuda_op_rmsnorm(x, w, 1e-6)
    assert_within(out, ref, bound, "rmsnorm vs float64")
    assert_within(out, _testing.cpu_op_rmsnorm(x, w, 1e-6).astype(np.float64), 2 * bound, "rmsnorm vs cpu")


@gpu
@pytest.mark.parametrize("sandwich", [False, True])
def test_add_rmsnorm(sandwich):
    """x += (rmsnorm(y, w_post) or y); out = rmsnorm(x, w_next). The residual sum carries
    the post-norm's bound plus one rounding; an error e in the second norm's input moves
    output i by at most |e_i| |w_i| / rms + |ref_i| sum_j |x_j e_j| / (H rms^2)."""
    rng = rng_for("add_rmsnorm", sandwich)
    T, H = 5, 2304
    x = rng.standard_normal((T, H)).astype(np.float32)
    y = (rng.standard_normal((T, H)) * 3).astype(np.float32)
    w_post = (1 + rng.standard_normal(H) * 0.3).astype(np.float32) if sandwich else None
    w_next = (1 + rng.standard_normal(H) * 0.3).astype(np.float32)
    if sandwich:
        yn, yb = rmsnorm_ref(y, w_post, 1e-6)
    else:
        yn, yb = y.astype(np.float64), np.zeros((T, H))
    x_ref = x.astype(np.float64) + yn
    x_bound = yb + U * np.abs(x_ref) + 1e-38
    x_out, out = _testing.cuda_op_add_rmsnorm(y, w_post, x, w_next, 1e-6)
    assert_within(x_out, x_ref, x_bound, "residual")
    ref, bound = rmsnorm_ref(x_ref, w_next, 1e-6)
    rms = np.sqrt((x_ref ** 2).mean(axis=1, keepdims=True))
    moved = x_bound / rms * np.abs(w_next) + np.abs(ref) * (np.abs(x_ref) * x_bound).sum(1, keepdims=True) / (H * rms ** 2)
    assert_within(out, ref, bound + 1.01 * moved, "normed")
    cpu_x = (x + (_testing.cpu_op_rmsnorm(y, w_post, 1e-6) if sandwich else y)).astype(np.float32)
    assert_within(x_out, cpu_x.astype(np.float64), 2 * x_bound, "residual vs cpu")


@gpu
@pytest.mark.parametrize("n", [1, 1000, 4096 + 3])
def test_geglu(n):
    rng = rng_for("geglu", n)
    a = (rng.standard_normal(n) * 3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    ref, bound = geglu_ref(a, b)
    out = _testing.cuda_op_geglu(a, b)
    assert_within(out, ref, bound, "geglu vs float64")
    assert_within(out, _testing.cpu_op_geglu(a, b).astype(np.float64), 2 * bound, "geglu vs cpu")


@gpu
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("hd, qk_norm", [(64, False), (256, False), (256, True), (96, True)])
def test_rope_kv(cache_dtype, hd, qk_norm):
    """Queries rotated in place; keys rotated into the cache, values copied, valid written;
    every other cache byte untouched (still the 0xff poison)."""
    rng = rng_for("rope", cache_dtype, hd, qk_norm)
    n_heads, n_kv, rows, cap, M = 4, 2, 3, 10, 9
    q = rng.standard_normal((M, n_heads * hd)).astype(np.float32)
    k = rng.standard_normal((M, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((M, n_kv * hd)).astype(np.float32)
    pos = np.concatenate([[0, 8191], rng.integers(0, 8192, M - 2)]).astype(np.int32)
    flat = rng.choice(rows * cap, M, replace=False)
    cache_row, slot = (flat // cap).astype(np.int32), (flat % cap).astype(np.int32)
    valid_in = rng.integers(0, 2, M).astype(np.uint8)
    inv = inv_freq_table(hd, theta=1e6, factor=8.0)
    qn = (1 + rng.standard_normal(hd) * 0.3).astype(np.float32) if qk_norm else None
    kn = (1 + rng.standard_normal(hd) * 0.3).astype(np.float32) if qk_norm else None
    q_out, kc, vc, valid = _testing.cuda_op_rope_kv(q, k, v, pos, inv, qn, kn, 1e-6, n_heads, n_kv, cache_dtype, rows, cap,
                                              cache_row, slot, valid_in)
    q_ref, q_bound = rope_ref(q, pos, inv, n_heads, qn)
    assert_within(q_out, q_ref, q_bound, "q")
    if not qk_norm:
        assert_within(q_out, _testing.cpu_op_rope(q, n_heads, pos, inv).astype(np.float64), 2 * q_bound, "q vs cpu")
    k_ref, k_bound = rope_ref(k, pos, inv, n_kv, kn)
    bf16 = cache_dtype == "bfloat16"
    widen = (lambda a: bf16_bits_to_f32(a)) if bf16 else (lambda a: a)
    kw, vw = widen(kc), widen(vc)
    for m in range(M):
        r, s = cache_row[m], slot[m]
        got_k = kw[r, :, s, :].reshape(-1)
        # a bf16 cache rounds the float32 result once more: half an ulp of bf16 (2^-9 rel)
        extra = 2.0 ** -8 * np.abs(k_ref[m]) if bf16 else 0
        assert_within(got_k, k_ref[m], k_bound[m] + extra, f"k token {m}")
        exp_v = bf16_round(v[m]) if bf16 else v[m]
        np.testing.assert_array_equal(vw[r, :, s, :].reshape(-1), exp_v)
        assert valid[r, s] == valid_in[m]
    written = np.zeros((rows, cap), bool)
    written[cache_row, slot] = True
    assert (valid[~written] == 0xFF).all()
    assert np.isnan(kw.transpose(0, 2, 1, 3)[~written]).all() and np.isnan(vw.transpose(0, 2, 1, 3)[~written]).all()


GEMV_SHAPES = [(1, 2048, 37), (1, 64, 5), (3, 96, 10), (16, 640, 33), (17, 256, 9), (2, 16384, 8), (8, 2048, 300)]


@gpu
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("T, K, N", GEMV_SHAPES + [(5, 100, 7), (4, 1003, 6)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemv(fmt, T, K, N, accumulate):
    """int8 / int4 against the quantized-activation float64 reference (both engines
    quantize x the same way: the bound is float32 rounding only) and the CPU's integer
    path; float32 / bf16 against float64 and the CPU matmul."""
    if fmt in ("int8", "int4") and K % 32:
        pytest.skip("quantized weights need K % 32 == 0")
    rng = rng_for("gemv", fmt, T, K, N, accumulate)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    w = weight_of(fmt, N, K, rng)
    y0 = rng.standard_normal((T, N)).astype(np.float32) if accumulate else None
    if isinstance(w, tuple):
        ref, bound = gemv_quant_ref(x, w)
        _testing.set_quant_matmul_path("scalar")  # the CPU's integer path at every T (AMX rounds to bf16)
        try:
            cpu = _testing.matmul(x, w)
        finally:
            _testing.set_quant_matmul_path("auto")
    else:
        ref, bound = dense_ref(x, w)
        cpu = _testing.matmul(x, w)
    if accumulate:
        ref = ref + y0
        bound = bound + 2 * U * (np.abs(ref) + np.abs(y0))
        cpu = cpu + y0
    out = _testing.cuda_op_gemv(x, w, y0)
    assert_within(out, ref, bound, f"{fmt} gemv vs float64")
    assert_within(out, cpu.astype(np.float64), 2 * bound, f"{fmt} gemv vs cpu")


@gpu
@pytest.mark.parametrize("M, K, N", [(1, 64, 10), (17, 100, 70), (64, 2048, 64), (130, 96, 129), (512, 256, 200)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_bf16(M, K, N, accumulate):
    """Tensor cores multiply bf16 exactly but may align and truncate inside their float32
    sums (not round to nearest), so the bound is 2 (K + 16) U sum |x w|: twice gamma(K)
    with room for the per-instruction alignment."""
    rng = rng_for("gemm", M, K, N, accumulate)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    w = weight_of("bfloat16", N, K, rng)
    y0 = rng.standard_normal((M, N)).astype(np.float32) if accumulate else None
    ref, bound = dense_ref(x, w)
    bound = bound / gamma(K) * 2 * (K + 16) * U
    cpu = _testing.matmul(x, w)
    if accumulate:
        ref, cpu = ref + y0, cpu + y0
        bound = bound + 2 * U * (np.abs(ref) + np.abs(y0))
    out = _testing.cuda_op_gemm_bf16(x, w, y0)
    assert_within(out, ref, bound, "gemm vs float64")
    assert_within(out, cpu.astype(np.float64), 2 * bound, "gemm vs cpu")


@gpu
@pytest.mark.parametrize("op, fmt", [("gemv", "float32"), ("gemv", "bfloat16"), ("gemv", "int8"), ("gemv", "int4"),
                                     ("gemm_bf16", "bfloat16")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_strides(op, fmt, accumulate):
    """Rows of x ldx > K apart and of y ldy > N apart (REVIEW_CUDA item 5), as a caller with
    wider buffers passes them: the first K columns of each x row are read, the first N of each
    y row written (added to, with accumulate), and the gap columns between rows never touched
    (they keep y0's values, or the hook's NaN poison)."""
    rng = rng_for("strides", op, fmt, accumulate)
    T, K, N, pad_x, pad_y = (19, 96, 40, 13, 7) if op == "gemm_bf16" else (5, 96, 40, 13, 7)
    xw = (rng.standard_normal((T, K + pad_x))).astype(np.float32)
    xw[:, K:] = np.nan  # never read
    x = np.ascontiguousarray(xw[:, :K])
    w = weight_of(fmt, N, K, rng)
    y0 = rng.standard_normal((T, N + pad_y)).astype(np.float32) if accumulate else None
    hook = _testing.cuda_op_gemv if op == "gemv" else _testing.cuda_op_gemm_bf16
    want = hook(x, w, None if y0 is None else np.ascontiguousarray(y0[:, :N]))
    got = hook(xw, w, y0, ldy=N + pad_y)
    assert got.shape == (T, N + pad_y)
    np.testing.assert_array_equal(got[:, :N], want)  # the same kernel on the same values: same bits
    if accumulate:
        np.testing.assert_array_equal(got[:, N:], y0[:, N:])
    else:
        assert np.isnan(got[:, N:]).all()


def random_cache(rng, rows, n_kv, S, hd, dtype, valid, poison_from=None):
    """K, V [rows, n_kv, S, hd] (float32, or bf16 bits) with NaN in every invalid slot and
    from `poison_from[row]` on: a kernel must never let a slot it may not see leak in."""
    K = rng.standard_normal((rows, n_kv, S, hd)).astype(np.float32)
    V = rng.standard_normal((rows, n_kv, S, hd)).astype(np.float32)
    for r in range(rows):
        bad = valid[r] == 0
        if poison_from is not None:
            bad = bad | (np.arange(S) >= poison_from[r])
        K[r][:, bad] = np.nan
        V[r][:, bad] = np.nan
    if dtype == "bfloat16":
        return f32_to_bf16_bits(K), f32_to_bf16_bits(V), bf16_bits_to_f32(f32_to_bf16_bits(K)), \
            bf16_bits_to_f32(f32_to_bf16_bits(V))
    return K, V, K, V


def cache_for(device, rng, rows, n_kv, S, hd, dtype, valid, poison_from=None):
    """(op's cache arguments (k, v) and keyword arguments, the float values it holds K, V):
    random_cache's for float32 / bfloat16; for int8 (the CPU's only), blocks of 32 values
    quantized as Q8_0 by the numpy mirror, the values d * q exact in float32, and a NaN
    scale in every slot a kernel must not read."""
    if dtype != "int8":
        Kc, Vc, Kf, Vf = random_cache(rng, rows, n_kv, S, hd, dtype, valid, poison_from)
        return (Kc, Vc), {}, Kf, Vf
    if device == "cuda":
        pytest.skip("the CUDA kernels have no int8 KV cache yet")
    caches, extra, floats = [], {}, []
    for name in ("k", "v"):
        x = rng.standard_normal((rows * n_kv * S, hd)).astype(np.float32)
        qw = quantize(x, "int8")
        f = dequantize_q(qw, hd).reshape(rows, n_kv, S, hd)
        qw = deinterleave(qw)  # plain rows, as the cache holds them
        q = qw.quants.view(np.int8).reshape(rows, n_kv, S, hd)
        d = qw.scales.reshape(rows, n_kv, S, hd // 32).copy()
        for r in range(rows):
            bad = valid[r] == 0
            if poison_from is not None:
                bad = bad | (np.arange(S) >= poison_from[r])
            d[r][:, bad] = 0x7E00  # fp16 NaN
            f[r][:, bad] = np.nan
        caches.append(np.ascontiguousarray(q))
        extra[f"{name}_scales"] = d
        floats.append(f)
    return tuple(caches), extra, floats[0], floats[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("n_heads, n_kv, hd", [(8, 1, 256), (8, 2, 64), (4, 4, 128), (6, 2, 96)])
@pytest.mark.parametrize("S, softcap, window", [(48, 0.0, 0), (48, 3.0, 0), (300, 0.0, 9), (700, 2.5, 0),
                                                (1100, 0.0, 600)])
def test_attention_decode(device, cache_dtype, n_heads, n_kv, hd, S, softcap, window):
    """Both devices' decode attention against float64. S = 700 and 1100 split a row's keys
    into several parts (the CPU's parts are 256 slots) that are merged; a window of 600
    starts the parts mid-cache."""
    op = _testing.cpu_op_attention_decode if device == "cpu" else _testing.cuda_op_attention_decode
    rng = rng_for("decode", cache_dtype, n_heads, n_kv, hd, S, softcap, window)
    rows = 3
    valid = np.ones((rows, S), np.uint8)
    valid[1, :5] = 0          # left padding
    valid[2, :4] = 0          # row 2's query sees only padding: a zero output
    cache_row = np.array([1, 2, 0], np.int32)          # query r reads cache row cache_row[r]
    q_slot = np.array([S - 1, 3, S // 2], np.int32)
    (Kc, Vc), extra, Kf, Vf = cache_for(device, rng, rows, n_kv, S, hd, cache_dtype, valid,
                                        poison_from=[q_slot[list(cache_row).index(r)] + 1 for r in range(rows)])
    q = rng.standard_normal((3, n_heads * hd)).astype(np.float32)
    scale = float(np.float32(hd ** -0.5))
    out = op(q, Kc, Vc, valid, cache_row, q_slot, S, n_heads, scale, softcap, window, **extra)
    for r in range(3):
        cr = cache_row[r]
        ref, bound = attention_ref(q[r:r + 1], Kf[cr], Vf[cr], valid[cr], [q_slot[r]], n_heads, scale, softcap, window)
        assert_within(out[r:r + 1], ref, bound, f"decode row {r}")
    assert (out[1] == 0).all()  # cache row 2 at slot 3: every visible slot is padding


@gpu
@pytest.mark.parametrize("chunk", [32, 64, 128, 256])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_attention_decode_every_split_chunk(chunk, cache_dtype):
    """The split-K chunk is fixed at 64; every chunk size, forced, against float64, on keys
    that span several chunks and a window that starts mid-chunk."""
    rng = rng_for("decode-chunk", chunk, cache_dtype)
    rows, n_heads, n_kv, hd, S, window = 3, 8, 2, 64, 1000, 300
    valid = np.ones((rows, S), np.uint8)
    valid[0, :7] = 0
    cache_row = np.array([2, 0, 1], np.int32)
    q_slot = np.array([S - 1, 513, 40], np.int32)
    (Kc, Vc), extra, Kf, Vf = cache_for("cuda", rng, rows, n_kv, S, hd, cache_dtype, valid,
                                        poison_from=[q_slot[list(cache_row).index(r)] + 1 for r in range(rows)])
    q = rng.standard_normal((rows, n_heads * hd)).astype(np.float32)
    scale = float(np.float32(hd ** -0.5))
    _testing.cuda_set_attention_decode_chunk(chunk)
    try:
        out = _testing.cuda_op_attention_decode(q, Kc, Vc, valid, cache_row, q_slot, S, n_heads, scale, 0.0, window,
                                                **extra)
    finally:
        _testing.cuda_set_attention_decode_chunk(0)
    for r in range(rows):
        cr = cache_row[r]
        ref, bound = attention_ref(q[r:r + 1], Kf[cr], Vf[cr], valid[cr], [q_slot[r]], n_heads, scale, 0.0, window)
        assert_within(out[r:r + 1], ref, bound, f"chunk {chunk}, row {r}")


def decode_rows_case(device, cache_dtype):
    """Four rows of one cache at slots far apart (one with padding), for the rows-independent
    tests: (q, cache arguments, their keyword arguments, valid, cache_row, q_slot, S, n_heads)."""
    rng = rng_for("decode-rows", device, cache_dtype)
    rows, n_heads, n_kv, hd, S = 4, 8, 2, 64, 900
    valid = np.ones((rows, S), np.uint8)
    valid[2, :40] = 0
    q_slot = np.array([899, 300, 650, 17], np.int32)
    cache_row = np.arange(rows, dtype=np.int32)
    cache, extra, _, _ = cache_for(device, rng, rows, n_kv, S, hd, cache_dtype, valid, poison_from=list(q_slot + 1))
    q = rng.standard_normal((rows, n_heads * hd)).astype(np.float32)
    return q, cache, extra, valid, cache_row, q_slot, S, n_heads


@gpu
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_cuda_decode_attention_rows_are_independent(cache_dtype):
    """Batch invariance on the GPU: a row's output is the same bits alone (its own n_slots) and
    beside three rows that reach further (the scheduler's decode steps mix such rows)."""
    q, (Kc, Vc), extra, valid, cache_row, q_slot, S, n_heads = decode_rows_case("cuda", cache_dtype)
    together = _testing.cuda_op_attention_decode(q, Kc, Vc, valid, cache_row, q_slot, S, n_heads, 0.125, 0.0, 0,
                                                 **extra)
    assert np.isfinite(together).all()
    for r in range(len(q)):
        alone = _testing.cuda_op_attention_decode(q[r:r + 1], Kc, Vc, valid, cache_row[r:r + 1], q_slot[r:r + 1],
                                                  int(q_slot[r]) + 1, n_heads, 0.125, 0.0, 0, **extra)
        np.testing.assert_array_equal(alone[0], together[r])


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
def test_cpu_decode_attention_rows_are_independent(cache_dtype):
    """Batch invariance of the CPU's decode attention: a row's output is the same bits alone,
    beside three other rows at other slots, and with 1, 2 or 3 threads (its key parts depend
    only on its own slot, and each part and merge runs the same arithmetic wherever it runs)."""
    q, (Kc, Vc), extra, valid, cache_row, q_slot, S, n_heads = decode_rows_case("cpu", cache_dtype)
    rows = len(q)
    args = (S, n_heads, 0.125, 0.0, 0)
    old = gemma_cpp.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            gemma_cpp.set_num_threads(n)
            outs.append(_testing.cpu_op_attention_decode(q, Kc, Vc, valid, cache_row, q_slot, *args, **extra))
        for r in range(rows):
            alone = _testing.cpu_op_attention_decode(q[r:r + 1], Kc, Vc, valid, cache_row[r:r + 1], q_slot[r:r + 1],
                                                     *args, **extra)
            np.testing.assert_array_equal(alone[0], outs[1][r])
    finally:
        gemma_cpp.set_num_threads(old)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[2], outs[1])
    assert np.isfinite(outs[1]).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("n_heads, n_kv, hd", [(8, 1, 256), (4, 2, 64), (6, 3, 96)])
@pytest.mark.parametrize("causal, window, softcap", [(True, 0, 0.0), (True, 6, 0.0), (True, 0, 2.0), (False, 0, 0.0),
                                                     (False, 5, 1.0)])
def test_attention_prefill(device, cache_dtype, n_heads, n_kv, hd, causal, window, softcap):
    """Both devices' prompt attention against float64, and its last query against decode."""
    prefill = _testing.cpu_op_attention_prefill if device == "cpu" else _testing.cuda_op_attention_prefill
    decode = _testing.cpu_op_attention_decode if device == "cpu" else _testing.cuda_op_attention_decode
    rng = rng_for("prefill", cache_dtype, n_heads, n_kv, hd, causal, window, softcap)
    rows, T = 2, 37
    slot0 = 5 if causal else 0  # causal: earlier chunks' keys are already cached
    S = slot0 + T + 6
    valid = np.ones((rows, S), np.uint8)
    valid[1, :8] = 0  # left padding reaching into the new tokens
    cache_row = np.array([1, 0], np.int32)
    (Kc, Vc), extra, Kf, Vf = cache_for(device, rng, rows, n_kv, S, hd, cache_dtype, valid,
                                        poison_from=[slot0 + T] * rows)
    q = rng.standard_normal((rows, T, n_heads * hd)).astype(np.float32)
    scale = float(np.float32(40 ** -0.5))
    out = prefill(q, Kc, Vc, valid, cache_row, slot0, n_heads, scale, softcap, window, causal, **extra)
    outs = {"": out}
    if device == "cpu":  # a task takes a KV group's heads (few threads) or one head (many): both
        before = gemma_cpp.get_num_threads()
        try:
            for threads in (1, 16):
                gemma_cpp.set_num_threads(threads)
                outs[f" ({threads} threads)"] = prefill(q, Kc, Vc, valid, cache_row, slot0, n_heads, scale, softcap,
                                                        window, causal, **extra)
        finally:
            gemma_cpp.set_num_threads(before)
    for r in range(rows):
        cr = cache_row[r]
        ref, bound = attention_ref(q[r], Kf[cr], Vf[cr], valid[cr], slot0 + np.arange(T), n_heads, scale, softcap,
                                   window, causal, end_slot=slot0 + T)
        for what, o in outs.items():
            assert_within(o[r], ref, bound, f"prefill row {r}{what}")
    if causal:  # the last query of the chunk is a decode step: both kernels agree
        last = np.full(rows, slot0 + T - 1, np.int32)
        dec = decode(np.ascontiguousarray(q[:, -1]), Kc, Vc, valid, cache_row, last, slot0 + T, n_heads, scale, softcap,
                     window, **extra)
        for r in range(rows):
            cr = cache_row[r]
            _, bound = attention_ref(q[r, -1:], Kf[cr], Vf[cr], valid[cr], [slot0 + T - 1], n_heads, scale, softcap,
                                     window)
            assert_within(dec[r:r + 1], out[r, -1:].astype(np.float64), 2 * bound, f"decode vs prefill row {r}")


@gpu
def test_softcap():
    """cap tanh(x / cap): x / cap (|x| U), tanhf 2 ulp, the product: |err| <= (|x| + 5 |ref|) U."""
    rng = rng_for("softcap")
    x = (rng.standard_normal(100003) * 60).astype(np.float32)
    ref = 30.0 * np.tanh(x.astype(np.float64) / 30.0)
    assert_within(_testing.cuda_op_softcap(x, 30.0), ref, 1.01 * (np.abs(x) + 5 * np.abs(ref)) * U + 1e-38, "softcap")


@gpu
@pytest.mark.parametrize("V", [1001, 256000])
def test_argmax_matches_cpu(V):
    rng = rng_for("argmax", V)
    x = rng.standard_normal((6, V)).astype(np.float32)
    x[1, [17, V - 3]] = 50.0                  # a tie: the first index wins
    x[2, ::7] = np.nan                        # NaN skipped
    x[2, 11] = 40.0
    x[3] = -np.inf                            # all -inf: index 0
    x[4] = np.nan                             # all NaN: index 0
    x[5, V - 1] = np.inf
    out = _testing.cuda_op_argmax(x)
    greedy = _C.SamplingParams(1, False, 1.0, 0, 1.0, 0.0, 1.0, [], 0, 0)
    cpu = [int(_testing.sample(np.ascontiguousarray(row), 1, greedy)[0]) for row in x]
    np.testing.assert_array_equal(out, cpu)
    assert list(out[1:6]) == [17, 11, 0, 0, V - 1]
    np.testing.assert_array_equal(_testing.cuda_op_sample(x, False), cpu)  # do_sample=False is argmax


SAMPLE_PARAMS = [dict(), dict(temperature=0.7, top_k=50), dict(temperature=1.3, top_p=0.9),
                 dict(top_k=20, top_p=0.5, min_p=0.05), dict(min_p=0.3), dict(top_k=1)]


@gpu
@pytest.mark.parametrize("params", SAMPLE_PARAMS)
@pytest.mark.parametrize("V", [1000, 256000])
def test_sample_draw_is_exact(params, V):
    """The token is the one whose cumulative kept mass (index order) brackets u * total,
    for the u the host mirror gives: the draw and every filter are checked at once. The
    slack 1e-6 covers expf and the 2^-s fixed point."""
    rng = rng_for("draw", tuple(sorted(params.items())), V)
    B = 8
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    seed, step = 1234, 17
    streams = rng.integers(0, 2 ** 40, B).astype(np.uint64)
    out = _testing.cuda_op_sample(logits, True, seed=seed, step=step, stream_ids=streams,
                            **{k: params.get(k, d) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                                                ("min_p", 0.0))})
    for b in range(B):
        _, keep, p = kept_ref(logits[b], **params)
        t = int(out[b])
        assert keep[t], f"row {b}: token {t} is outside the kept set"
        u = uniform_ref(seed, int(streams[b]), step)
        before = p[:t].sum()
        assert before - 1e-6 <= u <= before + p[t] + 1e-6, (b, t, u, before, p[t])
        # The slack is absolute, and at a large vocabulary one token's mass can be below it:
        # where u is more than the slack from both edges of the reference token's bracket, the
        # draw must be that token exactly, not a neighbour.
        cum = np.cumsum(p, dtype=np.float64)
        t_ref = min(int(np.searchsorted(cum, u, side="right")), len(cum) - 1)
        lo, hi = (cum[t_ref - 1] if t_ref else 0.0), cum[t_ref]
        if u - lo > 1e-6 and hi - u > 1e-6:
            assert t == t_ref, (b, t, t_ref, u, lo, hi)
    # The same (seed, stream, step) draws the same token in another batch composition.
    again = _testing.cuda_op_sample(np.ascontiguousarray(logits[::-1]), True, seed=seed, step=step,
                              stream_ids=np.ascontiguousarray(streams[::-1]),
                              **{k: params.get(k, d) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                                                  ("min_p", 0.0))})
    np.testing.assert_array_equal(again[::-1], out)


@gpu
def test_sample_frequencies_follow_the_distribution():
    """4000 draws of one row (streams 0..3999, one per batch row: 4000 independent
    uniforms): each token's count within 5 sigma of n p. Deterministic: the draws are seeded."""
    rng = rng_for("freq")
    logits = (rng.standard_normal(40) * 1.5).astype(np.float32)
    n = 4000
    rows = np.ascontiguousarray(np.tile(logits, (n, 1)))
    counts = np.zeros(40)
    out = _testing.cuda_op_sample(rows, True, seed=99, step=0, stream_ids=np.arange(n, dtype=np.uint64))
    np.add.at(counts, out, 1)
    _, _, p = kept_ref(logits)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1), np.abs(counts - n * p) / (sigma + 1e-9)


@gpu
def test_repetition_penalty():
    """Each distinct in-range history token once: x < 0 ? x * pen : x / pen (exact)."""
    rng = rng_for("penalty")
    B, V = 3, 100
    logits = rng.standard_normal((B, V)).astype(np.float32)
    history = rng.integers(-5, V + 5, (B, 12)).astype(np.int32)
    history[0, :4] = 7  # duplicates
    lengths = np.array([12, 5, 0], np.int32)
    out = _testing.cuda_op_repetition_penalty(logits, history, lengths, 1.3)
    ref = logits.copy()
    pen = np.float32(1.3)
    for b in range(B):
        for t in set(int(t) for t in history[b, :lengths[b]] if 0 <= t < V):
            ref[b, t] = ref[b, t] * pen if ref[b, t] < 0 else ref[b, t] / pen
    np.testing.assert_array_equal(out, ref)
