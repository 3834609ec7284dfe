"""The deployment examples run as documented (on the tiny reference export)."""

import subprocess
import sys
from pathlib import Path

import numpy as np

import rwkv_runtime

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy_examples"


def test_minimal_generate_runs_and_is_greedy(rwkv4_exports):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "minimal_generate.py"), str(rwkv4_exports["plain"]), "The "],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    expect = "".join(s.generate("The ", 64, temperature=0))
    assert out.stdout.rstrip("\n") == expect.rstrip("\n")


def test_multi_conversation_runs(rwkv4_exports):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "multi_conversation.py"), str(rwkv4_exports["plain"])],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "--- greedy" in out.stdout and "--- late joiner" in out.stdout
    assert np.any([ln for ln in out.stdout.splitlines() if not ln.startswith("---")])


# -- the Ray Serve example's own parts (no Ray cluster started) ------------------------------------------------
def _ray_app():
    import pytest

    pytest.importorskip("ray.serve", reason="the ray extra (ray[serve]) is not installed")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from deploy_examples.ray_serve import app

    return app


def test_ray_state_keeper_counts_every_byte_it_holds():
    """The keeper's budget covers the tokens and logits of each conversation, not only its state blob:
    a long conversation or a large vocabulary must not grow it past max_bytes."""
    app = _ray_app()
    k = app.StateKeeper(max_bytes=1_000_000)
    logits = np.zeros(65536, np.float32)  # a World-vocabulary model: 256 KiB per entry
    for i in range(10):
        k.put(f"s{i}", list(range(5000)), "x" * 1000, logits)
        assert k.bytes <= k.max_bytes
    assert k.bytes == sum(len(s) + 5000 * 4 + 1000 + logits.nbytes for s in k.items)
    assert list(k.items) == ["s7", "s8", "s9"]
    tokens, blob, got = k.get("s9")
    assert tokens == list(range(5000)) and type(tokens[0]) is int and blob == "x" * 1000 and got.shape == (65536,)
    k.put("s9", [1, 2], "y", np.zeros(4, np.float32))  # replacing an entry releases its bytes
    assert k.bytes == sum(len(s) + 5000 * 4 + 1000 + logits.nbytes for s in ("s7", "s8")) + 2 + 2 * 4 + 1 + 16
    assert k.get("nope") is None


def test_ray_build_refuses_bad_arguments_with_one_line():
    import pytest

    app = _ray_app()
    for args, msg in [
        ({}, "model=PATH is required"),
        ({"model": "m.onnx", "replica": "4"}, "unknown argument 'replica'"),
        ({"model": "m.onnx", "replicas": "two"}, "replicas='two': must be a whole number >= 1"),
        ({"model": "m.onnx", "replicas": 0}, "replicas=0: must be a whole number >= 1"),
        ({"model": "m.onnx", "max_batch": "2.5"}, "max_batch='2.5'"),
        ({"model": "m.onnx", "threads": -1}, "threads=-1: must be a whole number >= 0"),
    ]:
        with pytest.raises(ValueError) as e:
            app.build(args)
        assert msg in str(e.value) and "\n" not in str(e.value)
    app.build({"model": "m.onnx", "replicas": "3", "threads": "0", "max_batch": 4})  # strings from `serve run`


def test_ray_lost_or_slow_keeper_means_prefill_not_a_failed_request(monkeypatch):
    """README: the keeper is an accelerator; if it is lost, conversations are prefilled again (before, the
    actor's error failed every request that carried an x-session-id)."""
    import asyncio
    import types

    app = _ray_app()
    monkeypatch.setattr(app, "LOOKUP_TIMEOUT_S", 0.2)

    class Store:
        def __init__(self, how):
            self.get, self.how = self, how

        def remote(self, session_id):
            async def answer():
                if self.how == "dead":
                    raise RuntimeError("The actor died unexpectedly before finishing this task.")
                if self.how == "slow":
                    await asyncio.sleep(30)
                return ([1, 2], "blob", None)

            return answer()

    fresh = Store("ok")
    server = types.SimpleNamespace(_keeper=lambda: fresh)
    lookup = app.RWKVServer.func_or_class._lookup
    for how in ("dead", "slow"):
        server.store = Store(how)
        assert asyncio.run(lookup(server, "alice")) is None
        assert server.store is fresh  # the next turn asks a live keeper again
    assert asyncio.run(lookup(server, "alice")) == ([1, 2], "blob", None)
