// A weight matrix as every device's kernels read it (pointers into the device's memory).
#pragma once
#include <cstdint>

#include "core/formats.h"

namespace gemma {

// A weight matrix [rows = out features, cols = in features]. F32/BF16: row-major, rows ld
// elements apart. Int8/Int4/Int4m (cpu/quant.h): data holds the quants, rows ld bytes apart,
// scales the fp16 block scales, [rows][cols / 32], and (Int4m only) mins the fp16 block
// mins, [rows][cols / 32]. Q4K/Q5K/Q6K (cpu/quant.h's K-quants): data holds the rows'
// super-blocks, scales included, rows ld bytes apart; no other arrays.
struct Weight {
  const void* data = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* mins = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
  bool kquant() const { return is_kquant(dtype); }
  bool quantized() const { return is_quantized(dtype); }
};

}  // namespace gemma
