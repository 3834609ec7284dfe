"""The Ray Serve app (deploy_examples/ray_serve): a local Ray cluster with 2 replicas; conversations stay
on one replica (Ray's consistent-hash router, x-session-id) and answer exactly as one process would;
when a replica is killed, its conversations continue elsewhere from the exported states."""

from __future__ import annotations

import socket
import time

import pytest

from .conftest import need_serve_deps

need_serve_deps()

import httpx  # noqa: E402 - after the skip check

from rwkv_runtime import SamplingParams, Session  # noqa: E402 - after the skip check
from rwkv_runtime.server import ChatTemplate  # noqa: E402 - after the skip check

from .conftest import REPO  # noqa: E402 - after the skip check

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _solo_chat(session: Session, messages: list, n: int) -> str:
    t = ChatTemplate()
    text = "".join(session.generate(t.render_dicts(messages), n, SamplingParams(temperature=0)))
    return text.split(t.stop[0])[0]


def test_sessions_stick_to_a_replica_and_survive_its_loss(default_model):
    ray = pytest.importorskip("ray", reason="the ray extra (ray[serve]) is not installed")
    from ray import serve

    port = _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="rwkv-serve-test",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        from deploy_examples.ray_serve.app import build

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": str(default_model), "replicas": 2, "model_name": "m"}), name="rwkv", route_prefix="/")
        solo = Session(default_model)
        sessions = {f"conversation-{i}": [] for i in range(6)}
        where: dict = {k: set() for k in sessions}

        def turn(http, sid, question, retry_s=0.0):
            sessions[sid].append({"role": "user", "content": question})
            body = {"model": "m", "messages": sessions[sid], "max_tokens": 24, "temperature": 0}
            end = time.monotonic() + retry_s
            while True:
                try:
                    r = http.post("/v1/chat/completions", json=body, headers={"x-session-id": sid})
                    if r.status_code == 200 or time.monotonic() > end:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > end:
                        raise
                time.sleep(0.5)
            assert r.status_code == 200, r.text
            out = r.json()
            answer = out["choices"][0]["message"]["content"]
            assert answer == _solo_chat(solo, sessions[sid], 24)
            sessions[sid].append({"role": "assistant", "content": answer})
            return r.headers["x-rwkv-replica"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for k in range(3):
                for i, sid in enumerate(sessions):
                    replica, cached = turn(http, sid, f"Question {k} of conversation {i}: what is item {i * k}?")
                    where[sid].add(replica)
                    if k:  # the history came from this replica's prefix cache
                        assert cached > 0
            assert all(len(r) == 1 for r in where.values()), where  # affinity: one replica per conversation
            # lose the replica of conversation-0; its conversations move and resume from the exported states
            gone = next(iter(where["conversation-0"]))
            ray.kill(ray.get_actor(f"SERVE_REPLICA::rwkv#RWKVServer#{gone}", namespace="serve"), no_restart=True)
            moved = [sid for sid, r in where.items() if gone in r]
            for sid in sessions:
                replica, cached = turn(http, sid, "And one more question?", retry_s=90)
                if sid in moved:
                    assert replica != gone and cached > 0
    finally:
        serve.shutdown()
        ray.shutdown()
