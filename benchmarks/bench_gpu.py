"""Whole models on a GPU: decode (batch 1 and 8) and prefill (512 tokens) for random Gemma-2B
weights in bf16, int8 and int4 with gemma_cpp on CUDA, next to transformers' eager bf16 on the
same GPU and the same weights, in one run; decode also as a fraction of the HBM-bandwidth bound
(the weight bytes one step reads, over the datasheet bandwidth) and of the copy bandwidth
measured in the same run. Prints one table and checks issue 16's targets; --json writes the rows.

    python benchmarks/bench_gpu.py                      # on a GPU (gpu_check.sh runs this)
    python benchmarks/bench_gpu.py --tiny --device cpu  # the same code on a tiny model, on the
                                                        # CPU (tests/test_bench_gpu.py runs it)

Timing: generate() with eos ignored, greedy. A decode step is (t(prompt, 1 + n new) - t(prompt,
1 new)) / n, so the prompt and the first token's LM head fall out; prefill is t(512-token
prompt, 1 new). Each figure is the best of --reps runs after a warm-up call, CUDA synchronised.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, measure_bandwidth  # noqa: E402

# Gemma-2B (Gemma 1): hidden 2048, 18 layers, 8 heads x 256, 1 KV head, ffn 16384, vocab 256000.
GEMMA_2B = dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024)
# Bytes per weight as the engine holds it: int8 = Q8_0 (32 int8 + an fp16 scale per block),
# int4 = Q4_0 (32 nibbles + an fp16 scale).
BYTES_PER_WEIGHT = {"bfloat16": 2.0, "int8": 34 / 32, "int4": 18 / 32}


def matrix_weights(c: dict) -> int:
    """Weights of every matrix one decode step reads: the layers' seven and the tied LM head
    (the embedding lookup reads one row per token: not counted)."""
    H, F, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    qo = 2 * c["num_attention_heads"] * hd * H
    kv = 2 * c["num_key_value_heads"] * hd * H
    return c["num_hidden_layers"] * (qo + kv + 3 * H * F) + c["vocab_size"] * H


def make_checkpoint(cfg: dict, folder: str, device: str):
    """A random transformers Gemma in bf16 (seeded), saved to folder; returns the eager model
    on `device` (the same weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GemmaConfig(**cfg, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config._attn_implementation = "eager"
    with torch.device(device):
        model = transformers.GemmaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    return model


def hf_generate(model, device: str):
    """gen(ids, n) for timings(): transformers' greedy generate of exactly n new tokens."""
    import torch

    def gen(ids, n):
        with torch.no_grad():
            t = torch.tensor(ids, device=device)
            model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    return gen


def copy_bandwidth(device: str) -> float:
    """Bytes per second the device moves, measured now: on CUDA a 1 GiB device-to-device copy
    through torch (read + write counted, best of 10); on the CPU the engine's read bandwidth."""
    if not device.startswith("cuda"):
        return measure_bandwidth(2, 256 << 20, 3)
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / best


def sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timings(gen, device: str, prompt_len: int, new: int, reps: int, rng, vocab: int) -> dict:
    """gen(ids [B, L] numpy, n new tokens) for decode at B = 1 and 8 and prefill of 512 tokens;
    seconds per step / per prefill."""
    out = {}
    for B in (1, 8):
        ids = rng.integers(3, vocab, size=(B, prompt_len))

        def run(n, ids=ids):
            gen(ids, n)
            sync(device)

        run(1 + new)  # warm-up: kernels, allocations, caches
        t_long, t_short = best_of(lambda: run(1 + new), reps), best_of(lambda: run(1), reps)
        out[f"decode_b{B}_s"] = max(t_long - t_short, 1e-9) / new
    ids = rng.integers(3, vocab, size=(1, 512))
    gen(ids, 1)
    sync(device)
    out["prefill_512_s"] = best_of(lambda: (gen(ids, 1), sync(device)), reps)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of this script)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of Gemma-2B's shapes")
    ap.add_argument("--formats", default="bfloat16,int8,int4")
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--hbm-tbs", type=float, default=float(os.environ.get("GPU_CHECK_HBM_TBS", "4.8")),
                    help="HBM bandwidth for the bound, TB/s (H200 datasheet: 4.8)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-graphs-row", action="store_true", help="on CUDA: leave out bf16 without CUDA graphs")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    import torch

    import gemma_cpp

    device = a.device
    if device.startswith("cuda") and not gemma_cpp.cuda_available():
        print("CUDA cannot run here:", gemma_cpp.cuda_status()["reason"])
        return 1
    cfg = TINY if a.tiny else GEMMA_2B
    hbm = a.hbm_tbs * 1e12
    measured = copy_bandwidth(device)  # in this run, beside the rows
    formats = [f for f in a.formats.split(",") if f]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as folder:
        t0 = time.perf_counter()
        ref = make_checkpoint(cfg, folder, device)
        print(f"random {'tiny' if a.tiny else 'Gemma-2B'} checkpoint (bf16) written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        if not a.no_transformers:
            rows.append(dict(engine="transformers eager", fmt="bfloat16",
                             **timings(hf_generate(ref, device), device, 16, a.new, a.reps, rng, cfg["vocab_size"])))
            print(rows[-1], flush=True)
        del ref
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        # The formats; on CUDA also bf16 with its decode steps launched op by op, not as graphs.
        runs = [(fmt, True) for fmt in formats]
        if device.startswith("cuda") and "bfloat16" in formats and not a.no_graphs_row:
            runs.append(("bfloat16", False))
        for fmt, graphs in runs:
            t0 = time.perf_counter()
            kw = dict(dtype="bfloat16") if fmt == "bfloat16" else dict(quantization=fmt)
            os.environ["GEMMA_CPP_CUDA_GRAPHS"] = "1" if graphs else "0"  # read when the model is made
            model = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, device=device, **kw)
            load_s = time.perf_counter() - t0

            def ours(ids, n, model=model):
                model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[])

            r = dict(engine=f"gemma_cpp ({model.device}{'' if graphs else ', no graphs'})", fmt=fmt, load_s=load_s,
                     **timings(ours, device, 16, a.new, a.reps, rng, cfg["vocab_size"]))
            r["step_bytes"] = matrix_weights(cfg) * BYTES_PER_WEIGHT[fmt]
            r["replayed_steps"] = model._engine.replayed_steps
            rows.append(r)
            print(r, flush=True)
            del model
            gc.collect()
        os.environ.pop("GEMMA_CPP_CUDA_GRAPHS", None)

    hf = next((r for r in rows if r["engine"].startswith("transformers")), None)
    print()
    print(f"{'Gemma-2B' if not a.tiny else 'tiny'} random weights on {device}; decode: tokens/s per batch; "
          f"bound: step bytes / {a.hbm_tbs} TB/s (datasheet); % copy: of the bandwidth measured in this run, "
          f"{measured / 1e12:.2f} TB/s")
    hdr = (f"{'engine':<32}{'weights':>9}{'B=1 tok/s':>11}{'% bound':>9}{'% copy':>8}{'x hf':>7}{'B=8 tok/s':>11}"
           f"{'x hf':>7}"
           f"{'prefill tok/s':>15}{'x hf':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        d1, d8, pf = 1 / r["decode_b1_s"], 8 / r["decode_b8_s"], 512 / r["prefill_512_s"]
        bound = hbm / r["step_bytes"] if "step_bytes" in r else None
        copy_bound = measured / r["step_bytes"] if "step_bytes" in r else None
        r.update(decode_b1_tok_s=d1, decode_b8_tok_s=d8, prefill_tok_s=pf,
                 frac_bound=d1 / bound if bound else None, frac_copy=d1 / copy_bound if copy_bound else None)
        hf_rates = dict(decode_b1=1 / hf["decode_b1_s"], decode_b8=8 / hf["decode_b8_s"],
                        prefill=512 / hf["prefill_512_s"]) if hf else {}
        x = (lambda v, k: f"{v / hf_rates[k]:.2f}" if hf and r is not hf else "")
        print(f"{r['engine']:<32}{r['fmt']:>9}{d1:>11.1f}{(f'{100 * d1 / bound:.0f}%' if bound else ''):>9}"
              f"{(f'{100 * d1 / copy_bound:.0f}%' if copy_bound else ''):>8}"
              f"{x(d1, 'decode_b1'):>7}{d8:>11.1f}{x(d8, 'decode_b8'):>7}{pf:>15.0f}{x(pf, 'prefill'):>7}")

    # Issue 16's targets (meaningful on an H200 with Gemma-2B; printed whatever the run).
    ours = {r["fmt"]: r for r in rows if r["engine"].startswith("gemma_cpp") and "no graphs" not in r["engine"]}
    print()
    if "bfloat16" in ours:
        b = ours["bfloat16"]
        print(f"target: bf16 decode B=1 >= 70% of the bound: {100 * b['frac_bound']:.0f}% "
              f"[{'met' if b['frac_bound'] >= 0.7 else 'NOT met'}]")
        if hf:
            ratio = b["decode_b1_tok_s"] / (1 / hf["decode_b1_s"])
            print(f"target: bf16 decode B=1 >= 5x transformers eager bf16: {ratio:.2f}x "
                  f"[{'met' if ratio >= 5 else 'NOT met'}]")
        for fmt in ("int8", "int4"):
            if fmt in ours:
                want = b["step_bytes"] / ours[fmt]["step_bytes"]
                got = ours[fmt]["decode_b1_tok_s"] / b["decode_b1_tok_s"]
                ok = abs(got / want - 1) <= 0.2
                print(f"target: {fmt} decode B=1 faster than bf16 by its bytes ({want:.2f}x) within 20%: {got:.2f}x "
                      f"[{'met' if ok else 'NOT met'}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=device, tiny=a.tiny, hbm_tbs=a.hbm_tbs, measured_tbs=measured / 1e12, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
