// The CUDA part of gemma_cpp._C: the device status, and (in a CUDA build) one hook per
// kernel in _testing: numpy in, copied to the GPU, one op, copied back. Thin, as the module:
// checks dtypes and shapes, computes nothing. The device outputs are filled with NaN bytes
// (0xff) before each op, so an element a kernel fails to write comes back NaN.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "cpu/kernels.h"

#ifdef GEMMA_CPP_HAVE_CUDA
#include "cpu/quant.h"
#include "cuda/cuda_ops.h"
#include "cuda/device_buffer.h"
#endif

namespace py = pybind11;

#ifndef GEMMA_CPP_CUDA_OFF_REASON
#define GEMMA_CPP_CUDA_OFF_REASON "GEMMA_CPP_CUDA=OFF"
#endif

namespace gemma::bind {

#ifndef GEMMA_CPP_HAVE_CUDA

void register_cuda(py::module_& m, py::module_& testing) {
  m.def("cuda_status", []() {
    py::dict d;
    d["available"] = false;
    d["built"] = false;
    d["reason"] = std::string("built without CUDA (") + GEMMA_CPP_CUDA_OFF_REASON + ")";
    d["device_count"] = 0;
    d["device"] = py::none();
    d["compute_capability"] = py::none();
    d["runtime_version"] = py::none();
    d["driver_version"] = py::none();
    return d;
  }, "The CUDA build and device status (see gemma_cpp.cuda_status)");
}

#else  // GEMMA_CPP_HAVE_CUDA

namespace {

using gemma::cuda::check;
using gemma::cuda::DeviceBuffer;

void require_gpu() {
  const auto& s = cuda::device_status();
  if (!s.available) throw std::runtime_error("CUDA is not available: " + s.reason);
}

DeviceBuffer up(const py::array& a) { return DeviceBuffer(a.data(), static_cast<size_t>(a.nbytes())); }

DeviceBuffer poisoned(size_t bytes) {
  DeviceBuffer b(bytes);
  b.fill(0xff);
  return b;
}

template <typename T>
py::array_t<T> down(const DeviceBuffer& b, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  b.download(a.mutable_data(), static_cast<size_t>(a.nbytes()));
  return a;
}

// Checks a launch, then waits for the kernels (their faults surface here).
void run(cudaError_t launched, const char* what) {
  check(launched, what);
  check(cudaDeviceSynchronize(), what);
}

// A weight on the device: float32 / bf16-bits array [rows, K], or a QuantizedWeight.
struct DevWeight {
  DeviceBuffer data, scales;
  Weight w;
};

DevWeight upload_weight(const py::object& o, const std::string& name) {
  DevWeight d;
  if (py::isinstance<py::tuple>(o)) {
    const QuantizedWeight qw = QuantizedWeight::from(o, name);
    if (!format_info(qw.format).cuda)
      throw py::value_error(name + ": " + format_name(qw.format) + " weights have no CUDA kernels yet (" +
                            cuda_formats() + " do)");
    const Weight src = qw.view();
    // The CUDA kernels read plain rows: the CPU's interleaved groups (quant.h) are undone here.
    const int64_t rows = src.rows, qb = src.ld, nb = src.cols / kQBlock;
    py::array_t<uint8_t> qp({rows, qb});
    py::array_t<uint16_t> sp({rows, nb});
    interleave_rows(rows, qb, nb, static_cast<const uint8_t*>(src.data), src.scales, nullptr, qp.mutable_data(),
                    sp.mutable_data(), nullptr, false);
    d.data = up(qp);
    d.scales = up(sp);
    d.w = src;
    d.w.scales = d.scales.as<uint16_t>();
  } else {
    const py::array a = o.cast<py::array>();
    if (a.ndim() != 2) throw py::value_error(name + ": expected a 2-D array, got " + shape_str(a));
    d.w = as_weight(a, name, -1, a.shape(1));
    d.data = up(a);
  }
  d.w.data = d.data.get();
  return d;
}

// A cache layer given as numpy: k, v [rows, kv_heads, slots, head_dim] float32 or uint16
// (bf16 bits), valid [rows, slots] uint8.
struct DevCache {
  DeviceBuffer k, v, valid;
  cuda::KVLayer layer;
};

DevCache upload_cache(const py::array& k, const py::array& v, const py::array& valid) {
  const bool bf16 = kv_layer_view(k, v, valid).dtype == DType::BF16;  // the checks
  DevCache c;
  c.k = up(k);
  c.v = up(v);
  c.valid = up(valid);
  c.layer = {c.k.get(), c.v.get(), bf16 ? DType::BF16 : DType::F32, k.shape(0), k.shape(1), k.shape(2), k.shape(3),
             c.valid.as<uint8_t>(), valid.shape(1)};
  return c;
}

void check_rows(const py::array& idx, const std::string& name, int64_t hi) {
  const int32_t* p = static_cast<const int32_t*>(idx.data());
  for (py::ssize_t i = 0; i < idx.size(); ++i)
    if (p[i] < 0 || p[i] >= hi)
      throw py::value_error(name + ": entry " + std::to_string(p[i]) + " is outside [0, " + std::to_string(hi) + ")");
}

// Milliseconds per call of fn, timed with CUDA events after `warmup` calls.
template <typename Fn>
double time_ms(Fn fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) check(fn(), "warm-up");
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  check(cudaEventRecord(a), "cudaEventRecord");
  for (int i = 0; i < iters; ++i) check(fn(), "timed call");
  check(cudaEventRecord(b), "cudaEventRecord");
  check(cudaEventSynchronize(b), "cudaEventSynchronize");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return static_cast<double>(ms) / iters;
}

}  // namespace

void register_cuda(py::module_& m, py::module_& testing) {
  m.def("cuda_status", []() {
    const auto& s = cuda::device_status();
    py::dict d;
    d["available"] = s.available;
    d["built"] = true;
    d["reason"] = s.reason;
    d["device_count"] = s.device_count;
    d["device"] = s.name.empty() ? py::object(py::none()) : py::object(py::str(s.name));
    d["compute_capability"] = s.cc_major ? py::object(py::make_tuple(s.cc_major, s.cc_minor)) : py::object(py::none());
    d["runtime_version"] = s.runtime_version;
    d["driver_version"] = s.driver_version;
    return d;
  }, "The CUDA build and device status (see gemma_cpp.cuda_status)");

  testing.def("cuda_sample_uniform", &cuda::sample_uniform, py::arg("seed"), py::arg("stream"), py::arg("step"),
        "The GPU sampler's uniform draw for (seed, stream, step), computed on the host");

  // ---- Test hooks: one op each --------------------------------------------------------

  testing.def("cuda_op_embed", [](const py::object& table, const py::array& ids, float scale) {
    require_gpu();
    need<int32_t>(ids, "ids", 1);
    DevWeight t = upload_weight(table, "table");
    check_rows(ids, "ids", t.w.rows);
    const int64_t T = ids.shape(0), H = t.w.cols;
    DeviceBuffer d_ids = up(ids), out = poisoned(T * H * 4);
    run(cuda::embed(t.w, d_ids.as<int32_t>(), T, scale, out.as<float>(), nullptr), "embed");
    return down<float>(out, {T, H});
  }, py::arg("table"), py::arg("ids"), py::arg("scale"));

  testing.def("cuda_op_rmsnorm", [](const py::array& x, const py::array& w, float eps) {
    require_gpu();
    need<float>(x, "x", 2);
    need<float>(w, "w", 1);
    const int64_t T = x.shape(0), H = x.shape(1);
    need_dim(w, "w", 0, H);
    DeviceBuffer dx = up(x), dw = up(w), out = poisoned(T * H * 4);
    run(cuda::rmsnorm(dx.as<float>(), dw.as<float>(), out.as<float>(), T, H, eps, nullptr), "rmsnorm");
    return down<float>(out, {T, H});
  }, py::arg("x"), py::arg("w"), py::arg("eps"));

  testing.def("cuda_op_add_rmsnorm", [](const py::array& y, const py::object& w_post, const py::array& x,
                                  const py::array& w_next, float eps) {
    require_gpu();
    need<float>(y, "y", 2);
    need<float>(x, "x", 2);
    need<float>(w_next, "w_next", 1);
    const int64_t T = x.shape(0), H = x.shape(1);
    need_dim(y, "y", 0, T);
    need_dim(y, "y", 1, H);
    need_dim(w_next, "w_next", 0, H);
    DeviceBuffer dy = up(y), dx = up(x), dn = up(w_next), dp, out = poisoned(T * H * 4);
    if (!w_post.is_none()) {
      const py::array wp = w_post.cast<py::array>();
      need<float>(wp, "w_post", 1);
      need_dim(wp, "w_post", 0, H);
      dp = up(wp);
    }
    run(cuda::add_rmsnorm(dy.as<float>(), dp.as<float>(), dx.as<float>(), dn.as<float>(), out.as<float>(), T, H, eps,
                          nullptr),
        "add_rmsnorm");
    return py::make_tuple(down<float>(dx, {T, H}), down<float>(out, {T, H}));
  }, py::arg("y"), py::arg("w_post"), py::arg("x"), py::arg("w_next"), py::arg("eps"),
     "(x + (rmsnorm(y, w_post) or y), rmsnorm(of that, w_next))");

  testing.def("cuda_op_rope_kv", [](const py::array& q, const py::array& k, const py::array& v, const py::array& pos,
                              const py::array& inv_freq, const py::object& q_norm, const py::object& k_norm, float eps,
                              int64_t n_heads, int64_t n_kv, const std::string& cache_dtype, int64_t rows,
                              int64_t capacity, const py::array& cache_row, const py::array& slot,
                              const py::object& valid_in) {
    require_gpu();
    need<float>(q, "q", 2);
    need<float>(k, "k", 2);
    need<float>(v, "v", 2);
    const int64_t M = q.shape(0);
    if (n_heads <= 0 || n_kv <= 0 || q.shape(1) % n_heads != 0) throw py::value_error("q: bad head count");
    const int64_t hd = q.shape(1) / n_heads;
    if (hd % 2 != 0) throw py::value_error("head_dim must be even");
    need_dim(k, "k", 0, M);
    need_dim(k, "k", 1, n_kv * hd);
    need_dim(v, "v", 0, M);
    need_dim(v, "v", 1, n_kv * hd);
    for (const auto* a : {&pos, &cache_row, &slot}) {
      need<int32_t>(*a, "pos / cache_row / slot", 1);
      need_dim(*a, "pos / cache_row / slot", 0, M);
    }
    need<float>(inv_freq, "inv_freq", 1);
    need_dim(inv_freq, "inv_freq", 0, hd / 2);
    check_rows(cache_row, "cache_row", rows);
    check_rows(slot, "slot", capacity);
    if (cache_dtype != "float32" && cache_dtype != "bfloat16")
      throw py::value_error("cache_dtype must be 'float32' or 'bfloat16'");
    const bool bf16 = cache_dtype == "bfloat16";
    const int64_t esize = bf16 ? 2 : 4, cache_elems = rows * n_kv * capacity * hd;
    DeviceBuffer dq = up(q), dk = up(k), dv = up(v), dpos = up(pos), dinv = up(inv_freq), drow = up(cache_row),
                 dslot = up(slot), dqn, dkn, dval;
    auto norm = [&](const py::object& o, const char* name, DeviceBuffer& b) {
      if (o.is_none()) return;
      const py::array a = o.cast<py::array>();
      need<float>(a, name, 1);
      need_dim(a, name, 0, hd);
      b = up(a);
    };
    norm(q_norm, "q_norm", dqn);
    norm(k_norm, "k_norm", dkn);
    if (!valid_in.is_none()) {
      const py::array a = valid_in.cast<py::array>();
      need<uint8_t>(a, "valid_in", 1);
      need_dim(a, "valid_in", 0, M);
      dval = up(a);
    }
    DeviceBuffer kc = poisoned(cache_elems * esize), vc = poisoned(cache_elems * esize),
                 valid = poisoned(rows * capacity);
    const cuda::KVLayer layer{kc.get(), vc.get(), bf16 ? DType::BF16 : DType::F32, rows, n_kv, capacity, hd,
                              valid.as<uint8_t>(), capacity};
    run(cuda::rope_kv_write(dq.as<float>(), dk.as<float>(), dv.as<float>(), M, n_heads, n_kv, hd, dpos.as<int32_t>(),
                            dinv.as<float>(), dqn.as<float>(), dkn.as<float>(), eps, layer, drow.as<int32_t>(),
                            dslot.as<int32_t>(), dval.as<uint8_t>(), nullptr),
        "rope_kv_write");
    const std::vector<py::ssize_t> cshape{rows, n_kv, capacity, hd};
    py::object kout = bf16 ? py::object(down<uint16_t>(kc, cshape)) : py::object(down<float>(kc, cshape));
    py::object vout = bf16 ? py::object(down<uint16_t>(vc, cshape)) : py::object(down<float>(vc, cshape));
    return py::make_tuple(down<float>(dq, {M, n_heads * hd}), kout, vout, down<uint8_t>(valid, {rows, capacity}));
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos"), py::arg("inv_freq"), py::arg("q_norm"),
     py::arg("k_norm"), py::arg("eps"), py::arg("n_heads"), py::arg("n_kv"), py::arg("cache_dtype"), py::arg("rows"),
     py::arg("capacity"), py::arg("cache_row"), py::arg("slot"), py::arg("valid_in") = py::none(),
     "(q rotated, k cache, v cache, valid) from a cache poisoned with 0xff bytes");

  testing.def("cuda_op_geglu", [](const py::array& gate, const py::array& up_) {
    require_gpu();
    need<float>(gate, "gate", 1);
    need<float>(up_, "up", 1);
    const int64_t n = gate.shape(0);
    need_dim(up_, "up", 0, n);
    DeviceBuffer g = up(gate), u = up(up_), out = poisoned(n * 4);
    run(cuda::geglu(g.as<float>(), u.as<float>(), out.as<float>(), n, nullptr), "geglu");
    return down<float>(out, {n});
  }, py::arg("gate"), py::arg("up"));

  // x [T, ldx] with ldx >= w's K: rows ldx apart, the first K columns read (ldx > K tests the
  // stride). ldy (0: N): y's rows ldy apart; the returned y is [T, ldy], the columns past N
  // as the op left them (NaN unless y0 gave them).
  auto matmul_hook = [](const char* what, bool bf16_gemm) {
    return [what, bf16_gemm](const py::array& x, const py::object& w, const py::object& y0, int64_t ldy) {
      require_gpu();
      need<float>(x, "x", 2);
      if (bf16_gemm) need<uint16_t>(w.cast<py::array>(), "w", 2);
      DevWeight dw = upload_weight(w, "w");
      const int64_t T = x.shape(0), ldx = x.shape(1), K = dw.w.cols, N = dw.w.rows;
      if (K > ldx) throw py::value_error("w: " + std::to_string(K) + " inputs, x rows have " + std::to_string(ldx));
      if (ldy == 0) ldy = N;
      if (ldy < N) throw py::value_error("ldy must be >= N (" + std::to_string(N) + "), got " + std::to_string(ldy));
      DeviceBuffer dx = up(x), y = poisoned(static_cast<size_t>(T * ldy * 4));
      if (!y0.is_none()) {
        const py::array a = y0.cast<py::array>();
        need<float>(a, "y0", 2);
        need_dim(a, "y0", 0, T);
        need_dim(a, "y0", 1, ldy);
        y.upload(a.data(), static_cast<size_t>(a.nbytes()));
      }
      if (bf16_gemm) {
        run(cuda::gemm_bf16(dx.as<float>(), T, ldx, dw.w, y.as<float>(), ldy, !y0.is_none(), nullptr), what);
      } else {
        DeviceBuffer ws(cuda::gemv_workspace_bytes(T, K));
        run(cuda::gemv(dx.as<float>(), T, ldx, dw.w, y.as<float>(), ldy, !y0.is_none(), ws.get(), nullptr), what);
      }
      return down<float>(y, {T, ldy});
    };
  };
  testing.def("cuda_op_gemv", matmul_hook("gemv", false), py::arg("x"), py::arg("w"), py::arg("y0") = py::none(),
              py::arg("ldy") = 0, "x @ W.T by the decode GEMV (y0 given: y0 + x @ W.T, the accumulate path)");
  testing.def("cuda_op_gemm_bf16", matmul_hook("gemm_bf16", true), py::arg("x"), py::arg("w"),
              py::arg("y0") = py::none(), py::arg("ldy") = 0, "x @ W.T by the bf16 tensor-core GEMM");

  testing.def("cuda_op_attention_decode", [](const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                       const py::array& valid, const py::array& cache_row, const py::array& q_slot,
                                       int64_t n_slots, int64_t n_heads, float scale, float softcap, int64_t window) {
    require_gpu();
    need<float>(q, "q", 2);
    DevCache c = upload_cache(k_cache, v_cache, valid);
    const int64_t R = q.shape(0), hd = c.layer.head_dim;
    need_dim(q, "q", 1, n_heads * hd);
    for (const auto* a : {&cache_row, &q_slot}) {
      need<int32_t>(*a, "cache_row / q_slot", 1);
      need_dim(*a, "cache_row / q_slot", 0, R);
    }
    check_rows(cache_row, "cache_row", c.layer.rows);
    check_rows(q_slot, "q_slot", n_slots);
    if (n_slots > c.layer.span) throw py::value_error("n_slots exceeds the cache's slots");
    const cuda::AttnParams p{n_heads, c.layer.kv_heads, hd, scale, softcap, window, true};
    const size_t wsb = cuda::attention_decode_workspace_bytes(R, n_slots, p);
    DeviceBuffer dq = up(q), drow = up(cache_row), dslot = up(q_slot), ws(wsb), out = poisoned(R * n_heads * hd * 4);
    run(cuda::attention_decode(dq.as<float>(), c.layer, drow.as<int32_t>(), dslot.as<int32_t>(), R, n_slots, p,
                               out.as<float>(), ws.get(), wsb, nullptr),
        "attention_decode");
    return down<float>(out, {R, n_heads * hd});
  }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("valid"), py::arg("cache_row"), py::arg("q_slot"),
     py::arg("n_slots"), py::arg("n_heads"), py::arg("scale"), py::arg("softcap") = 0.f, py::arg("window") = 0);

  testing.def("cuda_set_attention_decode_chunk", [](int chunk) {
    if (chunk != 0 && chunk != 32 && chunk != 64 && chunk != 128 && chunk != 256)
      throw py::value_error("chunk must be 0 (automatic), 32, 64, 128 or 256");
    cuda::set_attention_decode_chunk(chunk);
  }, py::arg("chunk"), "Tests: fixes the decode attention's split-K chunk (0: automatic)");

  testing.def("cuda_op_attention_prefill", [](const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                        const py::array& valid, const py::array& cache_row, int64_t slot0,
                                        int64_t n_heads, float scale, float softcap, int64_t window, bool causal) {
    require_gpu();
    need<float>(q, "q", 3);
    DevCache c = upload_cache(k_cache, v_cache, valid);
    const int64_t R = q.shape(0), T = q.shape(1), hd = c.layer.head_dim;
    need_dim(q, "q", 2, n_heads * hd);
    need<int32_t>(cache_row, "cache_row", 1);
    need_dim(cache_row, "cache_row", 0, R);
    check_rows(cache_row, "cache_row", c.layer.rows);
    if (slot0 < 0 || slot0 + T > c.layer.span) throw py::value_error("slots [slot0, slot0 + T) exceed the cache");
    const cuda::AttnParams p{n_heads, c.layer.kv_heads, hd, scale, softcap, window, causal};
    DeviceBuffer dq = up(q), drow = up(cache_row), out = poisoned(R * T * n_heads * hd * 4);
    run(cuda::attention_prefill(dq.as<float>(), c.layer, drow.as<int32_t>(), R, slot0, T, p, out.as<float>(), nullptr),
        "attention_prefill");
    return down<float>(out, {R, T, n_heads * hd});
  }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("valid"), py::arg("cache_row"), py::arg("slot0"),
     py::arg("n_heads"), py::arg("scale"), py::arg("softcap") = 0.f, py::arg("window") = 0, py::arg("causal") = true);

  testing.def("cuda_op_softcap", [](const py::array& x, float cap) {
    require_gpu();
    need<float>(x, "x", 1);
    DeviceBuffer d = up(x);
    run(cuda::softcap(d.as<float>(), x.shape(0), cap, nullptr), "softcap");
    return down<float>(d, {x.shape(0)});
  }, py::arg("x"), py::arg("cap"));

  testing.def("cuda_op_argmax", [](const py::array& logits) {
    require_gpu();
    need<float>(logits, "logits", 2);
    const int64_t B = logits.shape(0), V = logits.shape(1);
    DeviceBuffer d = up(logits), out = poisoned(B * 4);
    run(cuda::argmax(d.as<float>(), B, V, out.as<int32_t>(), nullptr), "argmax");
    return down<int32_t>(out, {B});
  }, py::arg("logits"));

  testing.def("cuda_op_sample", [](const py::array& logits, bool do_sample, float temperature, int64_t top_k, float top_p,
                             float min_p, uint64_t seed, uint64_t step, const py::object& stream_ids) {
    require_gpu();
    need<float>(logits, "logits", 2);
    const int64_t B = logits.shape(0), V = logits.shape(1);
    if (do_sample && (!(temperature > 0.f) || !(top_p > 0.f && top_p <= 1.f) || top_k < 0 ||
                      !(min_p >= 0.f && min_p <= 1.f)))
      throw py::value_error("sampling needs temperature > 0, top_p in (0, 1], top_k >= 0, min_p in [0, 1]");
    DeviceBuffer d = up(logits), out = poisoned(B * 4), ids;
    if (!stream_ids.is_none()) {
      const py::array a = stream_ids.cast<py::array>();
      need<uint64_t>(a, "stream_ids", 1);
      need_dim(a, "stream_ids", 0, B);
      ids = up(a);
    }
    cuda::SampleParams p;
    p.do_sample = do_sample;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    run(cuda::sample(d.as<float>(), B, V, p, ids.as<uint64_t>(), step, out.as<int32_t>(), nullptr), "sample");
    return down<int32_t>(out, {B});
  }, py::arg("logits"), py::arg("do_sample"), py::arg("temperature") = 1.f, py::arg("top_k") = 0,
     py::arg("top_p") = 1.f, py::arg("min_p") = 0.f, py::arg("seed") = 0, py::arg("step") = 0,
     py::arg("stream_ids") = py::none());

  testing.def("cuda_op_repetition_penalty", [](const py::array& logits, const py::array& history, const py::array& lengths,
                                         float penalty) {
    require_gpu();
    need<float>(logits, "logits", 2);
    need<int32_t>(history, "history", 2);
    need<int32_t>(lengths, "lengths", 1);
    const int64_t B = logits.shape(0), V = logits.shape(1), Hs = history.shape(1);
    need_dim(history, "history", 0, B);
    need_dim(lengths, "lengths", 0, B);
    check_rows(lengths, "lengths", Hs + 1);
    DeviceBuffer d = up(logits), h = up(history), n = up(lengths), first = poisoned(B * V * 4);
    run(cuda::repetition_penalty(d.as<float>(), B, V, h.as<int32_t>(), Hs, n.as<int32_t>(), penalty,
                                 first.as<uint32_t>(), nullptr),
        "repetition_penalty");
    std::vector<uint32_t> left(static_cast<size_t>(B * V));
    first.download(left.data(), left.size() * 4);
    for (uint32_t u : left)
      if (u != 0xffffffffu) throw std::runtime_error("repetition_penalty: scratch not restored");
    return down<float>(d, {B, V});
  }, py::arg("logits"), py::arg("history"), py::arg("lengths"), py::arg("penalty"));

  // ---- Timing (benchmarks/gpu_check.sh) ------------------------------------------------

  testing.def("cuda_bench_gemv", [](const py::object& w, int64_t T, int iters, int64_t rotate_bytes) {
    require_gpu();
    DevWeight dw = upload_weight(w, "w");
    const int64_t K = dw.w.cols, N = dw.w.rows;
    const size_t data_bytes = dw.data.bytes(), scale_bytes = dw.scales.bytes();
    // Copies of the weight, cycled through, so that small matrices are read from HBM, not
    // from the 50-60 MB L2, as in a decode step that reads every layer once per token.
    const int64_t total = static_cast<int64_t>(data_bytes + scale_bytes);
    const int64_t copies = std::max<int64_t>(1, std::min<int64_t>(64, (rotate_bytes + total - 1) / total));
    std::vector<DevWeight> extra(static_cast<size_t>(copies - 1));
    std::vector<Weight> ws_list{dw.w};
    for (auto& e : extra) {
      e.w = dw.w;
      e.data = DeviceBuffer(data_bytes);
      check(cudaMemcpy(e.data.get(), dw.data.get(), data_bytes, cudaMemcpyDeviceToDevice), "copy weight");
      e.w.data = e.data.get();
      if (scale_bytes) {
        e.scales = DeviceBuffer(scale_bytes);
        check(cudaMemcpy(e.scales.get(), dw.scales.get(), scale_bytes, cudaMemcpyDeviceToDevice), "copy scales");
        e.w.scales = e.scales.as<uint16_t>();
      }
      ws_list.push_back(e.w);
    }
    std::vector<float> hx(static_cast<size_t>(T * K));
    uint32_t s = 12345;
    for (float& v : hx) {
      s = s * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(s >> 8) - (1 << 23)) / static_cast<float>(1 << 23);
    }
    DeviceBuffer x(hx.data(), hx.size() * 4), ws(cuda::gemv_workspace_bytes(T, K)), y(T * N * 4);
    int64_t i = 0;
    const double ms = time_ms([&] {
      const Weight& wi = ws_list[static_cast<size_t>(i++ % copies)];
      return cuda::gemv(x.as<float>(), T, K, wi, y.as<float>(), N, false, ws.get(), nullptr);
    }, static_cast<int>(copies), iters);
    py::dict d;
    d["ms"] = ms;
    d["weight_bytes"] = static_cast<int64_t>(data_bytes + scale_bytes);
    d["copies"] = copies;
    return d;
  }, py::arg("w"), py::arg("T") = 1, py::arg("iters") = 50, py::arg("rotate_bytes") = int64_t{256} << 20,
     "Milliseconds per gemv() call with the weight resident on the GPU (cycling through copies that "
     "total rotate_bytes, so that each call reads HBM), and the bytes of one copy");

  testing.def("cuda_bench_copy", [](int64_t bytes, int iters) {
    require_gpu();
    DeviceBuffer a(static_cast<size_t>(bytes)), b(static_cast<size_t>(bytes));
    a.fill(1);
    const double ms = time_ms([&] {
      return cudaMemcpyAsync(b.get(), a.get(), static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, nullptr);
    }, 2, iters);
    return ms;
  }, py::arg("bytes") = int64_t{1} << 30, py::arg("iters") = 20,
     "Milliseconds per device-to-device copy of `bytes` (it reads and writes them: the bandwidth yardstick)");
}

#endif  // GEMMA_CPP_HAVE_CUDA

}  // namespace gemma::bind
