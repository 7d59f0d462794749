// A model generation, as the engine sees it: which tensors its layers hold (names and shapes,
// from the config) and its forward over one step's tokens. Each generation's forward lives in
// its own file under engine/models/ (gemma.cpp: Gemma 1, 2 and 3; gemma4.cpp), built from the
// Device's primitives; Model (engine/model.h) keeps what every generation shares: the step's
// tokens and rows, the KV cache's bookkeeping, the activation buffers, the LM head and the
// draw. The bindings (reading the weights), the devices (placing them) and the Python loaders
// (through _C.model_tensors) all read the tensor list from here.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/model.h"

namespace gemma {

// One tensor of a model: a matrix [rows, cols] (any weight format) or a float32 vector
// [rows] (cols == 0: a norm's scale, 1 + w or w as the generation applies it), of layer
// `layer` or (layer -1) of the model itself; where ModelWeights keeps it: one of the four
// members (a layer's in LayerWeights).
struct TensorSpec {
  std::string name;  // a layer's "q", "attn_norm", ...; the model's "embed", "lm_head", "final_norm"
  int64_t rows = 0, cols = 0, layer = -1;
  Weight LayerWeights::*layer_matrix = nullptr;
  const float* LayerWeights::*layer_vector = nullptr;
  Weight ModelWeights::*model_matrix = nullptr;
  const float* ModelWeights::*model_vector = nullptr;
  bool is_matrix() const { return cols > 0; }
  // Its name in the engine's weights: "embed", "layers.3.q", ...
  std::string key() const { return layer < 0 ? name : "layers." + std::to_string(layer) + "." + name; }
  Weight& matrix(ModelWeights& w) const { return layer < 0 ? w.*model_matrix : w.layers[layer].*layer_matrix; }
  const float*& vector(ModelWeights& w) const {
    return layer < 0 ? w.*model_vector : w.layers[layer].*layer_vector;
  }
  // A tensor [rows, cols] (cols 0: a norm [rows]) of layer `layer` (-1: of the model), kept
  // in the member given.
  template <typename Slot>
  static TensorSpec of(std::string name, int64_t layer, int64_t rows, int64_t cols, Slot slot) {
    TensorSpec t;
    t.name = std::move(name);
    t.rows = rows;
    t.cols = cols;
    t.layer = layer;
    if constexpr (std::is_same_v<Slot, Weight LayerWeights::*>) t.layer_matrix = slot;
    else if constexpr (std::is_same_v<Slot, const float* LayerWeights::*>) t.layer_vector = slot;
    else if constexpr (std::is_same_v<Slot, Weight ModelWeights::*>) t.model_matrix = slot;
    else t.model_vector = slot;
    return t;
  }
};

// What a generation's forward works with in one step.
struct StepContext {
  const ModelConfig& c;
  const ModelWeights& w;
  Device& dev;
  KVCache& cache;
  const StepRows& sr;
  Workspace& ws;
  int64_t M = 0, Md = 0;  // the step's tokens; the first Md are decode tokens
  const std::function<void(int64_t, const float*)>* layer_sink = nullptr;  // each layer's input, then the output
  // Runs fn(first token, tokens, work) for the decode tokens, then for the prompt chunk: each
  // kind takes its own kernels (kernels.h, Work), so a row's bits do not depend on the batch.
  template <typename F>
  void parts(F&& fn) const {
    if (Md > 0) fn(int64_t{0}, Md, Work::Decode);
    if (M > Md) fn(Md, M - Md, Work::Prefill);
  }
  // `a` grown to hold at least n floats of the device's memory (contents lost when it grows).
  float* buffer(DeviceArray& a, int64_t n) const { return grow_buffer(dev, a, n); }
  void sink(int64_t layer, const float* x) const {
    if (layer_sink && *layer_sink) (*layer_sink)(layer, x);
  }
};

struct Generation {
  const char* name;  // EngineConfig's `generation`
  // The tensors of layer `layer` (the layers of one generation may differ: sliding and global
  // layers, shared KV).
  std::vector<TensorSpec> (*layer_tensors)(const ModelConfig& c, int64_t layer);
  // Tensors of the model itself beyond embed, lm_head and final_norm (null: none).
  std::vector<TensorSpec> (*model_tensors)(const ModelConfig& c);
  // The step's tokens from the embedding to the final norm, the step already begun
  // (Device::begin_step); returns the final-normed states [M, hidden] in the device's memory.
  const float* (*forward)(StepContext& s);
};

// The generation a config names; std::invalid_argument listing the known ones otherwise.
const Generation& generation_of(const ModelConfig& c);
// Every tensor of a model, in order: embed, lm_head (when not tied to the embedding),
// final_norm, the generation's own model tensors, then each layer's (its layer_tensors). ModelWeights::layers must
// have num_layers entries before matrix() / vector() of a layer's tensor are used.
std::vector<TensorSpec> model_tensors(const ModelConfig& c, bool tied);

// Adds the time from construction to destruction to one op's total (when profiling is on).
struct OpTimer {
  double* slot;
  std::chrono::steady_clock::time_point t0;
  explicit OpTimer(double OpProfile::*field)
      : slot(op_profile().enabled ? &(op_profile().*field) : nullptr),
        t0(slot ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
  ~OpTimer() {
    if (slot) *slot += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

// The generations, each defined in its file under models/.
extern const Generation kGemma;   // models/gemma.cpp: Gemma 1, 2 and 3
extern const Generation kGemma4;  // models/gemma4.cpp: Gemma 4 (text)

}  // namespace gemma
