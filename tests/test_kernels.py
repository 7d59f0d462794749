"""CPU kernels against float64 numpy, with error bounds from the operands."""
import numpy as np
import pytest

from gemma_cpp import _C
from gemma_cpp._dtypes import bf16_bits_to_f32, f32_to_bf16_bits

EPS32 = 2.0 ** -24  # unit roundoff of float32


@pytest.mark.parametrize("T, K, N", [(1, 64, 10), (1, 1000, 37), (3, 100, 7), (4, 2048, 64),
                                     (5, 17, 5), (9, 257, 130), (33, 96, 12)])
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
def test_matmul_matches_float64(T, K, N, wdtype):
    """Each output is a K-term dot product accumulated in float32: its error is at most
    gamma_K * sum_k |x_k w_k| with gamma_K = K u / (1 - K u) (Higham, Thm 3.1). The bound
    holds for any summation order, so it is exact for every SIMD path."""
    rng = np.random.default_rng(T * 1000 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = (rng.standard_normal((N, K)) * rng.uniform(0.01, 10, (N, 1))).astype(np.float32)
    if wdtype == "bfloat16":
        w = f32_to_bf16_bits(w32)
        wv = bf16_bits_to_f32(w).astype(np.float64)
    else:
        w, wv = w32, w32.astype(np.float64)
    y = _C.matmul(x, w)
    assert y.shape == (T, N) and y.dtype == np.float32
    ref = x.astype(np.float64) @ wv.T
    gamma = K * EPS32 / (1 - K * EPS32)
    bound = gamma * (np.abs(x).astype(np.float64) @ np.abs(wv).T)
    assert np.all(np.abs(y - ref) <= bound)


def test_matmul_rejects_bad_weights():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="float32 or uint16"):
        _C.matmul(x, np.ones((3, 8), np.float64))
    with pytest.raises(ValueError, match="expected shape"):
        _C.matmul(x, np.ones((3, 9), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.matmul(x, np.ones((8, 3), np.float32).T)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.3895314e38], np.float32)]).astype(np.float32)
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
