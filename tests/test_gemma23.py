"""Gemma 2 and Gemma 3 (text) against transformers' eager float32 models on random tiny
checkpoints whose sequences are longer than the sliding window: sandwich norms,
query_pre_attn_scalar, soft-capping (Gemma 2), per-head q/k norms and two RoPEs with linear
scaling (Gemma 3), sliding-window layers; logits, greedy generation and the heads."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gemma_cpp
from gemma_cpp.config import Gemma2Config, Gemma3TextConfig, load_config
from conftest import rel_err, random_batch

F32_TOL = 1e-4
ARCHS = {"gemma2": "Gemma2", "gemma3": "Gemma3"}


def causal_cls(arch):
    return f"{ARCHS[arch]}ForCausalLM"


@pytest.mark.parametrize("config_name", ["mqa", "gqa", "mha"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(tiny, arch, config_name):
    folder, ref = tiny(causal_cls(arch), config_name, arch=arch)
    window = ref.config.sliding_window
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    L = 4 * window + 3  # well past the window
    ids, mask = random_batch(1, 3, L, ref.config.vocab_size, pad_left=[0, 5, 0], pad_right=[0, 0, 4])
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = model(ids, attention_mask=mask).logits
    assert rel_err(ours, theirs, mask.astype(bool)) <= F32_TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_window_and_caps_change_the_result(tiny, arch):
    """The reference itself differs when the window is lifted, so the parity above checks the
    window rule (and, for Gemma 2, that the soft-caps bite)."""
    folder, ref = tiny(causal_cls(arch), "gqa", arch=arch)
    ids, _ = random_batch(3, 1, 4 * ref.config.sliding_window, ref.config.vocab_size)
    cfg = ref.config.to_dict()
    cfg.pop("model_type", None)
    wide = type(ref.config)(**{**cfg, "sliding_window": 4096})
    other = type(ref)(wide).eval()
    other.load_state_dict(ref.state_dict())
    other.config._attn_implementation = "eager"
    with torch.no_grad():
        a = ref(torch.tensor(ids)).logits.numpy()
        b = other(torch.tensor(ids)).logits.numpy()
    assert rel_err(a, b) > 1e-3
    if arch == "gemma2":
        assert np.abs(a).max() <= ref.config.final_logit_softcapping
        assert np.abs(a).max() > 0.5 * ref.config.final_logit_softcapping  # the cap is reached


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hidden_states_match_transformers(tiny, arch):
    folder, ref = tiny(causal_cls(arch), "gqa", arch=arch)
    model = gemma_cpp.GemmaModel.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(4, 2, 3 * ref.config.sliding_window, ref.config.vocab_size, pad_left=[3, 0])
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        theirs = ref.model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    real = mask.astype(bool)
    assert len(out.hidden_states) == len(theirs.hidden_states)
    for ours_h, their_h in zip(out.hidden_states, theirs.hidden_states):
        assert rel_err(ours_h, their_h.numpy(), real) <= F32_TOL


@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_transformers(tiny, arch, kv):
    """32 new tokens after a prompt longer than the window, a left-padded batch: the sliding
    layers' cache keeps only the window and still gives transformers' tokens."""
    folder, ref = tiny(causal_cls(arch), "mqa", arch=arch)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32", kv_cache_dtype=kv)
    ids, mask = random_batch(5, 2, 3 * ref.config.sliding_window + 1, ref.config.vocab_size, pad_left=[0, 4])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32,
                              do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    if kv == "float32":
        np.testing.assert_array_equal(np.asarray(out), theirs)
    else:  # bf16 keys and values: the first tokens agree, then random logits may tie-break apart
        np.testing.assert_array_equal(np.asarray(out)[:, : ids.shape[1] + 4], theirs[:, : ids.shape[1] + 4])


def test_gemma3_long_context_matches_transformers(tiny):
    """Past 1,000 tokens of context at 3x a real-sized window (320): the prompt goes through
    three chunks of the flash-style prompt attention (global and sliding layers), then decode
    moves the sliding layers' buffer (2 windows + a chunk = 1152 slots) past its end. Logits of
    every prompt position and of every decode step against transformers' eager float32."""
    folder, ref = tiny("Gemma3ForCausalLM", "gqa", arch="gemma3", sliding_window=320, max_position_embeddings=2048)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(21, 1, 3 * 320 + 100, ref.config.vocab_size)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
        gen = ref.generate(torch.tensor(ids), do_sample=False, max_new_tokens=200, min_new_tokens=200,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert rel_err(model(ids).logits, theirs) <= F32_TOL
    out = model.generate(ids, max_new_tokens=200, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    want = torch.stack(gen.logits, dim=1).numpy()
    np.testing.assert_array_equal(out.sequences, gen.sequences.numpy())
    assert rel_err(np.stack(out.logits, axis=1), want) <= F32_TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_long_generation_past_the_sliding_buffer(tiny, arch):
    """Decode far past 2 windows + a chunk so the sliding layers' buffer moves its tail several
    times; each step's logits still equal a full forward over the sequence so far."""
    folder, ref = tiny(causal_cls(arch), "gqa", arch=arch)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(6, 1, 9, ref.config.vocab_size)
    out = np.asarray(model.generate(ids, max_new_tokens=100, do_sample=False))
    assert out.shape[1] == 109
    # Greedy: every generated token is the argmax of the full forward at the previous position.
    full = model(out[:, :-1]).logits
    np.testing.assert_array_equal(full[0, 8:].argmax(-1), out[0, 9:])


def test_classification_heads(tiny):
    for arch, seq_cls, tok_cls in [("gemma2", "Gemma2ForSequenceClassification", "Gemma2ForTokenClassification"),
                                   ("gemma3", "Gemma3TextForSequenceClassification", None)]:
        folder, ref = tiny(seq_cls, "gqa", arch=arch, num_labels=3)
        model = gemma_cpp.GemmaForSequenceClassification.from_pretrained(folder, dtype="float32")
        ids, mask = random_batch(7, 3, 3 * ref.config.sliding_window, ref.config.vocab_size,
                                 pad_left=[2, 0, 0], pad_right=[0, 3, 0])
        with torch.no_grad():
            theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        assert rel_err(model(ids, attention_mask=mask).logits, theirs) <= F32_TOL
        if tok_cls:
            folder, ref = tiny(tok_cls, "gqa", arch=arch, num_labels=5)
            model = gemma_cpp.GemmaForTokenClassification.from_pretrained(folder, dtype="float32")
            with torch.no_grad():
                theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
            assert rel_err(model(ids, attention_mask=mask).logits, theirs, mask.astype(bool)) <= F32_TOL


def test_gemma3_token_classification_is_score_over_hidden_states(tiny, tmp_path):
    """transformers has no Gemma 3 token-classification class: the head is score(hidden) + bias
    over our own GemmaModel's states, checked against numpy on a checkpoint we extend."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, ref = tiny("Gemma3ForCausalLM", "gqa", arch="gemma3")
    dst = tmp_path / "tok"
    shutil.copytree(folder, dst)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, ref.config.hidden_size)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({**tensors, "score.weight": w, "score.bias": b}, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["id2label"] = {str(i): f"L{i}" for i in range(4)}
    (dst / "config.json").write_text(json.dumps(cfg))
    head = gemma_cpp.GemmaForTokenClassification.from_pretrained(str(dst), dtype="float32")
    base = gemma_cpp.GemmaModel.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(8, 2, 17, ref.config.vocab_size)
    want = base(ids).last_hidden_state.astype(np.float64) @ w.T.astype(np.float64) + b
    assert rel_err(head(ids).logits, want) <= 1e-5


def test_configs_read_transformers_files(tmp_path):
    import transformers

    t2 = transformers.Gemma2Config(num_hidden_layers=5)
    t2.save_pretrained(tmp_path / "g2")
    c2 = load_config(tmp_path / "g2")
    assert isinstance(c2, Gemma2Config)
    assert c2.layer_types == t2.layer_types and c2.layer_windows() == [4096, 0, 4096, 0, 4096]
    assert (c2.attn_logit_softcapping, c2.final_logit_softcapping, c2.query_pre_attn_scalar) == (50.0, 30.0, 256)
    t3 = transformers.Gemma3TextConfig(num_hidden_layers=12, rope_scaling={"rope_type": "linear", "factor": 8.0})
    t3.save_pretrained(tmp_path / "g3")
    c3 = load_config(tmp_path / "g3")
    assert isinstance(c3, Gemma3TextConfig)
    assert c3.layer_types == t3.layer_types
    assert [i for i, t in enumerate(c3.layer_types) if t == "full_attention"] == [5, 11]
    assert c3.rope("full_attention") == (1_000_000.0, 8.0) and c3.rope("sliding_attention") == (10_000.0, 1.0)
    # The older flat keys, as hub files of Gemma 3 carry them.
    flat = dict(model_type="gemma3_text", num_hidden_layers=6, rope_theta=500000.0, rope_local_base_freq=20000.0,
                rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_window_pattern=3)
    c = Gemma3TextConfig(**flat)
    assert c.rope("full_attention") == (500000.0, 2.0) and c.rope("sliding_attention") == (20000.0, 1.0)
    assert [t == "full_attention" for t in c.layer_types] == [False, False, True, False, False, True]
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in flat.items() if k != "model_type"})
    assert theirs.layer_types == c.layer_types
    assert theirs.rope_parameters["full_attention"]["rope_theta"] == 500000.0


@pytest.mark.parametrize("bad, match", [
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar"),
    (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}), "rope_type"),
    (dict(hidden_activation="relu"), "hidden_act"),
])
def test_bad_gemma3_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        Gemma3TextConfig(num_hidden_layers=4, **bad)


def test_unsupported_model_types(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ValueError, match="multimodal"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_config(tmp_path)
