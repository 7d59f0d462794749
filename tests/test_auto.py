"""gemma_cpp's Auto classes against transformers' on the same tiny checkpoints: the config class
and values each picks (from a folder and from a GGUF file), the models' outputs, the
tokenizer's ids, and what each refuses."""
import json
import os

import numpy as np
import pytest

import gemma_cpp
from conftest import random_batch, rel_err
from test_gguf_model import write_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# generation -> (transformers' causal LM class, GGUF architecture)
GENERATIONS = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
               "gemma3": ("Gemma3ForCausalLM", "gemma3")}
# What a config says about the model's shape and numerics (the keys both libraries hold).
KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
        "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
        "layer_types", "rope_parameters", "tie_word_embeddings")


def shape_of(config):
    d = config.to_dict()
    return {k: d.get(k) for k in KEYS}


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_a_folder_gives_the_class_and_config_transformers_gives(tiny, generation):
    cls_name, _ = GENERATIONS[generation]
    folder, ref = tiny(cls_name, "q32", arch=generation)
    ours, theirs = gemma_cpp.AutoConfig.from_pretrained(folder), transformers.AutoConfig.from_pretrained(folder)
    assert type(ours).__name__ == type(theirs).__name__  # GemmaConfig, Gemma2Config, Gemma3TextConfig
    assert shape_of(ours) == shape_of(theirs)
    model = gemma_cpp.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, gemma_cpp.GemmaForCausalLM) and type(model.config) is type(ours)
    ids, mask = random_batch(3, 2, 12, ref.config.vocab_size, pad_left=[0, 4])
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel_err(model(ids, attention_mask=mask).logits, want, mask.astype(bool)) < 1e-4


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_a_gguf_file_gives_the_folders_class_and_config(tiny, tmp_path, generation):
    """From the GGUF file llama.cpp's converter would write of the same model: the config class
    and every value the file records equal the folder's, whether given as a path or as a folder
    and gguf_file=; the model's logits equal transformers' on the folder. (transformers reads
    no config from these files: it runs no 'gemma' GGUF, and takes the vocabulary's size from
    tokenizer metadata they lack; test_real_model compares on the demo model's file.)"""
    cls_name, arch = GENERATIONS[generation]
    folder, ref = tiny(cls_name, "q32", arch=generation)
    path = write_gguf(tmp_path / "m.gguf", ref, arch)
    by_path = gemma_cpp.AutoConfig.from_pretrained(path)
    by_name = gemma_cpp.GemmaConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    folder_config = gemma_cpp.AutoConfig.from_pretrained(folder)
    assert type(by_path) is type(by_name) is type(folder_config)
    recorded = [k for k in KEYS if k not in ("layer_types", "rope_parameters", "query_pre_attn_scalar",
                                             "attn_logit_softcapping", "final_logit_softcapping", "rms_norm_eps")]
    for config in (by_path, by_name):
        assert {k: shape_of(config)[k] for k in recorded} == {k: shape_of(folder_config)[k] for k in recorded}
        assert np.float32(config.rms_norm_eps) == np.float32(folder_config.rms_norm_eps)  # GGUF holds a float32
    if generation == "gemma":  # the only generation whose GGUF records every value tested above
        model = gemma_cpp.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
        ids, _ = random_batch(4, 1, 10, ref.config.vocab_size)
        with torch.no_grad():
            want = ref(torch.tensor(ids)).logits.numpy()
        assert rel_err(model(ids).logits, want) < 1e-4


@pytest.mark.parametrize("head, ours_cls", [("SequenceClassification", "GemmaForSequenceClassification"),
                                            ("TokenClassification", "GemmaForTokenClassification")])
def test_the_head_classes_match_transformers(tiny, head, ours_cls):
    folder, ref = tiny(f"GemmaFor{head}", "gqa", num_labels=3)
    model = getattr(gemma_cpp, f"AutoModelFor{head}").from_pretrained(folder)
    theirs = getattr(transformers, f"AutoModelFor{head}").from_pretrained(folder).eval()
    assert type(model).__name__ == ours_cls == type(theirs).__name__
    ids, mask = random_batch(5, 2, 9, ref.config.vocab_size)
    with torch.no_grad():
        want = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel_err(model(ids, attention_mask=mask).logits, want) < 1e-4


def test_auto_model_is_the_decoder(tiny):
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    ids, _ = random_batch(6, 1, 8, ref.config.vocab_size)
    with torch.no_grad():
        want = transformers.AutoModel.from_pretrained(folder).eval()(torch.tensor(ids)).last_hidden_state.numpy()
    got = gemma_cpp.AutoModel.from_pretrained(folder)(ids).last_hidden_state
    assert rel_err(got, want) < 1e-4


def test_auto_tokenizer_is_fast_unless_asked_and_gives_transformers_ids(tiny_chat):
    pytest.importorskip("tokenizers")
    path, _, _ = tiny_chat
    # As a checkpoint's tokenizer_config.json says it (without one, transformers adds no <bos>).
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    texts = ["Hello world", "<start_of_turn>user\nHi there<end_of_turn>\n", "  two  spaces\n\nand lines"]
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    fast, slow = gemma_cpp.AutoTokenizer.from_pretrained(path), gemma_cpp.AutoTokenizer.from_pretrained(path, use_fast=False)
    assert type(fast) is gemma_cpp.GemmaTokenizerFast and type(slow) is gemma_cpp.GemmaTokenizer
    assert theirs.is_fast  # transformers' default too
    for text in texts:
        assert fast(text)["input_ids"] == slow(text)["input_ids"] == theirs(text)["input_ids"]


def test_unsupported_model_types_fail_before_any_weight(tmp_path):
    """A llama folder (config.json only, no weights: the error must come from the model type),
    and Gemma 3's multimodal checkpoint, which says which Gemma 3 models run."""
    for model_type, expect in (("llama", "unsupported model_type 'llama'"), ("gemma3", "Gemma 3 text models")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        for auto in (gemma_cpp.AutoConfig, gemma_cpp.AutoModelForCausalLM,
                     gemma_cpp.AutoModelForSequenceClassification):
            with pytest.raises(ValueError, match=expect):
                auto.from_pretrained(str(folder))


def test_auto_classes_are_not_instantiated_directly_as_transformers(tiny):
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        with pytest.raises(OSError):
            getattr(transformers, name)()
        with pytest.raises(OSError, match="from_pretrained"):
            getattr(gemma_cpp, name)()


def test_a_config_of_another_generation_is_refused_for_a_gguf(tiny, tmp_path):
    _, ref = tiny("Gemma2ForCausalLM", "q32", arch="gemma2")
    path = write_gguf(tmp_path / "m.gguf", ref, "gemma2")
    from gemma_cpp.config import Gemma3TextConfig

    assert type(gemma_cpp.GemmaConfig.from_pretrained(path)).__name__ == "Gemma2Config"
    with pytest.raises(ValueError, match="holds a gemma2 model"):
        Gemma3TextConfig.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gemma_cpp.GemmaConfig.from_pretrained(str(tmp_path), gguf_file="missing.gguf")
    assert not os.path.exists(tmp_path / "missing.gguf")


def test_model_dtype_and_quantization_say_what_runs(tiny):
    """dtype is the float dtype (transformers': the dtype of a model's float parameters, its
    compute dtype when quantized); quantization gives each group's format."""
    folder, _ = tiny("GemmaForCausalLM", "q32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    m = gemma_cpp.AutoModelForCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert str(theirs.dtype) == "torch." + m.dtype == "torch.bfloat16"
    assert m.quantization == {"embed": "bfloat16", "attention": "bfloat16", "mlp": "bfloat16"}
    q = gemma_cpp.AutoModelForCausalLM.from_pretrained(folder, quantization={"layers": "int4", "embed": "int8"})
    assert q.dtype == "float32"
    assert q.quantization == {"embed": "int8", "attention": "int4", "mlp": "int4"}
    assert "quantization={'embed': 'int8', 'attention': 'int4', 'mlp': 'int4'}" in repr(q)
    ids = np.array([[5, 6, 7]])
    assert q(ids).logits.shape == (1, 3, 1024)
