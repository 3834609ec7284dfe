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

import collections

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from rwkv_runtime.server import EngineConfig, ServerOptions, build_app as build_server
from rwkv_runtime.server import statefile

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
STORE = "rwkv-conversation-states"


@ray.remote(num_cpus=0)
class ConversationStates:
    """Last state of each conversation (tokens seen, state blob, next-token logits), LRU by bytes."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.max_bytes, self.bytes = max_bytes, 0

    def put(self, session_id: str, tokens: list, blob: str, logits) -> None:
        old = self.items.pop(session_id, None)
        if old is not None:
            self.bytes -= len(old[1])
        self.items[session_id] = (tokens, blob, logits)
        self.bytes += len(blob)
        while self.bytes > self.max_bytes and self.items:
            self.bytes -= len(self.items.popitem(last=False)[1][1])

    def get(self, session_id: str):
        item = self.items.get(session_id)
        if item is not None:
            self.items.move_to_end(session_id)
        return item


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


@serve.deployment(request_router_config=RequestRouterConfig(request_router_class=ROUTER),
                  ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress()
class RWKVServer:
    def __init__(self, model: str, model_name: str | None = None, threads: int | None = 1,
                 engine: dict | None = None):
        self.store = ConversationStates.options(name=STORE, lifetime="detached", get_if_exists=True).remote()
        self._asgi, self.engine = build_server(ServerOptions(model, model_name, threads, engine=EngineConfig(**(engine or {}))),
                                             session_store=self._lookup)
        self.engine.on_finish = self._keep
        self.engine.start()  # (also started by the app's lifespan; starting twice is a no-op)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def _lookup(self, session_id: str):
        return await self.store.get.remote(session_id)

    def _keep(self, session_id, tokens, arrays, logits):  # scheduler thread; fire and forget
        blob = statefile.encode(arrays, self.engine.binding, len(tokens))
        self.store.put.remote(session_id, [int(t) for t in tokens], blob, logits)

    def __serve_build_asgi_app__(self):
        return _ReplicaHeader(self._asgi, self.replica)

    def __del__(self):  # Ray Serve calls this at a graceful replica shutdown: drain the streams
        if getattr(self, "engine", None) is not None:
            self.engine.stop(grace=5)


def build(args: dict):
    """``serve run deploy_examples.ray_serve.app:build model=PATH [replicas=N] [model_name=NAME] [max_batch=N]``"""
    engine = {k: int(args[k]) for k in ("max_batch", "prefill_chunk") if k in args}
    return RWKVServer.options(num_replicas=int(args.get("replicas", 2))).bind(
        args["model"], args.get("model_name"), int(args.get("threads", 1)), engine)
