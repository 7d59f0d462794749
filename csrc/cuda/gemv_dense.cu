// Decode GEMV for bf16 and float32 weights: one warp per output row, 16-byte weight loads
// (8 bf16 or 4 float32), U = 4 in flight per lane; x was first copied to a padded buffer
// (rounded to bf16 for bf16 weights, as the CPU's matmul_bf16), so its 16-byte loads are
// aligned whatever the caller's ldx. Products and sums in float32 (a bf16 x bf16 product is
// exact in float32, so the fused multiply-add rounds only the sum).
#include <algorithm>
#include <type_traits>

#include "cuda/gemv.cuh"

namespace gemma::cuda {
namespace {

// x [T, ldx] -> xp [T, Kv] (Kv = round_up(K, 8)), zero padded; BF16: rounded to bf16 bits.
template <bool BF16>
__global__ void prepare_x_kernel(const float* __restrict__ x, int64_t T, int64_t ldx, int64_t K, int64_t Kv,
                                 void* __restrict__ xp) {
  const int64_t n = T * Kv, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t t = i / Kv, k = i % Kv;
    const float v = k < K ? x[t * ldx + k] : 0.f;
    if constexpr (BF16)
      static_cast<uint16_t*>(xp)[i] = f32_to_bf16_bits(v);
    else
      static_cast<float*>(xp)[i] = v;
  }
}

__device__ __forceinline__ float dot_chunk_bf16(uint4 w, uint4 x, float acc) {
  acc = fmaf(bf16_lo(w.x), bf16_lo(x.x), acc);
  acc = fmaf(bf16_hi(w.x), bf16_hi(x.x), acc);
  acc = fmaf(bf16_lo(w.y), bf16_lo(x.y), acc);
  acc = fmaf(bf16_hi(w.y), bf16_hi(x.y), acc);
  acc = fmaf(bf16_lo(w.z), bf16_lo(x.z), acc);
  acc = fmaf(bf16_hi(w.z), bf16_hi(x.z), acc);
  acc = fmaf(bf16_lo(w.w), bf16_lo(x.w), acc);
  return fmaf(bf16_hi(w.w), bf16_hi(x.w), acc);
}

__device__ __forceinline__ float dot_chunk_f32(uint4 w, uint4 x, float acc) {
  acc = fmaf(__uint_as_float(w.x), __uint_as_float(x.x), acc);
  acc = fmaf(__uint_as_float(w.y), __uint_as_float(x.y), acc);
  acc = fmaf(__uint_as_float(w.z), __uint_as_float(x.z), acc);
  return fmaf(__uint_as_float(w.w), __uint_as_float(x.w), acc);
}

// vec: the weight rows are 16-byte aligned (base and ld), so whole 16-byte chunks are read
// as such; the K % per tail (or every element when !vec) is read one element per lane.
template <int TT, bool BF16>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_dense_kernel(const void* __restrict__ w, int64_t N, int64_t K, int64_t ld, const void* __restrict__ xp,
                      int64_t Kv, int T, float* __restrict__ y, int64_t ldy, bool accumulate, bool vec) {
  constexpr int U = 4, per = BF16 ? 8 : 4;  // elements per 16 bytes
  using Elem = typename std::conditional<BF16, uint16_t, float>::type;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * static_cast<int64_t>(kGemvWarps) + (threadIdx.x >> 5);
  if (n >= N) return;
  const Elem* row = static_cast<const Elem*>(w) + n * ld;
  const Elem* xs = static_cast<const Elem*>(xp);
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) acc[t] = 0.f;

  const int64_t chunks = vec ? K / per : 0;
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + 32 * u < chunks) wv[u] = load_stream16(row + (c0 + 32 * u) * per);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t >= T) break;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xs + t * Kv + c * per));
        acc[t] = BF16 ? dot_chunk_bf16(wv[u], xv, acc[t]) : dot_chunk_f32(wv[u], xv, acc[t]);
      }
    }
  }
  for (int64_t k = chunks * per + lane; k < K; k += 32) {
    float wk;
    if constexpr (BF16)
      wk = bf16_bits_to_f32(row[k]);
    else
      wk = row[k];
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t >= T) break;
      float xk;
      if constexpr (BF16)
        xk = bf16_bits_to_f32(xs[t * Kv + k]);
      else
        xk = xs[t * Kv + k];
      acc[t] = fmaf(wk, xk, acc[t]);
    }
  }
  store_row<TT>(acc, T, lane, y, ldy, n, accumulate);
}

template <int TT>
void launch_dense(const Weight& w, const void* xp, int64_t Kv, int T, float* y, int64_t ldy, bool accumulate,
                  cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(ceil_div(w.rows, kGemvWarps));
  const size_t esize = w.dtype == DType::BF16 ? 2 : 4;
  const bool vec = reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && (w.ld * esize) % 16 == 0;
  if (w.dtype == DType::BF16)
    gemv_dense_kernel<TT, true><<<grid, kGemvWarps * 32, 0, stream>>>(w.data, w.rows, w.cols, w.ld, xp, Kv, T, y,
                                                                      ldy, accumulate, vec);
  else
    gemv_dense_kernel<TT, false><<<grid, kGemvWarps * 32, 0, stream>>>(w.data, w.rows, w.cols, w.ld, xp, Kv, T, y,
                                                                       ldy, accumulate, vec);
}

}  // namespace

size_t dense_x_bytes(int64_t T, int64_t K) { return static_cast<size_t>(T * round_up(K, 8) * 4); }

cudaError_t gemv_dense(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                       bool accumulate, void* workspace, cudaStream_t stream) {
  const int64_t K = w.cols, Kv = round_up(K, 8);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(T * Kv, 256), 4096));
  if (w.dtype == DType::BF16)
    prepare_x_kernel<true><<<blocks, 256, 0, stream>>>(x, T, ldx, K, Kv, workspace);
  else
    prepare_x_kernel<false><<<blocks, 256, 0, stream>>>(x, T, ldx, K, Kv, workspace);
  const int t = static_cast<int>(T);
  if (t <= 1) launch_dense<1>(w, workspace, Kv, t, y, ldy, accumulate, stream);
  else if (t <= 2) launch_dense<2>(w, workspace, Kv, t, y, ldy, accumulate, stream);
  else if (t <= 4) launch_dense<4>(w, workspace, Kv, t, y, ldy, accumulate, stream);
  else if (t <= 8) launch_dense<8>(w, workspace, Kv, t, y, ldy, accumulate, stream);
  else launch_dense<16>(w, workspace, Kv, t, y, ldy, accumulate, stream);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
