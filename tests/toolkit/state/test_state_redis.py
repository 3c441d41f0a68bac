"""The Redis health detector and the shared cache, against real redis-server processes.

Servers that a test stops or pauses are private ones (``make_redis_server``); the session's server is
only flushed and used. Time is real here (the I/O is), so the only timing assertions are generous
upper bounds that prove an operation was cut short instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from brownout.chaos.servers import RedisServer
from brownout.errors import DeadlineExceeded
from brownout.events import Event, EventBus, RedisStatusChanged
from brownout.policies.cache import Cache, CacheConfig
from brownout.state import RedisHealthDetector, SharedCache
from brownout.state.redis import _bounded
from brownout.testing import FakeClock
from support.wait import until

# Far above any real check on this machine, so "healthy" does not depend on how loaded it is.
_SLOW = 5.0


def _client(url: str) -> Redis:
    # No client-side retries: the policies' deadlines bound each operation, retries would only spend it.
    client: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    return client


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[str], Redis]]:
    """Make redis clients that are closed after the test."""
    made: list[Redis] = []

    def make(url: str) -> Redis:
        client = _client(url)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def _transitions(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.old, e.new) for e in events if isinstance(e, RedisStatusChanged)]


# -- RedisHealthDetector --------------------------------------------------------------------------


async def test_healthy_check_runs_ping_set_get_on_an_expiring_probe_key(
    fresh_redis: RedisServer, clients: Callable[[str], Redis], bus: EventBus
) -> None:
    client = clients(fresh_redis.url)
    seen: list[Event] = []
    bus.subscribe(seen.append)
    detector = RedisHealthDetector(client, events=bus, degraded_after=_SLOW)

    health = await detector.check()

    assert health.status == "healthy"
    assert health.ok
    assert health.latency is not None
    assert 0 <= health.latency < _SLOW
    assert health.error == ""
    assert health.consecutive_failures == 0
    assert detector.status == "healthy"
    assert detector.last_latency == health.latency
    keys = await client.keys("brownout:health:*")
    assert len(keys) == 1
    assert await client.get(keys[0]) == b"1"
    assert 0 < await client.pttl(keys[0]) <= (5.0 * 3 + 1.0) * 1000
    assert seen == []  # no change, no event


async def test_latency_over_the_threshold_is_degraded(
    fresh_redis: RedisServer, clients: Callable[[str], Redis], bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append, RedisStatusChanged)
    detector = RedisHealthDetector(clients(fresh_redis.url), name="r", events=bus, degraded_after=0.0)

    health = await detector.check()

    assert health.status == "degraded"
    assert health.ok
    assert detector.consecutive_failures == 0
    assert _transitions(seen) == [("healthy", "degraded")]
    assert seen[0].source == "r"
    assert isinstance(seen[0], RedisStatusChanged)
    assert "ms" in seen[0].reason


async def test_three_failed_checks_mean_fallback_until_a_check_succeeds(
    make_redis_server: Callable[..., RedisServer], clients: Callable[[str], Redis], bus: EventBus
) -> None:
    server = make_redis_server()
    seen: list[Event] = []
    bus.subscribe(seen.append, RedisStatusChanged)
    detector = RedisHealthDetector(clients(server.url), events=bus, degraded_after=_SLOW, check_timeout=0.5)
    assert (await detector.check()).status == "healthy"

    server.stop()
    results = [await detector.check() for _ in range(4)]

    assert [r.status for r in results] == ["degraded", "degraded", "fallback", "fallback"]
    assert [r.consecutive_failures for r in results] == [1, 2, 3, 4]
    assert all(not r.ok and r.error for r in results)
    assert detector.fallback
    assert detector.last_error == results[-1].error

    server.start()
    back = await detector.check()

    assert back.status == "healthy"
    assert back.ok
    assert detector.consecutive_failures == 0
    assert not detector.fallback
    assert _transitions(seen) == [("healthy", "degraded"), ("degraded", "fallback"), ("fallback", "healthy")]


async def test_failures_reported_by_traffic_count_and_a_success_ends_the_streak(
    fresh_redis: RedisServer, clients: Callable[[str], Redis], clock: FakeClock, bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append, RedisStatusChanged)
    detector = RedisHealthDetector(clients(fresh_redis.url), clock=clock, events=bus, failures_to_fallback=2)

    detector.record_failure(ConnectionError("refused"))
    detector.record_success()
    detector.record_failure("timeout")
    assert detector.status == "degraded"
    assert detector.consecutive_failures == 1
    detector.record_failure(ConnectionError("refused"))
    assert detector.fallback
    assert detector.last_error == "ConnectionError: refused"

    # Only a check leaves fallback (traffic is not even sent to Redis then).
    detector.record_success()
    assert detector.fallback
    assert (await detector.check()).status == "healthy"  # FakeClock: the check took 0 s
    assert _transitions(seen) == [("healthy", "degraded"), ("degraded", "fallback"), ("fallback", "healthy")]
    assert all(e.at == clock.now() for e in seen)


async def test_background_loop_checks_every_interval_of_clock_time(
    make_redis_server: Callable[..., RedisServer], clients: Callable[[str], Redis], clock: FakeClock
) -> None:
    server = make_redis_server()
    detector = RedisHealthDetector(clients(server.url), clock=clock, interval=5.0, check_timeout=0.5)

    async def next_sleep(count: int) -> None:
        # The loop sleeps once per check: wait (bounded) until it has done `count` of them.
        for _ in range(500):
            if len(clock.sleeps) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the loop did not reach check {count}")

    async with detector:
        assert detector.running
        await next_sleep(1)
        assert clock.sleeps == [5.0]
        assert detector.status == "healthy"
        server.stop()
        for n in range(2, 5):
            await clock.run(5.0)
            await next_sleep(n)
        assert detector.fallback
        assert detector.consecutive_failures == 3
        server.start()
        await clock.run(5.0)
        await next_sleep(5)
        assert detector.status == "healthy"
    assert not detector.running


async def test_settings_are_validated(fresh_redis: RedisServer, clients: Callable[[str], Redis]) -> None:
    client = clients(fresh_redis.url)
    with pytest.raises(pydantic.ValidationError, match="failures_to_fallback"):
        RedisHealthDetector(client, failures_to_fallback=0)
    with pytest.raises(pydantic.ValidationError, match="check_timeout"):
        RedisHealthDetector(client, check_timeout=0)
    with pytest.raises(pydantic.ValidationError, match="prefix"):
        SharedCache(client, prefix="")
    with pytest.raises(pydantic.ValidationError, match="redis_timeout"):
        SharedCache(client, redis_timeout=-1)


# -- SharedCache ----------------------------------------------------------------------------------


async def test_two_replicas_share_values_through_redis(
    fresh_redis: RedisServer, clients: Callable[[str], Redis]
) -> None:
    a = SharedCache(clients(fresh_redis.url), name="a")
    b = SharedCache(clients(fresh_redis.url), name="b")
    value: dict[str, Any] = {"brief": "citrus", "notes": [1, 2]}

    assert await a.set("k", value) is True
    assert await b.get("k") == value  # from Redis: b never saw the set
    assert await b.get("k") == value  # now from b's local front
    assert await a.get("k") == value  # a's own front
    assert await b.get("absent") is None

    sa, sb = a.stats(), b.stats()
    assert (sa.local_hits, sa.redis_hits, sa.misses, sa.redis_errors, sa.mode) == (1, 0, 0, 0, "redis")
    assert (sb.local_hits, sb.redis_hits, sb.misses, sb.redis_errors, sb.mode) == (1, 1, 1, 0, "redis")
    raw = fresh_redis.command("GET", "brownout:cache:k")
    assert isinstance(raw, bytes)
    assert raw.startswith(b"{")
    ttl_ms = fresh_redis.command("PTTL", "brownout:cache:k")
    assert isinstance(ttl_ms, int)
    assert 590_000 < ttl_ms <= 600_000


async def test_ttl_and_delete_reach_redis(fresh_redis: RedisServer, clients: Callable[[str], Redis]) -> None:
    a = SharedCache(clients(fresh_redis.url), prefix="p:")
    await a.set("short", 1, ttl=5)
    ttl_ms = fresh_redis.command("PTTL", "p:short")
    assert isinstance(ttl_ms, int)
    assert 0 < ttl_ms <= 5000

    assert await a.delete("short") is True
    assert fresh_redis.command("EXISTS", "p:short") == 0
    assert await a.get("short") is None  # gone from the local front too
    c = SharedCache(clients(fresh_redis.url), prefix="p:")
    assert await c.get("short") is None


async def test_local_front_hits_do_not_touch_redis(
    fresh_redis: RedisServer, clients: Callable[[str], Redis], clock: FakeClock
) -> None:
    local: Cache[str, Any] = Cache("front", CacheConfig(ttl=10), clock=clock)
    cache = SharedCache(clients(fresh_redis.url), local=local, clock=clock)
    await cache.set("k", "v")
    fresh_redis.command("DEL", "brownout:cache:k")  # proves the next reads are local

    assert [await cache.get("k") for _ in range(3)] == ["v", "v", "v"]
    assert cache.stats().local_hits == 3
    assert local.stats().hits == 3

    clock.advance(11)  # the front's entry expired, and Redis no longer has the key
    assert await cache.get("k") is None
    assert cache.stats().misses == 1


async def test_a_value_redis_cannot_decode_is_a_counted_miss(
    fresh_redis: RedisServer, clients: Callable[[str], Redis]
) -> None:
    fresh_redis.command("SET", "brownout:cache:bad", b"\xff not json")
    cache = SharedCache(clients(fresh_redis.url))

    assert await cache.get("bad") is None
    stats = cache.stats()
    assert (stats.misses, stats.redis_errors) == (1, 1)
    with pytest.raises(TypeError):
        await cache.set("unencodable", object())  # a caller's bug still raises


async def test_stopped_redis_keeps_answering_from_the_local_front(
    make_redis_server: Callable[..., RedisServer], clients: Callable[[str], Redis], bus: EventBus
) -> None:
    server = make_redis_server()
    client = clients(server.url)
    detector = RedisHealthDetector(client, events=bus, degraded_after=_SLOW, check_timeout=0.5)
    cache = SharedCache(client, detector=detector, events=bus)
    await cache.set("warm", "cached")

    server.stop()
    assert await cache.get("warm") == "cached"  # local front, no Redis needed
    assert await cache.get("cold1") is None
    assert await cache.set("new", 42) is False  # Redis missed it, this replica still has it
    assert await cache.get("new") == 42
    assert cache.stats().redis_errors == 2
    assert cache.mode == "redis"
    assert await cache.delete("cold2") is False  # third consecutive failure
    assert detector.status == "fallback"

    stats = cache.stats()
    assert (stats.redis_errors, stats.mode) == (3, "local-only")
    assert await cache.get("cold3") is None  # Redis is skipped now: no new error
    assert await cache.set("newer", 1) is False
    stats = cache.stats()
    assert (stats.redis_errors, stats.misses, stats.local_hits) == (3, 2, 2)

    server.start()  # comes back empty (no persistence)
    assert (await detector.check()).status == "healthy"
    assert cache.mode == "redis"
    assert await cache.set("after", "ok") is True
    assert server.command("GET", "brownout:cache:after") == b'"ok"'


async def test_paused_redis_bounds_each_operation_by_the_timeout(
    make_redis_server: Callable[..., RedisServer], clients: Callable[[str], Redis]
) -> None:
    server = make_redis_server()
    client = clients(server.url)
    detector = RedisHealthDetector(client, degraded_after=_SLOW, check_timeout=0.3)
    cache = SharedCache(client, detector=detector, redis_timeout=0.1)
    await cache.set("warm", "cached")

    server.pause()  # SIGSTOP: connections hang instead of being refused
    started = time.monotonic()
    got = await cache.get("cold")
    stored = await cache.set("x", 1)
    deleted = await cache.delete("y")
    elapsed = time.monotonic() - started

    assert (got, stored, deleted) == (None, False, False)
    assert elapsed < 1.0, f"three operations took {elapsed:.2f}s against a frozen Redis"
    assert cache.stats().redis_errors == 3
    assert cache.mode == "local-only"
    assert await cache.get("warm") == "cached"

    started = time.monotonic()
    assert not (await detector.check()).ok  # the check is bounded too
    assert time.monotonic() - started < 1.0

    server.resume()
    assert (await detector.check()).status == "healthy"
    assert await cache.set("back", [1]) is True
    other = SharedCache(clients(server.url))
    assert await other.get("back") == [1]
    assert other.stats().redis_hits == 1


async def test_paused_redis_without_detector_bounds_concurrent_gets(
    make_redis_server: Callable[..., RedisServer], clients: Callable[[str], Redis]
) -> None:
    server = make_redis_server()
    client = clients(server.url)
    cache = SharedCache(client, redis_timeout=0.1)
    await cache.set("shared", "v")
    fresh = SharedCache(client, redis_timeout=0.1)  # empty front: every get goes to Redis

    server.pause()
    started = time.monotonic()
    results = await asyncio.gather(*(fresh.get("shared") for _ in range(100)))
    elapsed = time.monotonic() - started

    assert results == [None] * 100
    assert elapsed < 1.0, f"100 gets took {elapsed:.2f}s against a frozen Redis"
    stats = fresh.stats()
    assert (stats.redis_errors, stats.misses, stats.mode) == (100, 100, "redis")

    server.resume()
    # No detector to wait for: the next calls go to Redis. The resumed server first works through
    # what it received while frozen (the 100 abandoned gets), which on a busy machine can outlast one
    # 0.1 s call; every call meanwhile still asks Redis (a miss is a Redis error, nothing skipped).

    async def found() -> bool:
        return await fresh.get("shared") == "v"

    await until(found, "a get answered by the resumed Redis", timeout=5.0, interval=0.05)
    stats = fresh.stats()
    assert stats.redis_hits == 1
    assert stats.misses == stats.redis_errors
    assert stats.mode == "redis"


async def test_an_operation_that_absorbs_its_cancellation_is_still_cut_off(
    clock: FakeClock, bus: EventBus
) -> None:
    # redis-py can swallow a cancellation while it sets up a connection; the bound must not rely on it.
    release = asyncio.Event()
    cancels = 0

    async def stubborn() -> str:
        nonlocal cancels
        while True:
            try:
                await release.wait()
                return "late"
            except asyncio.CancelledError:
                cancels += 1

    caller = asyncio.create_task(_bounded(stubborn(), 0.1, clock, bus, "op"))
    await clock.run(0.1)
    done, _ = await asyncio.wait({caller}, timeout=1.0)  # only bounds a failure; passes at once

    assert caller in done
    with pytest.raises(DeadlineExceeded):
        caller.result()
    assert cancels == 1  # the abandoned operation was asked to stop
    release.set()
    await asyncio.sleep(0)
