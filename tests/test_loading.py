"""Loading checkpoints: formats, sharding, and every kind of bad input giving a clear error."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp.formats.safetensors import SafetensorsFile
from conftest import rel_err, random_batch


def copy_ckpt(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
    folder, ref = tiny("GemmaForCausalLM", "gqa")
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    b = gemma_cpp.GemmaForCausalLM.from_pretrained(sharded)
    ids, _ = random_batch(20, 1, 8, ref.config.vocab_size)
    np.testing.assert_array_equal(a(ids).logits, b(ids).logits)


def test_float16_checkpoint_runs_as_float32(tiny, tmp_path, torch):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    half = type(ref).from_pretrained(folder).to(torch.float16)
    half.save_pretrained(tmp_path / "f16")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(tmp_path / "f16")
    assert model.dtype == "float32"
    exact = type(ref).from_pretrained(tmp_path / "f16", dtype=torch.float32, attn_implementation="eager").eval()
    ids, _ = random_batch(21, 1, 8, ref.config.vocab_size)
    with torch.no_grad():
        theirs = exact(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(ids).logits, theirs) <= 1e-4


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(tmp_path / "empty")


def test_no_weights_file(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "mqa")
    dst = copy_ckpt(folder, tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)


def test_config_field_of_the_wrong_type(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "mqa")
    dst = copy_ckpt(folder, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["hidden_size"] = str(cfg["hidden_size"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)


def _rewrite(dst, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_tensor_of_the_wrong_shape_missing_and_unexpected(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "mqa")
    dst = copy_ckpt(folder, tmp_path, "shape")
    _rewrite(dst, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:-1]}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)
    dst = copy_ckpt(folder, tmp_path, "missing")
    _rewrite(dst, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.0\.self_attn\.k_proj\.weight"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)
    dst = copy_ckpt(folder, tmp_path, "extra")
    _rewrite(dst, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mystery\.weight"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)


def test_unknown_dtype_name(tiny):
    folder, _ = tiny("GemmaForCausalLM", "mqa")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype="float8")


def test_token_ids_outside_vocabulary_and_prompt_too_long(tiny):
    folder, ref = tiny("GemmaForCausalLM", "mqa")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
    V = ref.config.vocab_size
    for bad in (V, -1, V + 100):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model([[5, bad, 6]])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate([[5, bad]], max_new_tokens=2)
    too_long = np.full((1, ref.config.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(too_long)
    with pytest.raises(ValueError, match="different lengths"):
        model([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="shape"):
        model([[5, 6, 7]], attention_mask=[[1, 1]])


# --- hostile safetensors files: each must raise ValueError naming the problem, never crash.

def _write(path, header: bytes, data: bytes = b"", n=None):
    n = len(header) if n is None else n
    path.write_bytes(n.to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header, data, n, match", [
    (b"", b"", 10**6, "runs past the end"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "JSON object"),
    (json.dumps({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, None, "unknown dtype"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}).encode(), b"\0" * 8, None, "outside the data"),
    (json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, None, "do not hold"),
    (json.dumps({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, None, "non-negative"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, None, "do not hold"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 2]}}).encode(), b"\0" * 8, None, "outside the data"),
])
def test_hostile_safetensors_headers(tmp_path, header, data, n, match):
    path = _write(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=match):
        SafetensorsFile(path)


def _tensors(**offsets):
    return json.dumps({k: {"dtype": "U8", "shape": [e - b], "data_offsets": [b, e]}
                       for k, (b, e) in offsets.items()}).encode()


@pytest.mark.parametrize("offsets, data, match", [
    (dict(a=(0, 4), b=(6, 8)), 8, r"'b': data \[6, 8\) leaves a hole of 2 bytes"),
    (dict(a=(2, 8)), 8, r"'a': data \[2, 8\) leaves a hole of 2 bytes"),
    (dict(a=(0, 6), b=(4, 8)), 8, r"'b': data \[4, 8\) overlaps the tensor before it, which ends at 6"),
    (dict(a=(0, 8), b=(0, 8)), 8, "overlaps"),
    (dict(a=(0, 4), b=(4, 8)), 11, "3 bytes after the last tensor's data"),
    (dict(), 5, "5 bytes after the last tensor's data"),
])
def test_safetensors_data_must_tile_the_data_section(tmp_path, offsets, data, match):
    """What the format forbids: holes, overlapping tensors, and data past the last tensor
    that the header does not account for."""
    path = _write(tmp_path / "bad.safetensors", _tensors(**offsets), b"\0" * data)
    with pytest.raises(ValueError, match=match):
        SafetensorsFile(path)
    good = _write(tmp_path / "good.safetensors", _tensors(a=(0, 4), e=(4, 4), b=(4, 8)), b"\0" * 8)
    assert sorted(SafetensorsFile(good).names()) == ["a", "b", "e"]


def test_writer_aligns_every_tensor_to_its_element_size(tmp_path):
    """Tensors of odd byte counts beside wider ones: each starts at a multiple of its element
    size from an 8-byte aligned data section, the file tiles exactly, and the safetensors
    library reads back the same values."""
    from safetensors.numpy import load_file

    from gemma_cpp.formats.safetensors import write_safetensors

    rng = np.random.default_rng(0)
    arrays = [("odd", rng.integers(0, 255, 7).astype(np.uint8), "U8"),
              ("f32", rng.standard_normal(5).astype(np.float32), "F32"),
              ("u16", rng.integers(0, 9, 3).astype(np.uint16), "U16"),
              ("f64", rng.standard_normal(3), "F64"),
              ("odd2", rng.integers(0, 255, 3).astype(np.uint8), "U8")]
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, arrays, {"k": "v"})
    f = SafetensorsFile(path)  # the tiling checks pass
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    assert (8 + n) % 8 == 0
    for name, arr, _ in arrays:
        assert header[name]["data_offsets"][0] % arr.itemsize == 0, (name, header[name])
        np.testing.assert_array_equal(f.get(name), arr)
    back = load_file(path)
    for name, arr, _ in arrays:
        np.testing.assert_array_equal(back[name], arr)


def test_truncated_checkpoint_is_a_clear_error(tiny, tmp_path):
    folder, _ = tiny("GemmaForCausalLM", "mqa")
    dst = copy_ckpt(folder, tmp_path)
    p = dst / "model.safetensors"
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="outside the data section"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)
    with open(p, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(dst)


def test_bf16_checkpoint_is_used_in_place_without_copies(tmp_path):
    """A 2B bf16 checkpoint must not need more than weights + 20% resident memory: the
    engine runs bf16 weights from the file's memory map. Measured in a fresh process on a
    ~190 MB bf16 checkpoint (resident growth from load + one forward that reads every
    weight), against the file's size."""
    script = textwrap.dedent(f"""
        import json, os, sys, numpy as np, psutil
        from safetensors.numpy import save_file
        folder = {str(tmp_path)!r}
        cfg = dict(model_type="gemma", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                   max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
        json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
        rng = np.random.default_rng(0)
        def bf16(*shape):  # random bf16 bit patterns of small normal values
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32).__rshift__(16).astype(np.uint16)
        H, F, hd = 1024, 4096, 128
        t = {{"model.embed_tokens.weight": bf16(32000, H), "model.norm.weight": bf16(H)}}
        for i in range(6):
            p = f"model.layers.{{i}}."
            t.update({{p + "self_attn.q_proj.weight": bf16(8 * hd, H), p + "self_attn.k_proj.weight": bf16(hd, H),
                      p + "self_attn.v_proj.weight": bf16(hd, H), p + "self_attn.o_proj.weight": bf16(H, 8 * hd),
                      p + "mlp.gate_proj.weight": bf16(F, H), p + "mlp.up_proj.weight": bf16(F, H),
                      p + "mlp.down_proj.weight": bf16(H, F), p + "input_layernorm.weight": bf16(H),
                      p + "post_attention_layernorm.weight": bf16(H)}})
        # safetensors has no numpy bfloat16: write as uint16, then patch the dtype names.
        path = os.path.join(folder, "model.safetensors")
        save_file(t, path)
        raw = open(path, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
        open(path, "wb").write(len(header).to_bytes(8, "little") + header + raw[8 + n:])
        del t, raw
        import gemma_cpp
        proc = psutil.Process()
        before = proc.memory_info().rss
        m = gemma_cpp.GemmaForCausalLM.from_pretrained(folder)
        assert m.dtype == "bfloat16"
        m([[5, 6, 7]])
        after = proc.memory_info().rss
        print(json.dumps(dict(grown=after - before, file=os.path.getsize(path))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["grown"] <= 1.2 * res["file"], res


def test_pytorch_bin_checkpoint_loads_through_torch(tiny, tmp_path, torch):
    folder, ref = tiny("GemmaForCausalLM", "mha")
    dst = tmp_path / "bin"
    dst.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), dst / "config.json")
    sd = {k: v.to(torch.bfloat16) if "mlp" in k else v for k, v in ref.state_dict().items()}
    torch.save(sd, dst / "pytorch_model.bin")
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(dst, dtype="float32")
    exact = type(ref)(ref.config).eval()
    exact.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    exact.tie_weights()
    ids, _ = random_batch(22, 1, 9, ref.config.vocab_size)
    with torch.no_grad():
        theirs = exact(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(ids).logits, theirs) <= 1e-4


def test_pytorch_bin_is_loaded_without_running_code(tmp_path, torch):
    """A .bin is a pickle: torch.load(weights_only=True) refuses objects that run code."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        gemma_cpp.GemmaForCausalLM.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()
