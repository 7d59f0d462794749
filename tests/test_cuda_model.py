"""Whole models on the GPU (from_pretrained(device="cuda"), csrc/engine/device_cuda.cpp): the
CUDA device against the CPU engine and transformers on the same weights.

The shared forward these run (csrc/engine/model.cpp) is checked on every CI run through the
staged CPU device (tests/test_device.py), with the CUDA device's KV cache layout too; what
is left for a GPU is the kernels and the device's own memory handling. Without a usable GPU
every @gpu test skips with gemma_cpp.cuda_status()'s reason; gpu_check.sh runs this file with
GEMMA_CPP_REQUIRE_GPU=1 (tests/test_cuda.py then fails a run that finds no GPU)."""
import os

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C

from conftest import random_batch, rel_err

STATUS = gemma_cpp.cuda_status()
gpu = pytest.mark.skipif(not STATUS["available"], reason=f"CUDA not available: {STATUS['reason']}")

# head_dim 32: the CUDA attention kernels take multiples of 32.
ARCHS = [("GemmaForCausalLM", "gemma"), ("Gemma2ForCausalLM", "gemma2"), ("Gemma3ForCausalLM", "gemma3")]


def _models(tiny, cls_name, arch, **kw):
    folder, ref = tiny(cls_name, "q32", arch=arch)
    cpu = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, **kw)
    gpu_model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", **kw)
    assert gpu_model.device == "cuda:0" and gpu_model._engine.device_name == "cuda:0"
    return ref, cpu, gpu_model


# ---- everywhere: the engine's device argument ------------------------------------------------

def test_the_engine_device_is_checked():
    rng = np.random.default_rng(0)
    V, H, F, hd = 40, 64, 96, 32
    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=hd, max_position_embeddings=32, rms_norm_eps=1e-6,
               rope_theta=10000.0, embed_scale=8.0, attn_scale=float(np.float32(hd ** -0.5)), causal=True)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    w = {"embed": f(V, H), "final_norm": np.ones(H, np.float32), "layers.0.q": f(2 * hd, H),
         "layers.0.k": f(hd, H), "layers.0.v": f(hd, H), "layers.0.o": f(H, 2 * hd), "layers.0.gate": f(F, H),
         "layers.0.up": f(F, H), "layers.0.down": f(H, F), "layers.0.attn_norm": np.ones(H, np.float32),
         "layers.0.mlp_norm": np.ones(H, np.float32)}
    assert _C.Engine(cfg, w).device_name == _C.Engine(cfg, w, device="cpu").device_name == "cpu"
    for bad in ("gpu", "cuda", "cuda:", "cuda:x", "cuda:-1", "CPU"):
        with pytest.raises(ValueError, match="engine device must be 'cpu' or 'cuda:N'"):
            _C.Engine(cfg, w, device=bad)
    if not STATUS["available"]:
        why = "this build has no CUDA kernels" if not STATUS["built"] else "CUDA is not available: "
        with pytest.raises(RuntimeError, match=why):
            _C.Engine(cfg, w, device="cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            _C.Engine(cfg, w, device=f"cuda:{STATUS['device_count']}")


# ---- on a GPU -----------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("cls_name,arch", ARCHS)
def test_float32_logits_match_the_cpu_engine(tiny, cls_name, arch):
    """The issue's bound: logits within 1e-3 relative of the CPU float32 engine, over a padded
    batch long enough for the sliding windows and two prompt chunks (8 rows x 100 tokens)."""
    ref, cpu, gpu_model = _models(tiny, cls_name, arch, dtype="float32")
    V = ref.config.vocab_size
    for B, L, pad in [(1, 9, None), (2, 30, [0, 7]), (8, 100, [0, 17, 0, 0, 3, 0, 0, 0])]:
        ids, mask = random_batch(B + L, B, L, V, pad_left=pad)
        want = cpu(ids, attention_mask=mask).logits
        got = gpu_model(ids, attention_mask=mask).logits
        assert np.isfinite(got).all()
        assert rel_err(got, want, mask.astype(bool)) < 1e-3, f"{arch} {B}x{L}"


@gpu
@pytest.mark.parametrize("cls_name,arch", ARCHS)
def test_greedy_tokens_match_the_cpu_engine(tiny, cls_name, arch):
    """32 greedy tokens equal the CPU float32 engine's, past the sliding window, padded rows."""
    ref, cpu, gpu_model = _models(tiny, cls_name, arch, dtype="float32")
    ids, mask = random_batch(11, 3, 12, ref.config.vocab_size, pad_left=[0, 4, 1])
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=[])
    np.testing.assert_array_equal(gpu_model.generate(ids, **kw), cpu.generate(ids, **kw))


@gpu
@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4"])
def test_other_formats_match_the_cpu_engine(tiny, weights):
    """bf16 and the integer formats take the same roundings as the CPU (x to bf16; x to int8
    per block) and sum in another order: logits within 1e-3 relative, greedy tokens equal."""
    kw = dict(quantization=weights) if weights.startswith("int") else dict(dtype=weights)
    ref, cpu, gpu_model = _models(tiny, "Gemma3ForCausalLM", "gemma3", **kw)
    ids, mask = random_batch(12, 2, 40, ref.config.vocab_size, pad_left=[0, 5])
    gen = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=[])
    # The CPU's integer kernels at every T (a pinned path keeps AMX, which rounds x to bf16,
    # out of its quantized prefill): the GPU quantizes x to int8 per block everywhere.
    _C._testing.set_quant_matmul_path("scalar")
    try:
        want_logits, want_tokens = cpu(ids, attention_mask=mask).logits, cpu.generate(ids, **gen)
    finally:
        _C._testing.set_quant_matmul_path("auto")
    assert rel_err(gpu_model(ids, attention_mask=mask).logits, want_logits, mask.astype(bool)) < 1e-3
    np.testing.assert_array_equal(gpu_model.generate(ids, **gen), want_tokens)


@gpu
@pytest.mark.parametrize("cls_name,arch", ARCHS)
def test_logits_match_transformers_on_cuda(tiny, torch, cls_name, arch):
    folder, ref = tiny(cls_name, "q32", arch=arch)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", dtype="float32")
    ids, mask = random_batch(13, 2, 25, ref.config.vocab_size, pad_left=[0, 6])
    ref_gpu = ref.to("cuda")
    try:
        with torch.no_grad():
            want = ref_gpu(torch.tensor(ids, device="cuda"), attention_mask=torch.tensor(mask, device="cuda"))
        want = want.logits.float().cpu().numpy()
    finally:
        ref.to("cpu")
    assert rel_err(model(ids, attention_mask=mask).logits, want, mask.astype(bool)) < 1e-3


@gpu
def test_decode_steps_replay_as_cuda_graphs(tiny, monkeypatch):
    """Decode steps run as CUDA graphs (a step of each shape captured, the next ones replayed)
    and give the bits of the same kernels launched one by one (GEMMA_CPP_CUDA_GRAPHS=0)."""
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    ids, mask = random_batch(16, 2, 12, ref.config.vocab_size, pad_left=[0, 3])
    kw = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    graphs = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", dtype="float32")
    monkeypatch.setenv("GEMMA_CPP_CUDA_GRAPHS", "0")
    plain = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", dtype="float32")
    assert os.environ["GEMMA_CPP_CUDA_GRAPHS"] == "0"
    for gen in (dict(do_sample=False), dict(do_sample=True, temperature=1.3, top_k=0, seed=5)):
        a, b = plain.generate(ids, **kw, **gen), graphs.generate(ids, **kw, **gen)
        np.testing.assert_array_equal(b.sequences, a.sequences)
        for x, y in zip(a.logits, b.logits):
            np.testing.assert_array_equal(y, x)
    assert plain._engine.replayed_steps == 0
    assert graphs._engine.replayed_steps >= 2 * 37  # 39 decode steps a call: one runs, one is captured


@gpu
def test_hidden_states_and_heads_run_on_cuda(tiny):
    folder, _ = tiny("GemmaForSequenceClassification", "q32", num_labels=3)
    ids, mask = random_batch(14, 3, 10, 1024, pad_left=[0, 3, 6])
    for cls in (gemma_cpp.GemmaModel, gemma_cpp.GemmaForSequenceClassification):
        cpu = cls.from_pretrained(folder, dtype="float32")
        on_gpu = cls.from_pretrained(folder, dtype="float32", device="cuda")
        if cls is gemma_cpp.GemmaModel:
            a = cpu(ids, attention_mask=mask, output_hidden_states=True)
            b = on_gpu(ids, attention_mask=mask, output_hidden_states=True)
            for x, y in zip(a.hidden_states, b.hidden_states):
                assert rel_err(y, x, mask.astype(bool)) < 1e-3
        else:
            assert rel_err(on_gpu(ids, attention_mask=mask).logits, cpu(ids, attention_mask=mask).logits) < 1e-3


@gpu
def test_torch_outputs_are_cuda_tensors(tiny, torch):
    """return_tensors='pt' on a CUDA model: logits and hidden states stay on the GPU (DLPack,
    no copy), the heads' and generate's outputs are moved there; values as the CPU engine's."""
    folder, ref = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    ids, mask = random_batch(17, 2, 14, ref.config.vocab_size, pad_left=[0, 5])
    cpu = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32", device="cuda")
    got = model(ids, attention_mask=mask, return_tensors="pt").logits
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert rel_err(got.cpu().numpy(), cpu(ids, attention_mask=mask).logits, mask.astype(bool)) < 1e-3
    seq = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_tensors="pt")
    assert seq.device.type == "cuda"
    base = gemma_cpp.GemmaModel.from_pretrained(folder, dtype="float32", device="cuda")
    out = base(ids, attention_mask=mask, output_hidden_states=True, return_tensors="pt")
    assert out.last_hidden_state.device.type == "cuda"
    assert all(h.device.type == "cuda" for h in out.hidden_states)
    del model, base
    assert torch.isfinite(got).all()  # the tensor outlives its model


@gpu
def test_what_cuda_cannot_run_is_refused(tiny):
    folder, _ = tiny("Gemma3ForCausalLM", "q32", arch="gemma3")
    with pytest.raises(ValueError, match="int4m weights do not run on CUDA"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", quantization="int4m")
    with pytest.raises(ValueError, match="int8 KV cache does not run on CUDA"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device="cuda", kv_cache_dtype="int8")
    other, _ = tiny("GemmaForCausalLM", "gqa")  # head_dim 24
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(other, device="cuda")


@gpu
def test_serving_on_cuda(tiny):
    """The scheduler on the GPU: a request alone gives generate()'s tokens; beside others
    (decode rows and a prompt chunk in one step) it gives the same bits as alone."""
    ref, _, model = _models(tiny, "Gemma3ForCausalLM", "gemma3", dtype="float32")
    rng = np.random.default_rng(15)
    prompts = [rng.integers(3, ref.config.vocab_size, size=n).tolist() for n in (3, 9, 17, 30, 41)]
    kw = dict(max_new_tokens=12, eos_token_id=[])
    want = [model.generate(np.array([p]), do_sample=False, **kw)[0, len(p):].tolist() for p in prompts]
    with gemma_cpp.Engine(model, slots=4, slot_ctx=96, chunk_size=8) as engine:
        alone = [engine.submit(p, **kw).result(timeout=120) for p in prompts]
        together = [r.result(timeout=120) for r in [engine.submit(p, **kw) for p in prompts]]
        peak = engine.stats()["peak_rows"]
    assert alone[0] == want[0]  # a one-chunk prompt: generate()'s exact path
    assert peak >= 2
    assert together == alone
