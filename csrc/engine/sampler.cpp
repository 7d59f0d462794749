#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "runtime/threadpool.h"

namespace gemma {

float log_sum_exp(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (!std::isfinite(m)) return m;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - m);
  return static_cast<float>(m + std::log(sum));
}

std::vector<std::pair<int32_t, float>> top_entries(const float* x, int64_t n, int32_t k, float lse) {
  std::vector<std::pair<int32_t, float>> top;
  auto better = [](const std::pair<int32_t, float>& a, const std::pair<int32_t, float>& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  };
  for (int64_t i = 0; i < n && k > 0; ++i) {
    const std::pair<int32_t, float> e{static_cast<int32_t>(i), x[i]};
    if (static_cast<int32_t>(top.size()) == k && !better(e, top.back())) continue;
    top.insert(std::upper_bound(top.begin(), top.end(), e, better), e);
    if (static_cast<int32_t>(top.size()) > k) top.pop_back();
  }
  for (auto& e : top) e.second -= lse;
  return top;
}

int32_t argmax(const float* x, int64_t n) {
  // First index of the maximum (torch.argmax's choice among ties). NaN is skipped here,
  // where torch would return it: a NaN logit means a broken model either way.
  int64_t best = 0;
  float bv = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    if (!any || x[i] > bv) {
      if (std::isnan(x[i])) continue;
      bv = x[i];
      best = i;
      any = true;
    }
  }
  return static_cast<int32_t>(best);
}

int32_t argmax_pooled(const float* x, int64_t n) {
  constexpr int64_t kParts = 16, kMinPart = 16384;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kParts, n / kMinPart));
  if (parts == 1) return argmax(x, n);
  int64_t best[kParts];
  parallel_for(parts, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = n * p / parts, e = n * (p + 1) / parts;
      best[p] = b + argmax(x + b, e - b);
    }
  });
  // In part order, a later part wins only with a strictly larger value: the first index of
  // the maximum, as one scan. A part of NaNs only reports its first index, which loses to any
  // number (NaN compares false) and is replaced by the first part holding one.
  int64_t r = best[0];
  for (int64_t p = 1; p < parts; ++p)
    if (x[best[p]] > x[r] || (std::isnan(x[r]) && !std::isnan(x[best[p]]))) r = best[p];
  return static_cast<int32_t>(r);
}

uint64_t Sampler::mix(uint64_t seed, uint64_t stream) {
  // splitmix64 of (seed, stream): independent, reproducible streams per batch row.
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (stream + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int32_t Sampler::next(float* logits, int64_t vocab, const std::vector<int32_t>& history, bool use_pool) {
  if (p_.repetition_penalty != 1.f) {
    // transformers' RepetitionPenaltyLogitsProcessor: each distinct earlier token once.
    seen_.assign(static_cast<size_t>(vocab), 0);
    const float pen = p_.repetition_penalty;
    for (int32_t t : history) {
      if (t < 0 || t >= vocab || seen_[t]) continue;
      seen_[t] = 1;
      logits[t] = logits[t] < 0 ? logits[t] * pen : logits[t] / pen;
    }
  }
  const bool counts = p_.presence_penalty != 0.f || p_.frequency_penalty != 0.f;
  if (counts) {
    if (static_cast<int64_t>(drawn_.size()) != vocab) drawn_.assign(static_cast<size_t>(vocab), 0);
    for (int32_t t : distinct_)
      logits[t] -= p_.presence_penalty + p_.frequency_penalty * static_cast<float>(drawn_[t]);
  }
  const int32_t tok = pick(logits, vocab, use_pool);
  if (counts && tok >= 0 && tok < vocab && drawn_[tok]++ == 0) distinct_.push_back(tok);
  return tok;
}

int32_t Sampler::pick(float* logits, int64_t vocab, bool use_pool) {
  if (!p_.do_sample) return use_pool ? argmax_pooled(logits, vocab) : argmax(logits, vocab);

  if (p_.temperature != 1.f)
    for (int64_t i = 0; i < vocab; ++i) logits[i] = logits[i] / p_.temperature;

  // Candidates, best first. top-k keeps every token tied with the k-th value, as
  // transformers' `scores < topk(...)[-1]` does.
  idx_.clear();
  if (p_.top_k > 0 && p_.top_k < vocab) {
    prob_.assign(logits, logits + vocab);
    std::nth_element(prob_.begin(), prob_.begin() + (p_.top_k - 1), prob_.end(),
                     std::greater<float>());
    const float kth = prob_[p_.top_k - 1];
    for (int64_t i = 0; i < vocab; ++i)
      if (logits[i] >= kth) idx_.push_back(static_cast<int32_t>(i));
  } else {
    idx_.resize(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) idx_[i] = static_cast<int32_t>(i);
  }
  // Best first, needed by top-p and min-p (and for their ties: a stable order). Plain
  // sampling over the whole vocabulary only needs the maximum first, for the softmax.
  if (p_.top_p < 1.f || p_.min_p > 0.f) {
    std::stable_sort(idx_.begin(), idx_.end(),
                     [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  } else {
    size_t best = 0;
    for (size_t i = 1; i < idx_.size(); ++i)
      if (logits[idx_[i]] > logits[idx_[best]]) best = i;
    std::swap(idx_[0], idx_[best]);
  }
  if (idx_.empty() || !std::isfinite(logits[idx_[0]])) return argmax(logits, vocab);

  auto softmax = [&]() {  // probabilities of the candidates, in prob_
    const double m = logits[idx_[0]];
    double sum = 0;
    prob_.resize(idx_.size());
    for (size_t i = 0; i < idx_.size(); ++i) {
      const double e = std::exp(static_cast<double>(logits[idx_[i]]) - m);
      prob_[i] = static_cast<float>(e);
      sum += e;
    }
    for (float& p : prob_) p = static_cast<float>(p / sum);
  };

  if (p_.top_p < 1.f) {
    // transformers removes the ascending-order prefix whose cumulative mass is
    // <= 1 - top_p; equivalently it keeps a token while the mass above it is < top_p.
    softmax();
    double above = 0;
    size_t keep = 0;
    while (keep < idx_.size() && (keep == 0 || above < p_.top_p)) above += prob_[keep++];
    idx_.resize(keep);
  }
  if (p_.min_p > 0.f) {
    softmax();
    const float thr = p_.min_p * prob_[0];
    size_t keep = 1;
    while (keep < idx_.size() && prob_[keep] >= thr) ++keep;
    idx_.resize(keep);
  }
  softmax();
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  double c = 0;
  for (size_t i = 0; i < idx_.size(); ++i) {
    c += prob_[i];
    if (u < c) return idx_[i];
  }
  return idx_.back();
}

}  // namespace gemma
