"""Continuous batching from Python: `Engine(model, slots=8)` runs many requests at once.

The scheduler (csrc/engine/scheduler.h) runs on a C++ thread of its own, with the GIL
released: every iteration decodes one token of each generating request and one chunk of a
waiting prompt, and requests join and leave between iterations. A request's tokens are the
same bits alone or beside any others (the kernels are chosen by the kind of work, never by the
batch), and the same as `model.generate` on that prompt with the same arguments.

    engine = gemma_cpp.Engine(model, slots=8)
    request = engine.submit(prompt_ids, max_new_tokens=64, do_sample=True, seed=1)
    async for token in request: ...      # or: for token in request: ...
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Dict, List, Optional

import numpy as np

from ._C import Scheduler
from .generation import GenerationConfig, is_int
from .modeling import GemmaForCausalLM

FINISH_REASONS = {1: "stop", 2: "length", 3: "cancelled", 4: "error"}


class Request:
    """One submitted request. Iterate it (`for` or `async for`) for its new token ids as they
    come; `result()` waits for all of them. After the end: `tokens` (every new token) and
    `finish_reason`: "stop" (an eos token, included in `tokens`), "length" (max_new_tokens),
    "cancelled" or "error" (iterating then raises RuntimeError)."""

    def __init__(self, scheduler: Scheduler, request_id: int, prompt: List[int]):
        self.id = request_id
        self.prompt = prompt
        self.tokens: List[int] = []
        # With logprobs: each token's log-probability (the model's log-softmax, before any
        # penalty or warping) and the top alternatives, [(token, logprob)] best first.
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[tuple]] = []
        self.finish_reason: Optional[str] = None
        self._scheduler = scheduler
        self._cond = threading.Condition()
        self._unread: collections.deque = collections.deque()
        self._waiters: list = []  # (loop, future) of async readers

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stops the request at the scheduler's next iteration; its slot is free again then."""
        if not self.done:
            self._scheduler.cancel(self.id)

    def _push(self, token: int, finish: int, logprob=None, top=None) -> list:  # the engine's event thread
        """Takes one event; returns the async readers to wake, [(loop, future)]."""
        with self._cond:
            if token >= 0:
                self.tokens.append(token)
                self._unread.append(token)
                if logprob is not None:
                    self.logprobs.append(logprob)
                    self.top_logprobs.append(top)
            if finish:
                self.finish_reason = FINISH_REASONS.get(finish, "error")
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        return waiters

    def _end(self):
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.id}: the engine failed: {self._scheduler.error()}")

    def __iter__(self):
        return self

    def __next__(self) -> int:
        with self._cond:
            while not self._unread and not self.done:
                self._cond.wait()
            if self._unread:
                return self._unread.popleft()
        self._end()
        raise StopIteration

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        while True:
            with self._cond:
                if self._unread:
                    return self._unread.popleft()
                if self.done:
                    break
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            except asyncio.CancelledError:  # the reader went away: so does the request
                self.cancel()
                raise
        self._end()
        raise StopAsyncIteration

    def result(self, timeout: Optional[float] = None) -> List[int]:
        """Every new token, once the request has ended (TimeoutError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
        self._end()
        return list(self.tokens)


def _wake(futures) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


class Engine:
    """Serves many requests at once on one model (a GemmaForCausalLM).

    slots: sequences decoded together. Each slot holds up to `slot_ctx` tokens (prompt + new
    tokens); or give `ctx_size`, the tokens of all slots together (split evenly, as llama.cpp's
    --ctx-size). Default: min(max_position_embeddings, 4096) per slot. The KV cache for all of
    them is allocated here, once (sliding-window layers keep only their window per slot; the
    model's kv_cache_dtype applies). chunk_size: prompt tokens per iteration; a long prompt
    holds the running requests up for one chunk at most. With a prompt of at most chunk_size
    tokens a request's tokens are the same bits as generate()'s.

    A finished request's slot keeps its prompt's whole chunks: a later request whose prompt
    starts with them (a system prompt, a chat's earlier turns) computes only the rest, with
    the same bits as from scratch (csrc/engine/scheduler.cpp says when a slot can give them)."""

    def __init__(self, model: GemmaForCausalLM, slots: int = 8, ctx_size: Optional[int] = None,
                 slot_ctx: Optional[int] = None, chunk_size: int = 128):
        if not isinstance(model, GemmaForCausalLM):
            raise TypeError(f"Engine serves a GemmaForCausalLM, got {type(model).__name__}")
        for name, v in (("slots", slots), ("chunk_size", chunk_size)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        max_pos = int(model.config.max_position_embeddings)
        if ctx_size is not None and slot_ctx is not None:
            raise ValueError("give ctx_size (all slots' tokens) or slot_ctx (one slot's), not both")
        if ctx_size is not None:
            if not is_int(ctx_size) or ctx_size < 2 * slots:
                raise ValueError(f"ctx_size must be an int >= 2 tokens per slot ({2 * slots}), got {ctx_size!r}")
            slot_ctx = ctx_size // slots
        elif slot_ctx is None:
            slot_ctx = min(max_pos, 4096)
        if not is_int(slot_ctx) or not 2 <= slot_ctx <= max_pos:
            raise ValueError(f"a slot's context must be an int in [2, max_position_embeddings = {max_pos}], "
                             f"got {slot_ctx!r}")
        self.model = model
        self._scheduler = Scheduler(model._engine, int(slots), int(slot_ctx), int(chunk_size))
        self._requests: Dict[int, Request] = {}
        self._lock = threading.Lock()  # submit's registration against the event thread
        self._closed = threading.Event()
        self._closing = False
        # The event thread holds what it needs, not the engine: an engine nobody holds is
        # collected, and closes.
        self._events = threading.Thread(target=_dispatch, args=(self._scheduler, self._requests, self._lock,
                                                                self._closed),
                                        name="gemma_cpp-engine-events", daemon=True)
        self._events.start()

    @property
    def slots(self) -> int:
        return self._scheduler.slots

    @property
    def slot_ctx(self) -> int:
        return self._scheduler.slot_ctx

    def submit(self, prompt_ids, generation_config: Optional[GenerationConfig] = None, *,
               logprobs: Optional[int] = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               **kwargs) -> Request:
        """Queues one prompt (token ids: a list, a 1-D array, [1, L], or a tokenizer's output)
        with generate's arguments (max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id, seed), and OpenAI's presence_penalty and
        frequency_penalty (in [-2, 2]; they count the new tokens only). logprobs (0-20): each
        token's log-probability, and that many top alternatives (Request.logprobs,
        Request.top_logprobs). ValueError, before any work, when the request does not fit a slot."""
        if self._closing:
            raise RuntimeError("the engine is closed")
        for name in ("output_logits", "return_dict_in_generate"):
            if kwargs.get(name):
                raise TypeError(f"Engine.submit does not support {name}")
        if isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
        if hasattr(prompt_ids, "detach"):  # a torch tensor
            prompt_ids = prompt_ids.detach().cpu().numpy()
        ids = np.asarray(prompt_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"prompt_ids must be one sequence of token ids, got an array of shape "
                             f"{ids.shape} and dtype {ids.dtype}")
        prompt = [int(t) for t in ids]
        if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an int in [0, 20] or None, got {logprobs!r}")
        _, params = self.model._sampling(generation_config, presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty, **kwargs)
        with self._lock:
            request_id = self._scheduler.submit(prompt, params, -1 if logprobs is None else int(logprobs))
            request = self._requests[request_id] = Request(self._scheduler, request_id, prompt)
        return request

    def generate(self, prompts, **kwargs) -> List[List[int]]:
        """Submits every prompt, waits for all: their new tokens, in order."""
        requests = [self.submit(p, **kwargs) for p in prompts]
        return [r.result() for r in requests]

    def stats(self) -> dict:
        """running, waiting, slots, and totals: requests, prompt_tokens (computed),
        generated_tokens, iterations (steps run), peak_rows (the most sequences one step
        advanced), prefix_hits and prefix_tokens (requests that reused a slot's cached prompt
        chunks, and how many tokens they did not recompute); kv_cache_bytes, the KV cache's
        memory (every slot, every layer that keeps keys and values of its own)."""
        return self._scheduler.stats()

    def failure(self) -> Optional[str]:
        """None while the engine runs; else why it does not: closed, its event thread gone, or
        a step that failed (that step's requests ended with finish_reason "error"). A server
        reports such an engine unhealthy, so that whatever runs it can replace it."""
        if self._closing:
            return "the engine is closed"
        if not self._events.is_alive():
            return "the engine's event thread has stopped"
        error = self._scheduler.error()
        return f"the engine failed: {error}" if error else None

    def close(self) -> None:
        """Cancels every request and stops the engine's threads."""
        if self._closing:
            return
        self._closing = True
        # The scheduler first: its last events (every request cancelled) are queued before the
        # event thread is told to stop, and it delivers them before it does.
        self._scheduler.shutdown()
        self._closed.set()
        self._events.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _dispatch(scheduler: Scheduler, requests: Dict[int, Request], lock: threading.Lock, closed: threading.Event):
    # Hands the scheduler's events to their requests (the scheduler itself never takes the
    # GIL). Ends once the engine is closed and every event is delivered: close() sets `closed`
    # after the scheduler has queued its last events, so a poll that starts after `closed` was
    # seen set and finds nothing means there is nothing left. (Checking `closed` after the poll
    # instead lost the events queued while an empty poll was returning.)
    while True:
        closing = closed.is_set()
        events = scheduler.poll(0.05)
        wake: Dict[object, list] = {}  # one call per event loop for the whole batch of events
        with lock:
            for event in events:
                request_id, token, finish = event[:3]
                request = requests.get(request_id)
                if request is None:
                    continue
                for loop, fut in request._push(token, finish, *event[3:]):
                    wake.setdefault(loop, []).append(fut)
                if finish:
                    del requests[request_id]
        for loop, futures in wake.items():
            try:
                loop.call_soon_threadsafe(_wake, futures)
            except RuntimeError:  # that event loop has closed
                pass
        if closing and not events:
            return
