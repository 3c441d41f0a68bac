"""The live view's routes: its streams, the status snapshot and the dashboard.

``GET /api/v1/events`` (Server-Sent Events, resumable with ``Last-Event-ID``), ``GET /api/v1/ws``
(WebSocket, the same JSON messages), ``GET /api/v1/status`` (the snapshot as JSON, for
``brownout status``), ``GET /api/v1/history`` (the charts' points of the last minutes), and
``GET /dashboard`` (plain HTML and JS, no build step, no external assets, so it works offline; its
charts are drawn by uPlot, vendored under ``static/vendor/uplot``). With ``?charts=1`` the streams
also carry the charts' points (``history`` once, then ``sample`` messages). The messages come from
the :class:`~brownout.server.live.LiveHub`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Query, WebSocket
from fastapi.responses import Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from brownout.server.errors import ErrorResponse, error_response
from brownout.server.live import LiveHub, Snapshot, TooManyClients, event_id

__all__ = ["install"]

_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    # The charting library, as its npm package ships it (static/vendor/uplot/README.md).
    "vendor/uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to its own origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("brownout.server").joinpath("static", *name.split("/")).read_bytes()


def _origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Browsers send ``Origin`` on WebSocket handshakes but apply no CORS to them: check it here."""
    if origin is None:
        return True  # not a browser
    if origin in allowed or "*" in allowed:
        return True
    return host is not None and urlsplit(origin).netloc == host


def install(router: APIRouter, *, hub: LiveHub, snapshot: Snapshot, origins: list[str]) -> None:
    """Add the live routes to ``router``: the hub's streams, ``snapshot`` as ``/api/v1/status``, the
    dashboard. ``origins`` are the allowed browser origins (``server.cors_origins``), checked on
    WebSocket handshakes (browsers apply no CORS to them)."""
    page = _asset("dashboard.html")
    assets = {name: _asset(name) for name in _ASSETS}

    @router.get(
        "/api/v1/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "snapshot, event and alert messages"},
            503: {"model": ErrorResponse, "description": "too many live clients"},
        },
    )
    async def live_events(
        last_event_id: str | None = Header(default=None),
        charts: bool = Query(default=False, description="also send the dashboard charts' points"),
    ) -> Response:
        """Server-Sent Events: snapshots, breaker/mode/health/recovery events and alerts, live."""
        after = event_id(last_event_id)
        try:
            client = hub.connect(after=after, charts=charts)
        except TooManyClients as e:
            return error_response(503, str(e), code="too_many_clients", retry_after=5)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 3000\n\n"
                while True:
                    message = await client.get()
                    if message is None:
                        return
                    yield message.sse()
            finally:
                hub.disconnect(client)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.websocket("/api/v1/ws")
    async def live_ws(websocket: WebSocket) -> None:
        """The same messages as ``/api/v1/events``, as WebSocket text frames."""
        if not _origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), origins):
            await websocket.close(code=1008, reason="origin not allowed")
            return
        try:
            client = hub.connect(charts=websocket.query_params.get("charts") in ("1", "true"))
        except TooManyClients:
            await websocket.close(code=1013, reason="too many live clients")
            return
        await websocket.accept()

        async def send_all() -> None:
            while True:
                message = await client.get()
                if message is None:
                    break
                await websocket.send_text(message.data)
            if websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(code=1001)

        sender = asyncio.create_task(send_all())
        try:
            while True:
                received = await websocket.receive()
                if received["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hub.disconnect(client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    @router.get("/api/v1/status")
    async def live_status() -> dict[str, Any]:
        """The live state now: mode, models and breakers, queue, cache, spool, database."""
        return snapshot(hub.client_count)

    @router.get("/api/v1/history")
    async def live_history() -> dict[str, Any]:
        """The dashboard charts' points over the last minutes (answers/s by kind, latency, breakers...)."""
        if hub.charts is None:
            return {"interval": None, "window": None, "answer_kinds": [], "points": []}
        return hub.charts.export()

    @router.get("/dashboard", response_class=Response, responses={200: {"content": {"text/html": {}}}})
    async def dashboard() -> Response:
        """The live dashboard (HTML)."""
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @router.get("/dashboard/{name:path}", response_class=Response, include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in assets:  # only the files listed above: never a path built from the request
            return error_response(404, "Not Found", code="not_found")
        return Response(assets[name], media_type=_ASSETS[name], headers=_PAGE_HEADERS)
