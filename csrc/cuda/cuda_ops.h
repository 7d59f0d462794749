// CUDA kernels of the Gemma decoder: host-callable launchers, plain C++ (no pybind11, no
// device code), so that bindings and a future device-side engine include the same header.
//
// Conventions, shared by every launcher:
// - Every pointer argument is a DEVICE pointer unless its comment says host. Launchers are
//   asynchronous on `stream` and return cudaGetLastError() of their launches.
// - Activations are float32, row-major [tokens, features] (as on the CPU).
// - Weights use gemma::Weight (core/weight.h), as the CPU kernels do, with device pointers: the
//   same formats byte for byte (float32, bf16 bits, and cpu/quant.h's int8 / int4), so one
//   upload of the CPU layout is the GPU layout.
// - Semantics are the CPU engine's, op for op (the comment of each launcher names its twin);
//   summation orders differ, so results agree within float32 rounding, not bit for bit,
//   except where a comment says exact.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/weight.h"

namespace gemma::cuda {

// ---- Device ----------------------------------------------------------------------------

struct DeviceStatus {
  bool available = false;
  std::string reason;    // why not, or a one-line description of device 0
  int device_count = 0;  // 0 when the driver call failed
  int runtime_version = 0, driver_version = 0;  // 13000 = CUDA 13.0; 0 when unknown
  std::string name;      // device 0
  int cc_major = 0, cc_minor = 0;
};
// Probes the driver and device 0 once (cached): no driver, no device, a device this build
// has no kernel image for, and a device older than sm_80 all give available = false and a
// reason. Never throws; safe without a driver (cudart is linked statically).
const DeviceStatus& device_status();
// Multiprocessors of the current device (cached; 1 when unknown): sizes split-K grids.
int sm_count();

// ---- Embedding ---------------------------------------------------------------------------

// out[t, :] = row ids[t] of table, as float32, times scale. table: F32, BF16, Int8 or Int4
// rows [vocab, H]. Twin: weight_row() then *= embed_scale (Model::step); exact, the same
// two float32 roundings. An id outside [0, rows) gives a row of NaN (bindings check ids).
cudaError_t embed(const Weight& table, const int32_t* ids, int64_t T, float scale, float* out,
                  cudaStream_t stream);

// ---- Norms -------------------------------------------------------------------------------

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, w holding (1 + w_hf) already, [T, H].
// out may alias x. Twin: rmsnorm() (also the per-head q/k norms: T = tokens * heads).
cudaError_t rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps,
                    cudaStream_t stream);

// The residual add fused with the norms around it, per row t of [T, H]:
//   x[t] += w_post ? rmsnorm(y[t], w_post) : y[t];   then   out[t] = rmsnorm(x[t], w_next).
// Gemma 1 (w_post null): the next block's input norm after the residual add. Gemma 2/3
// sandwich norms: post-attention norm, residual, pre-MLP norm in one pass. out must not
// alias x or y. Twin: Model::add_normed() followed by rmsnorm().
cudaError_t add_rmsnorm(const float* y, const float* w_post, float* x, const float* w_next, float* out,
                        int64_t T, int64_t H, float eps, cudaStream_t stream);

// ---- RoPE + KV cache ---------------------------------------------------------------------

// One layer of the KV cache, laid out as the CPU's KVCache: [rows][kv_heads][span][head_dim]
// of float32 or bf16, plus valid[rows][capacity] (1: the slot holds a real token). This
// slice addresses slot s at buffer position s (span == capacity: no sliding-window ring).
struct KVLayer {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::F32;  // F32 or BF16
  int64_t rows = 0, kv_heads = 0, span = 0, head_dim = 0;
  uint8_t* valid = nullptr;  // [rows][capacity]
  int64_t capacity = 0;
};

// For each token m < M (position pos[m], cache row cache_row[m], slot slot[m]):
//   q[m] per head: optional RMSNorm with q_norm (Gemma 3), then RoPE, in place;
//   k[m] per kv head: optional RMSNorm with k_norm, RoPE, written to the cache; v[m] copied
//   to the cache (rounded to bf16 for a bf16 cache, nearest even); valid[row][slot] =
//   valid_in ? valid_in[m] : 1.
// q [M, n_heads * hd], k and v [M, n_kv * hd]; k is not modified. inv_freq [hd / 2]
// (float32, the CPU's table: scaling already divided in). RoPE: half-split (rotate_half)
// layout, angle = float(pos) * inv_freq[i] in float32, cosf / sinf (full-range accurate,
// not __cosf). Twin: the rope_cache block of Model::step.
cudaError_t rope_kv_write(float* q, const float* k, const float* v, int64_t M, int64_t n_heads, int64_t n_kv,
                          int64_t hd, const int32_t* pos, const float* inv_freq, const float* q_norm,
                          const float* k_norm, float eps, const KVLayer& cache, const int32_t* cache_row,
                          const int32_t* slot, const uint8_t* valid_in, cudaStream_t stream);

// ---- MLP activation ----------------------------------------------------------------------

// out[i] = gelu_tanh(gate[i]) * up[i], gelu_tanh(a) = a / (1 + exp(-2u)),
// u = sqrt(2/pi) (a + 0.044715 a^3). out may alias gate. Twin: gelu_tanh_mul().
cudaError_t geglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);

// x[i] += y[i], n elements (the residual add). Twin: Model::block_output's add; exact.
cudaError_t add(float* x, const float* y, int64_t n, cudaStream_t stream);

// ---- Matrix products ---------------------------------------------------------------------

// y[t, n] (+)= sum_k x[t, k] w[n, k] for t < T, n < w.rows, k < w.cols: the decode GEMV
// (batch 1..16 per pass; larger T runs in passes of 16 tokens, each reading w once).
//   F32 weights: float32 products and sums.
//   BF16 weights: x rounded to bf16 first (as the CPU's matmul_bf16), float32 sums.
//   Int8 / Int4: x quantized per block of 32 to int8 exactly as the CPU's quantize_acts
//     (dx = amax / 127, q = nearest-even(x * (127 / amax))), integer dot products per block
//     (dp4a), float32 scale and sum: the CPU's quantized matmul, summed in another order.
// workspace: gemv_workspace_bytes(T, w.cols) bytes of device memory, for every format (the
// dense kernels stage the padded x there too). Formats other than F32 / BF16 / Int8 / Int4
// (int4m, the K-quants) return cudaErrorNotSupported, before any launch.
// Rows of x are ldx floats apart, rows of y ldy. accumulate: y += instead of y =.
size_t gemv_workspace_bytes(int64_t T, int64_t K);
cudaError_t gemv(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                 bool accumulate, void* workspace, cudaStream_t stream);

// The same product for prefill with BF16 weights on tensor cores (wmma bf16 16x16x16,
// float32 accumulation): x rounded to bf16 (as the CPU's bf16 path), any M, N, K.
cudaError_t gemm_bf16(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                      bool accumulate, cudaStream_t stream);

// ---- Attention ---------------------------------------------------------------------------

struct AttnParams {
  int64_t n_heads = 0, n_kv = 0, head_dim = 0;  // head h reads kv head h / (n_heads / n_kv)
  float scale = 1.f;    // scores * scale (head_dim^-0.5, or query_pre_attn_scalar^-0.5)
  float softcap = 0.f;  // > 0: scores -> cap * tanh(scores / cap), after scaling, before the mask
  int64_t window = 0;   // > 0: a key is visible iff q - window < k (and |q - k| < window when
                        // not causal); 0: global
  bool causal = true;
};
// Score rule shared by both kernels and the CPU's Model::attention: softmax in float32 over
// the visible keys (slot visible by the window / causal rules and valid[row][slot] != 0);
// a query that sees no key gets a zero output.

// Decode: one query per row r (q [R, n_heads * hd]) at slot q_slot[r] of cache row
// cache_row[r] (null: r), causal. Split-K: the slots [0, n_slots) are cut into chunks of 64
// processed by separate blocks (each block: every query head of one kv head), then merged
// with the log-sum-exp rule in chunk order, skipping the chunks a row sees nothing of: a
// row's result does not depend on R or on the other rows' slots (batch invariance).
// n_slots (host) bounds every q_slot + 1. head_dim % 32 == 0 and <= 256. out [R, n_heads * hd].
size_t attention_decode_workspace_bytes(int64_t R, int64_t n_slots, const AttnParams& p);
// Tests only: 32, 64, 128 or 256 fixes the slots per split-K chunk (0: the fixed 64), so that
// every chunk size runs. Process-wide; set it before computing the workspace.
void set_attention_decode_chunk(int chunk);
cudaError_t attention_decode(const float* q, const KVLayer& cache, const int32_t* cache_row, const int32_t* q_slot,
                             int64_t R, int64_t n_slots, const AttnParams& p, float* out, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// Prefill: T queries per row (q [R, T, n_heads * hd]) at slots slot0 .. slot0 + T - 1 of
// cache rows cache_row[r] (null: r), whose keys are already in the cache (rope_kv_write),
// earlier slots too. Tiled (16 queries x 32 keys) with an online softmax, float32 CUDA
// cores: correctness first. head_dim % 32 == 0 and <= 256. out [R, T, n_heads * hd].
cudaError_t attention_prefill(const float* q, const KVLayer& cache, const int32_t* cache_row, int64_t R,
                              int64_t slot0, int64_t T, const AttnParams& p, float* out, cudaStream_t stream);

// ---- Logits and sampling -----------------------------------------------------------------

// x[i] = cap * tanh(x[i] / cap), n elements (final logit soft-capping). Twin: Model::logits.
cudaError_t softcap(float* x, int64_t n, float cap, cudaStream_t stream);

// out[b] = the first index of the maximum of logits[b, :V] (NaN skipped; all NaN: 0).
// Twin: argmax() in engine/sampler.cpp.
cudaError_t argmax(const float* logits, int64_t B, int64_t V, int32_t* out, cudaStream_t stream);

struct SampleParams {
  bool do_sample = false;  // false: argmax (the other fields are ignored)
  float temperature = 1.f;  // > 0: logits / temperature
  int64_t top_k = 0;        // > 0: keep the tokens >= the k-th largest value (ties kept)
  float top_p = 1.f;        // < 1: keep the smallest best-first set of mass >= top_p
  float min_p = 0.f;        // > 0: keep p >= min_p * p_max
  uint64_t seed = 0;
};
// One token per row b < B from logits [B, V] (read only), in transformers' order:
// temperature, top-k, top-p, min-p, then a draw. The draw uses u = uniform(seed, stream[b]
// (null: b), step) from a counter-based hash (splitmix64; sample_uniform() below is the
// same function on the host), so a (seed, stream, step) gives the same token on every run
// and every batch composition. Probabilities are exp(z - max) in 2^-s fixed point (s =
// 62 - ceil(log2 V)): masses sum in integers, so the choice does not depend on thread
// timing; tokens below 2^-s of the best have zero mass. The drawn token is the first, in
// index order, whose cumulative kept mass exceeds u * total.
// Differences from the CPU sampler (mt19937_64, best-first walk): another random stream,
// so the same seed draws other tokens (same distribution); top-p keeps every token tied
// with the last one kept (the CPU cuts ties by index).
cudaError_t sample(const float* logits, int64_t B, int64_t V, const SampleParams& p, const uint64_t* stream_ids,
                   uint64_t step, int32_t* out, cudaStream_t stream);
// The draw's uniform in [0, 1) (host and device agree bit for bit).
double sample_uniform(uint64_t seed, uint64_t stream_id, uint64_t step);

// transformers' repetition penalty on logits [B, V]: each distinct token t of
// history[b, :history_len[b]] (rows history_stride apart; entries outside [0, V) ignored)
// once: x < 0 ? x * pen : x / pen. first: B * V uint32 of device scratch, every byte 0xff on
// entry (cudaMemset(first, 0xff, ...)) and left so. Twin: the penalty in Sampler::next.
cudaError_t repetition_penalty(float* logits, int64_t B, int64_t V, const int32_t* history, int64_t history_stride,
                               const int32_t* history_len, float penalty, uint32_t* first, cudaStream_t stream);

}  // namespace gemma::cuda
