"""The Redis side of ``brownout serve`` (brownout.server.shared): the parts replicas share, and the
health checks one replica runs for all, against the session's private redis-server."""

from __future__ import annotations

import pytest

from brownout.chaos.servers import RedisServer
from brownout.config import RedisSection
from brownout.events import EventBus
from brownout.llm.types import ProbeResult
from brownout.policies.cache import Cache, CacheConfig
from brownout.server.shared import SharedState
from brownout.state.redis import SharedCache
from brownout.testing import FakeClock
from support.net import free_port

RESULTS = [
    ProbeResult("qwen", "qwen", True, 0.05),
    ProbeResult("qwen", "qwen-2", False, 2.0, error="timeout"),
]


class Probe:
    """A health check that counts how often it ran."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self) -> list[ProbeResult]:
        self.runs += 1
        return RESULTS


def replica(url: str, **settings: object) -> SharedState:
    return SharedState(
        RedisSection.model_validate({"url": url, **settings}),
        clock=FakeClock(),
        events=EventBus(),
        wall=FakeClock(),
    )


def test_there_is_nothing_to_share_without_a_redis_url() -> None:
    with pytest.raises(ValueError, match=r"redis\.url"):
        SharedState(RedisSection(), clock=FakeClock(), events=EventBus())


async def test_one_replica_probes_per_interval_and_the_others_read_its_results(
    fresh_redis: RedisServer,
) -> None:
    a, b = replica(fresh_redis.url), replica(fresh_redis.url)
    probe_a, probe_b = Probe(), Probe()
    try:
        assert await a.probe_once("qwen", 60.0, probe_a) == (RESULTS, True)
        assert await b.probe_once("qwen", 60.0, probe_b) == (RESULTS, False)
        assert (probe_a.runs, probe_b.runs) == (1, 0)
        # Each role has its own turn.
        assert await b.probe_once("llama", 60.0, probe_b) == (RESULTS, True)
        assert probe_b.runs == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_replica_that_lost_the_turn_probes_itself_until_results_are_published(
    fresh_redis: RedisServer,
) -> None:
    a = replica(fresh_redis.url)
    try:
        # Another replica holds this interval's lock but has not published yet: no results to read.
        fresh_redis.command("SET", "brownout:health:qwen:lock", "someone-else")
        assert await a.probe_once("qwen", 60.0, Probe()) is None
    finally:
        await a.aclose()


async def test_without_redis_the_caller_probes_by_itself() -> None:
    down = replica(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    probe = Probe()
    try:
        assert await down.probe_once("qwen", 60.0, probe) is None
        assert probe.runs == 0  # the caller runs its own probe when told None
    finally:
        await down.aclose()


async def test_the_shared_parts_follow_the_section(fresh_redis: RedisServer) -> None:
    full = replica(fresh_redis.url, prefix="t1")
    bare = replica(fresh_redis.url, share_cache=False, singleflight=False)
    try:
        assert full.flights is not None
        assert bare.flights is None
        local: Cache[str, object] = Cache(CacheConfig(max_entries=10), clock=FakeClock())
        assert bare.cache_for(local, ttl=30.0) is None
        shared = full.cache_for(local, ttl=30.0)
        assert isinstance(shared, SharedCache)
        assert full.cache is shared
    finally:
        await full.aclose()
        await bare.aclose()


async def test_status_says_what_redis_holds_now(fresh_redis: RedisServer) -> None:
    state = replica(fresh_redis.url)
    try:
        before = state.status()
        assert before["cache_mode"] is None  # no shared cache asked for yet
        assert before["cache_redis_hits"] is None
        await state.start()
        status = state.status()
        assert status["status"] == "healthy"
        assert status["consecutive_failures"] == 0
        assert status["last_error"] is None
        assert status["breakers"] == "shared"
        assert isinstance(status["last_latency_ms"], float)
    finally:
        await state.aclose()
