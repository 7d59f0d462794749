"""A generation's tensors as the engine declares them (csrc/engine/generation.h, read through
_C.model_tensors and loading/layout.py), against transformers' own parameters for the same
config: the same tensors, the same shapes, nothing more and nothing less."""
import pytest

from gemma_cpp import _C
from gemma_cpp.config import config_class
from gemma_cpp.loading.layout import engine_config, layer_shapes

from conftest import hf_config

# transformers' parameter names for ours, written out here (not the loaders' map).
LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
SANDWICH = {"mlp_norm": "pre_feedforward_layernorm", "post_attn_norm": "post_attention_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm"}
CAUSAL_LM = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def hf_name(ours: str, arch: str) -> str:
    if ours == "embed":
        return "model.embed_tokens.weight"
    if ours == "final_norm":
        return "model.norm.weight"
    if ours == "lm_head":
        return "lm_head.weight"
    _, layer, short = ours.split(".")
    names = dict(LAYER, **(SANDWICH if arch != "gemma" else {"mlp_norm": "post_attention_layernorm"}))
    return f"model.layers.{layer}.{names[short]}.weight"


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_engines_tensors_are_transformers_parameters(arch, tied):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    hf = hf_config("gqa", arch, tie_word_embeddings=tied)
    model = getattr(transformers, CAUSAL_LM[arch])(hf)
    theirs = {name: tuple(p.shape) for name, p in model.state_dict().items() if not name.endswith("inv_freq")}
    if tied:
        theirs.pop("lm_head.weight", None)  # the embedding, shared
    cfg = config_class(hf.model_type).from_dict(hf.to_dict())
    ours = _C.model_tensors(engine_config(cfg, "float32"), tied)
    assert {hf_name(name, arch): tuple(shape) for name, shape in ours} == theirs
    assert len(ours) == len(theirs)  # one engine tensor per parameter
    # The loaders' per-layer view is the same list.
    assert {f"layers.1.{n}": s for n, s in layer_shapes(cfg, 1).items()} == {
        n: tuple(s) for n, s in ours if n.startswith("layers.1.")}


def test_an_unknown_generation_is_named():
    c = _C.EngineConfig(generation="gemma9", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="unknown generation 'gemma9' \\(the engine runs 'gemma', 'gemma4'\\)"):
        _C.model_tensors(c)
