// Prefill GEMM with bf16 weights on tensor cores: y[M, N] (+)= bf16(x)[M, K] . W[N, K]^T,
// float32 accumulation (wmma 16x16x16 bf16 -> float; sm_80 and newer).
//
// Correctness first: a 64 x 64 output tile per block of 4 warps (each 32 x 32, 2 x 2
// fragments), K in steps of 32 through shared memory, no software pipelining. x is rounded
// to bf16 while it is staged (the CPU's bf16 rule); out-of-range rows and columns are
// staged as zeros, so any M, N, K works. Every ldm is a multiple of 8 bf16 / 4 floats and
// every fragment pointer 32-byte aligned, as wmma requires.
// Next steps for speed: cp.async double buffering, 128 x 128 tiles, and wgmma on sm_90a.
#include <mma.h>

#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, LDS = BK + 8, LDC = BN + 4, kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    gemm_bf16_kernel(const float* __restrict__ x, int64_t M, int64_t ldx, const uint16_t* __restrict__ w, int64_t N,
                     int64_t K, int64_t ldw, float* __restrict__ y, int64_t ldy, bool accumulate) {
  using namespace nvcuda;
  __shared__ __align__(128) __nv_bfloat16 As[BM * LDS];
  __shared__ __align__(128) __nv_bfloat16 Bs[BN * LDS];
  __shared__ __align__(128) float Cs[BM * LDC];
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // Stage: consecutive threads along k (coalesced reads), 16 elements per thread per tile.
    for (int idx = tid; idx < BM * BK; idx += kThreads) {
      const int r = idx / BK, c = idx % BK;
      const int64_t gm = m0 + r, gk = k0 + c;
      const float v = (gm < M && gk < K) ? x[gm * ldx + gk] : 0.f;
      As[r * LDS + c] = __float2bfloat16_rn(v);
    }
    for (int idx = tid; idx < BN * BK; idx += kThreads) {
      const int r = idx / BK, c = idx % BK;
      const int64_t gn = n0 + r, gk = k0 + c;
      const uint16_t v = (gn < N && gk < K) ? w[gn * ldw + gk] : uint16_t{0};
      Bs[r * LDS + c] = __ushort_as_bfloat16(v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDS + kk, LDS);
      // W is [N][K] row-major: as B = W^T [K][N] it is column-major with ldm LDS.
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < BM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm < M && gn < N) {
      float* o = y + gm * ldy + gn;
      *o = accumulate ? *o + Cs[r * LDC + c] : Cs[r * LDC + c];
    }
  }
}

}  // namespace

cudaError_t gemm_bf16(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                      bool accumulate, cudaStream_t stream) {
  if (w.dtype != DType::BF16) return cudaErrorInvalidValue;
  if (M <= 0 || w.rows <= 0) return cudaSuccess;
  const int64_t gy = ceil_div(M, BM);
  if (gy > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(w.rows, BN)), static_cast<unsigned>(gy));
  gemm_bf16_kernel<<<grid, kThreads, 0, stream>>>(x, M, ldx, static_cast<const uint16_t*>(w.data), w.rows, w.cols,
                                                  w.ld, y, ldy, accumulate);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
