// Decode GEMV for int8 / int4 weights (cpu/quant.h layouts): activations quantized per
// block of 32 as the CPU does, integer dot products with dp4a, float32 block sums.
//
// Work split: one warp per output row; each lane takes 16-byte chunks of the row
// (lane, lane + 32, ...), U = 4 chunks loaded before the first is used, so a warp keeps
// 2 KiB of weights in flight. int8: a chunk is half a block (16 weights); int4: a chunk is
// bytes 16h..16h+15 of block pair p, whose low nibbles are 16 weights of block 2p and high
// nibbles 16 weights of block 2p + 1 (32 weights per 16 bytes). All T <= 16 tokens are
// served from the same weight registers: the weights are read from HBM once per pass.
// Cost per 16 weight bytes and token: 4 dp4a (int8) or 8 (int4) and 16 (32) activation
// bytes from L1; at T = 16 the L1 traffic, not HBM, is the limit (a tensor-core GEMM is the
// tool there).
#include "cuda/gemv.cuh"

namespace gemma::cuda {
namespace {

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// One warp per block of 32 inputs: dx = amax / 127, q = clamp(rint(x * (127 / amax))),
// the CPU's quantize_acts rounding (rint: nearest even; IEEE division).
__global__ void quantize_acts_kernel(const float* __restrict__ x, int64_t T, int64_t ldx, int64_t K, QActsDev a) {
  const int lane = threadIdx.x & 31;
  const int64_t nbp = a.Kp / 32;
  const int64_t task = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  if (task >= T * nbp) return;
  const int64_t t = task / nbp, b = task % nbp, k = b * 32 + lane;
  const float v = k < K ? x[t * ldx + k] : 0.f;
  const float amax = warp_max(fabsf(v));
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  const float q = fminf(127.f, fmaxf(-127.f, rintf(v * id)));
  const int qi = static_cast<int>(q);
  a.qx[t * a.Kp + k] = static_cast<int8_t>(qi);
  if (lane == 0) a.dx[t * nbp + b] = amax / 127.f;
  int s = qi;  // sums of 16 consecutive quants (the int4 kernels' -8 term)
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  if ((lane & 15) == 0) a.xs[t * (a.Kp / 16) + b * 2 + lane / 16] = s;
}

__device__ __forceinline__ int dot16(uint4 w, int4 x) {
  int s = __dp4a(static_cast<int>(w.x), x.x, 0);
  s = __dp4a(static_cast<int>(w.y), x.y, s);
  s = __dp4a(static_cast<int>(w.z), x.z, s);
  return __dp4a(static_cast<int>(w.w), x.w, s);
}

template <int TT, bool INT4>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_quant_kernel(const uint8_t* __restrict__ wq, const uint16_t* __restrict__ wd, int64_t N, int64_t ld, int nb,
                      const int8_t* __restrict__ qx, const float* __restrict__ dx, const int32_t* __restrict__ xs,
                      int64_t Kp, int T, float* __restrict__ y, int64_t ldy, bool accumulate) {
  constexpr int U = 4;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * static_cast<int64_t>(kGemvWarps) + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint8_t* row = wq + n * ld;
  const uint16_t* drow = wd + n * static_cast<int64_t>(nb);
  const int chunks = INT4 ? static_cast<int>(ld / 16) : nb * 2;
  const int64_t nbp = Kp / 32, n16 = Kp / 16;
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) acc[t] = 0.f;

  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + 32 * u < chunks) wv[u] = load_stream16(row + 16 * static_cast<int64_t>(c0 + 32 * u));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      if constexpr (!INT4) {
        const int b = c >> 1;
        const float dw = f16_bits_to_f32(drow[b]);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t >= T) break;
          const int4 xv = __ldg(reinterpret_cast<const int4*>(qx + t * Kp + 16 * c));
          acc[t] += static_cast<float>(dot16(wv[u], xv)) * dx[t * nbp + b] * dw;
        }
      } else {
        const int p = c >> 1, b0 = 2 * p, b1 = 2 * p + 1;
        const int64_t e0 = 64 * static_cast<int64_t>(p) + 16 * (c & 1), e1 = e0 + 32;
        const uint4 w = wv[u];
        const uint4 lo = {w.x & 0x0f0f0f0fu, w.y & 0x0f0f0f0fu, w.z & 0x0f0f0f0fu, w.w & 0x0f0f0f0fu};
        const uint4 hi = {(w.x >> 4) & 0x0f0f0f0fu, (w.y >> 4) & 0x0f0f0f0fu, (w.z >> 4) & 0x0f0f0f0fu,
                          (w.w >> 4) & 0x0f0f0f0fu};
        const float d0 = f16_bits_to_f32(drow[b0]);
        const bool has1 = b1 < nb;  // a lone last block pairs with zeros
        const float d1 = has1 ? f16_bits_to_f32(drow[b1]) : 0.f;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t >= T) break;
          // sum (q - 8) x = sum q x - 8 sum x, the sums of x precomputed (xs).
          const int4 x0 = __ldg(reinterpret_cast<const int4*>(qx + t * Kp + e0));
          const int s0 = dot16(lo, x0) - 8 * xs[t * n16 + e0 / 16];
          acc[t] += static_cast<float>(s0) * dx[t * nbp + b0] * d0;
          if (has1) {
            const int4 x1 = __ldg(reinterpret_cast<const int4*>(qx + t * Kp + e1));
            const int s1 = dot16(hi, x1) - 8 * xs[t * n16 + e1 / 16];
            acc[t] += static_cast<float>(s1) * dx[t * nbp + b1] * d1;
          }
        }
      }
    }
  }
  store_row<TT>(acc, T, lane, y, ldy, n, accumulate);
}

template <int TT>
cudaError_t launch_quant(const QActsDev& a, int T, const Weight& w, float* y, int64_t ldy, bool accumulate,
                         cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(ceil_div(w.rows, kGemvWarps));
  const int nb = static_cast<int>(w.cols / 32);
  const auto* q = static_cast<const uint8_t*>(w.data);
  if (w.dtype == DType::Int4)
    gemv_quant_kernel<TT, true><<<grid, kGemvWarps * 32, 0, stream>>>(q, w.scales, w.rows, w.ld, nb, a.qx, a.dx, a.xs,
                                                                      a.Kp, T, y, ldy, accumulate);
  else
    gemv_quant_kernel<TT, false><<<grid, kGemvWarps * 32, 0, stream>>>(q, w.scales, w.rows, w.ld, nb, a.qx, a.dx,
                                                                       a.xs, a.Kp, T, y, ldy, accumulate);
  return cudaGetLastError();
}

}  // namespace

size_t qacts_bytes(int64_t T, int64_t K) {
  const int64_t Kp = round_up(K, 64);
  return align256(T * Kp) + align256(T * (Kp / 32) * 4) + align256(T * (Kp / 16) * 4);
}

QActsDev qacts_carve(void* ws, int64_t T, int64_t K) {
  const int64_t Kp = round_up(K, 64);
  char* p = static_cast<char*>(ws);
  QActsDev a;
  a.Kp = Kp;
  a.qx = reinterpret_cast<int8_t*>(p);
  p += align256(T * Kp);
  a.dx = reinterpret_cast<float*>(p);
  p += align256(T * (Kp / 32) * 4);
  a.xs = reinterpret_cast<int32_t*>(p);
  return a;
}

cudaError_t quantize_acts(const float* x, int64_t T, int64_t ldx, int64_t K, const QActsDev& a, cudaStream_t stream) {
  const int64_t tasks = T * (a.Kp / 32);
  quantize_acts_kernel<<<static_cast<unsigned>(ceil_div(tasks, 8)), 256, 0, stream>>>(x, T, ldx, K, a);
  return cudaGetLastError();
}

cudaError_t gemv_quant(const QActsDev& a, int64_t T, const Weight& w, float* y, int64_t ldy, bool accumulate,
                       cudaStream_t stream) {
  const int t = static_cast<int>(T);
  if (t <= 1) return launch_quant<1>(a, t, w, y, ldy, accumulate, stream);
  if (t <= 2) return launch_quant<2>(a, t, w, y, ldy, accumulate, stream);
  if (t <= 4) return launch_quant<4>(a, t, w, y, ldy, accumulate, stream);
  if (t <= 8) return launch_quant<8>(a, t, w, y, ldy, accumulate, stream);
  return launch_quant<16>(a, t, w, y, ldy, accumulate, stream);
}

}  // namespace gemma::cuda
