"""return_tensors='pt' on every head and on generate (torch tensors through DLPack, on the
numpy outputs' memory), and the device argument's checks on a machine without a usable GPU."""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gemma_cpp
from conftest import random_batch
from gemma_cpp.modeling import _tensors, parse_device


def _same(pt, ref):
    """pt: torch tensors (or a tuple of them) with the values, dtype and shape of ref (numpy)."""
    if isinstance(ref, tuple):
        assert isinstance(pt, tuple) and len(pt) == len(ref)
        for a, b in zip(pt, ref):
            _same(a, b)
        return
    assert isinstance(pt, torch.Tensor) and pt.device.type == "cpu"
    np.testing.assert_array_equal(pt.numpy(), ref)
    assert pt.numpy().dtype == ref.dtype


def test_the_conversion_shares_memory():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = _tensors(a, "pt")
    a[1, 2] = -7.0
    assert t[1, 2].item() == -7.0 and t.data_ptr() == a.ctypes.data
    assert _tensors(a, None) is a and _tensors(a, "np") is a


def test_every_head_returns_torch_tensors(tiny):
    folder, ref = tiny("GemmaForSequenceClassification", "gqa", num_labels=3)
    ids, mask = random_batch(5, 2, 9, ref.config.vocab_size, pad_left=[2, 0])
    base = gemma_cpp.GemmaModel.from_pretrained(folder, dtype="float32")
    want = base(ids, attention_mask=mask, output_hidden_states=True)
    got = base(ids, attention_mask=mask, output_hidden_states=True, return_tensors="pt")
    _same(got.last_hidden_state, want.last_hidden_state)
    _same(got.hidden_states, want.hidden_states)
    seq = gemma_cpp.GemmaForSequenceClassification.from_pretrained(folder, dtype="float32")
    _same(seq(ids, attention_mask=mask, return_tensors="pt").logits, seq(ids, attention_mask=mask).logits)
    folder, ref = tiny("GemmaForTokenClassification", "mha", num_labels=5)
    tokc = gemma_cpp.GemmaForTokenClassification.from_pretrained(folder, dtype="float32")
    _same(tokc(ids % ref.config.vocab_size, return_tensors="pt").logits, tokc(ids % ref.config.vocab_size).logits)
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    lm = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    _same(lm(ids, logits_to_keep=1, return_tensors="pt").logits, lm(ids, logits_to_keep=1).logits)
    with pytest.raises(ValueError, match="return_tensors"):
        lm(ids, return_tensors="tf")


def test_generate_returns_torch_tensors(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    lm = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32")
    ids, _ = random_batch(6, 2, 5, ref.config.vocab_size)
    want = lm.generate(ids, max_new_tokens=4)
    got = lm.generate(ids, max_new_tokens=4, return_tensors="pt")
    _same(got, want)
    assert got.dtype == torch.int64
    want = lm.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    got = lm.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_logits=True, return_tensors="pt")
    _same(got.sequences, want.sequences)
    _same(got.logits, want.logits)
    # The tensors feed torch directly: transformers' generate on the same ids agrees.
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                              max_new_tokens=3, do_sample=False)
    assert torch.equal(got.sequences, theirs)


def test_device_is_checked_before_loading(tmp_path):
    assert parse_device(None) == parse_device("cpu") == "cpu"
    assert parse_device(torch.device("cpu")) == "cpu"
    for bad in ("tpu", "cuda:x", "cpu:0", "CUDA", ""):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)
    status = gemma_cpp.cuda_status()
    missing = str(tmp_path / "no-such-model")  # the device is refused before the path is read
    if not status["available"]:
        for device in ("cuda", "cuda:1", torch.device("cuda:0")):
            with pytest.raises(RuntimeError, match="CUDA cannot run here: " + re.escape(status["reason"])):
                gemma_cpp.GemmaForCausalLM.from_pretrained(missing, device=device)
    else:  # a GPU machine (tests/test_cuda_model.py runs models there)
        assert parse_device("cuda") == parse_device(torch.device("cuda:0")) == "cuda:0"
        with pytest.raises(ValueError, match="CUDA device"):
            parse_device(f"cuda:{status['device_count']}")


def test_the_cpu_device_loads(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    lm = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float32", device="cpu")
    assert lm.device == "cpu"
