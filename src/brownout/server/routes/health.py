"""Health and metrics: ``GET /health``, ``GET /health/models/{name}``, ``GET /health/llm`` and
``GET /metrics`` (Prometheus).

``/health`` answers 503 while the server drains, so a load balancer takes it out of rotation; a model
probe that fails answers 503 with the probe's fields next to the error.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from brownout.config import ROLES
from brownout.server.drain import Drain
from brownout.server.errors import ApiError, error_response, openapi_error_responses
from brownout.server.metrics import RuntimeMetrics
from brownout.server.routes import running
from brownout.server.status import ServerStatus

__all__ = ["install"]


def install(router: APIRouter, *, state: ServerStatus, drain: Drain, exporter: RuntimeMetrics) -> None:
    """Add the health routes and ``/metrics`` to ``router``: the server's state from ``state``, whether
    it drains from ``drain``, the Prometheus exposition from ``exporter``."""

    @router.get("/health")
    async def health() -> Response:
        svc = running(state.service)
        models = {role: state.model(role) for role in ROLES}
        healthy = [r for r, m in models.items() if m["status"] == "healthy"]
        database = state.database()
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
            "spool": state.spool(),
            "redis": state.shared.status() if state.shared is not None else {"status": "not configured"},
            "events": state.outbox(),
            "gateway": state.gateway.status(),
            "queue_size": svc.admission.queue_size,
            "in_flight": svc.admission.in_flight,
            "retry_line_seconds": round(svc.admission.retry_line, 1),
            "system_mode": state.modes.mode.value,
            "drain": drain.status(),
            "dimmer": state.dimmer(),
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
        svc = running(state.service)
        client = state.clients[role]
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

    @router.get("/health/models/{name}")
    async def health_model(name: str) -> Response:
        if name not in ROLES:
            raise ApiError(
                404, f"unknown model {name!r}; known: {list(ROLES)}", code="model_not_found", param="name"
            )
        result = await check_model(name)
        if result["status"] != "healthy":
            return _unhealthy(name, result)
        return JSONResponse(result)

    @router.get("/health/llm")
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
    @router.get("/metrics", response_class=PlainTextResponse, responses=_json_error_responses())
    async def metrics() -> Response:
        return Response(exporter.exposition(), media_type=CONTENT_TYPE_LATEST)


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
