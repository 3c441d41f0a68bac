"""The server span of API requests: parented to the caller's traceparent; probes left out."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from brownout.server.tracing import TraceMiddleware
from support.otlp import memory_tracing


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True}, headers={"x-brownout-attempts": "2", "x-brownout-served-by": "g/e"})


async def _broken(request: Request) -> Response:
    return JSONResponse({"error": "down"}, status_code=503)


APP = Starlette(
    routes=[
        Route("/v1/chat/completions", _ok, methods=["POST"]),
        Route("/v1/briefs", _broken, methods=["POST"]),
        Route("/health", _ok),
    ]
)


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=TraceMiddleware(APP)), base_url="http://t")


async def test_an_api_request_gets_a_server_span_under_the_callers() -> None:
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with memory_tracing() as finished:
        async with _client() as http:
            assert (
                await http.post("/v1/chat/completions", headers={"traceparent": caller})
            ).status_code == 200
            assert (await http.post("/v1/briefs")).status_code == 503
            assert (await http.get("/health")).status_code == 200  # a probe: no span
        served, failed = finished()
    assert served.name == "POST /v1/chat/completions"
    assert f"{served.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert served.parent is not None
    assert f"{served.parent.span_id:016x}" == "00f067aa0ba902b7"
    attributes = dict(served.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["brownout.attempts"] == 2
    assert attributes["brownout.served_by"] == "g/e"
    assert served.status.status_code.name == "UNSET"
    assert failed.name == "POST /v1/briefs"
    assert failed.parent is None  # no traceparent: a new trace
    assert failed.status.status_code.name == "ERROR"
    assert dict(failed.attributes or {})["error.type"] == "503"


async def test_tracing_off_passes_every_request_through_untouched() -> None:
    async with _client() as http:
        response = await http.post("/v1/chat/completions")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
