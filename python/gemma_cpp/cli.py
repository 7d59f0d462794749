"""The `gemma-cpp` command: generate, info."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (transformers' names; unset flags take the model's "
                             "generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)


def _resolve_model(args) -> str:
    if len(args.args) == 2:
        return args.args[0]
    from ._tiny import tiny_model_path

    path = tiny_model_path()
    print(f"[gemma-cpp] no model given: using the tiny random test model at {path} "
          "(random weights: the text is nonsense)", file=sys.stderr)
    return path


def cmd_generate(args) -> int:
    import gemma_cpp
    from .generation import TextStreamer

    if len(args.args) not in (1, 2):
        raise SystemExit("usage: gemma-cpp generate [MODEL] PROMPT")
    prompt = args.args[-1]
    folder = _resolve_model(args)
    if args.threads:
        gemma_cpp.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(folder)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype=args.dtype, quantization=args.quantization)
    load_s = time.perf_counter() - t0
    ids = tok(prompt)["input_ids"]
    eos = model.generation_config.eos_ids() or ([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int) else list(model.config.eos_token_id or []))
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id and end_of_turn not in eos:
        eos.append(end_of_turn)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t1 = time.perf_counter()
    flags = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty", "seed") if getattr(args, k) is not None}
    out = model.generate([ids], max_new_tokens=args.max_new_tokens, eos_token_id=eos, streamer=streamer, **flags)
    dt = time.perf_counter() - t1
    n_new = out.shape[1] - len(ids)
    print(f"[gemma-cpp] load {load_s:.2f} s; {len(ids)} prompt + {n_new} new tokens in {dt:.2f} s "
          f"({n_new / dt if dt > 0 else 0:.1f} tokens/s incl. prefill; {args.quantization or model.dtype}, "
          f"{gemma_cpp.get_num_threads()} threads, {gemma_cpp.cpu_isa()})", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .config import load_config

    folder = args.model
    cfg = load_config(folder)
    n = cfg.num_parameters()
    n_emb = cfg.vocab_size * cfg.hidden_size
    print(f"model:       {os.path.abspath(folder)}")
    print(f"type:        {cfg.model_type} ({', '.join(cfg.architectures or ['?'])})")
    print(f"layers:      {cfg.num_hidden_layers}; hidden {cfg.hidden_size}; ffn {cfg.intermediate_size}; "
          f"heads {cfg.num_attention_heads} (kv {cfg.num_key_value_heads}) x {cfg.head_dim}")
    print(f"vocab:       {cfg.vocab_size}; max positions {cfg.max_position_embeddings}; rope theta {cfg.rope_theta:g}")
    print(f"parameters:  {n:,} ({n - n_emb:,} without the tied embedding)")
    print("bytes by weight format (norms stay float32):")
    from .quant import BITS_PER_WEIGHT

    for name, bits in BITS_PER_WEIGHT.items():
        print(f"  {name:9s} {n * bits / 8 / 2**30:8.2f} GiB")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".model", ".json")))
    for f in files:
        print(f"  file {f}: {os.path.getsize(os.path.join(folder, f)) / 2**20:.1f} MiB")
    return 0


def cmd_convert(args) -> int:
    from .convert import engine_format, original

    if args.from_ == "original":
        out = original.convert(args.src, args.out, size=args.size, config_path=args.config, tokenizer=args.tokenizer,
                               to=args.to or "hf", quantization=args.quantization, dtype=args.dtype,
                               force=args.force, progress=engine_format._progress_bar)
        if (args.to or "hf") == "hf":
            print(f"wrote {out} (Hugging Face folder)", file=sys.stderr)
            return 0
    else:
        if args.to == "hf":
            raise ValueError("--to hf is for --from original; a Hugging Face folder is already one")
        out = engine_format.save(args.src, args.out, dtype=args.dtype, quantization=args.quantization, force=args.force)
    size = os.path.getsize(os.path.join(out, engine_format.WEIGHTS))
    print(f"wrote {out} ({size / 2**20:.1f} MiB; {args.quantization or 'no quantization'})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma-cpp", description="Run Gemma models on the gemma_cpp engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT",
                   help="a checkpoint folder (optional: a tiny random model otherwise) and the prompt")
    g.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    g.add_argument("--quantization", choices=("int8", "int4"), default=None,
                   help="quantize the weights on load (every linear layer and the embedding)")
    g.add_argument("--threads", type=int, default=None)
    _add_sampling(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("convert", help="write a checkpoint in gemma_cpp's own format (loads by mmap)")
    c.add_argument("src", help="a Hugging Face checkpoint folder (or, with --from original, a gemma_pytorch .ckpt)")
    c.add_argument("out", help="the folder to write (must not exist, unless --force)")
    c.add_argument("--quantization", choices=("int8", "int4"), default=None)
    c.add_argument("--dtype", default=None, help="float32 or bfloat16 for what is not quantized")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--from", dest="from_", choices=("hf", "original"), default="hf",
                   help="original: a gemma_pytorch checkpoint (model_state_dict, fused qkv_proj)")
    c.add_argument("--to", choices=("hf", "gemma_cpp"), default=None,
                   help="with --from original: a Hugging Face folder (default) or our format")
    c.add_argument("--size", choices=("2b", "7b"), default=None, help="with --from original: the model's size")
    c.add_argument("--config", default=None, help="with --from original: a config.json instead of --size")
    c.add_argument("--tokenizer", default=None, help="with --from original: the tokenizer.model to include")
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("info", help="config, parameter count and sizes of a checkpoint")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"gemma-cpp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
