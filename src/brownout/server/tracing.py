"""The server span of each API request: a caller's ``traceparent`` in, the answer's outcome on it.

:class:`TraceMiddleware` is installed only while tracing is wanted (:func:`brownout.telemetry.wanted`),
outermost, so a server without tracing pays nothing for it. It opens one ``SERVER`` span per request
to the API (``/v1/...``; health checks, metric scrapes, the dashboard and its live channel are left
out), named ``{method} {path}`` and parented to the caller's W3C ``traceparent`` when one came.
Everything the request does -- the brief pipeline's stages and model calls, the gateway's upstream
attempts -- nests under it, and its access-log line carries its ids
(:class:`~brownout.telemetry.JsonLogFormatter`).

On it: ``http.request.method``, ``url.path``, ``http.route``, ``http.response.status_code`` (an error
status from 500 up), and what the gateway said in its headers -- ``brownout.served_by``,
``brownout.attempts``, ``brownout.fallbacks``, ``brownout.cache``, ``brownout.json_guard``.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.trace import Span, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout import telemetry

__all__ = ["TRACED_PREFIX", "TraceMiddleware"]

TRACED_PREFIX: Final = "/v1/"
"""Requests whose path starts here get a span: the API, not the probes."""

_HEADER_ATTRIBUTES: Final = {
    b"x-brownout-served-by": "brownout.served_by",
    b"x-brownout-attempts": "brownout.attempts",
    b"x-brownout-fallbacks": "brownout.fallbacks",
    b"x-brownout-cache": "brownout.cache",
    b"x-brownout-json-guard": "brownout.json_guard",
}


class TraceMiddleware:
    """ASGI middleware: a ``SERVER`` span per API request (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request inside its span (or untouched: not HTTP, not the API, tracing off)."""
        if (
            scope["type"] != "http"
            or telemetry.SWITCH.tracer is None
            or not scope["path"].startswith(TRACED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        with telemetry.span(
            f"{method} {path}",
            kind=telemetry.SERVER,
            context=telemetry.extract(scope["headers"]),
            attributes={"http.request.method": method, "url.path": path, "http.route": path},
        ) as current:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start" and current is not None:
                    _answered(current, message)
                await send(message)

            await self.app(scope, receive, traced_send)


def _answered(current: Span, message: Message) -> None:
    status: int = message["status"]
    current.set_attribute("http.response.status_code", status)
    if status >= 500:
        current.set_status(Status(StatusCode.ERROR))
        current.set_attribute("error.type", str(status))
    for name, value in message.get("headers", ()):
        key = _HEADER_ATTRIBUTES.get(bytes(name).lower())
        if key is not None:
            text = bytes(value).decode("latin-1")
            current.set_attribute(key, int(text) if key == "brownout.attempts" and text.isdigit() else text)
