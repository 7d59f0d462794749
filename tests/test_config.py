"""GemmaConfig: parity with transformers' GemmaConfig (the oracle), file round trips, presets,
parameter counts and validation errors. All CPU, no weights; the whole file runs in seconds."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gemma_cpp.config import PRESETS, GemmaConfig

CONFIG_PY = os.path.join(os.path.dirname(__file__), os.pardir, "python", "gemma_cpp", "config.py")

# google/gemma-2b's config.json as published (transformers 4.38 era): legacy hidden_act="gelu",
# flat rope_theta, rope_scaling null, torch_dtype.
HUB_GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}

# A small config that moves every field we can off its default.
TINY = dict(
    vocab_size=96,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    max_position_embeddings=64,
    initializer_range=0.05,
    rms_norm_eps=1e-5,
    use_cache=False,
    pad_token_id=3,
    eos_token_id=[1, 7],
    bos_token_id=5,
    attention_dropout=0.125,
    rope_parameters={"rope_type": "default", "rope_theta": 1234.5},
    architectures=["GemmaForSequenceClassification"],
    dtype="bfloat16",
    id2label={0: "neg", 1: "neu", 2: "pos"},
    label2id={"neg": 0, "neu": 1, "pos": 2},
    problem_type="single_label_classification",
)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def hf_dict(config):
    """transformers config -> dict comparable with ours.to_dict() (provenance keys dropped)."""
    out = config.to_dict()
    out.pop("_name_or_path", None)
    out.pop("transformers_version", None)
    return out


def our_dict(config):
    out = config.to_dict()
    out.pop("transformers_version", None)
    return out


def write_json(folder, data, name="config.json"):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


# ------------------------------------------------------------------------------------------
# parity with transformers


def test_defaults_equal_transformers(hf):
    assert our_dict(GemmaConfig()) == hf_dict(hf.GemmaConfig())


def test_every_transformers_field_is_modelled(hf):
    import dataclasses

    theirs = {f.name for f in dataclasses.fields(hf.GemmaConfig)}
    ours = set(GemmaConfig().to_dict())
    assert theirs - ours <= {"transformers_version"}  # ours omits it when unknown
    assert "transformers_version" in GemmaConfig(transformers_version="5.0.0").to_dict()


def test_ours_to_transformers(hf, tmp_path):
    ours = GemmaConfig(**TINY, my_extra_key={"kept": [1, 2]}, classifier_dropout=0.25)
    written = ours.save_pretrained(tmp_path)
    assert written == os.path.join(tmp_path, "config.json")
    theirs = hf.GemmaConfig.from_pretrained(tmp_path)
    assert hf_dict(theirs) == our_dict(ours)
    assert theirs.rope_parameters == {"rope_type": "default", "rope_theta": 1234.5}
    assert theirs.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert theirs.num_labels == ours.num_labels == 3
    assert theirs.my_extra_key == {"kept": [1, 2]}
    assert GemmaConfig.from_pretrained(tmp_path) == ours


def test_transformers_to_ours(hf, tmp_path):
    kwargs = dict(TINY)
    kwargs["architectures"] = ["GemmaForTokenClassification"]
    theirs = hf.GemmaConfig(**kwargs, my_extra_key="x")
    theirs.save_pretrained(tmp_path / "hf")
    ours = GemmaConfig.from_pretrained(tmp_path / "hf")
    assert our_dict(ours) == hf_dict(theirs)
    assert ours.transformers_version == hf.__version__  # as written in the file
    assert ours.dtype == "bfloat16" and ours.my_extra_key == "x"
    # Re-saving gives transformers' file byte for byte (its version string was kept).
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()


def test_hub_gemma_2b_config(hf, tmp_path):
    write_json(tmp_path, HUB_GEMMA_2B)
    with pytest.warns(UserWarning, match="gelu_pytorch_tanh"):
        ours = GemmaConfig.from_pretrained(tmp_path)
    theirs = hf.GemmaConfig.from_pretrained(tmp_path)
    assert our_dict(ours) == hf_dict(theirs)
    assert ours.hidden_act == "gelu_pytorch_tanh" and ours.activation == "gelu_pytorch_tanh"
    assert ours.rope_theta == 10000.0 and ours.dtype == "bfloat16"
    assert ours.name_or_path == str(tmp_path)
    preset = GemmaConfig.from_preset("gemma-2b")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters"):
        assert getattr(ours, field) == getattr(preset, field), field
    assert ours.num_parameters() == 2_506_172_416


# ------------------------------------------------------------------------------------------
# activation


def test_legacy_gelu_is_tanh_gelu_with_warning(hf):
    with pytest.warns(UserWarning, match='hidden_act="gelu"'):
        ours = GemmaConfig.from_dict({"hidden_act": "gelu"})
    assert ours.hidden_act == hf.GemmaConfig(hidden_act="gelu").hidden_act == "gelu_pytorch_tanh"
    assert ours.to_dict()["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast"])
def test_tanh_gelu_aliases(name):
    config = GemmaConfig(hidden_act=name)
    assert config.hidden_act == name  # spelling kept for the round trip
    assert config.activation == "gelu_pytorch_tanh"


def test_tanh_gelu_aliases_are_one_function(hf):
    torch = pytest.importorskip("torch")
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    ref = ACT2FN["gelu_pytorch_tanh"](x)
    for name in ("gelu_python_tanh", "gelu_new", "gelu_fast"):
        torch.testing.assert_close(ACT2FN[name](x), ref, atol=1e-9, rtol=1e-9)
    assert (ACT2FN["gelu"](x) - ref).abs().max() > 1e-4  # exact GELU is a different function


@pytest.mark.parametrize("value", ["silu", "relu", "gelu_accurate", "quick_gelu"])
def test_unsupported_hidden_act(value):
    with pytest.raises(ValueError, match=rf"hidden_act='{value}' is not supported"):
        GemmaConfig(hidden_act=value)


def test_hidden_activation(hf, tmp_path):
    # Older transformers' field: kept and written back when it names tanh-GELU ...
    config = GemmaConfig.from_dict({"hidden_activation": "gelu_pytorch_tanh"})
    assert config.hidden_activation == "gelu_pytorch_tanh"
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_activation"] == "gelu_pytorch_tanh"
    assert hf.GemmaConfig.from_pretrained(tmp_path).hidden_activation == "gelu_pytorch_tanh"
    assert GemmaConfig().hidden_activation is None
    assert "hidden_activation" not in GemmaConfig().to_dict()
    # ... and rejected when it names another function (older transformers ran it).
    with pytest.raises(ValueError, match="hidden_activation='gelu' is not supported"):
        GemmaConfig.from_dict({"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu"})


# ------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize(
    "keys, theta",
    [
        ({}, 10000.0),
        ({"rope_theta": 500000}, 500000.0),  # flat key, int in the file
        ({"rope_theta": 2500.0, "rope_scaling": None}, 2500.0),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}, 777.0),
        ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 321.0}, 321.0),  # flat fills the gap
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 9.0}, "rope_theta": 321.0}, 9.0),  # dict wins
        ({"rope_scaling": {"type": "default", "rope_theta": 42.0}}, 42.0),  # pre-5.0 name and key
    ],
)
def test_rope_theta_forms(hf, tmp_path, keys, theta):
    write_json(tmp_path, keys)
    ours = GemmaConfig.from_pretrained(tmp_path)
    theirs = hf.GemmaConfig.from_pretrained(tmp_path)
    assert ours.rope_theta == theta
    assert isinstance(ours.rope_theta, float)
    assert ours.rope_parameters["rope_type"] == "default"
    assert ours.rope_parameters == theirs.rope_parameters
    assert "rope_theta" not in ours.to_dict()  # written only inside rope_parameters, as 5.24 does


def test_rope_theta_setter():
    config = GemmaConfig()
    config.rope_theta = 5e5
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert config.rope_scaling is config.rope_parameters


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type'\\]='linear' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "only \\['default'\\]"),
        ({"rope_theta": -1.0}, "rope_theta .* must be a positive float"),
        ({"rope_theta": "10000"}, "rope_theta .* must be a positive float, got '10000' \\(str\\)"),
        ({"rope_parameters": "default"}, "rope_parameters must be a dict"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "nested by layer type"),
    ],
)
def test_rope_rejected(keys, match):
    with pytest.raises(ValueError, match=match):
        GemmaConfig.from_dict(keys)


# ------------------------------------------------------------------------------------------
# presets and parameter counts


def test_presets_match_design():
    # DESIGN.md: 2b hidden 2048, 18 layers, 8 heads, 1 KV head, head_dim 256, ffn 16384; 7b hidden
    # 3072, 28 layers, 16 heads, 16 KV heads, head_dim 256, ffn 24576; vocab 256000; rope_theta
    # 10000; eps 1e-6; max positions 8192.
    shapes = {"gemma-2b": (2048, 18, 8, 1, 256, 16384), "gemma-7b": (3072, 28, 16, 16, 256, 24576)}
    assert sorted(PRESETS) == sorted(shapes)
    for name, (hidden, layers, heads, kv, head_dim, ffn) in shapes.items():
        c = GemmaConfig.from_preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, c.intermediate_size) == (hidden, layers, heads, kv, head_dim, ffn), name
        assert c.vocab_size == 256000 and c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-6
        assert c.max_position_embeddings == 8192 and c.tie_word_embeddings and c.activation == "gelu_pytorch_tanh"
        assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (0, 1, 2)
    # Published sizes of the released checkpoints.
    assert GemmaConfig.from_preset("gemma-2b").num_parameters() == 2_506_172_416
    assert GemmaConfig.from_preset("gemma-7b").num_parameters() == 8_537_680_896


def test_preset_overrides_and_independence():
    c = GemmaConfig.from_preset("gemma-2b", max_position_embeddings=4096, dtype="float32")
    assert c.max_position_embeddings == 4096 and c.dtype == "float32" and c.hidden_size == 2048
    c.rope_parameters["rope_theta"] = 1.0  # must not leak into the preset table
    assert GemmaConfig.from_preset("gemma-2b").rope_theta == 10000.0


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'gemma-3b'; known presets: \['gemma-2b', 'gemma-7b'\]"):
        GemmaConfig.from_preset("gemma-3b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_parameters_vs_transformers_meta(hf, name):
    torch = pytest.importorskip("torch")
    ours = GemmaConfig.from_preset(name)
    with torch.device("meta"):
        model = hf.GemmaForCausalLM(hf.GemmaConfig(**ours.to_dict()))
    assert ours.num_parameters() == model.num_parameters()
    assert ours.num_parameters(include_embedding=False) == model.num_parameters(exclude_embeddings=True)


@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_vs_tiny_model(hf, tied):
    pytest.importorskip("torch")
    ours = GemmaConfig(**TINY, tie_word_embeddings=tied)
    model = hf.GemmaForCausalLM(hf.GemmaConfig(**ours.to_dict()))
    assert ours.num_parameters() == sum(p.numel() for p in model.parameters())
    assert ours.num_parameters(include_embedding=False) == model.num_parameters(exclude_embeddings=True)
    assert (ours.num_parameters() - ours.num_parameters(include_embedding=False)) == 96 * 24


def test_num_parameters_by_hand():
    c = GemmaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    per_layer = 4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 6 + 2 * 4  # q, k+v, o, gate/up/down, 2 norms
    assert c.num_parameters() == 10 * 4 + 2 * per_layer + 4
    assert c.num_queries_per_kv == 2


# ------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": "2048"}, r"hidden_size must be a positive int, got '2048' \(str\)"),
        ({"num_hidden_layers": True}, r"num_hidden_layers must be a positive int, got True \(bool\)"),
        ({"vocab_size": 0}, r"vocab_size must be a positive int, got 0 \(int\)"),
        ({"intermediate_size": -16384}, r"intermediate_size must be a positive int"),
        ({"head_dim": 256.0}, r"head_dim must be a positive int, got 256.0 \(float\)"),
        ({"head_dim": None}, r"head_dim must be a positive int, got None \(NoneType\)"),
        ({"num_key_value_heads": None}, r"num_key_value_heads must be a positive int"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings must be a positive int"),
        ({"num_attention_heads": 4, "num_key_value_heads": 0}, r"num_key_value_heads must be a positive int"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3},
         r"num_attention_heads \(8\) must be divisible by num_key_value_heads \(3\)"),
        ({"head_dim": 7}, r"head_dim must be even"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a positive float, got 0.0 \(float\)"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps must be a positive float"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a positive float"),
        ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps must be a positive float, got '1e-6' \(str\)"),
        ({"rms_norm_eps": True}, r"rms_norm_eps must be a positive float, got True \(bool\)"),
        ({"initializer_range": -0.02}, r"initializer_range must be a float >= 0.0"),
        ({"attention_dropout": 1.5}, r"attention_dropout must be a float in \[0.0, 1.0\]"),
        ({"model_type": "gemma2"}, r"model_type must be 'gemma' \(Gemma 1\), got 'gemma2'.*model types \['gemma'\]"),
        ({"model_type": "llama"}, r"model_type must be 'gemma'"),
        ({"use_cache": 1}, r"use_cache must be a bool, got 1 \(int\)"),
        ({"tie_word_embeddings": "true"}, r"tie_word_embeddings must be a bool"),
        ({"use_bidirectional_attention": "no"}, r"use_bidirectional_attention must be a bool or None"),
        ({"attention_bias": True}, r"attention_bias=True is not supported"),
        ({"use_bidirectional_attention": True}, r"use_bidirectional_attention=True is not supported"),
        ({"is_encoder_decoder": True}, r"is_encoder_decoder must be False"),
        ({"pad_token_id": 1.0}, r"pad_token_id must be an int or None, got 1.0 \(float\)"),
        ({"bos_token_id": True}, r"bos_token_id must be an int or None, got True \(bool\)"),
        ({"eos_token_id": "1"}, r"eos_token_id must be an int, a list of ints or None"),
        ({"eos_token_id": [1, "107"]}, r"eos_token_id must be .*item 1 is str"),
        ({"architectures": "GemmaForCausalLM"}, r"architectures must be a list of str or None"),
        ({"dtype": 16}, r"dtype must be a str"),
        ({"problem_type": "ranking"}, r"problem_type must be one of"),
        ({"problem_type": "single_label_classification", "num_labels": 1}, r"requires num_labels > 1"),
        ({"id2label": {"zero": "a"}}, r"id2label keys must be integer label ids, got key 'zero'"),
        ({"id2label": {0: 1}}, r"id2label values must be str"),
        ({"id2label": ["a", "b"]}, r"id2label must be a dict"),
        ({"num_labels": -1}, r"num_labels must be a non-negative int"),
        ({"classifier_dropout": 2.0}, r"classifier_dropout must be a float in \[0.0, 1.0\] or None"),
        ({"per_layer_config": {0: {"hidden_size": 8}}}, r"per_layer_config"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemmaConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        GemmaConfig.from_dict(kwargs)


def test_validation_error_from_file_names_file(tmp_path):
    path = write_json(tmp_path, dict(HUB_GEMMA_2B, hidden_act="gelu_pytorch_tanh", hidden_size="2048"))
    with pytest.raises(ValueError, match=rf"{path}: hidden_size must be a positive int, got '2048' \(str\)"):
        GemmaConfig.from_pretrained(tmp_path)


def test_validate_after_mutation_and_save_refuses(tmp_path):
    config = GemmaConfig()
    config.num_key_value_heads = 5
    with pytest.raises(ValueError, match="divisible"):
        config.validate()
    with pytest.raises(ValueError, match="divisible"):
        config.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_int_accepted_for_float_fields(hf, tmp_path):
    config = GemmaConfig(rms_norm_eps=1, initializer_range=0)
    assert isinstance(config.rms_norm_eps, float) and isinstance(config.initializer_range, float)
    config.save_pretrained(tmp_path)
    assert hf.GemmaConfig.from_pretrained(tmp_path).rms_norm_eps == 1.0  # transformers rejects an int here


def test_out_of_vocab_token_id_warns():
    with pytest.warns(UserWarning, match="pad_token_id=-1 is outside the vocabulary"):
        config = GemmaConfig(pad_token_id=-1)
    assert config.pad_token_id == -1


# ------------------------------------------------------------------------------------------
# labels, dtype, extra keys


def test_id2label_int_keys(hf, tmp_path):
    labels = {"id2label": {"0": "neg", "1": "pos", "2": "mixed"}, "label2id": {"neg": 0, "pos": 1, "mixed": 2}}
    write_json(tmp_path, labels)
    ours = GemmaConfig.from_pretrained(tmp_path)
    assert ours.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert all(type(k) is int for k in ours.id2label)
    assert ours.label2id == {"neg": 0, "pos": 1, "mixed": 2} and ours.num_labels == 3
    assert our_dict(ours) == hf_dict(hf.GemmaConfig.from_pretrained(tmp_path))
    assert json.loads(ours.to_json_string())["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"}


def test_num_labels(hf):
    assert GemmaConfig().num_labels == 2
    assert GemmaConfig().id2label == {0: "LABEL_0", 1: "LABEL_1"}
    c = GemmaConfig(num_labels=4)
    assert c.id2label == {i: f"LABEL_{i}" for i in range(4)} and c.label2id["LABEL_3"] == 3
    assert our_dict(c) == hf_dict(hf.GemmaConfig(num_labels=4))
    assert "num_labels" not in c.to_dict()
    c.num_labels = 1
    assert c.id2label == {0: "LABEL_0"}
    with pytest.warns(UserWarning, match="incompatible with the id2label"):
        c = GemmaConfig(num_labels=5, id2label={0: "a", 1: "b"})
    assert c.num_labels == 2


def test_dtype_spellings():
    assert GemmaConfig(torch_dtype="bfloat16").dtype == "bfloat16"
    assert GemmaConfig(torch_dtype="float16", dtype="float32").dtype == "float32"  # dtype wins
    c = GemmaConfig.from_dict({"torch_dtype": "bfloat16"})
    assert c.torch_dtype == "bfloat16"
    assert "torch_dtype" not in c.to_dict() and c.to_dict()["dtype"] == "bfloat16"
    torch = pytest.importorskip("torch")
    assert GemmaConfig(dtype=torch.bfloat16).dtype == "bfloat16"


def test_extra_keys_round_trip(tmp_path):
    data = dict(HUB_GEMMA_2B, hidden_act="gelu_pytorch_tanh", quantization_note={"bits": 4}, layer_note=[1, 2],
                _attn_implementation_autoset=True, activation="kept-as-extra")
    data.update(_commit_hash="abc", attn_implementation="sdpa", _name_or_path="somewhere")  # runtime: dropped
    write_json(tmp_path, data)
    config = GemmaConfig.from_pretrained(tmp_path)
    assert config.quantization_note == {"bits": 4} and config.layer_note == [1, 2]
    assert config.extra["activation"] == "kept-as-extra" and config.activation == "gelu_pytorch_tanh"
    config.user_note = "set later"
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("quantization_note", "layer_note", "_attn_implementation_autoset", "activation", "user_note"):
        assert key in saved, key
    for key in ("_commit_hash", "attn_implementation", "_name_or_path", "torch_dtype", "rope_theta", "rope_scaling"):
        assert key not in saved, key
    assert saved["dtype"] == "bfloat16" and saved["transformers_version"] == "4.38.0.dev0"
    assert GemmaConfig.from_pretrained(tmp_path / "out") == config
    with pytest.raises(AttributeError):
        config.not_a_key
    with pytest.raises(AttributeError, match="read-only"):
        config.to_dict = None


def test_special_floats_round_trip(tmp_path):
    config = GemmaConfig(soft_cap=float("inf"))
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["soft_cap"] == {"__float__": "Infinity"}
    assert GemmaConfig.from_pretrained(tmp_path).soft_cap == float("inf")


# ------------------------------------------------------------------------------------------
# files, equality, repr


def test_from_pretrained_file_path_and_overrides(tmp_path):
    path = write_json(tmp_path, HUB_GEMMA_2B, name="my_config.json")
    with pytest.warns(UserWarning):
        config = GemmaConfig.from_pretrained(path, max_position_embeddings=1024)
    assert config.max_position_embeddings == 1024 and config.hidden_size == 2048


def test_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        GemmaConfig.from_pretrained("google/gemma-2b-not-here")
    with pytest.raises(FileNotFoundError, match="is a folder but has no config.json"):
        GemmaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "text, match", [("{not json", "not a valid JSON config"), ("[1, 2]", "must hold a JSON object")]
)
def test_from_pretrained_bad_json(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        GemmaConfig.from_pretrained(tmp_path)


def test_save_pretrained_atomic(tmp_path, monkeypatch):
    GemmaConfig.from_preset("gemma-2b").save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        GemmaConfig.from_preset("gemma-7b").save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "config.json").read_text() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # temp file removed
    GemmaConfig.from_preset("gemma-7b").save_pretrained(tmp_path)  # overwrite works
    assert GemmaConfig.from_pretrained(tmp_path) == GemmaConfig.from_preset("gemma-7b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(NotADirectoryError):
        GemmaConfig().save_pretrained(tmp_path / "config.json")


def test_save_pretrained_creates_folder(tmp_path):
    target = tmp_path / "a" / "b"
    GemmaConfig().save_pretrained(str(target))
    assert (target / "config.json").is_file()


def test_eq_and_repr():
    a, b = GemmaConfig.from_preset("gemma-2b"), GemmaConfig.from_preset("gemma-2b")
    assert a == b
    b.transformers_version = "9.9.9"  # provenance is not compared
    assert a == b
    b.rms_norm_eps = 1e-5
    assert a != b
    assert a != GemmaConfig.from_preset("gemma-2b", foo=1)  # extras are compared
    assert a != a.to_dict()
    text = repr(a)
    assert text.startswith("GemmaConfig {") and '"hidden_size": 2048' in text
    assert json.loads(text[len("GemmaConfig "):]) == json.loads(a.to_json_string())


def test_to_json_string_full_vs_diff():
    config = GemmaConfig()
    diff, full = json.loads(config.to_json_string()), json.loads(config.to_json_string(use_diff=False))
    assert "return_dict" in full and "return_dict" not in diff and "id2label" not in diff
    assert diff["model_type"] == full["model_type"] == "gemma"


def test_config_py_imports_neither_torch_nor_transformers():
    code = textwrap.dedent(
        f"""
        import importlib, sys, types
        # config.py and what it imports, as modules of a bare package (gemma_cpp's __init__,
        # which loads the engine, left out).
        probe = types.ModuleType("gemma_cpp_config_probe")
        probe.__path__ = [{os.path.dirname(os.path.abspath(CONFIG_PY))!r}]
        sys.modules["gemma_cpp_config_probe"] = probe
        module = importlib.import_module("gemma_cpp_config_probe.config")
        module.GemmaConfig.from_preset("gemma-7b").num_parameters()
        bad = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
