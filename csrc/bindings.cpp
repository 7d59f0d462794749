// The pybind11 module gemma_cpp._C: checks what Python hands over (dtypes, shapes,
// contiguity, id ranges), releases the GIL, and calls the engine. No model logic here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "engine/model.h"
#include "engine/threadpool.h"

namespace py = pybind11;
using namespace gemma;

void register_cuda(py::module_& m);  // cuda_bindings.cpp: cuda_status and the CUDA test hooks

namespace {

using I32Array = py::array_t<int32_t, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

QFormat qformat(const std::string& name) {
  if (name == "int8") return QFormat::Int8;
  if (name == "int4") return QFormat::Int4;
  if (name == "int4m") return QFormat::Int4m;
  throw py::value_error("unknown quantization '" + name + "': expected 'int8', 'int4' or 'int4m'");
}

// A quantized weight: (format, quants [rows, row bytes] uint8/int8, scales [rows, cols/32]
// uint16 fp16 bits), and for int4m a fourth array, mins (as scales), as gemma_cpp.quant lays
// them out.
Weight as_quant_weight(const py::tuple& t, const std::string& name, int64_t rows, int64_t cols) {
  if (t.size() < 1) throw py::value_error(name + ": a quantized weight is (format, quants, scales)");
  const QFormat f = qformat(t[0].cast<std::string>());
  const size_t want = f == QFormat::Int4m ? 4 : 3;
  if (t.size() != want)
    throw py::value_error(name + (f == QFormat::Int4m ? ": an int4m weight is (format, quants, scales, mins)"
                                                      : ": a quantized weight is (format, quants, scales)"));
  const py::array q = t[1].cast<py::array>(), d = t[2].cast<py::array>();
  if (cols % kQBlock != 0)
    throw py::value_error(name + ": quantized weights need an input size that is a multiple of 32, got " +
                          std::to_string(cols));
  const int64_t qb = quant_row_bytes(f, cols), nb = scale_row_count(cols);
  if (q.ndim() != 2 || q.shape(0) != rows || q.shape(1) != qb || q.itemsize() != 1 ||
      !(q.flags() & py::array::c_style))
    throw py::value_error(name + ": quants must be a contiguous 1-byte array of shape (" + std::to_string(rows) +
                          ", " + std::to_string(qb) + "), got " + shape_str(q));
  if (d.ndim() != 2 || d.shape(0) != rows || d.shape(1) != nb || !d.dtype().is(py::dtype::of<uint16_t>()) ||
      !(d.flags() & py::array::c_style))
    throw py::value_error(name + ": scales must be a contiguous uint16 array of shape (" + std::to_string(rows) +
                          ", " + std::to_string(nb) + "), got " + shape_str(d));
  Weight w;
  if (f == QFormat::Int4m) {
    const py::array m = t[3].cast<py::array>();
    if (m.ndim() != 2 || m.shape(0) != rows || m.shape(1) != nb || !m.dtype().is(py::dtype::of<uint16_t>()) ||
        !(m.flags() & py::array::c_style))
      throw py::value_error(name + ": mins must be a contiguous uint16 array of shape (" + std::to_string(rows) +
                            ", " + std::to_string(nb) + "), got " + shape_str(m));
    w.mins = static_cast<const uint16_t*>(m.data());
  }
  w.dtype = f == QFormat::Int8 ? DType::Int8 : f == QFormat::Int4 ? DType::Int4 : DType::Int4m;
  w.data = q.data();
  w.scales = static_cast<const uint16_t*>(d.data());
  w.rows = rows;
  w.cols = cols;
  w.ld = qb;
  return w;
}

// A weight given as a C-contiguous numpy array: float32, or uint16 holding bfloat16 bits.
Weight as_weight(const py::array& a, const std::string& name, int64_t rows, int64_t cols) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols)
    throw py::value_error(name + ": expected shape (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + "), got " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(name + ": weight array must be C-contiguous");
  Weight w;
  if (a.dtype().is(py::dtype::of<float>()))
    w.dtype = DType::F32;
  else if (a.dtype().is(py::dtype::of<uint16_t>()))
    w.dtype = DType::BF16;
  else
    throw py::value_error(name + ": weights must be float32 or uint16 (bfloat16 bits), got " +
                          std::string(py::str(a.dtype())));
  w.data = a.data();
  w.rows = rows;
  w.cols = cols;
  w.ld = cols;
  return w;
}

const float* as_vector(const py::array& a, const std::string& name, int64_t n) {
  if (a.ndim() != 1 || a.shape(0) != n || !a.dtype().is(py::dtype::of<float>()) ||
      !(a.flags() & py::array::c_style))
    throw py::value_error(name + ": expected a contiguous float32 vector of length " +
                          std::to_string(n) + ", got " + std::string(py::str(a.dtype())) +
                          " " + shape_str(a));
  return static_cast<const float*>(a.data());
}

template <typename T>
T get(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw py::value_error(std::string("engine config: missing '") + key + "'");
  return d[key].cast<T>();
}

void check_ids(const I32Array& ids, int64_t vocab, const char* what) {
  if (ids.ndim() != 2) throw py::value_error(std::string(what) + " must be 2-D [batch, length]");
  const int32_t* p = ids.data();
  for (py::ssize_t i = 0; i < ids.size(); ++i)
    if (p[i] < 0 || p[i] >= vocab)
      throw py::value_error(std::string(what) + ": token id " + std::to_string(p[i]) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

void check_same_shape(const I32Array& a, const I32Array& ids, const char* what) {
  if (a.ndim() != 2 || a.shape(0) != ids.shape(0) || a.shape(1) != ids.shape(1))
    throw py::value_error(std::string(what) + " must have the shape of input_ids " +
                          shape_str(ids) + ", got " + shape_str(a));
}

// Checked copies of a batch's token ids and mask: another Python thread may write to the
// caller's arrays once the GIL is released.
struct TokenBatch {
  int64_t B = 0, L = 0;
  std::vector<int32_t> ids, mask;
  const int32_t* mask_or_null() const { return mask.empty() ? nullptr : mask.data(); }
};

TokenBatch token_batch(const I32Array& input_ids, const py::object& attention_mask, int64_t vocab) {
  check_ids(input_ids, vocab, "input_ids");
  TokenBatch t;
  t.B = input_ids.shape(0);
  t.L = input_ids.shape(1);
  if (t.L == 0) throw py::value_error("input_ids: sequences must hold at least one token");
  t.ids.assign(input_ids.data(), input_ids.data() + t.B * t.L);
  if (!attention_mask.is_none()) {
    const I32Array mask = attention_mask.cast<I32Array>();
    check_same_shape(mask, input_ids, "attention_mask");
    t.mask.assign(mask.data(), mask.data() + t.B * t.L);
  }
  return t;
}

class Engine {
 public:
  Engine(const py::dict& config, const py::dict& weights) {
    ModelConfig c;
    c.vocab_size = get<int64_t>(config, "vocab_size");
    c.hidden_size = get<int64_t>(config, "hidden_size");
    c.intermediate_size = get<int64_t>(config, "intermediate_size");
    c.num_layers = get<int64_t>(config, "num_hidden_layers");
    c.num_heads = get<int64_t>(config, "num_attention_heads");
    c.num_kv_heads = get<int64_t>(config, "num_key_value_heads");
    c.head_dim = get<int64_t>(config, "head_dim");
    c.max_positions = get<int64_t>(config, "max_position_embeddings");
    c.rms_norm_eps = get<float>(config, "rms_norm_eps");
    c.rope_theta = get<float>(config, "rope_theta");
    c.embed_scale = get<float>(config, "embed_scale");
    c.attn_scale = get<float>(config, "attn_scale");
    c.causal = get<bool>(config, "causal");
    // Gemma 2 / 3 keys (absent for Gemma 1).
    auto opt_float = [&](const char* key, float dflt) {
      return config.contains(key) ? config[key].cast<float>() : dflt;
    };
    auto opt_bool = [&](const char* key) { return config.contains(key) && config[key].cast<bool>(); };
    c.rope_factor = opt_float("rope_factor", 1.f);
    c.rope_theta_local = opt_float("rope_theta_local", c.rope_theta);
    c.rope_factor_local = opt_float("rope_factor_local", 1.f);
    c.attn_softcap = opt_float("attn_softcap", 0.f);
    c.final_softcap = opt_float("final_softcap", 0.f);
    c.sandwich_norms = opt_bool("sandwich_norms");
    c.qk_norm = opt_bool("qk_norm");
    if (config.contains("layer_windows")) {
      c.window = config["layer_windows"].cast<std::vector<int64_t>>();
      if (static_cast<int64_t>(c.window.size()) != c.num_layers)
        throw py::value_error("engine config: layer_windows needs one entry per layer");
      for (int64_t w : c.window)
        if (w < 0) throw py::value_error("engine config: a sliding window must be >= 0");
    }
    if (c.rope_factor <= 0.f || c.rope_factor_local <= 0.f || c.rope_theta_local <= 0.f ||
        c.attn_softcap < 0.f || c.final_softcap < 0.f)
      throw py::value_error("engine config: RoPE bases and factors must be positive, soft-caps >= 0");
    if (config.contains("kv_cache_dtype")) {
      const std::string kv = config["kv_cache_dtype"].cast<std::string>();
      if (kv != "float32" && kv != "bfloat16")
        throw py::value_error("kv_cache_dtype must be 'float32' or 'bfloat16', got '" + kv + "'");
      c.kv_bf16 = kv == "bfloat16";
    }
    if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 ||
        c.num_heads <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 || c.head_dim % 2 != 0 ||
        c.num_heads % c.num_kv_heads != 0)
      throw py::value_error("engine config: sizes must be positive, head_dim even, and heads a "
                            "multiple of kv heads");

    auto arr = [&](const std::string& key) -> py::array {
      if (!weights.contains(key.c_str())) throw py::value_error("engine weights: missing '" + key + "'");
      py::array a = weights[key.c_str()].cast<py::array>();
      keep_.append(a);  // the engine reads this memory for its whole life
      return a;
    };
    // A matrix: an array (float32 / bf16 bits) or a quantized (format, quants, scales[, mins]) tuple.
    auto mat = [&](const std::string& key, int64_t rows, int64_t cols) -> Weight {
      if (!weights.contains(key.c_str())) throw py::value_error("engine weights: missing '" + key + "'");
      py::object o = weights[key.c_str()];
      keep_.append(o);
      if (py::isinstance<py::tuple>(o)) return as_quant_weight(o.cast<py::tuple>(), key, rows, cols);
      return as_weight(o.cast<py::array>(), key, rows, cols);
    };
    const int64_t H = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
    ModelWeights w;
    w.embed = mat("embed", c.vocab_size, H);
    if (weights.contains("lm_head")) w.lm_head = mat("lm_head", c.vocab_size, H);
    w.final_norm = as_vector(arr("final_norm"), "final_norm", H);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      LayerWeights L;
      L.q = mat(p + "q", c.num_heads * hd, H);
      L.k = mat(p + "k", c.num_kv_heads * hd, H);
      L.v = mat(p + "v", c.num_kv_heads * hd, H);
      L.o = mat(p + "o", H, c.num_heads * hd);
      L.gate = mat(p + "gate", F, H);
      L.up = mat(p + "up", F, H);
      L.down = mat(p + "down", H, F);
      L.attn_norm = as_vector(arr(p + "attn_norm"), p + "attn_norm", H);
      L.mlp_norm = as_vector(arr(p + "mlp_norm"), p + "mlp_norm", H);
      if (c.sandwich_norms) {
        L.post_attn_norm = as_vector(arr(p + "post_attn_norm"), p + "post_attn_norm", H);
        L.post_mlp_norm = as_vector(arr(p + "post_mlp_norm"), p + "post_mlp_norm", H);
      }
      if (c.qk_norm) {
        L.q_norm = as_vector(arr(p + "q_norm"), p + "q_norm", hd);
        L.k_norm = as_vector(arr(p + "k_norm"), p + "k_norm", hd);
      }
      w.layers.push_back(L);
    }
    model_ = std::make_unique<Model>(c, std::move(w));
  }

  py::tuple forward(const I32Array& input_ids, const py::object& attention_mask,
                    const I32Array& position_ids, const std::string& output, bool last_only,
                    bool output_hidden_states) {
    const ModelConfig& c = model_->config();
    const TokenBatch in = token_batch(input_ids, attention_mask, c.vocab_size);
    check_same_shape(position_ids, input_ids, "position_ids");
    const int64_t B = in.B, L = in.L;
    Output out_kind;
    if (output == "logits") out_kind = Output::Logits;
    else if (output == "hidden") out_kind = Output::Hidden;
    else throw py::value_error("output must be 'logits' or 'hidden', got '" + output + "'");
    const std::vector<int32_t> pos(position_ids.data(), position_ids.data() + B * L);
    std::vector<float> out, states;
    {
      py::gil_scoped_release nogil;
      out = model_->forward(in.ids.data(), in.mask_or_null(), pos.data(), B, L, out_kind, last_only,
                            output_hidden_states ? &states : nullptr);
    }
    const int64_t D = out_kind == Output::Logits ? c.vocab_size : c.hidden_size;
    py::array_t<float> res({B, last_only ? int64_t{1} : L, D});
    std::memcpy(res.mutable_data(), out.data(), out.size() * sizeof(float));
    py::object hs = py::none();
    if (output_hidden_states) {
      py::array_t<float> a({c.num_layers + 1, B, L, c.hidden_size});
      std::memcpy(a.mutable_data(), states.data(), states.size() * sizeof(float));
      hs = a;
    }
    return py::make_tuple(res, hs);
  }

  py::array_t<int32_t> generate(const I32Array& input_ids, const py::object& attention_mask,
                                const SamplingParams& params, const py::object& callback) {
    const TokenBatch in = token_batch(input_ids, attention_mask, model_->config().vocab_size);
    StepCallback cb;
    if (!callback.is_none()) {
      cb = [callback](const std::vector<int32_t>& toks) {
        py::gil_scoped_acquire gil;
        callback(py::array_t<int32_t>(static_cast<py::ssize_t>(toks.size()), toks.data()));
      };
    }
    GenerateResult r;
    {
      py::gil_scoped_release nogil;
      r = model_->generate(in.ids.data(), in.mask_or_null(), in.B, in.L, params, cb);
    }
    py::array_t<int32_t> out({in.B, r.steps});
    if (!r.tokens.empty()) std::memcpy(out.mutable_data(), r.tokens.data(), r.tokens.size() * 4);
    return out;
  }

 private:
  py::list keep_;
  std::unique_ptr<Model> model_;
};

SamplingParams make_params(int64_t max_new_tokens, bool do_sample, float temperature, int64_t top_k,
                           float top_p, float min_p, float repetition_penalty,
                           std::vector<int32_t> eos_token_ids, int32_t pad_token_id, uint64_t seed) {
  SamplingParams p;
  p.max_new_tokens = max_new_tokens;
  p.do_sample = do_sample;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.repetition_penalty = repetition_penalty;
  p.eos_token_ids = std::move(eos_token_ids);
  p.pad_token_id = pad_token_id;
  p.seed = seed;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gemma_cpp compiled engine";
  m.attr("__version__") = GEMMA_CPP_VERSION;
  register_cuda(m);
  m.def("cpu_isa", &cpu_isa, "The SIMD path this build runs: avx512, avx2 or scalar");
  m.def("bf16_matmul_path", &bf16_matmul_path, "bf16-weight matmuls: amx, avx512_bf16 or generic");
  m.def("set_bf16_matmul_path", [](const std::string& name) {
    if (!set_bf16_matmul_path(name))
      throw py::value_error("bf16 matmul path '" + name + "' is not available on this CPU/build (now: " +
                            bf16_matmul_path() + ")");
  }, py::arg("name"), "Pin the bf16 matmul path (tests, benchmarks); 'auto' restores the best");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("profile", [](py::object enable) {
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
  m.def("read_bandwidth", [](int64_t bytes, int reps) {
    py::gil_scoped_release nogil;
    return read_bandwidth(bytes, reps);
  }, py::arg("bytes") = int64_t{1} << 30, py::arg("reps") = 5,
     "Memory read bandwidth (bytes/s) with the pool's threads: the decode yardstick");
  m.def("get_num_threads", &num_threads);

  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init(&make_params), py::arg("max_new_tokens"), py::arg("do_sample"),
           py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
           py::arg("repetition_penalty"), py::arg("eos_token_ids"), py::arg("pad_token_id"),
           py::arg("seed"));

  py::class_<Engine>(m, "Engine")
      .def(py::init<const py::dict&, const py::dict&>(), py::arg("config"), py::arg("weights"))
      .def("forward", &Engine::forward, py::arg("input_ids"), py::arg("attention_mask"),
           py::arg("position_ids"), py::arg("output"), py::arg("last_only"),
           py::arg("output_hidden_states"))
      .def("generate", &Engine::generate, py::arg("input_ids"), py::arg("attention_mask"),
           py::arg("params"), py::arg("callback"));

  // Kernel entry points for tests against numpy.
  m.def("matmul", [](py::array_t<float, py::array::c_style> x, const py::object& w, py::object out) {
    if (x.ndim() != 2) throw py::value_error("x must be 2-D");
    Weight wt;
    if (py::isinstance<py::tuple>(w)) {
      const py::tuple t = w.cast<py::tuple>();
      wt = as_quant_weight(t, "w", t[1].cast<py::array>().shape(0), x.shape(1));
    } else {
      const py::array a = w.cast<py::array>();
      if (a.ndim() != 2) throw py::value_error("w must be 2-D");
      wt = as_weight(a, "w", a.shape(0), x.shape(1));
    }
    py::array_t<float, py::array::c_style> y;
    if (out.is_none()) {
      y = py::array_t<float, py::array::c_style>({x.shape(0), static_cast<py::ssize_t>(wt.rows)});
    } else {
      y = out.cast<py::array_t<float, py::array::c_style>>();
      if (y.ndim() != 2 || y.shape(0) != x.shape(0) || y.shape(1) != wt.rows || !y.writeable())
        throw py::value_error("out must be a writable float32 array of shape (T, N)");
    }
    {
      py::gil_scoped_release nogil;
      matmul(x.data(), x.shape(0), x.shape(1), wt, y.mutable_data(), wt.rows);
    }
    return y;
  }, py::arg("x"), py::arg("w"), py::arg("out") = py::none(),
     "y = x @ W.T; W float32, uint16 bfloat16 bits, or a quantized (format, quants, scales[, mins]) tuple");

  m.def("bf16_to_f32", [](py::array_t<uint16_t, py::array::c_style> bits) {
    py::array_t<float> out(std::vector<py::ssize_t>(bits.shape(), bits.shape() + bits.ndim()));
    {
      py::gil_scoped_release nogil;
      bf16_to_f32_array(bits.data(), out.mutable_data(), bits.size());
    }
    return out;
  }, py::arg("bits"), "float32 array of bfloat16 bits (uint16), widened on the thread pool");

  m.def("quantize", [](const py::array& w, const std::string& fmt) {
    const QFormat f = qformat(fmt);
    if (w.ndim() != 2 || !(w.flags() & py::array::c_style))
      throw py::value_error("quantize: expected a contiguous 2-D array");
    const bool bf16 = w.dtype().is(py::dtype::of<uint16_t>());
    if (!bf16 && !w.dtype().is(py::dtype::of<float>()))
      throw py::value_error("quantize: weights must be float32 or uint16 (bfloat16 bits)");
    const int64_t rows = w.shape(0), K = w.shape(1);
    if (K % kQBlock != 0)
      throw py::value_error("quantize: the input size " + std::to_string(K) + " is not a multiple of 32");
    // (numpy puts arrays this large on 2 MiB pages itself: madvise, where the OS offers it.)
    py::array_t<uint8_t> q({rows, quant_row_bytes(f, K)});
    py::array_t<uint16_t> d({rows, scale_row_count(K)});
    py::array_t<uint16_t> m({f == QFormat::Int4m ? rows : 0, scale_row_count(K)});
    {
      py::gil_scoped_release nogil;
      quantize_matrix(f, w.data(), bf16, rows, K, q.mutable_data(), d.mutable_data(), m.mutable_data());
    }
    if (f == QFormat::Int4m) return py::tuple(py::make_tuple(fmt, q, d, m));
    return py::tuple(py::make_tuple(fmt, q, d));
  }, py::arg("w"), py::arg("format"),
     "(format, quants, scales), or for int4m (format, quants, scales, mins), of a float32 / bf16 matrix, threaded");

  m.def("interleave", [](const py::tuple& t, bool to_groups) {
    // Shapes as the engine checks them (a plain-row tuple has the same shapes).
    const py::array q = t[1].cast<py::array>(), d = t[2].cast<py::array>();
    if (d.ndim() != 2) throw py::value_error("interleave: scales must be 2-D, got " + shape_str(d));
    const Weight w = as_quant_weight(t, "w", q.ndim() == 2 ? q.shape(0) : -1, d.shape(1) * kQBlock);
    const int64_t nb = w.cols / kQBlock;
    py::array_t<uint8_t> qo({w.rows, w.ld});
    py::array_t<uint16_t> dout({w.rows, nb});
    py::array_t<uint16_t> mout({w.mins ? w.rows : int64_t{0}, nb});
    {
      py::gil_scoped_release nogil;
      interleave_rows(w.rows, w.ld, nb, static_cast<const uint8_t*>(w.data), w.scales, w.mins, qo.mutable_data(),
                      dout.mutable_data(), w.mins ? mout.mutable_data() : nullptr, to_groups);
    }
    if (w.mins) return py::tuple(py::make_tuple(t[0], qo, dout, mout));
    return py::tuple(py::make_tuple(t[0], qo, dout));
  }, py::arg("w"), py::arg("to_groups") = true,
     "A quantized tuple's rows from plain order into the engine's 16-row groups (to_groups=False: back), "
     "threaded; gemma_cpp.quant.interleave is its numpy mirror");

  m.def("dequantize", [](const py::tuple& t, int64_t K) {
    const Weight w = as_quant_weight(t, "w", t[1].cast<py::array>().shape(0), K);
    py::array_t<float> out({w.rows, K});
    for (int64_t r = 0; r < w.rows; ++r) weight_row(w, r, out.mutable_data() + r * K);
    return out;
  }, py::arg("w"), py::arg("cols"), "float32 [rows, cols] of a quantized (format, quants, scales[, mins]) tuple");

  m.def("quant_matmul_path", &quant_matmul_path, "Quantized matmuls: avx512_vnni, avx2 or scalar (chosen at import)");
  m.def("set_quant_matmul_path", [](const std::string& name) {
    if (!set_quant_matmul_path(name))
      throw py::value_error("quantized matmul path '" + name + "' is not available (now: " + quant_matmul_path() + ")");
  }, py::arg("name"));

  m.def("sample", [](py::array_t<float, py::array::c_style> logits, int64_t n,
                     const SamplingParams& p, std::vector<int32_t> history) {
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
     "n draws of one seeded sampler stream from the same logits (for tests)");
}
