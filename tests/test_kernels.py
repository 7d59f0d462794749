"""CPU kernels against float64 numpy, with error bounds from the operands."""
import numpy as np
import pytest

from gemma_cpp import _C
from gemma_cpp._C import _testing
from gemma_cpp._dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from conftest import available_paths

EPS32 = 2.0 ** -24  # unit roundoff of float32


SHAPES = [(1, 64, 10), (1, 1000, 37), (3, 100, 7), (4, 2048, 64), (5, 17, 5), (9, 257, 130),
          (33, 96, 12), (2, 64, 96), (40, 128, 70), (17, 2048, 33)]


def bf16_paths():
    """Every bf16 matmul path this CPU and build have: AMX, AVX512-BF16, generic."""
    return available_paths(_testing.set_bf16_matmul_path, ("generic", "avx512_bf16", "amx"))


def _check(y, xv, wv):
    """Each output is a K-term dot product accumulated in float32: its error is at most
    gamma_K * sum_k |x_k w_k| with gamma_K = K u / (1 - K u) (Higham, Thm 3.1). The bound
    holds for any summation order, so it holds for every SIMD path."""
    K = xv.shape[1]
    ref = xv @ wv.T
    gamma = K * EPS32 / (1 - K * EPS32)
    bound = gamma * (np.abs(xv) @ np.abs(wv).T)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= bound)


def _operands(T, K, N):
    rng = np.random.default_rng(T * 1000 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 10, (N, 1))).astype(np.float32)
    return x, w


@pytest.mark.parametrize("T, K, N", SHAPES)
def test_matmul_f32_matches_float64(T, K, N):
    x, w = _operands(T, K, N)
    _check(_testing.matmul(x, w), x.astype(np.float64), w.astype(np.float64))


@pytest.mark.parametrize("path", bf16_paths())
@pytest.mark.parametrize("T, K, N", SHAPES)
def test_matmul_bf16_matches_float64(T, K, N, path):
    """bf16 weights: x is rounded to bf16 (as transformers does in bf16), products and sums
    in float32. The reference is float64 on the bf16-rounded x and w."""
    x, w32 = _operands(T, K, N)
    w = f32_to_bf16_bits(w32)
    xv = bf16_bits_to_f32(f32_to_bf16_bits(x)).astype(np.float64)
    _testing.set_bf16_matmul_path(path)
    try:
        y = _testing.matmul(x, w)
    finally:
        _testing.set_bf16_matmul_path("auto")
    _check(y, xv, bf16_bits_to_f32(w).astype(np.float64))


def test_bf16_paths_include_the_best_this_cpu_has():
    assert _testing.bf16_matmul_path() in bf16_paths()
    with pytest.raises(ValueError, match="not available"):
        _testing.set_bf16_matmul_path("tpu")


def test_matmul_rejects_bad_weights():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="float32 or uint16"):
        _testing.matmul(x, np.ones((3, 8), np.float64))
    with pytest.raises(ValueError, match="expected shape"):
        _testing.matmul(x, np.ones((3, 9), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _testing.matmul(x, np.ones((8, 3), np.float32).T)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.3895314e38], np.float32)]).astype(np.float32)
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_bf16_to_f32_widens_every_bit_pattern():
    """Widening is a 16-bit shift: every pattern (NaN payloads, infinities, denormals
    included) must come back bit for bit; sizes on both sides of the threaded cutoff."""
    for n in (1000, 3 << 20):
        bits = np.random.default_rng(n).integers(0, 1 << 16, size=n, dtype=np.uint16)
        bits[:65536 if n > 65536 else n] = np.arange(min(n, 65536), dtype=np.uint16)
        ours = bf16_bits_to_f32(bits).view(np.uint32)
        np.testing.assert_array_equal(ours, bits.astype(np.uint32) << 16)
        np.testing.assert_array_equal(_C.bf16_to_f32(bits.reshape(-1, 8)).reshape(-1).view(np.uint32), ours)
