"""`gemma-cpp serve --ray`: the OpenAI-compatible server as Ray Serve replicas
(`pip install "gemma_cpp[ray]"`), for more users than one machine's slots, or a service that
outlives a machine.

Each replica is a Ray actor that loads the model itself, from a path that every node can read
(the pybind11 model is never pickled), runs its own gemma_cpp.Engine, and serves the very
FastAPI app of `gemma-cpp serve` (`serve.ingress`): every endpoint, error and stream is that
server's. Ray routes requests to replicas, at most `slots` in flight on each, replaces a
replica whose process dies or whose health check fails (its engine closed or failed), and
scales between bounds when asked to.

    import ray
    from ray import serve
    from gemma_cpp.serve.ray import deployment
    serve.run(deployment("model.gguf", num_replicas=2, num_cpus=1, slots=8))

Responses carry the header `x-gemma-cpp-replica`: the id of the replica that answered."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from ray import serve

from ..generation import is_int
from .app import create_app, load_model, model_source
from .guard import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT, HostRule, OriginRule, open_warning

APP_NAME = "gemma_cpp"
REPLICA_HEADER = "x-gemma-cpp-replica"
# create_app's options on what reaches the server (serve/guard.py) and on the model's sampling
# defaults, as each replica applies them.
GUARD_OPTIONS = ("api_key", "host", "allowed_hosts", "allowed_origins", "max_request_bytes", "read_timeout",
                 "max_waiting", "generation_config")


class _ReplicaHeader:
    """ASGI middleware: names the replica in every HTTP response's headers."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + [
                    (REPLICA_HEADER.encode(), self.replica)])
            await send(message)
        await self.app(scope, receive, tagged)


@serve.ingress()
class GemmaReplica:
    """One replica: the model, loaded here, and `create_app`'s server over its own engine.
    `options`: threads, and load_model's and create_app's keyword arguments."""

    def __init__(self, model_path: str, options: Dict[str, Any]):
        from .._C import set_num_threads

        set_num_threads(int(options["threads"]))
        self._options = dict(options)
        self._model, self._tokenizer, self._name = load_model(
            model_path, quantization=options["quantization"], dtype=options["dtype"],
            kv_cache_dtype=options["kv_cache_dtype"], model_name=options["model_name"])
        self._state = None
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (a direct test of the class)
            self.replica_id = f"local-{os.getpid()}"

    def __serve_build_asgi_app__(self):
        o = self._options
        app = create_app(self._model, self._tokenizer, model_name=self._name, slots=o["slots"],
                         ctx_size=o["ctx_size"], slot_ctx=o["slot_ctx"], chunk_size=o["chunk_size"],
                         freeze_heap=True, **{k: o[k] for k in GUARD_OPTIONS})
        self._state = app.state.gemma
        app.add_middleware(_ReplicaHeader, replica=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s: an engine that is closed or has failed
        makes the replica unhealthy, and Ray replaces it."""
        failure = self._state.failure() if self._state is not None else None
        if failure:
            raise RuntimeError(f"replica {self.replica_id}: {failure}")

    def stats(self) -> dict:
        """This replica's id and its engine's counters (gemma_cpp.Engine.stats)."""
        engine = self._state.engine if self._state is not None else None
        return dict(engine.stats() if engine is not None else {}, replica=self.replica_id, pid=os.getpid())

    def close_engine(self) -> str:
        """Closes this replica's engine (its requests end): its next health check fails, and Ray
        starts a replacement. Returns the replica's id."""
        if self._state is not None and self._state.engine is not None:
            self._state.engine.close()
        return self.replica_id


def deployment(model_path: Optional[str] = None, *, num_replicas: Optional[int] = None,
               autoscaling: Union[None, Tuple[int, int], Dict[str, Any]] = None, num_cpus: int = 1,
               slots: int = 8, ctx_size: Optional[int] = None, slot_ctx: Optional[int] = None,
               chunk_size: int = 128, model_name: Optional[str] = None, api_key: Optional[str] = None,
               quantization="auto", dtype=None, kv_cache_dtype: str = "float32", name: str = "GemmaReplica",
               health_check_period_s: float = 10.0, health_check_timeout_s: float = 30.0,
               host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT,
               max_waiting: Optional[int] = None, generation_config: str = "auto"):
    """The Ray Serve application (`serve.run` it) of replicas serving the model at model_path
    (a checkpoint folder or GGUF file at that path on every node; None: the demo model).

    num_replicas: a fixed count (default 1); or autoscaling: (min, max) replicas, or Ray's whole
    autoscaling_config (its target_ongoing_requests defaults to `slots`: Ray adds a replica
    when the ones there are full). num_cpus: CPUs reserved per replica, and its engine's
    threads. slots: requests one replica decodes together, and Ray's max_ongoing_requests, so
    that a request waits in Ray's queue for a free slot on any replica, not in one replica's.
    max_waiting: the requests that queue (Ray's max_queued_requests; default 4 x slots), beyond
    which Ray's proxy answers 503; each replica also applies it as create_app does. host: the
    address Ray's HTTP proxy is bound to (the Host rule depends on it). The rest are
    create_app's and from_pretrained's."""
    if autoscaling is not None and num_replicas is not None:
        raise ValueError("give num_replicas or autoscaling, not both")
    if autoscaling is None and num_replicas is None:
        num_replicas = 1
    if autoscaling is None and (not is_int(num_replicas) or num_replicas < 1):
        raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
    for what, v in (("num_cpus", num_cpus), ("slots", slots), ("chunk_size", chunk_size)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{what} must be an int >= 1, got {v!r}")
    scaling: Dict[str, Any] = {}
    if autoscaling is not None:
        if isinstance(autoscaling, dict):
            config = dict(autoscaling)
        elif (isinstance(autoscaling, (tuple, list)) and len(autoscaling) == 2
              and all(is_int(v) for v in autoscaling) and 0 <= autoscaling[0] <= autoscaling[1]
              and autoscaling[1] >= 1):
            config = {"min_replicas": int(autoscaling[0]), "max_replicas": int(autoscaling[1])}
        else:
            raise ValueError(f"autoscaling must be (min_replicas, max_replicas) with 0 <= min <= max, max >= 1, "
                             f"or Ray's autoscaling_config dict; got {autoscaling!r}")
        config.setdefault("target_ongoing_requests", slots)
        scaling["autoscaling_config"] = config
    else:
        scaling["num_replicas"] = int(num_replicas)
    if max_waiting is not None and (not is_int(max_waiting) or max_waiting < 0):
        raise ValueError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
    HostRule(host, allowed_hosts), OriginRule(allowed_origins)  # their errors now, not in every replica
    path, api_name = model_source(model_path, model_name)
    options = dict(threads=int(num_cpus), slots=int(slots), ctx_size=ctx_size, slot_ctx=slot_ctx,
                   chunk_size=int(chunk_size), model_name=api_name, api_key=api_key, quantization=quantization,
                   dtype=dtype, kv_cache_dtype=kv_cache_dtype, host=host, allowed_hosts=list(allowed_hosts),
                   allowed_origins=list(allowed_origins), max_request_bytes=max_request_bytes,
                   read_timeout=read_timeout, max_waiting=max_waiting, generation_config=generation_config)
    queued = 4 * int(slots) if max_waiting is None else int(max_waiting)
    d = serve.deployment(GemmaReplica, name=name, ray_actor_options={"num_cpus": num_cpus},
                         max_ongoing_requests=int(slots), max_queued_requests=queued,
                         health_check_period_s=health_check_period_s,
                         health_check_timeout_s=health_check_timeout_s,
                         max_constructor_retry_count=3,  # a model that does not load fails serve.run soon
                         **scaling)
    return d.bind(os.path.abspath(path), options)


def run(model_path: Optional[str] = None, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
        max_replicas: Optional[int] = None, ray_address: Optional[str] = None, threads: Optional[int] = None,
        log_level: str = "warning", ready=None, **kwargs) -> None:
    """Serves the model on Ray until interrupted (Ctrl-C or SIGTERM): on a local Ray instance
    started here, or on the running cluster at ray_address ("auto": the one this node is part
    of). `replicas` replicas of `threads` threads each (default: this machine's CPUs shared
    among them); with max_replicas, autoscaling between the two. kwargs: deployment's.
    ready: called once the replicas serve. On the way out the application is deleted, and a
    Ray instance started here is shut down with every process it started."""
    import ray

    if not is_int(replicas) or replicas < 1:
        raise ValueError(f"--replicas must be an int >= 1, got {replicas!r}")
    if max_replicas is not None and (not is_int(max_replicas) or max_replicas < max(replicas, 1)):
        raise ValueError(f"--max-replicas must be an int >= --replicas ({replicas}), got {max_replicas!r}")
    cpus = os.cpu_count() or 1
    if threads is None:
        threads = max(1, cpus // max(replicas, 1))
    if ray_address is None and replicas * threads > cpus:
        raise ValueError(f"{replicas} replicas x {threads} threads need {replicas * threads} CPUs; this machine has "
                         f"{cpus} (start a cluster and give --ray-address, or fewer replicas or threads)")
    path, _ = model_source(model_path)
    if not os.path.exists(path):  # on this node; Ray's nodes need it at the same path
        raise FileNotFoundError(f"no model at {path}")
    scaling = dict(autoscaling=(replicas, max_replicas)) if max_replicas else dict(num_replicas=replicas)
    app = deployment(model_path, num_cpus=threads, host=host, **scaling, **kwargs)
    warning = open_warning(host, kwargs.get("api_key"))
    if warning:
        print(warning, file=sys.stderr, flush=True)

    stop = threading.Event()
    started_here = not ray.is_initialized() and ray_address is None
    previous = {}
    try:
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, logging_level=log_level.upper(),
                     log_to_driver=log_level.lower() in ("debug", "info"),
                     **({} if ray_address else {"num_cpus": cpus}))
        # After ray.init, whose own SIGTERM handler would abort the process: a stop, then the
        # clean-up below.
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level.upper()})
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": log_level.upper()})
        print(f"serving on http://{host}:{port}/v1 with Ray: "
              + (f"{replicas} to {max_replicas} replicas" if max_replicas else f"{replicas} replicas")
              + f" x {threads} threads", file=sys.stderr, flush=True)
        if ready is not None:
            ready()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if ray.is_initialized():
                if started_here:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)


__all__ = ["GemmaReplica", "deployment", "run", "REPLICA_HEADER", "APP_NAME"]
