// The Gemma decoder on the CPU: config, weights (pointers into memory the caller owns),
// KV cache, the forward over a batch of token rows, and the generation loop.
#pragma once
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "engine/device.h"
#include "engine/sampler.h"

namespace gemma {

// Seconds spent per kind of op since the last reset, summed over calls (benchmarks turn it
// on; off, it costs one branch per op).
struct OpProfile {
  bool enabled = false;
  double matmul = 0, attention = 0, norm = 0, rope_cache = 0, activation = 0, lm_head = 0;
};
OpProfile& op_profile();

struct ModelConfig {
  std::string generation = "gemma";  // whose forward runs (engine/generation.h): "gemma" (Gemma 1, 2, 3)
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, max_positions = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.f;        // RoPE base of full-attention layers
  float rope_factor = 1.f;           // linear RoPE scaling of full-attention layers (positions / factor)
  float rope_theta_local = 0.f;      // the same two for sliding-window layers (theta 0: rope_theta)
  float rope_factor_local = 1.f;
  float embed_scale = 1.f;   // sqrt(hidden_size), already rounded to the weight dtype
  float attn_scale = 1.f;    // head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
  float attn_softcap = 0.f;  // Gemma 2: scores -> cap * tanh(scores / cap); 0 = none
  float final_softcap = 0.f; // Gemma 2: the same on the logits
  bool causal = true;        // false: use_bidirectional_attention
  DType kv_dtype = DType::F32;  // the KV cache: F32, BF16 (half the memory) or Int8 (a quarter; Q8_0's values)
  bool sandwich_norms = false;  // Gemma 2/3: the attention and MLP outputs are normed before the residual add
  bool qk_norm = false;         // Gemma 3: per-head RMSNorm of queries and keys before RoPE
  // Per layer: the sliding window (a key is visible iff q - window < k <= q), 0 = global.
  std::vector<int64_t> window;
  int64_t layer_window(int64_t l) const { return window.empty() ? 0 : window[l]; }
  // Per layer, where layers differ (Gemma 4's full-attention layers): the head size and the KV
  // heads; empty: head_dim and num_kv_heads for every layer.
  std::vector<int64_t> layer_head_dims, layer_kv_heads;
  int64_t head_dim_of(int64_t l) const { return layer_head_dims.empty() ? head_dim : layer_head_dims[l]; }
  int64_t kv_heads_of(int64_t l) const { return layer_kv_heads.empty() ? num_kv_heads : layer_kv_heads[l]; }
  int64_t max_head_dim() const;  // over the layers
  int64_t max_kv_width() const;  // the largest kv_heads_of(l) * head_dim_of(l)
  // Per layer (Gemma 4's KV sharing): the layer whose keys and values it attends over, itself
  // or an earlier one of the same kind (a sharing layer computes queries only and keeps no
  // cache); empty: each its own. And the MLP's width, where layers differ (the double-wide MLP
  // of the sharing layers); empty: intermediate_size.
  std::vector<int64_t> kv_sources, layer_intermediate_sizes;
  int64_t kv_source_of(int64_t l) const { return kv_sources.empty() ? l : kv_sources[l]; }
  int64_t intermediate_of(int64_t l) const {
    return layer_intermediate_sizes.empty() ? intermediate_size : layer_intermediate_sizes[l];
  }
  int64_t max_intermediate() const;
  // Gemma 4's per-layer input embeddings (0: none): ple_dim values per layer and token, from a
  // [ple_vocab, layers * ple_dim] table scaled by ple_embed_scale and a projection of the scaled
  // embedding (times ple_proj_scale, then normed), the two summed and times ple_input_scale.
  int64_t ple_dim = 0, ple_vocab = 0;
  float ple_embed_scale = 1.f, ple_proj_scale = 1.f, ple_input_scale = 1.f;
  // Gemma 4's mixture-of-experts block (num_experts 0: none): beside the dense MLP, each token's
  // top_k_experts of num_experts (MLPs of moe_intermediate), chosen by a router whose input is
  // scaled by router_input_scale.
  int64_t num_experts = 0, top_k_experts = 0, moe_intermediate = 0;
  float router_input_scale = 1.f;
  bool v_norm = false;   // Gemma 4: values RMS-normed per head (no weight) before the cache
  bool k_eq_v = false;   // Gemma 4: full-attention layers take their values from the raw key projection
  // The fraction of a head's rotary pairs that rotate ("proportional" RoPE: the first ones, at
  // the frequencies of the whole head; the others pass unchanged): full-attention and sliding layers.
  float rope_partial = 1.f, rope_partial_local = 1.f;
  // std::invalid_argument naming what is wrong: sizes not positive, head_dim odd, heads not a
  // multiple of kv heads, a window list of the wrong length, RoPE bases or factors not
  // positive, negative soft-caps.
  void validate() const;
};

struct LayerWeights {
  Weight q, k, v, o, gate, up, down;
  const float* attn_norm = nullptr;  // (1 + w), float32 [hidden]
  const float* mlp_norm = nullptr;   // (1 + w), float32 [hidden]: before the MLP
  // Gemma 2/3 (sandwich_norms): after the attention output and after the MLP, [hidden].
  const float* post_attn_norm = nullptr;
  const float* post_mlp_norm = nullptr;
  // Gemma 3 (qk_norm): per-head norms of queries and keys, [head_dim].
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  // Gemma 4: the layer's output is multiplied by it, float32 [1].
  const float* layer_scalar = nullptr;
  // Gemma 4's per-layer input: gate [ple_dim, hidden], out [hidden, ple_dim], and the norm of
  // its output [hidden].
  Weight ple_gate, ple_out;
  const float* ple_post_norm = nullptr;
  // Gemma 4's experts: the router [E, hidden], its input scale [hidden], each expert's output
  // scale [E]; every expert's gate and up [E * 2 I, hidden] (expert e: rows [2 e I, 2 e I + I) and
  // [2 e I + I, 2 (e + 1) I)) and down [E * hidden, I]; the norms of the experts' input, of the
  // dense MLP's output and of the experts' output [hidden].
  Weight router, experts_gate_up, experts_down;
  const float* router_scale = nullptr;
  const float* expert_scale = nullptr;
  const float* moe_pre_norm = nullptr;
  const float* moe_dense_norm = nullptr;
  const float* moe_post_norm = nullptr;
};

struct ModelWeights {
  Weight embed;                       // [vocab, hidden]; also the LM head when tied
  Weight lm_head;                     // [vocab, hidden] when untied; data == nullptr if tied
  const float* final_norm = nullptr;  // (1 + w), float32 [hidden]
  // Gemma 4's per-layer input embeddings: the table [ple_vocab, layers * ple_dim] and the
  // projection [layers * ple_dim, hidden] (any weight format: read whole, a row lookup and a
  // matmul per step), and the projection's norm [ple_dim].
  Weight ple_embed, ple_proj;
  const float* ple_norm = nullptr;
  std::vector<LayerWeights> layers;
};

// Keys and values of B sequences for every layer: float32, bfloat16, or int8 with one fp16
// scale per block of 32 values (the values of GGUF's Q8_0: x = d q, d = amax / 127). Each
// layer is laid out [row][kv_head][slot][head_dim] so that one (row, kv head) is one
// contiguous run of slots: the attention reads it front to back; an int8 cache keeps the
// scales in the same order, [row][kv_head][slot][head_dim / 32]. valid[row][slot] says whether
// a slot holds a real token (0 for padding); masked slots are never attended to.
//
// A sliding-window layer keeps only the last slots it can still see: its buffer holds
// span[l] slots per row, starting at that row's logical slot origin[l][row], and make_room()
// moves a row's still-visible tail to the front when its next chunk would not fit
// (span >= 2 window + chunk, so that move happens at most once per window of decoded tokens).
// Rows move at their own pace: the scheduler's sequences are at different positions.
struct KVCache {
  Device* device = nullptr;                 // where the values live (the model's device)
  int64_t rows = 0, capacity = 0, layers = 0;
  std::vector<int64_t> kv_heads, head_dim;  // per layer
  std::vector<int64_t> source;              // per layer: the layer whose slots it reads (ModelConfig::kv_sources)
  DType dtype = DType::F32;
  int64_t elem = 4;                         // bytes per cached value: 4, 2 or 1
  std::vector<int64_t> span, base;          // per layer: slots held per row, element offset
  std::vector<int64_t> origin;              // [layers][rows]: the first slot each row holds (host)
  DeviceArray k, v;                         // the values, `elem` bytes each
  DeviceArray k_scales, v_scales;           // int8: fp16 scale of each block of 32 values
  DeviceArray valid;                        // uint8 [rows][capacity], logical slots
  // max_chunk: the most tokens one step() writes at once. Every byte starts at zero.
  KVCache(Device& device, const ModelConfig& c, int64_t rows, int64_t capacity, int64_t max_chunk);
  int64_t offset(int64_t layer, int64_t row, int64_t head, int64_t slot) const {
    return base[layer] +
           ((row * kv_heads[layer] + head) * span[layer] + (slot - origin[layer * rows + row])) * head_dim[layer];
  }
  // Before writing slots [slot0, slot0 + T) of one row in a layer whose queries see `window`
  // slots back.
  void make_room(int64_t layer, int64_t row, int64_t slot0, int64_t T, int64_t window);
  // A row starts a new sequence: it holds no slot yet.
  void reset_row(int64_t row);
  // Bytes of the keys, values and their scales (every layer's, all rows).
  int64_t bytes() const { return static_cast<int64_t>(k.bytes() + v.bytes() + k_scales.bytes() + v_scales.bytes()); }
  // One layer as the attention kernels read it (device pointers).
  KVLayerView layer(int64_t l) const;
};

// What forward() returns for each row: every position or only the last one; the hidden
// state after the final norm, or logits through the tied embedding.
enum class Output { Hidden, Logits };

struct GenerateResult {
  std::vector<int32_t> tokens;  // [rows, steps], pad_token_id after a row finished
  int64_t steps = 0;
};

// Called once per step with the new token of every row (pad for finished rows).
using StepCallback = std::function<void(const std::vector<int32_t>&)>;
// Called once per step, before the sampler, with the raw logits [rows.size(), vocab] of the
// rows still generating (finished rows cost nothing more, so they have none).
using LogitsSink = std::function<void(const std::vector<int64_t>& rows, const float* logits)>;

// The token rows of one step(): decode tokens first, one per row, each at its own slot; then
// a prompt chunk, T tokens of each of pre_rows at slots [slot0, slot0 + T). The two kinds take
// their own kernels (kernels.h, Work), so a row's bits do not depend on what shares its step.
struct StepRows {
  std::vector<int64_t> dec_rows, dec_slots;
  std::vector<int64_t> pre_rows;
  int64_t slot0 = 0, T = 0;
  int64_t decode_tokens() const { return static_cast<int64_t>(dec_rows.size()); }
  int64_t prompt_tokens() const { return static_cast<int64_t>(pre_rows.size()) * T; }
};

// One row's next token, drawn by Model::draw from the row's logits. In: the row's sampler
// (its parameters and random stream), its history (the repetition penalty's tokens) and how
// many top log-probabilities it wants (-1: none). Out: the token and, with logprobs, its
// log-probability under the model (the log-softmax of the raw logits, before any penalty or
// warping) and the `logprobs` most likely tokens with theirs (best first; ties: lower id).
struct DrawRow {
  Sampler* sampler = nullptr;
  const std::vector<int32_t>* history = nullptr;
  int32_t logprobs = -1;
  int32_t token = 0;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;
};

// The activation buffers, in the model's device memory: sized for the largest chunk seen and
// kept for the model's life, so that a decode step allocates nothing. out: step()'s final
// hidden states; lg: logits; sel: rows gathered from out.
struct Workspace {
  DeviceArray x, h, q, k, v, att, g, u, out, lg, sel;
  DeviceArray ple_all, ple_tok, ple_ctx, ple_gate;  // Gemma 4's per-layer inputs
  DeviceArray moe_in, moe_out, moe_rows, moe_g, moe_u, moe_y, moe_logits;  // Gemma 4's experts
  std::vector<float> moe_host;  // the router's logits on the host
  std::vector<std::vector<std::pair<int64_t, float>>> moe_chosen;  // per expert: its tokens and weights
  std::vector<int32_t> moe_order;                                  // a token's experts, best first
  StepTokens tokens;  // the step's tokens as the device takes them (host memory)
};

struct Generation;  // engine/generation.h

// forward() and generate() may be called from several threads: one runs at a time (they
// share the workspace, and the thread pool serialises their matmuls anyway).
class Model {
 public:
  // Validates config. device: where the ops run (null: the CPU, staged when
  // set_default_cpu_staged() says so); weights are placed there once (Device::place throws
  // what the device cannot run).
  Model(const ModelConfig& config, ModelWeights weights, std::shared_ptr<Device> device = nullptr);
  const ModelConfig& config() const { return cfg_; }
  Device& device() const { return *dev_; }

  // input_ids, attention_mask, positions: [B, L] row-major. Returns float32
  // [B, last_only ? 1 : L, hidden or vocab] (the buffer the output was computed in: callers
  // take it over without a copy). hidden_states (optional): every layer's input and the
  // final normed output, [num_layers + 1, B, L, hidden].
  std::vector<float> forward(const int32_t* input_ids, const int32_t* attention_mask,
                             const int32_t* positions, int64_t B, int64_t L, Output output,
                             bool last_only, std::vector<float>* hidden_states = nullptr);

  // forward(), its output left in the device's memory (a GPU's: for DLPack consumers such as
  // torch, without a copy to the host).
  DeviceArray forward_on_device(const int32_t* input_ids, const int32_t* attention_mask, const int32_t* positions,
                                int64_t B, int64_t L, Output output, bool last_only,
                                std::vector<float>* hidden_states = nullptr);

  // Takes back an output of forward_on_device() whose owner (a DLPack consumer) let it go, on
  // any thread: it is freed by the next call or step, under the model's lock, before that
  // allocates anything.
  void bury(DeviceArray a) noexcept;

  GenerateResult generate(const int32_t* input_ids, const int32_t* attention_mask, int64_t B,
                          int64_t L, const SamplingParams& params, const StepCallback& on_step,
                          const LogitsSink& on_logits = nullptr);

  // Called by forward() and generate() before each prompt chunk and each decode step, on the
  // calling thread: it may throw to abandon the call (the bindings raise a pending Ctrl-C
  // this way), and the model stays usable for the next one.
  void set_interrupt(std::function<void()> check) { interrupt_ = std::move(check); }

  // ---- For a scheduler that keeps a cache of its own (engine/scheduler.h) ----------------
  // Each takes the model's lock: another thread may be running forward() or generate(), and
  // a device that queues a step's ops must see nothing else in between.
  // A KV cache for `rows` sequences of `capacity` slots, written `max_chunk` tokens at most
  // per step.
  KVCache new_cache(int64_t rows, int64_t capacity, int64_t max_chunk);
  // Frees a cache (it is left empty).
  void free_cache(KVCache& cache);
  // A row of the cache starts a new sequence (KVCache::reset_row).
  void reset_cache_row(KVCache& cache, int64_t row);
  // One step of sr's tokens (ids, pos: one per token, in sr's order), then a token for each of
  // `rows` (n of them) from the logits of the step's token drawn_at[i], as decode work (one
  // position per row, as generate()'s every token): batch invariance holds for each row.
  void step_and_draw(KVCache& cache, const StepRows& sr, const int32_t* ids, const int32_t* pos,
                     const int64_t* drawn_at, DrawRow* rows, int64_t n);

 private:
  // The token of each of n rows (their hidden states [n, hidden] in device memory, one per
  // row), written once for generate() and the scheduler: when every row is greedy without
  // penalties or logprobs and nothing reads the logits, a device with memory of its own picks
  // them there (only the ids come back); else the logits come to the host, raw_logits (when
  // given) sees them first, then each row's sampler draws (rows spread over the thread pool, or
  // a lone row's scan of the vocabulary spread over it).
  void draw(const float* states, int64_t n, DrawRow* rows, const std::function<void(const float*)>& raw_logits);
  // Runs the tokens of sr (ids/pos/valid: one per token, in sr's order, host memory), each
  // written to its row's slot. Returns the final-normed hidden states [tokens, hidden] in the
  // device's memory (ws_.out, valid until the next step). layer_sink (optional): each layer's
  // input and the final output as they are made, device pointers.
  const float* step(KVCache& cache, const StepRows& sr, const int32_t* ids, const int32_t* pos,
                    const uint8_t* valid, const std::function<void(int64_t, const float*)>& layer_sink);
  void drain_graveyard();  // frees what bury() took (the caller holds mu_)
  // Floats forward() returns: B * (last_only ? 1 : L) * (hidden or vocab).
  int64_t forward_size(int64_t B, int64_t L, Output output, bool last_only) const;
  // forward()'s work, into out: B * (last_only ? 1 : L) * (hidden or vocab) floats, in the
  // device's memory when out_on_device, else host memory.
  void forward_into(float* out, bool out_on_device, const int32_t* input_ids, const int32_t* attention_mask,
                    const int32_t* positions, int64_t B, int64_t L, Output output, bool last_only,
                    std::vector<float>* hidden_states);
  // Rows 0..B-1 each with T prompt tokens at [slot0, slot0 + T).
  StepRows prompt_rows(int64_t B, int64_t slot0, int64_t T) const;
  // The prompt [B, L] through step() in chunks of at most kMaxChunkTokens tokens;
  // on_chunk(c0, T, hidden [B * T, hidden]) sees each chunk's final-normed states (device).
  void prefill(KVCache& cache, const int32_t* input_ids, const int32_t* attention_mask,
               const int32_t* positions, int64_t B, int64_t L, std::vector<float>* hidden_states,
               const std::function<void(int64_t, int64_t, const float*)>& on_chunk);
  // Tokens per row in one prefill chunk (causal attention lets a prompt go through in chunks).
  int64_t chunk_tokens(int64_t B, int64_t L) const;
  // Logits of n hidden states (device memory) into out (device memory).
  void logits(const float* hidden, int64_t n, float* out, Work work);
  // The same, left in host memory the caller may change: the device's own buffer when it is
  // host memory, else `stage` downloaded.
  float* host_logits(const float* hidden, int64_t n, Work work, std::vector<float>& stage);
  // Greedy picks under p need no logits on the host: on a device with memory of its own they
  // are made there (Device::argmax; the same first index of the maximum as the sampler's).
  bool device_greedy(const SamplingParams& p) const;
  // Those picks for n hidden states (device memory) into out (host): logits, then argmax there.
  void greedy_on_device(const float* hidden, int64_t n, int32_t* out);
  // a grown to hold at least n floats (its contents are lost when it grows).
  float* scratch(DeviceArray& a, int64_t n);
  ModelConfig cfg_;
  const Generation* gen_ = nullptr;  // the config's generation: its forward runs each step
  std::shared_ptr<Device> dev_;
  ModelWeights w_;  // on dev_
  Workspace ws_;
  std::mutex graveyard_mu_;
  std::vector<DeviceArray> graveyard_;  // bury()'s, freed by the next step (before dev_ goes)
  std::mutex mu_;  // held by forward(), generate() and the scheduler's calls: ws_ is theirs
  std::vector<float> lg_stage_;        // draw()'s logits on the host, where the device has memory of its own
  std::vector<int32_t> picks_;         // draw()'s picks made on the device
  std::vector<uint8_t> all_valid_;     // step_and_draw()'s tokens: all real
  std::function<void()> interrupt_;
  // head_dim / 2 rotary frequencies, float32 as transformers: full-attention layers, then
  // sliding-window layers.
  std::vector<float> inv_freq_, inv_freq_local_;
};

// Tests: models built after this (without a device of their own) run on the staged CPU
// device (engine/device.h), which takes every path a device with its own memory takes;
// ring = false gives it the KV cache of the CUDA device (no sliding-window buffers); replay:
// decode steps replayed as the CUDA device's graphs are (engine/device.h).
void set_default_cpu_staged(bool staged, bool ring = true, bool replay = false);

}  // namespace gemma
