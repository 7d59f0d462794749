"""Helpers shared by the benchmark scripts: one row per subprocess, peak RSS, bandwidth.

A row runs in its own process so that its peak RSS is its own; the child prints one line
`RESULT {json}` on stdout (child_result) and the parent reads it back (run_child).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


class ChildDied(RuntimeError):
    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_child(argv, what: str) -> dict:
    """Run argv, return the dict of its last `RESULT {json}` line; ChildDied (with the exit
    status and the child's stderr) when it failed or printed none."""
    out = subprocess.run(argv, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise ChildDied(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", out.returncode)
    return json.loads(line[-1][7:])


def child_result(res: dict) -> None:
    print("RESULT " + json.dumps(res), flush=True)


def run_engine_child(script: str, a: dict, what: str) -> dict:
    """Runs `script --child JSON(a)` (a["engine"] names the row's function) and returns its
    result (ChildDied as run_child)."""
    return run_child([sys.executable, os.path.abspath(script), "--child", json.dumps(a)], what)


def child_main(child_arg, children: dict) -> bool:
    """In a child process (a --child JSON argument): runs children[a["engine"]](a) and prints
    its RESULT line. False when this is not a child."""
    if not child_arg:
        return False
    a = json.loads(child_arg)
    child_result(children[a["engine"]](a))
    return True


def peak_rss() -> int:
    """Peak resident set of this process in bytes: VmHWM (which reset_peak_rss can lower),
    else getrusage's maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS to its current RSS (Linux >= 4.0: "5" > clear_refs), so
    that a second phase of one process gets a peak of its own. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def best_of(fn, reps: int) -> float:
    """The smallest of reps timings of fn() in seconds (the machine is shared: the best run
    is the one least disturbed)."""
    best = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def warm_up(fn, max_calls: int = 5, tol: float = 0.25) -> int:
    """Call fn() untimed until two calls in a row take times within tol of each other (at most
    max_calls): the first calls of a shape can be many times slower (oneDNN builds its kernels,
    pages are first touched; seen: torch bf16 prefill 8.5 s, then 0.1 s). Returns the calls made."""
    prev = None
    for i in range(max_calls):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        if prev is not None and abs(dt - prev) <= tol * min(dt, prev):
            return i + 1
        prev = dt
    return max_calls


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s with the engine's thread pool at `threads` threads:
    the denominator of every decode bound."""
    import gemma_cpp

    gemma_cpp.set_num_threads(threads)
    return gemma_cpp._C._testing.read_bandwidth(nbytes, reps)
