"""The FastAPI routes (thin: validation by pydantic, work in serving.py / engine.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkv_runtime import RuntimeUserError

from . import prompt_scoring, protocol
from .engine import Engine, ServeError
from .metrics import CONTENT_TYPE_LATEST
from .serving import Serving, ServingConfig


def _error(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, type_, param, code), status_code=status, headers=headers)


class _Inflight:
    """Requests being answered (streams until their last byte): what a drain waits for."""

    n = 0


class _Guard:
    """ASGI middleware: counts requests by endpoint and status; refuses, before reading the body, a
    request without the API key (401, when one is set), any request while the server drains (503) and
    oversized bodies (413) from their Content-Length, or (a body sent chunked, without a
    Content-Length) as soon as what arrived passes the limit. /health and /metrics are never refused."""

    def __init__(self, app, metrics, max_body: int, engine, inflight: _Inflight, api_key: str | None = None):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.engine, self.inflight = engine, inflight
        self.expected = check_api_key(api_key).encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.inflight.n += 1
        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.inflight.n -= 1
            self.metrics.requests.labels(path, str(status.get("code", 0))).inc()

    def _authorized(self, headers: dict) -> bool:
        # "Bearer" is case-insensitive (RFC 7235: auth schemes are); the key itself is compared exactly,
        # in constant time: how much of a guess matched must not show in how long the answer takes
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        return hmac.compare_digest(key.lstrip(b" ") if scheme.lower() == b"bearer" else b"", self.expected)

    async def _guarded(self, scope, receive, send_counted):
        headers = dict(scope.get("headers") or [])
        if scope["path"] not in _OPEN:
            if self.expected is not None and not self._authorized(headers):
                given = b"authorization" in headers
                msg = (
                    "Incorrect API key provided"
                    if given
                    else "You didn't provide an API key. Send it as the header 'Authorization: Bearer KEY'"
                )
                return await _error(
                    401, msg, "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )(scope, receive, send_counted)
            if self.engine.draining:
                return await _error(503, "the server is shutting down", "service_unavailable")(
                    scope, receive, send_counted
                )
        too_large = _error(
            413,
            f"the request body is larger than {self.max_body} bytes",
            "invalid_request_error",
            code="request_too_large",
        )
        length = headers.get(b"content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            await too_large(scope, receive, send_counted)
        elif length is None and scope.get("method") not in ("GET", "HEAD"):
            # no Content-Length (Transfer-Encoding: chunked): the limit must hold all the same, so read
            # the body here, at most max_body bytes of it, and hand it on to the app in one piece
            first = await self._read_bounded(receive)
            if first is None:
                await too_large(scope, receive, send_counted)
            else:
                await self.app(scope, _replay(first, receive), send_counted)
        else:
            await self.app(scope, receive, send_counted)

    async def _read_bounded(self, receive):
        """The whole body as one ``http.request`` message (or the disconnect that cut it short); None
        once more than ``max_body`` bytes arrived."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}


def check_api_key(key: str) -> str:
    """An API key a client can send: printable ASCII, nothing at either end that HTTP would strip (a key
    with a trailing space or newline could never match), not empty (an empty ``--api-key ""`` would
    otherwise mean no key at all, silently). None (no key) is the caller's."""
    if not isinstance(key, str) or not key:
        raise RuntimeUserError("--api-key is empty: give a key, or leave the option out to serve without one")
    if key != key.strip(" \t") or not all(" " <= ch <= "~" for ch in key):
        raise RuntimeUserError(
            "--api-key must be printable ASCII without spaces at either end (an HTTP header cannot carry it otherwise)"
        )
    return key


def _replay(first: dict, receive):
    """An ASGI ``receive`` that returns ``first``, then whatever the connection sends (a disconnect)."""
    pending = [first]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


_ENDPOINTS = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
}
_OPEN = {"/health", "/metrics"}  # no API key, and answered while draining (/health says 503 itself)


SESSION_HEADER = "x-session-id"  # the header Ray Serve's consistent-hash router routes by


def create_app(
    engine: Engine,
    config: ServingConfig,
    max_body_bytes: int = 16 << 20,
    drain_seconds: float = 10.0,
    session_store=None,
    api_key: str | None = None,
) -> FastAPI:
    """An app serving one model. Its lifespan starts the engine thread and drains it at shutdown.
    ``api_key``: required as ``Authorization: Bearer KEY`` on every endpoint but /health and /metrics."""
    if api_key is not None:
        check_api_key(api_key)  # (here: the middleware itself is built only on the first request)
    serving = Serving(engine, config, session_store)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # (in a thread: the event loop must keep delivering the last events of draining streams)
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="rwkv_runtime server", lifespan=lifespan)
    app.state.engine, app.state.serving, app.state.inflight = engine, serving, _Inflight()

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # unknown path, wrong method: same shape
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # (its loc is a character position, not a field)
            at = first.get("loc", ("body", None))[-1]
            detail = (first.get("ctx") or {}).get("error", "")
            return _error(
                400,
                f"the body is not valid JSON ({detail or 'decode error'} at character {at})",
                "invalid_request_error",
            )
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return _error(400, msg, "invalid_request_error", loc[0] if loc else None)

    def _respond(result, stream: bool):
        if stream and result is not None:
            return StreamingResponse(
                result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        sid = request.headers.get(SESSION_HEADER)
        return _respond(await serving.completions(body, request.is_disconnected, sid), body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatCompletionRequest, request: Request):
        sid = request.headers.get(SESSION_HEADER)
        return _respond(await serving.chat(body, request.is_disconnected, sid), body.stream)

    @app.post("/tokenize")
    async def tokenize(body: protocol.TokenizeRequest):
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: protocol.DetokenizeRequest):
        return serving.detokenize(body)

    prompt_scoring.add_routes(app, serving)  # GET /tokenizer_info (lm-evaluation-harness's remote tokenizer)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        serving.check_model(name)
        return serving.model_card(name)

    @app.get("/health")
    async def health():
        if engine.draining:
            return _error(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok", "model": config.model_name, "running": engine.active()}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(
        _Guard,
        metrics=engine.metrics,
        max_body=max_body_bytes,
        engine=engine,
        inflight=app.state.inflight,
        api_key=api_key,
    )
    return app


def json_log_formatter():
    """Structured logs: one JSON object per line."""
    import logging

    class _Json(logging.Formatter):
        def format(self, record):
            msg = record.getMessage()
            try:
                body = json.loads(msg) if msg.startswith("{") else {"message": msg}
            except ValueError:
                body = {"message": msg}
            out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, **body}
            if record.exc_info:  # (log.exception): the stack is what the log is for
                out["exc_info"] = self.formatException(record.exc_info)
            if record.stack_info:
                out["stack_info"] = self.formatStack(record.stack_info)
            return json.dumps(out)

    return _Json()
