"""`gemma-cpp serve`'s shutdown (issue 26, part 6), on a real process: a SIGINT or SIGTERM lets
running requests finish for --shutdown-timeout seconds, then ends each stream with a chunk whose
finish reason is "abort" and [DONE], answers each whole request still running with a 503 in
OpenAI's error shape, and exits with 0 and no traceback within the grace period plus 2 s; a
second signal exits at once, also without a traceback."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from serving import free_port, wait_healthy  # noqa: E402

# The exit's deadline is a time, which a busy neighbour on the other core stretches (the suite
# failed this file once on 2 workers, its output not kept; alone it passed every run, the exit
# about 0.5 s past the grace period). Alone: ~9 s that the other worker waits.
pytestmark = pytest.mark.alone

GRACE = 1.0
# 30,000 tokens: the tiny model makes a few thousand a second, so that the requests are still
# running when the grace period ends (the demo model takes about a minute for 3,000).
BODY = {"model": "m", "prompt": "Once upon a time", "max_tokens": 30000, "ignore_eos": True, "temperature": 0}


def _serve(path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "serve", path, "--port", str(port), "--slots", "2",
                             "--ctx-size", "65536", "--quantization", "none", "--model-name", "m",
                             "--shutdown-timeout", str(GRACE)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_healthy(port, proc, 60)
    return port, proc


class _Stream(threading.Thread):
    """A 30,000-token completion streamed: its events as they come; `started` once tokens flow."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.events, self.error = port, [], None
        self.started = threading.Event()

    def run(self):
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{self.port}/v1/completions", json={**BODY, "stream": True},
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        if len(self.events) > 20:
                            self.started.set()
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.started.set()


class _Whole(threading.Thread):
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.response, self.error = port, None, None

    def run(self):
        try:
            self.response = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json=BODY, timeout=60)
        except Exception as e:
            self.error = e


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_drains_then_cuts_and_exits_cleanly(tiny_chat_long, sig):
    port, proc = _serve(tiny_chat_long[0])
    try:
        stream, whole = _Stream(port), _Whole(port)
        stream.start()
        whole.start()
        assert stream.started.wait(30) and stream.error is None
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=GRACE + 30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    stream.join(10)
    whole.join(10)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert took <= GRACE + 2, (took, out)
    # The stream ran through the grace period, then its last chunk says it was cut, then [DONE].
    assert stream.error is None and stream.events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in stream.events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("abort") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert 20 < len(chunks) < BODY["max_tokens"]
    # The whole request, still running at the cut: a 503 in OpenAI's error shape.
    assert whole.error is None and whole.response.status_code == 503
    err = whole.response.json()["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"]


def test_a_second_signal_exits_at_once(tiny_chat_long):
    port, proc = _serve(tiny_chat_long[0])
    try:
        stream = _Stream(port)
        stream.start()
        assert stream.started.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out, out
    assert took < GRACE, (took, out)  # before the grace period would have ended
    assert proc.returncode == 0, out
