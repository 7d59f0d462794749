// What the Gemma generations' forwards share (models/gemma.cpp, models/gemma4.cpp).
#pragma once
#include "engine/generation.h"

namespace gemma {

// A block's output projection in[n, K] . w^T into the residual x[n, hidden]: added directly
// (Gemma 1), or normed by post_norm first (sandwich norms; tmp holds the projection).
inline void block_output(const StepContext& s, const float* in, int64_t K, const Weight& w, const float* post_norm,
                  float* tmp, float* x, int64_t n, Work work) {
  const int64_t H = s.c.hidden_size;
  if (!s.c.sandwich_norms) {
    OpTimer timer(&OpProfile::matmul);
    s.dev.matmul(in, n, K, w, x, /*accumulate=*/true, work);
    return;
  }
  {
    OpTimer timer(&OpProfile::matmul);
    s.dev.matmul(in, n, K, w, tmp, false, work);
  }
  OpTimer timer(&OpProfile::norm);
  s.dev.rmsnorm(tmp, post_norm, tmp, n, H, s.c.rms_norm_eps);
  s.dev.add(x, tmp, n * H);
}

}  // namespace gemma
