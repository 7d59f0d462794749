"""A tiny random Gemma checkpoint with a tiny trained tokenizer, for the CLI tests: random
weights produce fluent-looking nonsense; it shows the pipeline works, not what Gemma says."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from gemma_cpp.config import GemmaConfig
from tiny_tokenizer import train_tiny_tokenizer

TINY_NAME = "tiny-random-gemma"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemma_cpp")


def make_tiny_model(folder: str, seed: int = 0) -> str:
    """Write config.json, model.safetensors (float32) and tokenizer.model to folder, which
    must not exist yet (it is built under a temporary name, then renamed)."""
    from safetensors.numpy import save_file

    if os.path.exists(folder):
        raise FileExistsError(f"{folder} exists; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        sp_path = train_tiny_tokenizer(tmp)
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=sp_path).get_piece_size()
        cfg = GemmaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                          max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                          architectures=["GemmaForCausalLM"], dtype="float32")
        rng = np.random.default_rng(seed)
        H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

        def w(*shape, scale=0.25):
            return (rng.standard_normal(shape) * scale).astype(np.float32)

        tensors = {"model.embed_tokens.weight": w(vocab, H, scale=0.5), "model.norm.weight": w(H, scale=0.1)}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            tensors.update({
                p + "self_attn.q_proj.weight": w(cfg.num_attention_heads * hd, H),
                p + "self_attn.k_proj.weight": w(cfg.num_key_value_heads * hd, H),
                p + "self_attn.v_proj.weight": w(cfg.num_key_value_heads * hd, H),
                p + "self_attn.o_proj.weight": w(H, cfg.num_attention_heads * hd),
                p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
                p + "mlp.down_proj.weight": w(H, F),
                p + "input_layernorm.weight": w(H, scale=0.1),
                p + "post_attention_layernorm.weight": w(H, scale=0.1),
            })
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def tiny_model_path() -> str:
    """The cached tiny model, created on first use."""
    folder = os.path.join(default_cache_dir(), TINY_NAME)
    if not os.path.isdir(folder):
        try:
            make_tiny_model(folder)
        except OSError:  # another process made it meanwhile (rename onto a full folder)
            if not os.path.isfile(os.path.join(folder, "model.safetensors")):
                raise
    return folder
