"""What a well-behaved user of a server sees while others misbehave: run as its own process (so
that the misbehaving clients' work in the test process never delays its clocks) by
tests/test_serve_hostile.py.

    python serve_monitor.py URL API_KEY SERVER_PID MAX_TOKENS

Three threads: one streaming client (a long completion with logprobs, so that every token is
one SSE event), restarted whenever a stream ends; one that asks /health every 20 ms; one that
reads the server's RSS every 20 ms. It prints "ready" once the stream has given 50 tokens, and
when its stdin closes prints one JSON line: every gap between two tokens of a stream (seconds),
every /health latency and status, and the RSS samples (the first taken before "ready")."""
import json
import sys
import threading
import time

import httpx
import psutil


def main(url: str, key: str, pid: int, max_tokens: int) -> None:
    stop = threading.Event()
    gaps, health, rss, errors = [], [], [], []
    tokens = [0]
    ready = threading.Event()
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "logprobs": 0, "stream": True}

    def stream():
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            while not stop.is_set():
                last = None
                with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"stream: {r.status_code} {r.read()[:200]!r}")
                        return
                    for line in r.iter_lines():
                        if stop.is_set():
                            return
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                        tokens[0] += 1
                        if tokens[0] >= 50:
                            ready.set()

    def poll_health():
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                except httpx.HTTPError as e:
                    status = repr(e)
                health.append((time.perf_counter() - t0, status))
                time.sleep(0.02)

    def sample_rss():
        proc = psutil.Process(pid)
        while not stop.is_set():
            rss.append(proc.memory_info().rss)
            time.sleep(0.02)

    threads = [threading.Thread(target=f, daemon=True) for f in (sample_rss, stream, poll_health)]
    for t in threads:
        t.start()
    if not ready.wait(60):
        errors.append("the stream gave no 50 tokens in 60 s")
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(30)
    print(json.dumps({"gaps": gaps, "health": health, "rss": rss, "tokens": tokens[0], "errors": errors}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
