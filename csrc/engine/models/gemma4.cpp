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
// Per-layer input embeddings (ple_dim > 0): after the MLP block,
//   x += ple_post_norm(ple_out(gelu_tanh(ple_gate(x)) * ple_l)), ple_l layer l's part of what
//   ple_inputs() makes for every layer at the step's start.
// The mixture-of-experts block (num_experts > 0): beside the dense MLP, experts() on the
// residual stream; x += post_mlp_norm(moe_dense_norm(dense) + moe_post_norm(experts)).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

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
  if (c.ple_dim > 0) {
    out.push_back(m("ple_gate", c.ple_dim, H, &LayerWeights::ple_gate));
    out.push_back(m("ple_out", H, c.ple_dim, &LayerWeights::ple_out));
    out.push_back(v("ple_post_norm", H, &LayerWeights::ple_post_norm));
  }
  if (c.num_experts > 0) {
    const int64_t E = c.num_experts, I = c.moe_intermediate;
    for (TensorSpec& t : std::vector<TensorSpec>{
             m("router", E, H, &LayerWeights::router), v("router_scale", H, &LayerWeights::router_scale),
             v("expert_scale", E, &LayerWeights::expert_scale),
             m("experts_gate_up", E * 2 * I, H, &LayerWeights::experts_gate_up),
             m("experts_down", E * H, I, &LayerWeights::experts_down), v("moe_pre_norm", H, &LayerWeights::moe_pre_norm),
             v("moe_dense_norm", H, &LayerWeights::moe_dense_norm), v("moe_post_norm", H, &LayerWeights::moe_post_norm)})
      out.push_back(std::move(t));
  }
  out.push_back(v("layer_scalar", 1, &LayerWeights::layer_scalar));
  return out;
}

std::vector<TensorSpec> gemma4_model(const ModelConfig& c) {
  if (c.ple_dim == 0) return {};
  const int64_t LP = c.num_layers * c.ple_dim;
  return {TensorSpec::of("ple_embed", -1, c.ple_vocab, LP, &ModelWeights::ple_embed),
          TensorSpec::of("ple_proj", -1, LP, c.hidden_size, &ModelWeights::ple_proj),
          TensorSpec::of("ple_norm", -1, c.ple_dim, 0, &ModelWeights::ple_norm)};
}

// Rows [r0, r0 + n) of a matrix, in place: for a quantized one, a run of whole 16-row groups
// (its arrays keep one row's bytes, scales and mins per row; only the order inside a group
// differs), which the loaders guarantee for the experts (their rows per expert a multiple of 16).
Weight row_slice(const Weight& w, int64_t r0, int64_t n) {
  Weight s = w;
  s.rows = n;
  if (!w.quantized()) {
    s.data = static_cast<const char*>(w.data) + r0 * w.ld * format_info(w.dtype).block_bytes;
    return s;
  }
  if (r0 % kQGroup || n % kQGroup)
    throw std::invalid_argument("Gemma 4's quantized experts need a multiple of 16 rows per expert");
  s.data = static_cast<const char*>(w.data) + r0 * w.ld;
  const int64_t per_row = w.cols / kQBlock;  // scales (and mins) per row
  if (w.scales) s.scales = w.scales + r0 * per_row;
  if (w.mins) s.mins = w.mins + r0 * per_row;
  return s;
}

// The experts' part of a mixture-of-experts layer into y [M, hidden] (zeroed here), from the
// residual stream x (transformers' Gemma4TextRouter and Gemma4TextExperts): the router's
// probabilities softmax(router(rmsnorm(x) * router_scale * H^-0.5)), each token's top k
// renormalised and times the expert's scale; each expert runs once per step on the tokens that
// chose it (gathered, the decode tokens and the prompt chunk's apart, each with its kernels),
// and a token sums its experts' outputs, each times its weight, in expert order.
void experts(StepContext& s, const LayerWeights& L, const float* x, float* h, float* y) {
  const ModelConfig& c = s.c;
  Device& dev = s.dev;
  Workspace& ws = s.ws;
  const int64_t H = c.hidden_size, E = c.num_experts, K = c.top_k_experts, I = c.moe_intermediate, M = s.M;
  float* logits = s.buffer(ws.moe_logits, M * E);
  dev.rmsnorm(x, L.router_scale, h, M, H, c.rms_norm_eps);
  dev.scale(h, M * H, nullptr, c.router_input_scale);
  s.parts([&](int64_t m0, int64_t n, Work work) { dev.matmul(h + m0 * H, n, H, L.router, logits + m0 * E, false, work); });
  std::vector<float>& host = ws.moe_host;
  host.resize(static_cast<size_t>(M * E + E));
  dev.download(host.data(), logits, static_cast<size_t>(M * E) * sizeof(float));
  dev.download(host.data() + M * E, L.expert_scale, static_cast<size_t>(E) * sizeof(float));
  const float* expert_scale = host.data() + M * E;
  // Per token its K experts and weights; per expert its tokens in token order.
  auto& chosen = ws.moe_chosen;  // kept in the workspace: a decode step allocates nothing here
  chosen.resize(static_cast<size_t>(E));
  for (auto& tokens : chosen) tokens.clear();
  std::vector<int32_t>& order = ws.moe_order;
  order.resize(static_cast<size_t>(E));
  for (int64_t m = 0; m < M; ++m) {
    float* p = &host[m * E];
    float mx = p[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, p[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float top = 0.f;
    for (int64_t j = 0; j < K; ++j) top += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = order[j];
      chosen[e].push_back({m, p[e] / top * expert_scale[e]});
    }
  }
  float* in = s.buffer(ws.moe_in, M * H);
  dev.rmsnorm(x, L.moe_pre_norm, in, M, H, c.rms_norm_eps);
  dev.fill(y, 0, static_cast<size_t>(M * H) * sizeof(float));
  float* rows = s.buffer(ws.moe_rows, M * H);
  float* g = s.buffer(ws.moe_g, M * I);
  float* u = s.buffer(ws.moe_u, M * I);
  float* out = s.buffer(ws.moe_out, M * H);
  for (int64_t e = 0; e < E; ++e) {
    const auto& toks = chosen[e];
    if (toks.empty()) continue;
    const Weight gate = row_slice(L.experts_gate_up, 2 * e * I, I), up = row_slice(L.experts_gate_up, 2 * e * I + I, I);
    const Weight down = row_slice(L.experts_down, e * H, H);
    // Decode tokens first, then the prompt chunk's: each kind with its own kernels.
    for (const bool decode : {true, false}) {
      int64_t n = 0;
      for (const auto& [m, w] : toks)
        if ((m < s.Md) == decode) dev.copy(rows + n++ * H, in + m * H, static_cast<size_t>(H) * sizeof(float));
      if (n == 0) continue;
      const Work work = decode ? Work::Decode : Work::Prefill;
      const MatmulTarget gu[2] = {{&gate, g, I}, {&up, u, I}};
      dev.matmul_many(rows, n, H, gu, 2, work);
      dev.geglu(g, u, n * I);
      dev.matmul(g, n, I, down, out, false, work);
      int64_t i = 0;
      for (const auto& [m, w] : toks) {
        if ((m < s.Md) != decode) continue;
        dev.scale(out + i * H, H, nullptr, w);
        dev.add(y + m * H, out + i * H, H);
        ++i;
      }
    }
  }
}

// Every layer's per-layer input [M, layers x P] into ple (transformers' order of ops, for all
// layers at once as it computes them): (rmsnorm_P(x0 . proj^T * proj_scale) + table[ids] *
// embed_scale) * input_scale, x0 the step's scaled embeddings, the norm over each layer's P
// values. The table and the projection are read whole (either may be quantized: a row lookup and
// a matmul); tok [M, layers x P] is scratch.
void ple_inputs(StepContext& s, const float* x0, float* tok, float* ple) {
  const ModelConfig& c = s.c;
  const int64_t LP = c.num_layers * c.ple_dim, H = c.hidden_size, M = s.M;
  s.dev.embed(s.w.ple_embed, c.ple_embed_scale, tok);
  {
    OpTimer timer(&OpProfile::matmul);
    s.parts([&](int64_t m0, int64_t n, Work work) {
      s.dev.matmul(x0 + m0 * H, n, H, s.w.ple_proj, ple + m0 * LP, false, work);
    });
  }
  s.dev.scale(ple, M * LP, nullptr, c.ple_proj_scale);
  s.dev.rmsnorm(ple, s.w.ple_norm, ple, M * c.num_layers, c.ple_dim, c.rms_norm_eps);
  s.dev.add(ple, tok, M * LP);
  s.dev.scale(ple, M * LP, nullptr, c.ple_input_scale);
}

const float* gemma4_forward(StepContext& s) {
  const ModelConfig& c = s.c;
  const int64_t H = c.hidden_size, nH = c.num_heads, M = s.M;
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

  const int64_t P = c.ple_dim, LP = c.num_layers * P;
  float* ple = P ? s.buffer(ws.ple_all, M * LP) : nullptr;
  float* ctx = P ? s.buffer(ws.ple_ctx, M * P) : nullptr;
  float* gate = P ? s.buffer(ws.ple_gate, M * P) : nullptr;

  dev.embed(s.w.embed, c.embed_scale, x);
  if (P) ple_inputs(s, x, s.buffer(ws.ple_tok, M * LP), ple);
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
        make_room(s, l, window);
      }
      // A sharing layer: its queries only; it attends over its source layer's slots, which
      // hold this step's keys and values already (the source comes first).
      dev.rope_kv(s.cache, l, window > 0, q, own_kv ? k : nullptr, own_kv ? v : nullptr, L.q_norm, L.k_norm,
                  c.rms_norm_eps, nH);
    }
    attend(s, l, q, att, QD, L.o, L.post_attn_norm, h, x);
    gated_mlp_in(s, x, L.mlp_norm, L.gate, L.up, F, h, g, u);
    if (c.num_experts == 0) {
      s.parts([&](int64_t m0, int64_t n, Work work) {
        block_output(s, g + m0 * F, F, L.down, L.post_mlp_norm, h + m0 * H, x + m0 * H, n, work);
      });
    } else {  // x += post_mlp_norm(moe_dense_norm(down(...)) + moe_post_norm(experts(x)))
      float* y = s.buffer(ws.moe_y, M * H);
      s.parts([&](int64_t m0, int64_t n, Work work) { dev.matmul(g + m0 * F, n, F, L.down, h + m0 * H, false, work); });
      dev.rmsnorm(h, L.moe_dense_norm, h, M, H, c.rms_norm_eps);
      experts(s, L, x, s.buffer(ws.moe_out, M * H), y);
      dev.rmsnorm(y, L.moe_post_norm, y, M, H, c.rms_norm_eps);
      dev.add(h, y, M * H);
      dev.rmsnorm(h, L.post_mlp_norm, h, M, H, c.rms_norm_eps);
      dev.add(x, h, M * H);
    }
    if (P) {  // x += ple_post_norm(ple_out(gelu_tanh(ple_gate(x)) * the layer's per-layer input))
      for (int64_t m = 0; m < M; ++m)  // the layer's P values of each token
        dev.copy(ctx + m * P, ple + m * LP + l * P, static_cast<size_t>(P) * sizeof(float));
      {
        OpTimer timer(&OpProfile::matmul);
        s.parts([&](int64_t m0, int64_t n, Work work) {
          dev.matmul(x + m0 * H, n, H, L.ple_gate, gate + m0 * P, false, work);
        });
      }
      dev.geglu(gate, ctx, M * P);
      s.parts([&](int64_t m0, int64_t n, Work work) {
        block_output(s, gate + m0 * P, P, L.ple_out, L.ple_post_norm, h + m0 * H, x + m0 * H, n, work);
      });
    }
    dev.scale(x, M * H, L.layer_scalar);
    if (l + 1 < c.num_layers) s.sink(l + 1, x);
  }
  dev.rmsnorm(x, s.w.final_norm, x_out, M, H, c.rms_norm_eps);
  return x_out;
}

}  // namespace

const Generation kGemma4 = {"gemma4", &gemma4_layer, &gemma4_model, &gemma4_forward};

}  // namespace gemma
