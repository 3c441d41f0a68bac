"""The gateway's Prometheus collector (brownout.gateway.metrics): its counters read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from brownout.gateway.config import GatewaySection
from brownout.gateway.metrics import GatewayCollector
from brownout.gateway.router import Gateway
from brownout.testing import FakeClock
from support.stack import Metrics, metric_values, sample


def scrape(gateway: Gateway) -> Metrics:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return metric_values(generate_latest(registry).decode())


def two_groups(clock: FakeClock) -> Gateway:
    one = {"endpoints": [{"url": "http://127.0.0.1:9001"}, {"url": "http://127.0.0.1:9002", "name": "b"}]}
    section = GatewaySection.model_validate({"groups": {"chat": one, "json": {**one, "fallbacks": ["chat"]}}})
    return Gateway(section, clock=clock)


def test_an_idle_gateway_exports_every_family_at_zero(clock: FakeClock) -> None:
    metrics = scrape(two_groups(clock))
    for group in ("chat", "json"):
        assert sample(metrics, "gateway_requests_total", group=group) == 0
        assert sample(metrics, "gateway_admission_in_flight", group=group) == 0
        assert sample(metrics, "gateway_admission_queue", group=group) == 0
        assert sample(metrics, "gateway_overhead_seconds_count", group=group) == 0
        for endpoint in ("127.0.0.1:9001", "b"):
            labels = {"group": group, "endpoint": endpoint}
            assert ("gateway_breaker_state", frozenset(labels.items())) in metrics
            assert sample(metrics, "gateway_breaker_state", **labels) == 0
            assert sample(metrics, "gateway_upstream_requests_total", **labels) == 0
            assert sample(metrics, "gateway_endpoint_in_flight", **labels) == 0
    # Outcomes not seen yet are not invented as zero samples.
    assert not any(name == "gateway_responses_total" for name, _ in metrics)


def test_the_counters_are_read_when_scraped(clock: FakeClock) -> None:
    gateway = two_groups(clock)
    before = scrape(gateway)
    chat = gateway.groups["chat"]
    chat.stats.requests += 3
    chat.stats.outcomes["served"] += 2
    chat.stats.outcomes["unavailable"] += 1
    chat.stats.fallbacks["chat"] += 1
    chat.stats.cache["hit"] += 1
    chat.stats.cache["miss"] += 2
    chat.stats.guard["fixed"] += 1
    chat.stats.overhead.observe(0.0015)
    first, second = chat.endpoints
    first.stats.requests += 4
    first.stats.failures += 1
    first.stats.latency.observe(0.2)
    first.stats.latency.observe(3.0)
    second.breaker.force_open()

    metrics = scrape(gateway)
    assert sample(before, "gateway_requests_total", group="chat") == 0
    assert sample(metrics, "gateway_requests_total", group="chat") == 3
    assert sample(metrics, "gateway_responses_total", group="chat", outcome="served") == 2
    assert sample(metrics, "gateway_responses_total", group="chat", outcome="unavailable") == 1
    assert sample(metrics, "gateway_fallbacks_total", group="chat", to="chat") == 1
    assert sample(metrics, "gateway_cache_total", group="chat", result="hit") == 1
    assert sample(metrics, "gateway_cache_total", group="chat", result="miss") == 2
    assert sample(metrics, "gateway_json_guard_total", group="chat", outcome="fixed") == 1
    assert sample(metrics, "gateway_overhead_seconds_bucket", group="chat", le="0.001") == 0
    assert sample(metrics, "gateway_overhead_seconds_bucket", group="chat", le="0.002") == 1
    assert sample(metrics, "gateway_overhead_seconds_sum", group="chat") == 0.0015

    up = {"group": "chat", "endpoint": "127.0.0.1:9001"}
    assert sample(metrics, "gateway_upstream_requests_total", **up) == 4
    assert sample(metrics, "gateway_upstream_failures_total", **up) == 1
    assert sample(metrics, "gateway_upstream_latency_seconds_bucket", **up, le="0.25") == 1
    assert sample(metrics, "gateway_upstream_latency_seconds_bucket", **up, le="5.0") == 2
    assert sample(metrics, "gateway_upstream_latency_seconds_bucket", **up, le="+Inf") == 2
    assert sample(metrics, "gateway_upstream_latency_seconds_count", **up) == 2
    assert sample(metrics, "gateway_breaker_state", group="chat", endpoint="b") == 1  # open
    # The other group's counters are its own.
    assert sample(metrics, "gateway_requests_total", group="json") == 0
    assert sample(metrics, "gateway_breaker_state", group="json", endpoint="b") == 0


def test_in_flight_gauges_follow_the_endpoints_load(clock: FakeClock) -> None:
    gateway = two_groups(clock)
    endpoint = gateway.groups["json"].endpoints[0]
    endpoint.load.begin()
    endpoint.load.begin()
    labels = {"group": "json", "endpoint": "127.0.0.1:9001"}
    assert sample(scrape(gateway), "gateway_endpoint_in_flight", **labels) == 2
    endpoint.load.end()
    assert sample(scrape(gateway), "gateway_endpoint_in_flight", **labels) == 1
