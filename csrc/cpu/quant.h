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
//
// Row order in memory (all three formats): rows go in groups of 16. In each whole group the
// 16 rows are interleaved 4 bytes at a time: the quants are [row bytes / 4][16 rows][4 bytes]
// (so a 64-byte line holds the same 4 bytes of 16 rows: int8 block b is lines 8b..8b+7,
// int4 block pair p lines 8p..8p+7), and the scales (and mins) are [K / 32][16 rows]. The
// rows past the last whole group (rows % 16) follow as plain rows. Arrays keep the shape
// [rows, row bytes] and [rows, K / 32]: only the order inside a group changes. A decode
// kernel then takes one 64-byte line with one broadcast activation word into 16 rows' sums,
// and the 16 scales of a block with one load: no horizontal sums, no scale shuffles.
// K must be a multiple of 32. Quantization rounds exactly as ggml's quantize_row_q8_0_ref /
// quantize_row_q4_0_ref / quantize_row_q4_1_ref (scale computed in float32, stored as fp16
// round-to-nearest-even).
//
// K-quants (the values of GGUF Q4_K, Q5_K and Q6_K): super-blocks of 256 weights along a row,
// K a multiple of 256. One byte array per matrix, quants [rows][K / 256 * B]: each row is its
// super-blocks one after the other, each B bytes: first 20 bytes of scales (the "meta"), then
// the quants, as in the GGUF block. All three metas are five 4-byte words:
//   q4_k, q5_k: d (fp16) | dmin (fp16) | sc[8] (uint8, 0..63) | m[8] (uint8, 0..63)
//     w = (d * sc_s) * q - (dmin * m_s) for element j of sub-block s = j / 32, each product
//     and the difference rounded to float32 (ggml's dequantize_row_q4_K; d * sc_s and
//     dmin * m_s are exact). GGUF packs sc and m in 12 bytes of 6-bit fields: we unpack them.
//   q6_k: d (fp16) | 0 (2 bytes) | sc[16] (int8)
//     w = (d * sc_s) * (q - 32) for element j of sub-block s = j / 16 (exact in float32).
// then, per format (B = 148, 180, 212; the file's blocks are 144, 176, 210 bytes):
//   q4_k: qs[128]: byte 32 p + l holds element l of sub-block 2p (low nibble) and of 2p + 1
//         (high nibble): the pair packing of int4, and GGUF's own bytes.
//   q5_k: qs[128] as q4_k, then qh[32]: bit s of qh[l] is the fifth bit (16) of element l of
//         sub-block s (GGUF's bytes).
//   q6_k: ql[128], then qh[64] (GGUF's bytes): element 128 h + 32 c + l (half h < 2, quarter
//         c < 4, l < 32) has low 4 bits (ql[64 h + 32 (c % 2) + l] >> 4 (c / 2)) & 15 and high
//         2 bits (qh[32 h + l] >> 2 c) & 3.
// The rows go in 16-row groups interleaved 4 bytes at a time, as the other formats' quants
// (so a 64-byte line is one word of the meta or the quants for 16 rows); no other arrays.
#pragma once
#include <cstdint>

#include "core/formats.h"

namespace gemma {

inline int64_t scale_row_count(int64_t K) { return K / kQBlock; }

inline int64_t grouped_rows(int64_t rows) { return rows / kQGroup * kQGroup; }

// A quantized matrix's three arrays (mins null but for int4m).
struct QMatrix {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;
  int64_t rows, qb, nb;  // rows, quant bytes per row, blocks per row
};

// Row r in plain order: qb quant bytes, nb scales and (if the matrix has them) nb mins.
void gather_row(const QMatrix& w, int64_t r, uint8_t* q, uint16_t* d, uint16_t* m);
// Whole matrix, plain rows <-> interleaved groups (out of place; m arrays may be null).
void interleave_rows(int64_t rows, int64_t qb, int64_t nb, const uint8_t* q, const uint16_t* d, const uint16_t* m,
                     uint8_t* qo, uint16_t* dout, uint16_t* mout, bool to_groups);

// IEEE half <-> float, round to nearest even (as numpy's astype(float16) and F16C).
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// One row of K floats -> quants and scales of the format. The reference encoders.
void quantize_row_int8_ref(const float* x, int64_t K, int8_t* q, uint16_t* d);
void quantize_row_int4_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d);
void quantize_row_int4m_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d, uint16_t* m);
// One row back to floats. m: the row's mins (int4m only; ignored otherwise).
void dequantize_row(DType f, const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t K, float* out);
// One K-quant row (plain order, K / 256 super-blocks) back to floats, bit-identical to ggml's.
void dequantize_row_kquant(DType f, const uint8_t* row, int64_t K, float* out);

// A whole matrix [rows, K] (float32, or bfloat16 bits when src_bf16) quantized row by row
// on the thread pool. m: [rows][K / 32] mins for int4m, else unused (may be null).
void quantize_matrix(DType f, const void* src, bool src_bf16, int64_t rows, int64_t K,
                     uint8_t* q, uint16_t* d, uint16_t* m);

}  // namespace gemma
