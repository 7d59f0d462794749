#include "engine/generation.h"

#include <stdexcept>

namespace gemma {

namespace {
const Generation* const kGenerations[] = {&kGemma, &kGemma4};
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
  out.push_back(TensorSpec::of("embed", -1, c.vocab_size, H, &ModelWeights::embed));
  if (!tied) out.push_back(TensorSpec::of("lm_head", -1, c.vocab_size, H, &ModelWeights::lm_head));
  out.push_back(TensorSpec::of("final_norm", -1, H, 0, &ModelWeights::final_norm));
  const Generation& g = generation_of(c);
  if (g.model_tensors)
    for (TensorSpec& t : g.model_tensors(c)) out.push_back(std::move(t));
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (TensorSpec& t : g.layer_tensors(c, l)) out.push_back(std::move(t));
  return out;
}

}  // namespace gemma
