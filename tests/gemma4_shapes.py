"""Tiny Gemma 4 text configs shaped like the released models, as transformers 5.25's
Gemma4TextConfig takes them: each exercises what its namesake adds. A sliding window of 8 (test
sequences longer than it), the full layers' head size (32) different from the sliding ones' (16),
proportional RoPE on the full layers (4 of 16 pairs rotate)."""

ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
TYPES6 = ["sliding_attention", "sliding_attention", "full_attention",
          "sliding_attention", "sliding_attention", "full_attention"]
COMMON = dict(vocab_size=128, hidden_size=64, head_dim=16, global_head_dim=32, num_attention_heads=4,
              sliding_window=8, final_logit_softcapping=30.0, rope_parameters=ROPE, max_position_embeddings=256,
              tie_word_embeddings=True)

SHAPES = {
    # E2B: per-layer embeddings, the last 3 of 6 layers reuse keys and values (layers 3 and 4 those of
    # layer 1, layer 5 those of layer 2) with a double-wide MLP, one KV head.
    "e2b": dict(COMMON, vocab_size_per_layer_input=128, intermediate_size=96, num_hidden_layers=6,
                num_key_value_heads=1, layer_types=TYPES6, num_kv_shared_layers=3, use_double_wide_mlp=True,
                hidden_size_per_layer_input=8),
    # 31B: full layers take their values from their keys (no v_proj), with one KV head of 32 against
    # the sliding layers' two of 16; no per-layer embeddings.
    "31b": dict(COMMON, intermediate_size=96, num_hidden_layers=6, num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=TYPES6,
                hidden_size_per_layer_input=0),
    # 26B-A4B: a mixture of 8 experts (top 2) beside the dense MLP in every layer, and k_eq_v.
    "26b_a4b": dict(COMMON, intermediate_size=48, num_hidden_layers=4, num_key_value_heads=2,
                    num_global_key_value_heads=1, attention_k_eq_v=True,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
                    moe_intermediate_size=24),
}
