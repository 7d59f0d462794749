#include "engine/generation.h"

#include <stdexcept>

namespace gemma {

namespace {
const Generation* const kGenerations[] = {&kGemma};
}  // namespace

const Generation& generation_of(const ModelConfig& c) {
  std::string known;
  for (const Generation* g : kGenerations) {
    if (c.generation == g->name) return *g;
    known += std::string(known.empty() ? "'" : ", '") + g->name + "'";
  }
  throw std::invalid_argument("engine config: unknown generation '" + c.generation + "' (the engine runs " + known +
                              ")");
}

std::vector<TensorSpec> model_tensors(const ModelConfig& c, bool tied) {
  const int64_t H = c.hidden_size;
  std::vector<TensorSpec> out;
  auto add = [&](const char* name, int64_t rows, int64_t cols, Weight ModelWeights::*m, const float* ModelWeights::*v) {
    TensorSpec t;
    t.name = name;
    t.rows = rows;
    t.cols = cols;
    t.model_matrix = m;
    t.model_vector = v;
    out.push_back(t);
  };
  add("embed", c.vocab_size, H, &ModelWeights::embed, nullptr);
  if (!tied) add("lm_head", c.vocab_size, H, &ModelWeights::lm_head, nullptr);
  add("final_norm", H, 0, nullptr, &ModelWeights::final_norm);
  const Generation& g = generation_of(c);
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (TensorSpec& t : g.layer_tensors(c, l)) out.push_back(std::move(t));
  return out;
}

}  // namespace gemma
