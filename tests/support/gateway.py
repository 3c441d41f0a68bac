"""The gateway's routes on a real uvicorn server, and upstreams for it to call: shared by the gateway tests.

:func:`gateway` serves a :class:`~brownout.gateway.router.Gateway` (on any clock) with a Prometheus
registry of its own; :class:`Scripted` is an OpenAI-compatible upstream whose answers a test scripts;
:func:`sse`, :func:`completion` and :func:`send_json` build what upstreams send. The ``fakes`` and
``scripted`` fixtures (tests/gateway/conftest.py) start them on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from brownout.chaos.fakellm import FakeLLM
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.events import EventBus
from brownout.gateway.config import GatewaySection
from brownout.gateway.router import Gateway, Group
from brownout.gateway.routes import install_gateway
from support.net import EmbeddedServer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "intensity": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["name", "intensity"],
}


def chat(model: str = "chat", **extra: Any) -> dict[str, Any]:
    """A chat request body for ``model``."""
    return {"model": model, "messages": [{"role": "user", "content": "a fresh citrus scent"}], **extra}


def group(*upstreams: FakeLLM | str, **settings: Any) -> dict[str, Any]:
    """A model group config over ``upstreams`` (fakes or URLs)."""
    urls = [u if isinstance(u, str) else u.url for u in upstreams]
    return {"endpoints": [{"url": url} for url in urls], **settings}


def label(upstream: FakeLLM | Scripted) -> str:
    """The endpoint label the gateway gives an upstream (host:port of its URL)."""
    return upstream.url.split("://", 1)[1]


def breaker_of(gw: Gateway, name: str, index: int = 0) -> Any:
    return gw.groups[name].endpoints[index].breaker


# ------------------------------------------------------------------------------------------ servers


class _Embedded(EmbeddedServer):
    """uvicorn inside the test's event loop, stopped by an event rather than a flag polled every 0.1 s."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop_event = asyncio.Event()

    async def main_loop(self) -> None:
        await self.on_tick(0)
        await self.stop_event.wait()


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        loop="asyncio",
        timeout_graceful_shutdown=1,
    )
    server = _Embedded(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during startup")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        server.stop_event.set()
        await task
        sock.close()


Handler = Callable[[int, dict[str, Any], Receive, Send], Awaitable[None]]


class Scripted:
    """An OpenAI-compatible upstream whose answers the test scripts.

    ``handler(n, body, receive, send)`` answers the n-th chat request (1-based); ``bodies`` keeps what
    every request sent.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    @property
    def calls(self) -> int:
        return len(self.bodies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        more = True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        body = json.loads(raw) if raw else {}
        self.bodies.append(body)
        await self.handler(len(self.bodies), body, receive, send)


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1,
        "model": "scripted",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


async def send_json(send: Send, doc: Any, status: int = 200) -> None:
    raw = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


def sse(content: str | None = None, *, done: bool = False) -> bytes:
    if done:
        return b"data: [DONE]\n\n"
    delta = {"content": content}
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def sse_start(send: Send) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )


@dataclass
class Harness:
    gateway: Gateway
    http: httpx.AsyncClient
    registry: CollectorRegistry
    bus: EventBus

    def group(self, name: str = "chat") -> Group:
        return self.gateway.groups[name]

    async def post(self, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return await self.http.post("/v1/chat/completions", json=body, **kw)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for family in text_string_to_metric_families(generate_latest(self.registry).decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


@contextlib.asynccontextmanager
async def gateway(
    groups: dict[str, Any], *, clock: Clock = SYSTEM_CLOCK, **section: Any
) -> AsyncIterator[Harness]:
    """The gateway's routes on a real uvicorn server, with a Prometheus registry of their own."""
    bus = EventBus()
    gw = Gateway(GatewaySection.model_validate({"groups": groups, **section}), clock=clock, events=bus)
    app = Starlette()
    registry = CollectorRegistry(auto_describe=False)
    install_gateway(app, gw, registry)
    await gw.start()
    try:
        async with (
            serving(app) as url,
            httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as http,
        ):
            yield Harness(gw, http, registry, bus)
    finally:
        await gw.aclose()


# Breakers that open after two failed calls out of two, and stay open for the rest of the test.
TRIP = {"minimum_calls": 2, "window_size": 2, "failure_threshold": 0.5, "timeout": 3600}
# Breakers that never open within a test.
NEVER = {"minimum_calls": 100, "window_size": 100}


async def read_stream(response: httpx.Response) -> bytes:
    """The raw bytes of a streamed response, to its end."""
    return b"".join([chunk async for chunk in response.aiter_raw()])
