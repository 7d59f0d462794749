"""Gemma4TextConfig against transformers 5.25's, on the three tiny shapes of gemma4_shapes.py:
the same dict from the same keywords (and from transformers' own dict), files each side reads
back from the other, a multimodal checkpoint's config read as its text part, the per-layer head
sizes, KV heads and KV sharing, and the parameter count of transformers' model."""
import json

import pytest

import gemma_cpp
from gemma_cpp import Gemma4TextConfig
from gemma_cpp.config import load_config

from gemma4_shapes import SHAPES

transformers = pytest.importorskip("transformers")


def theirs(kw):
    return transformers.Gemma4TextConfig(**kw)


def comparable(d):
    d = dict(d)
    for key in ("transformers_version", "_name_or_path", "name_or_path"):
        d.pop(key, None)
    return json.loads(json.dumps(d))  # JSON's view: int keys as strings, tuples as lists


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_same_keywords_give_transformers_dict(shape):
    ours = Gemma4TextConfig(**SHAPES[shape])
    ref = theirs(SHAPES[shape])
    assert comparable(ours.to_dict()) == comparable(ref.to_dict())
    # ... and transformers' dict (per_layer_config instead of global_head_dim) gives the same config.
    assert Gemma4TextConfig.from_dict(ref.to_dict()) == ours


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_files_read_back_on_either_side(shape, tmp_path):
    ours = Gemma4TextConfig(**SHAPES[shape])
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert type(back).__name__ == "Gemma4TextConfig"
    assert comparable(back.to_dict()) == comparable(theirs(SHAPES[shape]).to_dict())
    theirs(SHAPES[shape]).save_pretrained(tmp_path / "theirs")
    assert gemma_cpp.AutoConfig.from_pretrained(tmp_path / "theirs") == ours


def test_the_defaults_are_transformers():
    assert comparable(Gemma4TextConfig().to_dict()) == comparable(theirs({}).to_dict())


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_per_layer_sizes_and_kv_sharing(shape):
    ours, ref = Gemma4TextConfig(**SHAPES[shape]), theirs(SHAPES[shape])
    for i in range(ref.num_hidden_layers):
        assert ours.layer_head_dim(i) == ref.per_layer_config[i].head_dim
        assert ours.layer_kv_heads(i) == ref.per_layer_config[i].num_key_value_heads
    # transformers marks each reused layer "reuse" and its producer, the last earlier layer of
    # the same type, "store".
    modes, source = ref.kv_sharing_modes, ours.kv_sharing()
    for i, mode in enumerate(modes):
        if mode == "reuse":
            assert modes[source[i]] == "store" and source[i] < i
            assert ref.layer_types[source[i]] == ref.layer_types[i]
        else:
            assert source[i] == i
    if shape == "e2b":
        assert source == [0, 1, 2, 1, 1, 2]
        assert [ours.layer_intermediate_size(i) for i in range(6)] == [96, 96, 96, 192, 192, 192]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_is_transformers_models(shape, tied):
    pytest.importorskip("torch")
    kw = dict(SHAPES[shape], tie_word_embeddings=tied)
    model = transformers.Gemma4ForCausalLM(theirs(kw))
    ours = Gemma4TextConfig(**kw)
    assert ours.num_parameters() == model.num_parameters()
    assert ours.num_parameters(include_embedding=False) == model.num_parameters(exclude_embeddings=True)


def test_a_multimodal_checkpoints_config_reads_as_its_text_part(tmp_path):
    text = theirs(SHAPES["e2b"])
    transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "gemma4"
    cfg = load_config(tmp_path)
    assert isinstance(cfg, Gemma4TextConfig) and cfg == Gemma4TextConfig(**SHAPES["e2b"])


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="use_bidirectional_attention='all' is not supported"):
        Gemma4TextConfig(use_bidirectional_attention="all")
    with pytest.raises(ValueError, match=r"per_layer_config\[2\]: a layer may override only"):
        Gemma4TextConfig(**dict(SHAPES["31b"], per_layer_config={2: {"intermediate_size": 8}}))
    with pytest.raises(ValueError, match="per_layer_config: 9 is not a layer index in \\[0, 6\\)"):
        Gemma4TextConfig(**dict(SHAPES["31b"], per_layer_config={"9": {"head_dim": 32}}))
    with pytest.raises(ValueError, match="enable_moe_block needs num_experts"):
        Gemma4TextConfig(**dict(SHAPES["26b_a4b"], num_experts=None))
    with pytest.raises(ValueError, match="rope_type'\\]='yarn' is not supported"):
        Gemma4TextConfig(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}})
