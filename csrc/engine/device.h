// Where the decoder's ops run. Model (engine/model.h) holds the layer loop, the KV cache's
// bookkeeping (slots, sliding windows, padding, chunked prefill) and every decision of the
// scheduler and the sampler, written once; it reaches the kernels only through a Device, one
// virtual call per op (CTranslate2's model). The CPU device runs cpu/kernels.h on host memory;
// a CUDA device would run cuda/cuda_ops.h on device memory behind the same calls.
//
// Pointers that a Device's ops take and return are its own memory ("device pointers"): the
// caller gets them from allocate(), moves bytes in and out with upload() / download(), and
// reads them directly only when host_memory() says they are host memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace gemma {

struct ModelConfig;
struct ModelWeights;
struct KVCache;
struct StepRows;

// The tokens of one step, on the host, in the order of the step's rows (StepRows): their
// ids, positions, whether each is a real token, and each one's cache row and slot.
struct StepTokens {
  const StepRows* rows = nullptr;
  const int32_t* ids = nullptr;
  const int32_t* pos = nullptr;
  const uint8_t* valid = nullptr;
  std::vector<int64_t> row, slot;  // [M]
  int64_t M = 0;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;  // "cpu", "cpu (staged)"
  // The device's pointers are host pointers: callers may read and write them directly and
  // skip the copies upload() / download() would make.
  virtual bool host_memory() const = 0;

  // ---- Memory -------------------------------------------------------------------------
  // `bytes` of the device's memory, contents unspecified (release() frees it).
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* host, size_t bytes) = 0;
  virtual void download(void* host, const void* src, size_t bytes) = 0;
  // Device to device; the two ranges may overlap (memmove).
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill(void* dst, int byte, size_t bytes) = 0;
  // Waits until every op queued so far has finished (before others read the device's memory).
  virtual void synchronize() = 0;
  // The model's weights as this device's ops read them (the same pointers on the CPU); throws
  // std::invalid_argument naming what this device cannot run (a weight format, the KV cache's
  // dtype, a head size).
  virtual ModelWeights place(const ModelConfig& c, const ModelWeights& w) = 0;
  // Sliding-window layers keep a moving buffer of their last slots (KVCache); false: every
  // layer keeps all of a row's slots, slot s at position s (what the CUDA kernels address).
  virtual bool ring_cache() const = 0;

  // ---- The step's ops, in the order Model::step calls them ------------------------------
  // Before a step's ops: takes the step's tokens (the device keeps what its ops need: the
  // ids, the positions' RoPE angles, rows and slots) and marks their slots in the cache
  // valid or not. inv_freq / inv_freq_local: the full and sliding layers' RoPE frequencies,
  // head_dim / 2 each (the same vector when they agree).
  virtual void begin_step(const StepTokens& t, KVCache& cache, const std::vector<float>& inv_freq,
                          const std::vector<float>& inv_freq_local) = 0;
  // x[m] = row ids[m] of table * scale, the step's M tokens.
  virtual void embed(const Weight& table, float scale, float* x) = 0;
  // out[t] = rmsnorm(x[t]) * w over [T, H] (w null: no weight); out may alias x.
  virtual void rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps) = 0;
  // y[T, N] (+)= x[T, K] . w^T (cpu/kernels.h's matmul: rows of x K apart, of y N = w.rows).
  virtual void matmul(const float* x, int64_t T, int64_t K, const Weight& w, float* y, bool accumulate,
                      Work work) = 0;
  // The same for n weights sharing x (q, k, v; gate, up).
  virtual void matmul_many(const float* x, int64_t T, int64_t K, const MatmulTarget* outs, int n, Work work) = 0;
  // x[i] += y[i].
  virtual void add(float* x, const float* y, int64_t n) = 0;
  // Layer `layer` of the step's tokens: per-head RMSNorm of q and k when q_norm / k_norm are
  // given (Gemma 3), RoPE on both (the sliding layers' angles when local), then each token's
  // key and value into its row and slot of the cache (room already made). q changes in place;
  // k may be overwritten. k and v null: queries only (a layer that reads another layer's
  // keys and values, Gemma 4's KV sharing).
  virtual void rope_kv(KVCache& cache, int64_t layer, bool local, float* q, float* k, const float* v,
                       const float* q_norm, const float* k_norm, float eps, int64_t n_heads) = 0;
  // The step's attention in layer `layer`: its decode tokens, then its prompt chunk.
  virtual void attention(const KVCache& cache, int64_t layer, const AttentionRule& rule, const float* q,
                         float* out) = 0;
  // a[i] = gelu_tanh(a[i]) * b[i].
  virtual void geglu(float* a, const float* b, int64_t n) = 0;
  // x[i] = cap * tanh(x[i] / cap).
  virtual void softcap(float* x, int64_t n, float cap) = 0;
  // x[i] *= s[0] for i < n, s one float of the device's memory (Gemma 4's layer scalar); s
  // null: x[i] *= f.
  virtual void scale(float* x, int64_t n, const float* s, float f = 1.f) = 0;
  // out[r] (host memory) = the first index of the largest of logits[r, :V], NaN skipped, for
  // r < n: greedy picks without the logits leaving the device (engine/sampler.h's argmax).
  virtual void argmax(const float* logits, int64_t n, int64_t V, int32_t* out) = 0;
  // After a step's last op. A device may hold the step's ops until here (or until the next
  // download) and run them at once: a decode step whose ops equal an earlier one's, argument
  // for argument, as a replay of it (a CUDA graph).
  virtual void end_step() = 0;
  // Instead of end_step() when the step failed: its queued ops are dropped, never run.
  virtual void abort_step() = 0;
  // Steps run as a replay so far (tests, benchmarks).
  virtual uint64_t replayed_steps() const = 0;
};

// The CPU: cpu/kernels.h on host memory. staged (tests): host_memory() is false, so that
// Model runs every upload, download and copy that a device with memory of its own needs, and
// every allocation starts as 0xff bytes (float NaN), where a GPU's would hold garbage; the
// results must be the same bits as the plain CPU device's. ring: ring_cache() (false: the
// KV cache a CUDA device keeps). replay (staged only): decode steps are recorded and replayed
// as the CUDA device's graphs are (engine/op_queue.h): a later step with the same op keys runs
// the closures the first one recorded, so an argument that changed unkeyed gives wrong bits.
std::shared_ptr<Device> make_cpu_device(bool staged = false, bool ring = true, bool replay = false);

// Owned memory of a Device (a null device holds nothing).
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Device* d, size_t bytes) : d_(d), p_(bytes ? d->allocate(bytes) : nullptr), bytes_(bytes) {}
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { swap(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    swap(o);
    return *this;
  }
  ~DeviceArray() {
    if (p_) d_->release(p_);
  }
  void* get() const { return p_; }
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void swap(DeviceArray& o) noexcept {
    std::swap(d_, o.d_);
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
  }
  Device* d_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// `a` grown to hold at least n floats of d's memory (its contents are lost when it grows).
inline float* grow_buffer(Device& d, DeviceArray& a, int64_t n) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  if (a.bytes() < bytes) a = DeviceArray(&d, bytes);
  return a.as<float>();
}

}  // namespace gemma
