"""Breakers shared by replicas through Redis: one state, probes in total, local fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from brownout.chaos.servers import RedisServer
from brownout.errors import CircuitOpen, ConfigError
from brownout.events import BreakerStateChanged, EventBus
from brownout.policies.breaker import BreakerConfig, BreakerState
from brownout.state.breaker import RedisBreakers
from brownout.testing import FakeClock
from support.wait import until

CONFIG = BreakerConfig(
    window_size=10,
    minimum_calls=4,
    failure_rate_threshold=0.5,
    open_wait=10.0,
    half_open_max_calls=3,
    success_threshold=2,
)


class Boom(Exception):
    pass


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("model down")


@pytest.fixture
async def replicas(fresh_redis: RedisServer, clock: FakeClock) -> AsyncIterator[Callable[..., RedisBreakers]]:
    """Make registries that stand for replicas: each its own Redis client, one Redis, one prefix."""
    made: list[tuple[RedisBreakers, Redis]] = []

    def make(url: str | None = None, **kwargs: object) -> RedisBreakers:
        client: Redis = Redis.from_url(
            url or fresh_redis.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1
        )
        registry = RedisBreakers(client, prefix="test:breaker", clock=clock, **kwargs)  # type: ignore[arg-type]
        made.append((registry, client))
        return registry

    yield make
    for registry, client in made:
        await registry.aclose()
        await client.aclose()


async def fail_n(breaker: object, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            await breaker.call(fail)  # type: ignore[attr-defined]


async def test_one_replica_opens_the_breaker_for_all(
    replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    a = replicas().breaker("qwen", CONFIG)
    b = replicas().breaker("qwen", CONFIG)
    assert await a._owner.sync()
    assert await b._owner.sync()
    await fail_n(a, 2)
    await fail_n(b, 2)  # the shared window: 4 failures of 4 calls across replicas
    assert b.state is BreakerState.OPEN
    await a._owner.sync()
    assert a.state is BreakerState.OPEN
    called = []

    async def tracked() -> str:
        called.append(1)
        return "ok"

    with pytest.raises(CircuitOpen) as info:
        await a.call(tracked)
    assert called == []
    assert info.value.retry_after == pytest.approx(10.0)
    assert a.retry_after() == pytest.approx(10.0)


async def test_successes_dilute_the_shared_rate(replicas: Callable[..., RedisBreakers]) -> None:
    a = replicas().breaker("m", CONFIG)
    b = replicas().breaker("m", CONFIG)
    for _ in range(6):
        assert await a.call(ok) == "ok"
    assert a.metrics().calls == 0  # counted locally, not yet sent
    assert await a._owner.sync()
    assert a.metrics().calls == 6
    await fail_n(b, 4)  # 4 of 10: below 0.5
    assert b.state is BreakerState.CLOSED
    await fail_n(b, 1)  # 5 of 10 (the window keeps the last 10): opens
    assert b.state is BreakerState.OPEN


async def test_half_open_admits_the_probes_in_total_across_replicas(
    replicas: Callable[..., RedisBreakers], clock: FakeClock, bus: EventBus
) -> None:
    seen: list[BreakerStateChanged] = []
    bus.subscribe(seen.append, BreakerStateChanged)
    reg_a = replicas(events=bus)
    a = reg_a.breaker("m", CONFIG)
    b = replicas().breaker("m", CONFIG)
    await fail_n(a, 4)
    await b._owner.sync()
    clock.advance(10.0)
    assert a.state is BreakerState.HALF_OPEN  # the wait is over: the next call asks Redis for a permit

    release = asyncio.Event()
    started: list[str] = []

    async def probe(who: str) -> str:
        started.append(who)
        await release.wait()
        return who

    t1 = asyncio.create_task(a.call(probe, "a1"))
    t2 = asyncio.create_task(a.call(probe, "a2"))
    t3 = asyncio.create_task(b.call(probe, "b1"))
    # Each probe needs a real Redis round trip to get its permit.
    await until(lambda: len(started) == 3, "three probes started", interval=0.001)
    # A fourth caller, on either replica, is refused: three probes exist in total.
    with pytest.raises(CircuitOpen, match="half_open"):
        await b.call(probe, "b2")
    with pytest.raises(CircuitOpen, match="half_open"):
        await a.call(probe, "a3")
    release.set()
    assert sorted(await asyncio.gather(t1, t2, t3)) == ["a1", "a2", "b1"]
    await a._owner.sync()
    await b._owner.sync()
    assert a.state is BreakerState.CLOSED
    assert b.state is BreakerState.CLOSED
    assert [(e.old, e.new) for e in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


async def test_a_failed_probe_reopens_for_everyone(
    replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    a = replicas().breaker("m", CONFIG)
    b = replicas().breaker("m", CONFIG)
    await fail_n(a, 4)
    await b._owner.sync()  # what the background sync does every sync_interval
    clock.advance(10.0)
    await fail_n(b, 1)  # b's probe fails
    assert b.state is BreakerState.OPEN
    await a._owner.sync()
    assert a.state is BreakerState.OPEN
    assert a.retry_after() == pytest.approx(10.0)


async def test_a_dead_replica_holds_a_probe_only_for_its_lease(
    replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    config = CONFIG.model_copy(update={"half_open_max_calls": 1})
    a = replicas(probe_lease=5.0).breaker("m", config)
    b = replicas(probe_lease=5.0).breaker("m", config)
    await fail_n(a, 4)
    await b._owner.sync()
    clock.advance(10.0)
    hang = asyncio.Event()
    holding = asyncio.Event()

    async def forever() -> None:
        holding.set()
        await hang.wait()

    dead = asyncio.create_task(a.call(forever))  # replica A takes the only probe and never reports
    await holding.wait()
    with pytest.raises(CircuitOpen):
        await b.call(ok)
    clock.advance(5.0)  # the lease ran out
    assert await b.call(ok) == "ok"
    dead.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dead


async def test_operator_reset_reaches_every_replica(replicas: Callable[..., RedisBreakers]) -> None:
    a = replicas().breaker("m", CONFIG)
    b = replicas().breaker("m", CONFIG)
    await fail_n(a, 4)
    b.reset()
    await asyncio.gather(*b._owner._background)
    await a._owner.sync()
    assert a.state is BreakerState.CLOSED
    assert await a.call(ok) == "ok"
    b.force_open()
    await asyncio.gather(*b._owner._background)
    await a._owner.sync()
    assert a.state is BreakerState.FORCED_OPEN
    with pytest.raises(CircuitOpen):
        await a.call(ok)


async def test_an_operator_change_holds_on_this_replica_at_once(
    replicas: Callable[..., RedisBreakers],
) -> None:
    # Before the write to Redis lands: the replica that was told obeys already (it once answered
    # "available" right after force_open, so a forced-open model still looked healthy).
    a = replicas().breaker("m", CONFIG)
    assert await a.call(ok) == "ok"
    a.force_open()
    assert a.state is BreakerState.FORCED_OPEN
    assert not a.available
    await asyncio.gather(*a._owner._background)
    await a._owner.sync()
    assert a.state is BreakerState.FORCED_OPEN
    a.reset()
    assert a.state is BreakerState.CLOSED
    assert a.available
    a.open_for(30.0, "provider asked")
    assert a.state is BreakerState.OPEN
    assert not a.available
    assert a.retry_after() == pytest.approx(30.0)


async def test_guard_form_records_outcomes(replicas: Callable[..., RedisBreakers]) -> None:
    a = replicas().breaker("m", CONFIG)
    for _ in range(4):
        with pytest.raises(Boom):
            async with a.guard():
                raise Boom("x")
    await asyncio.gather(*a._owner._background)
    assert a.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        async with a:
            pass


async def test_redis_outage_falls_back_to_a_local_breaker_and_back(
    make_redis_server: Callable[..., RedisServer], replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    server = make_redis_server()
    registry = replicas(server.url)
    a = registry.breaker("m", CONFIG)
    assert await registry.sync()
    assert a.shared
    server.stop()
    # The call still runs; the failed Redis operation switches the breaker to local state.
    assert await a.call(ok) == "ok"
    assert not await registry.sync()
    assert not a.shared
    await fail_n(a, 4)  # the local breaker judges on its own meanwhile
    assert a.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await a.call(ok)
    server.start()
    assert await registry.sync()
    assert a.shared
    assert a.state is BreakerState.CLOSED  # Redis's state: nothing failed there
    assert await a.call(ok) == "ok"


def test_shared_breakers_need_count_windows(clock: FakeClock) -> None:
    client = Redis.from_url("redis://127.0.0.1:1")
    registry = RedisBreakers(client, clock=clock)
    with pytest.raises(ConfigError, match="window_type"):
        registry.breaker("t", BreakerConfig(window_type="time"))
    with pytest.raises(ConfigError, match="sync_interval"):
        RedisBreakers(client, sync_interval=0)


async def test_forced_closed_and_disabled_reach_every_replica(replicas: Callable[..., RedisBreakers]) -> None:
    a = replicas().breaker("m", CONFIG)
    b = replicas().breaker("m", CONFIG)
    b.force_closed()
    await asyncio.gather(*b._owner._background)
    await a._owner.sync()
    assert a.state is BreakerState.FORCED_CLOSED
    await fail_n(a, 6)  # every call runs; the breaker never opens
    assert a.state is BreakerState.FORCED_CLOSED
    assert a.available
    assert a.retry_after() == 0.0
    b.disable()
    await asyncio.gather(*b._owner._background)
    await a._owner.sync()
    assert a.state is BreakerState.DISABLED
    assert await a.call(ok) == "ok"


async def test_what_a_shared_breaker_reports_while_open(
    replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    a = replicas().breaker("m", CONFIG)
    assert repr(a) == "SharedBreaker('m', state=closed, redis)"
    await fail_n(a, 4)
    await a._owner.sync()
    metrics = a.metrics()
    assert (metrics.state, metrics.calls, metrics.failures, metrics.failure_rate) == (
        BreakerState.OPEN,
        4,
        4,
        1.0,
    )
    assert metrics.retry_after == pytest.approx(10.0)
    with pytest.raises(CircuitOpen):
        await a.call(ok)
    assert a.metrics().rejected == 1
    clock.advance(4.0)
    assert a.retry_after() == pytest.approx(6.0)
    a.force_open()
    assert a.retry_after() == CONFIG.open_wait  # until an operator resets it


async def test_half_open_with_every_probe_out_says_when_to_come_back(
    replicas: Callable[..., RedisBreakers], clock: FakeClock
) -> None:
    a = replicas().breaker("m", CONFIG)
    await fail_n(a, 4)
    clock.advance(10.0)
    release = asyncio.Event()
    started: list[int] = []

    async def held() -> str:
        started.append(1)
        await release.wait()
        return "ok"

    probes = [asyncio.create_task(a.call(held)) for _ in range(CONFIG.half_open_max_calls)]
    await until(lambda: len(started) == CONFIG.half_open_max_calls, "every probe running", interval=0.001)
    await a._owner.sync()  # the probe count as Redis holds it
    assert a.state is BreakerState.HALF_OPEN
    assert not a.available
    assert a.retry_after() == CONFIG.half_open_retry_after
    release.set()
    assert await asyncio.gather(*probes) == ["ok"] * CONFIG.half_open_max_calls


async def test_the_decorator_and_block_forms_judge_results_and_ignore_what_they_are_told_to(
    replicas: Callable[..., RedisBreakers],
) -> None:
    config = CONFIG.model_copy(
        update={"failure_result": lambda r: r == "bad", "ignore_exceptions": (KeyError,)}
    )
    a = replicas().breaker("m", config)

    @a
    async def answer(value: str) -> str:
        return value

    assert answer.__name__ == "answer"
    for _ in range(4):
        assert await answer("bad") == "bad"  # returned, but counted as a failure
    await asyncio.gather(*a._owner._background)
    assert a.state is BreakerState.OPEN
    a.reset()
    await asyncio.gather(*a._owner._background)
    for _ in range(4):
        with pytest.raises(KeyError):
            async with a:
                raise KeyError("not the model's fault")
        async with a.guard() as guard:
            guard.record_result("fine")
    await asyncio.gather(*a._owner._background)
    assert a.state is BreakerState.CLOSED


async def test_without_redis_a_guard_is_judged_by_the_local_breaker(
    make_redis_server: Callable[..., RedisServer], replicas: Callable[..., RedisBreakers]
) -> None:
    server = make_redis_server()
    registry = replicas(server.url)
    a = registry.breaker("m", CONFIG)
    assert await registry.sync()
    server.stop()
    assert not await registry.sync()
    assert repr(a) == "SharedBreaker('m', state=closed, local)"
    for _ in range(4):
        with pytest.raises(Boom):
            async with a.guard():
                raise Boom("x")
    assert a.state is BreakerState.OPEN  # the local breaker's own window
    assert a.metrics().failures == 4
    assert a.retry_after() == pytest.approx(10.0)
    assert not a.available
