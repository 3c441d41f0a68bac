"""The gateway's counters, and the Prometheus collector that reads them at scrape time.

Nothing on the request path touches Prometheus: the gateway increments plain integers and buckets
(:mod:`brownout.gateway.stats`), and :class:`GatewayCollector` turns them into metric families when
``/metrics`` is scraped.

Metric families (all labelled by ``group``; upstream ones also by ``endpoint``):

=========================================  ===================================================================
``gateway_requests_total``                 chat requests received, by group asked for
``gateway_responses_total``                responses sent, by ``outcome`` (``served``, ``client_error``,
                                           ``unavailable``, ``overloaded``, ``stream_error``)
``gateway_fallbacks_total``                requests served by a fallback group, by group asked and ``to``
``gateway_cache_total``                    cache lookups by ``result`` (``hit``, ``miss``)
``gateway_json_guard_total``               guarded answers by ``outcome`` (``valid``, ``fixed``, ``invalid``)
``gateway_hedges_total``                   hedged requests, by ``result`` (``sent``; ``won``: the second
                                           attempt answered first)
``gateway_continuations_total``            broken streams continued elsewhere, by ``result`` (``served``,
                                           ``failed``; ``prefill_refused``: an endpoint refused prefill)
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

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from brownout.gateway.router import Gateway

__all__ = ["GatewayCollector"]


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
        hedges = CounterMetricFamily("gateway_hedges", "Hedged requests", labels=["group", "result"])
        continuations = CounterMetricFamily(
            "gateway_continuations", "Broken streams continued elsewhere", labels=["group", "result"]
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
            for result, n in sorted(st.hedges.items()):
                hedges.add_metric([name, result], n)
            for result, n in sorted(st.continuations.items()):
                continuations.add_metric([name, result], n)
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
                ep_in_flight.add_metric(labels, ep.load.in_flight)
        yield from (requests, responses, fallbacks, cache, guard, hedges, continuations, overhead)
        yield from (up_requests, up_failures, latency, state, ep_in_flight, adm_in_flight, adm_queue)
