"""Fixtures for the server tests: exports of the default model and of the RWKV-7 reference model, and
a factory for real servers on 127.0.0.1 (ephemeral port), shut down by the test."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest


def need_serve_deps():
    """Skip the calling test module where the serve extra or the openai client is missing."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, prometheus-client) is not installed")
    pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")
    pytest.importorskip("openai", reason="the official openai client (dev extra) is not installed")


REPO = Path(__file__).resolve().parents[2]
V7 = REPO / "tests" / "golden" / "golden-rwkv7.pth"  # the golden RWKV-7 (in the repository)


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    from rwkv_export.export import ExportOptions, export

    out = tmp_path_factory.mktemp("serve-default") / "default.onnx"
    export(REPO / "exporter" / "default_model" / "tiny-rwkv4-pystdlib.pth", out, ExportOptions())
    return out


@pytest.fixture(scope="session")
def v7_model(tmp_path_factory) -> Path:
    from rwkv_export.export import ExportOptions, export

    out = tmp_path_factory.mktemp("serve-v7") / "v7.onnx"
    export(V7, out, ExportOptions())
    return out


@pytest.fixture
def make_server():
    """make_server(model, **EngineConfig fields) -> a started ServerThread (stopped at teardown)."""
    from rwkv_runtime.server import EngineConfig, ServerOptions, ServerThread, build_app

    with contextlib.ExitStack() as stack:

        def make(model, model_name=None, **engine):
            app, eng = build_app(ServerOptions(str(model), model_name, engine=EngineConfig(**engine)))
            return stack.enter_context(ServerThread(app, eng))

        yield make


def client(srv, **kw):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def metric(srv, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 if absent)."""
    import httpx

    text = httpx.get(srv.url + "/metrics", timeout=10).text
    pat = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search("^" + pat + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def server_process(argv: list, env=None, cwd=None):
    """A server in its own process (``python ARGV...``, listening on 127.0.0.1): yields (process, url, the
    stderr lines after the listening line, the thread collecting them); killed at exit if still running."""
    import subprocess
    import sys
    import threading

    p = subprocess.Popen([sys.executable, *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        url, head = None, []
        while url is None:
            line = p.stderr.readline()
            assert line, "".join(head)
            head.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(p.stderr), daemon=True)
        reader.start()
        yield p, url, rest, reader
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
