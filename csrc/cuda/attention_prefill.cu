// Prefill attention: T new queries per row against the cache (their own keys included),
// tiled with an online softmax (flash-attention's recurrence), float32 on CUDA cores.
// Correctness first; tensor cores (mma / wgmma) and K/V reuse across a GQA group are the
// next steps for speed.
//
// A block: 16 queries of one (row, head); 4 warps, warp w owns query rows w, w + 4, w + 8,
// w + 12. Per tile of 32 slots: keys staged in shared memory (rows padded to head_dim + 1
// floats: lane j reads key row j, conflict-free), lane j scores key j for the warp's rows,
// the row max / sum are warp reductions; then values replace keys in the same buffer and
// lane l accumulates output elements l, l + 32, ... of its rows.
#include "cuda/attention.cuh"

namespace gemma::cuda {
namespace {

constexpr int BQ = 16, BKEY = 32, kThreads = 128, kRowsPerWarp = BQ / (kThreads / 32), kMaxE = 8;

size_t smem_bytes(int hd) { return sizeof(float) * (BQ * hd + BKEY * (hd + 1) + BQ * BKEY); }

template <typename CacheT>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(const float* __restrict__ q, KVLayer cache, const int32_t* __restrict__ cache_row, int64_t slot0,
                   int64_t T, AttnParams p, float* __restrict__ out) {
  extern __shared__ float smem[];
  const int hd = static_cast<int>(p.head_dim), ldk = hd + 1;
  float* Qs = smem;                  // [BQ][hd]
  float* KVs = Qs + BQ * hd;         // [BKEY][hd + 1]: keys, then values
  float* S = KVs + BKEY * ldk;       // [BQ][BKEY]: probabilities of the tile
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t h = blockIdx.y, r = blockIdx.z, nH = p.n_heads;
  const int64_t kvh = h / (nH / p.n_kv);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BQ, nq = min(static_cast<int64_t>(BQ), T - t0);
  const int64_t row = cache_row ? cache_row[r] : r;
  const int64_t first_q = slot0 + t0, last_q = first_q + nq - 1, end_slot = slot0 + T;
  // Slots [lo, hi) that some query of the block may see (Model::attention's range).
  int64_t hi = p.causal ? last_q + 1 : end_slot, lo = 0;
  if (p.window > 0) {
    lo = max(int64_t{0}, first_q - p.window + 1);
    if (!p.causal) hi = min(hi, last_q + p.window);
  }
  const int64_t head_base = (row * cache.kv_heads + kvh) * cache.span * hd;
  const CacheT* K = static_cast<const CacheT*>(cache.k) + head_base;
  const CacheT* V = static_cast<const CacheT*>(cache.v) + head_base;
  const uint8_t* valid = cache.valid + row * cache.capacity;

  for (int idx = tid; idx < BQ * hd; idx += kThreads) {
    const int i = idx / hd;
    Qs[idx] = i < nq ? q[((r * T + t0 + i) * nH + h) * hd + idx % hd] : 0.f;
  }
  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][kMaxE];
#pragma unroll
  for (int c = 0; c < kRowsPerWarp; ++c) {
    m[c] = kNegInf;
    l[c] = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxE; ++e) o[c][e] = 0.f;
  }

  for (int64_t kt = lo; kt < hi; kt += BKEY) {
    __syncthreads();  // Qs written / the previous tile's values consumed
    for (int idx = tid; idx < BKEY * hd; idx += kThreads) {
      const int j = idx / hd, e = idx % hd;
      KVs[j * ldk + e] = kt + j < hi ? load_elem(K + (kt + j) * hd + e) : 0.f;
    }
    __syncthreads();
    const int64_t slot = kt + lane;
    const bool slot_ok = slot < hi && valid[slot];
#pragma unroll
    for (int c = 0; c < kRowsPerWarp; ++c) {
      const int i = warp + c * (kThreads / 32);
      const int64_t qs = first_q + i;
      float s = 0.f;
      for (int e = 0; e < hd; ++e) s = fmaf(Qs[i * hd + e], KVs[lane * ldk + e], s);
      bool vis = slot_ok && i < nq && (!p.causal || slot <= qs);
      if (p.window > 0) vis = vis && slot > qs - p.window && (p.causal || slot < qs + p.window);
      const float x = vis ? score_transform(s, p.scale, p.softcap) : kNegInf;
      const float m_new = fmaxf(m[c], warp_max(x));
      const float pj = x == kNegInf ? 0.f : expf(x - m_new);
      const float alpha = m[c] == kNegInf ? 0.f : expf(m[c] - m_new);
      l[c] = l[c] * alpha + warp_sum(pj);
      m[c] = m_new;
#pragma unroll
      for (int e = 0; e < kMaxE; ++e) o[c][e] *= alpha;
      S[i * BKEY + lane] = pj;
    }
    __syncthreads();  // keys consumed
    for (int idx = tid; idx < BKEY * hd; idx += kThreads) {
      const int j = idx / hd, e = idx % hd;
      KVs[j * ldk + e] = kt + j < hi ? load_elem(V + (kt + j) * hd + e) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kRowsPerWarp; ++c) {
      const int i = warp + c * (kThreads / 32);
      for (int j = 0; j < BKEY; ++j) {
        const float pj = S[i * BKEY + j];  // the same for the whole warp
        if (pj == 0.f) continue;           // masked: the slot may hold anything
#pragma unroll
        for (int e = 0; e < kMaxE; ++e)
          if (lane + 32 * e < hd) o[c][e] = fmaf(pj, KVs[j * ldk + lane + 32 * e], o[c][e]);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kRowsPerWarp; ++c) {
    const int i = warp + c * (kThreads / 32);
    if (i >= nq) continue;
    float* dst = out + ((r * T + t0 + i) * nH + h) * hd;
#pragma unroll
    for (int e = 0; e < kMaxE; ++e) {
      const int d = lane + 32 * e;
      if (d < hd) dst[d] = l[c] > 0.f ? o[c][e] / l[c] : 0.f;
    }
  }
}

template <typename CacheT>
cudaError_t launch(const float* q, const KVLayer& cache, const int32_t* cache_row, int64_t R, int64_t slot0,
                   int64_t T, const AttnParams& p, float* out, cudaStream_t stream) {
  const size_t smem = smem_bytes(static_cast<int>(p.head_dim));
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(prefill_kernel<CacheT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(T, BQ)), static_cast<unsigned>(p.n_heads), static_cast<unsigned>(R));
  prefill_kernel<CacheT><<<grid, kThreads, smem, stream>>>(q, cache, cache_row, slot0, T, p, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_prefill(const float* q, const KVLayer& cache, const int32_t* cache_row, int64_t R,
                              int64_t slot0, int64_t T, const AttnParams& p, float* out, cudaStream_t stream) {
  if (R <= 0 || T <= 0) return cudaSuccess;
  if (p.head_dim % 32 != 0 || p.head_dim > 32 * kMaxE || p.n_kv <= 0 || p.n_heads % p.n_kv != 0 ||
      cache.head_dim != p.head_dim || cache.kv_heads != p.n_kv || slot0 < 0 || slot0 + T > cache.span ||
      slot0 + T > cache.capacity || R > 65535 || p.n_heads > 65535 || ceil_div(T, BQ) > (int64_t{1} << 31) - 1)
    return cudaErrorInvalidValue;
  if (cache.dtype == DType::BF16) return launch<uint16_t>(q, cache, cache_row, R, slot0, T, p, out, stream);
  if (cache.dtype == DType::F32) return launch<float>(q, cache, cache_row, R, slot0, T, p, out, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gemma::cuda
