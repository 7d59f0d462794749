// The CPU device: engine/device.h's ops on cpu/kernels.h, over host memory.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/quant.h"
#include "cpu/simd.h"
#include "engine/device.h"
#include "engine/model.h"
#include "runtime/threadpool.h"

namespace gemma {
namespace {

class CpuDevice final : public Device {
 public:
  CpuDevice(bool staged, bool ring) : staged_(staged), ring_(ring) {}
  std::string name() const override {
    return !staged_ ? "cpu" : ring_ ? "cpu (staged)" : "cpu (staged, flat cache)";
  }
  bool ring_cache() const override { return ring_; }
  bool host_memory() const override { return !staged_; }

  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    std::memset(p, staged_ ? 0xff : 0, bytes);
    return p;
  }
  void release(void* p) override { std::free(p); }
  void upload(void* dst, const void* host, size_t bytes) override { std::memcpy(dst, host, bytes); }
  void download(void* host, const void* src, size_t bytes) override { std::memcpy(host, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
  void fill(void* dst, int byte, size_t bytes) override { std::memset(dst, byte, bytes); }
  ModelWeights place(const ModelConfig&, const ModelWeights& w) override { return w; }

  void begin_step(const StepTokens& t, KVCache& cache, const std::vector<float>& inv_freq,
                  const std::vector<float>& inv_freq_local) override {
    t_ = &t;
    // cos / sin of every token's position: full-attention layers' table, then the sliding
    // layers' own one only when their RoPE differs (Gemma 3).
    half_ = static_cast<int64_t>(inv_freq.size());
    const bool two = inv_freq_local != inv_freq;
    local_at_ = two ? t.M * half_ : 0;
    const int64_t n_tables = two ? 2 : 1;
    cs_.resize(static_cast<size_t>(n_tables * t.M * half_));
    sn_.resize(cs_.size());
    for (int64_t tb = 0; tb < n_tables; ++tb) {
      const float* freq = tb == 0 ? inv_freq.data() : inv_freq_local.data();
      for (int64_t m = 0; m < t.M; ++m)
        for (int64_t i = 0; i < half_; ++i) {
          const float f = static_cast<float>(t.pos[m]) * freq[i];
          cs_[(tb * t.M + m) * half_ + i] = std::cos(f);
          sn_[(tb * t.M + m) * half_ + i] = std::sin(f);
        }
    }
    uint8_t* valid = cache.valid.as<uint8_t>();
    for (int64_t m = 0; m < t.M; ++m) valid[t.row[m] * cache.capacity + t.slot[m]] = t.valid[m];
  }

  void embed(const Weight& table, float scale, float* x) override {
    const int64_t H = table.cols;
    for (int64_t m = 0; m < t_->M; ++m) {
      weight_row(table, t_->ids[m], x + m * H);
      for (int64_t i = 0; i < H; ++i) x[m * H + i] *= scale;
    }
  }

  void rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps) override {
    gemma::rmsnorm(x, w, out, T, H, eps);
  }

  void matmul(const float* x, int64_t T, int64_t K, const Weight& w, float* y, bool accumulate, Work work) override {
    gemma::matmul(x, T, K, w, y, w.rows, accumulate, work);
  }

  void matmul_many(const float* x, int64_t T, int64_t K, const MatmulTarget* outs, int n, Work work) override {
    gemma::matmul_many(x, T, K, outs, n, work);
  }

  void add(float* x, const float* y, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
  }

  void rope_kv(KVCache& cache, int64_t layer, bool local, float* q, float* k, const float* v, const float* q_norm,
               const float* k_norm, float eps, int64_t n_heads) override {
    const int64_t M = t_->M, hd = cache.head_dim, nKV = cache.kv_heads;
    const int64_t QD = n_heads * hd, KD = nKV * hd;
    if (q_norm) gemma::rmsnorm(q, q_norm, q, M * n_heads, hd, eps);  // in place: one row per head
    if (k_norm) gemma::rmsnorm(k, k_norm, k, M * nKV, hd, eps);
    const int64_t table = local ? local_at_ : 0;
    for (int64_t m = 0; m < M; ++m) {
      const float* c = &cs_[table + m * half_];
      const float* s = &sn_[table + m * half_];
      rope_apply(q + m * QD, static_cast<int>(n_heads), static_cast<int>(hd), c, s);
      rope_apply(k + m * KD, static_cast<int>(nKV), static_cast<int>(hd), c, s);
      for (int64_t kh = 0; kh < nKV; ++kh)
        store(cache, layer, t_->row[m], kh, t_->slot[m], &k[m * KD + kh * hd], &v[m * KD + kh * hd]);
    }
  }

  void attention(const KVCache& cache, int64_t layer, const AttentionRule& rule, const float* q,
                 float* out) override {
    const StepRows& sr = *t_->rows;
    const int64_t Md = sr.decode_tokens(), QD = rule.n_heads * cache.head_dim;
    const KVLayerView view = cache.layer(layer);
    if (Md > 0) attention_decode(q, Md, sr.dec_rows.data(), sr.dec_slots.data(), view, rule, out, attn_);
    if (sr.prompt_tokens() > 0)
      attention_prefill(q + Md * QD, static_cast<int64_t>(sr.pre_rows.size()), sr.pre_rows.data(), sr.slot0, sr.T,
                        view, rule, out + Md * QD, attn_);
  }

  void geglu(float* a, const float* b, int64_t n) override { gelu_tanh_mul(a, b, n); }

  void softcap(float* x, int64_t n, float cap) override {
    parallel_for(n, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) x[i] = std::tanh(x[i] / cap) * cap;
    });
  }

 private:
  // One token's key and value of one head, rounded to bf16 or quantized as the cache holds them.
  static void store(KVCache& c, int64_t layer, int64_t row, int64_t head, int64_t slot, const float* key,
                    const float* value) {
    const int64_t o = c.offset(layer, row, head, slot);
    if (c.dtype == DType::Int8) {
      quantize_row_int8_ref(key, c.head_dim, c.k.as<int8_t>() + o, c.k_scales.as<uint16_t>() + o / kQBlock);
      quantize_row_int8_ref(value, c.head_dim, c.v.as<int8_t>() + o, c.v_scales.as<uint16_t>() + o / kQBlock);
    } else if (c.dtype == DType::BF16) {
      uint16_t* kb = c.k.as<uint16_t>() + o;
      uint16_t* vb = c.v.as<uint16_t>() + o;
      for (int64_t i = 0; i < c.head_dim; ++i) {
        kb[i] = f32_to_bf16(key[i]);
        vb[i] = f32_to_bf16(value[i]);
      }
    } else {
      std::memcpy(c.k.as<float>() + o, key, c.head_dim * sizeof(float));
      std::memcpy(c.v.as<float>() + o, value, c.head_dim * sizeof(float));
    }
  }

  bool staged_, ring_;
  const StepTokens* t_ = nullptr;   // the step in progress
  int64_t half_ = 0, local_at_ = 0;  // RoPE: head_dim / 2; where the sliding layers' table starts
  std::vector<float> cs_, sn_;
  std::vector<float> attn_;  // attention's scratch: decode's parts, an int8 cache read as float32
};

}  // namespace

std::shared_ptr<Device> make_cpu_device(bool staged, bool ring) { return std::make_shared<CpuDevice>(staged, ring); }

}  // namespace gemma
