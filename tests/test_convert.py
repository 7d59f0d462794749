"""gemma-cpp convert and our own format: round trips, safety, and loading by mmap."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp.loading import engine_format
from conftest import random_batch


@pytest.mark.parametrize("quantization", [None, "int8", "int4", {"layers": "int4", "embed": "int8"}])
def test_convert_then_load_equals_quantize_on_load(tiny, tmp_path, quantization):
    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    out = engine_format.save(folder, tmp_path / "out", quantization=quantization, progress=None)
    assert engine_format.is_engine_checkpoint(out) and not engine_format.is_engine_checkpoint(folder)
    ids, mask = random_batch(50, 2, 10, ref.config.vocab_size, pad_left=[0, 3])
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization=quantization)
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(out)
    assert a.quantization == b.quantization
    np.testing.assert_array_equal(a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits)
    np.testing.assert_array_equal(a.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]),
                                  b.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]))


@pytest.mark.parametrize("cls_name, extra", [("GemmaForSequenceClassification", dict(num_labels=3)),
                                             ("GemmaForTokenClassification", dict(num_labels=2))])
def test_heads_round_trip(tiny, tmp_path, cls_name, extra):
    folder, ref = tiny(cls_name, "q32", initializer_range=0.05, **extra)
    out = engine_format.save(folder, tmp_path / "out", quantization="int8", dtype="bfloat16", progress=None)
    cls = getattr(gemma_cpp, cls_name)
    ids, mask = random_batch(51, 2, 7, ref.config.vocab_size, pad_left=[0, 2])
    np.testing.assert_array_equal(cls.from_pretrained(folder, quantization="int8", dtype="bfloat16")(ids, mask).logits,
                                  cls.from_pretrained(out)(ids, mask).logits)


def test_existing_output_is_never_overwritten_without_force(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        engine_format.save(folder, out, progress=None)
    assert (out / "precious.txt").read_text() == "mine"
    engine_format.save(folder, out, quantization="int8", force=True, progress=None)
    assert not (out / "precious.txt").exists() and engine_format.is_engine_checkpoint(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_failed_conversion_leaves_nothing(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "gqa")  # hidden 72: cannot be quantized
    with pytest.raises(ValueError, match="multiple of 32"):
        engine_format.save(folder, tmp_path / "out", quantization="int4", progress=None)
    assert list(tmp_path.iterdir()) == []


def _rewrite_metadata(path, edit):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header["__metadata__"])
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "test helper: the new header must fit the old one"
    open(path, "wb").write(raw[:8] + new + raw[8 + n:])


def test_unknown_version_truncated_and_conflicting_loads_are_clear_errors(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    out = engine_format.save(folder, tmp_path / "out", quantization="int8", progress=None)
    weights = os.path.join(out, engine_format.WEIGHTS)
    with pytest.raises(ValueError, match="converted with quantization"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(out, quantization="int4")
    with pytest.raises(ValueError, match="converted with dtype"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(out, dtype="bfloat16")
    _rewrite_metadata(weights, lambda m: m.update(format_version="9"))
    with pytest.raises(ValueError, match="format version '9'"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(out)
    _rewrite_metadata(weights, lambda m: m.update(format_version=engine_format.VERSION))
    gemma_cpp.GemmaForCausalLM.from_pretrained(out)  # restored
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match="outside the data section"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("quantization, version", [("int8", "1"), ("int4m", "2")])
def test_older_files_with_plain_rows_load_the_same(tiny, tmp_path, quantization, version):
    """Versions 1 and 2 stored quantized rows in plain order: such a file (made here by undoing
    the interleaving of a version 3 file) loads into the engine's order, with the same logits."""
    from gemma_cpp.formats.safetensors import SafetensorsFile, write_safetensors
    from gemma_cpp.quant import deinterleave

    folder, ref = tiny("GemmaForCausalLM", "q32", initializer_range=0.05)
    new = engine_format.save(folder, tmp_path / "new", quantization=quantization, progress=None)
    f = SafetensorsFile(os.path.join(new, engine_format.WEIGHTS))
    assert f.metadata["format_version"] == "3"
    formats = json.loads(f.metadata["formats"])
    tensors = []
    for name in f.names():
        base, _, part = name.rpartition(".")
        arr = f.get(name)
        if base in formats and part in ("quants", "scales", "mins"):
            parts = [f.get(base + "." + p) for p in ("quants", "scales", "mins") if base + "." + p in set(f.names())]
            plain = deinterleave((formats[base],) + tuple(parts))
            arr = plain[1 + ("quants", "scales", "mins").index(part)]
            assert arr.shape[0] < 16 or not np.array_equal(arr, f.get(name))  # the order really differs
        assert f.dtype_of(name) in ("uint8", "uint16", "float32")  # float32 model: no bf16 bits to tell apart
        tensors.append((name, np.ascontiguousarray(arr), {"uint8": "U8", "uint16": "U16", "float32": "F32"}[f.dtype_of(name)]))
    old = tmp_path / "old"
    old.mkdir()
    for item in os.listdir(new):
        if item != engine_format.WEIGHTS:
            with open(os.path.join(new, item), "rb") as src, open(old / item, "wb") as dst:
                dst.write(src.read())
    write_safetensors(str(old / engine_format.WEIGHTS), tensors, dict(f.metadata, format_version=version))
    ids, mask = random_batch(52, 2, 9, ref.config.vocab_size, pad_left=[0, 2])
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(new)(ids, attention_mask=mask).logits
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(str(old))(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(a, b)


def test_cli_convert_then_generate(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "gemma_cpp", *a], capture_output=True, text=True,
                                    timeout=120, env=env)
    from tiny_model import make_tiny_model

    tiny_folder = make_tiny_model(str(tmp_path / "tiny"))
    first = run("generate", tiny_folder, "Hello", "--max-new-tokens", "5", "--quantization", "int4")
    assert first.returncode == 0, first.stderr
    conv = run("convert", str(tiny_folder), str(tmp_path / "q4"), "--quantization", "int4")
    assert conv.returncode == 0, conv.stderr
    assert "#" in conv.stderr and "wrote" in conv.stderr  # a progress bar, then the summary
    again = run("convert", str(tiny_folder), str(tmp_path / "q4"), "--quantization", "int4")
    assert again.returncode == 2 and "--force" in again.stderr
    gen = run("generate", str(tmp_path / "q4"), "Hello", "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == first.stdout  # converted int4 == int4 on load, greedy


def test_converted_int8_loads_by_mmap_without_copies(tmp_path):
    """Resident growth from loading a converted int8 model and running it stays within the
    file's size + 20%: the engine reads the quants and scales in place."""
    script = textwrap.dedent(f"""
        import json, os, numpy as np, psutil
        from safetensors.numpy import save_file
        import gemma_cpp
        from gemma_cpp.loading import engine_format
        src = {str(tmp_path / 'src')!r}
        os.makedirs(src)
        H, F, V, L = 1024, 4096, 32000, 4
        gemma_cpp.GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
                              num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                              max_position_embeddings=256).save_pretrained(src)
        rng = np.random.default_rng(0)
        w = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
        t = {{"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H)}}
        for i in range(L):
            p = f"model.layers.{{i}}."
            t.update({{p + "self_attn.q_proj.weight": w(1024, H), p + "self_attn.k_proj.weight": w(128, H),
                      p + "self_attn.v_proj.weight": w(128, H), p + "self_attn.o_proj.weight": w(H, 1024),
                      p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
                      p + "mlp.down_proj.weight": w(H, F), p + "input_layernorm.weight": w(H),
                      p + "post_attention_layernorm.weight": w(H)}})
        save_file(t, os.path.join(src, "model.safetensors"))
        del t
        out = engine_format.save(src, {str(tmp_path / 'q8')!r}, quantization="int8", progress=None)
        proc = psutil.Process()
        before = proc.memory_info().rss
        m = gemma_cpp.GemmaForCausalLM.from_pretrained(out)
        m([[5, 6, 7]])
        grown = proc.memory_info().rss - before
        print(json.dumps(dict(grown=grown, file=os.path.getsize(os.path.join(out, "model.safetensors")))))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["grown"] <= 1.2 * r["file"], r
