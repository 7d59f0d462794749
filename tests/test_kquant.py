"""q4_k / q5_k / q6_k: GGUF's Q4_K, Q5_K and Q6_K held as they are. Values against the `gguf`
package, the byte map against quant.h's definition, kernels against float64 over the exact
values, models against the same file read as float32."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import gemma_cpp
from gemma_cpp import _C
from gemma_cpp._C import _testing
from gemma_cpp.formats.gguf import BLOCK_DTYPES, GGUFFile, quantized_blocks
from gemma_cpp.formats.gguf import dequantize as gguf_dequantize
from gemma_cpp.quant import KQUANT_BYTES, QuantizedWeight, deinterleave, dequantize, interleave, kquant_from_gguf
from conftest import available_paths, random_batch

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
TYPES = {"q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K}
FORMATS = list(TYPES)


def random_kblocks(rng, qtype, rows, cols, size=None):
    """Random but valid super-blocks of a K type, as uint8 [rows, cols / 256 * block bytes]:
    every quant, scale, min and high bit drawn at random; d (and dmin) finite fp16 values over
    four decades (size None), or chosen so that the weights' typical magnitude is `size`."""
    dt = BLOCK_DTYPES[int(qtype)]
    n = rows * cols // 256
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    b = raw.view(dt)
    if size is None:
        mag = 10.0 ** rng.integers(-4, 1, n)
    else:  # |sc q| is about 240 (Q4_K), 480 (Q5_K), 1000 (Q6_K), 24 (Q3_K) and 8 (Q2_K) on average
        mag = size / {QT.Q4_K: 240, QT.Q5_K: 480, QT.Q6_K: 1000, QT.Q3_K: 24, QT.Q2_K: 8}[qtype] * np.ones(n)
    b["d"] = (rng.uniform(0.5, 1.5, n) * mag).astype(np.float16)
    if "dmin" in dt.names:
        b["dmin"] = (rng.uniform(0.0, 1.0, n) * mag).astype(np.float16)
    return raw.reshape(rows, -1)


def imported(raw, fmt):
    """The engine's weight (interleaved rows) from GGUF bytes [rows, row bytes]."""
    rows = raw.shape[0]
    cols = raw.shape[1] // BLOCK_DTYPES[int(TYPES[fmt])].itemsize * 256
    return interleave(kquant_from_gguf(quantized_blocks(raw.reshape(-1), int(TYPES[fmt]), rows, cols), fmt))


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows, cols", [(1, 256), (16, 512), (37, 768), (64, 256)])
def test_values_are_the_gguf_packages_bit_for_bit(fmt, rows, cols):
    """Our rows hold exactly the file's values: the numpy mirror, the engine's own row reader
    (the embedding lookup) and formats.gguf all dequantize to gguf.quants.dequantize's bits;
    the engine's threaded interleave is the numpy one, and both undo."""
    rng = np.random.default_rng(rows * 7 + cols)
    raw = random_kblocks(rng, TYPES[fmt], rows, cols)
    theirs = gguf.quants.dequantize(raw, TYPES[fmt])
    plain = kquant_from_gguf(quantized_blocks(raw.reshape(-1), int(TYPES[fmt]), rows, cols), fmt)
    assert plain.shape == (rows, cols) and plain.quants.shape == (rows, cols // 256 * KQUANT_BYTES[fmt])
    qw = interleave(plain)
    np.testing.assert_array_equal(_C.interleave(tuple(plain))[1], qw.quants)
    np.testing.assert_array_equal(_C.interleave(tuple(qw), to_groups=False)[1], plain.quants)
    np.testing.assert_array_equal(deinterleave(qw).quants, plain.quants)
    np.testing.assert_array_equal(bits(dequantize(qw, cols)), bits(theirs))
    np.testing.assert_array_equal(bits(_testing.dequantize(tuple(qw), cols)), bits(theirs))
    np.testing.assert_array_equal(bits(gguf_dequantize(raw.reshape(-1), int(TYPES[fmt]), (rows, cols))), bits(theirs))


def ggml_scale_min(s, j):
    """ggml's get_scale_min_k4, one (scale, min) at a time, as written in ggml-quants.c."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_follow_quant_h_byte_map(fmt):
    """quant.h's byte map, position by position: per super-block the meta (d, dmin or 0, the
    unpacked scales and mins), then the file's quant bytes unchanged; in a whole 16-row group,
    word c of row 16 g + i at byte 64 c + 4 i of the group, rows past the groups plain."""
    rows, cols = 19, 512
    rng = np.random.default_rng(3)
    raw = random_kblocks(rng, TYPES[fmt], rows, cols)
    blocks = quantized_blocks(raw.reshape(-1), int(TYPES[fmt]), rows, cols)
    qw = imported(raw, fmt)
    B, nsb = KQUANT_BYTES[fmt], cols // 256
    flat = qw.quants.reshape(-1)
    for r in range(rows):
        g, i = divmod(r, 16)
        row = np.concatenate([flat[g * 16 * nsb * B + 64 * c + 4 * i:][:4] for c in range(nsb * B // 4)]) \
            if r < 16 else qw.quants[r]
        for s in range(nsb):
            sb, blk = row[s * B:(s + 1) * B], blocks[r, s]
            assert sb[0:2].view(np.float16)[0] == blk["d"] or np.isnan(blk["d"])
            if fmt == "q6_k":
                assert sb[2:4].tolist() == [0, 0]
                np.testing.assert_array_equal(sb[4:20].view(np.int8), blk["scales"])
                np.testing.assert_array_equal(sb[20:], np.concatenate([blk["ql"], blk["qh"]]))
                continue
            assert sb[2:4].view(np.float16)[0] == blk["dmin"]
            pairs = [ggml_scale_min([int(v) for v in blk["scales"]], j) for j in range(8)]
            assert sb[4:12].tolist() == [p[0] for p in pairs] and sb[12:20].tolist() == [p[1] for p in pairs]
            want = np.concatenate([blk["qs"], blk["qh"]]) if fmt == "q5_k" else blk["qs"]
            np.testing.assert_array_equal(sb[20:], want)


def quant_paths():
    return available_paths(_testing.set_quant_matmul_path, ("scalar", "avx2", "avx512_vnni"))


def kquant_bound(x, qw):
    """|y - x . w^T| for the K-quant kernels, w the exact values. Activations are rounded per
    block b of 32 to multiples of dx_b = amax_b / 127 (at most dx_b / 2 per element), so
    |error| <= sum_b dx_b / 2 * sum_{i in b} |w_i|. The integer sums are exact; float32 adds
    at most K * 2^-23 * sum |x_i| t_i, t_i the magnitude of what a kernel adds for weight i:
    |d sc q| + |dmin m| for q4_k / q5_k (the mins' term is summed apart), |w| for q6_k."""
    T, K = x.shape
    wd = dequantize(qw, K).astype(np.float64)
    dx = np.abs(x.reshape(T, K // 32, 32)).max(axis=2).astype(np.float64) / 127
    bound = dx / 2 @ np.abs(wd).reshape(wd.shape[0], K // 32, 32).sum(axis=2).T
    terms = np.abs(wd)
    if qw.format != "q6_k":
        b = deinterleave(qw).quants.reshape(wd.shape[0], -1, KQUANT_BYTES[qw.format])
        dmin = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)
        offset = np.repeat(dmin[..., None] * b[..., 12:20], 32, axis=-1).reshape(wd.shape)
        terms = np.abs(wd + offset) + offset
    return wd, bound + K * 2.0 ** -23 * (np.abs(x).astype(np.float64) @ terms.T)


@pytest.mark.parametrize("path", quant_paths() + ["auto"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T, K, N", [(1, 256, 3), (1, 2048, 37), (2, 512, 16), (3, 768, 48), (4, 256, 67),
                                     (5, 1024, 20), (16, 512, 33), (33, 256, 17)])
def test_kernels_every_path_within_bound(path, fmt, T, K, N):
    """Each path pinned (auto: AMX machines included, where a K-quant prefill stays on the
    integer kernels), decode and prefill work, every output written (poisoned first) and
    within the bound of the float64 product on the exact weights; N leaves rows past the
    16-row groups."""
    rng = np.random.default_rng(T * 1000 + K + N)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    qw = imported(random_kblocks(rng, TYPES[fmt], N, K), fmt)
    wd, bound = kquant_bound(x, qw)
    ref = x.astype(np.float64) @ wd.T
    _testing.set_quant_matmul_path(path)
    try:
        for decode in (False, True):
            out = np.full((T, N), np.nan, np.float32)
            _testing.matmul(x, tuple(qw), out, decode)
            assert np.isfinite(out).all()
            assert np.all(np.abs(out - ref) <= bound), (decode, np.abs(out - ref).max(), bound.min())
    finally:
        _testing.set_quant_matmul_path("auto")


@pytest.mark.parametrize("fmt", FORMATS)
def test_avx512_vnni_gives_the_avx2_kernels_bits(fmt):
    """The VNNI kernel (dpbusd, then the sub-block scale in integers) forms each block's
    integer sum exactly as the AVX2 kernel (maddubs, then madd with the scale) and takes the
    same float operations in the same order: every output the same bits, at 1..7 tokens (its
    4-, 2- and 1-token bodies), rows past the 16-row groups too."""
    paths = quant_paths()
    if "avx512_vnni" not in paths or "avx2" not in paths:
        pytest.skip(f"needs both the avx2 and avx512_vnni paths; this CPU/build has {paths}")
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((7, 1024)) * rng.uniform(0.1, 10, (7, 1))).astype(np.float32)
    qw = tuple(imported(random_kblocks(rng, TYPES[fmt], 53, 1024), fmt))
    out = {}
    try:
        for path in ("avx2", "avx512_vnni"):
            _testing.set_quant_matmul_path(path)
            out[path] = [_testing.matmul(x[:n], qw, None, decode) for n in range(1, 8) for decode in (False, True)]
    finally:
        _testing.set_quant_matmul_path("auto")
    for a, b in zip(out["avx2"], out["avx512_vnni"]):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("path", quant_paths())
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rows_result_does_not_depend_on_the_others(path, fmt):
    """Decode work: each token row's outputs are the same bits alone as beside 1..6 others
    (the kernels take tokens 4, 2 or 1 at a time, each with its own sums)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((7, 512)).astype(np.float32)
    qw = tuple(imported(random_kblocks(rng, TYPES[fmt], 40, 512), fmt))
    _testing.set_quant_matmul_path(path)
    try:
        together = _testing.matmul(x, qw, None, True)
        for n in range(1, 8):
            np.testing.assert_array_equal(_testing.matmul(x[:n], qw, None, True), together[:n])
        for t in range(7):
            np.testing.assert_array_equal(_testing.matmul(x[t:t + 1], qw, None, True)[0], together[t])
    finally:
        _testing.set_quant_matmul_path("auto")


def test_bad_kquant_weights_are_refused():
    rng = np.random.default_rng(0)
    qw = imported(random_kblocks(rng, QT.Q4_K, 16, 256), "q4_k")
    x = np.ones((1, 256), np.float32)
    with pytest.raises(ValueError, match="scales are inside"):
        QuantizedWeight("q4_k", qw.quants, np.zeros((16, 8), np.uint16))
    with pytest.raises(ValueError, match="scales are inside"):
        _testing.matmul(x, ("q4_k", qw.quants, np.zeros((16, 8), np.uint16)))
    with pytest.raises(ValueError, match="multiple of 148"):
        _testing.matmul(x, ("q4_k", np.ascontiguousarray(qw.quants[:, :100])))
    with pytest.raises(ValueError, match="expected a .* matrix"):
        _testing.matmul(np.ones((1, 512), np.float32), tuple(qw))
    with pytest.raises(ValueError, match="imported from GGUF"):
        _C.quantize(np.ones((16, 256), np.float32), "q6_k")
    with pytest.raises(ValueError, match="unknown quantization"):
        gemma_cpp.quant.quantize(np.ones((16, 256), np.float32), "q6_k")


def test_cuda_refuses_kquants():
    if not gemma_cpp.cuda_available():
        pytest.skip("needs a CUDA device (the refusal comes after the device check)")
    qw = imported(random_kblocks(np.random.default_rng(0), QT.Q6_K, 16, 256), "q6_k")
    with pytest.raises(ValueError, match="q6_k weights have no CUDA kernels"):
        _testing.cuda_op_gemv(np.ones((1, 256), np.float32), tuple(qw))


# ---------------------------------------------------------------------------------------
# Models: tiny Gemma 1 / 2 / 3 GGUF files whose matrices are K-quants

K_CONFIG = dict(hidden_size=256, intermediate_size=512, head_dim=64)  # every input size a multiple of 256
ARCHS = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
         "gemma3": ("Gemma3ForCausalLM", "gemma3")}


def kquant_gguf(tiny, tmp_path, arch, qtypes=(QT.Q4_K, QT.Q5_K, QT.Q6_K), name="k.gguf"):
    """A tiny model of `arch` as a GGUF file, its matrices in the K types given, in turn."""
    from test_gguf_model import write_gguf

    cls_name, garch = ARCHS[arch]
    folder, ref = tiny(cls_name, "q32", arch=arch, **K_CONFIG)
    rng = np.random.default_rng(5)
    turn = iter(range(10 ** 6))

    def matrix(gname, a):
        qt = qtypes[next(turn) % len(qtypes)]
        return random_kblocks(rng, qt, a.shape[0], a.shape[1], size=0.04), qt

    return write_gguf(tmp_path / name, ref, garch, qtype=matrix), ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kquant_models_load_as_they_are_and_run(tiny, tmp_path, arch):
    """Under auto every matrix keeps its K type and its exact values; the logits are those of
    the same file read as float32 up to the int8 rounding of the activations (measured
    worst-row cosine 0.9999+); greedy generation completes; converted, the folder holds the
    same bytes, loads them by mmap (views, not copies) and gives the same logits and tokens."""
    from gemma_cpp.loading import engine_format
    from gemma_cpp.loading import gguf as gguf_model

    path, ref = kquant_gguf(tiny, tmp_path, arch)
    with GGUFFile(path) as g, warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is re-quantized, so nothing to say
        weights = gguf_model.load(g, None, "auto").weights
        seen = set()
        for name, v in weights.items():
            if isinstance(v, tuple):
                seen.add(v.format)
        assert seen == set(FORMATS)
        for gname, ename in [("token_embd.weight", "embed"), ("blk.0.attn_q.weight", "layers.0.q"),
                             ("blk.1.ffn_down.weight", "layers.1.down")]:
            want = g.dequantize(gname)
            np.testing.assert_array_equal(bits(dequantize(weights[ename], want.shape[1])), bits(want))
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(path)
    f32 = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)
    ids, _ = random_batch(9, 2, 24, ref.config.vocab_size)
    a, b = f32(ids).logits.astype(np.float64), m(ids).logits.astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999, cos.min()
    out = m.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert out.shape == (2, 34)

    conv = engine_format.save(path, str(tmp_path / "conv"), progress=None)
    loaded = engine_format.load(conv)
    assert loaded.quantization == "auto"
    for name, v in weights.items():
        if isinstance(v, tuple):
            got = loaded.weights[name]
            assert got.format == v.format and len(got) == 2
            np.testing.assert_array_equal(got.quants, v.quants)
            assert not got.quants.flags.owndata  # a view into the file's memory map
    converted = gemma_cpp.GemmaForCausalLM.from_pretrained(conv)
    np.testing.assert_array_equal(converted(ids).logits, m(ids).logits)
    np.testing.assert_array_equal(converted.generate(ids, max_new_tokens=10, eos_token_id=[]), out)


def test_explicit_int8_requantizes_and_says_what_it_changed(tiny, tmp_path):
    """quantization="int8" on a K-quant file still works: every matrix int8, within half an
    int8 step (and the fp16 rounding of its scale) of the exact values; one warning names
    the tensors it re-quantized, by type."""
    from gemma_cpp.loading import gguf as gguf_model

    path, _ = kquant_gguf(tiny, tmp_path, "gemma3")
    with GGUFFile(path) as g:
        types = {}
        for n, t in g.tensors.items():
            if len(t.shape) == 2:
                types[t.type_name] = types.get(t.type_name, 0) + 1
        with pytest.warns(UserWarning) as caught:
            weights = gguf_model.load(g, None, "int8").weights
        assert len(caught) == 1
        msg = str(caught[0].message)
        for t in ("Q4_K", "Q5_K", "Q6_K"):
            assert f"{types[t]} {t} to int8" in msg, msg
        assert "\n" not in msg and "as the quantization asked" in msg
        want = g.dequantize("blk.0.ffn_down.weight")
        got = dequantize(weights["layers.0.down"], want.shape[1])
        step = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2, keepdims=True) / 127
        # Half a step, plus the fp16 rounding of the scale times |q| <= 127: relative 2^-11,
        # or half fp16's smallest step, 2^-25, where the scale is below its normal range.
        bound = (step * (0.5 + 127 * 2.0 ** -11) + 127 * 2.0 ** -25) * (1 + 1e-6)
        assert np.all(np.abs(got - want).reshape(step.shape[0], -1, 32) <= bound)


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K])
def test_q2_k_and_q3_k_are_requantized_with_a_notice(tiny, tmp_path, qtype):
    """Types without kernels of their own are read exactly (bit for bit the gguf package's
    values) and re-quantized to int8 under auto, with a one-line warning saying so."""
    from gemma_cpp.loading import gguf as gguf_model

    path, ref = kquant_gguf(tiny, tmp_path, "gemma2", qtypes=(qtype,))
    with GGUFFile(path) as g:
        raw = g.raw("blk.0.attn_q.weight")
        np.testing.assert_array_equal(bits(g.dequantize("blk.0.attn_q.weight")),
                                      bits(gguf.quants.dequantize(raw.reshape(256, -1), qtype)))
        with pytest.warns(UserWarning, match=rf"re-quantized \d+ {qtype.name} to int8 \(gemma_cpp has no kernels"):
            weights = gguf_model.load(g, None, "auto").weights
    assert weights["layers.0.q"].format == "int8"
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization="auto")
    ids, _ = random_batch(2, 1, 12, ref.config.vocab_size)
    assert np.isfinite(m(ids).logits).all()


def test_info_shows_each_types_share_of_the_bytes(tiny, tmp_path):
    path, _ = kquant_gguf(tiny, tmp_path, "gemma3")
    with GGUFFile(path) as g:
        sizes = {}
        for t in g.tensors.values():
            sizes[t.type_name] = sizes.get(t.type_name, 0) + t.nbytes
    total = sum(sizes.values())
    res = subprocess.run([sys.executable, "-m", "gemma_cpp", "info", path], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for t, n in sizes.items():
        assert f"{t} {n / 2**20:.1f} MiB ({100 * n / total:.1f}%)" in res.stdout, res.stdout
    conv = subprocess.run([sys.executable, "-m", "gemma_cpp", "convert", path, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr
    res = subprocess.run([sys.executable, "-m", "gemma_cpp", "info", str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "c" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    formats = json.loads(header["__metadata__"]["formats"])
    for fmt in FORMATS:
        n = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__" and formats.get(k.rsplit(".", 1)[0]) == fmt)
        assert n > 0 and f"{fmt} {n / 2**20:.1f} MiB" in res.stdout, res.stdout
    assert os.path.getsize(tmp_path / "c" / "model.safetensors") < 1.1 * os.path.getsize(path)
