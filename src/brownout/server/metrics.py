"""Prometheus metrics with the seeds' names, read from the running parts at scrape time.

Nothing on the request path touches Prometheus: the service, guards, cache, breakers and admission
keep plain counters, and this collector turns them into metric families when ``/metrics`` is
scraped. Each app has its own registry, so several apps (tests, workers) never clash.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from brownout.config import ROLES
from brownout.server.runtime import Runtime

__all__ = ["RuntimeCollector", "make_registry"]


class RuntimeCollector(Collector):
    """Collects the runtime's state as Prometheus metrics."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        service = rt.service
        if service is None:
            return
        stats = service.stats

        requests = CounterMetricFamily("llm_requests", "Model calls made, by model role", labels=["model"])
        failures = CounterMetricFamily(
            "llm_request_failures", "Model calls that failed, by model role", labels=["model"]
        )
        for role in ROLES:
            requests.add_metric([role], stats.requests[role])
            failures.add_metric([role], stats.failures[role])
        yield requests
        yield failures

        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open",
            labels=["model", "endpoint"],
        )
        for role, client in rt.clients.items():
            for name, breaker in client.breakers.items():
                state.add_metric([role, name], breaker.state.metric)
        yield state

        downshift = CounterMetricFamily(
            "llm_mode_downshift", "Requests served below the requested mode", labels=["from_mode", "to_mode"]
        )
        for (src, dst), n in sorted(stats.downshifts.items()):
            downshift.add_metric([src, dst], n)
        yield downshift

        served = CounterMetricFamily(
            "brief_requests", "Briefs served, by served mode", labels=["served_mode"]
        )
        for mode, n in sorted(stats.served.items()):
            served.add_metric([mode], n)
        yield served

        rejected = CounterMetricFamily(
            "brief_rejections", "Brief requests answered 503, by reason", labels=["reason"]
        )
        for reason, n in sorted(stats.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected

        parse = CounterMetricFamily(
            "llm_json_parse_failures", "Model answers that were not JSON", labels=["stage"]
        )
        invalid = CounterMetricFamily(
            "llm_json_validation_failures", "Model answers that broke the schema", labels=["stage"]
        )
        repairs = CounterMetricFamily(
            "llm_json_repairs", "Model answers repaired into JSON", labels=["stage"]
        )
        retry_hist = HistogramMetricFamily(
            "llm_json_retry_count", "Re-asks per guarded call", labels=["stage"]
        )
        for stage, guard in service.guards.items():
            g = guard.stats
            parse.add_metric([stage], g.parse_failures)
            invalid.add_metric([stage], g.validation_failures)
            repairs.add_metric([stage], g.repairs)
            buckets, total, cumulative = [], 0.0, 0
            for bound in (0, 1, 2, 3, 5):
                cumulative = sum(n for k, n in g.retry_counts.items() if k <= bound)
                buckets.append((str(float(bound)), cumulative))
            count = sum(g.retry_counts.values())
            total = float(sum(k * n for k, n in g.retry_counts.items()))
            buckets.append(("+Inf", count))
            retry_hist.add_metric([stage], buckets, total)
        yield parse
        yield invalid
        yield repairs
        yield retry_hist
        yield CounterMetricFamily(
            "llm_json_fallback_used",
            "Stages served by a fallback after the guard gave up",
            value=stats.fallback_used,
        )

        cache = service.cache.stats()
        yield CounterMetricFamily("cache_requests", "Response-cache lookups", value=cache.hits + cache.misses)
        yield CounterMetricFamily("cache_hits", "Response-cache hits", value=cache.hits)
        yield CounterMetricFamily("cache_misses", "Response-cache misses", value=cache.misses)
        yield CounterMetricFamily("cache_evictions", "Entries evicted (LRU)", value=cache.evictions)
        yield CounterMetricFamily("cache_ttl_expirations", "Entries expired (TTL)", value=cache.expirations)
        yield GaugeMetricFamily("cache_size", "Entries in the response cache", value=cache.size)

        yield GaugeMetricFamily(
            "queue_size", "Requests waiting for a pipeline slot", value=service.admission.queue_size
        )
        yield GaugeMetricFamily(
            "pipeline_in_flight", "Pipeline runs in progress", value=service.admission.in_flight
        )

        model_health = GaugeMetricFamily(
            "model_health_status", "1 when the model role can serve", labels=["model"]
        )
        llm_health = GaugeMetricFamily(
            "llm_health_status", "1 when the last health check passed", labels=["model"]
        )
        duration = GaugeMetricFamily(
            "llm_health_check_duration_seconds", "Latency of the last health check", labels=["model"]
        )
        health_failures = CounterMetricFamily(
            "llm_health_check_failures", "Health checks that failed", labels=["model"]
        )
        for role in ROLES:
            model_health.add_metric([role], 1.0 if service.role_available(role) else 0.0)
            probe = stats.health.get(role)
            llm_health.add_metric([role], 1.0 if probe is None or probe.healthy else 0.0)
            duration.add_metric([role], probe.latency if probe is not None else 0.0)
            health_failures.add_metric([role], stats.health_failures[role])
        yield model_health
        yield llm_health
        yield duration
        yield health_failures

        errors = CounterMetricFamily("http_errors", "HTTP responses with status >= 400", labels=["status"])
        for status, n in sorted(rt.http.errors.items()):
            errors.add_metric([str(status)], n)
        yield errors

        spool = rt.spool.stats()
        yield GaugeMetricFamily(
            "spool_pending", "Writes waiting in the local spool for the database", value=spool.pending
        )
        yield GaugeMetricFamily(
            "spool_oldest_age_seconds", "Age of the oldest spooled write", value=spool.oldest_age
        )
        yield CounterMetricFamily(
            "spool_replayed", "Spooled writes replayed into the database", value=spool.replayed
        )
        yield CounterMetricFamily(
            "spool_replay_failures", "Replay attempts that failed", value=spool.failed_attempts
        )

        restarts = CounterMetricFamily(
            "model_server_restarts", "Local model server restarts", labels=["model"]
        )
        for role, server in rt.local.items():
            restarts.add_metric([role], server.restarts)
        yield restarts


def make_registry(runtime: Runtime) -> CollectorRegistry:
    """A fresh registry holding the runtime's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry
