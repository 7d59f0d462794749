"""What the server tests share: a uvicorn server on a thread, and generate()'s greedy tokens as
the reference (the tiny chat model is conftest's tiny_chat)."""
import socket
import threading
import time

import numpy as np


class Server:
    """uvicorn serving an app on a socket bound to 127.0.0.1:0, on a thread of this process."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc, timeout: float) -> None:
    """Until http://127.0.0.1:port/health says 200; fails with the server's output if its
    process ends first or the time runs out."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
        time.sleep(0.1)


def eos_ids(model, tok):
    return model.generation_config.eos_ids() + [tok.convert_tokens_to_ids("<end_of_turn>")]


def greedy(model, tok, ids, n):
    out = model.generate(np.array([ids]), max_new_tokens=n, eos_token_id=eos_ids(model, tok))[0, len(ids):].tolist()
    stop = [i for i, t in enumerate(out) if t in eos_ids(model, tok)]
    return out[:stop[0] + 1] if stop else out


