"""Parity of the engine with transformers' eager forward on random tiny models."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gemma_cpp
from conftest import CONFIGS, rel_err, random_batch

F32_TOL = 1e-4  # max |diff| / max |ref|: float32 with a different summation order


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_causal_lm_logits_match_transformers(tiny, config_name):
    folder, ref = tiny("GemmaForCausalLM", config_name)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(1, 3, 19, ref.config.vocab_size, pad_left=[0, 5, 0], pad_right=[0, 0, 4])
    ours = model(ids, attention_mask=mask).logits
    assert ours.dtype == np.float32 and ours.shape == (3, 19, ref.config.vocab_size)
    theirs = hf_logits(ref, ids, mask)
    real = mask.astype(bool)  # padded positions are not compared: their values are arbitrary
    assert rel_err(ours, theirs, real) <= F32_TOL
    # No mask at all, and the last-position-only path.
    ids2, _ = random_batch(2, 2, 11, ref.config.vocab_size)
    assert rel_err(model(ids2).logits, hf_logits(ref, ids2)) <= F32_TOL
    last = model(ids2, logits_to_keep=1).logits
    assert last.shape == (2, 1, ref.config.vocab_size)
    assert rel_err(last[:, 0], hf_logits(ref, ids2)[:, -1]) <= F32_TOL


def test_inputs_as_lists_numpy_and_torch(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    ids, _ = random_batch(3, 2, 9, ref.config.vocab_size)
    a = model(ids).logits
    b = model(ids.tolist()).logits
    c = model(torch.tensor(ids)).logits
    d = model(ids[0]).logits  # one row as a 1-D sequence
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a[:1], d)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_base_model_hidden_states_match_transformers(tiny, config_name):
    folder, ref = tiny("GemmaForCausalLM", config_name)
    model = gemma_cpp.GemmaModel.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(4, 2, 13, ref.config.vocab_size, pad_left=[3, 0])
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        theirs = ref.model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    real = mask.astype(bool)
    assert rel_err(out.last_hidden_state, theirs.last_hidden_state.numpy(), real) <= F32_TOL
    assert len(out.hidden_states) == len(theirs.hidden_states) == ref.config.num_hidden_layers + 1
    for ours_h, their_h in zip(out.hidden_states, theirs.hidden_states):
        assert rel_err(ours_h, their_h.numpy(), real) <= F32_TOL


@pytest.mark.parametrize("source", ["bf16-checkpoint", "f32-checkpoint"])
def test_bf16_is_at_least_as_close_as_transformers_bf16(tiny, source):
    """bf16 weights: matmul inputs rounded to bf16, float32 accumulation, everything else
    (residual stream, norms, softmax) in float32. The exact model is transformers' bf16 model
    cast to float32 (the same bf16 weights and bf16-rounded embedding scale, float32 math);
    transformers' own bf16 run rounds every activation to
    bf16 (8-bit mantissa) and is the accepted error of a bf16 model. Ours must be at least as
    close to the exact model as that, at every real position."""
    if source == "bf16-checkpoint":
        folder, ref32 = tiny("GemmaForCausalLM", "gqa", dtype=torch.bfloat16)
        model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)  # the checkpoint's dtype
    else:
        folder, _ = tiny("GemmaForCausalLM", "mqa")
        model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert model.dtype == "bfloat16"
    cls = transformers.GemmaForCausalLM
    ref16 = cls.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    exact = cls.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval().float()
    ids, mask = random_batch(5, 2, 16, ref16.config.vocab_size, pad_left=[0, 4])
    real = mask.astype(bool)
    with torch.no_grad():
        theirs = ref16(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    truth = hf_logits(exact, ids, mask)
    ours = model(ids, attention_mask=mask).logits
    err_ours, err_theirs = rel_err(ours, truth, real), rel_err(theirs, truth, real)
    assert err_ours <= err_theirs, (err_ours, err_theirs)
    if source == "bf16-checkpoint":
        # The same file loaded as float32 matches transformers loading it as float32 (whose
        # embedding scale is then exact, not rounded to bf16).
        ours32 = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")(ids, attention_mask=mask).logits
        assert rel_err(ours32, hf_logits(ref32, ids, mask), real) <= F32_TOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_matches_transformers(tiny, padding):
    folder, ref = tiny("GemmaForSequenceClassification", "gqa", num_labels=3)
    model = gemma_cpp.GemmaForSequenceClassification.from_pretrained(folder, dtype="float32")
    pads = [0, 4, 7]
    ids, mask = random_batch(7, 3, 15, ref.config.vocab_size,
                             pad_left=pads if padding == "left" else None,
                             pad_right=pads if padding == "right" else None)
    ours = model(ids, attention_mask=mask).logits
    assert ours.shape == (3, 3)
    assert rel_err(ours, hf_logits(ref, ids, mask)) <= F32_TOL


def test_sequence_classification_without_pad_token(tiny):
    folder, ref = tiny("GemmaForSequenceClassification", "mqa", num_labels=2, pad_token_id=None)
    model = gemma_cpp.GemmaForSequenceClassification.from_pretrained(folder)
    ids, _ = random_batch(8, 2, 6, ref.config.vocab_size)
    assert rel_err(model(ids[:1]).logits, hf_logits(ref, ids[:1])) <= F32_TOL
    with pytest.raises(ValueError, match="no padding token"):
        model(ids)


def test_token_classification_matches_transformers(tiny):
    folder, ref = tiny("GemmaForTokenClassification", "mha", num_labels=5)
    model = gemma_cpp.GemmaForTokenClassification.from_pretrained(folder, dtype="float32")
    ids, mask = random_batch(9, 2, 12, ref.config.vocab_size, pad_left=[0, 3])
    ours = model(ids, attention_mask=mask).logits
    assert ours.shape == (2, 12, 5)
    assert rel_err(ours, hf_logits(ref, ids, mask), mask.astype(bool)) <= F32_TOL


def test_heads_load_a_causal_lm_checkpoint_as_base_model(tiny):
    folder, ref = tiny("GemmaForSequenceClassification", "gqa", num_labels=3)
    base = gemma_cpp.GemmaModel.from_pretrained(folder)  # score.weight is ignored, as transformers does
    ids, _ = random_batch(10, 1, 5, ref.config.vocab_size)
    with torch.no_grad():
        theirs = ref.model(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_err(base(ids).last_hidden_state, theirs) <= F32_TOL
