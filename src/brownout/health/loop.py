"""Event-loop blocking detection: warn, with the route, when the loop is held > 100 ms.

A middleware that times whole requests reports every request that *awaits* a slow model for two
seconds as "blocking" -- and never sees a real block in a background task. Blocking is
one step of a task running without yielding, so this detector measures steps:

* **request steps** -- :class:`LoopBlockMiddleware` (ASGI) drives each request's coroutine and times
  every step between two suspensions. A step longer than ``threshold`` blocked the loop, and it is
  reported with the request's route (the matched route template, e.g. ``POST /v1/briefs``, read only
  when a block is reported). Awaiting is free: only time spent running counts.
* **loop ticks** -- a heartbeat task sleeps ``interval`` and measures how late it wakes. Lateness over
  ``threshold`` means something else held the loop (a background task, a callback, a request's child
  task); it is reported with the routes in flight at the time, unless a request step already reported
  that block. Resolution: a block of ``b`` seconds is seen as ``b - interval`` to ``b``.

Each block is counted in :attr:`LoopBlockDetector.blocked` (by kind and route), logged as a warning and
emitted as :class:`~brownout.events.LoopBlocked`. The middleware also sets :data:`current_route`, a
context variable that tasks spawned by the request inherit (logs can read it).

Cost on the request path: one generator step and two clock reads per suspension of the request's
task -- no allocation, no lock. Time comes from the injected clock (the real one in production, where
``now()`` is :func:`time.monotonic`).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus, LoopBlocked

__all__ = ["BlockReport", "LoopBlockDetector", "LoopBlockMiddleware", "current_route"]

_log = logging.getLogger("brownout.health")

current_route: ContextVar[str] = ContextVar("brownout_current_route", default="")
"""The route of the request this code runs for ("" outside requests); set by the middleware."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BlockReport:
    """One detected block: ``kind`` "request" or "loop", the ``route``, how long, when (clock time)."""

    kind: str
    route: str
    seconds: float
    at: float


def route_of(scope: Scope) -> str:
    """``METHOD /route/template`` of an ASGI scope (the raw path until routing has matched)."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "?")
    method = scope.get("method")
    return f"{method} {path}" if method else str(path)


class LoopBlockDetector:
    """Counts and reports event-loop blocks longer than ``threshold`` seconds; see the module docstring.

    ``interval`` is the heartbeat's period. ``history_size`` bounds :attr:`recent`.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.1,
        interval: float = 0.025,
        history_size: int = 50,
        name: str = "event-loop",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not threshold > 0:
            raise ConfigError("loop_block.threshold", f"must be positive, got {threshold}")
        if not 0 < interval <= threshold:
            raise ConfigError("loop_block.interval", f"must be in (0, threshold={threshold}], got {interval}")
        self.name = name
        """The ``source`` of this detector's events."""
        self.threshold = threshold
        """Seconds of running without yielding that count as a block (0.1 by default)."""
        self.interval = interval
        """Seconds between heartbeat ticks."""
        self.blocked: Counter[tuple[str, str]] = Counter()
        """Blocks by (kind, route): ``event_loop_blocked_total{kind,route}``."""
        self.blocked_seconds: dict[str, float] = {"request": 0.0, "loop": 0.0}
        """Seconds blocked, by kind: ``event_loop_blocked_seconds_total{kind}``."""
        self.max_block = 0.0
        """The longest block seen, in seconds."""
        self.ticks = 0
        """Heartbeat ticks so far."""
        self.recent: deque[BlockReport] = deque(maxlen=history_size)
        """The latest blocks, oldest first."""
        self.in_flight: Counter[str] = Counter()
        """Requests running now, by route (for attributing loop blocks)."""
        self._clock = clock
        self._events = events
        self._heartbeat = Periodic(
            f"brownout-{name}", self._beat, lambda: self.interval, clock=clock, logger=_log
        )
        self._slept_at: float | None = None  # clock time the heartbeat's current sleep began
        self._last_request_block = float("-inf")  # clock time a request block was last reported

    @property
    def total(self) -> int:
        """Blocks detected, of both kinds."""
        return sum(self.blocked.values())

    def report(self, kind: str, route: str, seconds: float) -> BlockReport:
        """Count, log and emit one block (the middleware and the heartbeat call this)."""
        now = self._clock.now()
        if kind == "request":
            self._last_request_block = now
        item = BlockReport(kind, route, seconds, now)
        self.blocked[(kind, route)] += 1
        self.blocked_seconds[kind] = self.blocked_seconds.get(kind, 0.0) + seconds
        self.max_block = max(self.max_block, seconds)
        self.recent.append(item)
        _log.warning(
            "event loop blocked for %.0f ms by %s (%s)",
            seconds * 1000,
            route or "no request",
            "one step of the request" if kind == "request" else "a late loop tick",
        )
        if self._events.active:
            self._events.emit(LoopBlocked(source=self.name, at=now, kind=kind, route=route, seconds=seconds))
        return item

    def timed(self, coro: Coroutine[Any, Any, Any], scope: Scope) -> _TimedSteps:
        """Wrap a request's coroutine so that each of its steps is timed (see the module docstring)."""
        return _TimedSteps(coro, scope, self)

    # ------------------------------------------------------------------ heartbeat

    def start(self) -> None:
        """Start the heartbeat task on the running loop."""
        if not self._heartbeat.running:
            self._slept_at = None
            self._heartbeat.start()

    def _beat(self) -> None:
        # One round of the heartbeat, run every `interval`: how late did this wake-up come?
        clock = self._clock
        started = self._slept_at
        try:
            if started is None:
                return  # the first round, at start: nothing slept yet
            woke = clock.now()
            self.ticks += 1
            late = woke - started - self.interval
            if late > self.threshold and self._last_request_block < started:
                routes = sorted(r for r, n in self.in_flight.items() if n > 0)
                self.report("loop", ", ".join(routes), late)
        finally:
            self._slept_at = clock.now()  # the next sleep starts now: nothing awaits in between

    async def aclose(self) -> None:
        """Stop the heartbeat."""
        await self._heartbeat.stop()

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: threshold, totals, the longest block and the latest ones."""
        return {
            "threshold_ms": round(self.threshold * 1000, 1),
            "blocked_total": self.total,
            "max_block_ms": round(self.max_block * 1000, 1),
            "by_route": {f"{kind}:{route}": n for (kind, route), n in self.blocked.items()},
            "recent": [
                {"kind": r.kind, "route": r.route, "ms": round(r.seconds * 1000, 1), "at": r.at}
                for r in list(self.recent)[-10:]
            ],
        }


class _TimedSteps:
    """Awaitable that runs ``coro`` step by step, timing each step (the request's own task)."""

    __slots__ = ("_coro", "_detector", "_scope")

    def __init__(self, coro: Coroutine[Any, Any, Any], scope: Scope, detector: LoopBlockDetector) -> None:
        self._coro = coro
        self._scope = scope
        self._detector = detector

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        now = self._detector._clock.now
        threshold = self._detector.threshold
        value: Any = None
        error: BaseException | None = None
        while True:
            start = now()
            try:
                if error is None:
                    yielded = coro.send(value)
                else:
                    yielded = coro.throw(error)
            except StopIteration as stop:
                self._check(now() - start, threshold)
                return stop.value
            except BaseException:
                self._check(now() - start, threshold)
                raise
            self._check(now() - start, threshold)
            error = None
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # cancellation and anything thrown in: pass it to the request
                value, error = None, e

    def _check(self, took: float, threshold: float) -> None:
        if took > threshold:
            self._detector.report("request", route_of(self._scope), took)


class LoopBlockMiddleware:
    """ASGI middleware feeding a :class:`LoopBlockDetector`: times request steps, tracks routes in
    flight and sets :data:`current_route`. Add it with ``app.add_middleware(LoopBlockMiddleware,
    detector=detector)``."""

    def __init__(self, app: ASGIApp, detector: LoopBlockDetector) -> None:
        self.app = app
        self.detector = detector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = f"{scope.get('method', '')} {scope.get('path', '?')}"
        token = current_route.set(path)
        in_flight = self.detector.in_flight
        in_flight[path] += 1
        try:
            call = self.app(scope, receive, send)
            if isinstance(call, Coroutine):
                await self.detector.timed(call, scope)
            else:  # not a coroutine: nothing to step through
                await call
        finally:
            in_flight[path] -= 1
            if in_flight[path] <= 0:
                del in_flight[path]
            current_route.reset(token)
