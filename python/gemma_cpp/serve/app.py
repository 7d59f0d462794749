"""The OpenAI-compatible server: /v1/completions, /v1/chat/completions (whole and streamed),
/v1/models, /health, /tokenize, /detokenize and /metrics, in the shapes OpenAI's clients and
llama.cpp's server use, over one gemma_cpp.Engine.

Every request in flight advances in the engine's one pass over the weights per iteration, and
a request's tokens do not depend on what else runs (gemma_cpp.engine). Requests are parsed by
hand, so that every bad value gets OpenAI's error shape naming its parameter; unknown fields
are ignored, as OpenAI does."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine import Engine
from ..generation import is_int, is_num

MAX_N = 16          # choices per request
MAX_STOP = 4        # stop strings per request, as OpenAI
MAX_LOGPROBS = 20   # top alternatives per token


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- request fields -------------------------------------------------------------------

def _get_int(body: dict, name: str, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise _bad(name, f"'{name}' must be an integer{rng}, got {v!r}")
    return int(v)


def _get_num(body: dict, name: str, default, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    ok = is_num(v) and v == v
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise _bad(name, f"'{name}' must be a number in {left}{lo}, {hi}], got {v!r}")
    return float(v)


def _get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false, got {v!r}")
    return v


def _stops(body: dict) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"'stop' must be a string or a list of strings, got {v!r}")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "'stop' strings must not be empty")
    return stops


class Sampling:
    """The fields every generation request shares, validated."""

    def __init__(self, body: dict, max_tokens_names: Tuple[str, ...], default_max: Optional[int]):
        self.max_tokens = default_max
        for name in max_tokens_names:
            if body.get(name) is not None:
                self.max_tokens = _get_int(body, name, None, lo=1)
                self.max_tokens_param = name
                break
        else:
            self.max_tokens_param = max_tokens_names[0]
        self.temperature = _get_num(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _get_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = _get_int(body, "top_k", 0, lo=-1)
        self.top_k = 0 if top_k == -1 else top_k  # vLLM's -1: off
        self.min_p = _get_num(body, "min_p", 0.0, 0.0, 1.0)
        self.repetition_penalty = _get_num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
        self.presence_penalty = _get_num(body, "presence_penalty", 0.0, -2.0, 2.0)
        self.frequency_penalty = _get_num(body, "frequency_penalty", 0.0, -2.0, 2.0)
        self.stop = _stops(body)
        self.seed = _get_int(body, "seed", None, lo=0, hi=2 ** 63 - 1)
        self.n = _get_int(body, "n", 1, lo=1, hi=MAX_N)
        self.stream = _get_bool(body, "stream", False)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options", f"'stream_options' must be an object, got {opts!r}")
        self.include_usage = bool(opts and _get_bool(opts, "include_usage", False))
        # vLLM's extension: generate max_tokens whatever the stop tokens (benchmarks use it).
        self.ignore_eos = _get_bool(body, "ignore_eos", False)

    def kwargs(self, choice: int, max_tokens: int, eos: List[int], logprobs: Optional[int]) -> dict:
        kw = dict(max_new_tokens=max_tokens, eos_token_id=[] if self.ignore_eos else list(eos),
                  repetition_penalty=self.repetition_penalty,
                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                  logprobs=logprobs)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                      min_p=self.min_p)
        else:
            kw.update(do_sample=False)
        # n choices of one seeded request: seed, seed + 1, ... (each its own stream).
        kw["seed"] = (self.seed + choice) % 2 ** 64 if self.seed is not None else secrets.randbits(63)
        return kw


# ---- text ---------------------------------------------------------------------------

class TextStream:
    """The text of one choice as its tokens come: deltas that never end inside what may become
    a stop string, and the cut at the first stop string.

    Decoding is incremental (each token decodes a window of a few tokens, not the whole
    sequence) and exact: a window ends only after a plain piece, never after a byte piece or
    a special token, so byte runs (UTF-8 sequences) decode whole, and the windows' texts join
    into the text of the whole sequence (tests/test_serve.py checks it against decode)."""

    def __init__(self, tokenizer, stops: List[str], hold: frozenset):
        self.tokenizer, self.stops, self.hold = tokenizer, stops, hold
        self.ids: List[int] = []
        self.text = ""
        self.sent = 0          # characters of text already handed out
        self.stopped = False
        self._start = self._end = 0  # the open window: ids[_start:] decodes past ids[_start:_end]

    def _decode(self, final: bool = False) -> None:
        if not final and self.ids[-1] in self.hold:
            return
        decode = self.tokenizer.decode
        old = decode(self.ids[self._start:self._end], skip_special_tokens=True)
        new = decode(self.ids[self._start:], skip_special_tokens=True)
        if new.startswith(old):
            self.text += new[len(old):]
        else:  # not seen with Gemma's tokenizers; the whole sequence then
            self.text = max(self.text, decode(self.ids, skip_special_tokens=True), key=len)
        self._start, self._end = self._end, len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        self._decode()
        return self._release()

    def flush(self) -> str:
        """What is left at the end: the open window decoded, no stop string held back for."""
        if not self.ids or self.stopped:
            return ""
        self._decode(final=True)
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        for i, s in sorted(((self.text.find(s, max(0, self.sent - len(s) + 1)), s) for s in self.stops),
                           key=lambda e: e[0]):
            if i >= 0:
                out = self.text[self.sent:i]
                self.text, self.sent, self.stopped = self.text[:i], i, True
                return out
        safe = len(self.text)
        if not final:
            for s in self.stops:  # a tail that may grow into a stop string waits
                for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out


def hold_ids(tokenizer) -> frozenset:
    """Byte pieces and special tokens: a TextStream window never ends on one."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    ids = {i for i, t in enumerate(pieces) if isinstance(t, str) and len(t) == 6 and t.startswith("<0x")
           and t.endswith(">")}
    special = getattr(tokenizer, "_special_id_set", None)
    ids.update(special() if special else tokenizer.all_special_ids)
    return frozenset(ids)


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


# ---- the server -------------------------------------------------------------------------

class _State:
    def __init__(self, model_name: str, api_key: Optional[str]):
        self.model_name, self.api_key = model_name, api_key
        self.engine: Optional[Engine] = None
        self.tokenizer = None
        self.hold: frozenset = frozenset()
        self.eos: List[int] = []
        self.error: Optional[str] = None
        self.created = int(time.time())
        self.http: Dict[str, int] = {}

    def ready(self) -> Engine:
        if self.engine is None:
            if self.error:
                raise ApiError(500, f"the model failed to load: {self.error}", kind="server_error")
            raise ApiError(503, "the model is loading", kind="server_error", code="model_loading")
        failure = self.engine.failure()
        if failure:
            raise ApiError(503, f"the server takes no requests: {failure}", kind="server_error", code="engine_down")
        return self.engine

    def failure(self) -> Optional[str]:
        """Why the server cannot serve (its model failed to load, its engine is down), or None."""
        if self.engine is not None:
            return self.engine.failure()
        return f"the model failed to load: {self.error}" if self.error else None


class _Guard:
    """ASGI middleware (plain, so that streams and their disconnects pass untouched): the API
    key on /v1/*, /tokenize and /detokenize, and a count of responses by status."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.state.api_key
        if key is not None and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else None
            if given is None or not secrets.compare_digest(given.encode("latin-1"), key.encode("utf-8")):
                what = "Missing API key" if given is None else "Incorrect API key provided"
                send_error = ApiError(401, f"{what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await self._counted(send_error.response(), scope, receive, send)
        return await self._counted(self.app, scope, receive, send)

    async def _counted(self, app, scope, receive, send):
        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = str(message["status"])
                self.state.http[status] = self.state.http.get(status, 0) + 1
            await send(message)
        await app(scope, receive, counting_send)


def _eos_ids(model, tokenizer) -> List[int]:
    """The model's stop tokens, and Gemma's <end_of_turn> when the vocabulary has it."""
    eos = model.generation_config.eos_ids()
    if not eos:
        e = model.config.eos_token_id
        eos = [e] if isinstance(e, int) else list(e or [])
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn not in eos:
        eos.append(end_of_turn)
    return eos


def create_app(model=None, tokenizer=None, *, load: Optional[Callable[[], tuple]] = None,
               model_name: Optional[str] = None, slots: int = 8, ctx_size: Optional[int] = None,
               slot_ctx: Optional[int] = None, chunk_size: int = 128, api_key: Optional[str] = None) -> FastAPI:
    """The ASGI app serving `model` (a GemmaForCausalLM) with `tokenizer`; or, given `load`
    (a function returning (model, tokenizer)), one that loads them when it starts, answering
    503 on /health until then. slots, ctx_size / slot_ctx and chunk_size: gemma_cpp.Engine's.
    api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`."""
    if (model is None) == (load is None):
        raise ValueError("create_app needs a model and its tokenizer, or load")
    if model is not None and tokenizer is None:
        raise ValueError("create_app needs the model's tokenizer")
    state = _State(model_name or "gemma_cpp", api_key)

    def start(m, t):
        state.tokenizer = t
        state.hold = hold_ids(t)
        state.eos = _eos_ids(m, t)
        state.engine = Engine(m, slots=slots, ctx_size=ctx_size, slot_ctx=slot_ctx, chunk_size=chunk_size)

    if model is not None:
        start(model, tokenizer)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        loader = None
        if load is not None and state.engine is None:
            def run_load():
                try:
                    start(*load())
                except Exception as e:  # reported by /health and every request
                    state.error = f"{type(e).__name__}: {e}"
            loader = threading.Thread(target=run_load, name="gemma_cpp-load", daemon=True)
            loader.start()
        try:
            yield
        finally:
            if loader is not None:
                loader.join()
            if state.engine is not None:
                state.engine.close()

    app = FastAPI(title="gemma_cpp", lifespan=lifespan)
    app.state.gemma = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    app.add_middleware(_Guard, state=state)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != state.model_name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{state.model_name}`)",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        failure = state.failure()
        if failure:
            return JSONResponse(status_code=500, content={"status": "error", "message": failure})
        if state.engine is None:
            return JSONResponse(status_code=503, content={"status": "loading"})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "gemma_cpp"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        engine = state.ready()
        body = await body_of(request)
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise _bad("content", f"'content' must be a string, got {text!r}")
        add_special = _get_bool(body, "add_special", False)
        ids = state.tokenizer.encode(text, add_special_tokens=add_special)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.slot_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        state.ready()
        body = await body_of(request)
        ids = body.get("tokens")
        vocab = state.engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(is_int(t) and 0 <= t < vocab for t in ids):
            raise _bad("tokens", f"'tokens' must be a list of token ids in [0, {vocab})")
        text = state.tokenizer.decode(ids)
        return {"content": text, "prompt": text}

    @app.get("/metrics")
    async def metrics():
        lines, named = [], set()

        def metric(name, kind, help_, value, labels=""):
            if name not in named:
                named.add(name)
                lines.extend([f"# HELP gemma_cpp_{name} {help_}", f"# TYPE gemma_cpp_{name} {kind}"])
            lines.append(f"gemma_cpp_{name}{labels} {value}")

        s = state.engine.stats() if state.engine is not None else {}
        metric("requests_running", "gauge", "Requests decoding or prefilling now.", s.get("running", 0))
        metric("requests_waiting", "gauge", "Requests waiting for a free slot.", s.get("waiting", 0))
        metric("slots_busy", "gauge", "Slots holding a running request.", s.get("running", 0))
        metric("slots_total", "gauge", "Slots of the engine.", s.get("slots", 0))
        metric("requests_total", "counter", "Sequences submitted to the engine.", s.get("requests", 0))
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.get("prompt_tokens", 0))
        metric("generation_tokens_total", "counter", "Tokens generated.", s.get("generated_tokens", 0))
        metric("prefix_cache_hits_total", "counter", "Requests that reused a slot's cached prefix.",
               s.get("prefix_hits", 0))
        metric("prefix_cache_tokens_total", "counter", "Prompt tokens reused from a slot's cache.",
               s.get("prefix_tokens", 0))
        metric("iterations_total", "counter", "Engine iterations (one pass over the weights each).",
               s.get("iterations", 0))
        for status, count in sorted(state.http.items()):
            metric("http_responses_total", "counter", "HTTP responses by status.", count, f'{{status="{status}"}}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = state.ready()
        body = await body_of(request)
        check_model(body)
        prompts = _completion_prompts(body, state.tokenizer, engine.model.config.vocab_size)
        sampling = Sampling(body, ("max_tokens",), 16)
        lp = body.get("logprobs")
        if lp is not None and (not is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise _bad("logprobs", f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        return await _generate(state, "text_completion", prompts, sampling, lp, "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.ready()
        body = await body_of(request)
        check_model(body)
        messages = _messages(body)
        try:
            ids = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        except ValueError as e:
            raise _bad("messages", f"the chat template refused the messages: {e}")
        sampling = Sampling(body, ("max_completion_tokens", "max_tokens"), None)
        want = _get_bool(body, "logprobs", False)
        top = _get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
        if top is not None and not want:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return await _generate(state, "chat.completion", [list(ids)], sampling,
                               (top or 0) if want else None, "messages")

    return app


def _completion_prompts(body: dict, tokenizer, vocab: int) -> List[List[int]]:
    p = body.get("prompt")
    bad = _bad("prompt", "'prompt' must be a string, a list of token ids, or a list of either")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise bad
    out = []
    for x in items:
        if isinstance(x, str):
            ids = tokenizer.encode(x, add_special_tokens=True)
        elif isinstance(x, list) and x and all(is_int(t) for t in x):
            if not all(0 <= t < vocab for t in x):
                raise _bad("prompt", f"prompt token ids must be in [0, {vocab})")
            ids = list(x)
        else:
            raise bad
        out.append(ids)
    return out


def _messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a role of system, user or "
                                         f"assistant")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or text parts")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


class _Choice:
    """One sequence of a response: its engine request and its text."""

    def __init__(self, index: int, request, stream: TextStream):
        self.index, self.request, self.text = index, request, stream
        self.n_tokens = 0
        self.logprobs: List[tuple] = []  # (token, logprob, top)
        self.finish: Optional[str] = None


async def _generate(state: _State, kind: str, prompts: List[List[int]], sampling: Sampling,
                    logprobs: Optional[int], prompt_param: str):
    engine = state.engine
    ctx = engine.slot_ctx
    # Each prompt's token budget: max_tokens, else the rest of a slot's context.
    limits = [sampling.max_tokens if sampling.max_tokens is not None else max(ctx - len(ids), 0) for ids in prompts]
    for ids, limit in zip(prompts, limits):
        if len(ids) + max(limit, 1) > ctx:
            asked = f"{len(ids) + limit} tokens ({len(ids)} in the {prompt_param}, {limit} for the completion)" \
                if sampling.max_tokens is not None else f"{len(ids)} tokens in the {prompt_param}"
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{asked}. Please reduce the length of the {prompt_param} or the completion.",
                           param=prompt_param if sampling.max_tokens is None else sampling.max_tokens_param,
                           code="context_length_exceeded")
    choices: List[_Choice] = []
    try:
        for p, (ids, limit) in enumerate(zip(prompts, limits)):
            for j in range(sampling.n):
                r = engine.submit(ids, **sampling.kwargs(j, limit, state.eos, logprobs))
                choices.append(_Choice(p * sampling.n + j, r, TextStream(state.tokenizer, sampling.stop, state.hold)))
    except ValueError as e:
        for c in choices:
            c.request.cancel()
        raise _bad(prompt_param, str(e))
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + secrets.token_hex(12)
    created = int(time.time())
    n_prompt = sum(len(ids) for ids in prompts)  # counted once, whatever n is (as OpenAI)
    if not sampling.stream:
        try:
            await asyncio.gather(*(_run_choice(c) for c in choices))
        finally:
            for c in choices:
                c.request.cancel()
        return _whole(state, kind, rid, created, choices, n_prompt, logprobs is not None)
    return StreamingResponse(_stream(state, kind, rid, created, choices, n_prompt, sampling.include_usage,
                                     logprobs is not None),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _choice_events(c: _Choice):
    """One choice's stream: (text delta, logprob entries, finish reason or None), the last one
    with its finish reason."""
    r = c.request
    async for token in r:
        i = c.n_tokens
        c.n_tokens += 1
        entry = []
        if r.logprobs and i < len(r.logprobs):
            entry = [(token, r.logprobs[i], r.top_logprobs[i])]
            c.logprobs.extend(entry)
        delta = c.text.add(token)
        if c.text.stopped:
            r.cancel()
            c.finish = "stop"
            yield delta, entry, "stop"
            return
        if delta or entry:
            yield delta, entry, None
    if r.finish_reason == "error":  # pragma: no cover - the engine failed
        raise ApiError(500, "the engine failed", kind="server_error")
    tail = c.text.flush()
    c.finish = "stop" if r.finish_reason in ("stop", "cancelled") or c.text.stopped else "length"
    yield tail, [], c.finish


async def _run_choice(c: _Choice) -> None:
    async for _ in _choice_events(c):
        pass


async def _merged(choices: List[_Choice]):
    """The events of every choice as they come: (choice, delta, entries, finish)."""
    if len(choices) == 1:
        async for ev in _choice_events(choices[0]):
            yield (choices[0], *ev)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c):
        try:
            async for ev in _choice_events(c):
                await queue.put((c, *ev))
        except Exception as e:  # handed to the reader
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        done = 0
        while done < len(choices):
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            done += item[3] is not None
            yield item
    finally:
        for t in tasks:
            t.cancel()


def _usage(n_prompt: int, choices: List[_Choice]) -> dict:
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


def _logprobs_obj(state: _State, kind: str, entries: List[tuple], offset0: int = 0):
    tok = state.tokenizer
    if kind.startswith("chat"):
        def item(t, lp):
            s = _token_text(tok, t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [dict(item(t, lp), top_logprobs=[item(a, b) for a, b in top]) for t, lp, top in entries]}
    texts = [_token_text(tok, t) for t, _, _ in entries]
    offsets, at = [], offset0
    for s in texts:
        offsets.append(at)
        at += len(s)
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_token_text(tok, a): b for a, b in top} for _, _, top in entries],
            "text_offset": offsets}


def _whole(state: _State, kind: str, rid: str, created: int, choices: List[_Choice], n_prompt: int,
           with_logprobs: bool) -> dict:
    out = []
    for c in choices:
        text = c.text.text
        lp = _logprobs_obj(state, kind, c.logprobs) if with_logprobs else None
        if kind == "text_completion":
            out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish})
        else:
            out.append({"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": c.finish})
    return {"id": rid, "object": kind, "created": created, "model": state.model_name, "choices": out,
            "usage": _usage(n_prompt, choices)}


async def _stream(state: _State, kind: str, rid: str, created: int, choices: List[_Choice], n_prompt: int,
                  include_usage: bool, with_logprobs: bool):
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    sent_chars = {c.index: 0 for c in choices}

    def event(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(c: _Choice, delta: str, entries, finish, role: bool = False) -> dict:
        lp = None
        if with_logprobs and entries:
            lp = _logprobs_obj(state, kind, entries, sent_chars[c.index])
        if kind == "text_completion":
            body = {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": finish}
        else:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            body = {"index": c.index, "delta": d, "logprobs": lp, "finish_reason": finish}
        sent_chars[c.index] += len(delta)
        return {"id": rid, "object": chunk_kind, "created": created, "model": state.model_name, "choices": [body]}

    try:
        if kind != "text_completion":
            for c in choices:
                yield event(chunk(c, "", [], None, role=True))
        async for c, delta, entries, finish in _merged(choices):
            if delta or entries or finish is not None:
                yield event(chunk(c, delta, entries, finish))
        if include_usage:
            yield event({"id": rid, "object": chunk_kind, "created": created, "model": state.model_name,
                         "choices": [], "usage": _usage(n_prompt, choices)})
        yield "data: [DONE]\n\n"
    finally:  # a client gone mid-stream cancels its requests: their slots free at once
        for c in choices:
            c.request.cancel()


def load_model(model_path: Optional[str] = None, *, quantization="auto", dtype=None,
               kv_cache_dtype: str = "float32", model_name: Optional[str] = None, device="cpu") -> tuple:
    """(model, tokenizer, the model's id in the API) for a checkpoint folder or GGUF file, or
    the demo model when model_path is None: what `gemma-cpp serve` and each Ray replica load
    (device: from_pretrained's)."""
    from ..modeling import GemmaForCausalLM
    from ..tokenizer import GemmaTokenizer

    model_path, name = model_source(model_path, model_name)
    tok = GemmaTokenizer.from_pretrained(model_path)
    model = GemmaForCausalLM.from_pretrained(model_path, dtype=dtype, quantization=quantization,
                                             kv_cache_dtype=kv_cache_dtype, device=device)
    return model, tok, name


def model_source(model_path: Optional[str], model_name: Optional[str] = None) -> Tuple[str, str]:
    """(the model's path, its id in the API): the demo model's when model_path is None."""
    if model_path is None:
        from .._demo import demo_model_path
        return demo_model_path(), model_name or "gemma-3-270m-it-qat-q4_k_m"
    return model_path, model_name or os.path.basename(os.path.normpath(model_path))


def run(model_path: Optional[str] = None, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
        ctx_size: Optional[int] = None, api_key: Optional[str] = None, model_name: Optional[str] = None,
        quantization="auto", dtype=None, kv_cache_dtype: str = "float32", threads: Optional[int] = None,
        chunk_size: int = 128, log_level: str = "info", device="cpu") -> None:
    """Loads the model (the demo model when model_path is None; on `device`) in the background
    and serves it with uvicorn until interrupted; /health says 503 until the model is ready."""
    import uvicorn

    from .._C import set_num_threads

    if threads:
        set_num_threads(threads)
    model_path, name = model_source(model_path, model_name)

    def load():
        model, tok, _ = load_model(model_path, quantization=quantization, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                   device=device)
        return model, tok

    app = create_app(load=load, model_name=name, slots=slots, ctx_size=ctx_size, chunk_size=chunk_size,
                     api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["create_app", "run", "ApiError", "TextStream"]

