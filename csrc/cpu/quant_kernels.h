// The quantized matmul's SIMD kernels, one source file per instruction set, each compiled
// with its own flags (CMakeLists.txt) and chosen once, at first use, by what the running CPU
// supports (quant.cpp). These files see only plain pointers and PODs: no std:: templates, so
// no function compiled for AVX-512 can be picked by the linker for code that runs elsewhere.
#pragma once
#include <cstdint>

namespace gemma {

// Quantized activations (quant.cpp's quantize_acts): T token rows, np block pairs each.
struct QActView {
  int64_t T, np;
  const int8_t* q;       // [T][np * 64]
  const float* dx;       // [T][np * 2] block scales
  const int32_t* qsum;   // [T][np * 16] per 4-byte lane, the sum of its q
  const float* dxe;      // [np * 16] (T == 1): each lane's block scale
  const uint8_t* ux;     // [np * 64] (T == 1): q + 128
  const float* corr;     // [np * 2] (T == 1): 8 * dx_b * sum of block b's q (int4's -8 term)
};

struct QWeightView {
  const uint8_t* q;
  const uint16_t* scales;
  int64_t rows, cols, ld;
  bool int4;
};

// Rows [n0, n1) of y for all tokens. scratch: room for 8 * (cols / 32 + 1) + 16 floats.
void quant_rows_avx512vnni(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                           int64_t n0, int64_t n1, float* scratch);
void quant_rows_avx2(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                     int64_t n0, int64_t n1, float* scratch);

}  // namespace gemma
