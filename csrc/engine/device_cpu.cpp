// The CPU device: engine/device.h's ops on cpu/kernels.h, over host memory.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu/quant.h"
#include "cpu/simd.h"
#include "engine/device.h"
#include "engine/model.h"
#include "engine/op_queue.h"
#include "engine/sampler.h"
#include "runtime/threadpool.h"

namespace gemma {
namespace {

class CpuDevice final : public Device {
 public:
  CpuDevice(bool staged, bool ring, bool replay) : staged_(staged), ring_(ring), replay_(staged && replay) {}
  std::string name() const override {
    if (!staged_) return "cpu";
    std::string n = "cpu (staged";
    if (!ring_) n += ", flat cache";
    if (replay_) n += ", replay";
    return n + ")";
  }
  bool ring_cache() const override { return ring_; }
  bool host_memory() const override { return !staged_; }

  void* allocate(size_t bytes) override {
    queue_.check_thread("allocate");
    flush();
    if (bytes == 0) return nullptr;
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    std::memset(p, staged_ ? 0xff : 0, bytes);
    return p;
  }
  void release(void* p) override {
    flush();
    std::free(p);
  }
  void upload(void* dst, const void* host, size_t bytes) override {
    queue_.check_thread("upload");
    flush();
    std::memcpy(dst, host, bytes);
  }
  void download(void* host, const void* src, size_t bytes) override {
    queue_.check_thread("download");
    flush();
    std::memcpy(host, src, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    queue_.check_thread("copy");
    flush();
    std::memmove(dst, src, bytes);
  }
  void fill(void* dst, int byte, size_t bytes) override {
    queue_.check_thread("fill");
    flush();
    std::memset(dst, byte, bytes);
  }
  void synchronize() override { flush(); }
  ModelWeights place(const ModelConfig&, const ModelWeights& w) override { return w; }

  void begin_step(const StepTokens& t, KVCache& cache, const std::vector<float>& inv_freq,
                  const std::vector<float>& inv_freq_local) override {
    queue_.begin(replay_, replay_ && t.rows->prompt_tokens() == 0);
    t_ = &t;
    // cos / sin of every token's position: full-attention layers' table, then the sliding
    // layers' own one only when their RoPE differs (Gemma 3, 4; Gemma 4's two have their own
    // head sizes).
    half_ = static_cast<int64_t>(inv_freq.size());
    half_local_ = static_cast<int64_t>(inv_freq_local.size());
    const bool two = inv_freq_local != inv_freq;
    local_at_ = two ? t.M * half_ : 0;
    cs_.resize(static_cast<size_t>(t.M * (half_ + (two ? half_local_ : 0))));
    sn_.resize(cs_.size());
    for (int64_t tb = 0; tb < (two ? 2 : 1); ++tb) {
      const float* freq = tb == 0 ? inv_freq.data() : inv_freq_local.data();
      const int64_t half = tb == 0 ? half_ : half_local_, at = tb == 0 ? 0 : local_at_;
      for (int64_t m = 0; m < t.M; ++m)
        for (int64_t i = 0; i < half; ++i) {
          const float f = static_cast<float>(t.pos[m]) * freq[i];
          cs_[at + m * half + i] = std::cos(f);
          sn_[at + m * half + i] = std::sin(f);
        }
    }
    uint8_t* valid = cache.valid.as<uint8_t>();
    for (int64_t m = 0; m < t.M; ++m) valid[t.row[m] * cache.capacity + t.slot[m]] = t.valid[m];
  }

  void embed(const Weight& table, float scale, float* x) override {
    queue_.run([&] { return KeyHash::of(1, key_of(table), scale, x); }, [=] {
      const int64_t H = table.cols;
      for (int64_t m = 0; m < t_->M; ++m) {
        weight_row(table, t_->ids[m], x + m * H);
        for (int64_t i = 0; i < H; ++i) x[m * H + i] *= scale;
      }
    });
  }

  void rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps) override {
    queue_.run([&] { return KeyHash::of(2, x, w, out, T, H, eps); }, [=] { gemma::rmsnorm(x, w, out, T, H, eps); });
  }

  void matmul(const float* x, int64_t T, int64_t K, const Weight& w, float* y, bool accumulate, Work work) override {
    queue_.run([&] { return KeyHash::of(3, x, T, K, key_of(w), y, accumulate, work); },
        [=] { gemma::matmul(x, T, K, w, y, w.rows, accumulate, work); });
  }

  void matmul_many(const float* x, int64_t T, int64_t K, const MatmulTarget* outs, int n, Work work) override {
    if (!queue_.recording()) {
      gemma::matmul_many(x, T, K, outs, n, work);
      return;
    }
    std::vector<Weight> ws;
    std::vector<MatmulTarget> ts(outs, outs + n);
    uint64_t key = KeyHash::of(4, x, T, K, n, work);
    for (int i = 0; i < n; ++i) {
      ws.push_back(*outs[i].w);
      key = KeyHash::of(key, key_of(*outs[i].w), outs[i].y, outs[i].ldy, outs[i].accumulate);
    }
    queue_.push(key, [=]() mutable {
      for (int i = 0; i < n; ++i) ts[i].w = &ws[i];
      gemma::matmul_many(x, T, K, ts.data(), n, work);
    });
  }

  void add(float* x, const float* y, int64_t n) override {
    queue_.run([&] { return KeyHash::of(5, x, y, n); }, [=] {
      for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    });
  }

  void rope_kv(KVCache& cache, int64_t layer, bool local, float* q, float* k, const float* v, const float* q_norm,
               const float* k_norm, float eps, int64_t n_heads) override {
    KVCache* c = &cache;
    queue_.run([&] { return KeyHash::of(6, c, layer, local, q, k, v, q_norm, k_norm, eps, n_heads); }, [=] {
      const int64_t M = t_->M, hd = c->head_dim[layer], nKV = c->kv_heads[layer];
      const int64_t QD = n_heads * hd, KD = nKV * hd;
      if (q_norm) gemma::rmsnorm(q, q_norm, q, M * n_heads, hd, eps);  // in place: one row per head
      if (k && k_norm) gemma::rmsnorm(k, k_norm, k, M * nKV, hd, eps);
      const int64_t table = local ? local_at_ : 0, half = local && local_at_ ? half_local_ : half_;
      if (half * 2 != hd) throw std::logic_error("RoPE table of " + std::to_string(half) + " pairs for a head of " +
                                                 std::to_string(hd));
      for (int64_t m = 0; m < M; ++m) {
        const float* cs = &cs_[table + m * half];
        const float* sn = &sn_[table + m * half];
        rope_apply(q + m * QD, static_cast<int>(n_heads), static_cast<int>(hd), cs, sn);
        if (!k) continue;  // queries only: the layer reads another layer's keys and values
        rope_apply(k + m * KD, static_cast<int>(nKV), static_cast<int>(hd), cs, sn);
        for (int64_t kh = 0; kh < nKV; ++kh)
          store(*c, layer, t_->row[m], kh, t_->slot[m], &k[m * KD + kh * hd], &v[m * KD + kh * hd]);
      }
    });
  }

  void attention(const KVCache& cache, int64_t layer, const AttentionRule& rule, const float* q,
                 float* out) override {
    const KVCache* c = &cache;
    queue_.run([&] { return KeyHash::of(7, c, layer, key_of(rule), q, out); }, [=] {
      const StepRows& sr = *t_->rows;
      const int64_t Md = sr.decode_tokens(), QD = rule.n_heads * c->head_dim[layer];
      const KVLayerView view = c->layer(layer);
      if (Md > 0) attention_decode(q, Md, sr.dec_rows.data(), sr.dec_slots.data(), view, rule, out, attn_);
      if (sr.prompt_tokens() > 0)
        attention_prefill(q + Md * QD, static_cast<int64_t>(sr.pre_rows.size()), sr.pre_rows.data(), sr.slot0, sr.T,
                          view, rule, out + Md * QD, attn_);
    });
  }

  void geglu(float* a, const float* b, int64_t n) override {
    queue_.run([&] { return KeyHash::of(8, a, b, n); }, [=] { gelu_tanh_mul(a, b, n); });
  }

  void softcap(float* x, int64_t n, float cap) override {
    queue_.run([&] { return KeyHash::of(9, x, n, cap); }, [=] {
      parallel_for(n, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) x[i] = std::tanh(x[i] / cap) * cap;
      });
    });
  }

  void scale(float* x, int64_t n, const float* s, float f) override {
    queue_.run([&] { return KeyHash::of(10, x, n, s, f); }, [=] {
      const float by = s ? *s : f;
      for (int64_t i = 0; i < n; ++i) x[i] *= by;
    });
  }

  void argmax(const float* logits, int64_t n, int64_t V, int32_t* out) override {
    flush();
    for (int64_t r = 0; r < n; ++r) out[r] = n == 1 ? argmax_pooled(logits, V) : gemma::argmax(logits + r * V, V);
  }

  void end_step() override {
    queue_.end();
    flush();
  }
  void abort_step() override { queue_.abort(); }

  uint64_t replayed_steps() const override { return queue_.replayed(); }

 private:
  // One token's key and value of one head, rounded to bf16 or quantized as the cache holds them.
  static void store(KVCache& c, int64_t layer, int64_t row, int64_t head, int64_t slot, const float* key,
                    const float* value) {
    const int64_t o = c.offset(layer, row, head, slot), hd = c.head_dim[layer];
    if (c.dtype == DType::Int8) {
      quantize_row_int8_ref(key, hd, c.k.as<int8_t>() + o, c.k_scales.as<uint16_t>() + o / kQBlock);
      quantize_row_int8_ref(value, hd, c.v.as<int8_t>() + o, c.v_scales.as<uint16_t>() + o / kQBlock);
    } else if (c.dtype == DType::BF16) {
      uint16_t* kb = c.k.as<uint16_t>() + o;
      uint16_t* vb = c.v.as<uint16_t>() + o;
      for (int64_t i = 0; i < hd; ++i) {
        kb[i] = f32_to_bf16(key[i]);
        vb[i] = f32_to_bf16(value[i]);
      }
    } else {
      std::memcpy(c.k.as<float>() + o, key, hd * sizeof(float));
      std::memcpy(c.v.as<float>() + o, value, hd * sizeof(float));
    }
  }


  // The recorded ops run: a decode step whose keys equal an earlier one's runs that step's
  // closures instead (what a CUDA graph replay does).
  void flush() {
    if (!replay_) return;
    queue_.flush([](std::vector<OpQueue::Op>& ops) -> std::unique_ptr<OpQueue::Replay> {
      struct Kept : OpQueue::Replay {
        std::vector<OpQueue::Op> ops;
        void run() override {
          for (auto& op : ops) op();
        }
      };
      auto r = std::make_unique<Kept>();
      r->ops = ops;
      return r;
    });
  }

  bool staged_, ring_, replay_;
  OpQueue queue_;
  const StepTokens* t_ = nullptr;   // the step in progress
  int64_t half_ = 0, half_local_ = 0, local_at_ = 0;  // RoPE: pairs per head of each table; where the second starts
  std::vector<float> cs_, sn_;
  std::vector<float> attn_;  // attention's scratch: decode's parts, an int8 cache read as float32
};

}  // namespace

std::shared_ptr<Device> make_cpu_device(bool staged, bool ring, bool replay) {
  return std::make_shared<CpuDevice>(staged, ring, replay);
}

}  // namespace gemma
