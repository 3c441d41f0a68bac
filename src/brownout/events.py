"""The observability side channel.

Policies never import a metrics or logging library. They emit small typed events to an
:class:`EventBus`; metrics, logs, the live stream and webhooks subscribe. Emitting costs one attribute
check when nobody listens, and policies emit only on transitions, rejections and retries -- never on
the success path.

Subscribers are called synchronously, in the emitting task, and must be quick; one that raises is
reported once through :mod:`logging` and kept (a broken log handler must not break a breaker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BreakerStateChanged",
    "CallRejected",
    "CacheRefreshFailed",
    "CacheTTLChanged",
    "DEFAULT_BUS",
    "DeadlineExpired",
    "DimmerChanged",
    "Event",
    "EventBus",
    "FallbackServed",
    "GuardGaveUp",
    "GuardRetried",
    "LoopBlocked",
    "ModeDownshifted",
    "ModelServerRestarted",
    "RecoveryActionRun",
    "RedisStatusChanged",
    "ResourceAlert",
    "RetryAttempted",
    "RetryGaveUp",
    "SpoolAppended",
    "SpoolDeadLettered",
    "SpoolReplayed",
    "SystemModeChanged",
]

_log = logging.getLogger("brownout.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: ``source`` names the policy instance, ``at`` is its clock's time."""

    source: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerStateChanged(Event):
    """A circuit breaker moved from ``old`` to ``new`` (state names), for ``reason``."""

    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """A policy refused a call (``kind``: "breaker", "admission"); ``reason`` is the policy's word."""

    kind: str
    reason: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class RetryAttempted(Event):
    """A retry is about to wait ``delay`` seconds before attempt ``attempt`` after ``error``."""

    attempt: int
    delay: float
    error: str


@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """A retry stopped after ``attempts`` attempts because of ``reason``."""

    attempts: int
    reason: str
    error: str


@dataclass(frozen=True, slots=True)
class DeadlineExpired(Event):
    """A deadline scope of ``timeout`` seconds expired and cancelled its task."""

    timeout: float


@dataclass(frozen=True, slots=True)
class CacheRefreshFailed(Event):
    """A cache refresh for ``key`` failed; ``served_stale`` tells whether a stale value was served."""

    key: str
    error: str
    served_stale: bool


@dataclass(frozen=True, slots=True)
class FallbackServed(Event):
    """A fallback chain answered with ``strategy`` after ``skipped`` earlier strategies failed."""

    strategy: str
    skipped: int


@dataclass(frozen=True, slots=True)
class ModeDownshifted(Event):
    """A pipeline served ``served`` ("none" when no mode was available) instead of ``requested``."""

    requested: str
    served: str
    reason: str


Subscriber = Callable[[Event], object]


class EventBus:
    """Delivers events to subscribers, optionally filtered by event type."""

    __slots__ = ("_broken", "_subscribers")

    def __init__(self) -> None:
        self._subscribers: list[tuple[type[Event], Subscriber]] = []
        self._broken: set[int] = set()

    @property
    def active(self) -> bool:
        """True when at least one subscriber listens (policies skip building events otherwise)."""
        return bool(self._subscribers)

    def subscribe(self, callback: Callable[[Any], object], kind: type[Event] = Event) -> Callable[[], None]:
        """Call ``callback`` for every event that is an instance of ``kind``; returns an unsubscribe."""
        entry: tuple[type[Event], Subscriber] = (kind, callback)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every matching subscriber."""
        for kind, callback in tuple(self._subscribers):
            if isinstance(event, kind):
                try:
                    callback(event)
                except Exception:
                    if id(callback) not in self._broken:
                        self._broken.add(id(callback))
                        _log.exception("event subscriber %r failed; further failures are silent", callback)


DEFAULT_BUS = EventBus()
"""The process-wide bus that policies emit to unless given another."""


@dataclass(frozen=True, slots=True)
class GuardRetried(Event):
    """A JSON guard is re-asking the model (``attempt`` is the attempt about to be made) after ``error``."""

    attempt: int
    error: str


@dataclass(frozen=True, slots=True)
class GuardGaveUp(Event):
    """A JSON guard got no schema-valid answer in ``attempts`` attempts; ``error`` is the last problem."""

    attempts: int
    error: str


@dataclass(frozen=True, slots=True)
class ModelServerRestarted(Event):
    """A supervised local model server was replaced by a new process ``pid`` because of ``reason``;
    ``restarts`` counts the replacements so far."""

    pid: int
    reason: str
    restarts: int


@dataclass(frozen=True, slots=True)
class SpoolAppended(Event):
    """A durable spool took write ``key`` and now holds ``pending`` entries.

    Emitted only on transitions, to stay cheap while the database is down: when the spool becomes
    non-empty (writes have started to spool) and when ``pending`` first rises above the alert threshold
    (``alert`` is then true; more than 100 pending writes is an alert condition by default).
    """

    key: str
    pending: int
    alert: bool


@dataclass(frozen=True, slots=True)
class SpoolReplayed(Event):
    """A spool replay wrote ``replayed`` entries to their sink; ``remaining`` are still pending.

    ``error`` is empty when the run ended because the spool was drained (or its limit reached), else the
    sink's error that stopped it at the oldest remaining entry.
    """

    replayed: int
    remaining: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class SpoolDeadLettered(Event):
    """A spool moved entry ``key`` to its dead-letter table after the sink refused it too often.

    ``error`` is the last refusal; ``dead`` counts the dead letters now held. Never silent: an operator
    must look at these (``Spool.dead_letters``) and send them back (``Spool.requeue_dead``).
    """

    key: str
    error: str
    dead: int


@dataclass(frozen=True, slots=True)
class RedisStatusChanged(Event):
    """A Redis health detector moved from ``old`` to ``new`` ("healthy", "degraded", "fallback").

    ``reason`` says why: the latency seen, the error of the failed check, or the recovery.
    """

    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryActionRun(Event):
    """A recovery manager ran ``action`` on ``target`` for ``failure_type``.

    ``trigger`` is "automatic" (a failure was reported), "proactive" (the resource monitor saw a
    critical level) or "manual" (the recovery API); ``status`` is "ok", "failed" or "skipped" (not
    applicable here, cooling down), and ``detail`` says what was done or why not.
    """

    action: str
    target: str
    failure_type: str
    trigger: str
    status: str
    detail: str


@dataclass(frozen=True, slots=True)
class ResourceAlert(Event):
    """A watched resource ("cpu", "memory", "gpu0", ...) moved to ``level`` ("ok", "warning",
    "critical") at ``percent`` used; ``threshold`` is the limit crossed (0 when back to ok)."""

    resource: str
    level: str
    percent: float
    threshold: float


@dataclass(frozen=True, slots=True)
class SystemModeChanged(Event):
    """The system mode moved from ``old`` to ``new`` ("normal", "degraded", "emergency").

    ``reason`` names the unhealthy components (or the recovery); ``switched_off`` lists the features
    the new mode turns off.
    """

    old: str
    new: str
    reason: str
    switched_off: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoopBlocked(Event):
    """The event loop was blocked ``seconds`` (over the detector's threshold).

    ``kind`` is "request" (one step of a request's own task ran that long) or "loop" (a heartbeat tick
    came that late); ``route`` is the route that blocked, or the routes in flight for a loop block.
    """

    kind: str
    route: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CacheTTLChanged(Event):
    """An adaptive cache TTL moved from ``old`` to ``new`` seconds at load factor ``load`` (0..1)."""

    old: float
    new: float
    load: float


@dataclass(frozen=True, slots=True)
class DimmerChanged(Event):
    """A dimmer moved from level ``old_level`` to ``new_level`` (0: full service) at ``value`` (0..1).

    ``step`` names the step now dimmed at the margin ("" at level 0); ``observed_p95`` is the p95
    latency it measured (seconds, None when nothing completed in its window) against ``target_p95``.
    """

    old_level: int
    new_level: int
    value: float
    step: str
    observed_p95: float | None
    target_p95: float
