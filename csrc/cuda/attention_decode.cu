// Decode attention, split-K (flash-decoding): one new query per row against its cached keys.
//
// Pass 1, grid (splits, kv heads, rows): a block takes one chunk of slots of one (row, kv
// head) and serves every query head of that kv head (GQA: the chunk's keys and values are
// read once for the group). Scores: groups of 8 lanes per key, each lane 4 elements per 32,
// reduced with 3 shuffles; then per head the chunk's max m, p = exp(s - m), l = sum p; then
// o = sum p v with threads along head_dim (coalesced value rows). Pass 2 merges the chunks:
// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s; a query that saw no
// key in any chunk gets zeros (the CPU's rule).
#include <atomic>

#include "cuda/attention.cuh"

namespace gemma::cuda {
namespace {

constexpr int kThreads = 128, kMaxHd = 256, kGroupLanes = 8;

struct Split {
  int chunk = 256;
  int64_t splits = 1;
};

std::atomic<int> g_chunk_override{0};  // set_attention_decode_chunk (tests)

// Slots per chunk: always kDecodeChunk (tests may force another). A row's chunks start at
// slot 0 and its merge skips the chunks it sees nothing of, so its bits depend on its own
// slots only, never on how many rows share the call or how far the others reach (batch
// invariance: the scheduler's steps mix rows of every length). A chunk sized to fill the
// grid (once: 256, halved while under 2 blocks per SM) changed a row's sums with the batch.
constexpr int kDecodeChunk = 64;
Split choose_split(int64_t, int64_t, int64_t n_slots) {
  Split s;
  const int forced = g_chunk_override.load();
  s.chunk = forced ? forced : kDecodeChunk;
  s.splits = ceil_div(std::max<int64_t>(n_slots, 1), s.chunk);
  return s;
}

template <int GMAX, typename CacheT>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const float* __restrict__ q, KVLayer cache, const int32_t* __restrict__ cache_row,
                        const int32_t* __restrict__ q_slot, AttnParams p, int G, int chunk, int64_t splits,
                        float* __restrict__ ws_m, float* __restrict__ ws_l, float* __restrict__ ws_o) {
  extern __shared__ __align__(16) float smem[];  // read as float4
  const int hd = static_cast<int>(p.head_dim);
  float* q_s = smem;                 // [G][hd]
  float* sc = smem + GMAX * hd;      // [G][chunk]: scores, then probabilities
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t split = blockIdx.x, kh = blockIdx.y, r = blockIdx.z;
  const int64_t nH = p.n_heads;
  const int64_t row = cache_row ? cache_row[r] : r;
  const int64_t qs = q_slot[r];
  const int64_t lo = p.window > 0 ? max(int64_t{0}, qs - p.window + 1) : 0;
  const int64_t k0 = split * chunk;
  const int64_t kb = max(k0, lo), k1 = min(k0 + chunk, qs + 1);  // visible slots [kb, k1)

  for (int idx = tid; idx < G * hd; idx += kThreads)
    q_s[idx] = q[(r * nH + kh * G + idx / hd) * hd + idx % hd];
  __syncthreads();

  const int64_t head_base = (row * cache.kv_heads + kh) * cache.span * hd;
  const CacheT* K = static_cast<const CacheT*>(cache.k) + head_base;
  const CacheT* V = static_cast<const CacheT*>(cache.v) + head_base;
  const uint8_t* valid = cache.valid + row * cache.capacity;

  // Scores. chunk % 16 == 0, so every lane of a warp runs the same number of iterations.
  const int sub = tid % kGroupLanes;
  for (int64_t j = k0 + tid / kGroupLanes; j < k0 + chunk; j += kThreads / kGroupLanes) {
    const bool vis = j >= kb && j < k1 && valid[j];
    float part[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) part[g] = 0.f;
    if (vis) {
      for (int e = sub * 4; e < hd; e += 32) {
        const float4 kv = load4(K + j * hd + e);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g < G) {
            const float4 qv = *reinterpret_cast<const float4*>(q_s + g * hd + e);
            part[g] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, part[g]))));
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
      for (int o = kGroupLanes / 2; o > 0; o >>= 1) part[g] += __shfl_xor_sync(kFull, part[g], o);
    }
    if (sub == 0) {
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
        if (g < G) sc[g * chunk + (j - k0)] = vis ? score_transform(part[g], p.scale, p.softcap) : kNegInf;
    }
  }
  __syncthreads();

  // Per head: the chunk's max and the probabilities relative to it.
  __shared__ float stat_m[GMAX], stat_l[GMAX];
  for (int g = warp; g < G; g += kThreads / 32) {
    float m = kNegInf;
    for (int i = lane; i < chunk; i += 32) m = fmaxf(m, sc[g * chunk + i]);
    m = warp_max(m);
    float l = 0.f;
    for (int i = lane; i < chunk; i += 32) {
      const float s = sc[g * chunk + i];
      const float e = s == kNegInf ? 0.f : expf(s - m);
      sc[g * chunk + i] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stat_m[g] = m;
      stat_l[g] = l;
    }
  }
  __syncthreads();

  // o = sum_j p_j v_j; threads along head_dim, 2 elements each (head_dim <= 256).
  float acc[GMAX][2];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) acc[g][0] = acc[g][1] = 0.f;
  for (int64_t j = kb; j < k1; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int d = tid + i * kThreads;
      if (d < hd) {
        const float v = load_elem(V + j * hd + d);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g < G) {
            const float pj = sc[g * chunk + (j - k0)];
            acc[g][i] += pj != 0.f ? pj * v : 0.f;  // a masked slot may hold anything
          }
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g >= G) break;
    const int64_t slot = (r * nH + kh * G + g) * splits + split;
    if (tid == 0) {
      ws_m[slot] = stat_m[g];
      ws_l[slot] = stat_l[g];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int d = tid + i * kThreads;
      if (d < hd) ws_o[slot * hd + d] = acc[g][i];
    }
  }
}

__global__ void decode_merge_kernel(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                                    const float* __restrict__ ws_o, int64_t splits, int hd, int64_t nH,
                                    float* __restrict__ out) {
  const int64_t h = blockIdx.x, r = blockIdx.y, base = (r * nH + h) * splits;
  float M = kNegInf;
  for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, ws_m[base + s]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.f, L = 0.f;
    if (M != kNegInf) {
      for (int64_t s = 0; s < splits; ++s) {
        const float m = ws_m[base + s];
        if (m == kNegInf) continue;
        const float f = expf(m - M);
        L += f * ws_l[base + s];
        o += f * ws_o[(base + s) * hd + d];
      }
    }
    out[(r * nH + h) * hd + d] = L > 0.f ? o / L : 0.f;
  }
}

template <int GMAX>
cudaError_t launch(const float* q, const KVLayer& cache, const int32_t* cache_row, const int32_t* q_slot, int64_t R,
                   const AttnParams& p, int G, const Split& sp, float* ws_m, float* ws_l, float* ws_o,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(sp.splits), static_cast<unsigned>(p.n_kv), static_cast<unsigned>(R));
  const size_t smem = static_cast<size_t>(GMAX) * (p.head_dim + sp.chunk) * sizeof(float);
  if (cache.dtype == DType::BF16)
    decode_split_kernel<GMAX, uint16_t><<<grid, kThreads, smem, stream>>>(q, cache, cache_row, q_slot, p, G, sp.chunk,
                                                                         sp.splits, ws_m, ws_l, ws_o);
  else
    decode_split_kernel<GMAX, float><<<grid, kThreads, smem, stream>>>(q, cache, cache_row, q_slot, p, G, sp.chunk,
                                                                      sp.splits, ws_m, ws_l, ws_o);
  return cudaGetLastError();
}

}  // namespace

void set_attention_decode_chunk(int chunk) {
  g_chunk_override.store(chunk == 32 || chunk == 64 || chunk == 128 || chunk == 256 ? chunk : 0);
}

size_t attention_decode_workspace_bytes(int64_t R, int64_t n_slots, const AttnParams& p) {
  const Split sp = choose_split(R, p.n_kv, n_slots);
  const int64_t parts = R * p.n_heads * sp.splits;
  return static_cast<size_t>(parts * (2 + p.head_dim)) * sizeof(float) + 512;
}

cudaError_t attention_decode(const float* q, const KVLayer& cache, const int32_t* cache_row, const int32_t* q_slot,
                             int64_t R, int64_t n_slots, const AttnParams& p, float* out, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  if (p.head_dim % 32 != 0 || p.head_dim > kMaxHd || p.n_kv <= 0 || p.n_heads % p.n_kv != 0 || !p.causal ||
      cache.head_dim != p.head_dim || cache.kv_heads != p.n_kv || n_slots > cache.span || n_slots > cache.capacity)
    return cudaErrorInvalidValue;
  const int G = static_cast<int>(p.n_heads / p.n_kv);
  if (G > 8 || R > 65535 || p.n_kv > 65535) return cudaErrorInvalidValue;
  if (workspace_bytes < attention_decode_workspace_bytes(R, n_slots, p)) return cudaErrorInvalidValue;
  const Split sp = choose_split(R, p.n_kv, n_slots);
  const int64_t parts = R * p.n_heads * sp.splits;
  char* base = static_cast<char*>(workspace);
  base += (256 - reinterpret_cast<uintptr_t>(base) % 256) % 256;
  float* ws_m = reinterpret_cast<float*>(base);
  float* ws_l = ws_m + parts;
  float* ws_o = ws_l + parts;
  cudaError_t e;
  if (G <= 1) e = launch<1>(q, cache, cache_row, q_slot, R, p, G, sp, ws_m, ws_l, ws_o, stream);
  else if (G <= 2) e = launch<2>(q, cache, cache_row, q_slot, R, p, G, sp, ws_m, ws_l, ws_o, stream);
  else if (G <= 4) e = launch<4>(q, cache, cache_row, q_slot, R, p, G, sp, ws_m, ws_l, ws_o, stream);
  else e = launch<8>(q, cache, cache_row, q_slot, R, p, G, sp, ws_m, ws_l, ws_o, stream);
  if (e != cudaSuccess) return e;
  decode_merge_kernel<<<dim3(static_cast<unsigned>(p.n_heads), static_cast<unsigned>(R)),
                        static_cast<unsigned>(p.head_dim), 0, stream>>>(ws_m, ws_l, ws_o, sp.splits,
                                                                       static_cast<int>(p.head_dim), p.n_heads, out);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
