"""gemma_cpp vs transformers eager on the same random Gemma weights, side by side in one run.

Each row runs in a fresh subprocess (so peak RSS is that row's own), one after another,
with the same thread count. Prints a table; --json writes the rows.

  python benchmarks/bench_cpu.py                      # Gemma-2B shape, 2 threads
  python benchmarks/bench_cpu.py --layers 4 --new-tokens 8 --reps 1   # a smaller smoke run

Decode tokens/s = new tokens / (time(generate N+1) - time(generate 1)), batch 1, a 16-token
prompt; each time is the best of 2 x --reps runs. Prefill tokens/s = prompt tokens / time of
one forward over the prompt (logits of the last position; best of --reps). The memory-bandwidth
bound of decode is weight bytes read per token (every matrix once, the tied embedding once as
the LM head) over the read bandwidth measured with the engine's threads in the row's own
process, between its decode timings (best of --reps): the machine is shared, and a bandwidth
measured minutes apart can differ by a third.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import measure_bandwidth, run_child  # noqa: E402


def make_checkpoint(folder: str, layers: int, seed: int = 0) -> None:
    """A random Gemma-2B-shaped bf16 checkpoint (config.json + model.safetensors)."""
    import numpy as np

    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    from gemma_cpp._dtypes import f32_to_bf16_bits

    cfg = dict(model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=256000, hidden_size=2048,
               intermediate_size=16384, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=1,
               head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
               rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
               dtype="bfloat16")
    rng = np.random.default_rng(seed)
    H, F, hd, nH = 2048, 16384, 256, 8

    def w(*shape, scale=0.02):
        return f32_to_bf16_bits(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    # Written tensor by tensor in safetensors layout (no 5 GB dict in memory at once).
    names = [("model.embed_tokens.weight", (256000, H)), ("model.norm.weight", (H,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (nH * hd, H)), (p + "self_attn.k_proj.weight", (hd, H)),
                  (p + "self_attn.v_proj.weight", (hd, H)), (p + "self_attn.o_proj.weight", (H, nH * hd)),
                  (p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)),
                  (p + "mlp.down_proj.weight", (H, F)), (p + "input_layernorm.weight", (H,)),
                  (p + "post_attention_layernorm.weight", (H,))]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for n, shape in names:
        size = int(np.prod(shape)) * 2
        header[n] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + size]}
        off += size
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = os.path.join(folder, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        for n, shape in names:
            if len(shape) == 1:
                f.write(w(*shape, scale=0.1).tobytes())
            else:  # rows in slabs, to bound memory
                for r0 in range(0, shape[0], 8192):
                    f.write(w(min(8192, shape[0] - r0), shape[1]).tobytes())
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


ROW_SCRIPT = r'''
import json, os, resource, sys, time
import numpy as np
engine, dtype, folder, threads, prompt_len, new_tokens, REPS = sys.argv[1:8]
threads, prompt_len, new_tokens, REPS = int(threads), int(prompt_len), int(new_tokens), int(REPS)
rng = np.random.default_rng(0)
prompt = rng.integers(3, 256000, size=(1, prompt_len))
short = prompt[:, :16]
res = {}
if engine == "gemma_cpp":
    import gemma_cpp
    gemma_cpp.set_num_threads(threads)
    t = time.perf_counter()
    if dtype.endswith("@converted"):  # our format, written beforehand by gemma-cpp convert
        m = gemma_cpp.GemmaForCausalLM.from_pretrained(folder + "-" + dtype.split("@")[0])
    elif dtype in ("int8", "int4", "int4m"):
        m = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, quantization=dtype)
    else:
        m = gemma_cpp.GemmaForCausalLM.from_pretrained(folder, dtype=dtype)
    res["load_s"] = time.perf_counter() - t
    m(short, logits_to_keep=1)  # warm-up: touches every weight page
    def pre():
        t = time.perf_counter(); m(prompt, logits_to_keep=1); return time.perf_counter() - t
    res["prefill_s"] = min(pre() for _ in range(REPS))
    def gen(n):
        t = time.perf_counter(); m.generate(short, max_new_tokens=n, eos_token_id=[]); return time.perf_counter() - t
else:
    import torch, transformers
    torch.set_num_threads(threads)
    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t = time.perf_counter()
    m = transformers.GemmaForCausalLM.from_pretrained(folder, dtype=td, attn_implementation="eager").eval()
    res["load_s"] = time.perf_counter() - t
    pt, st = torch.tensor(prompt), torch.tensor(short)
    with torch.inference_mode():
        m(st, logits_to_keep=1)
        def pre():
            t = time.perf_counter(); m(pt, logits_to_keep=1); return time.perf_counter() - t
        res["prefill_s"] = min(pre() for _ in range(REPS))
    def gen(n):
        with torch.inference_mode():
            t = time.perf_counter()
            m.generate(st, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t
t1 = min(gen(1) for _ in range(REPS))
tn = [gen(new_tokens + 1) for _ in range(REPS)]
res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the probe's buffer
# The bound's bandwidth, measured in this process between more decode timings: on a shared
# machine a bandwidth measured minutes earlier can be a third off. Best of each.
import gemma_cpp
gemma_cpp.set_num_threads(threads)
bws = []
for _ in range(REPS):
    bws.append(gemma_cpp._C._testing.read_bandwidth(1 << 30, 3))
    tn.append(gen(new_tokens + 1))
res["decode_s"] = min(tn) - t1
res["bandwidth"] = max(bws)
print("RESULT " + json.dumps(res))
'''


def run_row(engine, dtype, folder, threads, prompt_len, new_tokens, reps):
    return run_child([sys.executable, "-c", ROW_SCRIPT, engine, dtype, folder, str(threads), str(prompt_len),
                      str(new_tokens), str(reps)], f"{engine} {dtype}")


def weight_bytes(layers: int, dtype: str) -> float:
    per = {"float32": 4, "bfloat16": 2, "int8": 34 / 32, "int4": 18 / 32,  # scales (and mins) included
           "int4m": 20 / 32}[dtype.split("@")[0]]
    H, F, hd, nH = 2048, 16384, 256, 8
    layer = (nH * hd * H) * 2 + 2 * hd * H + 3 * F * H
    return (layers * layer + 256000 * H) * per


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=os.path.join(os.path.expanduser("~"), ".cache", "gemma_cpp", "bench-2b-random"))
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", default="gemma_cpp:float32,gemma_cpp:bfloat16,gemma_cpp:int8,gemma_cpp:int4,"
                                      "gemma_cpp:int4m,gemma_cpp:int4@converted,transformers:float32,"
                                      "transformers:bfloat16",
                    help="engine:dtype pairs; dtype int8@converted / int4@converted loads our own format "
                         "(converted once, beside the checkpoint) instead of quantizing on load")
    ap.add_argument("--reps", type=int, default=2,
                    help="prefill and decode are each timed this many times; the best counts (the "
                         "machine is shared: the best run is the one least disturbed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = args.folder if args.layers == 18 else args.folder + f"-{args.layers}l"
    t = time.perf_counter()
    make_checkpoint(folder, args.layers)
    print(f"checkpoint: {folder} ({os.path.getsize(os.path.join(folder, 'model.safetensors')) / 2**30:.2f} GiB bf16, "
          f"{args.layers} layers; made/checked in {time.perf_counter() - t:.0f} s)")
    import gemma_cpp
    from gemma_cpp.loading import engine_format

    for spec in args.rows.split(","):
        if spec.endswith("@converted"):
            fmt = spec.split(":")[1].split("@")[0]
            if not os.path.isdir(folder + "-" + fmt):
                engine_format.save(folder, folder + "-" + fmt, quantization=fmt, progress=None)
    bw = measure_bandwidth(args.threads)
    print(f"memory read bandwidth, {args.threads} threads: {bw / 1e9:.1f} GB/s; isa {gemma_cpp.cpu_isa()}")
    rows = []
    for spec in args.rows.split(","):
        engine, dtype = spec.split(":")
        r = run_row(engine, dtype, folder, args.threads, args.prompt, args.new_tokens, args.reps)
        r.update(engine=engine, dtype=dtype, prefill_tps=args.prompt / r["prefill_s"],
                 decode_tps=args.new_tokens / r["decode_s"])
        r["bound_fraction"] = r["decode_tps"] * weight_bytes(args.layers, dtype) / r["bandwidth"]
        rows.append(r)
        print(f"  done {engine} {dtype}: decode {r['decode_tps']:.2f} tok/s, prefill {r['prefill_tps']:.1f} tok/s, "
              f"bandwidth beside it {r['bandwidth'] / 1e9:.1f} GB/s", flush=True)
    ref = {r["dtype"]: r for r in rows if r["engine"] == "transformers"}
    print()
    print(f"{'engine':13s} {'dtype':15s} {'load s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
          f"{'of BW bound':>11s} {'BW GB/s':>8s} {'peak RSS GB':>11s} {'decode x':>9s} {'prefill x':>9s}")
    for r in rows:
        base = ref.get(r["dtype"], ref.get("bfloat16"))  # quantized rows: against transformers bf16
        dx = r["decode_tps"] / base["decode_tps"] if base else float("nan")
        px = r["prefill_tps"] / base["prefill_tps"] if base else float("nan")
        print(f"{r['engine']:13s} {r['dtype']:15s} {r['load_s']:7.2f} {r['prefill_tps']:14.1f} {r['decode_tps']:13.2f} "
              f"{r['bound_fraction']:10.0%} {r['bandwidth'] / 1e9:8.1f} {r['peak_rss'] / 1e9:11.2f} {dx:9.2f} {px:9.2f}")
    print("(x: ratio to transformers eager in the same dtype, quantized rows to its bfloat16, measured in this run; "
          f"prompt {args.prompt} tokens, decode {args.new_tokens} tokens at batch 1, {args.threads} threads; "
          "of BW bound: decode tok/s x weight bytes per token / the read bandwidth measured in the row's own "
          "process between its decode timings (BW))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, rows=rows, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
