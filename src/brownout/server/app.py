"""The HTTP API of ``brownout serve`` (FastAPI).

* ``POST /v1/briefs`` ``{"text": ..., "mode": "fast" | "balanced" | "creative"}`` -> a brief with
  requested/served mode, downshift reason and impact, warnings and what served each stage;
* ``GET /health``, ``GET /health/models/{name}``, ``GET /health/llm?model=qwen|mistral|llama|all``;
* ``GET /metrics`` (Prometheus);
* the recovery API, for operators: ``GET /api/v1/recovery/status|health|actions`` and
  ``POST /api/v1/recovery/trigger|reset`` (bearer token from ``server.admin_token``; refused when none
  is configured);
* the live view, the dashboard and the pre-promotion check's routes, and the OpenAI-compatible gateway.

:func:`create_app` puts the app together: the runtime (:mod:`brownout.server.runtime`, built in one
step), the routes, each module of :mod:`brownout.server.routes` given the parts it uses, and the
middleware. ``BriefRequest`` is defined in :mod:`brownout.server.routes.briefs` and re-exported here.

Every refusal has a reason, in the one error shape of :mod:`brownout.server.errors`
(``{"error": {"message", "type", "code", "param", ...}}``): 400 for a body that is not UTF-8 or not
JSON, 413 for an oversized body, 415 without ``Content-Type: application/json``, 422 for invalid input
(every bad field listed), 503 with ``Retry-After`` when the service cannot answer. A failed model never
turns into a 500. ``/openapi.json`` documents the gateway's routes too, and ``/docs`` (Swagger UI)
loads its assets from this server, so it works offline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout import telemetry
from brownout.clock import Clock
from brownout.config import BrownoutConfig
from brownout.gateway.routes import CHAT_PATH, install_gateway
from brownout.health.loop import LoopBlockMiddleware
from brownout.server.access import AccessLines, AccessLog
from brownout.server.drain import Drain, DrainMiddleware
from brownout.server.edge import EdgeCache
from brownout.server.errors import (
    ApiError,
    check_json_content_type,
    error_bytes,
    install_error_handlers,
    openapi_error_responses,
    parse_json_body,
    send_error,
)
from brownout.server.metrics import RuntimeMetrics, multiprocess_dir
from brownout.server.routes import briefs, check, docs, health, jobs, live, recovery
from brownout.server.routes.briefs import BriefRequest, EarlyAdmission
from brownout.server.runtime import HttpStats, Runtime
from brownout.server.tracing import TraceMiddleware

__all__ = ["BriefRequest", "create_app"]


class _Guard:
    """ASGI middleware: refuses bodies over the limit (413), counts requests and error responses (and
    times refusals) in ``http``, answers a repeat of a cached brief request from ``edge``, and has a
    brief request admitted by ``early`` once its body is read (a refusal is then answered here)."""

    def __init__(
        self,
        app: ASGIApp,
        http: HttpStats,
        clock: Clock,
        edge: EdgeCache | None,
        max_body: int,
        path_limits: dict[str, int] | None = None,
        early: EarlyAdmission | None = None,
    ) -> None:
        self.app = app
        self.http = http
        self.clock = clock
        self.edge = edge
        self.max_body = max_body
        self.path_limits = path_limits or {}
        """Body limits of paths that take more than ``max_body`` (a job's list of items)."""
        self.early = early

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http = self.http
        http.requests += 1
        errors = http.errors
        clock = self.clock
        arrived = clock.now()
        brief = scope["path"] == "/v1/briefs"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    errors[status] += 1
                    headers = message.get("headers", ())
                    if status in (429, 503) and any(k == b"retry-after" for k, _ in headers):
                        http.shed.observe(clock.now() - arrived)
                elif brief and status == 200:
                    http.briefs.observe(clock.now() - arrived)
            await send(message)

        if scope["path"] == CHAT_PATH:
            # The gateway bounds its own bodies (gateway.max_body_bytes: chats carry whole conversations).
            await self.app(scope, receive, counting_send)
            return
        limit = self.path_limits.get(scope["path"], self.max_body)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    await _too_large(counting_send, limit)
                    return
        edge = self.edge
        early = self.early
        if (edge is not None or early is not None) and brief and scope["method"] == "POST":
            # Read the (small, bounded) body first: a repeat of a cached request is answered here,
            # and one the service refuses for load.
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    await _too_large(counting_send, self.max_body)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            answer = edge.lookup(body) if edge is not None else None
            if answer is not None:
                http.briefs.observe(clock.now() - arrived)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(answer)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": answer})
                return
            if early is not None and await early(scope, body, counting_send):
                return
            scope.setdefault("state", {})["raw_body"] = body
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except _BodyTooLarge:
            await _too_large(counting_send, limit)


class _BodyTooLarge(ApiError):
    """A body without a (truthful) Content-Length grew past the limit while being read.

    An HTTPException because FastAPI turns any other error raised while it reads a body into a 400;
    this one it re-raises, and the app's error handler answers 413 like the Content-Length check.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            _too_large_message(limit),
            headers={"Connection": "close"},
            code="request_too_large",
            limit_bytes=limit,
        )


def _too_large_message(limit: int) -> str:
    return f"the request body is over {limit} bytes (server.max_body_bytes)"


async def _too_large(send: Send, limit: int) -> None:
    body = error_bytes(413, _too_large_message(limit), code="request_too_large", limit_bytes=limit)
    # The rest of the body is not wanted: close rather than read and drop it to keep the connection.
    await send_error(send, 413, body, _CLOSE)


_CLOSE: Final = ((b"connection", b"close"),)


class _StrictJSONRequest(Request):
    """A request whose JSON body is parsed by :func:`~brownout.server.errors.parse_json_body`: a body
    that is not UTF-8, not JSON, too deep, or holds NaN or a lone surrogate is refused with a 400 that
    says what and where, instead of FastAPI's generic answers (or a 500 while echoing the input)."""

    async def json(self) -> Any:
        """The parsed body (parsed once)."""
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class _JSONRoute(APIRoute):
    """A route whose body, when it takes one, must be sent as JSON: 415 without
    ``Content-Type: application/json``, strict parsing as :class:`_StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, behind the content-type check and with the strict request."""
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            refused = check_json_content_type(request.headers.get("content-type"))
            if refused is not None:
                raise refused
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def create_app(config: BrownoutConfig, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; ``runtime`` (default: one built from ``config``) is started and stopped with it."""
    rt = runtime or Runtime(config)
    # Graceful drain on SIGTERM/SIGINT (brownout.server.drain; run_server starts it).
    drain = Drain(clock=rt.clock)
    # The access log (brownout.server.access): written by the app once the server turns uvicorn's off.
    access_lines = AccessLines(clock=rt.clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        await rt.start()
        exporter.start()
        try:
            yield
        finally:
            access_lines.close()
            await exporter.aclose()
            await rt.stop()

    app = FastAPI(
        title="brownout",
        summary="A creative-brief service that degrades gracefully instead of going dark.",
        version="0.1.0",
        lifespan=lifespan,
        # Every 4xx/5xx is documented as the one error shape (brownout.server.errors).
        responses=openapi_error_responses(),
        # Swagger UI is served below from this package's copy (no CDN); ReDoc is not offered.
        docs_url=None,
        redoc_url=None,
    )
    # Before any route is declared: every body-taking route then parses its body strictly.
    app.router.route_class = _JSONRoute
    install_error_handlers(app)
    app.state.runtime = rt
    app.state.drain = drain
    app.state.access_lines = access_lines
    # Several workers share their metrics through PROMETHEUS_MULTIPROCESS_DIR (see server.metrics).
    exporter = RuntimeMetrics(rt, directory=multiprocess_dir())
    # The OpenAI-compatible gateway: /v1/chat/completions, /v1/models, /health/gateway, its metrics.
    install_gateway(app, rt.gateway, exporter.registry)
    router = app.router
    early = briefs.install(router, service=rt.service, records=rt.records, edge=rt.edge)
    health.install(router, state=rt.status, drain=drain, exporter=exporter)
    recovery.install(router, config=config, state=rt.status, ops=rt.ops)
    jobs.install(router, section=config.jobs, workers=rt.jobs, registry=exporter.registry)
    docs.install(app)
    if config.loop_block.enabled:
        # Inside _Guard: times each step of every request's task, to warn when one holds the event loop.
        app.add_middleware(LoopBlockMiddleware, detector=rt.ops.loop_blocks)
    app.add_middleware(
        _Guard,
        http=rt.http,
        clock=rt.clock,
        edge=rt.edge,
        max_body=config.server.max_body_bytes,
        path_limits={"/v1/jobs": config.jobs.max_body_bytes},
        early=early,
    )
    # The live view and the dashboard, the pre-promotion check's routes, and CORS when configured
    # (added after _Guard, so it is outside it and its headers reach every answer).
    origins = list(config.server.cors_origins)
    live.install(router, hub=rt.live, snapshot=rt.status.snapshot, origins=origins)
    check.install(router, config=config, service=rt.service)
    if origins:
        # Off unless origins are listed: a browser page elsewhere can then not read this API.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    # Outermost: while draining, nothing new reaches the app, and a request the drain cuts short is
    # answered 503 here rather than 500 by uvicorn.
    app.add_middleware(DrainMiddleware, drain=drain)
    # Outside the drain, so that its refusals are logged too; inside the trace, so that a traced
    # request's access line carries its trace and span ids.
    app.add_middleware(AccessLog, lines=access_lines)
    if telemetry.wanted(config.telemetry):
        # Outermost of all: an API request's span covers everything done for it, the drain's answer
        # included, and its access-log line is written inside it. Not installed at all while off.
        app.add_middleware(TraceMiddleware)
    return app
