// gemv(): the decode product's one switch on the weight format, in passes of up to 16 tokens.
#include <algorithm>

#include "cuda/gemv.cuh"

namespace gemma::cuda {

size_t gemv_workspace_bytes(int64_t T, int64_t K) {
  const int64_t Tc = std::min<int64_t>(std::max<int64_t>(T, 1), kGemvMaxTokens);
  return std::max(qacts_bytes(Tc, K), dense_x_bytes(Tc, K));
}

cudaError_t gemv(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool accumulate,
                 void* workspace, cudaStream_t stream) {
  // The formats the kernels read; any other (int4m, the K-quants) is refused here, on the
  // host, rather than read as float32 past its rows' ends.
  switch (w.dtype) {
    case DType::F32: case DType::BF16: case DType::Int8: case DType::Int4: break;
    default: return cudaErrorNotSupported;
  }
  if (T <= 0 || w.rows <= 0) return cudaSuccess;
  const bool quant = w.dtype == DType::Int8 || w.dtype == DType::Int4;
  if (quant && w.cols % 32 != 0) return cudaErrorInvalidValue;
  for (int64_t t0 = 0; t0 < T; t0 += kGemvMaxTokens) {
    const int64_t Tc = std::min<int64_t>(kGemvMaxTokens, T - t0);
    const float* xc = x + t0 * ldx;
    float* yc = y + t0 * ldy;
    cudaError_t e;
    if (quant) {
      const QActsDev a = qacts_carve(workspace, Tc, w.cols);
      e = quantize_acts(xc, Tc, ldx, w.cols, a, stream);
      if (e == cudaSuccess) e = gemv_quant(a, Tc, w, yc, ldy, accumulate, stream);
    } else {
      e = gemv_dense(xc, Tc, ldx, w, yc, ldy, accumulate, workspace, stream);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace gemma::cuda
