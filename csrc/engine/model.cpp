#include "engine/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <utility>

#include "cpu/quant.h"
#include "engine/generation.h"
#include "runtime/threadpool.h"

namespace gemma {

OpProfile& op_profile() {
  static OpProfile p;
  return p;
}

namespace {
// Tokens per forward chunk across the batch: bounds the activation buffers (the MLP's two
// [M, intermediate] float32 buffers are 64 MiB each at M = 512 on Gemma-2B) while keeping
// M large enough for the matmul's weight panel to be reused many times.
constexpr int64_t kMaxChunkTokens = 512;
}  // namespace

KVCache::KVCache(Device& d, const ModelConfig& c, int64_t rows_, int64_t capacity_, int64_t max_chunk)
    : device(&d), rows(rows_), capacity(capacity_), layers(c.num_layers), dtype(c.kv_dtype),
      elem(c.kv_dtype == DType::F32 ? 4 : c.kv_dtype == DType::BF16 ? 2 : 1) {
  span.resize(layers);
  origin.assign(static_cast<size_t>(layers * rows), 0);
  base.resize(layers);
  kv_heads.resize(layers);
  head_dim.resize(layers);
  source.resize(layers);
  int64_t total = 0;
  for (int64_t l = 0; l < layers; ++l) {
    kv_heads[l] = c.kv_heads_of(l);
    head_dim[l] = c.head_dim_of(l);
    source[l] = c.kv_source_of(l);
    if (source[l] != l) {  // reads another layer's slots: none of its own
      span[l] = span[source[l]];
      base[l] = base[source[l]];
      continue;
    }
    const int64_t w = c.layer_window(l);
    // A bidirectional layer sees the whole prompt at once: it keeps every slot.
    // A device without sliding buffers keeps every slot too.
    span[l] = (w > 0 && c.causal && d.ring_cache()) ? std::min(capacity, 2 * w + max_chunk) : capacity;
    base[l] = total;
    total += rows * kv_heads[l] * span[l] * head_dim[l];
  }
  auto zeros = [&](int64_t bytes) {
    DeviceArray a(device, static_cast<size_t>(bytes));
    if (bytes) device->fill(a.get(), 0, static_cast<size_t>(bytes));
    return a;
  };
  k = zeros(total * elem);
  v = zeros(total * elem);
  if (dtype == DType::Int8) {
    k_scales = zeros(total / kQBlock * 2);
    v_scales = zeros(total / kQBlock * 2);
  }
  valid = zeros(rows * capacity);
}

void KVCache::make_room(int64_t layer, int64_t row, int64_t slot0, int64_t T, int64_t window) {
  if (source[layer] != layer) return;  // its source layer made the room
  int64_t& org = origin[layer * rows + row];
  if (slot0 + T - org <= span[layer]) return;
  // Keep the slots the first new query still sees: (slot0 - window, slot0).
  const int64_t keep_from = std::max<int64_t>(org, slot0 - window + 1);
  const int64_t n = slot0 - keep_from, shift = keep_from - org;
  if (slot0 + T - keep_from > span[layer])
    throw std::logic_error("KV cache: a chunk does not fit a sliding layer's buffer");
  // Moves n * head_dim values (and their scales) of every head of the row `shift` slots down.
  const int64_t hd = head_dim[layer], nkv = kv_heads[layer];
  auto move = [&](const DeviceArray& data, int64_t bytes_num, int64_t bytes_den) {
    for (int64_t h = 0; h < nkv; ++h) {
      char* p = data.as<char>() + (base[layer] + (row * nkv + h) * span[layer] * hd) * bytes_num / bytes_den;
      device->copy(p, p + shift * hd * bytes_num / bytes_den, static_cast<size_t>(n * hd * bytes_num / bytes_den));
    }
  };
  move(k, elem, 1);
  move(v, elem, 1);
  if (dtype == DType::Int8) {
    move(k_scales, 2, kQBlock);
    move(v_scales, 2, kQBlock);
  }
  org = keep_from;
}

void KVCache::reset_row(int64_t row) {
  for (int64_t l = 0; l < layers; ++l) origin[l * rows + row] = 0;
  device->fill(valid.as<uint8_t>() + row * capacity, 0, static_cast<size_t>(capacity));
}

KVLayerView KVCache::layer(int64_t l) const {
  l = source[l];
  KVLayerView view;
  view.dtype = dtype;
  view.k = k.as<uint8_t>() + base[l] * elem;
  view.v = v.as<uint8_t>() + base[l] * elem;
  if (dtype == DType::Int8) {
    view.k_scales = k_scales.as<uint16_t>() + base[l] / kQBlock;
    view.v_scales = v_scales.as<uint16_t>() + base[l] / kQBlock;
  }
  view.kv_heads = kv_heads[l];
  view.span = span[l];
  view.origins = &origin[l * rows];
  view.head_dim = head_dim[l];
  view.valid = valid.as<uint8_t>();
  view.capacity = capacity;
  return view;
}

void ModelConfig::validate() const {
  auto fail = [](const std::string& what) { throw std::invalid_argument("engine config: " + what); };
  if (vocab_size <= 0 || hidden_size <= 0 || intermediate_size <= 0 || num_layers <= 0 || num_heads <= 0 ||
      num_kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || num_heads % num_kv_heads != 0)
    fail("sizes must be positive, head_dim even, and heads a multiple of kv heads");
  if (!window.empty() && static_cast<int64_t>(window.size()) != num_layers)
    fail("layer_windows needs one entry per layer");
  for (int64_t w : window)
    if (w < 0) fail("a sliding window must be >= 0");
  for (const auto* per : {&layer_head_dims, &layer_kv_heads, &kv_sources, &layer_intermediate_sizes})
    if (!per->empty() && static_cast<int64_t>(per->size()) != num_layers)
      fail("layer_head_dims, layer_kv_heads, kv_sources and layer_intermediate_sizes need one entry per layer (or none)");
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t s = kv_source_of(l);
    if (s < 0 || s > l || kv_source_of(s) != s || layer_window(s) != layer_window(l) ||
        head_dim_of(s) != head_dim_of(l) || kv_heads_of(s) != kv_heads_of(l))
      fail("layer " + std::to_string(l) + " reads the keys and values of layer " + std::to_string(s) +
           ": it must be an earlier layer with its own, of the same window, head size and KV heads");
    if (intermediate_of(l) <= 0) fail("layer " + std::to_string(l) + ": the MLP's width must be positive");
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t hd = head_dim_of(l), kv = kv_heads_of(l);
    if (hd <= 0 || hd % 2 != 0 || kv <= 0 || num_heads % kv != 0)
      fail("layer " + std::to_string(l) + ": head_dim must be positive and even, and heads a multiple of kv heads");
    if (kv_dtype == DType::Int8 && hd % kQBlock != 0)
      fail("an int8 KV cache needs head_dim a multiple of 32 (its block), got " + std::to_string(hd));
  }
  if (num_experts < 0 || (num_experts > 0 && (top_k_experts < 1 || top_k_experts > num_experts || moe_intermediate < 1)))
    fail("the experts need 1 <= top_k_experts <= num_experts and moe_intermediate >= 1");
  if (ple_dim < 0 || (ple_dim > 0 && ple_vocab < vocab_size))
    fail("per-layer embeddings need ple_dim >= 0 and a table of at least vocab_size rows");
  if (!(rope_partial >= 0.f && rope_partial <= 1.f) || !(rope_partial_local >= 0.f && rope_partial_local <= 1.f))
    fail("rope_partial and rope_partial_local must be in [0, 1]");
  if (!(rope_theta > 0.f) || !(rope_factor > 0.f) || !(rope_factor_local > 0.f) || rope_theta_local < 0.f ||
      attn_softcap < 0.f || final_softcap < 0.f)
    fail("RoPE bases and factors must be positive, soft-caps >= 0");
}

int64_t ModelConfig::max_head_dim() const {
  int64_t m = 0;
  for (int64_t l = 0; l < num_layers; ++l) m = std::max(m, head_dim_of(l));
  return std::max(m, head_dim);
}

int64_t ModelConfig::max_intermediate() const {
  int64_t m = intermediate_size;
  for (int64_t l = 0; l < num_layers; ++l) m = std::max(m, intermediate_of(l));
  return m;
}

int64_t ModelConfig::max_kv_width() const {
  int64_t m = 0;
  for (int64_t l = 0; l < num_layers; ++l) m = std::max(m, kv_heads_of(l) * head_dim_of(l));
  return std::max(m, num_kv_heads * head_dim);
}

namespace {
bool default_cpu_staged = false, default_cpu_ring = true, default_cpu_replay = false;
}  // namespace

void set_default_cpu_staged(bool staged, bool ring, bool replay) {
  default_cpu_staged = staged;
  default_cpu_ring = ring;
  default_cpu_replay = replay;
}

Model::Model(const ModelConfig& config, ModelWeights weights, std::shared_ptr<Device> device)
    : cfg_(config), dev_(device ? std::move(device) : make_cpu_device(default_cpu_staged, default_cpu_ring, default_cpu_replay)) {
  cfg_.validate();
  gen_ = &generation_of(cfg_);
  w_ = dev_->place(cfg_, weights);
  if (cfg_.rope_theta_local == 0.f) cfg_.rope_theta_local = cfg_.rope_theta;
  // transformers: inv_freq = 1 / base ** (arange(0, dim, 2).float() / dim), in float32.
  // Linear scaling divides the frequencies by the factor (positions / factor). Proportional
  // RoPE (partial < 1) keeps the first int(partial * dim // 2) of those frequencies and zeros
  // the rest (cos 1, sin 0: those pairs pass unchanged). Each layer type's table has its own
  // head size (that of its first layer).
  auto dim_of = [&](bool local) {
    for (int64_t l = 0; l < cfg_.num_layers; ++l)
      if ((cfg_.layer_window(l) > 0) == local) return cfg_.head_dim_of(l);
    return cfg_.head_dim;
  };
  auto table = [&](int64_t dim, float theta, float factor, float partial) {
    const int64_t half = dim / 2;
    const auto rotated = static_cast<int64_t>(std::floor(static_cast<double>(partial) * dim / 2));
    std::vector<float> f(static_cast<size_t>(half), 0.f);
    for (int64_t i = 0; i < std::min(half, rotated); ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
      f[i] = 1.0f / std::pow(theta, e);
      if (factor != 1.f) f[i] /= factor;
    }
    return f;
  };
  inv_freq_ = table(dim_of(false), cfg_.rope_theta, cfg_.rope_factor, cfg_.rope_partial);
  inv_freq_local_ = table(dim_of(true), cfg_.rope_theta_local, cfg_.rope_factor_local, cfg_.rope_partial_local);
}

float* Model::scratch(DeviceArray& a, int64_t n) { return grow_buffer(*dev_, a, n); }

void Model::logits(const float* hidden, int64_t n, float* out, Work work) {
  OpTimer timer(&OpProfile::lm_head);
  dev_->matmul(hidden, n, cfg_.hidden_size, w_.lm_head.data ? w_.lm_head : w_.embed, out, false, work);
  if (cfg_.final_softcap > 0.f) dev_->softcap(out, n * cfg_.vocab_size, cfg_.final_softcap);
}

void Model::greedy_on_device(const float* hidden, int64_t n, int32_t* out) {
  float* lg = scratch(ws_.lg, n * cfg_.vocab_size);
  logits(hidden, n, lg, Work::Decode);  // one position per row: the decode kernels
  dev_->argmax(lg, n, cfg_.vocab_size, out);
}

bool Model::device_greedy(const SamplingParams& p) const {
  return !dev_->host_memory() && !p.do_sample && p.repetition_penalty == 1.f && p.presence_penalty == 0.f &&
         p.frequency_penalty == 0.f;
}

float* Model::host_logits(const float* hidden, int64_t n, Work work, std::vector<float>& stage) {
  const int64_t count = n * cfg_.vocab_size;
  float* lg = scratch(ws_.lg, count);
  logits(hidden, n, lg, work);
  if (dev_->host_memory()) return lg;
  stage.resize(static_cast<size_t>(count));
  dev_->download(stage.data(), lg, static_cast<size_t>(count) * sizeof(float));
  return stage.data();
}

const float* Model::step(KVCache& cache, const StepRows& sr, const int32_t* ids, const int32_t* pos,
                         const uint8_t* valid, const std::function<void(int64_t, const float*)>& layer_sink) {
  const int64_t Md = sr.decode_tokens(), M = Md + sr.prompt_tokens(), T = sr.T;
  drain_graveyard();  // outputs their owners let go of (bury()), freed on the stepping thread
  StepTokens& tokens = ws_.tokens;  // kept: a decode step allocates nothing
  tokens.rows = &sr;
  tokens.ids = ids;
  tokens.pos = pos;
  tokens.valid = valid;
  tokens.M = M;
  tokens.row.resize(static_cast<size_t>(M));
  tokens.slot.resize(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {  // token m's cache row and slot
    tokens.row[m] = m < Md ? sr.dec_rows[m] : sr.pre_rows[(m - Md) / T];
    tokens.slot[m] = m < Md ? sr.dec_slots[m] : sr.slot0 + (m - Md) % T;
  }
  // A step that throws drops what its device queued (never run later, never replayed).
  struct Abort {
    Device* d;
    bool ended = false;
    ~Abort() {
      if (!ended) d->abort_step();
    }
  } abort{dev_.get()};
  dev_->begin_step(tokens, cache, inv_freq_, inv_freq_local_);
  StepContext ctx{cfg_, w_, *dev_, cache, sr, ws_, M, Md, &layer_sink};
  const float* out = gen_->forward(ctx);
  abort.ended = true;  // end_step runs the ops; what it throws is the step's error
  dev_->end_step();
  if (layer_sink) layer_sink(cfg_.num_layers, out);
  return out;
}

void Model::draw(const float* states, int64_t n, DrawRow* rows, const std::function<void(const float*)>& raw_logits) {
  if (n == 0) return;
  const int64_t V = cfg_.vocab_size;
  bool on_device = !raw_logits;
  for (int64_t i = 0; i < n && on_device; ++i)
    on_device = rows[i].logprobs < 0 && device_greedy(rows[i].sampler->params());
  if (on_device) {
    picks_.resize(static_cast<size_t>(n));
    greedy_on_device(states, n, picks_.data());
    for (int64_t i = 0; i < n; ++i) rows[i].token = picks_[i];
    return;
  }
  float* lg = host_logits(states, n, Work::Decode, lg_stage_);
  if (raw_logits) raw_logits(lg);
  // The logprobs read the raw logits before the sampler changes them (penalties, warping).
  auto one = [&](int64_t i, bool pool) {
    DrawRow& r = rows[i];
    float* row = &lg[i * V];
    if (r.logprobs < 0) {
      r.token = r.sampler->next(row, V, *r.history, pool);
      return;
    }
    thread_local std::vector<float> raw;
    raw.assign(row, row + V);
    const float lse = log_sum_exp(raw.data(), V);
    r.top = top_entries(raw.data(), V, r.logprobs, lse);
    r.token = r.sampler->next(row, V, *r.history, pool);
    r.logprob = raw[r.token] - lse;
  };
  if (n == 1) {
    one(0, true);
    return;
  }
  parallel_for(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) one(i, false);
  });
}

KVCache Model::new_cache(int64_t rows, int64_t capacity, int64_t max_chunk) {
  std::lock_guard<std::mutex> lock(mu_);
  return KVCache(*dev_, cfg_, rows, capacity, max_chunk);
}

void Model::free_cache(KVCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);
  KVCache gone = std::move(cache);
}

void Model::reset_cache_row(KVCache& cache, int64_t row) {
  std::lock_guard<std::mutex> lock(mu_);
  cache.reset_row(row);
}

void Model::step_and_draw(KVCache& cache, const StepRows& sr, const int32_t* ids, const int32_t* pos,
                          const int64_t* drawn_at, DrawRow* rows, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t H = cfg_.hidden_size, M = sr.decode_tokens() + sr.prompt_tokens();
  all_valid_.assign(static_cast<size_t>(M), 1);
  const float* hid = step(cache, sr, ids, pos, all_valid_.data(), nullptr);
  // The drawing rows' states, gathered unless they are all of the step's tokens (decode only).
  const float* states = hid;
  if (n < M) {
    float* sel = scratch(ws_.sel, n * H);
    for (int64_t i = 0; i < n; ++i) dev_->copy(sel + i * H, hid + drawn_at[i] * H, H * sizeof(float));
    states = sel;
  }
  draw(states, n, rows, nullptr);
}

StepRows Model::prompt_rows(int64_t B, int64_t slot0, int64_t T) const {
  StepRows sr;
  // One token per row of a causal model is decode work (its kernels, as every later token).
  if (T == 1 && cfg_.causal) {
    for (int64_t b = 0; b < B; ++b) {
      sr.dec_rows.push_back(b);
      sr.dec_slots.push_back(slot0);
    }
    return sr;
  }
  for (int64_t b = 0; b < B; ++b) sr.pre_rows.push_back(b);
  sr.slot0 = slot0;
  sr.T = T;
  return sr;
}

int64_t Model::chunk_tokens(int64_t B, int64_t L) const {
  return !cfg_.causal ? L : std::max<int64_t>(1, std::min<int64_t>(L, kMaxChunkTokens / std::max<int64_t>(B, 1)));
}

void Model::prefill(KVCache& cache, const int32_t* input_ids, const int32_t* attention_mask,
                    const int32_t* positions, int64_t B, int64_t L,
                    std::vector<float>* hidden_states,
                    const std::function<void(int64_t, int64_t, const float*)>& on_chunk) {
  const int64_t H = cfg_.hidden_size;
  // Causal attention lets the prompt go through in chunks (a query never needs a later
  // key); bidirectional attention needs every key first, so it takes one chunk.
  const int64_t Tc = chunk_tokens(B, L);
  std::vector<int32_t> ids, pos;
  std::vector<uint8_t> valid;
  for (int64_t c0 = 0; c0 < L; c0 += Tc) {
    if (interrupt_) interrupt_();
    const int64_t T = std::min(Tc, L - c0);
    ids.resize(B * T);
    pos.resize(B * T);
    valid.resize(B * T);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        ids[b * T + t] = input_ids[b * L + c0 + t];
        pos[b * T + t] = positions[b * L + c0 + t];
        valid[b * T + t] = attention_mask ? attention_mask[b * L + c0 + t] != 0 : 1;
      }
    std::function<void(int64_t, const float*)> sink;
    if (hidden_states) {
      sink = [&](int64_t layer, const float* xs) {
        for (int64_t b = 0; b < B; ++b)
          dev_->download(hidden_states->data() + ((layer * B + b) * L + c0) * H, xs + b * T * H,
                         T * H * sizeof(float));
      };
    }
    on_chunk(c0, T, step(cache, prompt_rows(B, c0, T), ids.data(), pos.data(), valid.data(), sink));
  }
}

std::vector<float> Model::forward(const int32_t* input_ids, const int32_t* attention_mask,
                                  const int32_t* positions, int64_t B, int64_t L, Output output,
                                  bool last_only, std::vector<float>* hidden_states) {
  std::lock_guard<std::mutex> lock(mu_);
  drain_graveyard();
  std::vector<float> out(static_cast<size_t>(forward_size(B, L, output, last_only)));
  forward_into(out.data(), false, input_ids, attention_mask, positions, B, L, output, last_only, hidden_states);
  return out;
}

DeviceArray Model::forward_on_device(const int32_t* input_ids, const int32_t* attention_mask,
                                     const int32_t* positions, int64_t B, int64_t L, Output output,
                                     bool last_only, std::vector<float>* hidden_states) {
  std::lock_guard<std::mutex> lock(mu_);
  drain_graveyard();  // before this call allocates: a released output's memory first
  DeviceArray out(dev_.get(), static_cast<size_t>(forward_size(B, L, output, last_only)) * sizeof(float));
  forward_into(out.as<float>(), true, input_ids, attention_mask, positions, B, L, output, last_only, hidden_states);
  dev_->synchronize();  // its readers do not wait on the device's stream
  return out;
}

void Model::bury(DeviceArray a) noexcept {
  std::lock_guard<std::mutex> lock(graveyard_mu_);
  try {
    graveyard_.push_back(std::move(a));
  } catch (const std::bad_alloc&) {  // not freed here, where another thread may be stepping:
    static_cast<void>(new (std::nothrow) DeviceArray(std::move(a)));  // leaked instead
  }
}

void Model::drain_graveyard() {
  std::vector<DeviceArray> gone;
  {
    std::lock_guard<std::mutex> lock(graveyard_mu_);
    gone.swap(graveyard_);
  }
}  // freed here, outside the lock (a deleter waiting on it holds the GIL)

int64_t Model::forward_size(int64_t B, int64_t L, Output output, bool last_only) const {
  return B * (last_only ? 1 : L) * (output == Output::Logits ? cfg_.vocab_size : cfg_.hidden_size);
}

void Model::forward_into(float* out, bool out_on_device, const int32_t* input_ids, const int32_t* attention_mask,
                         const int32_t* positions, int64_t B, int64_t L, Output output, bool last_only,
                         std::vector<float>* hidden_states) {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  const int64_t D = output == Output::Logits ? V : H;
  const int64_t out_L = last_only ? 1 : L;
  if (hidden_states) hidden_states->assign(static_cast<size_t>((cfg_.num_layers + 1) * B * L * H), 0.f);

  KVCache cache(*dev_, cfg_, B, L, chunk_tokens(B, L));
  // out is the device's memory (out_on_device), or host memory the device reads directly
  // (host_memory()), or host memory it reaches only through downloads.
  const bool direct = out_on_device || dev_->host_memory();
  std::vector<float> stage;
  prefill(cache, input_ids, attention_mask, positions, B, L, hidden_states,
          [&](int64_t c0, int64_t T, const float* hid) {
            // Keep what this call returns: the last position only, or the whole chunk.
            if (last_only && c0 + T != L) return;
            const int64_t keep_t0 = last_only ? T - 1 : 0, keep_T = last_only ? 1 : T;
            const int64_t dst_t0 = last_only ? 0 : c0;
            const float* src = hid;
            if (keep_T != T) {
              float* sel = scratch(ws_.sel, B * keep_T * H);
              for (int64_t b = 0; b < B; ++b)
                dev_->copy(&sel[b * keep_T * H], &hid[(b * T + keep_t0) * H], keep_T * H * sizeof(float));
              src = sel;
            }
            // The chunk's rows [B, keep_T] are contiguous in out when they are all of its
            // rows (one chunk, or one row): logits go there directly (through the device's
            // buffer when out is host memory it cannot write), no chunk-sized copy on the host.
            const bool in_place = B == 1 || keep_T == out_L;
            if (output == Output::Logits) {
              float* lg = in_place && direct ? &out[dst_t0 * V] : scratch(ws_.lg, B * keep_T * V);
              logits(src, B * keep_T, lg, Work::Prefill);
              if (in_place) {
                if (!direct) dev_->download(&out[dst_t0 * V], lg, B * keep_T * V * sizeof(float));
                return;
              }
              src = lg;
            }
            if (out_on_device) {
              for (int64_t b = 0; b < B; ++b)
                dev_->copy(&out[(b * out_L + dst_t0) * D], src + b * keep_T * D, keep_T * D * sizeof(float));
              return;
            }
            if (!dev_->host_memory()) {
              stage.resize(static_cast<size_t>(B * keep_T * D));
              dev_->download(stage.data(), src, stage.size() * sizeof(float));
              src = stage.data();
            }
            for (int64_t b = 0; b < B; ++b)
              std::memcpy(&out[(b * out_L + dst_t0) * D], src + b * keep_T * D, keep_T * D * sizeof(float));
          });
}

GenerateResult Model::generate(const int32_t* input_ids, const int32_t* attention_mask, int64_t B,
                               int64_t L, const SamplingParams& p, const StepCallback& on_step,
                               const LogitsSink& on_logits) {
  std::lock_guard<std::mutex> lock(mu_);
  drain_graveyard();
  const int64_t H = cfg_.hidden_size;
  GenerateResult res;
  if (p.max_new_tokens <= 0) return res;
  KVCache cache(*dev_, cfg_, B, L + p.max_new_tokens, chunk_tokens(B, L));
  std::vector<int64_t> rows(B);
  std::vector<std::vector<int32_t>> history(B);
  std::vector<int32_t> next_pos(B), positions(B * L);
  std::vector<Sampler> samplers;
  for (int64_t b = 0; b < B; ++b) {
    rows[b] = b;
    int32_t seen = 0;
    for (int64_t t = 0; t < L; ++t) {
      const bool real = attention_mask == nullptr || attention_mask[b * L + t] != 0;
      // transformers: position_ids = cumsum(mask) - 1 (padding positions are never
      // attended to, so their value does not matter).
      positions[b * L + t] = real ? seen : 0;
      // The repetition penalty sees the prompt from its first real token on, as
      // transformers' prompt_ignore_length = index of the first non-zero mask entry.
      if (seen > 0 || real) history[b].push_back(input_ids[b * L + t]);
      seen += real;
    }
    next_pos[b] = seen;
    samplers.emplace_back(p, static_cast<uint64_t>(b));
  }

  // Prefill the whole prompt, then the LM head on the last slot of each row.
  const DeviceArray last(dev_.get(), static_cast<size_t>(B * H) * sizeof(float));
  prefill(cache, input_ids, attention_mask, positions.data(), B, L, nullptr,
          [&](int64_t c0, int64_t T, const float* h) {
            if (c0 + T != L) return;
            for (int64_t b = 0; b < B; ++b)
              dev_->copy(last.as<float>() + b * H, &h[(b * T + T - 1) * H], H * sizeof(float));
          });
  res.tokens.assign(static_cast<size_t>(B * p.max_new_tokens), p.pad_token_id);
  std::vector<uint8_t> finished(B, 0);
  std::vector<int64_t> active = rows;  // rows still generating, in order
  std::vector<DrawRow> drawing;  // the active rows' draws, in order
  std::function<void(const float*)> sink;
  if (on_logits) sink = [&](const float* lg) { on_logits(active, lg); };
  std::vector<int32_t> step_tokens(B), ids, pos;
  std::vector<uint8_t> ones;
  const float* states = last.as<float>();  // one position per row: the decode kernels, as every later step
  for (int64_t s = 0; s < p.max_new_tokens; ++s) {
    drawing.clear();
    for (int64_t b : active) drawing.push_back(DrawRow{&samplers[b], &history[b]});
    draw(states, static_cast<int64_t>(active.size()), drawing.data(), sink);
    std::fill(step_tokens.begin(), step_tokens.end(), p.pad_token_id);
    for (size_t i = 0; i < active.size(); ++i) {
      const int64_t b = active[i];
      const int32_t tok = drawing[i].token;
      history[b].push_back(tok);
      step_tokens[b] = tok;
      res.tokens[b * p.max_new_tokens + s] = tok;
      for (int32_t e : p.eos_token_ids)
        if (tok == e) finished[b] = 1;
    }
    res.steps = s + 1;
    if (on_step) on_step(step_tokens);
    std::vector<int64_t> still;
    for (int64_t b : active)
      if (!finished[b]) still.push_back(b);
    if (still.empty() || s + 1 == p.max_new_tokens) break;
    if (interrupt_) interrupt_();
    // Decode one token for the rows still running; finished rows cost nothing more.
    active.swap(still);
    const int64_t R = static_cast<int64_t>(active.size());
    ids.resize(R);
    pos.resize(R);
    ones.assign(R, 1);
    for (int64_t i = 0; i < R; ++i) {
      ids[i] = step_tokens[active[i]];
      pos[i] = next_pos[active[i]]++;
    }
    StepRows sr;
    sr.dec_rows = active;
    sr.dec_slots.assign(active.size(), L + s);
    states = step(cache, sr, ids.data(), pos.data(), ones.data(), nullptr);
  }
  // Compact [B, max_new_tokens] to [B, steps].
  if (res.steps < p.max_new_tokens) {
    std::vector<int32_t> compact(static_cast<size_t>(B * res.steps));
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(&res.tokens[b * p.max_new_tokens], res.steps, &compact[b * res.steps]);
    res.tokens.swap(compact);
  }
  return res;
}

}  // namespace gemma
