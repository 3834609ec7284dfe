"""``rwkv_runtime.server``: an OpenAI-compatible HTTP server with continuous batching and a prefix-state
cache (``pip install rwkv-runtime[serve]``: FastAPI, uvicorn, prometheus-client; no torch).

    python -m rwkv_runtime.server model.onnx --port 8000

Layout (as vLLM's entrypoints): ``protocol`` (request models), ``serving`` (requests -> engine calls ->
responses), ``app`` (routes only), ``engine`` (the scheduler thread), ``events`` (what passes between
the two), ``logprobs`` (per-token log-probabilities), ``cache`` (prefix states),
``statefile`` (portable conversation states), ``metrics`` (Prometheus), ``runner`` (uvicorn).
"""

from .engine import Engine, EngineConfig, GenRequest, ServeError
from .runner import ServerOptions, ServerThread, build_app, run
from .serving import ChatTemplate, ServingConfig

__all__ = [
    "Engine",
    "EngineConfig",
    "GenRequest",
    "ServeError",
    "ServerOptions",
    "ServerThread",
    "build_app",
    "run",
    "ChatTemplate",
    "ServingConfig",
]
