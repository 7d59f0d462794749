"""`gemma-cpp serve`: an OpenAI-compatible HTTP server on the continuous-batching engine
(`pip install "gemma_cpp[serve]"`). `create_app(...)` returns the ASGI app, for other hosts
to mount; `run(...)` serves it with uvicorn."""
from .app import create_app, run

__all__ = ["create_app", "run"]
