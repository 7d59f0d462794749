// The pybind11 module gemma_cpp._C: the engine and what loading needs (quantize, interleave,
// bf16 widening), with named types across the boundary: EngineConfig, SamplingParams, and
// quantized weights as bindings/common.h's QuantizedWeight. It checks what Python hands over
// (dtypes, shapes, contiguity, id ranges), releases the GIL, and calls the engine. No model
// logic here. Kernel and op hooks live in the _testing submodule (testing.cpp, cuda.cpp).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>

#include "bindings/common.h"
#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "engine/model.h"
#include "engine/generation.h"
#include "engine/scheduler.h"
#include "runtime/threadpool.h"

#ifdef GEMMA_CPP_HAVE_CUDA
#include "engine/device_cuda.h"
#endif

namespace py = pybind11;
using namespace gemma;
using namespace gemma::bind;

namespace {

using I32Array = py::array_t<int32_t, py::array::c_style>;

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

// EngineConfig: the engine's ModelConfig under the Python names the loaders give it (those of
// transformers' configs where one exists). Each field is declared once, in
// register_engine_config: its property and the keyword the constructor takes come from the
// same line.
using ConfigSetter = std::function<void(ModelConfig&, const py::handle&)>;
std::map<std::string, ConfigSetter>& config_setters() {
  static std::map<std::string, ConfigSetter> setters;
  return setters;
}

template <typename T>
void config_field(py::class_<ModelConfig>& cls, const char* name, T ModelConfig::*member, const char* doc) {
  cls.def_readwrite(name, member, doc);
  config_setters()[name] = [member](ModelConfig& c, const py::handle& v) { c.*member = v.cast<T>(); };
}

// A config from keyword arguments: every key must be a field.
ModelConfig make_config(const py::dict& kw) {
  ModelConfig c;
  for (const auto& item : kw) {
    const std::string key = py::str(item.first);
    const auto it = config_setters().find(key);
    if (it == config_setters().end()) throw py::type_error("EngineConfig has no field '" + key + "'");
    it->second(c, item.second);
  }
  return c;
}

std::string kv_cache_dtype(const ModelConfig& c) { return format_name(c.kv_dtype); }
void set_kv_cache_dtype(ModelConfig& c, const std::string& kv) {
  const FormatInfo* f = format_by_name(kv.c_str());
  if (!f || (f->dtype != DType::F32 && f->dtype != DType::BF16 && f->dtype != DType::Int8))
    throw py::value_error("kv_cache_dtype must be 'float32', 'bfloat16' or 'int8', got '" + kv + "'");
  c.kv_dtype = f->dtype;
}

void register_engine_config(py::module_& m) {
  py::class_<ModelConfig> cls(m, "EngineConfig",
                              "The engine's view of a model config: sizes, norms, RoPE, attention rules. "
                              "EngineConfig(**fields); an unknown field is an error.");
  config_field(cls, "generation", &ModelConfig::generation,
               "whose forward runs: 'gemma' (Gemma 1, 2 and 3) or 'gemma4'");
  config_field(cls, "vocab_size", &ModelConfig::vocab_size, "rows of the embedding");
  config_field(cls, "hidden_size", &ModelConfig::hidden_size, "");
  config_field(cls, "intermediate_size", &ModelConfig::intermediate_size, "the MLP's width");
  config_field(cls, "num_hidden_layers", &ModelConfig::num_layers, "");
  config_field(cls, "num_attention_heads", &ModelConfig::num_heads, "");
  config_field(cls, "num_key_value_heads", &ModelConfig::num_kv_heads, "");
  config_field(cls, "head_dim", &ModelConfig::head_dim, "even (RoPE rotates halves)");
  config_field(cls, "max_position_embeddings", &ModelConfig::max_positions, "");
  config_field(cls, "rms_norm_eps", &ModelConfig::rms_norm_eps, "");
  config_field(cls, "rope_theta", &ModelConfig::rope_theta, "RoPE base of full-attention layers");
  config_field(cls, "rope_factor", &ModelConfig::rope_factor, "linear RoPE scaling of full-attention layers");
  config_field(cls, "rope_theta_local", &ModelConfig::rope_theta_local,
               "RoPE base of sliding-window layers (0: rope_theta)");
  config_field(cls, "rope_factor_local", &ModelConfig::rope_factor_local,
               "linear RoPE scaling of sliding-window layers");
  config_field(cls, "embed_scale", &ModelConfig::embed_scale, "sqrt(hidden_size), rounded to the weight dtype");
  config_field(cls, "attn_scale", &ModelConfig::attn_scale, "scores are scaled by it");
  config_field(cls, "attn_softcap", &ModelConfig::attn_softcap, "scores -> cap * tanh(scores / cap); 0: none");
  config_field(cls, "final_softcap", &ModelConfig::final_softcap, "the same on the logits");
  config_field(cls, "causal", &ModelConfig::causal, "False: bidirectional attention");
  config_field(cls, "sandwich_norms", &ModelConfig::sandwich_norms, "Gemma 2/3: norms after attention and MLP too");
  config_field(cls, "qk_norm", &ModelConfig::qk_norm, "Gemma 3: per-head norms of queries and keys");
  config_field(cls, "layer_windows", &ModelConfig::window, "per layer: the sliding window, 0 for global");
  config_field(cls, "layer_head_dims", &ModelConfig::layer_head_dims,
               "per layer: the head size, where layers differ (Gemma 4); empty: head_dim");
  config_field(cls, "layer_kv_heads", &ModelConfig::layer_kv_heads,
               "per layer: the KV heads, where layers differ (Gemma 4); empty: num_key_value_heads");
  config_field(cls, "kv_sources", &ModelConfig::kv_sources,
               "per layer: the layer whose keys and values it attends over (Gemma 4's KV sharing); empty: its own");
  config_field(cls, "layer_intermediate_sizes", &ModelConfig::layer_intermediate_sizes,
               "per layer: the MLP's width, where layers differ (Gemma 4's double-wide MLP); empty: intermediate_size");
  config_field(cls, "ple_dim", &ModelConfig::ple_dim, "Gemma 4: per-layer input values per layer (0: none)");
  config_field(cls, "ple_vocab", &ModelConfig::ple_vocab, "Gemma 4: rows of the per-layer embedding table");
  config_field(cls, "ple_embed_scale", &ModelConfig::ple_embed_scale, "sqrt(ple_dim), rounded to the weight dtype");
  config_field(cls, "ple_proj_scale", &ModelConfig::ple_proj_scale, "hidden_size ** -0.5 in float32");
  config_field(cls, "ple_input_scale", &ModelConfig::ple_input_scale, "2 ** -0.5 in float32");
  config_field(cls, "num_experts", &ModelConfig::num_experts, "Gemma 4: experts per layer (0: none)");
  config_field(cls, "top_k_experts", &ModelConfig::top_k_experts, "Gemma 4: experts each token uses");
  config_field(cls, "moe_intermediate", &ModelConfig::moe_intermediate, "Gemma 4: an expert's MLP width");
  config_field(cls, "router_input_scale", &ModelConfig::router_input_scale, "hidden_size ** -0.5 in float32");
  config_field(cls, "v_norm", &ModelConfig::v_norm, "Gemma 4: values RMS-normed per head, no weight");
  config_field(cls, "k_eq_v", &ModelConfig::k_eq_v, "Gemma 4: full-attention layers' values are their raw keys");
  config_field(cls, "rope_partial", &ModelConfig::rope_partial,
               "the fraction of full-attention layers' rotary pairs that rotate (proportional RoPE)");
  config_field(cls, "rope_partial_local", &ModelConfig::rope_partial_local, "the same for sliding-window layers");
  cls.def_property("kv_cache_dtype", &kv_cache_dtype, &set_kv_cache_dtype, "'float32', 'bfloat16' or 'int8'");
  config_setters()["kv_cache_dtype"] = [](ModelConfig& c, const py::handle& v) {
    set_kv_cache_dtype(c, py::str(v));
  };
  cls.def(py::init([](const py::kwargs& kw) { return make_config(kw); }));
}

// An EngineConfig, or a dict of its fields.
ModelConfig engine_config(const py::object& o) {
  if (py::isinstance<ModelConfig>(o)) return o.cast<ModelConfig>();
  if (py::isinstance<py::dict>(o)) return make_config(o.cast<py::dict>());
  throw py::type_error("config must be an EngineConfig or a dict of its fields");
}

// DLPack's structures ("dltensor" capsules, the protocol torch.from_dlpack reads), as the
// DLPack specification defines them.
struct DLDevice {
  int32_t device_type;  // 1: CPU, 2: CUDA
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 2: float
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

class Engine {
 public:
  Engine(const py::object& config, const py::dict& weights, const std::string& device) {
    std::shared_ptr<Device> dev = make_device(device);
    const ModelConfig c = engine_config(config);
    c.validate();  // before the sizes below index anything
    // A matrix: an array (float32 / bf16 bits) or a QuantizedWeight; the engine reads its
    // memory for its whole life, so the object is kept.
    auto item = [&](const std::string& key) -> py::object {
      if (!weights.contains(key.c_str())) throw py::value_error("engine weights: missing '" + key + "'");
      py::object o = weights[key.c_str()];
      keep_.append(o);
      return o;
    };
    auto mat = [&](const std::string& key, int64_t rows, int64_t cols) { return as_weight(item(key), key, rows, cols); };
    auto vec = [&](const std::string& key, int64_t n) {
      const py::array a = item(key).cast<py::array>();
      if (a.ndim() != 1 || a.shape(0) != n || !a.dtype().is(py::dtype::of<float>()) ||
          !(a.flags() & py::array::c_style))
        throw py::value_error(key + ": expected a contiguous float32 vector of length " + std::to_string(n) +
                              ", got " + std::string(py::str(a.dtype())) + " " + shape_str(a));
      return static_cast<const float*>(a.data());
    };
    // The tensors the config's generation holds (engine/generation.h), each checked.
    ModelWeights w;
    w.layers.resize(static_cast<size_t>(c.num_layers));
    for (const TensorSpec& t : model_tensors(c, !weights.contains("lm_head"))) {
      if (t.is_matrix())
        t.matrix(w) = mat(t.key(), t.rows, t.cols);
      else
        t.vector(w) = vec(t.key(), t.rows);
    }
    model_ = std::make_unique<Model>(c, std::move(w), std::move(dev));
    // A GPU has its copy of every weight now: the host arrays (a quantizer's output, a file's
    // memory map) are not held for it. (The CPU devices, the staged one too, read them.)
    if (device != "cpu") keep_ = py::list();
    // Ctrl-C reaches a long forward() or generate() within one prompt chunk or decode step:
    // the signal only marks itself pending while the loop runs without the GIL, so the loop
    // takes the GIL to run Python's handlers (the main thread's; elsewhere this does nothing),
    // and their KeyboardInterrupt unwinds the call.
    model_->set_interrupt([] {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    });
  }

  const ModelConfig& config() const { return model_->config(); }
  Model& model() { return *model_; }

  py::tuple forward(const I32Array& input_ids, const py::object& attention_mask,
                    const I32Array& position_ids, const std::string& output, bool last_only,
                    bool output_hidden_states, bool device_output) {
    const ModelConfig& c = model_->config();
    const TokenBatch in = token_batch(input_ids, attention_mask, c.vocab_size);
    check_same_shape(position_ids, input_ids, "position_ids");
    const int64_t B = in.B, L = in.L;
    Output out_kind;
    if (output == "logits") out_kind = Output::Logits;
    else if (output == "hidden") out_kind = Output::Hidden;
    else throw py::value_error("output must be 'logits' or 'hidden', got '" + output + "'");
    const std::vector<int32_t> pos(position_ids.data(), position_ids.data() + B * L);
    const int64_t D = out_kind == Output::Logits ? c.vocab_size : c.hidden_size;
    const std::vector<int64_t> shape{B, last_only ? int64_t{1} : L, D};
    std::vector<float> out, states;
    py::object res;
    if (device_output) {
      DeviceArray dev;
      {
        py::gil_scoped_release nogil;
        dev = model_->forward_on_device(in.ids.data(), in.mask_or_null(), pos.data(), B, L, out_kind, last_only,
                                        output_hidden_states ? &states : nullptr);
      }
      res = dlpack_capsule(std::move(dev), shape);
    } else {
      {
        py::gil_scoped_release nogil;
        out = model_->forward(in.ids.data(), in.mask_or_null(), pos.data(), B, L, out_kind, last_only,
                              output_hidden_states ? &states : nullptr);
      }
      res = to_numpy(std::move(out), shape);
    }
    py::object hs = py::none();
    if (output_hidden_states) hs = to_numpy(std::move(states), {c.num_layers + 1, B, L, c.hidden_size});
    return py::make_tuple(res, hs);
  }

  // New tokens [B, steps]; with output_logits, (tokens, raw logits [steps, B, vocab]), NaN in
  // the rows of a step that had finished before it.
  py::object generate(const I32Array& input_ids, const py::object& attention_mask, const SamplingParams& params,
                      const py::object& callback, bool output_logits) {
    const int64_t V = model_->config().vocab_size;
    const TokenBatch in = token_batch(input_ids, attention_mask, V);
    StepCallback cb;
    if (!callback.is_none()) {
      cb = [callback](const std::vector<int32_t>& toks) {
        py::gil_scoped_acquire gil;
        callback(py::array_t<int32_t>(static_cast<py::ssize_t>(toks.size()), toks.data()));
      };
    }
    std::vector<float> logits;
    LogitsSink sink;
    if (output_logits) {
      sink = [&logits, V, B = in.B](const std::vector<int64_t>& rows, const float* lg) {
        const size_t at = logits.size();
        logits.resize(at + static_cast<size_t>(B * V), std::numeric_limits<float>::quiet_NaN());
        for (size_t i = 0; i < rows.size(); ++i)
          std::memcpy(&logits[at + rows[i] * V], lg + i * V, static_cast<size_t>(V) * sizeof(float));
      };
    }
    GenerateResult r;
    {
      py::gil_scoped_release nogil;
      r = model_->generate(in.ids.data(), in.mask_or_null(), in.B, in.L, params, cb, sink);
    }
    py::object tokens = to_numpy(std::move(r.tokens), {in.B, r.steps});
    if (!output_logits) return tokens;
    return py::make_tuple(tokens, to_numpy(std::move(logits), {r.steps, in.B, V}));
  }

 private:
  // A float32 output in the model's device memory as a DLPack capsule (a CUDA device's as a
  // CUDA tensor): the capsule owns it and keeps this engine alive; when its consumer lets go,
  // the memory goes back to the model (Model::bury), whatever thread that happens on.
  py::capsule dlpack_capsule(DeviceArray dev, const std::vector<int64_t>& shape) {
    struct Owner {
      py::object engine;
      Model* model;
      DeviceArray buf;
      std::vector<int64_t> shape, strides;
      DLManagedTensor t;
    };
    std::vector<int64_t> strides(shape.size(), 1);  // row-major, in elements
    for (size_t i = shape.size(); i-- > 1;) strides[i - 1] = strides[i] * shape[i];
    auto o = std::make_unique<Owner>(
        Owner{py::cast(this, py::return_value_policy::reference), model_.get(), std::move(dev), shape, strides, {}});
    const std::string name = model_->device().name();
    int32_t type = 1, id = 0;
    if (name.rfind("cuda:", 0) == 0) {
      type = 2;
      id = std::stoi(name.substr(5));
    }
    o->t.dl_tensor = DLTensor{o->buf.get(), DLDevice{type, id}, static_cast<int32_t>(o->shape.size()),
                              DLDataType{2, 32, 1}, o->shape.data(), o->strides.data(), 0};
    o->t.manager_ctx = o.get();
    o->t.deleter = [](DLManagedTensor* t) noexcept {
      auto* own = static_cast<Owner*>(t->manager_ctx);
      own->model->bury(std::move(own->buf));  // needs no GIL; the engine reference does
      py::gil_scoped_acquire gil;
      delete own;
    };
    // An unconsumed capsule ("dltensor" still its name) frees its tensor itself.
    py::capsule cap(&o->t, "dltensor", [](PyObject* c) noexcept {
      py::error_scope keep;  // an exception on its way must survive the engine's release
      if (PyCapsule_IsValid(c, "dltensor")) {
        auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
        t->deleter(t);
      }
    });
    o.release();  // the capsule owns it now
    return cap;
  }

  // "cpu" (null: Model's default), or "cuda:N" where this build has the CUDA kernels.
  static std::shared_ptr<Device> make_device(const std::string& device) {
    if (device == "cpu") return nullptr;
    if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
        device.find_first_not_of("0123456789", 5) == std::string::npos && device.size() < 15) {
#ifdef GEMMA_CPP_HAVE_CUDA
      return cuda::make_cuda_device(std::stoi(device.substr(5)));
#else
      throw std::runtime_error("device '" + device + "': this build has no CUDA kernels (see gemma_cpp.cuda_status())");
#endif
    }
    throw py::value_error("engine device must be 'cpu' or 'cuda:N', got '" + device + "'");
  }

  py::list keep_;
  std::unique_ptr<Model> model_;
};

// The scheduler over an Engine's model (engine/scheduler.h); it keeps the Engine alive.
class SchedulerHandle {
 public:
  SchedulerHandle(py::object engine, int64_t slots, int64_t slot_ctx, int64_t chunk)
      : engine_(engine), s_(std::make_unique<Scheduler>(engine.cast<Engine&>().model(), slots, slot_ctx, chunk)) {}
  ~SchedulerHandle() {
    py::gil_scoped_release nogil;  // the loop finishes its iteration
    s_.reset();
  }
  int64_t submit(const std::vector<int32_t>& prompt, const SamplingParams& params, int32_t logprobs) {
    return s_->submit(prompt, params, logprobs);
  }
  void cancel(int64_t id) { s_->cancel(id); }
  // [(id, token, finish)], waiting up to timeout seconds (without the GIL) for the first.
  py::list poll(double timeout) {
    std::vector<RequestEvent> ev;
    {
      py::gil_scoped_release nogil;
      ev = s_->poll(timeout);
    }
    py::list out;
    for (const RequestEvent& e : ev) {
      if (!e.with_logprobs) {
        out.append(py::make_tuple(e.id, e.token, static_cast<int>(e.finish)));
        continue;
      }
      py::list top;
      for (const auto& t : e.top) top.append(py::make_tuple(t.first, t.second));
      out.append(py::make_tuple(e.id, e.token, static_cast<int>(e.finish), e.logprob, top));
    }
    return out;
  }
  py::dict stats() const {
    const SchedulerStats st = s_->stats();
    py::dict d;
    d["running"] = st.running;
    d["waiting"] = st.waiting;
    d["slots"] = st.slots;
    d["prompt_tokens"] = st.prompt_tokens;
    d["generated_tokens"] = st.generated_tokens;
    d["requests"] = st.requests;
    d["iterations"] = st.iterations;
    d["peak_rows"] = st.peak_rows;
    d["prefix_hits"] = st.prefix_hits;
    d["prefix_tokens"] = st.prefix_tokens;
    d["kv_cache_bytes"] = st.kv_cache_bytes;
    return d;
  }
  std::string error() const { return s_->error(); }
  void shutdown() {
    py::gil_scoped_release nogil;
    s_->shutdown();
  }
  const Scheduler& get() const { return *s_; }

 private:
  py::object engine_;
  std::unique_ptr<Scheduler> s_;
};

SamplingParams make_params(int64_t max_new_tokens, bool do_sample, float temperature, int64_t top_k,
                           float top_p, float min_p, float repetition_penalty,
                           std::vector<int32_t> eos_token_ids, int32_t pad_token_id, uint64_t seed,
                           float presence_penalty, float frequency_penalty) {
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
  p.presence_penalty = presence_penalty;
  p.frequency_penalty = frequency_penalty;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gemma_cpp compiled engine";
  m.attr("__version__") = GEMMA_CPP_VERSION;
  py::module_ testing = m.def_submodule(
      "_testing", "Kernel and op hooks for tests and benchmarks: not part of gemma_cpp's API");

  m.def("cpu_isa", &cpu_isa, "The SIMD path this build runs: avx512, avx2 or scalar");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &num_threads);

  register_engine_config(m);

  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init(&make_params), py::arg("max_new_tokens"), py::arg("do_sample"),
           py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
           py::arg("repetition_penalty"), py::arg("eos_token_ids"), py::arg("pad_token_id"),
           py::arg("seed"), py::arg("presence_penalty") = 0.f, py::arg("frequency_penalty") = 0.f);

  py::class_<Engine>(m, "Engine")
      .def(py::init<const py::object&, const py::dict&, const std::string&>(), py::arg("config"),
           py::arg("weights"), py::arg("device") = "cpu",
           "config: an EngineConfig (or a dict of its fields); weights: {engine name: array or "
           "(format, quants, scales[, mins])}; device: 'cpu' or 'cuda:N' (the weights are uploaded once)")
      .def_property_readonly("config", &Engine::config)
      .def_property_readonly("device_name", [](Engine& e) { return e.model().device().name(); },
                             "Where the model's ops run: 'cpu', 'cuda:N' (tests: 'cpu (staged...)')")
      .def_property_readonly("replayed_steps", [](Engine& e) { return e.model().device().replayed_steps(); },
                             "Decode steps run as a replay of a recorded one (a CUDA graph) so far")
      .def("forward", &Engine::forward, py::arg("input_ids"), py::arg("attention_mask"),
           py::arg("position_ids"), py::arg("output"), py::arg("last_only"),
           py::arg("output_hidden_states"), py::arg("device_output") = false,
           "device_output: the result stays in the model's device memory, as a DLPack capsule "
           "(torch.from_dlpack takes it without a copy; a CUDA model's is a CUDA tensor)")
      .def("generate", &Engine::generate, py::arg("input_ids"), py::arg("attention_mask"),
           py::arg("params"), py::arg("callback"), py::arg("output_logits") = false);

  py::class_<SchedulerHandle>(m, "Scheduler")
      .def(py::init<py::object, int64_t, int64_t, int64_t>(), py::arg("engine"), py::arg("slots"),
           py::arg("slot_ctx"), py::arg("chunk"),
           "Continuous batching over engine's model: `slots` sequences of up to slot_ctx tokens "
           "each, prompts in chunks of `chunk` tokens; a thread of its own runs the iterations")
      .def("submit", &SchedulerHandle::submit, py::arg("prompt"), py::arg("params"), py::arg("logprobs") = -1,
           "Queues a request (a list of token ids, SamplingParams); its id. ValueError when it cannot fit. "
           "logprobs >= 0: each token's event also carries its log-probability and the top `logprobs`")
      .def("cancel", &SchedulerHandle::cancel, py::arg("id"))
      .def("poll", &SchedulerHandle::poll, py::arg("timeout"),
           "[(id, token, finish[, logprob, [(token, logprob)]])] queued so far, waiting up to timeout "
           "seconds for the first. finish: 0 running, 1 stop token, 2 max_new_tokens, 3 cancelled, "
           "4 engine error (token -1: none)")
      .def("stats", &SchedulerHandle::stats)
      .def("error", &SchedulerHandle::error)
      .def("shutdown", &SchedulerHandle::shutdown)
      .def_property_readonly("slots", [](const SchedulerHandle& h) { return h.get().slots(); })
      .def_property_readonly("slot_ctx", [](const SchedulerHandle& h) { return h.get().slot_ctx(); })
      .def_property_readonly("chunk", [](const SchedulerHandle& h) { return h.get().chunk(); });
  m.def("bf16_to_f32", [](py::array_t<uint16_t, py::array::c_style> bits) {
    py::array_t<float> out(std::vector<py::ssize_t>(bits.shape(), bits.shape() + bits.ndim()));
    {
      py::gil_scoped_release nogil;
      bf16_to_f32_array(bits.data(), out.mutable_data(), bits.size());
    }
    return out;
  }, py::arg("bits"), "float32 array of bfloat16 bits (uint16), widened on the thread pool");

  m.def("model_tensors", [](const py::object& config, bool tied) {
    const ModelConfig c = engine_config(config);
    c.validate();
    py::list out;
    for (const TensorSpec& t : model_tensors(c, tied))
      out.append(py::make_tuple(t.key(), t.is_matrix() ? py::tuple(py::make_tuple(t.rows, t.cols))
                                                        : py::tuple(py::make_tuple(t.rows))));
    return out;
  }, py::arg("config"), py::arg("tied") = true,
     "The tensors an Engine takes for this config, in order: [(name, shape)], a matrix (out, in) or a norm (n,); "
     "embed, lm_head (tied=False), final_norm, then layers.N.* as the config's generation declares them "
     "(engine/generation.h)");
  m.def("weight_formats", [] {
    py::list out;
    for (const FormatInfo& f : kFormats) {
      py::dict d;
      d["name"] = f.name;
      d["block"] = f.block;
      d["block_bytes"] = f.block_bytes;
      d["scales"] = f.scales;
      d["mins"] = f.mins;
      d["bits_per_weight"] = f.bits_per_weight();
      d["ggml_type"] = f.ggml_type;
      d["ggml_block_bytes"] = f.ggml_block_bytes;
      d["quantize_on_load"] = f.quantize_on_load;
      d["cuda"] = f.cuda;
      out.append(d);
    }
    return py::tuple(out);
  }, "core/formats.h's table, one dict per format in the engine's order: name, block (weights per block "
     "along a row; 1 for floats), block_bytes, scales / mins (arrays of their own), bits_per_weight, "
     "ggml_type and ggml_block_bytes (the GGUF type whose values it holds), quantize_on_load, cuda "
     "(kernels on the CUDA device; the CPU has them for all)");

  m.def("quantize", [](const py::array& w, const std::string& fmt) {
    const DType f = parse_format(fmt);
    if (is_kquant(f))
      throw py::value_error("quantize: " + fmt + " weights are imported from GGUF files, not quantized here");
    if (w.ndim() != 2 || !(w.flags() & py::array::c_style))
      throw py::value_error("quantize: expected a contiguous 2-D array");
    const bool bf16 = w.dtype().is(py::dtype::of<uint16_t>());
    if (!bf16 && !w.dtype().is(py::dtype::of<float>()))
      throw py::value_error("quantize: weights must be float32 or uint16 (bfloat16 bits)");
    const int64_t rows = w.shape(0), K = w.shape(1);
    if (K % kQBlock != 0)
      throw py::value_error("quantize: the input size " + std::to_string(K) + " is not a multiple of 32");
    // (numpy puts arrays this large on 2 MiB pages itself: madvise, where the OS offers it.)
    py::array_t<uint8_t> q({rows, row_bytes(f, K)});
    py::array_t<uint16_t> d({rows, scale_row_count(K)});
    py::object m = py::none();
    uint16_t* mp = nullptr;
    if (f == DType::Int4m) {
      py::array_t<uint16_t> ma({rows, scale_row_count(K)});
      mp = ma.mutable_data();
      m = ma;
    }
    {
      py::gil_scoped_release nogil;
      quantize_matrix(f, w.data(), bf16, rows, K, q.mutable_data(), d.mutable_data(), mp);
    }
    return QuantizedWeight(fmt, q, d, m, "quantize").to_tuple();
  }, py::arg("w"), py::arg("format"),
     "(format, quants, scales[, mins]) of a float32 / bf16-bits matrix, threaded (gemma_cpp.quant.QuantizedWeight)");

  m.def("interleave", [](const py::object& o, bool to_groups) {
    // Plain rows have the same shapes as interleaved ones: the same checks apply.
    const QuantizedWeight src = QuantizedWeight::from(o, "interleave");
    const Weight w = src.view();
    const int64_t nb = w.kquant() ? 0 : w.cols / kQBlock;  // K-quants: one array
    py::array_t<uint8_t> qo({w.rows, w.ld});
    if (w.kquant()) {
      {
        py::gil_scoped_release nogil;
        interleave_rows(w.rows, w.ld, 0, static_cast<const uint8_t*>(w.data), nullptr, nullptr, qo.mutable_data(),
                        nullptr, nullptr, to_groups);
      }
      return QuantizedWeight(format_name(src.format), qo, py::none(), py::none(), "interleave").to_tuple();
    }
    py::array_t<uint16_t> dout({w.rows, nb});
    py::object mout = py::none();
    uint16_t* mp = nullptr;
    if (w.mins) {
      py::array_t<uint16_t> ma({w.rows, nb});
      mp = ma.mutable_data();
      mout = ma;
    }
    {
      py::gil_scoped_release nogil;
      interleave_rows(w.rows, w.ld, nb, static_cast<const uint8_t*>(w.data), w.scales, w.mins, qo.mutable_data(),
                      dout.mutable_data(), mp, to_groups);
    }
    return QuantizedWeight(format_name(src.format), qo, dout, mout, "interleave").to_tuple();
  }, py::arg("w"), py::arg("to_groups") = true,
     "A quantized weight's rows from plain order into the engine's 16-row groups (to_groups=False: back), "
     "threaded; gemma_cpp.quant.interleave is its numpy mirror");

  register_cuda(m, testing);
  register_testing(testing);
}
