"""Writes the seed inputs of every harness into fuzz/corpus/NAME/ (small valid inputs the
fuzzer starts from). Run once; the files are committed. Needs the test extra (gguf)."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harnesses  # noqa: E402


def put(name: str, file: str, data: bytes) -> None:
    os.makedirs(harnesses.corpus_dir(name), exist_ok=True)
    with open(os.path.join(harnesses.corpus_dir(name), file), "wb") as f:
        f.write(data)


def tiny_gguf(path: str, qtype=None) -> bytes:
    import gguf

    c = harnesses.TINY
    w = gguf.GGUFWriter(path, "gemma")
    for key, value in (("context_length", c["max_position_embeddings"]), ("embedding_length", c["hidden_size"]),
                       ("block_count", c["num_hidden_layers"]), ("feed_forward_length", c["intermediate_size"]),
                       ("attention.head_count", c["num_attention_heads"]),
                       ("attention.head_count_kv", c["num_key_value_heads"]),
                       ("attention.key_length", c["head_dim"])):
        w.add_uint32(f"gemma.{key}", value)
    w.add_float32("gemma.attention.layer_norm_rms_epsilon", 1e-6)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, a, _ in harnesses.tiny_tensors():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{names[rest[:-len('.weight')]]}.weight"
        if qtype is not None and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a + np.float32(1) if g.endswith("norm.weight") else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


def main() -> None:
    import tempfile

    import gguf

    from gemma_cpp.formats.safetensors import write_safetensors
    from gemma_cpp.loading import engine_format

    tmp = tempfile.mkdtemp()
    put("gguf", "f32.gguf", tiny_gguf(os.path.join(tmp, "a.gguf")))
    put("gguf", "q8_0.gguf", tiny_gguf(os.path.join(tmp, "b.gguf"), gguf.GGMLQuantizationType.Q8_0))
    write_safetensors(os.path.join(tmp, "m.safetensors"), harnesses.tiny_tensors(), {"format": "pt"})
    with open(os.path.join(tmp, "m.safetensors"), "rb") as f:
        put("safetensors", "tiny.safetensors", f.read())
    for q in ("int8", "int4m"):
        out = engine_format.save(harnesses.tiny_folder(), os.path.join(tmp, q), quantization=q, progress=None)
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            put("ourformat", f"{q}.safetensors", f.read())
    # spmodel: 4 bytes of text length, the text, then the model (Draw's order): a small model
    # trained here (the demo's is 4 MB).
    import sentencepiece as spm

    text = os.path.join(tmp, "t.txt")
    with open(text, "w") as f:
        f.write("The lighthouse keeper wrote in his log that the storm had passed. " * 50)
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(tmp, "sp8"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity")
    with open(os.path.join(tmp, "sp8.model"), "rb") as f:
        small = f.read()
    put("spmodel", "small.model", (5).to_bytes(4, "little") + b"Hello" + small)
    for i, s in enumerate(["The capital of France is", "def f(x):\n    return x * 2\n", "Ünïcödé 🦀\t\r\n  ",
                           "<start_of_turn>user\nhi<end_of_turn>", ""]):
        put("tokenizer", f"text{i}.txt", s.encode())
    put("chat", "two_turns", bytes([2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0]) + b"hello there!" +
        bytes([6, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]) + b"hi again")
    put("engine", "zeros", bytes(64))
    put("engine", "ones", bytes([1] * 64))
    put("generate", "zeros", bytes(48))
    put("generate", "sampled", bytes([0, 0, 0, 0, 3, 0, 0, 0] * 6))


if __name__ == "__main__":
    main()
