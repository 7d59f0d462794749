"""gemma_pytorch checkpoints (fused qkv_proj, embedder.weight, optional int8 + weight_scaler)
to Hugging Face folders and to our format."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gemma_cpp
from tiny_tokenizer import train_tiny_tokenizer
from gemma_cpp.loading import original
from conftest import rel_err, random_batch


def to_gemma_pytorch(ref, dtype=torch.float32, int8=False):
    """A transformers Gemma's weights renamed and fused as gemma_pytorch stores them."""
    sd = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.detach().to(dtype)
        if k.endswith("self_attn.q_proj.weight"):
            p = k[: -len("q_proj.weight")]
            sd[p + "qkv_proj.weight"] = torch.cat([v, ref.state_dict()[p + "k_proj.weight"].to(dtype),
                                                   ref.state_dict()[p + "v_proj.weight"].to(dtype)], 0)
        elif k.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        else:
            sd["embedder.weight" if k == "model.embed_tokens.weight" else k] = v
    if int8:  # per-row symmetric int8 of every matrix, as gemma_pytorch's quantized variant
        for k in [k for k, v in sd.items() if v.ndim == 2]:
            w = sd[k].float()
            scale = w.abs().amax(dim=1) / 127
            sd[k] = torch.round(w / scale[:, None]).to(torch.int8)
            sd[k + "_scaler"] = scale
    sd["freqs_cis"] = torch.polar(torch.ones(4, 2), torch.zeros(4, 2))  # a buffer the converter drops
    return {"model_state_dict": sd}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("sp")))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gemma_cpp", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config_name", ["mqa", "mha"])
def test_original_to_hf_gives_transformers_logits_exactly(tiny, tmp_path, sp_model, config_name):
    folder, ref = tiny("GemmaForCausalLM", config_name)
    torch.save(to_gemma_pytorch(ref), tmp_path / "model.ckpt")
    out = cli("convert", str(tmp_path / "model.ckpt"), str(tmp_path / "hf"), "--from", "original",
              "--config", os.path.join(folder, "config.json"), "--tokenizer", sp_model)
    assert out.returncode == 0, out.stderr
    back = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids, _ = random_batch(60, 2, 11, ref.config.vocab_size)
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(ids)).logits.numpy(), ref(torch.tensor(ids)).logits.numpy())
    assert (tmp_path / "hf" / "tokenizer.model").exists()
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"
    ours = gemma_cpp.GemmaForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(torch.tensor(ids)).logits.numpy()) <= 1e-4


def test_original_bf16_and_straight_to_our_format(tiny, tmp_path):
    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    torch.save(to_gemma_pytorch(ref, dtype=torch.bfloat16), tmp_path / "model.ckpt")
    hf = original.convert(str(tmp_path / "model.ckpt"), tmp_path / "hf", config_path=os.path.join(folder, "config.json"))
    ours = original.convert(str(tmp_path / "model.ckpt"), tmp_path / "q8", config_path=os.path.join(folder, "config.json"),
                            to="gemma_cpp", quantization="int8")
    ids, _ = random_batch(61, 1, 9, ref.config.vocab_size)
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(hf, quantization="int8")
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(ours)
    assert a.dtype == b.dtype == "bfloat16"
    np.testing.assert_array_equal(a(ids).logits, b(ids).logits)
    bf = transformers.GemmaForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    for k, v in ref.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(bf.state_dict()[k], v.to(torch.bfloat16)), k


def test_original_int8_variant_is_dequantized_with_its_scalers(tiny, tmp_path):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    ckpt = to_gemma_pytorch(ref, int8=True)
    torch.save(ckpt, tmp_path / "model.ckpt")
    hf = original.convert(str(tmp_path / "model.ckpt"), tmp_path / "hf", config_path=os.path.join(folder, "config.json"))
    back = transformers.GemmaForCausalLM.from_pretrained(hf).state_dict()
    sd = ckpt["model_state_dict"]
    expect = sd["embedder.weight"].float() * sd["embedder.weight_scaler"][:, None]
    assert torch.equal(back["model.embed_tokens.weight"], expect)
    qkv = sd["model.layers.1.self_attn.qkv_proj.weight"].float() * sd["model.layers.1.self_attn.qkv_proj.weight_scaler"][:, None]
    q_rows = ref.config.num_attention_heads * ref.config.head_dim
    assert torch.equal(back["model.layers.1.self_attn.q_proj.weight"], qkv[:q_rows])
    assert torch.equal(back["model.layers.1.self_attn.v_proj.weight"], qkv[-ref.config.head_dim:])


def test_original_bad_inputs(tiny, tmp_path):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    cfg = os.path.join(folder, "config.json")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model_state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        original.convert(str(tmp_path / "evil.ckpt"), tmp_path / "o1", config_path=cfg)
    assert not (tmp_path / "pwned").exists()
    torch.save(to_gemma_pytorch(ref), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="qkv_proj"):  # the 7b preset does not fit this checkpoint
        original.convert(str(tmp_path / "model.ckpt"), tmp_path / "o2", size="7b")
    with pytest.raises(ValueError, match="unknown size"):
        original.convert(str(tmp_path / "model.ckpt"), tmp_path / "o3", size="3b")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        original.convert(str(tmp_path / "model.ckpt"), tmp_path / "taken", config_path=cfg)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".gemma-cpp")]
    assert leftovers == []


def test_original_checked_against_its_config(tiny, tmp_path):
    folder, ref = tiny("GemmaForCausalLM", "mha")
    ckpt = to_gemma_pytorch(ref)
    ckpt["model_state_dict"].pop("model.layers.0.mlp.up_proj.weight")
    ckpt["model_state_dict"]["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="missing model.layers.0.mlp.up_proj.weight.*wrong shapes model.layers.1.mlp.down_proj"):
        original.convert(str(tmp_path / "model.ckpt"), tmp_path / "o", config_path=os.path.join(folder, "config.json"))
