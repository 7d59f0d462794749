"""Gemma 4 from GGUF files written as llama.cpp's converter writes them (architecture `gemma4`,
docs/design/gemma4.md sec. 3): the tiny E2B-, 31B- and 26B-A4B-shaped checkpoints of
test_gemma4.py, written with the `gguf` package (norms stored as w, the full layers' proportional
RoPE as the rope_freqs tensor, KV heads and MLP widths per layer, the experts' gate and up
projections stacked in one tensor or two), load to the config and the logits of the Hugging Face
folder they came from, and so to transformers' logits."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import gemma_cpp
from conftest import random_batch, rel_err
from test_gemma4 import F32_TOL, build

QT = gguf.GGMLQuantizationType

# transformers name (under model.) -> llama.cpp's (G = gguf's tensor_mapping for MODEL_ARCH.GEMMA4).
MODEL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
               "per_layer_model_projection.weight": "per_layer_model_proj.weight",
               "per_layer_projection_norm.weight": "per_layer_proj_norm.weight"}
LAYER_NAMES = {  # under model.layers.N. -> under blk.N.
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "layer_scalar": "layer_output_scale.weight",
    "per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight", "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
}


def write_gemma4_gguf(path, ref, qtype=None, split_experts=False, tokens=None):
    """ref (a transformers Gemma4ForCausalLM) as llama.cpp's convert_hf_to_gguf.py writes it:
    its metadata keys, per-layer arrays where layers differ, and tensors; every matrix with rows
    of a multiple of 32 quantized to qtype when given (the router stays F32, as the converter
    keeps it). The shapes are read from the tensors, the rest from ref's config."""
    c, sd = ref.config, {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    L, p = c.num_hidden_layers, "gemma4."
    sliding = [t == "sliding_attention" for t in c.layer_types]
    head = {s: sd[f"model.layers.{sliding.index(s)}.self_attn.q_norm.weight"].shape[0] for s in (True, False)}
    kv = {s: sd[f"model.layers.{sliding.index(s)}.self_attn.k_proj.weight"].shape[0] // head[s]
          for s in (True, False)}
    ffn = [sd[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0] for i in range(L)]
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_uint32(p + "context_length", c.max_position_embeddings)
    w.add_uint32(p + "embedding_length", c.hidden_size)
    w.add_uint32(p + "block_count", L)
    if len(set(ffn)) == 1:
        w.add_uint32(p + "feed_forward_length", ffn[0])
    else:
        w.add_array(p + "feed_forward_length", ffn)
    w.add_uint32(p + "attention.head_count", c.num_attention_heads)
    w.add_array(p + "attention.head_count_kv", [kv[s] for s in sliding])
    w.add_uint32(p + "attention.key_length", head[False])
    w.add_uint32(p + "attention.value_length", head[False])
    w.add_uint32(p + "attention.key_length_swa", head[True])
    w.add_uint32(p + "attention.value_length_swa", head[True])
    w.add_float32(p + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32(p + "attention.sliding_window", c.sliding_window)
    w.add_array(p + "attention.sliding_window_pattern", sliding)
    w.add_uint32(p + "attention.shared_kv_layers", c.num_kv_shared_layers)
    w.add_uint32(p + "embedding_length_per_layer_input", c.hidden_size_per_layer_input or 0)
    rope = c.rope_parameters
    w.add_float32(p + "rope.freq_base", rope["full_attention"]["rope_theta"])
    w.add_float32(p + "rope.freq_base_swa", rope["sliding_attention"]["rope_theta"])
    w.add_uint32(p + "rope.dimension_count", head[False])
    w.add_uint32(p + "rope.dimension_count_swa", head[True])
    if c.final_logit_softcapping:
        w.add_float32(p + "final_logit_softcapping", c.final_logit_softcapping)
    if c.enable_moe_block:
        w.add_uint32(p + "expert_count", c.num_experts)
        w.add_uint32(p + "expert_used_count", c.top_k_experts)
        w.add_uint32(p + "expert_feed_forward_length", c.moe_intermediate_size)
    if tokens is not None:
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    # Proportional RoPE: the pairs that rotate get 1, the others 1e30 (an angle of about 0).
    rotating = int(head[False] * rope["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotating + [1e30] * (head[False] // 2 - rotating), np.float32))

    def add(gname, a):
        if gname.endswith(("norm.weight", ".scale", "layer_output_scale.weight", "ffn_gate_inp.weight")) or a.ndim < 2:
            w.add_tensor(gname, a.astype(np.float32))
        elif qtype is not None and a.shape[-1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)

    for name, a in sd.items():
        if name == "lm_head.weight":
            assert c.tie_word_embeddings  # the converter writes output.weight only when not tied
            continue
        base = name[len("model."):]
        if base in MODEL_NAMES:
            add(MODEL_NAMES[base], a)
            continue
        _, i, rest = base.split(".", 2)
        gname = f"blk.{i}.{LAYER_NAMES[rest]}"  # a KeyError names a tensor this writer does not know
        if rest == "experts.gate_up_proj" and split_experts:
            I = a.shape[1] // 2
            add(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :I]))
            add(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(a[:, I:]))
        else:
            add(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module", params=["e2b", "31b", "26b_a4b"])
def shaped(request, tmp_path_factory):
    """The three shapes; the experts 32 wide, so that a Q8_0 file holds them quantized."""
    folder = str(tmp_path_factory.mktemp(f"g4-{request.param}"))
    extra = dict(moe_intermediate_size=32) if request.param == "26b_a4b" else {}
    return request.param, folder, build(folder, request.param, seed=3, **extra)


def test_a_float_gguf_is_the_hf_folder(shaped, tmp_path):
    """The config read from the file's metadata is the folder's, field by field that the
    engine reads, and the logits are the same bits (float32 weights both ways), so within
    1e-4 of transformers'."""
    from gemma_cpp.loading.layout import engine_config

    shape, folder, ref = shaped
    path = write_gemma4_gguf(tmp_path / "m.gguf", ref)
    ours = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    hf = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    assert type(ours.config).__name__ == "Gemma4TextConfig"
    mine, theirs = engine_config(ours.config, "float32"), engine_config(hf.config, "float32")
    fields = [f for f in dir(theirs) if not f.startswith("_") and not callable(getattr(theirs, f))]
    assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    window, V = ref.config.sliding_window, ref.config.vocab_size
    ids, mask = random_batch(21, 2, 3 * window + 2, V, pad_left=[0, 3])
    got = ours(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(got, hf(ids, attention_mask=mask).logits)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel_err(got, want, mask.astype(bool)) <= F32_TOL


def test_q8_0_keeps_its_values(shaped, tmp_path):
    """A Q8_0 file loads as int8 without a re-quantization warning, with the file's values (as
    the gguf package dequantizes them): the per-layer input projection and gates, and the
    experts' stacked gate / up and down (each expert's rows read in place);
    greedy next tokens agree with the float32 folder's on most positions (measured: 0.93 e2b,
    0.90 31b, where our own int8 of the folder agrees 0.925 and 0.90: these tiny random models
    have small margins; a broken kernel agrees 1 time in 128)."""
    import warnings

    from gemma_cpp import quant
    from gemma_cpp.loading import gguf as gguf_model

    shape, folder, ref = shaped
    path = write_gemma4_gguf(tmp_path / "q8.gguf", ref, qtype=QT.Q8_0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = gguf_model.load(path)
        q = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    assert q.quantization["attention"] == "int8" and q.quantization["embed"] == "int8"
    short = {"per_layer_model_proj": "ple_proj", "inp_gate": "ple_gate", "ffn_gate_up_exps": "experts_gate_up",
             "ffn_down_exps": "experts_down"}
    checked = []
    for t in gguf.GGUFReader(path).tensors:
        kind = t.name.split(".")[-2]
        if kind not in short or t.tensor_type != QT.Q8_0:
            continue
        engine = short[kind] if kind == "per_layer_model_proj" else f"layers.{t.name.split('.')[1]}.{short[kind]}"
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        want = want.reshape(-1, want.shape[-1])
        got = loaded.weights[engine]
        assert got[0] == "int8"
        np.testing.assert_array_equal(quant.dequantize(got, want.shape[1]), want)
        checked.append(kind)
    # e2b: the projection and 6 gates; 26b_a4b: 4 layers' gate_up and down.
    assert len(checked) == {"e2b": 1 + 6, "31b": 0, "26b_a4b": 8}[shape]
    if "per_layer_inputs" in q.quantization:  # the table (rows of 48) and the output projections (of 8) F32
        assert q.quantization["per_layer_inputs"] == {"float32": 1 + 6, "int8": 1 + 6}
    if "experts" in q.quantization:  # gate_up and down int8, the router float
        assert q.quantization["experts"] == {"float32": 4, "int8": 8}
    ids, _ = random_batch(22, 4, 40, ref.config.vocab_size)
    f32 = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")(ids).logits.argmax(-1)
    agree = float((q(ids).logits.argmax(-1) == f32).mean())
    print(f"{shape}: Q8_0 top-1 agreement with float32 {agree:.3f}")
    assert agree >= 0.85, agree


def test_experts_in_two_tensors_and_the_stop_tokens(tmp_path):
    """The experts' gate and up projections as llama.cpp's separate ffn_gate_exps / ffn_up_exps
    tensors load to the same logits as the stacked ffn_gate_up_exps; experts the engine cannot
    read quantized in place load as float from a Q8_0 file; a vocabulary with Gemma 4's
    <turn|> and <|tool_response>  makes them stop tokens beside <eos> (transformers' GGUF loader
    gives Gemma 4 the eos ids 1, 106, 50)."""
    folder = str(tmp_path / "moe")
    ref = build(folder, "26b_a4b", seed=4)
    tokens = [f"t{i}" for i in range(ref.config.vocab_size)]
    tokens[:4] = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens[50], tokens[106] = "<|tool_response>", "<turn|>"
    fused = gemma_cpp.GemmaForCausalLM.from_pretrained(write_gemma4_gguf(tmp_path / "a.gguf", ref, tokens=tokens))
    split = gemma_cpp.GemmaForCausalLM.from_pretrained(write_gemma4_gguf(tmp_path / "b.gguf", ref,
                                                                         split_experts=True))
    ids, _ = random_batch(23, 2, 20, ref.config.vocab_size)
    np.testing.assert_array_equal(split(ids).logits, fused(ids).logits)
    assert fused.generation_config.eos_token_id == [1, 106, 50]
    # 24 rows per expert's gate and up: not whole 16-row groups, so a Q8_0 file's experts load as
    # float with their values ("auto"), and asking for int8 experts is an error naming why.
    from gemma_cpp.loading import gguf as gguf_model

    q8 = write_gemma4_gguf(tmp_path / "q8.gguf", ref, qtype=QT.Q8_0)
    t = next(t for t in gguf.GGUFReader(q8).tensors if t.name == "blk.0.ffn_gate_up_exps.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    got = gguf_model.load(q8).weights["layers.0.experts_gate_up"]
    assert t.tensor_type == QT.Q8_0 and isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want.reshape(-1, want.shape[-1]))
    with pytest.raises(ValueError, match="reads each expert's rows of it in place, 24 at a time"):
        gguf_model.load(q8, quantization={"experts": "int8"})


def test_metadata_that_contradicts_itself_is_refused(tmp_path):
    """A feed_forward_length array that is neither one width nor doubled on the shared layers,
    and a rope_freqs tensor that is not proportional RoPE's, are errors naming the key."""
    from gemma_cpp.formats.gguf import GGUFFile
    from gemma_cpp.formats.gguf_config import config_dict

    folder = str(tmp_path / "e2b")
    ref = build(folder, "e2b", hidden_size_per_layer_input=0)
    good = write_gemma4_gguf(tmp_path / "good.gguf", ref)
    with GGUFFile(good) as g:
        assert config_dict(g)["use_double_wide_mlp"] is True
        g.metadata["gemma4.feed_forward_length"] = np.array([96, 96, 96, 192, 96, 192], np.uint32)
        with pytest.raises(ValueError, match="feed_forward_length .* neither one width nor one doubled"):
            config_dict(g)
        real = g.dequantize
        g.dequantize = lambda name: (np.array([1.0, 3.0] + [1e30] * 14, np.float32) if name == "rope_freqs.weight"
                                     else real(name))
        g.metadata["gemma4.feed_forward_length"] = np.uint32(96)
        with pytest.raises(ValueError, match="rope_freqs.weight is not proportional RoPE's"):
            config_dict(g)
