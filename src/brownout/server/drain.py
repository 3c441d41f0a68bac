"""Graceful drain: on SIGTERM/SIGINT stop admitting work, let what is in flight finish, then stop.

A rolling restart sends SIGTERM and, a little later, starts sending traffic elsewhere. Until the load
balancer notices, requests keep arriving; and the briefs already being answered take as long as their
model calls (seconds each). So the server, once told to stop:

1. **stops admitting**: every new request gets ``503`` with ``Retry-After`` in the one error shape
   (:mod:`brownout.server.errors`) and ``Connection: close``, so the client retries elsewhere at once;
   ``/health`` answers ``503`` with ``"status": "draining"`` so the load balancer takes this server
   out of rotation; the other health and metric paths keep answering for the operator;
2. **lets in-flight requests finish**, up to ``server.drain_timeout`` seconds;
3. **answers what is left** with ``503`` + ``Retry-After`` (the request is cut short, and the client is
   told to send it again) -- never uvicorn's ``500 Internal Server Error`` in plain text; a response
   already streaming when time is up is ended (its body cannot change into an error any more);

and only then lets uvicorn close its sockets and run the app's shutdown (spool, outbox, store closed).

:class:`Drain` holds the state and counts requests in flight; :class:`DrainMiddleware` is the ASGI
middleware that admits, counts and answers. Waiting uses the injected :class:`~brownout.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.server.errors import error_bytes, send_error

__all__ = ["DRAIN_EXEMPT_PATHS", "Drain", "DrainMiddleware", "DrainState"]

_log = logging.getLogger("brownout.server")

DrainState = Literal["serving", "draining", "stopped"]
"""``serving`` (admitting), ``draining`` (not admitting; in-flight requests finishing), ``stopped``
(the drain is over: whatever was left has been answered)."""

DRAIN_EXEMPT_PATHS = frozenset(
    {"/health", "/health/llm", "/health/gateway", "/metrics", "/api/v1/status", "/api/v1/recovery/status"}
)
"""Paths still served while draining: the load balancer's and the operator's view of the shutdown
(``/health`` itself says ``draining`` with a 503). Everything else is refused."""

_SETTLE_TIMEOUT = 5.0
"""Seconds the leftovers get to send their 503 after being cut short (they do it at once)."""


@dataclass
class _InFlight:
    task: asyncio.Task[object] | None
    started: bool = False
    cut: bool = False


class Drain:
    """The server's drain state and its requests in flight; see the module docstring.

    ``retry_after`` is what refused and cut-short requests are told (seconds): about the time a
    restarted server or the load balancer's next health check takes.
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, retry_after: float = 5.0) -> None:
        self.clock = clock
        self.retry_after = retry_after
        self.state: DrainState = "serving"
        self.refused = 0
        """Requests refused because the server was draining."""
        self.cut_short = 0
        """In-flight requests answered 503 (or ended) because the drain time ran out."""
        self._in_flight: dict[int, _InFlight] = {}
        self._next_id = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._expire_now = asyncio.Event()

    # ------------------------------------------------------------------ state

    @property
    def admitting(self) -> bool:
        """True until the drain begins."""
        return self.state == "serving"

    @property
    def in_flight(self) -> int:
        """Requests being answered now (refused ones are not counted)."""
        return len(self._in_flight)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the server runs on (the signal handler schedules the drain on it)."""
        self._loop = loop

    def begin_soon(self, timeout: float, on_done: Callable[[], object]) -> None:
        """From a signal handler: begin draining (the first call) or cut the drain short (any later
        call: what is left is answered now). ``on_done`` runs once the drain is over."""
        loop = self._loop
        if loop is None or loop.is_closed():
            on_done()
            return

        def begin() -> None:
            if self._task is None:
                self._task = loop.create_task(self._run(timeout, on_done), name="brownout-drain")
            else:
                self._expire_now.set()

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(begin)

    async def _run(self, timeout: float, on_done: Callable[[], object]) -> None:
        try:
            left = await self.drain(timeout)
            if left:
                _log.warning("drain time (%.0f s) over: %d request(s) answered 503", timeout, left)
        finally:
            on_done()

    async def drain(self, timeout: float) -> int:
        """Stop admitting, wait up to ``timeout`` seconds for the requests in flight, then cut the rest
        short (a 503 for those not yet answering). Returns how many were cut short."""
        if self.state == "serving":
            self.state = "draining"
            _log.info(
                "draining: %d request(s) in flight, up to %.0f s (server.drain_timeout)",
                self.in_flight,
                timeout,
            )
        waiters = [
            asyncio.ensure_future(self._idle.wait()),
            asyncio.ensure_future(self._expire_now.wait()),
            asyncio.ensure_future(self.clock.sleep(timeout)),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        left = self.cut()
        if left:
            # They answer at once (the cancellation lands at their next await); bounded regardless.
            settle = [
                asyncio.ensure_future(self._idle.wait()),
                asyncio.ensure_future(self.clock.sleep(_SETTLE_TIMEOUT)),
            ]
            try:
                await asyncio.wait(settle, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in settle:
                    w.cancel()
                await asyncio.gather(*settle, return_exceptions=True)
        self.state = "stopped"
        return left

    def cut(self) -> int:
        """Cut every request still in flight short now; returns how many there were."""
        count = 0
        for entry in list(self._in_flight.values()):
            if entry.cut or entry.task is None or entry.task.done():
                continue
            entry.cut = True
            entry.task.cancel("the server's drain time ran out")
            count += 1
        self.cut_short += count
        return count

    # ---------------------------------------------------------- bookkeeping

    def _enter(self) -> tuple[int, _InFlight]:
        self._next_id += 1
        entry = _InFlight(task=asyncio.current_task())
        self._in_flight[self._next_id] = entry
        self._idle.clear()
        return self._next_id, entry

    def _leave(self, key: int) -> None:
        self._in_flight.pop(key, None)
        if not self._in_flight:
            self._idle.set()

    def status(self) -> dict[str, object]:
        """For ``/health`` and the status page."""
        return {
            "state": self.state,
            "in_flight": self.in_flight,
            "refused": self.refused,
            "cut_short": self.cut_short,
        }


class DrainMiddleware:
    """ASGI middleware over the whole app: refuses new work while draining, counts what is in flight,
    and answers a request cut short by the drain with 503 instead of letting it become a 500."""

    def __init__(self, app: ASGIApp, drain: Drain, exempt: Collection[str] = DRAIN_EXEMPT_PATHS) -> None:
        self.app = app
        self.drain = drain
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if not drain.admitting and scope["path"] not in self.exempt:
            drain.refused += 1
            if kind == "websocket":
                # Before the handshake is accepted: the client sees the upgrade refused.
                await send({"type": "websocket.close", "code": 1001, "reason": "the server is shutting down"})
                return
            await _refuse(send, drain.retry_after, "the server is shutting down and takes no new requests")
            return
        key, entry = drain._enter()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.started = True
                if not drain.admitting:
                    # Keep-alive connections must not bring the next request back here.
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, tracking_send if kind == "http" else send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if kind != "http" or drain.admitting or task is None:
                raise
            # Cut short by the drain (or by uvicorn's last-resort cancellation at shutdown): say so.
            task.uncancel()
            if not entry.started:
                await _refuse(
                    send, drain.retry_after, "the server shut down before this request was answered"
                )
            else:
                _log.warning("%s ended unfinished: the server's drain time ran out", scope["path"])
        finally:
            drain._leave(key)


async def _refuse(send: Send, retry_after: float, message: str) -> None:
    body = error_bytes(503, message, code="draining", retry_after=retry_after)
    retry = str(max(1, math.ceil(retry_after))).encode()
    await send_error(send, 503, body, [(b"retry-after", retry), (b"connection", b"close")])
