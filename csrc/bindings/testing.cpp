// gemma_cpp._C._testing, the CPU half: the kernels one at a time (against numpy in the tests),
// the switches that pin an instruction-set path, and the benchmarks' probes. Thin, as the
// module: checks, then one call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "cpu/kernels.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "runtime/threadpool.h"

namespace gemma::bind {
namespace {

using F32Array = py::array_t<float, py::array::c_style>;

void register_paths(py::module_& t) {
  t.def("bf16_matmul_path", &bf16_matmul_path, "bf16-weight matmuls: amx, avx512_bf16 or generic");
  t.def("set_bf16_matmul_path", [](const std::string& name) {
    if (!set_bf16_matmul_path(name))
      throw py::value_error("bf16 matmul path '" + name + "' is not available on this CPU/build (now: " +
                            bf16_matmul_path() + ")");
  }, py::arg("name"), "Pin the bf16 matmul path; 'auto' restores the best");
  t.def("quant_matmul_path", &quant_matmul_path, "Quantized matmuls: avx512_vnni, avx2 or scalar (chosen at import)");
  t.def("set_quant_matmul_path", [](const std::string& name) {
    if (!set_quant_matmul_path(name))
      throw py::value_error("quantized matmul path '" + name + "' is not available (now: " + quant_matmul_path() + ")");
  }, py::arg("name"), "Pin the integer kernels' path (AMX then stays out of quantized prefill); 'auto' restores");
}

void register_probes(py::module_& t) {
  t.def("set_staged_device", [](bool staged, bool ring, bool replay) { set_default_cpu_staged(staged, ring, replay); },
        py::arg("staged"), py::arg("ring") = true, py::arg("replay") = false,
        "Engines built after this run on the staged CPU device (engine/device.h): every upload, "
        "download and device copy of a GPU, fresh memory poisoned with NaN; ring=False: the CUDA "
        "device's KV cache (no sliding-window buffers); replay=True: decode steps replayed as CUDA "
        "graphs are. False restores the plain CPU");
  t.def("profile", [](py::object enable) {
    OpProfile& p = op_profile();
    py::dict d;
    d["matmul"] = p.matmul;
    d["attention"] = p.attention;
    d["norm"] = p.norm;
    d["rope_cache"] = p.rope_cache;
    d["activation"] = p.activation;
    d["lm_head"] = p.lm_head;
    if (!enable.is_none()) p = OpProfile{enable.cast<bool>()};
    return d;
  }, py::arg("enable") = py::none(),
     "Seconds per op kind so far; profile(True/False) also resets and turns timing on/off");
  t.def("plan_iteration", [](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& seqs, int64_t chunk) {
    if (chunk < 1) throw py::value_error("chunk must be >= 1");
    std::vector<PlannedSeq> in;
    for (const auto& [row, cached, prompt_len] : seqs) {
      if (row < 0 || cached < 0 || prompt_len < 1)
        throw py::value_error("a sequence is (row >= 0, cached >= 0, prompt_len >= 1)");
      in.push_back({row, cached, prompt_len});
    }
    const IterationPlan p = plan_iteration(in, chunk);
    py::dict d;
    d["dec_rows"] = p.rows.dec_rows;
    d["dec_slots"] = p.rows.dec_slots;
    d["pre_rows"] = p.rows.pre_rows;
    d["slot0"] = p.rows.slot0;
    d["T"] = p.rows.T;
    d["decoding"] = p.decoding;
    d["chunk"] = p.chunk_seq < 0 ? py::object(py::none()) : py::object(py::make_tuple(p.chunk_seq, p.chunk_begin, p.chunk_end));
    d["drawn"] = p.drawn;
    d["drawn_at"] = p.drawn_at;
    return d;
  }, py::arg("seqs"), py::arg("chunk"),
     "engine/scheduler.h's plan of one iteration for sequences (row, cached, prompt_len) in admission order: "
     "the step's rows (dec_rows, dec_slots, pre_rows, slot0, T), the generating sequences, the prompt chunk "
     "(sequence, begin, end) or None, and the sequences that draw with their token index in the step");
  t.def("read_bandwidth", [](int64_t bytes, int reps) {
    py::gil_scoped_release nogil;
    return read_bandwidth(bytes, reps);
  }, py::arg("bytes") = int64_t{1} << 30, py::arg("reps") = 5,
     "Memory read bandwidth (bytes/s) with the pool's threads: the decode yardstick");
}

void register_kernels(py::module_& t) {
  t.def("matmul", [](F32Array x, const py::object& w, py::object out, bool decode) {
    if (x.ndim() != 2) throw py::value_error("x must be 2-D");
    const Weight wt = as_weight(w, "w", -1, x.shape(1));
    F32Array y;
    if (out.is_none()) {
      y = F32Array({x.shape(0), static_cast<py::ssize_t>(wt.rows)});
    } else {
      y = out.cast<F32Array>();
      if (y.ndim() != 2 || y.shape(0) != x.shape(0) || y.shape(1) != wt.rows || !y.writeable())
        throw py::value_error("out must be a writable float32 array of shape (T, N)");
    }
    {
      py::gil_scoped_release nogil;
      matmul(x.data(), x.shape(0), x.shape(1), wt, y.mutable_data(), wt.rows, false,
             decode ? Work::Decode : Work::Prefill);
    }
    return y;
  }, py::arg("x"), py::arg("w"), py::arg("out") = py::none(), py::arg("decode") = false,
     "y = x @ W.T; W float32, uint16 bfloat16 bits, or a quantized (format, quants, scales[, mins]). "
     "decode: the kernels of decode steps (kernels.h, Work), at any number of rows");

  t.def("dequantize", [](const py::object& o, int64_t K) {
    const Weight w = as_weight(o, "w", -1, K);
    py::array_t<float> out({w.rows, K});
    for (int64_t r = 0; r < w.rows; ++r) weight_row(w, r, out.mutable_data() + r * K);
    return out;
  }, py::arg("w"), py::arg("cols"), "float32 [rows, cols] of a quantized weight, row by row as the embedding reads it");

  t.def("sample", [](F32Array logits, int64_t n, const SamplingParams& p, std::vector<int32_t> history) {
    if (logits.ndim() != 1) throw py::value_error("logits must be 1-D");
    const int64_t V = logits.shape(0);
    py::array_t<int32_t> out(n);
    {
      py::gil_scoped_release nogil;
      Sampler s(p, 0);
      std::vector<float> work(V);
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(logits.data(), V, work.data());
        out.mutable_data()[i] = s.next(work.data(), V, history);
      }
    }
    return out;
  }, py::arg("logits"), py::arg("n"), py::arg("params"), py::arg("history") = std::vector<int32_t>{},
     "n draws of one seeded sampler stream from the same logits");

  t.def("argmax", [](const F32Array& x, bool pooled) {
    if (x.ndim() != 1 || x.shape(0) == 0) throw py::value_error("argmax: x must be 1-D and not empty");
    py::gil_scoped_release nogil;
    return pooled ? argmax_pooled(x.data(), x.shape(0)) : argmax(x.data(), x.shape(0));
  }, py::arg("x"), py::arg("pooled"), "The greedy pick: one scan, or parts on the thread pool (pooled)");

  // The CPU twins of the CUDA ops (the GPU tests compare against them; without a GPU they
  // check the tests' float64 references).
  t.def("cpu_op_rmsnorm", [](const F32Array& x, const py::object& w, float eps) {
    const F32Array wa = w.is_none() ? F32Array() : w.cast<F32Array>();
    if (x.ndim() != 2 || (!w.is_none() && (wa.ndim() != 1 || wa.shape(0) != x.shape(1))))
      throw py::value_error("cpu_op_rmsnorm: x [T, H] and w [H] (or None: no weight)");
    F32Array out({x.shape(0), x.shape(1)});
    rmsnorm(x.data(), w.is_none() ? nullptr : wa.data(), out.mutable_data(), x.shape(0), x.shape(1), eps);
    return out;
  }, py::arg("x"), py::arg("w"), py::arg("eps"));
  t.def("cpu_op_geglu", [](const F32Array& gate, const F32Array& up) {
    if (gate.ndim() != 1 || up.ndim() != 1 || gate.shape(0) != up.shape(0))
      throw py::value_error("cpu_op_geglu: gate and up [n]");
    F32Array out({gate.shape(0)});
    std::copy_n(gate.data(), gate.shape(0), out.mutable_data());
    gelu_tanh_mul(out.mutable_data(), up.data(), gate.shape(0));
    return out;
  }, py::arg("gate"), py::arg("up"));
  // Decode attention as Model::step runs it, with the CUDA hook's arguments: q [R, n_heads *
  // hd]; k_cache, v_cache [rows, kv_heads, slots, hd] float32 or uint16 (bf16 bits); valid
  // [rows, slots]; query r reads cache row cache_row[r] at slot q_slot[r] < n_slots.
  t.def("cpu_op_attention_decode", [](const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                      const py::array& valid, const py::array& cache_row, const py::array& q_slot,
                                      int64_t n_slots, int64_t n_heads, float scale, float softcap, int64_t window,
                                      const py::object& k_scales, const py::object& v_scales) {
    const KVLayerView kv = kv_layer_view(k_cache, v_cache, valid, k_scales, v_scales);
    const int64_t rows = k_cache.shape(0), n_kv = kv.kv_heads, S = kv.span, hd = kv.head_dim;
    need<float>(q, "q", 2);
    const int64_t R = q.shape(0);
    if (n_heads <= 0 || n_heads % n_kv != 0) throw py::value_error("n_heads must be a positive multiple of kv heads");
    need_dim(q, "q", 1, n_heads * hd);
    if (n_slots > S) throw py::value_error("n_slots exceeds the cache's slots");
    std::vector<int64_t> row_of(R), slot_of(R);
    for (const auto* a : {&cache_row, &q_slot}) {
      need<int32_t>(*a, "cache_row / q_slot", 1);
      need_dim(*a, "cache_row / q_slot", 0, R);
    }
    for (int64_t r = 0; r < R; ++r) {
      row_of[r] = static_cast<const int32_t*>(cache_row.data())[r];
      slot_of[r] = static_cast<const int32_t*>(q_slot.data())[r];
      if (row_of[r] < 0 || row_of[r] >= rows || slot_of[r] < 0 || slot_of[r] >= n_slots)
        throw py::value_error("cache_row / q_slot: entry out of range");
    }
    const AttentionRule rule{n_heads, window, scale, softcap};
    F32Array out({R, n_heads * hd});
    {
      py::gil_scoped_release nogil;
      std::vector<float> scratch;
      attention_decode(static_cast<const float*>(q.data()), R, row_of.data(), slot_of.data(), kv, rule,
                       out.mutable_data(), scratch);
    }
    return out;
  }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("valid"), py::arg("cache_row"), py::arg("q_slot"),
     py::arg("n_slots"), py::arg("n_heads"), py::arg("scale"), py::arg("softcap") = 0.f, py::arg("window") = 0,
     py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none(),
     "int8 caches: k_cache, v_cache int8 with their k_scales, v_scales");
  // Prompt attention as Model::step runs it, with the CUDA hook's arguments: q [R, T,
  // n_heads * hd] at slots [slot0, slot0 + T) of cache rows cache_row[r].
  t.def("cpu_op_attention_prefill", [](const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                       const py::array& valid, const py::array& cache_row, int64_t slot0,
                                       int64_t n_heads, float scale, float softcap, int64_t window, bool causal,
                                       const py::object& k_scales, const py::object& v_scales) {
    const KVLayerView kv = kv_layer_view(k_cache, v_cache, valid, k_scales, v_scales);
    need<float>(q, "q", 3);
    const int64_t R = q.shape(0), T = q.shape(1), hd = kv.head_dim;
    if (n_heads <= 0 || n_heads % kv.kv_heads != 0) throw py::value_error("n_heads must be a positive multiple of kv heads");
    need_dim(q, "q", 2, n_heads * hd);
    need<int32_t>(cache_row, "cache_row", 1);
    need_dim(cache_row, "cache_row", 0, R);
    std::vector<int64_t> row_of(R);
    for (int64_t r = 0; r < R; ++r) {
      row_of[r] = static_cast<const int32_t*>(cache_row.data())[r];
      if (row_of[r] < 0 || row_of[r] >= k_cache.shape(0)) throw py::value_error("cache_row: entry out of range");
    }
    if (slot0 < 0 || slot0 + T > kv.span) throw py::value_error("slots [slot0, slot0 + T) exceed the cache");
    const AttentionRule rule{n_heads, window, scale, softcap, causal};
    F32Array out({R, T, n_heads * hd});
    {
      py::gil_scoped_release nogil;
      std::vector<float> scratch;
      attention_prefill(static_cast<const float*>(q.data()), R, row_of.data(), slot0, T, kv, rule, out.mutable_data(),
                        scratch);
    }
    return out;
  }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("valid"), py::arg("cache_row"), py::arg("slot0"),
     py::arg("n_heads"), py::arg("scale"), py::arg("softcap") = 0.f, py::arg("window") = 0, py::arg("causal") = true,
     py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none());
  // RoPE as Model::step applies it: cos / sin of float(pos) * inv_freq in float32.
  t.def("cpu_op_rope", [](const F32Array& x, int64_t n_heads, const py::array_t<int32_t, py::array::c_style>& pos,
                          const F32Array& inv_freq) {
    if (x.ndim() != 2 || n_heads <= 0 || x.shape(1) % n_heads != 0 || pos.ndim() != 1 || pos.shape(0) != x.shape(0))
      throw py::value_error("cpu_op_rope: x [M, n_heads * head_dim], pos [M]");
    const int64_t M = x.shape(0), hd = x.shape(1) / n_heads, half = hd / 2;
    if (hd % 2 != 0 || inv_freq.ndim() != 1 || inv_freq.shape(0) != half)
      throw py::value_error("cpu_op_rope: head_dim must be even and inv_freq [head_dim / 2]");
    F32Array out({x.shape(0), x.shape(1)});
    std::copy_n(x.data(), x.size(), out.mutable_data());
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(pos.data()[m]) * inv_freq.data()[i];
        cs[i] = std::cos(f);
        sn[i] = std::sin(f);
      }
      rope_apply(out.mutable_data() + m * x.shape(1), static_cast<int>(n_heads), static_cast<int>(hd), cs.data(),
                 sn.data());
    }
    return out;
  }, py::arg("x"), py::arg("n_heads"), py::arg("pos"), py::arg("inv_freq"));
}

}  // namespace

void register_testing(py::module_& testing) {
  register_paths(testing);
  register_probes(testing);
  register_kernels(testing);
}

}  // namespace gemma::bind
