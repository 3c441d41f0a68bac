"""The last minutes of the server, one point every few seconds: what the dashboard's charts draw.

An operator in an incident asks how things *moved*: when answers started to be downshifted, whether
latency rose before the breaker opened, whether the queue is draining. The live snapshot only says
how things are now, so :class:`LiveHistory` keeps a bounded ring of points -- by default one every
``server.history_interval`` (2 s) over ``server.history_window`` (15 minutes), 450 points -- taken
by a :class:`~brownout.background.Periodic` loop. The request path pays nothing for it: each point is
read from counters the parts already keep for ``/metrics`` (:func:`read_parts`), and the rates are
the differences between two readings.

A point holds (see :meth:`LiveHistory.sample`):

* ``answers`` -- brief answers per second by how they were served: ``full`` (the mode asked for),
  ``downshifted`` (a lower pipeline mode), ``fallback``, ``emergency``, ``cached``, and ``rejected``
  (answered 503);
* ``latency`` -- the p50 and p95, in seconds, of the brief answers of the interval, as the server saw
  them (from request to response headers), interpolated within the buckets of a histogram as
  Prometheus' ``histogram_quantile`` does; None when nothing was answered;
* ``breakers`` -- each model's circuit breakers and their state (``closed``, ``half_open``, ``open``);
* ``queue``, ``in_flight``, ``dimmer`` (its level; 0 is full service) and ``dimmer_value``;
* ``spool`` -- writes waiting in the local spool for the database;
* ``gateway`` -- gateway requests per second by ``group/outcome``.

``t`` is the wall-clock time of the point in seconds since the epoch (for the charts' time axis);
intervals are measured on the injected monotonic clock.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, WALL_CLOCK, Clock
from brownout.gateway.stats import Histogram
from brownout.server.status import ServerStatus, plain

__all__ = [
    "ANSWER_KINDS",
    "LATENCY_BUCKETS",
    "LiveHistory",
    "Reading",
    "new_latency_histogram",
    "quantile",
    "read_parts",
]

_log = logging.getLogger("brownout.history")

ANSWER_KINDS: tuple[str, ...] = ("full", "downshifted", "fallback", "emergency", "cached", "rejected")
"""How a brief request was answered, in the order the dashboard stacks them."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
"""Bucket bounds (seconds) of the brief-latency histogram: fine around the per-mode targets (2-10 s)."""

_OFF_PIPELINE = frozenset({"fallback", "emergency"})


@dataclass(frozen=True, slots=True)
class Reading:
    """The parts' counters (cumulative) and gauges at one moment."""

    answers: Mapping[str, int]
    """Brief answers so far by kind (:data:`ANSWER_KINDS`)."""
    latency: Sequence[int]
    """Brief answers so far per latency bucket (:data:`LATENCY_BUCKETS`, then +Inf)."""
    breakers: Mapping[str, str] = field(default_factory=dict)
    queue: int = 0
    in_flight: int = 0
    dimmer: int = 0
    dimmer_value: float = 0.0
    spool: int = 0
    gateway: Mapping[str, int] = field(default_factory=dict)
    """Gateway requests so far by ``group/outcome``."""


def read_parts(status: ServerStatus, latency: Histogram) -> Reading | None:
    """What the server's parts count now (None before the service has started).

    ``latency`` is the histogram the HTTP layer fills with each brief answer's latency.
    """
    svc = status.service
    if not svc.started:
        return None
    stats = svc.stats
    # Every answer is counted once in ``served`` (by the mode served); a pipeline answer below the
    # mode asked for is also in ``downshifts`` (fallback and emergency are counted there before they
    # are tried, so they are read from ``served`` alone).
    downshifted = sum(n for (_, to), n in stats.downshifts.items() if to not in _OFF_PIPELINE)
    pipeline = sum(n for mode, n in stats.served.items() if mode not in _OFF_PIPELINE)
    answers = {
        "full": pipeline - downshifted,
        "downshifted": downshifted,
        "fallback": stats.served.get("fallback", 0),
        "emergency": stats.served.get("emergency", 0),
        "cached": svc.cache.stats().hits,
        "rejected": sum(stats.rejected.values()),
    }
    breakers = {
        name: str(plain(b.state)) for client in status.clients.values() for name, b in client.breakers.items()
    }
    dim = svc.dimmer.snapshot()
    gateway = {
        f"{name}/{outcome}": n
        for name, group in status.gateway.groups.items()
        for outcome, n in group.stats.outcomes.items()
    }
    return Reading(
        answers=answers,
        latency=list(latency.counts),
        breakers=breakers,
        queue=svc.admission.queue_size,
        in_flight=svc.admission.in_flight,
        dimmer=dim.level,
        dimmer_value=dim.value,
        spool=status.records.spool.pending,
        gateway=gateway,
    )


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of observations counted per bucket (``counts`` has one more, +Inf, last).

    Linear within the bucket the quantile falls in, as Prometheus' ``histogram_quantile``; the last
    finite bound when it falls in +Inf; None with no observations.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    index = len(counts) - 1
    for i, n in enumerate(counts):
        if n and running + n >= rank:
            index = i
            break
        running += n
    if index >= len(bounds):
        return bounds[-1]
    lower = bounds[index - 1] if index > 0 else 0.0
    upper = bounds[index]
    inside = counts[index]
    return lower + (upper - lower) * ((rank - running) / inside)


def _rate(new: float, old: float, seconds: float) -> float:
    # A counter that went backwards was reset (a part restarted): count from zero again.
    delta = new - old if new >= old else new
    return round(delta / seconds, 3)


class LiveHistory:
    """A ring of points over the last ``window`` seconds, one every ``interval`` (module docstring).

    ``read`` gives the parts' counters (:func:`read_parts`; None while the server starts: no point
    then). :meth:`start` takes a point every ``interval`` in the background and hands each to
    ``publish`` (the live hub sends it to the dashboards), :meth:`stop` ends it.
    """

    def __init__(
        self,
        read: Callable[[], Reading | None],
        *,
        interval: float = 2.0,
        window: float = 900.0,
        clock: Clock = SYSTEM_CLOCK,
        wall_clock: Clock = WALL_CLOCK,
        publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if interval <= 0 or window < interval:
            raise ValueError(f"history interval ({interval}) must be > 0 and at most the window ({window})")
        self._read = read
        self.interval = interval
        self.window = window
        self._clock = clock
        self._wall = wall_clock
        self.publish = publish
        """Called with every new point (the live hub sets it)."""
        self.points: deque[dict[str, Any]] = deque(maxlen=math.ceil(window / interval))
        """The points kept, oldest first."""
        self._last: tuple[float, Reading] | None = None
        self._ticker = Periodic("brownout-history", self.sample, interval, clock=clock, logger=_log)

    def start(self) -> None:
        """Take a point every ``interval`` from now on (needs a running loop; idempotent)."""
        self._ticker.start()

    async def stop(self) -> None:
        """Stop taking points (those kept stay)."""
        await self._ticker.stop()

    def sample(self) -> dict[str, Any] | None:
        """Read the parts now and keep (and publish) a point: the rates since the previous reading.

        The first reading only sets the baseline (a rate needs two), so it keeps no point.
        """
        reading = self._read()
        if reading is None:
            return None
        now = self._clock.now()
        last, self._last = self._last, (now, reading)
        if last is None or now <= last[0]:
            return None
        then, before = last
        seconds = now - then
        point = self._point(before, reading, seconds)
        self.points.append(point)
        if self.publish is not None:
            self.publish(point)
        return point

    def _point(self, before: Reading, after: Reading, seconds: float) -> dict[str, Any]:
        answers = {k: _rate(after.answers.get(k, 0), before.answers.get(k, 0), seconds) for k in ANSWER_KINDS}
        old = before.latency if len(before.latency) == len(after.latency) else [0] * len(after.latency)
        interval_counts = [max(0, a - b) for a, b in zip(after.latency, old, strict=True)]
        bounds = LATENCY_BUCKETS if len(after.latency) == len(LATENCY_BUCKETS) + 1 else ()
        p50 = quantile(0.5, bounds, interval_counts) if bounds else None
        p95 = quantile(0.95, bounds, interval_counts) if bounds else None
        return {
            "t": round(self._wall.now(), 3),
            "answers": answers,
            "latency": {
                "p50": None if p50 is None else round(p50, 4),
                "p95": None if p95 is None else round(p95, 4),
            },
            "breakers": dict(after.breakers),
            "queue": after.queue,
            "in_flight": after.in_flight,
            "dimmer": after.dimmer,
            "dimmer_value": round(after.dimmer_value, 3),
            "spool": after.spool,
            "gateway": {
                key: _rate(n, before.gateway.get(key, 0), seconds) for key, n in sorted(after.gateway.items())
            },
        }

    def export(self) -> dict[str, Any]:
        """The points kept and how they were taken (``GET /api/v1/history``, a dashboard's first message)."""
        return {
            "interval": self.interval,
            "window": self.window,
            "answer_kinds": list(ANSWER_KINDS),
            "points": list(self.points),
        }


def new_latency_histogram() -> Histogram:
    """An empty brief-latency histogram on :data:`LATENCY_BUCKETS`."""
    return Histogram(LATENCY_BUCKETS)
