"""RWKV on Ray Serve: N replicas of rwkv_runtime's server engine, one conversation per replica.

    serve run deploy_examples.ray_serve.app:build model=/models/rwkv.onnx replicas=2

Routing: Ray's consistent-hash request router sends every request with the same ``x-session-id``
header (or ``handle.options(session_id=...)``) to the same replica, where the prefix-state cache
already holds the conversation, so only the new turn is prefilled.
Fallback: after every turn a replica exports the conversation's state (the server's portable
state format, bound to the export id) to a small state-keeper actor; a replica that receives a
session it has never seen (the one that served it is gone, or the ring changed) imports it from
there and seeds its own cache. Answers are the same either way; only prefill work differs.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from rwkv_runtime.server import EngineConfig, ServerOptions, statefile
from rwkv_runtime.server import build_app as build_server

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
STORE = "rwkv-conversation-states"
LOOKUP_TIMEOUT_S = 2.0  # a keeper slower than this is skipped: the turn is prefilled instead
ARGS = {"model", "replicas", "model_name", "threads", "max_batch", "prefill_chunk"}
log = logging.getLogger("ray.serve")


class StateKeeper:
    """Last state of each conversation (tokens seen, state blob, next-token logits), LRU by bytes.

    Every byte an entry holds counts against ``max_bytes``: the id, the tokens (kept as int32), the blob
    and the logits (as large as the vocabulary: 256 KiB per entry for a 65536-token World model).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.max_bytes, self.bytes = max_bytes, 0

    @staticmethod
    def _size(session_id: str, item) -> int:
        tokens, blob, logits = item
        return len(session_id) + tokens.nbytes + len(blob) + logits.nbytes

    def put(self, session_id: str, tokens: list, blob: str, logits) -> None:
        old = self.items.pop(session_id, None)
        if old is not None:
            self.bytes -= self._size(session_id, old)
        item = (np.asarray(tokens, np.int32), blob, np.asarray(logits, np.float32))
        self.items[session_id] = item
        self.bytes += self._size(session_id, item)
        while self.bytes > self.max_bytes and self.items:
            k, v = self.items.popitem(last=False)
            self.bytes -= self._size(k, v)

    def get(self, session_id: str):
        item = self.items.get(session_id)
        if item is None:
            return None
        self.items.move_to_end(session_id)
        tokens, blob, logits = item
        return tokens.tolist(), blob, logits


ConversationStates = ray.remote(num_cpus=0)(StateKeeper)


class _ReplicaHeader:
    """Tells clients (and tests) which replica answered: an ``x-rwkv-replica`` response header."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + [(b"x-rwkv-replica", self.value)]}
            await send(message)

        await self.app(scope, receive, send_tagged)


@serve.deployment(
    request_router_config=RequestRouterConfig(request_router_class=ROUTER),
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
)
@serve.ingress()
class RWKVServer:
    def __init__(self, model: str, model_name: str | None = None, threads: int | None = 1, engine: dict | None = None):
        self.store = self._keeper()
        self._asgi, self.engine = build_server(
            ServerOptions(model, model_name, threads, engine=EngineConfig(**(engine or {}))), session_store=self._lookup
        )
        self.engine.on_finish = self._keep
        self.engine.start()  # (also started by the app's lifespan; starting twice is a no-op)
        self.replica = serve.get_replica_context().replica_id.unique_id

    @staticmethod
    def _keeper():
        return ConversationStates.options(name=STORE, lifetime="detached", get_if_exists=True).remote()

    async def _lookup(self, session_id: str):
        # The keeper is an accelerator: if it is gone (killed, its node lost) or slow, the turn is
        # prefilled from the conversation the client sent, never failed
        try:
            return await asyncio.wait_for(self.store.get.remote(session_id), LOOKUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - RayActorError, timeouts, ...
            log.warning("conversation-state keeper unavailable (%s): prefilling instead", type(e).__name__)
            try:
                self.store = self._keeper()  # a new keeper (empty) if the old one died
            except Exception:  # noqa: BLE001
                pass
            return None

    def _keep(self, session_id, tokens, arrays, logits):  # scheduler thread; fire and forget
        blob = statefile.encode(arrays, self.engine.binding, len(tokens))
        self.store.put.remote(session_id, [int(t) for t in tokens], blob, logits)

    def __serve_build_asgi_app__(self):
        return _ReplicaHeader(self._asgi, self.replica)

    def __del__(self):  # Ray Serve calls this at a graceful replica shutdown: drain the streams
        if getattr(self, "engine", None) is not None:
            self.engine.stop(grace=5)


def _whole(args: dict, key: str, default=None, low: int = 1):
    v = args.get(key, default)
    try:
        n = int(v)
        ok = n >= low and not isinstance(v, (bool, float))  # (int(2.7) would be 2)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{key}={v!r}: must be a whole number >= {low}")
    return n


def build(args: dict):
    """``serve run deploy_examples.ray_serve.app:build model=PATH [replicas=N] [model_name=NAME] [max_batch=N]``"""
    # checked here, on the driver, as one line: a typo (replica=4) must not be silently ignored, and a bad
    # value must not become a replica that fails to start over and over
    unknown = sorted(set(args) - ARGS)
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} (known: {', '.join(sorted(ARGS))})")
    if not args.get("model"):
        raise ValueError("model=PATH is required (the exported .onnx, readable on every node)")
    engine = {k: _whole(args, k) for k in ("max_batch", "prefill_chunk") if k in args}
    return RWKVServer.options(num_replicas=_whole(args, "replicas", 2)).bind(
        str(args["model"]), args.get("model_name"), _whole(args, "threads", 1, low=0), engine
    )
