"""Models from GGUF files: tiny random Gemma 1 / 2 / 3 checkpoints written as GGUF with the
`gguf` package (llama.cpp's tensor names, norms stored as 1 + w) load to the same logits as
the Hugging Face folder they came from; Q8_0, Q4_0, Q4_1 and Q5_0 tensors import without loss."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gemma_cpp
from gemma_cpp import quant
from gemma_cpp.loading import gguf as gguf_model
from conftest import rel_err, random_batch

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType

# transformers name (under model.layers.N.) -> llama.cpp name (under blk.N.), per generation.
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
ARCH = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
        "gemma3": ("Gemma3ForCausalLM", "gemma3")}


def random_k_blocks(rows, cols, qtype, seed=0):
    """Random Q4_K / Q6_K bytes with small finite fp16 scales (gguf cannot quantize to K types)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = (rng.uniform(1e-3, 1e-2, size=(rows, cols // block_elems))).astype(np.float16).view(np.uint8)
    scale = scale.reshape(rows, cols // block_elems, 2)
    if qtype == QT.Q4_K:  # d, dmin first
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_gguf(path, ref, arch, qtype=None, vocab_names=None):
    """ref (a transformers model) as a GGUF file as llama.cpp's converter writes it; matrices
    quantized to qtype when given. qtype may also be a function (gguf name, array) -> (raw
    bytes, type), for the matrices whose rows hold whole super-blocks of 256."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    p = arch + "."
    w.add_uint32(p + "context_length", c.max_position_embeddings)
    w.add_uint32(p + "embedding_length", c.hidden_size)
    w.add_uint32(p + "block_count", c.num_hidden_layers)
    w.add_uint32(p + "feed_forward_length", c.intermediate_size)
    w.add_uint32(p + "attention.head_count", c.num_attention_heads)
    w.add_uint32(p + "attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32(p + "attention.key_length", c.head_dim)
    w.add_uint32(p + "attention.value_length", c.head_dim)
    w.add_float32(p + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if arch == "gemma3":
        w.add_float32(p + "rope.freq_base", c.rope_parameters["full_attention"]["rope_theta"])
    else:
        w.add_float32(p + "rope.freq_base", c.rope_parameters["rope_theta"])
    if arch != "gemma":
        w.add_uint32(p + "attention.sliding_window", c.sliding_window)
    if arch == "gemma2":
        w.add_float32(p + "attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32(p + "final_logit_softcapping", c.final_logit_softcapping)
    if vocab_names is not None:
        w.add_array("tokenizer.ggml.tokens", vocab_names)
    for name, t in ref.state_dict().items():
        a = t.detach().float().numpy()
        base = name[len("model."):] if name.startswith("model.") else name
        if base == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif base == "norm.weight":
            gname = "output_norm.weight"
        elif base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            rest = rest[: -len(".weight")]
            if rest == "post_attention_layernorm":
                short = "ffn_norm" if arch == "gemma" else "post_attention_norm"
            else:
                short = HF_TO_GGUF[rest]
            gname = f"blk.{i}.{short}.weight"
        else:
            continue  # lm_head tied
        if gname.endswith("norm.weight"):
            w.add_tensor(gname, a + np.float32(1))  # llama.cpp stores 1 + w
        elif callable(qtype) and a.ndim == 2 and a.shape[1] % 256 == 0:
            raw, qt = qtype(gname, a)
            w.add_tensor(gname, raw, raw_dtype=qt)
        elif callable(qtype):
            w.add_tensor(gname, a)
        elif qtype in (QT.Q4_K, QT.Q6_K) and a.ndim == 2 and a.shape[1] % 256 == 0:
            w.add_tensor(gname, random_k_blocks(*a.shape, qtype), raw_dtype=qtype)
        elif qtype is not None and a.ndim == 2 and a.shape[1] % 32 == 0 and qtype not in (QT.Q4_K, QT.Q6_K):
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("arch", list(ARCH))
def test_float_gguf_matches_the_hf_folder(tiny, tmp_path, arch):
    cls_name, garch = ARCH[arch]
    folder, ref = tiny(cls_name, "q32", arch=arch)
    path = write_gguf(tmp_path / "m.gguf", ref, garch)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    assert type(model.config).__name__ == {"gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                                            "gemma3": "Gemma3TextConfig"}[arch]
    window = getattr(ref.config, "sliding_window", 8)
    ids, _ = random_batch(1, 2, 3 * window + 2, ref.config.vocab_size)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    # The GGUF loader supplies what the file does not record; a tiny config differs from the
    # released models there, so patch those back before comparing (query_pre_attn_scalar,
    # the local RoPE base and the layer pattern are the released models' values).
    if arch == "gemma":
        assert rel_err(model(ids).logits, theirs) <= 1e-4
    else:
        cfg = model.config
        assert cfg.sliding_window == ref.config.sliding_window
        assert cfg.query_pre_attn_scalar == ref.config.head_dim
        if arch == "gemma2":
            assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (
                ref.config.attn_logit_softcapping, ref.config.final_logit_softcapping)
        patched = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None, config=type(cfg)(
            **{**cfg.to_dict(), "query_pre_attn_scalar": ref.config.query_pre_attn_scalar,
               "layer_types": ref.config.layer_types, "rope_parameters": ref.config.rope_parameters}))
        assert rel_err(patched(ids).logits, theirs) <= 1e-4


@pytest.mark.parametrize("qtype, policy, fmt", [
    (QT.Q8_0, "int8", "int8"), (QT.Q4_0, "int4", "int4"), (QT.Q4_0, "int8", "int8"), (QT.Q5_0, "int8", "int8"),
    (QT.Q8_0, "auto", "int8"), (QT.Q4_0, "auto", "int4"), (QT.Q4_1, "auto", "int4m"), (QT.Q4_1, "int4m", "int4m")])
def test_block_formats_import_without_loss(tiny, tmp_path, qtype, policy, fmt):
    """The engine's weights after import hold exactly the values gguf dequantizes to."""
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma3", qtype=qtype)
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(path) as g:
        weights = gguf_model.load(g, None, policy).weights
        for gname, ename in [("token_embd.weight", "embed"), ("blk.0.attn_q.weight", "layers.0.q"),
                             ("blk.1.ffn_down.weight", "layers.1.down")]:
            info = g.tensors[gname]
            want = gguf.quants.dequantize(np.asarray(g.raw(gname)).reshape(info.shape[0], -1), qtype)
            got = weights[ename]
            assert info.ggml_type == qtype and got[0] == fmt
            np.testing.assert_array_equal(quant.dequantize(got, info.shape[1]), want)
            # and the engine's own dequantization (the embedding lookup) agrees
            np.testing.assert_array_equal(gemma_cpp._C._testing.dequantize(got, info.shape[1]), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_q4_1_is_requantized_under_an_explicit_format(tiny, tmp_path, fmt):
    """Q4_1 under an int8 / int4 policy: read exactly, then quantized to that format."""
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma3", qtype=QT.Q4_1)
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(path) as g:
        weights = gguf_model.load(g, None, fmt).weights
        got = weights["layers.0.q"]
        want = quant.quantize(g.dequantize("blk.0.attn_q.weight"), fmt)
    assert got[0] == fmt and len(got) == 3
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_q4_1_model_runs_as_int4m(tiny, tmp_path):
    """A Q4_1 GGUF under auto: every matrix int4m; its logits are those of the same file read
    as float32 (the same weight values) up to the int8 rounding of the activations (measured
    worst-row cosine 0.99998); greedy generation completes; and a convert round trip keeps int4m,
    bit for bit."""
    from gemma_cpp.loading import engine_format
    from gemma_cpp.formats.safetensors import SafetensorsFile

    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma3", qtype=QT.Q4_1)
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    assert m.quantization == dict.fromkeys(("embed", "attention", "mlp"), "int4m")
    f32 = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    ids, _ = random_batch(5, 2, 20, ref.config.vocab_size)
    a, b = f32(ids).logits.astype(np.float64), m(ids).logits.astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999
    out = m.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (2, 32)

    conv = engine_format.save(path, str(tmp_path / "conv"), progress=lambda *a: None)
    f = SafetensorsFile(f"{conv}/model.safetensors")
    assert "layers.0.q.mins" in set(f.names()) and "embed.mins" in set(f.names())
    loaded = engine_format.load(conv)
    weights, policy = loaded.weights, loaded.quantization
    assert policy == "auto" and weights["layers.0.q"][0] == "int4m" and len(weights["layers.0.q"]) == 4
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(path) as g:
        direct = gguf_model.load(g, None, "auto").weights
        for name, v in direct.items():
            if isinstance(v, tuple):
                assert v[0] == "int4m"
                for x, y in zip(v[1:], weights[name][1:]):
                    np.testing.assert_array_equal(x, y)
    converted = gemma_cpp.GemmaForCausalLM.from_pretrained(conv)
    np.testing.assert_array_equal(converted(ids).logits, m(ids).logits)
    np.testing.assert_array_equal(converted.generate(ids, max_new_tokens=12, eos_token_id=[]), out)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K])
def test_auto_policy_by_tensor_type(tiny, tmp_path, qtype):
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma3", qtype=qtype)
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(path) as g:
        types = {n: t.type_name for n, t in g.tensors.items()}
        loaded = gguf_model.load(g, None, "auto")
        weights, used = loaded.weights, loaded.quantization
        assert used == "auto"
        # A K type (ffn_down: rows of 256, one super-block) keeps its type and its exact
        # values; F32 tensors (rows of 128 cannot be Q4_K) stay float.
        for gname, ename in [("blk.0.attn_q.weight", "layers.0.q"), ("blk.0.ffn_down.weight", "layers.0.down")]:
            if types[gname] in ("Q4_K", "Q6_K"):
                assert weights[ename][0] == types[gname].lower()
                want = g.dequantize(gname)
                np.testing.assert_array_equal(quant.dequantize(weights[ename], want.shape[1]), want)
            else:
                assert isinstance(weights[ename], np.ndarray) and weights[ename].dtype == np.float32


def test_unsupported_architecture_and_bad_files(tmp_path, tiny):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'llama'"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(str(tmp_path / "llama.gguf"))
    # A tensor missing, and a truncated file: clear errors naming the file.
    folder, ref = tiny("GemmaForCausalLM", "q32")
    path = write_gguf(tmp_path / "g.gguf", ref, "gemma")
    data = open(path, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(str(tmp_path / "cut.gguf"))
    with pytest.raises(ValueError, match="unknown quantization"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization="int3")
    with pytest.raises(FileNotFoundError):
        gemma_cpp.GemmaForCausalLM.from_pretrained(str(tmp_path), gguf_file="absent.gguf")
    # The folder + gguf_file spelling transformers uses.
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", quantization=None)
    ids, _ = random_batch(3, 1, 9, ref.config.vocab_size)
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(torch.tensor(ids)).logits.numpy()) <= 1e-4


def test_convert_a_gguf_file_to_our_format(tiny, tmp_path):
    """gemma-cpp convert model.gguf out: the same weights and logits, loaded by mmap; an
    existing output is refused."""
    from gemma_cpp.loading import engine_format

    folder, ref = tiny("Gemma2ForCausalLM", "q32", arch="gemma2")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma2", qtype=QT.Q8_0)
    out = engine_format.save(path, str(tmp_path / "conv"), progress=lambda *a: None)
    assert engine_format.is_engine_checkpoint(out)
    direct = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    converted = gemma_cpp.GemmaForCausalLM.from_pretrained(out)
    assert converted.quantization == direct.quantization == dict.fromkeys(("embed", "attention", "mlp"), "int8")
    assert type(converted.config).__name__ == "Gemma2Config"
    ids, _ = random_batch(4, 2, 20, ref.config.vocab_size)
    np.testing.assert_array_equal(converted(ids).logits, direct(ids).logits)
    with pytest.raises(FileExistsError):
        engine_format.save(path, out, progress=lambda *a: None)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [53, 128])
def test_requantizing_in_bands_of_rows_equals_the_whole_tensor(tmp_path, monkeypatch, fmt, rows):
    """A large tensor is dequantized and quantized a band of rows at a time (bounded memory):
    byte for byte what the whole tensor gives, interleaved 16-row groups and the plain tail
    rows of the last band included (53 rows: bands 32 + 21, a group and 5 plain rows)."""
    from gemma_cpp.formats.gguf import GGUFFile

    path = str(tmp_path / "one.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_tensor("t.weight", random_k_blocks(rows, 512, QT.Q6_K), raw_dtype=QT.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as g:
        info = g.tensors["t.weight"]
        assert info.type_name == "Q6_K" and tuple(info.shape) == (rows, 512)
        whole = gguf_model._requantize(g, "t.weight", info, fmt)
        monkeypatch.setattr(gguf_model, "_CHUNK_ELEMENTS", 40 * 512 + 5)  # bands of 32 rows (2 groups)
        banded = gguf_model._requantize(g, "t.weight", info, fmt)
    assert whole[0] == banded[0] == fmt
    np.testing.assert_array_equal(whole[1], banded[1])
    np.testing.assert_array_equal(whole[2], banded[2])
