// Token selection from logits: the processors transformers applies, in its order
// (repetition penalty, then temperature, top-k, top-p, min-p), and the draw. The presence and
// frequency penalties (OpenAI's; transformers has none) go right after the repetition penalty.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace gemma {

struct SamplingParams {
  int64_t max_new_tokens = 20;
  bool do_sample = false;
  float temperature = 1.f;   // > 0
  int64_t top_k = 0;         // 0: off
  float top_p = 1.f;         // (0, 1]; 1: off
  float min_p = 0.f;         // [0, 1]; 0: off
  float repetition_penalty = 1.f;  // > 0; 1: off
  // OpenAI's: logit -= presence * (count > 0) + frequency * count, count = how often the
  // Sampler has drawn the token (the new tokens only); 0: off.
  float presence_penalty = 0.f, frequency_penalty = 0.f;
  std::vector<int32_t> eos_token_ids;
  int32_t pad_token_id = 0;
  uint64_t seed = 0;
};

class Sampler {
 public:
  Sampler(const SamplingParams& p, uint64_t stream) : p_(p), rng_(mix(p.seed, stream)) {}
  // Picks the next token of one row. logits [vocab] is modified (penalty, warping).
  // history: the row's tokens so far (the prompt from its first real token, and generated
  // tokens), for the repetition penalty. use_pool: greedy picks scan the vocabulary on the
  // thread pool (same result; the caller must not itself be inside parallel_for).
  int32_t next(float* logits, int64_t vocab, const std::vector<int32_t>& history, bool use_pool = false);
  const SamplingParams& params() const { return p_; }

 private:
  static uint64_t mix(uint64_t seed, uint64_t stream);
  int32_t pick(float* logits, int64_t vocab, bool use_pool);  // after the penalties
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> idx_;
  std::vector<float> prob_;
  std::vector<uint8_t> seen_;
  std::vector<int32_t> drawn_;     // [vocab] counts of drawn tokens, when a penalty needs them
  std::vector<int32_t> distinct_;  // the tokens drawn, each once
};

// log(sum(exp(x))) over a row (in double): the log-softmax's denominator.
float log_sum_exp(const float* x, int64_t n);
// The k largest entries of x (ties: the lower index first), best first, as log-probabilities
// (x - lse).
std::vector<std::pair<int32_t, float>> top_entries(const float* x, int64_t n, int32_t k, float lse);

// The first index of the largest value, NaN skipped (torch.argmax's choice among ties).
int32_t argmax(const float* x, int64_t n);
// The same index, parts of x scanned on the thread pool and combined in order.
int32_t argmax_pooled(const float* x, int64_t n);

}  // namespace gemma
