"""csrc/core/formats.h's table of weight formats, as gemma_cpp._C.weight_formats() gives it,
against independent descriptions: the gguf package's (gguf-py, llama.cpp's own Python) block
sizes, hand-derived bits per weight, and the arrays the quantizer and the importer really make.
Every Python list of formats is read from it."""
import numpy as np
import pytest

from gemma_cpp import _C, quant
from gemma_cpp.formats.gguf import BLOCK_DTYPES, GGML_BLOCK_SIZES, quantized_blocks

TABLE = {f["name"]: f for f in _C.weight_formats()}


def test_the_table_lists_each_format_once_in_the_engines_order():
    names = [f["name"] for f in _C.weight_formats()]
    assert names == ["float32", "bfloat16", "int8", "int4", "int4m", "q4_k", "q5_k", "q6_k"]


def test_the_ggml_types_and_block_sizes_are_ggufs():
    gguf = pytest.importorskip("gguf")
    # The GGUF type whose values each format holds, by its name in ggml.
    expected = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0", "int4m": "Q4_1",
                "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
    for name, ggml in expected.items():
        t = gguf.GGMLQuantizationType[ggml]
        f = TABLE[name]
        assert f["ggml_type"] == t.value, name
        block, size = gguf.GGML_QUANT_SIZES[t]
        assert (f["block"], f["ggml_block_bytes"]) == (block, size), name
        assert GGML_BLOCK_SIZES[t.value] == (block, size), name  # our GGUF reader's own table agrees


def test_bits_per_weight_by_hand():
    # int8: 32 one-byte quants and an fp16 scale per 32 weights; int4: 16 bytes and a scale;
    # int4m: and an fp16 min; K-quants: our super-block (the file's plus 4 bytes of unpacked
    # scales) per 256 weights.
    by_hand = {"float32": 32, "bfloat16": 16, "int8": (32 * 8 + 16) / 32, "int4": (16 * 8 + 16) / 32,
               "int4m": (16 * 8 + 32) / 32, "q4_k": (144 + 4) * 8 / 256, "q5_k": (176 + 4) * 8 / 256,
               "q6_k": (210 + 2) * 8 / 256}
    assert {n: f["bits_per_weight"] for n, f in TABLE.items()} == pytest.approx(by_hand)
    assert quant.BITS_PER_WEIGHT == {n: f["bits_per_weight"] for n, f in TABLE.items()}


def test_python_lists_come_from_the_table():
    assert quant.FORMATS == ("int8", "int4", "int4m")
    assert quant.KQUANTS == ("q4_k", "q5_k", "q6_k")
    assert quant.KQUANT_BYTES == {"q4_k": 148, "q5_k": 180, "q6_k": 212}
    assert [n for n, f in TABLE.items() if f["cuda"]] == ["float32", "bfloat16", "int8", "int4"]


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_a_quantized_matrix_has_the_tables_bytes(fmt):
    rows, K = 19, 96  # a whole 16-row group and a tail; three blocks of 32 (an odd one for int4's pairs)
    w = np.random.default_rng(0).standard_normal((rows, K)).astype(np.float32)
    q = _C.quantize(w, fmt)
    f = TABLE[fmt]
    blocks = K // f["block"]
    pairs = (blocks + 1) // 2 * 2 if fmt in ("int4", "int4m") else blocks  # int4 blocks go in pairs
    assert q[1].shape == (rows, pairs * f["block_bytes"])
    assert q[2].shape == (rows, blocks) and q[2].dtype == np.uint16  # one fp16 scale per block
    assert (len(q) == 4) == f["mins"]
    assert sum(a.nbytes for a in q[1:]) == rows * (pairs * f["block_bytes"] + blocks * 2 * (1 + f["mins"]))
    whole = _C.quantize(np.ascontiguousarray(w[:, :64]), fmt)  # two blocks, no lone one: exactly bits_per_weight
    assert sum(a.nbytes for a in whole[1:]) * 8 / (rows * 64) == f["bits_per_weight"]
    ours = quant.quantize(w, fmt)  # the numpy mirror, which reads its sizes from the same table
    for a, b in zip(q[1:], ours[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", quant.KQUANTS)
def test_an_imported_k_quant_has_the_tables_bytes(fmt):
    rows, K = 17, 512
    t = quant.GGML_TYPE_OF[fmt]
    assert BLOCK_DTYPES[t].itemsize == TABLE[fmt]["ggml_block_bytes"]  # the reader's numpy layout of the block
    raw = np.random.default_rng(1).integers(0, 256, (rows, K // 256 * TABLE[fmt]["ggml_block_bytes"]), np.uint8)
    kw = quant.kquant_from_gguf(quantized_blocks(raw, t, rows, K), fmt)
    assert kw[1].shape == (rows, K // 256 * TABLE[fmt]["block_bytes"])


def test_unknown_formats_are_named_with_the_tables_choices():
    with pytest.raises(ValueError, match="unknown quantization 'q2_k': expected one of 'int8', 'int4', 'int4m', "
                                         "'q4_k', 'q5_k', 'q6_k'"):
        _C.quantize(np.zeros((16, 32), np.float32), "q2_k")
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        _C.EngineConfig(kv_cache_dtype="int4")  # a weight format, not a cache type
