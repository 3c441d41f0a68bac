"""The HTTP API of ``brownout serve`` (FastAPI).

* ``POST /v1/briefs`` ``{"text": ..., "mode": "fast" | "balanced" | "creative"}`` -> a brief with
  requested/served mode, downshift reason and impact, warnings and what served each stage;
* ``GET /health``, ``GET /health/models/{name}``, ``GET /health/llm?model=qwen|mistral|llama|all``;
* ``GET /metrics`` (Prometheus);
* the recovery API of seed 001: ``GET /api/v1/recovery/status|health|actions`` and
  ``POST /api/v1/recovery/trigger|reset`` (bearer token from ``server.admin_token``; refused when none
  is configured).

Every refusal has a reason, in the one error shape of :mod:`brownout.server.errors`
(``{"error": {"message", "type", "code", "param", ...}}``): 400 for a body that is not UTF-8 or not
JSON, 413 for an oversized body, 415 without ``Content-Type: application/json``, 422 for invalid input
(every bad field listed), 503 with ``Retry-After`` when the service cannot answer. A failed model never
turns into a 500. ``/openapi.json`` documents the gateway's routes too, and ``/docs`` (Swagger UI)
loads its assets from this server, so it works offline.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final, Literal

from fastapi import Depends, FastAPI, Header, Query
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout.briefs.service import BriefService
from brownout.config import ROLES, BrownoutConfig
from brownout.durable.spool import Spool
from brownout.errors import ServiceUnavailable
from brownout.gateway.routes import CHAT_PATH, gateway_openapi, install_gateway
from brownout.health.loop import LoopBlockMiddleware
from brownout.recovery.manager import RecoveryBusy, RecoveryOutcome
from brownout.server import live
from brownout.server.drain import Drain, DrainMiddleware
from brownout.server.errors import (
    ApiError,
    check_json_content_type,
    error_bytes,
    error_response,
    install_error_handlers,
    openapi_error_responses,
    parse_json_body,
    send_error,
)
from brownout.server.metrics import RuntimeMetrics, multiprocess_dir
from brownout.server.runtime import Runtime

__all__ = ["BriefRequest", "create_app"]


_SURROGATE = re.compile("[\ud800-\udfff]")


class BriefRequest(BaseModel):
    """The body of ``POST /v1/briefs``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="the customer's free text", min_length=1)
    mode: Literal["fast", "balanced", "creative"] = Field(default="balanced", description="the mode wanted")

    @field_validator("text")
    @classmethod
    def _storable(cls, value: str) -> str:
        # What is acknowledged must be storable, on every database we support. PostgreSQL's text
        # cannot hold NUL, nor can UTF-8 hold a lone surrogate: such a brief used to be answered 200
        # and then refused by the database, blocking the spool behind it. Refused here instead
        # (rather than stored escaped): neither character means anything in a customer's wish, and
        # an escaped copy would no longer be the text that was sent.
        nul = value.find("\x00")
        if nul >= 0:
            raise ValueError(
                f"the text has a NUL character (U+0000) at character {nul}; remove it -- it cannot be stored"
            )
        lone = _SURROGATE.search(value)
        if lone is not None:
            raise ValueError(
                f"the text has a lone UTF-16 surrogate (U+{ord(lone.group()):04X}) at character "
                f"{lone.start()}; send valid Unicode"
            )
        return value


class TriggerRequest(BaseModel):
    """The body of ``POST /api/v1/recovery/trigger``."""

    model_config = ConfigDict(extra="forbid")

    action: str | None = Field(default=None, description="one of GET /api/v1/recovery/actions")
    failure_type: str | None = Field(
        default=None, description="instead of an action: run this failure type's whole chain"
    )
    target: str = Field(default="all", description="a model role, or all")

    @model_validator(mode="after")
    def _one_of(self) -> TriggerRequest:
        if (self.action is None) == (self.failure_type is None):
            raise ValueError("give exactly one of action and failure_type")
        return self


class _Guard:
    """ASGI middleware: refuses bodies over the limit (413) and counts error responses."""

    def __init__(self, app: ASGIApp, runtime: Runtime, max_body: int) -> None:
        self.app = app
        self.runtime = runtime
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http = self.runtime.http
        http.requests += 1
        errors = http.errors
        clock = self.runtime.clock
        arrived = clock.now()

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                status = message["status"]
                errors[status] += 1
                if status in (429, 503) and any(k == b"retry-after" for k, _ in message.get("headers", ())):
                    http.shed.observe(clock.now() - arrived)
            await send(message)

        if scope["path"] == CHAT_PATH:
            # The gateway bounds its own bodies (gateway.max_body_bytes: chats carry whole conversations).
            await self.app(scope, receive, counting_send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_body:
                    await _too_large(counting_send, self.max_body)
                    return
        edge = self.runtime.edge
        if edge is not None and scope["method"] == "POST" and scope["path"] == "/v1/briefs":
            # Read the (small, bounded) body first: a repeat of a cached request is answered here.
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
            answer = edge.lookup(body)
            if answer is not None:
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
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except _BodyTooLarge:
            await _too_large(counting_send, self.max_body)


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


def _dimmer_status(svc: BriefService) -> dict[str, Any]:
    """The dimmer for /health: its level (0: full service), value and the latency it steers by."""
    dim = svc.dimmer.snapshot()
    return {
        "level": dim.level,
        "value": dim.value,
        "dimming": dim.step,
        "target_p95": dim.target_p95,
        "observed_p95": dim.observed_p95,
        "targets": dict(svc.config.dimmer.targets),
        "enabled": svc.config.dimmer.enabled,
    }


def _unavailable(
    e: ServiceUnavailable, *, overloaded: bool = False, queue_size: int | None = None
) -> Response:
    if overloaded:
        # Shed at capacity: the same kind as the gateway's 429, and what to do instead.
        return error_response(
            503,
            str(e),
            type="rate_limit_error",
            code="overloaded",
            retry_after=e.retry_after,
            queue_size=queue_size,
            suggestion="Retry after the given time, or use mode=fast for a quicker answer",
        )
    return error_response(503, str(e), code="unavailable", retry_after=e.retry_after)


def create_app(config: BrownoutConfig, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; ``runtime`` (default: one built from ``config``) is started and stopped with it."""
    rt = runtime or Runtime(config)
    # Graceful drain on SIGTERM/SIGINT (brownout.server.drain; run_server starts it).
    drain = Drain(clock=rt.clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        await rt.start()
        exporter.start()
        try:
            yield
        finally:
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
    # Several workers share their metrics through PROMETHEUS_MULTIPROCESS_DIR (see server.metrics).
    exporter = RuntimeMetrics(rt, directory=multiprocess_dir())
    # The OpenAI-compatible gateway: /v1/chat/completions, /v1/models, /health/gateway, its metrics.
    install_gateway(app, rt.gateway, exporter.registry)

    def service() -> BriefService:
        if rt.service is None:
            raise ApiError(503, "the service is starting up", code="starting", retry_after=5)
        return rt.service

    def require_admin(authorization: str | None = Header(default=None)) -> None:
        token = config.server.admin_token
        if token is None:
            raise ApiError(
                403,
                "admin endpoints are disabled: set server.admin_token (or BROWNOUT_ADMIN_TOKEN)",
                code="admin_disabled",
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.encode(), token.get_secret_value().encode()
        ):
            raise ApiError(
                401,
                "a valid bearer token is required (Authorization: Bearer <server.admin_token>)",
                code="invalid_token" if authorization else "missing_token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/v1/briefs")
    async def create_brief(body: BriefRequest, request: Request) -> Response:
        svc = service()
        try:
            response = await svc.create_brief(body.text, body.mode)
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_value", param="text") from e
        except ServiceUnavailable as e:
            overloaded = e.__cause__ is not None and type(e.__cause__).__name__ == "Overloaded"
            return _unavailable(e, overloaded=overloaded, queue_size=svc.admission.queue_size)
        if not response.get("cached"):
            try:
                await rt.record(body.text, response)
            except ServiceUnavailable as e:
                return _unavailable(e)
        raw = getattr(request.state, "raw_body", None)
        if rt.edge is not None and raw is not None and not response.get("degraded"):
            rt.edge.remember(raw, svc.cache_key(body.text.strip(), body.mode))
        return JSONResponse(response)

    def model_status(role: str) -> dict[str, Any]:
        svc = service()
        client = rt.clients[role]
        probe = svc.stats.health.get(role)
        server = rt.local.get(role)
        return {
            "status": "healthy" if svc.role_available(role) else "unhealthy",
            "breakers": {name: b.state.value for name, b in client.breakers.items()},
            "endpoints": client.endpoints_status(),
            "last_check": None
            if probe is None
            else {
                "healthy": probe.healthy,
                "latency_ms": round(probe.latency * 1000, 1),
                "error": probe.error,
                # Busy: every slot was answering calls, so the model counts as healthy unprobed.
                "busy": probe.busy,
                "queued_ms": round(probe.queued * 1000, 1),
            },
            "server": server.status() if server is not None else None,
        }

    @app.get("/health")
    async def health() -> Response:
        svc = service()
        models = {role: model_status(role) for role in ROLES}
        healthy = [r for r, m in models.items() if m["status"] == "healthy"]
        database = _database_status(rt)
        if len(healthy) == len(ROLES) and database["status"] == "healthy":
            status = "healthy"
        elif "qwen" in healthy or svc.cache.stats().size > 0:
            status = "degraded"
        else:
            status = "unhealthy"
        cache = svc.cache.stats()
        body = {
            "status": status,
            "models": models,
            "cache": {
                "status": "healthy",
                "size": cache.size,
                "max_size": cache.max_entries,
                "utilization": round(cache.utilisation, 4),
                "ttl_seconds": cache.ttl,
                "hits": cache.hits,
                "misses": cache.misses,
            },
            "database": database,
            "spool": _spool_status(rt),
            "redis": rt.shared.status() if rt.shared is not None else {"status": "not configured"},
            "events": _outbox_status(rt),
            "gateway": rt.gateway.status(),
            "queue_size": svc.admission.queue_size,
            "in_flight": svc.admission.in_flight,
            "system_mode": rt.modes.mode.value,
            "drain": drain.status(),
            "dimmer": _dimmer_status(svc),
        }
        if not drain.admitting:
            # A load balancer takes the server out of rotation on the 503; the body says why.
            return error_response(
                503,
                "the server is shutting down (draining)",
                code="draining",
                retry_after=drain.retry_after,
                extra={**body, "status": "draining"},
            )
        return JSONResponse(body)

    async def check_model(role: str) -> dict[str, Any]:
        svc = service()
        client = rt.clients[role]
        now = datetime.now(UTC).isoformat()
        if not client.available:
            return {
                "model": role,
                "status": "unhealthy",
                "reason": "circuit_breaker_open",
                "circuit_state": "open",
                "last_check": now,
            }
        results = await svc.check_health(role)
        best = min(results, key=lambda r: (not r.healthy, r.latency)) if results else None
        if best is not None and best.healthy:
            return {
                "model": role,
                "status": "healthy",
                "latency_ms": int(best.latency * 1000),
                "circuit_state": "closed",
                "last_check": now,
            }
        return {
            "model": role,
            "status": "unhealthy",
            "reason": best.error if best is not None else "no endpoints",
            "latency_ms": int(best.latency * 1000) if best is not None else None,
            "last_check": now,
        }

    @app.get("/health/models/{name}")
    async def health_model(name: str) -> Response:
        if name not in ROLES:
            raise ApiError(
                404, f"unknown model {name!r}; known: {list(ROLES)}", code="model_not_found", param="name"
            )
        result = await check_model(name)
        if result["status"] != "healthy":
            return _unhealthy(name, result)
        return JSONResponse(result)

    @app.get("/health/llm")
    async def health_llm(
        model: Literal["qwen", "mistral", "llama", "all"] = Query(default="all"),
    ) -> Response:
        if model == "all":
            # Concurrently: three hung models cost one health_timeout, not three.
            checked = await asyncio.gather(*(check_model(role) for role in ROLES))
            results = dict(zip(ROLES, checked, strict=True))
            ok = all(r["status"] == "healthy" for r in results.values())
            return JSONResponse({"status": "healthy" if ok else "degraded", "models": results})
        result = await check_model(model)
        if result["status"] != "healthy":
            return _unhealthy(model, result)
        return JSONResponse(result)

    # Documented as Prometheus text, not JSON (FastAPI's default): clients check the content type.
    @app.get("/metrics", response_class=PlainTextResponse, responses=_json_error_responses())
    async def metrics() -> Response:
        return Response(exporter.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/recovery/status")
    async def recovery_status() -> dict[str, Any]:
        svc = service()
        return {
            "breakers": {
                name: b.metrics().state.value
                for client in rt.clients.values()
                for name, b in client.breakers.items()
            },
            "model_servers": {role: s.status() for role, s in rt.local.items()},
            "available_modes": [
                m.name
                for m in svc.pipeline.modes
                if all(svc.role_available(r) for r in svc.pipeline.roles(m))
            ],
            "history": [_action(a) for a in list(rt.history)[-20:]],
            "system_mode": rt.modes.mode.value,
            "switched_off": {by: sorted(roles) for by, roles in svc.switched_off.items()},
            "generation_limit": svc.generation_limit,
            "recovery": rt.recovery.status(),
        }

    @app.get("/api/v1/recovery/health")
    async def recovery_health() -> dict[str, Any]:
        ops = rt.ops
        return {
            "models": {role: model_status(role) for role in ROLES},
            "database": rt.store_ok,
            "system_mode": ops.modes.status(),
            "resources": ops.resources.status(),
            "event_loop": ops.loop_blocks.status(),
            "cache_ttl": ops.ttl.status(),
        }

    @app.get("/api/v1/recovery/actions")
    async def recovery_actions() -> dict[str, Any]:
        return {
            "actions": rt.recovery.actions_info(),
            "failure_types": rt.recovery.failure_types_info(),
            "history": [_action(a) for a in list(rt.history)[-50:]],
        }

    admin_timeout = config.recovery.admin_timeout

    async def finished(task: asyncio.Task[Any]) -> bool:
        """Wait at most ``recovery.admin_timeout`` for ``task``, never cancelling it: False when it
        still goes on; else True, or what it raised."""
        await asyncio.wait({task}, timeout=admin_timeout)
        if not task.done():
            return False
        task.result()
        return True

    def accepted(run: dict[str, Any] | None, what: str) -> JSONResponse:
        # 202: the work was accepted and goes on; GET /api/v1/recovery/status shows its progress.
        return JSONResponse(
            {
                "status": "running",
                "detail": f"the {what} goes on after {admin_timeout:g} s; "
                "GET /api/v1/recovery/status shows its progress",
                "run": run,
            },
            status_code=202,
        )

    def busy(e: RecoveryBusy) -> ApiError:
        return ApiError(503, str(e), code="recovery_busy", retry_after=e.retry_after)

    @app.post(
        "/api/v1/recovery/trigger",
        dependencies=[Depends(require_admin)],
        responses={202: {"description": "accepted; still running after `recovery.admin_timeout`"}},
    )
    async def recovery_trigger(body: TriggerRequest) -> Any:
        rec = rt.recovery
        try:
            if body.failure_type is not None:
                started = rec.start_failure(
                    failure_type=body.failure_type, target=body.target, trigger="manual"
                )
            else:
                assert body.action is not None
                started = rec.start_trigger(body.action, body.target)
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_value") from e
        except RecoveryBusy as e:
            raise busy(e) from e
        if isinstance(started, RecoveryOutcome):  # a manual chain is never held back; kept total
            return started.as_dict()
        assert started.task is not None
        if not await finished(started.task):
            return accepted(started.as_dict(), f"recovery run {started.id}")
        if started.outcome is not None:
            return {**started.outcome.as_dict(), "run_id": started.id}
        return _action(started.attempt)

    @app.post(
        "/api/v1/recovery/reset",
        dependencies=[Depends(require_admin)],
        responses={202: {"description": "accepted; still running after `recovery.admin_timeout`"}},
    )
    async def recovery_reset() -> Any:
        try:
            task = rt.ops.start_reset()
        except RecoveryBusy as e:
            raise busy(e) from e
        if not await finished(task):
            return accepted(None, "reset")
        return {"done": [_action(a) for a in task.result()]}

    _install_docs(app)
    if config.loop_block.enabled:
        # Inside _Guard: times each step of every request's task (seed 003 §C blocking detection).
        app.add_middleware(LoopBlockMiddleware, detector=rt.ops.loop_blocks)
    app.add_middleware(_Guard, runtime=rt, max_body=config.server.max_body_bytes)
    # The live view, the dashboard, the pre-promotion check's routes, and CORS when configured
    # (added last, so it is the outermost middleware and its headers reach every answer).
    live.install(app, rt, config)
    # Outermost: while draining, nothing new reaches the app, and a request the drain cuts short is
    # answered 503 here rather than 500 by uvicorn.
    app.add_middleware(DrainMiddleware, drain=drain)
    return app


def _json_error_responses() -> dict[int | str, dict[str, Any]]:
    """:func:`openapi_error_responses` spelled out as JSON, for a route whose success is not JSON
    (FastAPI would document its errors with the route's own media type)."""
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {
        status: {"description": answer["description"], "content": content}
        for status, answer in openapi_error_responses().items()
    }


def _unhealthy(model: str, result: dict[str, Any]) -> Response:
    """A health probe's 503: the error shape, with the probe's fields kept next to ``error``."""
    reason = result.get("reason")
    return error_response(
        503,
        f"model {model} is unhealthy" + (f": {reason}" if reason else ""),
        code="model_unhealthy",
        retry_after=_PROBE_RETRY_AFTER,
        extra=result,
    )


_PROBE_RETRY_AFTER = 5  # seconds a client is told to wait before probing an unhealthy model again

_SWAGGER: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css; charset=utf-8"),
    "favicon-32x32.png": ("swagger-ui/favicon-32x32.png", "image/png"),
}


def _install_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's assets from this package (works offline) and an ``/openapi.json``
    that documents the gateway's routes too (they stay on their fast ASGI path)."""
    from importlib import resources

    static = resources.files("brownout.server") / "static"
    assets = {name: (static.joinpath(path).read_bytes(), media) for name, (path, media) in _SWAGGER.items()}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            gateway_openapi(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
            oauth2_redirect_url=None,
            # No call to the public spec validator: nothing leaves this machine.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/docs/static/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise ApiError(404, f"no docs asset {name!r}", code="not_found")
        body, media = found
        return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=86400"})


def _database_status(rt: Runtime) -> dict[str, Any]:
    """``unhealthy`` while the database refuses writes, ``degraded`` while acknowledged writes wait in
    the spool (the database is back, or took some writes, but is not yet caught up), else ``healthy``.

    ``error`` is a summary (the driver's error class and short message), never the SQL statement or
    its parameters, which hold customers' text.
    """
    pending = rt.spool.pending
    if not rt.store_ok:
        status = "unhealthy"
    elif pending:
        status = "degraded"
    else:
        status = "healthy"
    return {
        "status": status,
        "error": rt.store_error,
        "spooled_writes": pending,
        "writable_host": rt.store.writable_host,
        "read_only": rt.store.read_only,
        "failovers": rt.store.failovers,
    }


def _spool_status(rt: Runtime) -> dict[str, Any]:
    st = rt.spool.stats()
    return {
        "pending": st.pending,
        "oldest_age_seconds": round(st.oldest_age, 3),
        "replayed": st.replayed,
        "failed_attempts": st.failed_attempts,
        "last_error": st.last_error,
        "alert": st.alert,
        "dead_letters": st.dead,
        "lost": _lost(rt.spool),
    }


def _outbox_status(rt: Runtime) -> dict[str, Any]:
    if rt.outbox is None:
        return {"status": "not configured"}
    st = rt.outbox.stats()
    return {
        "status": "healthy" if st.pending == 0 else "spooling",
        "pending": st.pending,
        "oldest_age_seconds": round(st.oldest_age, 3),
        "published": st.replayed,
        "dead_letters": st.dead,
        "last_error": st.last_error,
        "lost": _lost(rt.outbox.spool),
    }


_LOST_IDS = 100
"""Lost entries named in /health (``count`` says how many there are in all)."""


def _lost(spool: Spool) -> dict[str, Any]:
    """Acknowledged entries a damaged spool file lost (found on open, kept until cleared)."""
    lost = spool.lost
    return {
        "count": len(lost),
        "ids": [e.key for e in lost[:_LOST_IDS]],
        "files": sorted({e.file for e in lost}),
    }


def _action(a: Any) -> dict[str, Any]:
    return {
        "action": a.action,
        "target": a.target,
        "at": a.at,
        "ok": a.ok,
        "detail": a.detail,
        "status": getattr(a, "status", "ok" if a.ok else "failed"),
        "failure_type": getattr(a, "failure_type", "manual"),
        "trigger": getattr(a, "trigger", "manual"),
    }
