"""What reaches the server (gemma_cpp/serve/guard.py) and what a request may ask for: the Host
rule against DNS rebinding, Origin and CORS, the body's type, size and time, the API key
from a file, bounds on every list a request sends, a text too long refused from its length,
work off the event loop, and backpressure. A real uvicorn server on 127.0.0.1, driven by httpx,
raw sockets and the official client. tests/test_serve_hostile.py sends all of it at once
beside a streaming client, against the `gemma-cpp serve` process."""
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from gemma_cpp.serve import create_app  # noqa: E402
from gemma_cpp.serve.app import MAX_MESSAGES, MAX_PROMPTS, MAX_TOOLS  # noqa: E402
from gemma_cpp.serve.guard import DOCS_CSP, PAGE_CSP, HostRule, OriginRule, is_loopback, open_warning  # noqa: E402
from serving import Server, free_port  # noqa: E402

NAME = "tiny"
ALLOWED = "http://app.example:3000"


# ---- the rules alone ------------------------------------------------------------------------

def test_host_rule():
    loop = HostRule("127.0.0.1")
    for ok in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1", "127.0.0.1:80", "127.8.9.1:1", "[::1]",
               "[::1]:8000", "[0:0:0:0:0:0:0:1]:9", "app.localhost:3000"):
        assert loop.allows(ok), ok
    for bad in (None, "", "attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example",
                "localhost.attacker.example", "[::1", "[::1]x", "localhost:port", "user@localhost", "0.0.0.0",
                "10.0.0.1", "[::2]", "localhost/x"):
        assert not loop.allows(bad), bad
    more = HostRule("localhost", ["myhost", ".example.com", "[fe80::1]", "10.0.0.5:9000"])
    for ok in ("myhost", "MyHost:8000", "example.com", "a.b.example.com:1", "[fe80::1]:8000", "10.0.0.5", "[::1]"):
        assert more.allows(ok), ok
    for bad in ("badexample.com", "myhost.evil", "10.0.0.6", "example.com.evil"):
        assert not more.allows(bad), bad
    # Bound beyond loopback: any Host, unless allowed_hosts are given.
    anywhere = HostRule("0.0.0.0")
    assert anywhere.allows("attacker.example") and anywhere.allows("192.168.1.2:8000")
    listed = HostRule("::", ["api.example"])
    assert listed.allows("api.example") and listed.allows("localhost") and not listed.allows("attacker.example")
    assert HostRule("127.0.0.1", ["*"]).allows("attacker.example")
    for bad in ("http://example.com", "a b", ".", "exa/mple", "[zz::1]"):
        with pytest.raises(ValueError, match="allowed hosts"):
            HostRule("127.0.0.1", [bad])


def test_loopback_and_the_open_warning():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host) and open_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "", "192.168.1.5"):
        assert not is_loopback(host)
        line = open_warning(host, None)
        assert line and "\n" not in line and "without an API key" in line and "--api-key-file" in line
        assert open_warning(host, "k") is None


def test_origin_rule():
    rule = OriginRule([ALLOWED, "https://b.example"])
    assert rule.enabled and rule.allows("http://app.example:3000") and rule.allows("HTTPS://b.example:443")
    for bad in ("http://app.example", "https://app.example:3000", "http://evil.example", "null", "file://",
                "http://app.example:3000.evil"):
        assert not rule.allows(bad), bad
    assert not OriginRule().enabled and OriginRule(["*"]).allows("http://anything:1")
    same = OriginRule.same_origin
    assert same("http://127.0.0.1:8000", "127.0.0.1:8000", "http") and same("http://localhost", "localhost", "http")
    assert not same("http://127.0.0.1:8001", "127.0.0.1:8000", "http")
    assert not same("https://127.0.0.1:8000", "127.0.0.1:8000", "http") and not same("null", "localhost", "http")
    for bad in ("localhost:3000", "ftp://x", "http://x/path", "http://u@x", ""):
        with pytest.raises(ValueError, match="allowed origins"):
            OriginRule([bad])


def test_a_token_never_holds_more_characters_than_the_bound(tiny_chat):
    # The length refusal's premise, checked against both tokenizers themselves: C characters
    # make at least ceil(C / max_chars_per_token) tokens, on text of every kind (byte runs,
    # space and newline runs, special tokens matched whole).
    path, _, slow = tiny_chat
    pytest.importorskip("tokenizers")
    import gemma_cpp

    fast = gemma_cpp.GemmaTokenizerFast.from_pretrained(path)
    pieces = slow.convert_ids_to_tokens(list(range(len(slow))))
    rng = np.random.default_rng(0)
    alphabet = list("abcdefgh xyz.,\n\t") + ["  ", "    ", "\u00e9", "\u4f60", "\U0001f642", "<start_of_turn>",
                                             "<end_of_turn>", "the ", "models ", "\u2581"]
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 400)))) for _ in range(300)]
    for tok in (slow, fast):
        bound = tok.max_chars_per_token()
        assert bound == max(len(p) for p in pieces) and bound >= len("<start_of_turn>")
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) >= math.ceil(len(text) / bound), (type(tok).__name__, text, len(ids))
    # Without byte fallback there is no bound (sentencepiece gives one <unk> for a run).
    other = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    other._model.byte_fallback = False
    assert other.max_chars_per_token() is None


# ---- a server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tiny_chat):
    _, model, tok = tiny_chat
    app = create_app(model, tok, model_name=NAME, slots=2, slot_ctx=256, allowed_origins=[ALLOWED],
                     max_request_bytes=1 << 20, read_timeout=1.0, max_waiting=2)
    from fastapi.responses import HTMLResponse

    @app.get("/page")
    async def page():  # what the chat page will be: an HTML page of the server's own
        return HTMLResponse("<!doctype html><title>x</title>")

    @app.get("/boom")
    async def boom():  # an endpoint that fails
        raise RuntimeError("a bug")

    with Server(app) as s:
        s.app = app
        yield s


def _error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    assert r.headers["x-content-type-options"] == "nosniff"
    return err


def test_rebinding_hosts_are_refused(guarded):
    for path in ("/health", "/v1/models"):
        err = _error(httpx.get(guarded.url + path, headers={"Host": "attacker.example"}), 400, "host_not_allowed")
        assert "--allowed-hosts" in err["message"] and "attacker.example" in err["message"]
    r = httpx.post(guarded.url + "/v1/completions", headers={"Host": f"attacker.example:{guarded.port}"},
                   json={"prompt": "hi", "max_tokens": 2})
    _error(r, 400, "host_not_allowed")
    for host in (f"localhost:{guarded.port}", f"127.0.0.1:{guarded.port}", "[::1]", "localhost"):
        assert httpx.get(guarded.url + "/health", headers={"Host": host}).status_code == 200, host
    # Without a Host header at all (HTTP/1.0 allows it): refused too.
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 400")


def test_cross_origin_requests_and_cors(guarded):
    url = guarded.url + "/v1/completions"
    body = b'{"prompt": "hi", "max_tokens": 2}'
    # What any page can send without a preflight: text/plain, from its own origin.
    err = _error(httpx.post(url, content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}),
                 403, "origin_not_allowed")
    assert "--allowed-origins" in err["message"]
    err = _error(httpx.post(url, content=body, headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    _error(httpx.post(url, content=b"prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}),
           415, "unsupported_media_type")
    _error(httpx.post(url, content=body), 415, "unsupported_media_type")  # no Content-Type
    _error(httpx.get(guarded.url + "/v1/models", headers={"Origin": "http://evil.example"}), 403, "origin_not_allowed")
    # Preflights: refused for an origin not allowed, answered for one that is.
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url, headers={"Origin": "http://evil.example", **ask})
    _error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(url, headers={"Origin": ALLOWED, **ask})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization,content-type"
    assert "access-control-allow-credentials" not in r.headers and r.headers["vary"] == "Origin"
    # The request itself, from the allowed origin and from the server's own.
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    assert "Retry-After" in r.headers["access-control-expose-headers"]
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": guarded.url})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_for_any_origin_never_allows_credentials(tiny_chat):
    _, model, tok = tiny_chat
    with Server(create_app(model, tok, model_name=NAME, slots=1, slot_ctx=64, allowed_origins=["*"])) as s:
        r = httpx.options(s.url + "/v1/completions", headers={"Origin": "http://any.example",
                                                              "Access-Control-Request-Method": "POST"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                       headers={"Origin": "http://any.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    with Server(create_app(model, tok, model_name=NAME, slots=1, slot_ctx=64)) as s:  # CORS off
        r = httpx.options(s.url + "/v1/completions", headers={"Origin": "http://localhost:3000",
                                                              "Access-Control-Request-Method": "POST"})
        _error(r, 403, "origin_not_allowed")


def test_hostile_bodies_and_failures_get_openai_errors(guarded):
    url = guarded.url
    # Nested too deep for the JSON parser; a lone surrogate, which is valid JSON but no text.
    r = httpx.post(url + "/v1/completions", content=b"[" * 5000, headers={"Content-Type": "application/json"})
    _error(r, 400, "invalid_json")
    for path, body, param in (("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
                               "messages"),
                              ("/tokenize", {"content": "\ud800"}, "content")):
        r = httpx.post(url + path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        assert _error(r, 400, "invalid_value")["param"] == param
    # At most a slot's context of ids to detokenize.
    r = httpx.post(url + "/detokenize", json={"tokens": [5] * 257})
    assert _error(r, 400, "invalid_value")["param"] == "tokens"
    # An endpoint that fails: OpenAI's 500, with the guard's headers and CORS.
    r = httpx.get(url + "/boom", headers={"Origin": ALLOWED})
    err = _error(r, 500, "internal_error")
    assert err["type"] == "server_error" and r.headers["access-control-allow-origin"] == ALLOWED
    assert httpx.get(url + "/health").status_code == 200


def test_the_guard_sees_the_path_within_a_mount(tiny_chat):
    # Mounted under a prefix (uvicorn's --root-path, Ray's route_prefix), the key and the
    # admission still apply: the guard reads the path within the app.
    from starlette.applications import Starlette
    from starlette.routing import Mount

    _, model, tok = tiny_chat
    inner = create_app(model, tok, model_name=NAME, slots=1, slot_ctx=64, api_key="k", max_waiting=0)
    with Server(Starlette(routes=[Mount("/gemma", app=inner)])) as s:
        r = httpx.post(s.url + "/gemma/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        _error(r, 401, "invalid_api_key")
        r = httpx.post(s.url + "/gemma/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and httpx.get(s.url + "/gemma/health").status_code == 200
        admission = inner.state.gemma.admission
        admission.in_flight = admission.capacity  # full: the gate answers
        try:
            r = httpx.post(s.url + "/gemma/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                           headers={"Authorization": "Bearer k"})
            _error(r, 503, "server_busy")
        finally:
            admission.in_flight = 0
    inner.state.gemma.engine.close()  # a mounted app's lifespan does not run: its engine is closed here


def test_response_headers(guarded):
    for r in (httpx.get(guarded.url + "/health"), httpx.get(guarded.url + "/metrics"),
              httpx.post(guarded.url + "/tokenize", json={"content": "hi"})):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cross-origin-resource-policy"] == "same-origin"
        assert "content-security-policy" not in r.headers  # not a page
    r = httpx.get(guarded.url + "/page")
    assert r.headers["content-security-policy"] == PAGE_CSP and "frame-ancestors 'none'" in PAGE_CSP
    assert "script-src 'self';" in PAGE_CSP  # no inline scripts, nothing from elsewhere
    r = httpx.get(guarded.url + "/docs")  # FastAPI's page, which loads Swagger UI from its CDN
    assert r.status_code == 200 and r.headers["content-security-policy"] == DOCS_CSP


def _read_all(sock, timeout=10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_body_size_and_time(guarded):
    url = guarded.url + "/v1/completions"
    # Over the limit by its Content-Length: 413 before a byte of it is read.
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {20 << 20}\r\n\r\n".encode())
        raw = _read_all(sock)
    assert _status(raw) == 413 and b"request_too_large" in raw and b"connection: close" in raw.lower()
    # Chunked (no Content-Length): refused once the bytes read pass the limit.
    sent = []

    def chunks():
        for _ in range(40):
            sent.append(1)
            yield b"x" * (64 << 10)
    def too_large():
        return _metric(guarded.url, 'gemma_cpp_requests_refused_total{reason="too_large"}')

    before = too_large()
    try:
        r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        _error(r, 413, "request_too_large")
    except httpx.TransportError:  # the server answered and closed while the client still wrote
        pass
    assert too_large() == before + 1
    # A body one byte under the limit is read (and here is not JSON: 400).
    r = httpx.post(url, content=b"x" * ((1 << 20) - 1), headers={"Content-Type": "application/json"})
    _error(r, 400, "invalid_json")
    # Headers, then nothing: 408 after read_timeout (1 s here), and the connection closes.
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
        raw = _read_all(sock)
        waited = time.monotonic() - start
    assert _status(raw) == 408 and b"request_timeout" in raw and 0.9 < waited < 8
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:  # (uvicorn's parser refuses it first)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: x\r\n\r\n{}")
        assert _status(_read_all(sock)) == 400


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/completions", dict(n=17), "n"),
    ("/v1/completions", dict(prompt=["a"] * (MAX_PROMPTS + 1)), "prompt"),
    ("/v1/completions", dict(prompt=["a"] * 8, n=9), "n"),
    ("/v1/completions", dict(stop=["a"] * 5), "stop"),
    ("/v1/completions", dict(stop=["x" * 1001]), "stop"),
    ("/v1/completions", dict(logprobs=21), "logprobs"),
    ("/v1/completions", dict(max_tokens=10 ** 30), "max_tokens"),
    ("/v1/completions", dict(prompt=[[1, 2], "a", 3]), "prompt"),
    ("/v1/chat/completions", dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    ("/v1/chat/completions", dict(tools=[{"type": "function"}] * (MAX_TOOLS + 1)), "tools"),
    ("/v1/chat/completions", dict(tools={"type": "function"}), "tools"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)), "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 257}]),
     "messages[0].content"),
    ("/v1/chat/completions", dict(n=17), "n"),
])
def test_bounds_get_400_naming_the_field(guarded, path, fields, param):
    body = {"model": NAME, "max_tokens": 2, **fields}
    body.setdefault("prompt" if "chat" not in path else "messages",
                    "hi" if "chat" not in path else [{"role": "user", "content": "hi"}])
    r = httpx.post(guarded.url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


class _Spy:
    """The server's tokenizer, recording the length of every text encoded and the thread."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def encode(self, text, **kw):
        self.calls.append((len(text), threading.current_thread().name))
        return self.tok.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_prompt_too_long_is_refused_from_its_length(guarded):
    state = guarded.app.state.gemma
    spy = _Spy(state.prompts.tokenizer)
    real, state.prompts.tokenizer = state.prompts.tokenizer, spy
    try:
        bound, ctx = state.prompts.max_chars, state.engine.slot_ctx
        text = "a " * 200_000  # 200,000 words; at least 400,000 / bound tokens, past a 256-token slot
        r = httpx.post(guarded.url + "/v1/completions", json={"prompt": text, "max_tokens": 4})
        err = _error(r, 400, "context_length_exceeded")
        least = math.ceil(len(text) / bound) + 1  # + BOS
        assert f"at least {least} in the prompt" in err["message"] and f"{len(text)} characters" in err["message"]
        r = httpx.post(guarded.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": text}], "max_tokens": 4})
        _error(r, 400, "context_length_exceeded")
        r = httpx.post(guarded.url + "/tokenize", json={"content": text})
        assert _error(r, 400, "context_length_exceeded")["param"] == "content"
        assert spy.calls == []  # nothing tokenized
        r = httpx.post(guarded.url + "/tokenize", json={"content": "hello world"})
        assert r.json()["tokens"] == state.tokenizer.encode("hello world", add_special_tokens=False)
        r = httpx.post(guarded.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
        assert r.status_code == 200 and len(spy.calls) == 2
        # The longest text that still may fit is tokenized, off the event loop.
        edge = "a" * ((ctx - 1 - 1) * bound)  # BOS + these + one new token = ctx at the least
        r = httpx.post(guarded.url + "/v1/completions", json={"prompt": edge, "max_tokens": 1})
        # It fits or not by its tokens, never by its length alone.
        assert r.status_code == 200 or (r.status_code == 400 and "at least" not in r.json()["error"]["message"])
        assert spy.calls and spy.calls[-1][0] == len(edge) and spy.calls[-1][1].startswith("gemma_cpp-serve")
        r = httpx.post(guarded.url + "/v1/completions", json={"prompt": edge + "a" * bound, "max_tokens": 1})
        _error(r, 400, "context_length_exceeded")
        assert spy.calls[-1][0] == len(edge)  # the longer one was not tokenized
        assert all(thread.startswith("gemma_cpp-serve") for _, thread in spy.calls), spy.calls  # off the loop
    finally:
        state.prompts.tokenizer = real


def test_backpressure_and_clients_that_leave(tiny_chat_long):
    # 2 slots, max_waiting 2: 4 sequences in flight at most; the 5th request gets a 503 with
    # Retry-After; a waiting client that leaves (streamed or not) frees its place. The requests
    # ask for 30,000 tokens: they run for many seconds, far longer than the test needs them.
    _, model, tok = tiny_chat_long
    app = create_app(model, tok, model_name=NAME, slots=2, slot_ctx=32768, max_waiting=2)
    state = app.state.gemma
    long = {"prompt": "hi", "max_tokens": 30000, "ignore_eos": True, "temperature": 0, "stream": True}

    def admitted():
        return state.admission.in_flight

    def engine_holds():
        s = state.engine.stats()
        return s["running"] + s["waiting"]

    def wait_for(cond, what):
        deadline = time.time() + 20
        while not cond():
            assert time.time() < deadline, what
            time.sleep(0.005)

    with Server(app) as s, httpx.Client(base_url=s.url, timeout=30) as c1, \
            httpx.Client(base_url=s.url, timeout=30) as c2:
        # A client slow to send its body holds no place meanwhile (read_timeout is 30 s here).
        slow = socket.create_connection(("127.0.0.1", s.port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        time.sleep(0.3)  # its headers and first bytes read by the server
        closers = []
        for client in (c1, c1, c2, c2):
            cm = client.stream("POST", "/v1/completions", json=long)
            assert cm.__enter__().status_code == 200
            closers.append(cm)
        assert admitted() == 4 and engine_holds() == 4
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        err = _error(r, 503, "server_busy")
        assert r.headers["retry-after"] == "1" and "--max-waiting" in err["message"]
        # Refused before its body is parsed: a body that is not JSON gets the 503, not a 400.
        r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        _error(r, 503, "server_busy")
        slow.close()
        m = httpx.get(s.url + "/metrics").text
        assert 'gemma_cpp_requests_refused_total{reason="busy"} 2\n' in m
        assert "\ngemma_cpp_sequences_admitted 4\n" in m and "\ngemma_cpp_sequences_admitted_max 4\n" in m
        assert state.engine.stats()["waiting"] == 2
        # A waiting stream whose client goes away (the last one submitted waits).
        closers.pop().__exit__(None, None, None)
        wait_for(lambda: admitted() == 3 and engine_holds() == 3, "a closed stream kept its place")
        # A whole (not streamed) request that waits, whose client gives up: its place is freed.
        gave_up = []

        def impatient():
            try:
                httpx.post(s.url + "/v1/completions", json=dict(long, stream=False), timeout=1.5)
            except httpx.ReadTimeout:
                gave_up.append(True)
        t = threading.Thread(target=impatient)
        t.start()
        wait_for(lambda: admitted() == 4 and engine_holds() == 4, "the whole request was not admitted")
        t.join(30)
        assert gave_up
        wait_for(lambda: admitted() == 3 and engine_holds() == 3, "a client that left kept its place")
        # Room for one more.
        cm = c2.stream("POST", "/v1/completions", json=long)
        assert cm.__enter__().status_code == 200
        closers.append(cm)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 503
        for cm in closers:
            cm.__exit__(None, None, None)
        wait_for(lambda: admitted() == 0 and engine_holds() == 0, "closed streams kept their places")
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        # One request of more sequences than that runs, alone.
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 6


def test_the_cli_options(tiny_chat, tmp_path, capsys):
    from gemma_cpp.cli import main

    path = tiny_chat[0]
    key_file = tmp_path / "key"
    assert main(["serve", path, "--api-key", "a", "--api-key-file", str(key_file)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", path, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err
    key_file.write_text("\n")
    assert main(["serve", path, "--api-key-file", str(key_file)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert main(["serve", path, "--allowed-origins", "localhost:3000"]) == 2
    assert "is not a web origin" in capsys.readouterr().err
    assert main(["serve", path, "--allowed-hosts", "http://x"]) == 2
    assert "is not a host name" in capsys.readouterr().err
    assert main(["serve", path, "--max-waiting", "-1"]) == 2
    assert "max_waiting" in capsys.readouterr().err


def test_the_cli_warns_when_open_and_reads_its_key_from_a_file(tiny_chat, tmp_path):
    path = tiny_chat[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "serve", path, "--host", "0.0.0.0", "--port", str(port),
                             "--slots", "1", "--ctx-size", "64", "--quantization", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, GEMMA_CPP_API_KEY=""))
    try:
        lines = [proc.stdout.readline().decode() for _ in range(2)]  # "serving ...", then the warning
        assert lines[0].startswith("serving ")
        assert "without an API key" in lines[1] and "0.0.0.0" in lines[1]
    finally:
        proc.terminate()
        proc.wait(30)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "serve", path, "--host", "0.0.0.0", "--port", str(port),
                             "--slots", "1", "--ctx-size", "64", "--quantization", "none",
                             "--api-key-file", str(key_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from serving import wait_healthy
        wait_healthy(port, proc, 60)
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-from-file", max_retries=0)
        assert ok.completions.create(model=os.path.basename(path), prompt="hi", max_tokens=2).choices
        # Bound beyond loopback without --allowed-hosts: any Host is answered (the key guards it).
        assert httpx.get(url + "/health", headers={"Host": "my-server.lan"}).status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "without an API key" not in out
