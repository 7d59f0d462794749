// CPU kernels. Activations are float32, row-major [tokens, features]. Weights are
// row-major [out, in] (the layout of HF checkpoints), float32 or bfloat16 (uint16 bits).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/weight.h"

namespace gemma {

const char* cpu_isa();  // "avx512", "avx2" or "scalar": the path this build runs

// What a matmul serves. Kernels are chosen by the kind of work, never by how many token rows
// share a call, so that a decode row's outputs are the same bits whether it runs alone or
// beside other rows (batch invariance: the serving scheduler relies on it). Every kernel
// computes each token row with the same operations in the same order whatever the other rows
// are; only the choice between kernels could depend on T, and Decode never lets it: it takes
// the kernels that stream the weights (integer dot products, AVX512-BF16, float32 FMAs) at
// any T. Prefill may take AMX tiles from 16 tokens on, which add in another order.
enum class Work { Decode, Prefill };

// y[t, n] (+)= sum_k x[t, k] * w[n, k] for t < T, n < w.rows; k < w.cols. With bf16
// weights x[t, k] is first rounded to bf16 (see matmul_bf16).
// x rows ldx apart, y rows ldy apart. accumulate: add into y instead of overwriting.
// Multi-threaded over output rows; float32 accumulation whatever the weight type.
void matmul(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
            bool accumulate = false, Work work = Work::Prefill);

// y[T, N] = x[T, K] . w[N, K]^T on the calling thread (no pool), w float32 or bfloat16
// (x is not rounded), float32 accumulation: for kernels that are themselves parallel, such
// as attention over the KV cache.
void matmul_serial(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy);

// The bf16-weight case of matmul: x is rounded to bf16 first (the products run on bf16
// dot-product hardware: AMX, AVX512-BF16, or widened to float32 where neither exists).
void matmul_bf16(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                 bool accumulate, Work work);
const char* bf16_matmul_path();  // "amx", "avx512_bf16" or "generic"
// Pins the path ("auto": the best this CPU has); false if this CPU or build lacks it.
bool set_bf16_matmul_path(const std::string& name);

// The quantized case of matmul: x is quantized per block of 32 to int8 (scale amax / 127,
// round to nearest even) and multiplied with integer dot products: AVX512-VNNI, AVX2 or
// scalar, chosen once from what the CPU supports.
void matmul_quant(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                  bool accumulate, Work work);
const char* quant_matmul_path();                      // "avx512_vnni", "avx2" or "scalar"

// One of several products of the same input: y (ldy apart) = x . w^T, or += with accumulate.
struct MatmulTarget {
  const Weight* w;
  float* y;
  int64_t ldy;
  bool accumulate = false;
};
// Several matmuls of one input in one call (q, k and v; gate and up): quantized weights
// with the same input size, on the integer kernels (decode, or fewer than 16 tokens), share
// one quantization of x and one pass of the thread pool. Returns false, having done nothing,
// when that does not apply.
bool matmul_quant_many(const float* x, int64_t T, int64_t ldx, const MatmulTarget* outs, int n, Work work);
// matmul for each target, through matmul_quant_many where it applies.
void matmul_many(const float* x, int64_t T, int64_t ldx, const MatmulTarget* outs, int n, Work work);
// Prefill with quantized weights on AMX: blocks dequantized to bf16 into the tiles (inputs
// rounded to bf16, float32 sums, as the bf16 path). Computes the first rows (a multiple of
// 32) and returns how many; 0 when AMX is not available (or the bf16 path is pinned).
int64_t matmul_quant_amx(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                         bool accumulate);
bool set_quant_matmul_path(const std::string& name);  // tests pin a path; "auto" restores

// n bfloat16 values (uint16 bits) widened to float32, on the thread pool (loading a bf16
// checkpoint as float32).
void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n);

// Row r of w as float32 (embedding lookup).
void weight_row(const Weight& w, int64_t r, float* out);

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * scale, where scale holds (1 + w) already (Gemma
// 1-3; Gemma 4's norms are w itself); scale null: no scale (Gemma 4's value norm).
void rmsnorm(const float* x, const float* scale, float* out, int64_t T, int64_t H, float eps);

// In place: a[i] = gelu_tanh(a[i]) * b[i] for n elements.
void gelu_tanh_mul(float* a, const float* b, int64_t n);

// Rotary embedding in the half-split (rotate_half) layout, in place, on n_heads heads of
// head_dim each, laid out contiguously; cos/sin hold head_dim/2 values for this position.
void rope_apply(float* x, int n_heads, int head_dim, const float* cos, const float* sin);

// Fast exp for float32 (|rel err| < 2e-7 on the softmax range).
void exp_inplace(float* x, int64_t n);

// Reads a buffer of `bytes` with every pool thread, `reps` times; returns bytes/second of
// the best pass. The memory-bandwidth yardstick benchmarks compare decode against.
double read_bandwidth(int64_t bytes, int reps);

// out[d] = scale * sum_j p[j] * v[j][d] for d < v.cols, j < n: the attention's P . V for
// one query (v float32 or bfloat16, rows v.ld apart), accumulated in registers. A row with
// p[j] = 0 (a masked key) is not read.
void weighted_rows(const float* p, const Weight& v, int64_t n, float scale, float* out);

// One layer of a KV cache as the attention kernels read it (engine/model.h's KVCache): for
// each (row, KV head) a run of `span` slots [origin, origin + span) of head_dim values at
// ((row * kv_heads + head) * span + slot - origin) * head_dim: float32, bfloat16 bits, or
// int8 with an fp16 scale per block of 32 values (k_scales / v_scales, at that offset / 32);
// valid[row * capacity + slot] says whether a slot holds a real token.
struct KVLayerView {
  const void* k = nullptr;
  const void* v = nullptr;
  const uint16_t* k_scales = nullptr;
  const uint16_t* v_scales = nullptr;
  DType dtype = DType::F32;
  int64_t kv_heads = 0, span = 0, origin = 0, head_dim = 0;
  // Each row's own first slot held, when rows move at their own pace (the scheduler's
  // sequences); nullptr: every row's is `origin`.
  const int64_t* origins = nullptr;
  const uint8_t* valid = nullptr;
  int64_t capacity = 0;
  int64_t origin_of(int64_t row) const { return origins ? origins[row] : origin; }
  // Slots [first, first + n) of one (row, head) as an [n, head_dim] matrix (int8: plain rows
  // of Weight's Int8 format).
  Weight keys(int64_t row, int64_t head, int64_t first, int64_t n) const {
    return rows_of(k, k_scales, row, head, first, n);
  }
  Weight values(int64_t row, int64_t head, int64_t first, int64_t n) const {
    return rows_of(v, v_scales, row, head, first, n);
  }

 private:
  Weight rows_of(const void* base, const uint16_t* scales, int64_t row, int64_t head, int64_t first, int64_t n) const {
    const int64_t off = ((row * kv_heads + head) * span + (first - origin_of(row))) * head_dim;
    const int64_t elem = dtype == DType::F32 ? 4 : dtype == DType::BF16 ? 2 : 1;
    Weight w;
    w.dtype = dtype;
    w.data = static_cast<const char*>(base) + off * elem;
    if (dtype == DType::Int8) w.scales = scales + off / 32;
    w.rows = n;
    w.cols = w.ld = head_dim;
    return w;
  }
};

// What attention computes for a query at slot q: the keys it sees are the valid slots in
// [q - window + 1, q] (window 0: [0, q]; not causal: every valid slot of the call, and within
// the window on both sides); scores scale * q . k, soft-capped when softcap > 0
// (cap * tanh(s / cap)); softmax in float32; P . V. A query that sees no key gives zeros.
struct AttentionRule {
  int64_t n_heads = 0, window = 0;
  float scale = 1.f, softcap = 0.f;
  bool causal = true;
};

// Decode attention: R queries, query r ([n_heads * head_dim] at q + r * n_heads * head_dim)
// of cache row rows[r] at slot slots[r]; out the same shape as q. Each KV head's group of
// query heads reads each key and value once; a row's keys are split into parts of
// kDecodeKeyPart slots from its first visible one, spread over the thread pool, and each
// query head merges its parts in order. The parts depend only on the row's own slot: a row's
// result is the same bits whatever the thread count and whatever other rows share the call.
// scratch: grown as needed (kept by the caller between calls). Causal only.
constexpr int64_t kDecodeKeyPart = 256;
void attention_decode(const float* q, int64_t R, const int64_t* rows, const int64_t* slots, const KVLayerView& kv,
                      const AttentionRule& rule, float* out, std::vector<float>& scratch);

// Prompt attention: T queries for each of R rows at slots [slot0, slot0 + T) (q, out
// [R * T, n_heads * head_dim]); the cache holds every earlier slot. Per task one row, a block
// of 16 queries and the heads of one KV group (or one head, when the tasks would be too few
// for the pool): the keys the block may see, and only those (the window on sliding layers),
// in tiles of 64 read once for all its query rows, with the online softmax (running maximum,
// sum and output per query). scratch as attention_decode's (an int8 cache's slots as float32).
void attention_prefill(const float* q, int64_t R, const int64_t* rows, int64_t slot0, int64_t T,
                       const KVLayerView& kv, const AttentionRule& rule, float* out, std::vector<float>& scratch);

// The parts of attention_decode, exposed for tests. attention_partial: the G query heads that
// share one KV head (q: [G, head_dim]) against n keys and values (k, v: [n, head_dim]): per
// query g, with s_j the rule's score (-inf where !valid[j]), m[g] = max_j s_j,
// l[g] = sum_j e^(s_j - m[g]), o[g] = sum_j e^(s_j - m[g]) v_j ([G, head_dim], unnormalised);
// a part with no valid key gives m = -inf, l = 0, o = 0. scratch: G * n floats.
// attention_merge: one query's output from its parts, in part order: with M = max_c m_c,
// out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c (zeros when no part saw a key); the
// parts' m and l lie `stride` apart, their o rows stride * head_dim apart.
void attention_partial(const float* q, int64_t G, const Weight& k, const Weight& v, const uint8_t* valid,
                       int64_t n, float scale, float cap, float* scratch, float* m, float* l, float* o);
void attention_merge(const float* m, const float* l, const float* o, int64_t parts, int64_t stride, int64_t hd,
                     float* out);

float dot(const float* a, const float* b, int64_t n);

}  // namespace gemma
