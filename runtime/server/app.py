"""The FastAPI routes (thin: validation by pydantic, work in serving.py / engine.py)."""
from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol
from .engine import Engine, ServeError
from .metrics import CONTENT_TYPE_LATEST
from .serving import Serving, ServingConfig


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, type_, param, code), status_code=status)


class _Guard:
    """ASGI middleware: counts requests by endpoint and status, and refuses oversized bodies (413)
    from their Content-Length before they are read, or (a body sent chunked, without a Content-Length)
    as soon as what arrived passes the limit."""

    def __init__(self, app, metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        too_large = _error(413, f"the request body is larger than {self.max_body} bytes", "invalid_request_error",
                           code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
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
        self.metrics.requests.labels(path, str(status.get("code", 0))).inc()

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


def _replay(first: dict, receive):
    """An ASGI ``receive`` that returns ``first``, then whatever the connection sends (a disconnect)."""
    pending = [first]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


SESSION_HEADER = "x-session-id"  # the header Ray Serve's consistent-hash router routes by


def create_app(engine: Engine, config: ServingConfig, max_body_bytes: int = 16 << 20,
               drain_seconds: float = 10.0, session_store=None) -> FastAPI:
    """An app serving one model. Its lifespan starts the engine thread and drains it at shutdown."""
    serving = Serving(engine, config, session_store)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # (in a thread: the event loop must keep delivering the last events of draining streams)
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="rwkv_runtime server", lifespan=lifespan)
    app.state.engine, app.state.serving = engine, serving

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
            return _error(400, f"the body is not valid JSON ({detail or 'decode error'} at character {at})",
                          "invalid_request_error")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return _error(400, msg, "invalid_request_error", loc[0] if loc else None)

    def _respond(result, stream: bool):
        if stream:
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        serving.check_model(name)
        return serving.model_card()

    @app.get("/health")
    async def health():
        if engine.draining:
            return _error(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok", "model": config.model_name, "running": engine.active()}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, metrics=engine.metrics, max_body=max_body_bytes)
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
            return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, **body})

    return _Json()
