"""The model's own sampling defaults in the server (issue 26, part 4): a request that leaves the
sampling fields out samples with what the model's generation config states (as vLLM does),
`generation_config="none"` (`gemma-cpp serve --generation-config none`) keeps OpenAI's defaults,
and /v1/models says which apply. A GGUF file's defaults are its architecture's known ones."""
import json
import shutil

import pytest

import gemma_cpp

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from gemma_cpp.serve import create_app  # noqa: E402
from serving import Server, greedy  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def declared(tiny_chat, tmp_path_factory):
    """tiny_chat's checkpoint with a generation_config.json stating top_k 1 (sampling that can
    only take the most likely token: greedy, whatever the temperature) and top_p 0.9."""
    path, _, tok = tiny_chat
    folder = tmp_path_factory.mktemp("declared") / "m"
    shutil.copytree(path, folder)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "do_sample": True, "top_k": 1,
                   "top_p": 0.9}, f)
    return gemma_cpp.GemmaForCausalLM.from_pretrained(folder), tok


def _chat(server, **kw):
    r = server.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, **kw)
    return r.choices[0].message.content


def test_fields_left_out_take_the_models_values(declared):
    model, tok = declared
    assert model.generation_config.sampling_defaults == {"top_k": 1, "top_p": 0.9}
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    want = tok.decode(greedy(model, tok, ids, 24), skip_special_tokens=True)
    with Server(create_app(model, tok, model_name="m", slots=2, slot_ctx=256)) as auto, \
            Server(create_app(model, tok, model_name="m", slots=2, slot_ctx=256, generation_config="none")) as none:
        models = httpx.get(auto.url + "/v1/models").json()["data"][0]
        assert models["sampling_defaults"] == {"top_k": 1, "top_p": 0.9}
        assert httpx.get(none.url + "/v1/models").json()["data"][0]["sampling_defaults"] == {}
        # Temperature 1 (OpenAI's default) with the model's top_k 1: the greedy reply, whatever the seed.
        assert [_chat(auto, seed=s) for s in range(3)] == [want] * 3
        # OpenAI's defaults (no top-k, no top-p): sampling from the whole distribution, which
        # this tiny model spreads wide: not the greedy reply.
        free = [_chat(none, seed=s) for s in range(3)]
        assert any(text != want for text in free)
        # A field the request gives wins over the model's: top_k 0 (off) and top_p 1 there are
        # OpenAI's defaults, so the same seeds give the same replies as without the model's values.
        assert [_chat(auto, seed=s, extra_body={"top_k": 0}, top_p=1.0) for s in range(3)] == free


def test_bad_option_and_values_the_server_would_refuse(declared):
    model, tok = declared
    with pytest.raises(ValueError, match="generation_config must be 'auto' or 'none'"):
        create_app(model, tok, generation_config="vllm")
    from gemma_cpp.serve.app import _sampling_defaults

    model.generation_config.sampling_defaults = {"top_k": 1, "top_p": 0.0, "temperature": 9.0, "min_p": 0.1}
    try:  # out of the server's ranges: left out (OpenAI's default applies), not a 400 on every request
        assert _sampling_defaults(model) == {"top_k": 1, "min_p": 0.1}
    finally:
        model.generation_config.sampling_defaults = {"top_k": 1, "top_p": 0.9}


def test_a_gguf_files_defaults_are_its_architectures(tiny, tmp_path):
    """Gemma 3's (every google/gemma-3-*-it generation_config.json: top_k 64, top_p 0.95), kept
    by `gemma-cpp convert` in the folder's generation_config.json; Gemma 2 states none."""
    from test_gguf_model import write_gguf
    from gemma_cpp.loading import engine_format

    for arch, cls, want in (("gemma3", "Gemma3ForCausalLM", {"top_k": 64, "top_p": 0.95}),
                            ("gemma2", "Gemma2ForCausalLM", {})):
        _, ref = tiny(cls, "q32", arch=arch)
        path = write_gguf(tmp_path / f"{arch}.gguf", ref, arch)
        model = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
        assert model.generation_config.sampling_defaults == want
        out = engine_format.save(path, str(tmp_path / f"{arch}-converted"), quantization="auto", progress=None)
        assert gemma_cpp.GemmaForCausalLM.from_pretrained(out).generation_config.sampling_defaults == want
