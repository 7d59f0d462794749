// Quantized weight formats. One header, one source of truth for their bytes.
//
// int8 (the values of GGUF Q8_0): blocks of 32 weights along a row (the input dimension),
// one scale d per block; w = d * q with q in [-127, 127]. Two arrays per matrix:
//   quants [rows][K] int8, scales [rows][K / 32] IEEE fp16 bits.      8.5 bits per weight
// int4 (the values of GGUF Q4_0): w = d * (q - 8) with q in [0, 15].
//   quants [rows][ceil(K / 64) * 32] uint8, scales [rows][K / 32] fp16. 4.5 bits per weight
//   Blocks go in pairs: byte j (0..31) of pair p holds element j of block 2p in its low
//   nibble and element j of block 2p + 1 in its high nibble (a lone last block pairs with
//   zeros). So 32 bytes split into low and high nibbles are 64 consecutive weights.
//   (GGUF's own Q4_0 puts elements j and j + 16 of one block in a byte: same values, other
//   bytes; an importer repacks.)
// int4m (the values of GGUF Q4_1): w = d * q + m with q in [0, 15] and a second fp16 per
//   block, the min m. Quants packed exactly as int4; three arrays per matrix:
//   quants [rows][ceil(K / 64) * 32] uint8, scales [rows][K / 32] fp16, mins [rows][K / 32]
//   fp16.                                                              5 bits per weight
//   int4 is int4m with m = -8 d: the kernels take either as w = d * q + o, with a per-block
//   offset o (-8 d or m) applied through the activations' block sums. w = d * q + m is two
//   float32 roundings (product, then sum), as ggml's and gguf-py's dequantize_row_q4_1.
// K must be a multiple of 32. Quantization rounds exactly as ggml's quantize_row_q8_0_ref /
// quantize_row_q4_0_ref / quantize_row_q4_1_ref (scale computed in float32, stored as fp16
// round-to-nearest-even).
#pragma once
#include <cstdint>

namespace gemma {

constexpr int64_t kQBlock = 32;

enum class QFormat : int { Int8 = 0, Int4 = 1, Int4m = 2 };

inline int64_t quant_row_bytes(QFormat f, int64_t K) {
  return f == QFormat::Int8 ? K : (K + 63) / 64 * 32;
}
inline int64_t scale_row_count(int64_t K) { return K / kQBlock; }

// IEEE half <-> float, round to nearest even (as numpy's astype(float16) and F16C).
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// One row of K floats -> quants and scales of the format. The reference encoders.
void quantize_row_int8_ref(const float* x, int64_t K, int8_t* q, uint16_t* d);
void quantize_row_int4_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d);
void quantize_row_int4m_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d, uint16_t* m);
// One row back to floats. m: the row's mins (int4m only; ignored otherwise).
void dequantize_row(QFormat f, const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t K, float* out);

// A whole matrix [rows, K] (float32, or bfloat16 bits when src_bf16) quantized row by row
// on the thread pool. m: [rows][K / 32] mins for int4m, else unused (may be null).
void quantize_matrix(QFormat f, const void* src, bool src_bf16, int64_t rows, int64_t K,
                     uint8_t* q, uint16_t* d, uint16_t* m);

}  // namespace gemma
