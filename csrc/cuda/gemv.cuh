// Internal to the GEMV files: the per-format launchers that gemv() in gemv.cu dispatches
// to, and the workspace each takes. One pass handles at most kGemvMaxTokens tokens.
#pragma once
#include "cuda/common.cuh"

namespace gemma::cuda {

constexpr int kGemvMaxTokens = 16;
constexpr int kGemvWarps = 8;  // rows per block: one warp per output row

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The end of a GEMV warp's row n: each token's partial sums reduced across the warp, one lane
// per token storing (or adding) the result.
template <int TT>
__device__ __forceinline__ void store_row(const float (&acc)[TT], int T, int lane, float* y, int64_t ldy, int64_t n,
                                          bool accumulate) {
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    if (t >= T) break;
    const float s = warp_sum(acc[t]);
    if (lane == t % 32) {
      float* o = y + t * ldy + n;
      *o = accumulate ? *o + s : s;
    }
  }
}

// Quantized activations of T tokens, K inputs, padded to Kp = round_up(K, 64) with zeros
// (a lone last int4 block reads a zero half): qx int8 [T][Kp], dx float [T][Kp / 32] (the
// block scales amax / 127), xs int32 [T][Kp / 16] (sum of each 16 consecutive q).
struct QActsDev {
  int8_t* qx;
  float* dx;
  int32_t* xs;
  int64_t Kp;
};
size_t qacts_bytes(int64_t T, int64_t K);
QActsDev qacts_carve(void* ws, int64_t T, int64_t K);

cudaError_t quantize_acts(const float* x, int64_t T, int64_t ldx, int64_t K, const QActsDev& a, cudaStream_t stream);
cudaError_t gemv_quant(const QActsDev& a, int64_t T, const Weight& w, float* y, int64_t ldy, bool accumulate,
                       cudaStream_t stream);

// Dense weights: x copied to a padded [T][round_up(K, 8)] buffer first, rounded to bf16 for
// BF16 weights (the CPU's rule), float32 for F32 weights.
size_t dense_x_bytes(int64_t T, int64_t K);
cudaError_t gemv_dense(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                       bool accumulate, void* workspace, cudaStream_t stream);

}  // namespace gemma::cuda
