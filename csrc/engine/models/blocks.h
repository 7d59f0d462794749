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

// Room in layer l's sliding-window buffers for the step's tokens (KVCache::make_room).
inline void make_room(const StepContext& s, int64_t l, int64_t window) {
  if (window <= 0) return;
  for (int64_t i = 0; i < s.Md; ++i) s.cache.make_room(l, s.sr.dec_rows[i], s.sr.dec_slots[i], 1, window);
  for (int64_t row : s.sr.pre_rows) s.cache.make_room(l, row, s.sr.slot0, s.sr.T, window);
}

// The attention over the cache for layer l's queries q (its head size: QD = heads x head_dim),
// then its output projection o into the residual x (block_output; h its scratch).
inline void attend(const StepContext& s, int64_t l, const float* q, float* att, int64_t QD, const Weight& o,
                   const float* post_norm, float* h, float* x) {
  const ModelConfig& c = s.c;
  const int64_t H = c.hidden_size;
  {
    OpTimer timer(&OpProfile::attention);
    const AttentionRule rule{c.num_heads, c.layer_window(l), c.attn_scale, c.attn_softcap, c.causal};
    s.dev.attention(s.cache, l, rule, q, att);
  }
  s.parts([&](int64_t m0, int64_t n, Work work) {
    block_output(s, att + m0 * QD, QD, o, post_norm, h + m0 * H, x + m0 * H, n, work);
  });
}

// The gated MLP's first half: g = gelu_tanh(gate(h)) * up(h), h = norm(x), [M, F] each.
inline void gated_mlp_in(const StepContext& s, const float* x, const float* norm, const Weight& gate,
                         const Weight& up, int64_t F, float* h, float* g, float* u) {
  const int64_t H = s.c.hidden_size;
  {
    OpTimer timer(&OpProfile::norm);
    s.dev.rmsnorm(x, norm, h, s.M, H, s.c.rms_norm_eps);
  }
  {
    OpTimer timer(&OpProfile::matmul);
    s.parts([&](int64_t m0, int64_t n, Work work) {
      const MatmulTarget gate_up[2] = {{&gate, g + m0 * F, F}, {&up, u + m0 * F, F}};
      s.dev.matmul_many(h + m0 * H, n, H, gate_up, 2, work);
    });
  }
  OpTimer timer(&OpProfile::activation);
  s.dev.geglu(g, u, s.M * F);
}

}  // namespace gemma
