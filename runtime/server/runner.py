"""Building and running a server: from a model path to a running uvicorn (foreground or a thread)."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rwkv_runtime import RuntimeUserError, Session

from . import named_states
from .app import create_app, json_log_formatter
from .engine import Engine, EngineConfig
from .options import API_KEY_ENV, opt
from .serving import ChatTemplate, ServingConfig

log = logging.getLogger("rwkv_runtime.server")


@dataclass
class ServerOptions:
    """Everything a server is started with. A field with ``opt(...)`` metadata is also a command-line flag
    of both CLIs (generated in options.py; the engine's flags are EngineConfig's, options.ENGINE_FLAGS)."""

    model: str
    model_name: str | None = opt(None, "the `model` clients ask for (default: the file name)")
    threads: int | None = opt(None, "onnxruntime intra-op threads", type=int, min=1)
    providers: list | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    chat_template: str | None = opt(None, "JSON file with system/user/assistant/separator/stop")
    default_max_tokens: int = opt(
        ServingConfig.default_max_tokens, "max_tokens of chat requests that leave it out", type=int, min=1
    )
    stop_token_ids: tuple | None = opt(
        None,
        "end-of-text token id (repeatable; default 0 for World-tokenizer models)",
        flag="--stop-token",
        type=int,
        min=0,
        multiple=True,
    )
    drain_seconds: float = opt(
        10.0, "on SIGTERM/SIGINT: time in-flight requests get to finish (new ones get 503)", type=float, min=0
    )
    max_body_bytes: int = 16 << 20
    # "auto": one onnxruntime session, weights held once; "step": the step graph decodes in a second
    # session (a second copy of the weights, faster batched decode: docs/benchmarks.md, Serving)
    decode_graph: str = opt(
        "auto",
        "auto: one onnxruntime session (weights once); step: the step graph decodes "
        "(two copies of the weights, faster)",
        choices=("auto", "step"),
    )
    api_key: str | None = opt(
        None,
        f"require `Authorization: Bearer KEY` on every endpoint but /health and "
        f"/metrics (default: ${API_KEY_ENV}; none: no key required)",
        env=API_KEY_ENV,
        secret=True,
    )
    host: str = opt("127.0.0.1", "bind address (loopback unless you mean it; set an API key for any other)")
    port: int = opt(8000, "port (0: any free one)", type=int, min=0, max=65535)
    log_level: str = opt("info", "log level", choices=("debug", "info", "warning", "error"))
    states: tuple | None = opt(
        None,
        "a named initial state NAME=FILE (repeatable): an .npz (Session.save_state, "
        "convert-state) or, under rwkv-export serve, a state-tuning .pth; clients pick it with "
        "model MODEL:NAME",
        flag="--state",
        multiple=True,
    )
    # NAME -> {state tensor: array}: --state files the caller read itself (rwkv-export serve: .pth, with torch)
    state_arrays: dict | None = None


def build_app(opts: ServerOptions, session_store=None):
    """(FastAPI app, Engine) for ``opts``; the engine starts with the app's lifespan. ``session_store``:
    see ``Serving`` (the Ray Serve app passes one). The model is warmed up before this returns."""
    path = Path(opts.model)
    session = Session(
        path,
        providers=opts.providers,
        threads=opts.threads,
        prefill_chunk=opts.engine.prefill_chunk,
        decode_graph=opts.decode_graph,
    )
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
    states = named_states.load(session, opts.states, opts.state_arrays)
    warm_up(session, opts.engine.prefill_chunk)
    engine = Engine(session, opts.engine)
    name = opts.model_name or (path.name[:-5] if path.name.endswith(".onnx") else path.name)
    cfg = ServingConfig(name, template, opts.default_max_tokens, tuple(stop_ids), states)
    return create_app(engine, cfg, opts.max_body_bytes, opts.drain_seconds, session_store, opts.api_key), engine


def warm_up(session: Session, chunk: int):
    """One prefill of a chunk and one decode step, thrown away: onnxruntime's first run of a graph
    (allocations, kernel selection) is several times slower than the next, and would otherwise be paid
    by the first client's time to first token."""
    n = max(1, min(chunk, 16))
    _, st = session.prefill(np.zeros((1, n), dtype=np.int64), session.new_state(1), chunk_size=chunk)
    session.step(np.zeros(1, dtype=np.int64), st)


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
        """uvicorn, draining before it stops listening: on SIGTERM/SIGINT uvicorn closes its sockets at
        once (new connections refused) and, after its graceful timeout, cancels what still runs (a
        stream cut mid-body, a CancelledError logged per stream). Here the sockets stay open while the
        engine drains (new requests: 503), requests still running after ``drain_seconds`` are failed
        by the engine (a stream ends with an error event and [DONE]), and only then does uvicorn shut down."""

        _drain_thread = None

        def handle_exit(self, sig, frame):
            if self._drain_thread is not None:  # a second signal: stop now, as uvicorn does
                return super().handle_exit(sig, frame)
            self.drain(sig, frame)

        def drain(self, sig=None, frame=None):
            engine.begin_shutdown()  # (called in the signal handler: the work happens in a thread)
            self._drain_thread = threading.Thread(target=self._drain, args=(sig, frame), name="rwkv-drain", daemon=True)
            self._drain_thread.start()

        def _drain(self, sig, frame):
            engine.stop(drain_seconds)
            # the last events of each request reach it through the event loop: let them be sent
            end = time.monotonic() + 5
            while app.state.inflight.n and time.monotonic() < end:
                time.sleep(0.02)
            if sig is None:
                self.should_exit = True
            else:
                super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if sockets and self.started:  # uvicorn names the address only for sockets it bound itself
                h, p = sockets[0].getsockname()[:2]
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", f"[{h}]" if ":" in h else h, p
                )

    # (what is left when uvicorn shuts down: idle keep-alive connections, or a client that stopped reading)
    cfg = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    return _Server(cfg)


def is_loopback(host: str) -> bool | None:
    """Whether every address ``host`` names is a loopback one; None if it names none (_listen says why)."""
    try:
        addrs = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return all(ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback for a in addrs)


def run(opts: ServerOptions, host: str | None = None, port: int | None = None, log_level: str | None = None):
    """Serve in the foreground until SIGINT/SIGTERM (then drain and exit). ``host``, ``port`` and
    ``log_level`` default to ``opts``'."""
    host = opts.host if host is None else host
    port = opts.port if port is None else port
    log_level = log_level or opts.log_level
    setup_logging(log_level)
    if not opts.api_key and is_loopback(host) is False:
        log.warning(
            json.dumps(
                {
                    "event": "no_api_key",
                    "message": (
                        f"--host {host} is not a loopback address and no API key is set: anyone who can reach this "
                        f"port can use the server; set --api-key or ${API_KEY_ENV}"
                    ),
                }
            )
        )
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
        """As SIGTERM: drain (at most ``drain_seconds``), then stop."""
        if self.server._drain_thread is None:
            self.server.drain()
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc):
        self.stop()
