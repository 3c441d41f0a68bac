"""The gateway's counters: plain integers and buckets that the request path increments.

:class:`GroupStats` and :class:`EndpointStats` live here, apart from the Prometheus collector
(:mod:`brownout.gateway.metrics`), so that the router can count without importing the collector and
the collector can read the router without either module importing the other.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "LATENCY_BUCKETS",
    "OVERHEAD_BUCKETS",
    "EndpointStats",
    "GroupStats",
    "Histogram",
]

OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
"""Bucket bounds of ``gateway_overhead_seconds`` (the goal is under 2 ms)."""

LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Bucket bounds of ``gateway_upstream_latency_seconds``."""


class Histogram:
    """Observations counted into fixed buckets; ``observe`` is one bisection and three additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (bucket ``le`` is inclusive, as Prometheus has it)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """How many observations were counted."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (``le`` bound, observations at or below it), +Inf last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class EndpointStats:
    """Counters of one endpoint of one group."""

    __slots__ = ("busy", "failures", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.busy = 0
        """Attempts that got no slot of a shared model server before their deadline (nothing sent)."""
        self.latency = Histogram(LATENCY_BUCKETS)


class GroupStats:
    """Counters of one model group (requests that asked for it)."""

    __slots__ = ("cache", "continuations", "fallbacks", "guard", "hedges", "outcomes", "overhead", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.cache: Counter[str] = Counter()
        self.guard: Counter[str] = Counter()
        self.hedges: Counter[str] = Counter()
        """Hedged requests: ``sent`` (a second attempt went), ``won`` (it answered first)."""
        self.continuations: Counter[str] = Counter()
        """Broken streams continued elsewhere, by result (``served``, ``failed``, ``prefill_refused``)."""
        self.overhead = Histogram(OVERHEAD_BUCKETS)
