// Logits processing and token choice on the GPU: soft-capping, argmax, the repetition
// penalty, and seeded sampling (temperature, top-k, top-p, min-p). One block per row.
//
// Sampling without a sort: top-k is a 4-pass radix select (8 bits per pass, integer counts)
// of the k-th largest value; top-p a 4-pass radix select on probability mass, in 2^-s fixed
// point so that the sums are integers (exact, and independent of thread timing); the draw
// is a block scan over contiguous index ranges. About a dozen passes over the row, which
// stays in L2 (1 MB for a 256k vocabulary).
#include <climits>

#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

constexpr int kThreads = 1024, kWarps = kThreads / 32;

__host__ __device__ inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// u in [0, 1): 53 bits of splitmix64(splitmix64(splitmix64(seed) + stream) + step).
__host__ __device__ inline double uniform(uint64_t seed, uint64_t stream_id, uint64_t step) {
  const uint64_t h = splitmix64(splitmix64(splitmix64(seed) + stream_id) + step);
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// Order-preserving map float -> uint32 (larger float, larger key); NaN lowest (0), -0 == +0.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct ArgMax {
  float v;
  int64_t i;
  bool any;
};
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (!a.any) return b;
  if (!b.any) return a;
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

// The first index of the maximum, NaN skipped (all NaN: 0), for every thread of the block.
__device__ ArgMax block_argmax(const float* x, int64_t V, float temperature, bool scale) {
  __shared__ float sv[kWarps];
  __shared__ int64_t si[kWarps];
  __shared__ bool sa[kWarps];
  ArgMax a{-__builtin_huge_valf(), 0, false};
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float z = scale ? x[i] / temperature : x[i];
    if (!isnan(z) && (!a.any || z > a.v)) a = {z, i, true};
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax b{__shfl_xor_sync(kFull, a.v, o), __shfl_xor_sync(kFull, a.i, o),
             static_cast<bool>(__shfl_xor_sync(kFull, static_cast<int>(a.any), o))};
    a = better(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = a.v;
    si[warp] = a.i;
    sa[warp] = a.any;
  }
  __syncthreads();
  ArgMax r{-__builtin_huge_valf(), 0, false};
  for (int w = 0; w < kWarps; ++w) r = better(r, ArgMax{sv[w], si[w], sa[w]});
  return r;
}

__device__ __forceinline__ uint64_t block_sum_u64(uint64_t v) {
  __shared__ uint64_t s[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
  __syncthreads();
  uint64_t t = 0;
  for (int w = 0; w < kWarps; ++w) t += s[w];
  return t;
}

// Exclusive prefix sum over the block's threads, in thread order.
__device__ __forceinline__ uint64_t block_exclusive_scan_u64(uint64_t v) {
  __shared__ uint64_t s[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) s[warp] = inc;
  __syncthreads();
  uint64_t before = 0;
  for (int w = 0; w < warp; ++w) before += s[w];
  return before + inc - v;
}

struct RowView {
  const float* x;
  float temperature;
  bool scale;
  __device__ __forceinline__ float z(int64_t i) const { return scale ? x[i] / temperature : x[i]; }
};

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, int64_t V, SampleParams p, const uint64_t* __restrict__ stream_ids,
                  uint64_t step, int shift, int32_t* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const RowView row{logits + b * V, p.temperature, p.do_sample && p.temperature != 1.f};
  const ArgMax best = block_argmax(row.x, V, p.temperature, row.scale);
  if (!p.do_sample || !best.any || !isfinite(best.v)) {
    if (threadIdx.x == 0) out[b] = static_cast<int32_t>(best.i);
    return;
  }
  const float m = best.v, unit = __uint_as_float(static_cast<uint32_t>(127 + shift) << 23);  // 2^shift
  auto mass = [&](float z) -> uint64_t { return isnan(z) ? 0ull : __float2ull_rz(expf(z - m) * unit); };
  __shared__ uint32_t hist[256];
  __shared__ uint64_t hist64[256];
  __shared__ uint32_t chosen;
  __shared__ uint64_t carried;

  // top-k: the k-th largest key, 8 bits at a time from the top.
  uint32_t kth = 0;
  if (p.top_k > 0 && p.top_k < V) {
    uint32_t prefix = 0, mask = 0;
    int64_t k = p.top_k;
    for (int sh = 24; sh >= 0; sh -= 8) {
      for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const uint32_t key = order_key(row.z(i));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> sh) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int d = 255;
        for (; d > 0; --d) {
          if (k <= static_cast<int64_t>(hist[d])) break;
          k -= hist[d];
        }
        chosen = static_cast<uint32_t>(d);
        carried = static_cast<uint64_t>(k);
      }
      __syncthreads();
      prefix |= chosen << sh;
      mask |= 255u << sh;
      k = static_cast<int64_t>(carried);
      __syncthreads();
    }
    kth = prefix;
  }

  // top-p: the key tau where the best-first mass of the top-k candidates reaches top_p.
  uint32_t tau = 0;
  if (p.top_p < 1.f) {
    uint64_t part = 0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float z = row.z(i);
      if (order_key(z) >= kth) part += mass(z);
    }
    const uint64_t total = block_sum_u64(part);
    uint64_t target = static_cast<uint64_t>(static_cast<double>(p.top_p) * static_cast<double>(total));
    if (target == 0) target = 1;
    uint32_t prefix = 0, mask = 0;
    uint64_t above = 0;
    for (int sh = 24; sh >= 0; sh -= 8) {
      for (int i = threadIdx.x; i < 256; i += kThreads) hist64[i] = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const float z = row.z(i);
        const uint32_t key = order_key(z);
        if (key >= kth && (key & mask) == prefix) {
          const uint64_t w = mass(z);
          if (w) atomicAdd(reinterpret_cast<unsigned long long*>(&hist64[(key >> sh) & 255u]),
                           static_cast<unsigned long long>(w));
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int d = 255;
        for (; d > 0; --d) {
          if (above + hist64[d] >= target) break;
          above += hist64[d];
        }
        chosen = static_cast<uint32_t>(d);
        carried = above;
      }
      __syncthreads();
      prefix |= chosen << sh;
      mask |= 255u << sh;
      above = carried;
      __syncthreads();
    }
    tau = prefix;
  }

  // The draw: kept tokens in index order, each thread a contiguous range.
  const uint32_t floor_key = kth > tau ? kth : tau;
  auto kept_mass = [&](int64_t i) -> uint64_t {
    const float z = row.z(i);
    if (order_key(z) < floor_key) return 0;
    if (p.min_p > 0.f && !(expf(z - m) >= p.min_p)) return 0;
    return mass(z);
  };
  const int64_t per = (V + kThreads - 1) / kThreads, i0 = threadIdx.x * per, i1 = min(V, i0 + per);
  uint64_t mine = 0;
  for (int64_t i = i0; i < i1; ++i) mine += kept_mass(i);
  const uint64_t before = block_exclusive_scan_u64(mine);
  const uint64_t total = block_sum_u64(mine);
  if (total == 0) {  // not reached: the best token is always kept with mass 2^shift
    if (threadIdx.x == 0) out[b] = static_cast<int32_t>(best.i);
    return;
  }
  const double u = uniform(p.seed, stream_ids ? stream_ids[b] : static_cast<uint64_t>(b), step);
  uint64_t target = static_cast<uint64_t>(u * static_cast<double>(total));
  if (target >= total) target = total - 1;  // u * total rounded up to total
  if (target >= before && target < before + mine) {
    uint64_t c = before;
    for (int64_t i = i0; i < i1; ++i) {
      c += kept_mass(i);
      if (c > target) {
        out[b] = static_cast<int32_t>(i);
        break;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(const float* __restrict__ logits, int64_t V, int32_t* __restrict__ out) {
  const ArgMax a = block_argmax(logits + blockIdx.x * V, V, 1.f, false);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(a.i);
}

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    x[i] = tanhf(x[i] / cap) * cap;
}

// Penalty pass 1: first[b][t] = the smallest history index holding t; pass 2: that entry
// applies the penalty and restores first[b][t] (so each distinct token is penalised once).
__global__ void penalty_mark_kernel(int64_t B, int64_t V, const int32_t* __restrict__ hist, int64_t stride,
                                    const int32_t* __restrict__ len, uint32_t* first) {
  const int64_t b = blockIdx.y;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= len[b]) return;
  const int32_t t = hist[b * stride + i];
  if (t >= 0 && t < V) atomicMin(&first[b * V + t], static_cast<uint32_t>(i));
}

__global__ void penalty_apply_kernel(float* logits, int64_t B, int64_t V, const int32_t* __restrict__ hist,
                                     int64_t stride, const int32_t* __restrict__ len, float pen, uint32_t* first) {
  const int64_t b = blockIdx.y;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= len[b]) return;
  const int32_t t = hist[b * stride + i];
  if (t < 0 || t >= V || first[b * V + t] != static_cast<uint32_t>(i)) return;
  float& x = logits[b * V + t];
  x = x < 0 ? x * pen : x / pen;
  first[b * V + t] = 0xffffffffu;
}

}  // namespace

double sample_uniform(uint64_t seed, uint64_t stream_id, uint64_t step) { return uniform(seed, stream_id, step); }

cudaError_t softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
  if (n <= 0 || !(cap > 0.f)) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65536);
  softcap_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x, n, cap);
  return cudaGetLastError();
}

cudaError_t argmax(const float* logits, int64_t B, int64_t V, int32_t* out, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (V <= 0 || B > INT_MAX) return cudaErrorInvalidValue;
  argmax_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, V, out);
  return cudaGetLastError();
}

cudaError_t sample(const float* logits, int64_t B, int64_t V, const SampleParams& p, const uint64_t* stream_ids,
                   uint64_t step, int32_t* out, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (V <= 0 || V > (int64_t{1} << 31) - 1 || B > INT_MAX) return cudaErrorInvalidValue;
  if (p.do_sample && (!(p.temperature > 0.f) || !(p.top_p > 0.f && p.top_p <= 1.f) || p.top_k < 0 ||
                      !(p.min_p >= 0.f && p.min_p <= 1.f)))
    return cudaErrorInvalidValue;
  int bits = 0;  // ceil(log2 V): V masses of at most 2^shift sum below 2^62
  while ((int64_t{1} << bits) < V) ++bits;
  const int shift = 62 - bits;
  sample_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, V, p, stream_ids, step, shift, out);
  return cudaGetLastError();
}

cudaError_t repetition_penalty(float* logits, int64_t B, int64_t V, const int32_t* history, int64_t history_stride,
                               const int32_t* history_len, float penalty, uint32_t* first, cudaStream_t stream) {
  if (B <= 0 || history_stride <= 0 || penalty == 1.f) return cudaSuccess;
  if (B > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(history_stride, 256)), static_cast<unsigned>(B));
  penalty_mark_kernel<<<grid, 256, 0, stream>>>(B, V, history, history_stride, history_len, first);
  penalty_apply_kernel<<<grid, 256, 0, stream>>>(logits, B, V, history, history_stride, history_len, penalty, first);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
