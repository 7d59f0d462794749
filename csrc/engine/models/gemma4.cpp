// Gemma 4 (text): the decoder's layers over one step's tokens (docs/design/gemma4.md, 2.2-2.3).
//   x = embed(ids) * sqrt(hidden)
//   per layer l (head size and KV heads its own: the full-attention layers' differ):
//     h = attn_norm(x);  q = q_norm(q(h));  k = k_norm(k(h));  v = v_norm(v(h)), or on a
//     full-attention layer with k_eq_v the raw k(h) normed (no v projection);  RoPE on q, k
//     (the full layers' proportional: only the first pairs rotate);  attention scale 1
//     x += post_attn_norm(o(attention)); x += post_mlp_norm(down(gelu_tanh(gate(h)) * up(h))), h = mlp_norm(x)
//     x *= layer_scalar
//   out = final_norm(x)
// Every norm multiplies by its weight w (the loaders pass w, not 1 + w); v_norm has none.
// KV sharing: a layer whose kv_source is an earlier layer computes queries only and attends
// over that layer's slots; its MLP may be double-wide (layer_intermediate_sizes).
// Not here yet, and refused by the loaders: per-layer input embeddings, the mixture-of-experts block.
#include "engine/models/blocks.h"

namespace gemma {
namespace {

bool takes_keys_as_values(const ModelConfig& c, int64_t l) { return c.k_eq_v && c.layer_window(l) == 0; }

std::vector<TensorSpec> gemma4_layer(const ModelConfig& c, int64_t l) {
  const int64_t H = c.hidden_size, F = c.intermediate_of(l), hd = c.head_dim_of(l);
  const int64_t qd = c.num_heads * hd, kd = c.kv_heads_of(l) * hd;
  const bool own_kv = c.kv_source_of(l) == l;  // a sharing layer has no k, v or k_norm
  auto m = [&](const char* name, int64_t rows, int64_t cols, Weight LayerWeights::*slot) {
    return TensorSpec::of(name, l, rows, cols, slot);
  };
  auto v = [&](const char* name, int64_t n, const float* LayerWeights::*slot) { return TensorSpec::of(name, l, n, 0, slot); };
  std::vector<TensorSpec> out = {m("q", qd, H, &LayerWeights::q)};
  if (own_kv) out.push_back(m("k", kd, H, &LayerWeights::k));
  if (own_kv && !takes_keys_as_values(c, l)) out.push_back(m("v", kd, H, &LayerWeights::v));
  for (TensorSpec& t : std::vector<TensorSpec>{
           m("o", H, qd, &LayerWeights::o), m("gate", F, H, &LayerWeights::gate), m("up", F, H, &LayerWeights::up),
           m("down", H, F, &LayerWeights::down), v("attn_norm", H, &LayerWeights::attn_norm),
           v("mlp_norm", H, &LayerWeights::mlp_norm), v("post_attn_norm", H, &LayerWeights::post_attn_norm),
           v("post_mlp_norm", H, &LayerWeights::post_mlp_norm), v("q_norm", hd, &LayerWeights::q_norm)})
    out.push_back(std::move(t));
  if (own_kv) out.push_back(v("k_norm", hd, &LayerWeights::k_norm));
  out.push_back(v("layer_scalar", 1, &LayerWeights::layer_scalar));
  return out;
}

const float* gemma4_forward(StepContext& s) {
  const ModelConfig& c = s.c;
  const int64_t H = c.hidden_size, nH = c.num_heads, M = s.M, Md = s.Md, T = s.sr.T;
  Workspace& ws = s.ws;
  Device& dev = s.dev;
  float* x = s.buffer(ws.x, M * H);
  float* h = s.buffer(ws.h, M * H);
  float* q = s.buffer(ws.q, M * nH * c.max_head_dim());
  float* k = s.buffer(ws.k, M * c.max_kv_width());
  float* v = s.buffer(ws.v, M * c.max_kv_width());
  float* att = s.buffer(ws.att, M * nH * c.max_head_dim());
  float* g = s.buffer(ws.g, M * c.max_intermediate());
  float* u = s.buffer(ws.u, M * c.max_intermediate());
  float* x_out = s.buffer(ws.out, M * H);

  dev.embed(s.w.embed, c.embed_scale, x);
  s.sink(0, x);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = s.w.layers[l];
    const int64_t hd = c.head_dim_of(l), nKV = c.kv_heads_of(l), QD = nH * hd, KD = nKV * hd, F = c.intermediate_of(l);
    const bool own_kv = c.kv_source_of(l) == l, keys_as_values = takes_keys_as_values(c, l);
    {
      OpTimer timer(&OpProfile::norm);
      dev.rmsnorm(x, L.attn_norm, h, M, H, c.rms_norm_eps);
    }
    {
      OpTimer timer(&OpProfile::matmul);
      s.parts([&](int64_t m0, int64_t n, Work work) {
        const MatmulTarget qkv[3] = {{&L.q, q + m0 * QD, QD}, {&L.k, k + m0 * KD, KD}, {&L.v, v + m0 * KD, KD}};
        dev.matmul_many(h + m0 * H, n, H, qkv, !own_kv ? 1 : keys_as_values ? 2 : 3, work);
      });
    }
    const int64_t window = c.layer_window(l);
    {
      OpTimer timer(&OpProfile::rope_cache);
      if (own_kv) {
        if (keys_as_values) dev.copy(v, k, static_cast<size_t>(M * KD) * sizeof(float));  // before k_norm and RoPE
        if (c.v_norm) dev.rmsnorm(v, nullptr, v, M * nKV, hd, c.rms_norm_eps);  // per head, no weight
        if (window > 0) {
          for (int64_t i = 0; i < Md; ++i) s.cache.make_room(l, s.sr.dec_rows[i], s.sr.dec_slots[i], 1, window);
          for (int64_t row : s.sr.pre_rows) s.cache.make_room(l, row, s.sr.slot0, T, window);
        }
      }
      // A sharing layer: its queries only; it attends over its source layer's slots, which
      // hold this step's keys and values already (the source comes first).
      dev.rope_kv(s.cache, l, window > 0, q, own_kv ? k : nullptr, own_kv ? v : nullptr, L.q_norm, L.k_norm,
                  c.rms_norm_eps, nH);
    }
    {
      OpTimer timer(&OpProfile::attention);
      const AttentionRule rule{nH, window, c.attn_scale, c.attn_softcap, c.causal};
      dev.attention(s.cache, l, rule, q, att);
    }
    s.parts([&](int64_t m0, int64_t n, Work work) {
      block_output(s, att + m0 * QD, QD, L.o, L.post_attn_norm, h + m0 * H, x + m0 * H, n, work);
    });
    {
      OpTimer timer(&OpProfile::norm);
      dev.rmsnorm(x, L.mlp_norm, h, M, H, c.rms_norm_eps);
    }
    {
      OpTimer timer(&OpProfile::matmul);
      s.parts([&](int64_t m0, int64_t n, Work work) {
        const MatmulTarget gate_up[2] = {{&L.gate, g + m0 * F, F}, {&L.up, u + m0 * F, F}};
        dev.matmul_many(h + m0 * H, n, H, gate_up, 2, work);
      });
    }
    {
      OpTimer timer(&OpProfile::activation);
      dev.geglu(g, u, M * F);
    }
    s.parts([&](int64_t m0, int64_t n, Work work) {
      block_output(s, g + m0 * F, F, L.down, L.post_mlp_norm, h + m0 * H, x + m0 * H, n, work);
    });
    dev.scale(x, M * H, L.layer_scalar);
    if (l + 1 < c.num_layers) s.sink(l + 1, x);
  }
  dev.rmsnorm(x, s.w.final_norm, x_out, M, H, c.rms_norm_eps);
  return x_out;
}

}  // namespace

const Generation kGemma4 = {"gemma4", &gemma4_layer, &gemma4_forward};

}  // namespace gemma
