"""Busy is not down: tell a model that is only saturated from one that has failed.

Under load a healthy model answers slowly, its requests wait in queues, its breaker may open and its
health probes may time out behind the work in flight. None of that is a reason to restart it, reload
it, switch it off or cut what it may generate: each of those drops the work it is doing and makes the
overload worse. Before any such action, recovery asks :class:`BusyCheck` whether the model is *busy,
not down*: its server is up **and** it is making progress, which means either

* its latest health probe passed, no longer than ``recent`` seconds ago; or
* it completed calls since the previous reading (its client's ``completed`` counter of well-formed
  answers moved) -- it is answering, however slowly; this holds for external endpoints too; or
* it has requests in flight **and** its local server process used CPU since the previous reading
  (it is computing them) -- which is what a saturated model whose probes queue behind its work looks
  like.

A model whose process is gone, or whose latest probe failed while nothing of its work shows progress
(nothing in flight, or a process that burns no CPU: wedged, stopped), is down: recovery acts on it as
before. Models on external endpoints have no process here; only their probes speak for them.

The readings come from ``read(role)`` (:class:`ModelActivity`), probe outcomes from :meth:`probed`;
every time from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError

__all__ = ["BUSY_NOT_DOWN", "BusyCheck", "ModelActivity"]

BUSY_NOT_DOWN = "model busy, not down"
"""How a skipped disruptive action's reason begins (in the recovery history)."""


@dataclass(frozen=True, slots=True)
class ModelActivity:
    """One look at a model: ``alive`` (its server process is up; True for external endpoints),
    ``in_flight`` (requests to it not answered yet), ``cpu_seconds`` (CPU its local server process
    has used so far; None when it has none here) and ``completed`` (well-formed answers to calls so
    far; None when unknown)."""

    alive: bool
    in_flight: int = 0
    cpu_seconds: float | None = None
    completed: int | None = None


@dataclass(frozen=True, slots=True)
class _Probe:
    at: float
    passed: bool


@dataclass(frozen=True, slots=True)
class _Look:
    at: float
    activity: ModelActivity


class BusyCheck:
    """Says whether a model is busy, not down (see the module docstring).

    ``read(role)`` looks at a model now. ``recent`` is how old a passed probe may be and still count.
    ``min_cpu`` is the CPU a model's server must have used per second since the previous reading to
    count as working on its requests in flight (a stopped or wedged process uses none).
    """

    def __init__(
        self,
        read: Callable[[str], ModelActivity],
        *,
        recent: float = 60.0,
        min_cpu: float = 0.05,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not recent > 0:
            raise ConfigError("recovery.busy.recent", f"must be positive, got {recent}")
        if min_cpu < 0:
            raise ConfigError("recovery.busy.min_cpu", f"must not be negative, got {min_cpu}")
        self.read = read
        """Looks at a model now."""
        self.recent = recent
        self.min_cpu = min_cpu
        self._clock = clock
        self._probes: dict[str, _Probe] = {}
        self._looks: dict[str, _Look] = {}

    def probed(self, role: str, passed: bool) -> None:
        """Record the outcome of a health probe of ``role`` (now), and take a reading as the baseline
        the next check measures progress against."""
        self._probes[role] = _Probe(self._clock.now(), passed)
        self.look(role)

    def look(self, role: str) -> ModelActivity:
        """Read ``role`` now and keep the reading as the baseline for the next check."""
        activity = self.read(role)
        self._looks[role] = _Look(self._clock.now(), activity)
        return activity

    def why_busy(self, role: str) -> str | None:
        """``"model busy, not down: ..."`` with the evidence when ``role`` is alive and making
        progress; None when it is down or shows no progress (then recovery may act on it)."""
        now = self._clock.now()
        # The baseline stays the one taken with the last probe round: asking twice in one chain must
        # not shrink the span progress is measured over to milliseconds.
        before = self._looks.get(role)
        activity = self.read(role) if before is not None else self.look(role)
        if not activity.alive:
            return None
        probe = self._probes.get(role)
        if probe is not None and probe.passed and now - probe.at <= self.recent:
            flight = f", {activity.in_flight} requests in flight" if activity.in_flight else ""
            return f"{BUSY_NOT_DOWN}: {role} answered a health probe {now - probe.at:.0f} s ago{flight}"
        if (
            before is not None
            and activity.completed is not None
            and before.activity.completed is not None
            and activity.completed > before.activity.completed
        ):
            done = activity.completed - before.activity.completed
            return f"{BUSY_NOT_DOWN}: {role} completed {done} calls in the last {now - before.at:.0f} s"
        if (
            activity.in_flight > 0
            and activity.cpu_seconds is not None
            and before is not None
            and before.activity.cpu_seconds is not None
            and now > before.at
        ):
            used = activity.cpu_seconds - before.activity.cpu_seconds
            span = now - before.at
            if used / span >= self.min_cpu:
                return (
                    f"{BUSY_NOT_DOWN}: {role} has {activity.in_flight} requests in flight and its server "
                    f"used {used:.1f} CPU s in the last {span:.0f} s"
                )
        return None

    def any_busy(self, roles: Iterable[str]) -> str | None:
        """The reason of the first of ``roles`` that is busy, not down (None if none is)."""
        for role in roles:
            reason = self.why_busy(role)
            if reason is not None:
                return reason
        return None
