"""The OpenAI-compatible server: /v1/completions, /v1/chat/completions (whole and streamed),
/v1/models, /health, /tokenize, /detokenize and /metrics, in the shapes OpenAI's clients and
llama.cpp's server use, over one gemma_cpp.Engine.

Every request in flight advances in the engine's one pass over the weights per iteration, and
a request's tokens do not depend on what else runs (gemma_cpp.engine). Requests are parsed by
hand, so that every bad value gets OpenAI's error shape naming its parameter; unknown fields
are ignored, as OpenAI does.

What may reach the endpoints (Host, Origin, key, body type, size and time) is serve/guard.py's.
Here: every list a request sends is bounded (each bound a 400 naming the field); the event
loop only routes: JSON bodies over PARSE_INLINE bytes, tokenizing, template rendering and
detokenizing run on a small pool of threads (sentencepiece releases the GIL while it
encodes); a text too long for a slot is refused from its length alone, without tokenizing it
(`Prompts`); and at most slots + max_waiting sequences are admitted at once, the rest get a
503 with Retry-After (`Admission`)."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine import Engine
from ..generation import chat_stop_ids, is_int, is_num
from .guard import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT, Guard, HostRule, OriginRule, open_warning

MAX_N = 16            # choices per request
MAX_PROMPTS = 64      # prompts in one /v1/completions request
MAX_SEQUENCES = 64    # prompts x n
MAX_STOP = 4          # stop strings per request, as OpenAI
MAX_STOP_CHARS = 1000  # characters of one stop string (each token's text is searched for it)
MAX_LOGPROBS = 20     # top alternatives per token
MAX_MESSAGES = 2048   # chat messages per request (each costs its turn's markup: 5 tokens at least)
MAX_CONTENT_PARTS = 256  # text parts of one message
MAX_TOOLS = 128       # tools per request
PARSE_INLINE = 64 << 10  # a JSON body up to this size is parsed on the event loop (well under 1 ms)
RETRY_AFTER_S = 1     # what a 503 for a full server tells the client to wait


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
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
    if isinstance(stops, list) and len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"'stop' must be a string or a list of strings, got {v!r}")
    if any(s == "" for s in stops):
        raise _bad("stop", "'stop' strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad("stop", f"'stop' strings may have at most {MAX_STOP_CHARS} characters each")
    return stops


def _check_tools(body: dict) -> None:
    """`tools` is not used yet (the model answers in text); a malformed or oversized list is
    still refused, as it will be when it is."""
    tools = body.get("tools")
    if tools is None:
        return
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise _bad("tools", f"'tools' takes at most {MAX_TOOLS} tools, got {len(tools)}")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _bad("tools", "'tools' must be a list of tool objects")


class Sampling:
    """The fields every generation request shares, validated."""

    def __init__(self, body: dict, max_tokens_names: Tuple[str, ...], default_max: Optional[int],
                 defaults: Optional[dict] = None):
        """defaults: the model's own sampling values (GenerationConfig.sampling_defaults) for
        the fields the request leaves out, where OpenAI's defaults would apply otherwise."""
        d = defaults or {}
        self.max_tokens = default_max
        for name in max_tokens_names:
            if body.get(name) is not None:
                self.max_tokens = _get_int(body, name, None, lo=1)
                self.max_tokens_param = name
                break
        else:
            self.max_tokens_param = max_tokens_names[0]
        self.temperature = _get_num(body, "temperature", d.get("temperature", 1.0), 0.0, 2.0)
        self.top_p = _get_num(body, "top_p", d.get("top_p", 1.0), 0.0, 1.0, lo_open=True)
        top_k = _get_int(body, "top_k", d.get("top_k", 0), lo=-1)
        self.top_k = 0 if top_k in (-1, None) else top_k  # vLLM's -1: off
        self.min_p = _get_num(body, "min_p", d.get("min_p", 0.0), 0.0, 1.0)
        self.repetition_penalty = _get_num(body, "repetition_penalty", d.get("repetition_penalty", 1.0), 0.0, 10.0,
                                           lo_open=True)
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
                    if self.text.endswith(s[:k], 0, safe):
                        safe -= k
                        break
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out


def _is_byte_piece(t) -> bool:
    return isinstance(t, str) and len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def hold_ids(tokenizer) -> frozenset:
    """Byte pieces and special tokens: a TextStream window never ends on one."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return _hold_ids(tokenizer, pieces)


def _hold_ids(tokenizer, pieces: list) -> frozenset:
    ids = {i for i, t in enumerate(pieces) if _is_byte_piece(t)}
    special = getattr(tokenizer, "_special_id_set", None)
    ids.update(special() if special else tokenizer.all_special_ids)
    return frozenset(ids)


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _context_error(ctx: int, param: str, prompt_tokens: int, max_tokens: Optional[int], max_tokens_param: str,
                   chars: Optional[int] = None) -> ApiError:
    """OpenAI's context_length_exceeded, for a prompt of prompt_tokens tokens (with `chars`:
    at least that many, counted from its length alone)."""
    least = "at least " if chars is not None else ""
    if max_tokens is not None:
        asked = f"{least}{prompt_tokens + max_tokens} tokens ({least}{prompt_tokens} in the {param}, {max_tokens} " \
                f"for the completion)"
    else:
        asked = f"{least}{prompt_tokens} tokens in the {param}"
    if chars is not None:
        asked += f": its {chars} characters make {least}{prompt_tokens} tokens"
    return ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested {asked}. "
                         f"Please reduce the length of the {param} or the completion.",
                    param=param if max_tokens is None else max_tokens_param, code="context_length_exceeded")


class Prompts:
    """A request's texts as prompt token ids, for one slot's context `ctx`. A text longer than
    a slot can hold is refused from its length alone: with `max_chars` (the tokenizer's
    max_chars_per_token), C characters are at least ceil(C / max_chars) tokens, so no text the
    refusal lets through is longer than ctx * max_chars characters, and no more than that is
    ever tokenized (without a bound, the whole text is, on the pool). Called on the server's
    thread pool."""

    def __init__(self, tokenizer, ctx: int, max_chars: Optional[int]):
        self.tokenizer, self.ctx, self.max_chars = tokenizer, ctx, max_chars

    def encode(self, text: str, add_special: bool, param: str, max_tokens: Optional[int] = None,
               max_tokens_param: str = "max_tokens", room: int = 1) -> List[int]:
        """The text's ids; a 400 when they and max_tokens (else `room` new tokens) cannot fit."""
        need = max_tokens if max_tokens is not None else room
        if self.max_chars is not None:
            tok = self.tokenizer
            bos = 1 if add_special and getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else 0
            least = -(-len(text) // self.max_chars) + bos
            if least + need > self.ctx:
                raise _context_error(self.ctx, param, least, max_tokens, max_tokens_param, chars=len(text))
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special)
        except (RuntimeError, UnicodeError) as e:  # sentencepiece on a lone surrogate ("\ud800"), say
            raise _bad(param, f"the {param} cannot be tokenized: {e}")
        if len(ids) + need > self.ctx:
            raise _context_error(self.ctx, param, len(ids), max_tokens, max_tokens_param)
        return ids


class Admission:
    """Backpressure. The sequences admitted and not yet finished (each decoding in a slot or
    waiting for one; a request counts its prompts x n) are at most slots + max_waiting. A
    request that would pass that gets a 503 with Retry-After, unless nothing else is in flight
    (so that a request of more sequences than that still runs, alone). A request's place is
    freed when it ends, and when its client leaves (waiting or not). Used on the event loop
    only: no lock.

    The guard asks first (`enter`, once the body is read, before it is parsed): a generation
    request that arrives while the admitted sequences and the requests still on their way to
    `take` (counted as one sequence each) fill every place gets its 503 there, for a few
    microseconds, so that a crowd arriving at once is not parsed and tokenized only to be
    refused. refused: the server's refusal counts; a 503 from `take` is counted as "busy"
    (the guard counts its own)."""

    ARRIVING = "gemma_cpp.arriving"  # the scope key of a request between enter and take

    def __init__(self, slots: int, max_waiting: int, refused: Dict[str, int]):
        self.slots, self.max_waiting, self.refused = slots, max_waiting, refused
        self.in_flight = 0
        self.arriving = 0
        refused.setdefault("busy", 0)

    @property
    def capacity(self) -> int:
        return self.slots + self.max_waiting

    def _message(self, sequences: str = "") -> str:
        return (f"the server is busy: {self.in_flight} sequences are decoding or waiting for one of its {self.slots} "
                f"slots, and it queues at most {self.max_waiting} (--max-waiting){sequences}; retry in "
                f"{RETRY_AFTER_S} s")

    def enter(self, scope: dict) -> Optional[str]:
        """The guard's question for a generation request: why it is refused now, or None (it is
        then counted as arriving until `take` or `leave`)."""
        if self.in_flight + self.arriving >= self.capacity:
            return self._message()
        self.arriving += 1
        scope[self.ARRIVING] = True
        return None

    def leave(self, scope: dict) -> None:
        if scope.pop(self.ARRIVING, False):
            self.arriving -= 1

    def take(self, sequences: int, scope: Optional[dict] = None) -> "_Ticket":
        if scope is not None:
            self.leave(scope)
        if self.in_flight and self.in_flight + sequences > self.capacity:
            self.refused["busy"] += 1
            raise ApiError(503, self._message(f"; this request adds {sequences}"), kind="server_error",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += sequences
        return _Ticket(self, sequences)


class _Ticket:
    def __init__(self, admission: Admission, sequences: int):
        self.admission, self.sequences = admission, sequences

    def release(self) -> None:
        self.admission.in_flight -= self.sequences
        self.sequences = 0


# ---- the server -------------------------------------------------------------------------

class _Gate:
    """The guard's view of the admission (serve/guard.py's `gate`), once the model is loaded."""

    def __init__(self, state: "_State"):
        self.state = state

    def enter(self, scope: dict) -> Optional[str]:
        return self.state.admission.enter(scope) if self.state.admission is not None else None

    def leave(self, scope: dict) -> None:
        if self.state.admission is not None:
            self.state.admission.leave(scope)


class _State:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.engine: Optional[Engine] = None
        self.tokenizer = None
        self.hold: frozenset = frozenset()
        self.eos: List[int] = []
        self.sampling_defaults: dict = {}  # the model's, for fields a request leaves out
        # Shutdown (begin_shutdown): no new requests once draining; the running ones are cut
        # (cancelled, finish reason "abort") when the grace period ends, or at a second signal.
        self.live: set = set()  # the _Choices running now
        self.draining = False
        self.shutdown_timeout = 5.0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.prompts: Optional[Prompts] = None
        self.admission: Optional[Admission] = None
        self.error: Optional[str] = None
        self.created = int(time.time())
        self.statuses: Dict[str, int] = {}   # responses by status (the guard counts them)
        self.refused: Dict[str, int] = {}    # requests the guard refused, by reason
        # Tokenizing, detokenizing, template rendering and large JSON bodies: off the event loop.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gemma_cpp-serve")

    async def run(self, fn: Callable, *args):
        """fn(*args) on the server's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def begin_shutdown(self, first: bool) -> None:
        """On the event loop, at a SIGINT / SIGTERM (serve's server calls it): the first stops
        new requests and cuts the running ones after shutdown_timeout seconds; a second cuts
        them now."""
        self.draining = True
        if first:
            self.loop.call_later(self.shutdown_timeout, self.cut)
        else:
            self.cut()

    def cut(self) -> None:
        """Cancels every running request: a stream ends with a chunk whose finish reason is
        "abort" and [DONE]; a whole request gets a 503."""
        for c in list(self.live):
            c.cut = True
            c.request.cancel()

    def ready(self) -> Engine:
        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
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


def _sampling_defaults(model) -> dict:
    """The model's own sampling values, checked by the rules a request's fields are (Sampling):
    a value the server would refuse is left out (a request then gets OpenAI's default for it)
    rather than failing every request."""
    out = {}
    for k, v in model.generation_config.sampling_defaults.items():
        try:
            Sampling({k: v}, ("max_tokens",), None)
        except ApiError:
            continue
        out[k] = v
    return out


def create_app(model=None, tokenizer=None, *, load: Optional[Callable[[], tuple]] = None,
               model_name: Optional[str] = None, slots: int = 8, ctx_size: Optional[int] = None,
               slot_ctx: Optional[int] = None, chunk_size: int = 128, api_key: Optional[str] = None,
               host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT,
               max_waiting: Optional[int] = None, freeze_heap: bool = False,
               generation_config: str = "auto", shutdown_timeout: float = 5.0) -> FastAPI:
    """The ASGI app serving `model` (a GemmaForCausalLM) with `tokenizer`; or, given `load`
    (a function returning (model, tokenizer)), one that loads them when it starts, answering
    503 on /health until then. slots, ctx_size / slot_ctx and chunk_size: gemma_cpp.Engine's.

    What may reach it (serve/guard.py): api_key: when set, /v1/*, /tokenize and /detokenize
    need `Authorization: Bearer <key>`. host: the address the server is bound to; a loopback
    one (the default) answers only loopback Host headers and allowed_hosts (names, `.domain`,
    or `*`). allowed_origins: web origins whose pages may call it (CORS; `*` for any).
    max_request_bytes, read_timeout: a request body's bounds (413, 408). max_waiting: sequences
    that may wait for a slot beyond the busy ones (default 4 x slots); more get a 503.

    generation_config: "auto" (the default, as vLLM's): the sampling fields a request leaves
    out (temperature, top_k, top_p, min_p, repetition_penalty) take the values the model's own
    generation config states (a folder's generation_config.json; a GGUF file's architecture's
    known ones), where OpenAI's defaults (temperature 1, no top-k or top-p) apply otherwise;
    "none": OpenAI's defaults always. /v1/models shows what applies.

    shutdown_timeout: at a SIGINT or SIGTERM (`run`'s server), the seconds running requests have
    to finish before they are cut (a stream then ends with finish reason "abort" and [DONE], a
    whole request gets a 503); new requests get a 503 at once.

    freeze_heap: for a process that is this server's own (`gemma-cpp serve`, a Ray replica):
    once the model is loaded, every object then alive leaves the garbage collector's
    generations (gc.freeze). The tokenizer's vocabulary (Gemma 3: 262,144 pieces in lists and
    dicts) made each full collection walk about a million references: a 35-50 ms pause of the
    event loop, which a burst of requests triggers."""
    if (model is None) == (load is None):
        raise ValueError("create_app needs a model and its tokenizer, or load")
    if model is not None and tokenizer is None:
        raise ValueError("create_app needs the model's tokenizer")
    for name, v in (("max_request_bytes", max_request_bytes), ("max_waiting", max_waiting)):
        if v is not None and (not is_int(v) or v < (1 if name == "max_request_bytes" else 0)):
            raise ValueError(f"{name} must be an int >= {1 if name == 'max_request_bytes' else 0}, got {v!r}")
    if generation_config not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {generation_config!r}")
    if not is_num(read_timeout) or not read_timeout > 0:
        raise ValueError(f"read_timeout must be a number of seconds > 0, got {read_timeout!r}")
    hosts, origins = HostRule(host, allowed_hosts), OriginRule(allowed_origins)
    state = _State(model_name or "gemma_cpp")
    if not is_num(shutdown_timeout) or not shutdown_timeout >= 0:
        raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
    state.shutdown_timeout = float(shutdown_timeout)

    def start(m, t):
        pieces = t.convert_ids_to_tokens(list(range(len(t))))
        engine = Engine(m, slots=slots, ctx_size=ctx_size, slot_ctx=slot_ctx, chunk_size=chunk_size)
        state.tokenizer = t
        state.hold = _hold_ids(t, pieces)
        state.eos = chat_stop_ids(m, t)
        if generation_config == "auto":
            state.sampling_defaults = _sampling_defaults(m)
        bound = getattr(t, "max_chars_per_token", None)
        state.prompts = Prompts(t, engine.slot_ctx, bound() if bound is not None else None)
        state.admission = Admission(engine.slots, 4 * engine.slots if max_waiting is None else int(max_waiting),
                                    state.refused)
        state.engine = engine
        if freeze_heap:
            del pieces
            gc.collect()
            gc.freeze()

    if model is not None:
        start(model, tokenizer)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        import anyio

        # anyio imports its asyncio backend on first use, which a streamed response is: ~40 ms
        # on the event loop, in the middle of serving. Now, before any request.
        await anyio.sleep(0)
        state.loop = asyncio.get_running_loop()
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
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gemma_cpp", lifespan=lifespan)
    app.state.gemma = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    app.add_middleware(Guard, hosts=hosts, origins=origins, api_key=api_key, max_request_bytes=max_request_bytes,
                       read_timeout=read_timeout, statuses=state.statuses, refused=state.refused,
                       gate=_Gate(state), retry_after=RETRY_AFTER_S)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw or b"null") if len(raw) <= PARSE_INLINE else await state.run(json.loads, raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
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
        # sampling_defaults: what a request that leaves those fields out samples with (the model's
        # generation config; --generation-config none: OpenAI's defaults, shown as {}).
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "gemma_cpp",
                                            "sampling_defaults": dict(state.sampling_defaults)}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        engine = state.ready()
        body = await body_of(request)
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise _bad("content", f"'content' must be a string, got {text!r}")
        add_special = _get_bool(body, "add_special", False)

        def encode():  # at most a slot's context, as vLLM's: a longer text is refused unread
            ids = state.prompts.encode(text, add_special, "content", room=0)
            return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.slot_ctx})
        return await state.run(encode)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        engine = state.ready()
        body = await body_of(request)
        ids = body.get("tokens")
        vocab = state.engine.model.config.vocab_size

        def decode():
            if not isinstance(ids, list) or not all(is_int(t) and 0 <= t < vocab for t in ids):
                raise _bad("tokens", f"'tokens' must be a list of token ids in [0, {vocab})")
            if len(ids) > engine.slot_ctx:
                raise _bad("tokens", f"'tokens' takes at most {engine.slot_ctx} ids (a slot's context), got {len(ids)}")
            text = state.tokenizer.decode(ids)
            return JSONResponse({"content": text, "prompt": text})
        return await state.run(decode)

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
        adm = state.admission
        metric("sequences_admitted", "gauge", "Sequences admitted by the server: decoding, or waiting for a slot.",
               adm.in_flight if adm else 0)
        metric("sequences_admitted_max", "gauge", "The most sequences admitted at once: slots + --max-waiting.",
               adm.capacity if adm else 0)
        for reason, count in sorted(state.refused.items()):
            metric("requests_refused_total", "counter", "Requests refused before any work, by reason (host, origin, "
                   "api_key, media_type, too_large, timeout, bad_length; busy: a 503 for a full server).", count,
                   f'{{reason="{reason}"}}')
        for status, count in sorted(state.statuses.items()):
            metric("http_responses_total", "counter", "HTTP responses by status.", count, f'{{status="{status}"}}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.ready()
        body = await body_of(request)
        check_model(body)
        items = _completion_items(body)
        sampling = Sampling(body, ("max_tokens",), 16, state.sampling_defaults)
        lp = body.get("logprobs")
        if lp is not None and (not is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise _bad("logprobs", f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        _check_sequences(len(items), sampling.n)
        ticket = state.admission.take(len(items) * sampling.n, request.scope)
        try:
            vocab = state.engine.model.config.vocab_size
            prompts = await state.run(_completion_prompts, items, state.prompts, vocab, sampling)
            return await _generate(state, request, ticket, "text_completion", prompts, sampling, lp, "prompt")
        finally:
            ticket.release()  # a stream has taken it over (its sequences end with the stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.ready()
        body = await body_of(request)
        check_model(body)
        messages = await state.run(_messages, body)
        _check_tools(body)
        sampling = Sampling(body, ("max_completion_tokens", "max_tokens"), None, state.sampling_defaults)
        want = _get_bool(body, "logprobs", False)
        top = _get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
        if top is not None and not want:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        ticket = state.admission.take(sampling.n, request.scope)
        try:
            ids = await state.run(_chat_prompt, messages, state.tokenizer, state.prompts, sampling)
            return await _generate(state, request, ticket, "chat.completion", [ids], sampling,
                                   (top or 0) if want else None, "messages")
        finally:
            ticket.release()

    return app


def _check_sequences(prompts: int, n: int) -> None:
    if prompts * n > MAX_SEQUENCES:
        raise _bad("n", f"a request makes at most {MAX_SEQUENCES} sequences (prompts x n), got {prompts} x {n}")


def _completion_items(body: dict) -> list:
    """The prompts of a completion request (strings or token-id lists), by their shape only:
    their contents are checked on the pool (_completion_prompts)."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and is_int(p[0])):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p[:MAX_PROMPTS + 1]):
        if len(p) > MAX_PROMPTS:
            raise _bad("prompt", f"'prompt' takes at most {MAX_PROMPTS} prompts, got {len(p)}")
        return p
    raise _bad("prompt", "'prompt' must be a string, a list of token ids, or a list of either")


def _completion_prompts(items: list, prompts: Prompts, vocab: int, sampling: Sampling) -> List[List[int]]:
    out = []
    for x in items:
        if isinstance(x, str):
            ids = prompts.encode(x, True, "prompt", sampling.max_tokens, sampling.max_tokens_param)
        elif isinstance(x, list) and x and all(is_int(t) for t in x):
            if not all(0 <= t < vocab for t in x):
                raise _bad("prompt", f"prompt token ids must be in [0, {vocab})")
            ids = list(x)
        else:
            raise _bad("prompt", "'prompt' must be a string, a list of token ids, or a list of either")
        out.append(ids)
    return out


def _chat_prompt(messages: List[dict], tokenizer, prompts: Prompts, sampling: Sampling) -> List[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except ValueError as e:
        raise _bad("messages", f"the chat template refused the messages: {e}")
    # apply_chat_template's own tokenization: the rendered text, no BOS added to its <bos>.
    return prompts.encode(text, False, "messages", sampling.max_tokens, sampling.max_tokens_param)


def _messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    if len(msgs) > MAX_MESSAGES:
        raise _bad("messages", f"'messages' takes at most {MAX_MESSAGES} messages, got {len(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a role of system, user or "
                                         f"assistant")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            if len(content) > MAX_CONTENT_PARTS:
                raise _bad(f"messages[{i}].content", f"messages[{i}].content takes at most {MAX_CONTENT_PARTS} "
                                                     f"parts, got {len(content)}")
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
        self.cut = False  # cancelled by the server's shutdown (finish reason "abort")


async def _watch_disconnect(receive, choices: List[_Choice]) -> None:
    """Cancels the choices when the client goes away (a whole response is not written until
    the end, so nothing else notices; a stream's writes would, but only at its next token)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            for c in choices:
                c.request.cancel()
            return


class _Stream(StreamingResponse):
    """A streamed response that runs `on_close` once it is over, however it ends (a client
    gone before the first chunk included, where the body's generator never starts)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _generate(state: _State, request: Request, ticket: _Ticket, kind: str, prompts: List[List[int]],
                    sampling: Sampling, logprobs: Optional[int], prompt_param: str):
    engine = state.engine
    ctx = engine.slot_ctx
    # Each prompt's token budget: max_tokens, else the rest of a slot's context.
    limits = [sampling.max_tokens if sampling.max_tokens is not None else max(ctx - len(ids), 0) for ids in prompts]
    for ids, limit in zip(prompts, limits):
        if len(ids) + max(limit, 1) > ctx:
            raise _context_error(ctx, prompt_param, len(ids), sampling.max_tokens, sampling.max_tokens_param)
    choices: List[_Choice] = []
    try:
        for p, (ids, limit) in enumerate(zip(prompts, limits)):
            for j in range(sampling.n):
                r = engine.submit(ids, **sampling.kwargs(j, limit, state.eos, logprobs))
                choices.append(_Choice(p * sampling.n + j, r, TextStream(state.tokenizer, sampling.stop, state.hold)))
    except BaseException as e:
        for c in choices:
            c.request.cancel()
        if isinstance(e, ValueError):
            raise _bad(prompt_param, str(e))
        if isinstance(e, RuntimeError) and engine.failure():  # closed or failed meanwhile
            raise ApiError(503, f"the server takes no requests: {engine.failure()}", kind="server_error",
                           code="engine_down")
        raise
    watcher = asyncio.ensure_future(_watch_disconnect(request.receive, choices))
    state.live.update(choices)
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + secrets.token_hex(12)
    created = int(time.time())
    n_prompt = sum(len(ids) for ids in prompts)  # counted once, whatever n is (as OpenAI)
    if not sampling.stream:
        try:
            await asyncio.gather(*(_run_choice(c) for c in choices))
        finally:
            watcher.cancel()
            state.live.difference_update(choices)
            for c in choices:
                c.request.cancel()
        if any(c.finish == "abort" for c in choices):
            raise ApiError(503, "the server is shutting down: this request was cut before it finished",
                           kind="server_error", code="shutting_down")
        # The body (each logprob's token decoded, then JSON) on the pool: with n and logprobs it
        # can be large.
        return await state.run(lambda: JSONResponse(_whole(state, kind, rid, created, choices, n_prompt,
                                                           logprobs is not None)))
    held = _Ticket(ticket.admission, ticket.sequences)  # the stream's now: released when it is over
    ticket.sequences = 0

    def close():
        watcher.cancel()
        state.live.difference_update(choices)
        for c in choices:
            c.request.cancel()
        held.release()
    return _Stream(_stream(state, kind, rid, created, choices, n_prompt, sampling.include_usage, logprobs is not None),
                   close, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
    if c.cut and r.finish_reason == "cancelled" and not c.text.stopped:
        c.finish = "abort"  # the server's shutdown cut it (vLLM's reason for an aborted request)
    else:
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
        from .._demo import DEMO_MODEL_NAME, demo_model_path
        return demo_model_path(), model_name or DEMO_MODEL_NAME
    return model_path, model_name or os.path.basename(os.path.normpath(model_path))


def run(model_path: Optional[str] = None, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
        ctx_size: Optional[int] = None, api_key: Optional[str] = None, model_name: Optional[str] = None,
        quantization="auto", dtype=None, kv_cache_dtype: str = "float32", threads: Optional[int] = None,
        chunk_size: int = 128, log_level: str = "info", device="cpu", **guard) -> None:
    """Loads the model (the demo model when model_path is None; on `device`) in the background
    and serves it with uvicorn until a SIGINT / SIGTERM (then as create_app's shutdown_timeout
    says; a second signal: at once); /health says 503 until the model is ready. guard:
    create_app's allowed_hosts, allowed_origins, max_request_bytes, read_timeout, max_waiting,
    generation_config and shutdown_timeout (host is the address served on)."""
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
                     api_key=api_key, host=host, freeze_heap=True, **guard)
    warning = open_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    state = app.state.gemma

    class Server(uvicorn.Server):
        """uvicorn's server with the shutdown create_app's shutdown_timeout describes: a first
        SIGINT / SIGTERM drains (uvicorn stops accepting and waits for the connections, which
        the app cuts after the grace period), a second cuts them now, so that the streams end
        and the server exits at once, through the app's own shutdown (uvicorn's forced exit
        skips it, and the lifespan task's cancellation printed a traceback); a third forces
        uvicorn out. No signal is raised again once it is over, as uvicorn's own handler would
        (a SIGTERM would then kill the process, a SIGINT raise KeyboardInterrupt): the process
        exits with 0."""

        signals = 0

        def handle_exit(self, sig, frame):
            self.signals += 1
            self.should_exit = True
            if self.signals > 2:
                self.force_exit = True
            elif state.loop is not None:
                state.loop.call_soon_threadsafe(state.begin_shutdown, self.signals == 1)

    # uvicorn's own deadline comes after the app's cut, which ends every stream at once.
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=state.shutdown_timeout + 1)).run()


__all__ = ["create_app", "run", "ApiError", "TextStream"]

