// The weight formats: one table, the one source that the CPU kernels, the CUDA kernels, the
// bindings and (through the bindings: gemma_cpp._C.weight_formats) Python read for a format's
// name, block, bytes, arrays, GGUF type and kernels. Neither cpu/ nor cuda/ owns it; cpu/quant.h
// has what the bytes inside a block mean.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace gemma {

// Float formats (F32, BF16) and quantized ones. The KV cache takes F32, BF16 or Int8.
enum class DType : int { F32 = 0, BF16 = 1, Int8 = 2, Int4 = 3, Int4m = 4, Q4K = 5, Q5K = 6, Q6K = 7 };
constexpr int kDTypeCount = 8;

constexpr int64_t kQBlock = 32;   // int8 / int4 / int4m: weights per block (one fp16 scale each)
constexpr int64_t kQSuper = 256;  // K-quants: weights per super-block
constexpr int64_t kQMeta = 20;    // K-quants: a super-block's scale bytes in our rows

// The K-quant super-blocks as our rows hold them (cpu/quant.h: the meta's fields and the
// quants' bit map). The file's blocks differ only in the meta (GGUF packs 6-bit scales in 12
// bytes; Q6_K puts its scales and d last).
struct BlockQ4K {
  uint8_t meta[kQMeta];
  uint8_t qs[128];
};
struct BlockQ5K {
  uint8_t meta[kQMeta];
  uint8_t qs[128];
  uint8_t qh[32];
};
struct BlockQ6K {
  uint8_t meta[kQMeta];
  uint8_t ql[128];
  uint8_t qh[64];
};
static_assert(sizeof(BlockQ4K) == 148 && sizeof(BlockQ5K) == 180 && sizeof(BlockQ6K) == 212,
              "a K-quant super-block is its meta and the file's quant bytes, unpadded");

// GGUF's blocks of the types whose values a format holds, as the file stores them (ggml's
// block_q8_0 ... block_q6_K; fp16 fields as uint16 bits). The importer (Python) reads the same
// layouts with numpy and checks their sizes against these.
struct GgufQ8_0 { uint16_t d; int8_t qs[32]; };
struct GgufQ4_0 { uint16_t d; uint8_t qs[16]; };
struct GgufQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct GgufQ4K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct GgufQ5K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct GgufQ6K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
static_assert(sizeof(GgufQ8_0) == 34 && sizeof(GgufQ4_0) == 18 && sizeof(GgufQ4_1) == 20, "ggml's block sizes");
static_assert(sizeof(GgufQ4K) == 144 && sizeof(GgufQ5K) == 176 && sizeof(GgufQ6K) == 210, "ggml's block sizes");

// Rows per interleaved group of a quantized matrix in memory (cpu/quant.h says how a group's
// rows interleave; the rows past the last whole group are plain). A run of rows that starts and
// ends on a group boundary is itself such a matrix: Gemma 4's experts are read that way.
constexpr int64_t kQGroup = 16;

struct FormatInfo {
  DType dtype;
  const char* name;         // as Python, the files (our format's "formats") and messages say it
  int64_t block;            // weights per block along a row (1: a plain float)
  int64_t block_bytes;      // bytes a block takes in a row of the quants (of the data, for floats)
  bool scales, mins;        // arrays of their own: one fp16 per block of 32 (mins: int4m)
  int ggml_type;            // the GGUF tensor type whose values it holds (ggml_type's number)
  int64_t ggml_block_bytes; // that type's block in the file
  bool quantize_on_load;    // a float checkpoint can be quantized to it (the others are imported)
  bool cuda;                // the CUDA device has kernels for it (the CPU has them for every format)
  // Bits a weight takes in memory, its scales and mins included.
  constexpr double bits_per_weight() const {
    return (block_bytes * 8.0 + (scales ? 16 : 0) + (mins ? 16 : 0)) / static_cast<double>(block);
  }
};

// In DType order. ggml types: F32 0, Q4_0 2, Q4_1 3, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30.
// int4 / int4m pack two blocks' nibbles in 32 bytes (cpu/quant.h): 16 bytes a block.
constexpr FormatInfo kFormats[kDTypeCount] = {
    {DType::F32, "float32", 1, 4, false, false, 0, 4, false, true},
    {DType::BF16, "bfloat16", 1, 2, false, false, 30, 2, false, true},
    {DType::Int8, "int8", kQBlock, 32, true, false, 8, sizeof(GgufQ8_0), true, true},
    {DType::Int4, "int4", kQBlock, 16, true, false, 2, sizeof(GgufQ4_0), true, true},
    {DType::Int4m, "int4m", kQBlock, 16, true, true, 3, sizeof(GgufQ4_1), true, false},
    {DType::Q4K, "q4_k", kQSuper, sizeof(BlockQ4K), false, false, 12, sizeof(GgufQ4K), false, false},
    {DType::Q5K, "q5_k", kQSuper, sizeof(BlockQ5K), false, false, 13, sizeof(GgufQ5K), false, false},
    {DType::Q6K, "q6_k", kQSuper, sizeof(BlockQ6K), false, false, 14, sizeof(GgufQ6K), false, false},
};

constexpr bool formats_in_order() {
  for (int i = 0; i < kDTypeCount; ++i)
    if (static_cast<int>(kFormats[i].dtype) != i) return false;
  return true;
}
static_assert(formats_in_order(), "kFormats is indexed by DType");
static_assert(kFormats[static_cast<int>(DType::Int8)].bits_per_weight() == 8.5, "int8: 32 bytes and a scale per 32");

constexpr const FormatInfo& format_info(DType d) { return kFormats[static_cast<int>(d)]; }
constexpr const char* format_name(DType d) { return format_info(d).name; }
constexpr bool is_quantized(DType d) { return format_info(d).block > 1; }
constexpr bool is_kquant(DType d) { return format_info(d).block == kQSuper; }
// Bytes of one row of K weights in the quants (or data) array.
constexpr int64_t row_bytes(DType d, int64_t K) {
  // int4 / int4m: pairs of blocks share 32 bytes, a lone last block pairs with zeros.
  return d == DType::Int4 || d == DType::Int4m ? (K + 63) / 64 * 32 : K / format_info(d).block * format_info(d).block_bytes;
}
// The format named `name`, or nullptr.
inline const FormatInfo* format_by_name(const char* name) {
  for (const FormatInfo& f : kFormats)
    if (std::strcmp(f.name, name) == 0) return &f;
  return nullptr;
}

// The names of the formats with CUDA kernels, "float32, bfloat16, int8 and int4" (messages).
inline std::string cuda_formats() {
  std::string out, last;
  for (const FormatInfo& f : kFormats) {
    if (!f.cuda) continue;
    if (!last.empty()) out += (out.empty() ? "" : ", ") + last;
    last = f.name;
  }
  return out.empty() ? last : out + " and " + last;
}

}  // namespace gemma
