"""The app on a real uvicorn on 127.0.0.1, and a webhook receiver: the live view's, the dashboard's
and the security tests' harness.

Server-Sent Events and WebSockets need a real server (``httpx.ASGITransport`` buffers whole
responses), so these tests run ``create_app`` under uvicorn in the test's own event loop, on a free
port of 127.0.0.1, with each model role on its own :class:`~brownout.chaos.fakellm.FakeLLM`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig
from brownout.events import EventBus
from brownout.policies.breaker import CircuitBreaker
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from support.net import EmbeddedServer
from support.stack import make_config
from support.wait import until

__all__ = ["LiveStack", "Receiver", "live_stack", "serve_app"]


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, lifespan: str = "on") -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port in this loop; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        http="h11",
        ws="websockets-sansio",
        loop="asyncio",
        timeout_graceful_shutdown=2,
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), "uvicorn to start")
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped during startup")
        yield f"http://127.0.0.1:{port}"
    finally:
        runtime = getattr(getattr(app, "state", None), "runtime", None)
        if isinstance(runtime, Runtime):
            runtime.live.close_clients()  # open streams would hold the shutdown up
        server.should_exit = True
        await task
        sock.close()


@dataclass
class LiveStack:
    """The app on uvicorn with its runtime, its fakes, its bus and base URL."""

    app: FastAPI
    runtime: Runtime
    url: str
    fakes: Mapping[str, FakeLLM]
    bus: EventBus
    config: BrownoutConfig

    def breaker(self, role: str) -> CircuitBreaker:
        (breaker,) = self.runtime.clients[role].breakers.values()
        return breaker


@contextlib.asynccontextmanager
async def live_stack(
    tmp_path: Path, overrides: Mapping[str, Any] | None = None, *, admin_token: str | None = None
) -> AsyncIterator[LiveStack]:
    """Three healthy fakes, the app built on them (``overrides`` applied), served by uvicorn."""
    fakes: dict[str, FakeLLM] = {}
    try:
        for role in ROLES:
            fake = FakeLLM(model=role)
            await fake.start()
            fakes[role] = fake
        # The loop-block detector and the resource monitor judge this machine (two cores shared with
        # Chromium and other tests), not the app: left on, a slow tick degrades the mode and switches
        # the hinter off mid-test. The tests that want them turn them on.
        over: dict[str, Any] = {"loop_block": {"enabled": False}, "resources": {"enabled": False}}
        for key, value in (overrides or {}).items():
            over[key] = {**over[key], **value} if key in over and isinstance(value, Mapping) else value
        if admin_token is not None:
            over.setdefault("server", {})["admin_token"] = admin_token
        config = make_config({r: f.url for r, f in fakes.items()}, tmp_path / "briefs.db", over)
        bus = EventBus()
        runtime = Runtime(config, events=bus)
        app = create_app(config, runtime)
        async with serve_app(app) as url:
            service = runtime.service
            assert service is not None
            await until(lambda: len(service.stats.health) == len(ROLES), "the first probes")
            yield LiveStack(app, runtime, url, fakes, bus, config)
    finally:
        await asyncio.gather(*(f.stop() for f in fakes.values()))


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that records JSON bodies; the first ``fail_first`` POSTs get 503."""

    fail_first: int = 0
    status: int = 503
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            self.attempts += 1
            if self.attempts <= self.fail_first:
                return JSONResponse({"error": "not now"}, status_code=self.status)
            self.received.append(await request.json())
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/hook/{token}", hook, methods=["POST"])])
