"""The server as Ray Serve replicas: a local Ray instance (127.0.0.1 only) with 2 replicas of
the tiny chat model, 1 CPU each. Their answers against the single-process server's for the
same requests; a replica killed mid-run; a replica whose engine died; shutdown; the CLI."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from gemma_cpp.serve import create_app  # noqa: E402
from gemma_cpp.serve.ray import REPLICA_HEADER, deployment  # noqa: E402
from serving import Server, free_port, greedy, wait_healthy  # noqa: E402

NAME = "tiny"
# One engine setting for the replicas and the single-process reference: prompts fit one chunk
# (128 tokens), so a request's tokens are the same bits whatever runs beside it; 2048-token
# slots, so that a request can be long enough to be in flight when its replica is killed.
ENGINE = dict(slots=4, slot_ctx=2048)


def _ray_processes(root: psutil.Process):
    """The processes a Ray instance started under root (gcs_server, raylet, its workers)."""
    out = []
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "ray" in cmd:
            out.append(p)
    return out


def _all_gone(procs, timeout: float) -> list:
    """The processes of procs still alive (not zombies) after up to timeout seconds."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


class Cluster:
    def __init__(self, path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, logging_config={"log_level": "WARNING"})
        app = deployment(path, num_replicas=2, num_cpus=1, model_name=NAME, quantization=None, dtype="float32",
                         health_check_period_s=1.0, **ENGINE)
        self.handle = serve.run(app, name="gemma_cpp", route_prefix="/", logging_config={"log_level": "WARNING"})
        self.up = True

    def replicas(self, calls: int = 40) -> dict:
        """{replica id: pid} of the replicas that `calls` calls to stats() reached (Ray picks)."""
        return {s["replica"]: s["pid"] for s in (self.handle.stats.remote().result() for _ in range(calls))}

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def shutdown(self):
        if self.up:
            self.up = False
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_chat):
    c = Cluster(tiny_chat[0])
    try:
        yield c
    finally:
        c.shutdown()


def test_deployment_options(tiny_chat):
    path = tiny_chat[0]
    d = deployment(path, num_replicas=3, num_cpus=2, slots=6)._bound_deployment
    assert (d.num_replicas, d.max_ongoing_requests, d.ray_actor_options["num_cpus"]) == (3, 6, 2)
    options = d.init_args[1]
    assert (options["threads"], options["slots"], d.init_args[0]) == (2, 6, os.path.abspath(path))
    assert d.max_queued_requests == 4 * 6  # --max-waiting's default: Ray's queue holds it
    guarded = deployment(path, slots=2, max_waiting=5, host="0.0.0.0", allowed_hosts=["api.example"],
                         allowed_origins=["http://localhost:3000"], max_request_bytes=1000, read_timeout=2.0)
    options = guarded._bound_deployment.init_args[1]
    assert guarded._bound_deployment.max_queued_requests == 5
    assert (options["host"], options["allowed_hosts"], options["allowed_origins"], options["max_request_bytes"],
            options["read_timeout"], options["max_waiting"]) == ("0.0.0.0", ["api.example"],
                                                                  ["http://localhost:3000"], 1000, 2.0, 5)
    auto = deployment(path, autoscaling=(1, 4), slots=5)._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 5)
    for bad in (dict(num_replicas=2, autoscaling=(1, 2)), dict(autoscaling=(3, 2)), dict(num_replicas=0),
                dict(num_cpus=0), dict(slots=0), dict(autoscaling=(1,)), dict(max_waiting=-1),
                dict(allowed_origins=["localhost:3000"]), dict(allowed_hosts=["http://x"])):
        with pytest.raises(ValueError):
            deployment(path, **bad)


def test_the_cli_refuses_what_cannot_run(tiny_chat, capsys):
    from gemma_cpp.cli import main

    assert main(["serve", tiny_chat[0], "--replicas", "2"]) == 2
    assert "--replicas is for --ray" in capsys.readouterr().err
    assert main(["serve", tiny_chat[0], "--ray", "--replicas", "4", "--threads", str(os.cpu_count())]) == 2
    assert "CPUs" in capsys.readouterr().err
    assert main(["serve", "/nonexistent/model", "--ray"]) == 2
    assert "no such file or folder: /nonexistent/model" in capsys.readouterr().err


def _requests():
    """40 requests: completions and chats, whole and streamed, greedy, and a few seeded samples."""
    prompts = ["Once upon a time there was", "The weather today", "Hello world", "In a small village",
               "Numbers: 1 2 3", "A story about", "Tokens and more tokens", "The end"]
    out = []
    for i in range(40):
        kw = dict(max_tokens=4 + i % 13, temperature=0.0, stream=i % 3 == 0)
        if i % 10 == 7:
            kw.update(temperature=0.9, seed=i)
        if i % 4 == 1:
            kw["messages"] = [{"role": "user", "content": prompts[i % len(prompts)]}]
        else:
            kw["prompt"] = prompts[i % len(prompts)]
        out.append(kw)
    return out


def _ask(client, kw):
    """(what the response says: texts, finish reasons and usage, not its id or time; the
    replica header)."""
    chat = "messages" in kw
    api = client.chat.completions if chat else client.completions
    raw = api.with_raw_response.create(model=NAME, **dict(kw, stream_options={"include_usage": True})
                                       if kw["stream"] else kw)
    r = raw.parse()
    if kw["stream"]:
        text, finish, usage = {}, {}, None
        for chunk in r:
            usage = chunk.usage or usage
            for c in chunk.choices:
                piece = (c.delta.content or "") if chat else c.text
                text[c.index] = text.get(c.index, "") + piece
                finish[c.index] = c.finish_reason or finish.get(c.index)
        said = sorted((i, text[i], finish[i]) for i in text)
    else:
        said = sorted((c.index, c.message.content if chat else c.text, c.finish_reason) for c in r.choices)
        usage = r.usage
    return (said, (usage.prompt_tokens, usage.completion_tokens)), raw.headers.get(REPLICA_HEADER)


def test_replicas_answer_as_the_single_process_server(cluster, tiny_chat):
    _, model, tok = tiny_chat
    requests = _requests()
    with Server(create_app(model, tok, model_name=NAME, **ENGINE)) as single:
        want = [_ask(single.client(), kw)[0] for kw in requests]
    # 8 concurrent clients, each with its own connection pool.
    clients = [cluster.client() for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda ik: _ask(clients[ik[0] % 8], ik[1]), enumerate(requests)))
    for kw, w, (g, _) in zip(requests, want, got):
        assert g == w, kw
    served = {replica for _, replica in got}
    assert len(served) == 2, f"one replica served every request: {served}"
    # And the reference itself is generate()'s greedy text.
    ids = tok.encode(requests[0]["prompt"])
    assert want[0][0][0][1] == tok.decode(greedy(model, tok, ids, requests[0]["max_tokens"]),
                                          skip_special_tokens=True)
    # Errors keep their shape through Ray's proxy.
    r = httpx.post(cluster.url + "/v1/completions", json={"prompt": "hi", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert httpx.get(cluster.url + "/health").json() == {"status": "ok"}
    # The replicas apply the server's guard (serve/guard.py) behind Ray's proxy: a rebinding
    # Host, a page's text/plain POST from another origin.
    r = httpx.get(cluster.url + "/v1/models", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(cluster.url + "/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"


async def _long(client, stream: bool):
    """One long request (1,900 tokens): (status or exception name, replica, seconds)."""
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    t = time.time()
    try:
        if stream:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line]
                ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                return (200 if ok else r.status_code), r.headers.get(REPLICA_HEADER), time.time() - t
        r = await client.post("/v1/completions", json=body)
        return r.status_code, r.headers.get(REPLICA_HEADER), time.time() - t
    except httpx.HTTPError as e:  # a stream cut off when its replica died
        return type(e).__name__, None, time.time() - t


def test_a_killed_replica_fails_its_requests_and_is_replaced(cluster):
    pids = cluster.replicas()
    assert len(pids) == 2
    victim, survivor = sorted(pids)

    async def run():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            # 6 long requests in flight, 3 on each replica (Ray sends each to the less busy one),
            # so that the survivor has a free slot for what comes after.
            tasks = [asyncio.ensure_future(_long(client, stream=i % 2 == 1)) for i in range(6)]
            await asyncio.sleep(0.5)
            os.kill(pids[victim], signal.SIGKILL)
            # The killed replica's requests end at once ...
            done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert done, "no request ended within 30 s of its replica's death"
            # ... and requests sent from now on are answered, by the survivor or (once it is up)
            # a replacement, while the survivor's long requests go on.
            seen, deadline = [], time.time() + 90
            while not any(r not in pids for r in seen):
                assert time.time() < deadline, f"no replacement replica: {seen}"
                r = await client.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 3,
                                                               "temperature": 0})
                assert r.status_code == 200, r.text
                seen.append(r.headers[REPLICA_HEADER])
                await asyncio.sleep(0.05)
            return await asyncio.wait_for(asyncio.gather(*tasks), 90), seen

    results, seen = asyncio.run(run())
    # Never the dead replica; the survivor, or the replacement (which may be up before the first
    # of these requests is sent, when the killed replica's requests took a while to end).
    assert victim not in seen and all(r == survivor or r not in pids for r in seen), seen
    failed = [r for r in results if r[0] != 200]
    assert failed, f"no request was in flight on the killed replica: {results}"
    for status, replica, seconds in results:
        if status == 200:
            assert replica == survivor
        else:  # a clear 5xx, or a stream that the dead replica cut off; at once, not a hang
            assert (isinstance(status, int) and status >= 500) or status in ("RemoteProtocolError", "ReadError"), \
                results
            assert seconds < 30, results


def test_a_replica_whose_engine_died_is_replaced(cluster):
    before = cluster.replicas()
    dead = cluster.handle.close_engine.remote().result()
    assert dead in before
    # Until Ray replaces it, the dead one answers 503 naming why; the other answers.
    client = cluster.client()
    deadline = time.time() + 90
    while True:
        assert time.time() < deadline, "the replica whose engine died was not replaced"
        try:
            raw = client.completions.with_raw_response.create(model=NAME, prompt="Hello", max_tokens=2)
            assert raw.headers[REPLICA_HEADER] != dead
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["code"] == "engine_down", e.body
            assert "the engine is closed" in e.body["message"]
        now = cluster.replicas(20)
        if dead not in now and len(now) == 2:
            break
        time.sleep(0.2)
    assert len(set(now) - set(before)) == 1


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s`:DeprecationWarning")
def test_autoscaling_adds_a_replica_under_load(cluster, tiny_chat):
    # The app deployed anew: 1 to 2 replicas of 2 slots, Ray's delays shortened (metrics_interval_s
    # is deprecated, for environment variables that would have to be set before Ray starts).
    app = deployment(tiny_chat[0], autoscaling={"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0,
                                                "metrics_interval_s": 0.2, "look_back_period_s": 0.5},
                     num_cpus=1, model_name=NAME, quantization=None, dtype="float32", slots=2, slot_ctx=2048)
    serve.delete("gemma_cpp")
    cluster.handle = serve.run(app, name="gemma_cpp", route_prefix="/", logging_config={"log_level": "WARNING"})
    first = set(cluster.replicas(20))
    assert len(first) == 1

    async def load():
        # 8 clients, each sending long requests one after another, until a second replica has
        # answered one.
        served = set()
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            async def user():
                while len(served - first) == 0:
                    status, replica, _ = await _long(client, stream=False)
                    assert status == 200
                    served.add(replica)

            await asyncio.wait_for(asyncio.gather(*(user() for _ in range(8))), 90)
        return served

    served = asyncio.run(load())
    assert len(served) == 2 and first < served


def test_shutdown_leaves_no_ray_processes(cluster):
    procs = _ray_processes(psutil.Process())
    names = " ".join(" ".join(p.cmdline()) for p in procs)
    assert "raylet" in names and "ServeReplica" in names
    cluster.shutdown()
    assert not _all_gone(procs, 30)


def _serve_cli(path, port, args, env=None):
    """`gemma-cpp serve PATH --ray ARGS` on the tiny model, healthy: its process."""
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "serve", path, "--ray", "--port", str(port),
                             "--threads", "1", "--slots", "2", "--ctx-size", "512", "--quantization", "none",
                             "--model-name", NAME] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, proc, 120)
    except BaseException:
        proc.kill()
        raise
    return proc


def _answers_greedy(port, model, tok):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    ids = tok.encode("Once upon a time")
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.choices[0].text == tok.decode(greedy(model, tok, ids, 6), skip_special_tokens=True)


def _stop(proc) -> str:
    """SIGTERM, as a service manager stops it; its output. It must exit 0, soon."""
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=60)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    return out


def _replica_processes(procs) -> int:
    n = 0
    for p in procs:
        try:
            n += "ServeReplica" in " ".join(p.cmdline())
        except psutil.Error:  # ended since it was listed
            pass
    return n


def test_the_cli_serves_on_ray(tiny_chat):
    """(15 s here, most of it Ray's: the CLI starts a local instance, Serve and two replicas,
    and on SIGTERM stops them all.)"""
    path, model, tok = tiny_chat
    port = free_port()
    proc = _serve_cli(path, port, ["--replicas", "2"])
    try:
        _answers_greedy(port, model, tok)
        # Both replicas' processes, read until both are there (up to 60 s): on a machine busy
        # with another test, one read right after the first answer once found only one.
        deadline = time.time() + 60
        while True:
            procs = _ray_processes(psutil.Process(proc.pid))
            if _replica_processes(procs) >= 2 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert _replica_processes(procs) == 2
    finally:
        out = _stop(proc)
    assert not _all_gone(procs, 30), out


def test_the_cli_joins_a_running_cluster(tiny_chat):
    # A one-node cluster started apart (`ray start --head`, as on a cluster's head node); the
    # CLI joins it with --ray-address, serves, and on SIGTERM deletes only its application.
    # (25 s here, all of it Ray's starting and stopping, one after the other: `ray start`, the
    # CLI's Serve and replica, SIGTERM, `ray stop`.)
    path, model, tok = tiny_chat
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, port = free_port(), free_port()
    # Token authentication off on both sides: a cluster on 127.0.0.1 only, for this test.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    started = subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                              "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        proc = _serve_cli(path, port, ["--ray-address", f"127.0.0.1:{gcs}", "--replicas", "1"], env=env)
        try:
            _answers_greedy(port, model, tok)
        finally:
            _stop(proc)
        # The cluster and its Serve proxy are still up; the application is gone.
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 404
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
