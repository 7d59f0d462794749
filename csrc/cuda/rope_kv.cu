// Per-head q/k RMSNorm (Gemma 3), RoPE, and the KV-cache write, fused: one warp per
// (token, head). Query heads are rotated in place; key heads are rotated on the way into
// the cache, and the same warp copies the value head.
#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

constexpr int kWarps = 4;

template <typename T>
__device__ __forceinline__ void store_elem(T* p, float v);
template <>
__device__ __forceinline__ void store_elem<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_elem<uint16_t>(uint16_t* p, float v) { *p = f32_to_bf16_bits(v); }

template <typename CacheT>
__global__ void __launch_bounds__(kWarps * 32)
    rope_kv_kernel(float* q, const float* __restrict__ k, const float* __restrict__ v, int64_t M, int n_heads, int n_kv,
                   int hd, const int32_t* __restrict__ pos, const float* __restrict__ inv_freq,
                   const float* __restrict__ q_norm, const float* __restrict__ k_norm, float eps, KVLayer cache,
                   const int32_t* __restrict__ cache_row, const int32_t* __restrict__ slot,
                   const uint8_t* __restrict__ valid_in) {
  const int lane = threadIdx.x & 31;
  const int64_t task = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  const int heads = n_heads + n_kv;
  if (task >= M * heads) return;
  const int64_t m = task / heads;
  const int h = static_cast<int>(task % heads);
  const bool is_q = h < n_heads;
  const int kh = h - n_heads;
  const float* src = is_q ? q + (m * n_heads + h) * hd : k + (m * n_kv + kh) * hd;
  const float* norm = is_q ? q_norm : k_norm;
  const int64_t row = cache_row[m], s = slot[m];
  const bool in_cache = row >= 0 && row < cache.rows && s >= 0 && s < cache.span;

  float inv = 1.f;
  if (norm) {  // the CPU's rmsnorm over head_dim: x * (1 / sqrt(mean(x^2) + eps)) * w
    float ss = 0.f;
    for (int i = lane; i < hd; i += 32) ss += src[i] * src[i];
    ss = warp_sum(ss);
    inv = 1.0f / sqrtf(ss / static_cast<float>(hd) + eps);
  }
  CacheT* kdst = nullptr;
  if (!is_q && in_cache) kdst = static_cast<CacheT*>(cache.k) + ((row * cache.kv_heads + kh) * cache.span + s) * hd;
  const int half = hd / 2;
  const float p = static_cast<float>(pos[m]);
  for (int i = lane; i < half; i += 32) {
    float x1 = src[i], x2 = src[i + half];
    if (norm) {
      x1 = (x1 * inv) * norm[i];
      x2 = (x2 * inv) * norm[i + half];
    }
    float sn, cs;
    sincosf(p * inv_freq[i], &sn, &cs);
    // Rounded as the CPU's x1 * cos - x2 * sin with contraction off: no fused multiply-add.
    const float r1 = __fsub_rn(__fmul_rn(x1, cs), __fmul_rn(x2, sn));
    const float r2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
    if (is_q) {
      q[(m * n_heads + h) * hd + i] = r1;
      q[(m * n_heads + h) * hd + i + half] = r2;
    } else if (kdst) {
      store_elem(kdst + i, r1);
      store_elem(kdst + i + half, r2);
    }
  }
  if (!is_q && in_cache) {
    const float* vs = v + (m * n_kv + kh) * hd;
    CacheT* vdst = static_cast<CacheT*>(cache.v) + ((row * cache.kv_heads + kh) * cache.span + s) * hd;
    for (int i = lane; i < hd; i += 32) store_elem(vdst + i, vs[i]);
    if (kh == 0 && lane == 0 && cache.valid) cache.valid[row * cache.capacity + s] = valid_in ? valid_in[m] : 1;
  }
}

}  // namespace

cudaError_t rope_kv_write(float* q, const float* k, const float* v, int64_t M, int64_t n_heads, int64_t n_kv,
                          int64_t hd, const int32_t* pos, const float* inv_freq, const float* q_norm,
                          const float* k_norm, float eps, const KVLayer& cache, const int32_t* cache_row,
                          const int32_t* slot, const uint8_t* valid_in, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (hd % 2 != 0 || cache.head_dim != hd || cache.kv_heads != n_kv) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(M * (n_heads + n_kv), kWarps);
  const auto grid = static_cast<unsigned>(blocks);
  if (cache.dtype == DType::BF16)
    rope_kv_kernel<uint16_t><<<grid, kWarps * 32, 0, stream>>>(
        q, k, v, M, static_cast<int>(n_heads), static_cast<int>(n_kv), static_cast<int>(hd), pos, inv_freq, q_norm,
        k_norm, eps, cache, cache_row, slot, valid_in);
  else if (cache.dtype == DType::F32)
    rope_kv_kernel<float><<<grid, kWarps * 32, 0, stream>>>(
        q, k, v, M, static_cast<int>(n_heads), static_cast<int>(n_kv), static_cast<int>(hd), pos, inv_freq, q_norm,
        k_norm, eps, cache, cache_row, slot, valid_in);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace gemma::cuda
