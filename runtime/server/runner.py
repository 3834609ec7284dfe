"""Building and running a server: from a model path to a running uvicorn (foreground or a thread)."""
from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_runtime import RuntimeUserError, Session

from .app import create_app, json_log_formatter
from .engine import Engine, EngineConfig
from .serving import ChatTemplate, ServingConfig


@dataclass
class ServerOptions:
    model: str
    model_name: str | None = None  # default: the file name without .onnx
    threads: int | None = None
    providers: list | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    chat_template: str | None = None  # path to a JSON ChatTemplate
    default_max_tokens: int = 256
    stop_token_ids: tuple | None = None  # default: (0,) for World-tokenizer models, else none
    drain_seconds: float = 10.0
    max_body_bytes: int = 16 << 20
    # "auto": one onnxruntime session, weights held once; "step": the step graph decodes in a second
    # session (a second copy of the weights, faster batched decode: docs/benchmarks.md, Serving)
    decode_graph: str = "auto"


def build_app(opts: ServerOptions, session_store=None):
    """(FastAPI app, Engine) for ``opts``; the engine starts with the app's lifespan. ``session_store``:
    see ``Serving`` (the Ray Serve app passes one)."""
    path = Path(opts.model)
    session = Session(path, providers=opts.providers, threads=opts.threads, prefill_chunk=opts.engine.prefill_chunk,
                      decode_graph=opts.decode_graph)
    try:
        session.tokenizer  # noqa: B018 - loads it: text in, text out
    except RuntimeUserError as e:
        raise RuntimeUserError(f"serving needs a model with a tokenizer: {e}") from None
    template = ChatTemplate()
    if opts.chat_template:
        try:
            template = ChatTemplate.from_json(Path(opts.chat_template).read_text(encoding="utf-8"))
        except OSError as e:
            raise RuntimeUserError(f"{opts.chat_template}: {e.strerror}") from None
    stop_ids = opts.stop_token_ids
    if stop_ids is None:
        stop_ids = (0,) if session.manifest.tokenizer.get("kind") == "world" else ()
    engine = Engine(session, opts.engine)
    name = opts.model_name or (path.name[:-5] if path.name.endswith(".onnx") else path.name)
    cfg = ServingConfig(name, template, opts.default_max_tokens, tuple(stop_ids))
    return create_app(engine, cfg, opts.max_body_bytes, opts.drain_seconds, session_store), engine


def setup_logging(level: str = "info"):
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(json_log_formatter())
    lg = logging.getLogger("rwkv_runtime.server")
    lg.handlers[:] = [h]
    lg.setLevel(level.upper())
    lg.propagate = False


def _uvicorn_server(app, engine, log_level: str, drain_seconds: float, host="127.0.0.1", port=8000):
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: refuse new work (503) while draining
            engine.begin_shutdown()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if sockets and self.started:  # uvicorn names the address only for sockets it bound itself
                h, p = sockets[0].getsockname()[:2]
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", f"[{h}]" if ":" in h else h, p)

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                         timeout_graceful_shutdown=drain_seconds, lifespan="on")
    return _Server(cfg)


def run(opts: ServerOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Serve in the foreground until SIGINT/SIGTERM (then drain and exit)."""
    setup_logging(log_level)
    sock = _listen(host, port)  # before the model loads: a taken port is one line at once, not uvicorn's exit 3
    try:
        app, engine = build_app(opts)
        _uvicorn_server(app, engine, log_level, opts.drain_seconds, host, port).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: that is a clean exit
        pass
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a RuntimeUserError naming the address and why."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:  # socket.gaierror: an unknown host name
        raise RuntimeUserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port
        sock.bind(addr)
        sock.listen(2048)  # (uvicorn's backlog) connections made before uvicorn starts wait, not fail
    except OSError as e:
        sock.close()
        hint = "; choose another --port" if e.errno == errno.EADDRINUSE else ""
        raise RuntimeUserError(f"cannot listen on {host}:{port} ({e.strerror or e}){hint}") from None
    return sock


class ServerThread:
    """A server on 127.0.0.1 and an ephemeral port, in a background thread (tests, benchmarks).

    >>> with ServerThread(app, engine) as srv: openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    """

    def __init__(self, app, engine, drain_seconds: float = 5.0, log_level: str = "warning"):
        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _uvicorn_server(app, engine, log_level, drain_seconds)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(1000):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        self.stop()
        raise RuntimeError("the test server did not start")

    def stop(self, timeout: float = 30):
        self.engine.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc):
        self.stop()
