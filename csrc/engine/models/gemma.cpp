// Gemma 1, 2 and 3: the decoder's layers over one step's tokens.
//   x = embed(ids) * sqrt(hidden)
//   per layer: x += post_attn_norm(o(attention(rope(q_norm(q(h)), k_norm(k(h))), v(h))))  h = attn_norm(x)
//              x += post_mlp_norm(down(gelu_tanh(gate(h)) * up(h)))                         h = mlp_norm(x)
//   out = final_norm(x)
// Gemma 2 and 3 add the post norms (sandwich_norms; Gemma 1 adds the projections directly),
// Gemma 3 the per-head q / k norms (qk_norm); the sliding windows, soft-caps and RoPE bases
// come from the config (DESIGN: the model's exact semantics).
#include "engine/models/blocks.h"

namespace gemma {
namespace {

std::vector<TensorSpec> gemma_layer(const ModelConfig& c, int64_t l) {
  const int64_t H = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
  const int64_t qd = c.num_heads * hd, kd = c.num_kv_heads * hd;
  auto m = [&](const char* name, int64_t rows, int64_t cols, Weight LayerWeights::*slot) {
    return TensorSpec::of(name, l, rows, cols, slot);
  };
  auto v = [&](const char* name, int64_t n, const float* LayerWeights::*slot) { return TensorSpec::of(name, l, n, 0, slot); };
  std::vector<TensorSpec> out = {
      m("q", qd, H, &LayerWeights::q),       m("k", kd, H, &LayerWeights::k),
      m("v", kd, H, &LayerWeights::v),       m("o", H, qd, &LayerWeights::o),
      m("gate", F, H, &LayerWeights::gate),  m("up", F, H, &LayerWeights::up),
      m("down", H, F, &LayerWeights::down),  v("attn_norm", H, &LayerWeights::attn_norm),
      v("mlp_norm", H, &LayerWeights::mlp_norm)};
  if (c.sandwich_norms) {
    out.push_back(v("post_attn_norm", H, &LayerWeights::post_attn_norm));
    out.push_back(v("post_mlp_norm", H, &LayerWeights::post_mlp_norm));
  }
  if (c.qk_norm) {
    out.push_back(v("q_norm", hd, &LayerWeights::q_norm));
    out.push_back(v("k_norm", hd, &LayerWeights::k_norm));
  }
  return out;
}

const float* gemma_forward(StepContext& s) {
  const ModelConfig& c = s.c;
  const int64_t H = c.hidden_size, F = c.intermediate_size, hd = c.head_dim;
  const int64_t nH = c.num_heads, nKV = c.num_kv_heads, M = s.M;
  const int64_t QD = nH * hd, KD = nKV * hd;
  Workspace& ws = s.ws;
  Device& dev = s.dev;
  float* x = s.buffer(ws.x, M * H);
  float* h = s.buffer(ws.h, M * H);
  float* q = s.buffer(ws.q, M * QD);
  float* k = s.buffer(ws.k, M * KD);
  float* v = s.buffer(ws.v, M * KD);
  float* att = s.buffer(ws.att, M * QD);
  float* g = s.buffer(ws.g, M * F);
  float* u = s.buffer(ws.u, M * F);
  float* x_out = s.buffer(ws.out, M * H);

  dev.embed(s.w.embed, c.embed_scale, x);
  s.sink(0, x);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = s.w.layers[l];
    // Attention block.
    {
      OpTimer timer(&OpProfile::norm);
      dev.rmsnorm(x, L.attn_norm, h, M, H, c.rms_norm_eps);
    }
    {
      OpTimer timer(&OpProfile::matmul);
      s.parts([&](int64_t m0, int64_t n, Work work) {
        const MatmulTarget qkv[3] = {{&L.q, q + m0 * QD, QD}, {&L.k, k + m0 * KD, KD}, {&L.v, v + m0 * KD, KD}};
        dev.matmul_many(h + m0 * H, n, H, qkv, 3, work);
      });
    }
    const int64_t window = c.layer_window(l);
    {
      OpTimer timer(&OpProfile::rope_cache);
      make_room(s, l, window);
      dev.rope_kv(s.cache, l, window > 0, q, k, v, c.qk_norm ? L.q_norm : nullptr, c.qk_norm ? L.k_norm : nullptr,
                  c.rms_norm_eps, nH);
    }
    attend(s, l, q, att, QD, L.o, L.post_attn_norm, h, x);
    // MLP block: down(gelu_tanh(gate(h)) * up(h)).
    gated_mlp_in(s, x, L.mlp_norm, L.gate, L.up, F, h, g, u);
    s.parts([&](int64_t m0, int64_t n, Work work) {
      block_output(s, g + m0 * F, F, L.down, L.post_mlp_norm, h + m0 * H, x + m0 * H, n, work);
    });
    if (l + 1 < c.num_layers) s.sink(l + 1, x);
  }
  dev.rmsnorm(x, s.w.final_norm, x_out, M, H, c.rms_norm_eps);
  return x_out;
}

}  // namespace

const Generation kGemma = {"gemma", &gemma_layer, nullptr, &gemma_forward};

}  // namespace gemma
