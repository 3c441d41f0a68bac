"""The gateway's counters, and the Prometheus collector that reads them at scrape time.

Nothing on the request path touches Prometheus: the gateway increments plain integers and buckets
(:class:`GroupStats`, :class:`EndpointStats`, :class:`Histogram`), and :class:`GatewayCollector` turns
them into metric families when ``/metrics`` is scraped.

Metric families (all labelled by ``group``; upstream ones also by ``endpoint``):

=========================================  ===================================================================
``gateway_requests_total``                 chat requests received, by group asked for
``gateway_responses_total``                responses sent, by ``outcome`` (``served``, ``client_error``,
                                           ``unavailable``, ``overloaded``, ``stream_error``)
``gateway_fallbacks_total``                requests served by a fallback group, by group asked and ``to``
``gateway_cache_total``                    cache lookups by ``result`` (``hit``, ``miss``)
``gateway_json_guard_total``               guarded answers by ``outcome`` (``valid``, ``fixed``, ``invalid``)
``gateway_overhead_seconds``               time spent in the gateway itself (total minus upstream waits)
``gateway_upstream_requests_total``        attempts sent to each endpoint
``gateway_upstream_failures_total``        attempts that failed (timeouts, 5xx, 429, broken streams)
``gateway_upstream_latency_seconds``       time to a whole answer (streams: to the first event)
``gateway_breaker_state``                  0 closed, 1 open, 2 half-open
``gateway_endpoint_in_flight``             attempts running on each endpoint
``gateway_admission_in_flight`` / ``_queue``  requests being served / waiting, by group
=========================================  ===================================================================
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from brownout.gateway.router import Gateway

__all__ = [
    "LATENCY_BUCKETS",
    "OVERHEAD_BUCKETS",
    "EndpointStats",
    "GatewayCollector",
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

    __slots__ = ("failures", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.latency = Histogram(LATENCY_BUCKETS)


class GroupStats:
    """Counters of one model group (requests that asked for it)."""

    __slots__ = ("cache", "fallbacks", "guard", "outcomes", "overhead", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.cache: Counter[str] = Counter()
        self.guard: Counter[str] = Counter()
        self.overhead = Histogram(OVERHEAD_BUCKETS)


class GatewayCollector(Collector):
    """Collects a :class:`~brownout.gateway.router.Gateway`'s counters as Prometheus metrics."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the module docstring."""
        groups = self.gateway.groups
        requests = CounterMetricFamily("gateway_requests", "Chat requests received", labels=["group"])
        responses = CounterMetricFamily(
            "gateway_responses", "Responses sent, by outcome", labels=["group", "outcome"]
        )
        fallbacks = CounterMetricFamily(
            "gateway_fallbacks", "Requests served by a fallback group", labels=["group", "to"]
        )
        cache = CounterMetricFamily("gateway_cache", "Response-cache lookups", labels=["group", "result"])
        guard = CounterMetricFamily(
            "gateway_json_guard", "Answers checked by the JSON guard", labels=["group", "outcome"]
        )
        overhead = HistogramMetricFamily(
            "gateway_overhead_seconds",
            "Time spent in the gateway itself: total minus the time waiting for upstreams",
            labels=["group"],
        )
        up_requests = CounterMetricFamily(
            "gateway_upstream_requests", "Attempts sent upstream", labels=["group", "endpoint"]
        )
        up_failures = CounterMetricFamily(
            "gateway_upstream_failures", "Upstream attempts that failed", labels=["group", "endpoint"]
        )
        latency = HistogramMetricFamily(
            "gateway_upstream_latency_seconds",
            "Upstream time to a whole answer (streams: to the first event)",
            labels=["group", "endpoint"],
        )
        state = GaugeMetricFamily(
            "gateway_breaker_state",
            "Endpoint breaker: 0 closed, 1 open, 2 half-open",
            labels=["group", "endpoint"],
        )
        ep_in_flight = GaugeMetricFamily(
            "gateway_endpoint_in_flight", "Attempts running on the endpoint", labels=["group", "endpoint"]
        )
        adm_in_flight = GaugeMetricFamily(
            "gateway_admission_in_flight", "Requests of the group being served", labels=["group"]
        )
        adm_queue = GaugeMetricFamily(
            "gateway_admission_queue", "Requests of the group waiting for a slot", labels=["group"]
        )
        for name, group in groups.items():
            st = group.stats
            requests.add_metric([name], st.requests)
            for outcome, n in sorted(st.outcomes.items()):
                responses.add_metric([name, outcome], n)
            for to, n in sorted(st.fallbacks.items()):
                fallbacks.add_metric([name, to], n)
            for result, n in sorted(st.cache.items()):
                cache.add_metric([name, result], n)
            for outcome, n in sorted(st.guard.items()):
                guard.add_metric([name, outcome], n)
            overhead.add_metric([name], st.overhead.cumulative(), st.overhead.total)
            adm_in_flight.add_metric([name], group.admission.in_flight)
            adm_queue.add_metric([name], group.admission.queue_size)
            for ep in group.endpoints:
                labels = [name, ep.label]
                es = ep.stats
                up_requests.add_metric(labels, es.requests)
                up_failures.add_metric(labels, es.failures)
                latency.add_metric(labels, es.latency.cumulative(), es.latency.total)
                state.add_metric(labels, ep.breaker.state.metric)
                ep_in_flight.add_metric(labels, ep.in_flight)
        yield from (requests, responses, fallbacks, cache, guard, overhead)
        yield from (up_requests, up_failures, latency, state, ep_in_flight, adm_in_flight, adm_queue)
