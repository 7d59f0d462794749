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
  const float* xsum;     // [T][np * 2] dx_b * sum of block b's q: y += sum_b o_b xsum_b for w = d q + o
  const int16_t* bsum16; // [T][np * 4] the sums of q over each half block (16 values): K-quants' offsets
};

// int4 and int4m share the nibble layout (int4: true) and differ in the block offset o of
// w = d q + o: -8 d when mins is null (int4), else the fp16 mins [rows][cols / 32] (int4m).
// All three arrays hold the rows in quant.h's order: whole 16-row groups interleaved, then the
// rows % 16 plain rows; `rows` (the whole matrix's) tells where the groups end. Row ranges
// given to the kernels start on a group's first row or inside the plain tail.
struct QWeightView {
  const uint8_t* q;
  const uint16_t* scales;
  const uint16_t* mins;
  int64_t rows, cols, ld;
  bool int4;
};

// A K-quant matrix (quant.h): rows of super-blocks ld bytes apart, 16-row groups interleaved.
struct KQWeightView {
  const uint8_t* q;
  int64_t rows, cols, ld;
  DType format;  // Q4K, Q5K or Q6K
};

// Rows [n0, n1) of y for all tokens. scratch: room for 16 * (cols / 32 + 1) + 16 floats.
void quant_rows_avx512vnni(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                           int64_t n0, int64_t n1, float* scratch);
void quant_rows_avx2(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                     int64_t n0, int64_t n1, float* scratch);

// K-quants: the whole 16-row groups among rows [n0, n1) (n0 a group's first row); returns the
// first row it did not compute (the plain tail rows are the caller's).
int64_t kquant_groups_avx2(const KQWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                           int64_t n0, int64_t n1);
int64_t kquant_groups_avx512vnni(const KQWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                                 int64_t n0, int64_t n1);

}  // namespace gemma
