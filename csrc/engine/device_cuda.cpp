// The CUDA device: engine/device.h's ops on cuda/cuda_ops.h's kernels, every op queued on
// one stream of the device. Host code only (the kernels live in the .cu files).
//
// Memory: the weights are uploaded once by place(), straight from the caller's memory (the
// file's memory map or the quantizer's arrays), one matrix at a time; the KV cache and the
// activations are cudaMalloc'd through allocate(). Per step, begin_step() uploads the tokens'
// ids, positions, rows, slots and padding flags in one copy; the ops then run without the
// host until Model downloads the logits (or hidden states).
//
// What runs where:
// - matmuls: decode work takes the GEMV (every format, batches in passes of 16 tokens that
//   each read the weights once), prompt work takes the bf16 tensor-core GEMM for bf16
//   weights and the GEMV otherwise: by the kind of work, never the batch size.
// - the KV cache keeps every slot of every layer (ring_cache() false): the kernels address
//   slot s at position s; float32 or bf16 values.
// - decode steps run as CUDA graphs (GEMMA_CPP_CUDA_GRAPHS=0 turns them off): a step's ops are
//   recorded with keys of all their arguments (engine/op_queue.h) and, at end_step(), either
//   replay the graph of an earlier step with the same keys or are captured into a new one.
//   The step's changing inputs live in device buffers uploaded before (begin_step), the decode
//   attention's slot count is rounded up to a bucket of 256 (a row's result does not depend on
//   it), and the workspaces are sized for the whole step first, so that consecutive decode
//   steps of a batch size have equal keys until the bucket or a buffer changes. The staged CPU
//   device replays its decode steps the same way in the tests (tests/test_device.py).
#include "engine/device_cuda.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/quant.h"
#include "cuda/cuda_ops.h"
#include "engine/generation.h"
#include "cuda/device_buffer.h"
#include "engine/model.h"
#include "engine/op_queue.h"

namespace gemma::cuda {
namespace {

// Bytes of a weight's data: rows ld apart, ld in elements (float32, bf16) or bytes (quantized).
size_t data_bytes(const Weight& w) {
  return static_cast<size_t>(w.rows * w.ld * (w.quantized() ? 1 : format_info(w.dtype).block_bytes));
}

// A captured decode step.
struct Graph final : OpQueue::Replay {
  cudaGraphExec_t exec = nullptr;
  cudaStream_t stream = nullptr;
  void run() override { check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch"); }
  ~Graph() override {
    if (exec) cudaGraphExecDestroy(exec);
    cudaGetLastError();
  }
};

bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e && std::strcmp(e, value) == 0;
}

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int index) : index_(index) {
    const DeviceStatus& s = device_status();
    if (!s.available) throw std::runtime_error("CUDA is not available: " + s.reason);
    if (index < 0 || index >= s.device_count)
      throw std::invalid_argument("cuda:" + std::to_string(index) + ": this machine has " +
                                  std::to_string(s.device_count) + " CUDA device(s)");
    use();
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~CudaDevice() override {
    queue_.abort();
    cudaSetDevice(index_);
    cudaStreamSynchronize(stream_);
    queue_.clear_replays();
    weights_.clear();
    for (DeviceArray* a : {&inv_freq_, &inv_freq_local_, &step_ints_, &step_valid_, &gemv_ws_, &attn_ws_, &argmax_out_})
      *a = DeviceArray();
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda:" + std::to_string(index_); }
  bool host_memory() const override { return false; }
  bool ring_cache() const override { return false; }

  void* allocate(size_t bytes) override {
    queue_.check_thread("allocate");
    if (bytes == 0) return nullptr;
    use();
    flush();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw std::runtime_error("CUDA out of memory on " + name() + ": " + std::to_string(bytes >> 20) +
                               " MiB asked, " + std::to_string(free_b >> 20) + " MiB free of " +
                               std::to_string(total_b >> 20) + " MiB (" + cudaGetErrorName(e) + ")");
    }
    return p;
  }
  void release(void* p) override {
    if (!p) return;
    cudaSetDevice(index_);
    try {
      flush();  // queued ops may use it (outside a step there are none)
    } catch (const std::exception&) {  // a destructor's call: nowhere to report it
    }
    // No kernel may still read it: ours, or a consumer's on its own stream (an output torch
    // held, Model::bury).
    cudaDeviceSynchronize();
    cudaFree(p);
    cudaGetLastError();  // what these unchecked calls left must not fail the next launch
  }
  void upload(void* dst, const void* host, size_t bytes) override {
    queue_.check_thread("upload");
    if (!bytes) return;
    use();
    flush();
    check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpy to the device");
    check(cudaStreamSynchronize(stream_), "cudaMemcpy to the device");  // the host buffer may go
  }
  void download(void* host, const void* src, size_t bytes) override {
    queue_.check_thread("download");
    if (!bytes) return;
    use();
    flush();
    check(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpy to the host");
    check(cudaStreamSynchronize(stream_), "the step's kernels");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    queue_.check_thread("copy");
    if (!bytes || dst == src) return;
    use();
    flush();
    const char* s = static_cast<const char*>(src);
    char* d = static_cast<char*>(dst);
    if (d < s + bytes && s < d + bytes) {  // overlapping: through a buffer of its own
      DeviceArray tmp(this, bytes);
      check(cudaMemcpyAsync(tmp.get(), src, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpy on the device");
      check(cudaMemcpyAsync(dst, tmp.get(), bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpy on the device");
      return;  // tmp's release waits for the stream
    }
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpy on the device");
  }
  void fill(void* dst, int byte, size_t bytes) override {
    queue_.check_thread("fill");
    if (!bytes) return;
    use();
    flush();
    check(cudaMemsetAsync(dst, byte, bytes, stream_), "cudaMemset");
  }

  void synchronize() override {
    use();
    flush();
    check(cudaStreamSynchronize(stream_), "the device's kernels");
  }

  ModelWeights place(const ModelConfig& c, const ModelWeights& w) override {
    if (c.kv_dtype != DType::F32 && c.kv_dtype != DType::BF16)
      throw std::invalid_argument(std::string("a ") + format_name(c.kv_dtype) +
                                  " KV cache does not run on CUDA: use kv_cache_dtype float32 or bfloat16");
    if (c.head_dim % 32 != 0 || c.head_dim > 256)
      throw std::invalid_argument("CUDA attention needs head_dim a multiple of 32 up to 256, got " +
                                  std::to_string(c.head_dim));
    if (c.num_heads / c.num_kv_heads > 8)
      throw std::invalid_argument("CUDA decode attention takes at most 8 query heads per KV head, got " +
                                  std::to_string(c.num_heads / c.num_kv_heads));
    if (!c.causal) throw std::invalid_argument("bidirectional attention does not run on CUDA");
    if (c.generation != "gemma" || !c.layer_head_dims.empty() || !c.layer_kv_heads.empty() || !c.kv_sources.empty() ||
        !c.layer_intermediate_sizes.empty() || c.v_norm || c.k_eq_v || c.ple_dim > 0 || c.num_experts > 0)
      throw std::invalid_argument("a " + c.generation + " model does not run on CUDA yet (Gemma 1, 2 and 3 do): "
                                  "its per-layer head sizes, value norm and layer scalar have no kernels there");
    max_k_ = std::max({c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim});
    attn_.n_heads = c.num_heads;
    attn_.n_kv = c.num_kv_heads;
    attn_.head_dim = c.head_dim;
    ModelWeights in = w, out = w;
    for (const TensorSpec& t : model_tensors(c, w.lm_head.data == nullptr)) {
      if (t.is_matrix())
        t.matrix(out) = matrix(t.matrix(in), t.key());
      else
        t.vector(out) = vector(t.vector(in), t.rows);
    }
    return out;
  }

  void begin_step(const StepTokens& t, KVCache& cache, const std::vector<float>& inv_freq,
                  const std::vector<float>& inv_freq_local) override {
    use();
    queue_.abort();  // drops what a failed step left queued
    if (inv_freq != freq_host_ || inv_freq_local != freq_local_host_) {  // once per model
      freq_host_ = inv_freq;
      freq_local_host_ = inv_freq_local;
      inv_freq_ = DeviceArray(this, inv_freq.size() * sizeof(float));
      upload(inv_freq_.get(), inv_freq.data(), inv_freq.size() * sizeof(float));
      inv_freq_local_ = DeviceArray(this, inv_freq_local.size() * sizeof(float));
      upload(inv_freq_local_.get(), inv_freq_local.data(), inv_freq_local.size() * sizeof(float));
    }
    const StepRows& sr = *t.rows;
    M_ = t.M;
    Md_ = sr.decode_tokens();
    R_ = static_cast<int64_t>(sr.pre_rows.size());
    slot0_ = sr.slot0;
    T_ = sr.T;
    // Decode attention's slot count, rounded up to a bucket (the split-K chunks past a row's
    // slot are skipped: its result does not change), so that a graph serves 256 steps.
    n_slots_ = 0;
    for (int64_t s : sr.dec_slots) n_slots_ = std::max(n_slots_, s + 1);
    if (n_slots_ > 0) n_slots_ = std::min(cache.capacity, (n_slots_ + 255) / 256 * 256);
    // One upload: ids, positions, rows and slots of the M tokens, then the prompt rows.
    host_ints_.resize(static_cast<size_t>(4 * M_ + R_));
    for (int64_t m = 0; m < M_; ++m) {
      host_ints_[m] = t.ids[m];
      host_ints_[M_ + m] = t.pos[m];
      host_ints_[2 * M_ + m] = static_cast<int32_t>(t.row[m]);
      host_ints_[3 * M_ + m] = static_cast<int32_t>(t.slot[m]);
    }
    for (int64_t r = 0; r < R_; ++r) host_ints_[4 * M_ + r] = static_cast<int32_t>(sr.pre_rows[r]);
    grow(step_ints_, host_ints_.size() * sizeof(int32_t));
    grow(step_valid_, static_cast<size_t>(M_));
    upload(step_ints_.get(), host_ints_.data(), host_ints_.size() * sizeof(int32_t));
    upload(step_valid_.get(), t.valid, static_cast<size_t>(M_));
    // The slots' valid flags go into the cache with the keys (rope_kv).
    // Workspaces for every op of the step now: none may move while ops wait in the queue.
    grow(gemv_ws_, gemv_workspace_bytes(M_, max_k_));
    if (Md_ > 0) grow(attn_ws_, attention_decode_workspace_bytes(Md_, n_slots_, attn_));
    queue_.begin(!sync_, graphs_ && R_ == 0);
  }

  void argmax(const float* logits, int64_t n, int64_t V, int32_t* out) override {
    if (n <= 0) return;
    use();
    flush();
    grow(argmax_out_, static_cast<size_t>(n) * sizeof(int32_t));
    check(cuda::argmax(logits, n, V, argmax_out_.as<int32_t>(), stream_), "argmax");
    download(out, argmax_out_.get(), static_cast<size_t>(n) * sizeof(int32_t));
  }

  void end_step() override {
    queue_.end();
    flush();
  }
  void abort_step() override { queue_.abort(); }
  uint64_t replayed_steps() const override { return queue_.replayed(); }

  void embed(const Weight& table, float scale, float* x) override {
    const int32_t* ids = ints(0);
    const int64_t M = M_;
    queue_.run([&] { return KeyHash::of(1, key_of(table), ids, M, scale, x); },
        [=] { done(cuda::embed(table, ids, M, scale, x, stream_), "embed"); });
  }
  void rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps) override {
    if (!w) throw std::invalid_argument("CUDA: an RMSNorm without a weight has no kernel yet");
    queue_.run([&] { return KeyHash::of(2, x, w, out, T, H, eps); },
        [=] { done(cuda::rmsnorm(x, w, out, T, H, eps, stream_), "rmsnorm"); });
  }
  void matmul(const float* x, int64_t T, int64_t K, const Weight& w, float* y, bool accumulate, Work work) override {
    if (T <= 0) return;
    if (work == Work::Prefill && w.dtype == DType::BF16) {
      queue_.run([&] { return KeyHash::of(3, x, T, K, key_of(w), y, accumulate); },
          [=] { done(gemm_bf16(x, T, K, w, y, w.rows, accumulate, stream_), "gemm_bf16"); });
      return;
    }
    if (!queue_.recording()) grow(gemv_ws_, gemv_workspace_bytes(T, K));  // in a step: sized by begin_step
    if (gemv_ws_.bytes() < gemv_workspace_bytes(T, K)) throw std::logic_error("CUDA gemv: workspace too small");
    void* ws = gemv_ws_.get();
    queue_.run([&] { return KeyHash::of(4, x, T, K, key_of(w), y, accumulate, ws); },
        [=] { done(gemv(x, T, K, w, y, w.rows, accumulate, ws, stream_), "gemv"); });
  }
  void matmul_many(const float* x, int64_t T, int64_t K, const MatmulTarget* outs, int n, Work work) override {
    for (int i = 0; i < n; ++i) {
      if (outs[i].ldy != outs[i].w->rows) throw std::logic_error("CUDA matmul_many: outputs must be contiguous");
      matmul(x, T, K, *outs[i].w, outs[i].y, outs[i].accumulate, work);
    }
  }
  void add(float* x, const float* y, int64_t n) override {
    queue_.run([&] { return KeyHash::of(5, x, y, n); }, [=] { done(cuda::add(x, y, n, stream_), "add"); });
  }

  void rope_kv(KVCache& cache, int64_t layer, bool local, float* q, float* k, const float* v, const float* q_norm,
               const float* k_norm, float eps, int64_t n_heads) override {
    if (!k) throw std::invalid_argument("CUDA: a layer that reads another layer's keys and values has no kernel yet");
    const KVLayer kv = view(cache, layer);
    const int32_t *pos = ints(1), *rows = ints(2), *slots = ints(3);
    const float* freq = (local ? inv_freq_local_ : inv_freq_).as<float>();
    const uint8_t* valid = step_valid_.as<uint8_t>();
    const int64_t M = M_;
    queue_.run([&] {
          return KeyHash::of(6, q, k, v, M, n_heads, kv.k, kv.v, kv.dtype, kv.rows, kv.kv_heads, kv.span, kv.head_dim,
                             kv.valid, kv.capacity, pos, freq, q_norm, k_norm, eps, rows, slots, valid);
        },
        [=] {
          done(rope_kv_write(q, k, v, M, n_heads, kv.kv_heads, kv.head_dim, pos, freq, q_norm, k_norm, eps, kv, rows,
                              slots, valid, stream_),
                "rope_kv_write");
        });
  }

  void attention(const KVCache& cache, int64_t layer, const AttentionRule& rule, const float* q,
                 float* out) override {
    AttnParams p = attn_;
    p.n_heads = rule.n_heads;
    p.n_kv = cache.kv_heads[layer];
    p.head_dim = cache.head_dim[layer];
    p.scale = rule.scale;
    p.softcap = rule.softcap;
    p.window = rule.window;
    p.causal = rule.causal;
    const KVLayer kv = view(cache, layer);
    const int32_t *rows = ints(2), *slots = ints(3), *pre_rows = ints(4);
    const uint64_t kv_key = KeyHash::of(kv.k, kv.v, kv.dtype, kv.rows, kv.kv_heads, kv.span, kv.head_dim, kv.valid,
                                        kv.capacity);
    const uint64_t p_key = KeyHash::of(p.n_heads, p.n_kv, p.head_dim, p.scale, p.softcap, p.window, p.causal);
    if (Md_ > 0) {
      const int64_t Md = Md_, n_slots = n_slots_;
      const size_t bytes = attention_decode_workspace_bytes(Md, n_slots, p);
      if (attn_ws_.bytes() < bytes) throw std::logic_error("CUDA decode attention: workspace too small");
      void* ws = attn_ws_.get();
      queue_.run([&] { return KeyHash::of(7, q, kv_key, p_key, rows, slots, Md, n_slots, out, ws, bytes); },
          [=] { done(attention_decode(q, kv, rows, slots, Md, n_slots, p, out, ws, bytes, stream_), "attention_decode"); });
    }
    if (R_ > 0) {
      const int64_t QD = p.n_heads * p.head_dim, Md = Md_, R = R_, slot0 = slot0_, T = T_;
      queue_.run([&] { return KeyHash::of(8, q, kv_key, p_key, pre_rows, R, slot0, T, out, Md); },
          [=] {
            done(attention_prefill(q + Md * QD, kv, pre_rows, R, slot0, T, p, out + Md * QD, stream_),
                  "attention_prefill");
          });
    }
  }

  void geglu(float* a, const float* b, int64_t n) override {
    queue_.run([&] { return KeyHash::of(9, a, b, n); }, [=] { done(cuda::geglu(a, b, a, n, stream_), "geglu"); });
  }
  void softcap(float* x, int64_t n, float cap) override {
    queue_.run([&] { return KeyHash::of(10, x, n, cap); }, [=] { done(cuda::softcap(x, n, cap, stream_), "softcap"); });
  }
  void scale(float*, int64_t, const float*, float) override {
    throw std::invalid_argument("CUDA: the layer scalar (Gemma 4) has no kernel yet");
  }

 private:
  void use() const { check(cudaSetDevice(index_), "cudaSetDevice"); }
  // An op's launch checked (and, with GEMMA_CPP_CUDA_SYNC=1, its completion).
  void done(cudaError_t launched, const char* what) const {
    check(launched, what);
    if (sync_) check(cudaStreamSynchronize(stream_), what);
  }

  // The recorded ops: launched one by one, or a decode step as a graph (replayed, or captured
  // now and launched).
  void flush() {
    queue_.flush([this](std::vector<OpQueue::Op>& ops) -> std::unique_ptr<OpQueue::Replay> {
      // A capture that fails turns graphs off for this device and runs the ops one by one (a
      // launch that fails again then reports its own error).
      auto fall_back = [&](cudaGraph_t graph) -> std::unique_ptr<OpQueue::Replay> {
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        graphs_ = false;
        for (auto& op : ops) op();
        return nullptr;
      };
      if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return fall_back(nullptr);
      cudaGraph_t graph = nullptr;
      try {
        for (auto& op : ops) op();
      } catch (const std::exception&) {
        cudaStreamEndCapture(stream_, &graph);
        return fall_back(graph);
      }
      if (cudaStreamEndCapture(stream_, &graph) != cudaSuccess) return fall_back(graph);
      auto g = std::make_unique<Graph>();
      g->stream = stream_;
      const cudaError_t e = cudaGraphInstantiate(&g->exec, graph, 0);
      if (e != cudaSuccess) return fall_back(graph);
      cudaGraphDestroy(graph);
      return g;
    });
  }

  // The step's int32 arrays: 0 ids, 1 positions, 2 rows, 3 slots (M each), 4 prompt rows.
  const int32_t* ints(int which) const { return step_ints_.as<int32_t>() + which * M_; }

  void grow(DeviceArray& a, size_t bytes) {
    if (a.bytes() < bytes) a = DeviceArray(this, bytes);
  }

  Weight matrix(const Weight& w, const std::string& what) {
    if (!format_info(w.dtype).cuda)
      throw std::invalid_argument(what + ": " + format_name(w.dtype) + " weights do not run on CUDA (" +
                                  cuda_formats() + " do): convert or quantize the model to one of those");
    Weight d = w;
    d.mins = nullptr;
    if (!w.quantized()) {
      d.data = copy_up(w.data, data_bytes(w));
      return d;
    }
    // The CUDA kernels read plain rows: the CPU's 16-row interleaved groups (cpu/quant.h) are
    // undone on the way up, one matrix at a time (no second copy of the whole model).
    const int64_t nb = w.cols / kQBlock;
    std::vector<uint8_t> q(data_bytes(w));
    std::vector<uint16_t> sc(static_cast<size_t>(w.rows * nb));
    interleave_rows(w.rows, w.ld, nb, static_cast<const uint8_t*>(w.data), w.scales, nullptr, q.data(), sc.data(),
                    nullptr, /*to_groups=*/false);
    d.data = copy_up(q.data(), q.size());
    d.scales = static_cast<const uint16_t*>(copy_up(sc.data(), sc.size() * sizeof(uint16_t)));
    return d;
  }
  const float* vector(const float* v, int64_t n) {
    return static_cast<const float*>(copy_up(v, v ? static_cast<size_t>(n) * sizeof(float) : 0));
  }
  const void* copy_up(const void* host, size_t bytes) {
    if (!host || !bytes) return nullptr;
    weights_.emplace_back(this, bytes);
    upload(weights_.back().get(), host, bytes);
    return weights_.back().get();
  }

  static KVLayer view(const KVCache& c, int64_t l) {
    KVLayer kv;
    kv.k = c.k.as<char>() + c.base[l] * c.elem;
    kv.v = c.v.as<char>() + c.base[l] * c.elem;
    kv.dtype = c.dtype;
    kv.rows = c.rows;
    kv.kv_heads = c.kv_heads[l];
    kv.span = c.span[l];
    kv.head_dim = c.head_dim[l];
    kv.valid = c.valid.as<uint8_t>();
    kv.capacity = c.capacity;
    return kv;
  }

  int index_;
  cudaStream_t stream_ = nullptr;
  std::vector<DeviceArray> weights_;
  DeviceArray inv_freq_, inv_freq_local_;
  DeviceArray step_ints_, step_valid_;  // the step's tokens (begin_step)
  DeviceArray gemv_ws_, attn_ws_, argmax_out_;
  std::vector<int32_t> host_ints_;
  std::vector<float> freq_host_, freq_local_host_;  // what inv_freq_ / inv_freq_local_ hold
  OpQueue queue_;
  // GEMMA_CPP_CUDA_SYNC=1 (debugging a GPU run): every op runs at once and is waited for, so
  // a kernel's fault is reported with its op's name instead of at the step's next download.
  bool sync_ = env_is("GEMMA_CPP_CUDA_SYNC", "1");
  bool graphs_ = !sync_ && !env_is("GEMMA_CPP_CUDA_GRAPHS", "0");
  int64_t max_k_ = 0;
  AttnParams attn_;  // the model's heads (place)
  int64_t M_ = 0, Md_ = 0, R_ = 0, slot0_ = 0, T_ = 0, n_slots_ = 0;
};

}  // namespace

std::shared_ptr<Device> make_cuda_device(int index) { return std::make_shared<CudaDevice>(index); }

}  // namespace gemma::cuda
