"""Tests of brownout.state.tiered: tiered reads with freshness labels (seed 002 §1)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from brownout.errors import AllFallbacksFailed, ConfigError, DeadlineExceeded
from brownout.events import EventBus, FallbackServed
from brownout.policies.deadline import deadline
from brownout.policies.fallback import Decline
from brownout.state.tiered import Tier, TieredReader
from brownout.testing import FakeClock


class Store:
    """A fake storage tier: a dict, switchable to failing or hanging, counting its reads."""

    def __init__(self, clock: FakeClock, data: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.data: dict[str, str] = dict(data or {})
        self.error: Exception | None = None
        self.hang = False
        self.reads = 0

    async def get(self, key: str) -> str | None:
        self.reads += 1
        if self.hang:
            await self.clock.sleep(3600)  # far beyond any tier timeout used here
        if self.error is not None:
            raise self.error
        return self.data.get(key)


def make(
    clock: FakeClock,
    redis: Store,
    db: Store,
    *,
    redis_timeout: float | object = 1.0,
    default: object = None,
    bus: EventBus | None = None,
    **kwargs: object,
) -> TieredReader[str]:
    tiers = [
        Tier("redis", redis.get, "real_time", redis_timeout),  # type: ignore[arg-type]
        Tier("database", db.get, "stale", 2.0),
    ]
    extra = {"events": bus} if bus is not None else {}
    return TieredReader("pricing", tiers, default=default, clock=clock, **extra, **kwargs)  # type: ignore[arg-type]


async def test_first_tier_serves_high_confidence(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    reader = make(clock, redis, db)
    out = await reader.read("z1")
    assert (out.value, out.source, out.freshness, out.confidence) == ("10", "redis", "real_time", "high")
    assert out.fallback_reason is None
    assert out.age is None
    assert not out.degraded
    assert db.reads == 0
    assert reader.stats().served["redis"] == 1


async def test_miss_then_database_serves_stale_with_reason(clock: FakeClock, bus: EventBus) -> None:
    seen: list[FallbackServed] = []
    bus.subscribe(seen.append, FallbackServed)
    redis, db = Store(clock), Store(clock, {"z1": "9"})
    reader = make(clock, redis, db, bus=bus)
    out = await reader.read("z1")
    assert (out.value, out.source, out.freshness, out.confidence) == ("9", "database", "stale", "medium")
    assert out.fallback_reason == "redis: miss"
    stats = reader.stats()
    assert stats.misses["redis"] == 1
    assert stats.served["database"] == 1
    assert [(e.source, e.strategy, e.skipped) for e in seen] == [("pricing", "database", 1)]


async def test_exception_falls_through_with_error_in_reason(clock: FakeClock) -> None:
    redis, db = Store(clock), Store(clock, {"z1": "9"})
    redis.error = ConnectionError("connection refused")
    reader = make(clock, redis, db)
    out = await reader.read("z1")
    assert out.source == "database"
    assert out.fallback_reason == "redis: ConnectionError: connection refused"
    assert reader.stats().failures["redis"] == 1


async def test_hanging_tier_falls_through_within_its_timeout(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    redis.hang = True
    reader = make(clock, redis, db, redis_timeout=1.0)
    task = asyncio.create_task(reader.read("z1"))
    await clock.run(0.99)
    assert not task.done()
    await clock.run(0.01)
    assert task.done()
    out = task.result()
    assert out.source == "database"
    assert out.freshness == "stale"
    assert out.fallback_reason is not None
    assert out.fallback_reason.startswith("redis: DeadlineExceeded: deadline of 1s exceeded")


@pytest.mark.parametrize(("degraded", "limit"), [(False, 1.0), (True, 0.1)])
async def test_callable_timeout_follows_health(clock: FakeClock, degraded: bool, limit: float) -> None:
    health = {"degraded": degraded}
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    redis.hang = True
    reader = make(clock, redis, db, redis_timeout=lambda: 0.1 if health["degraded"] else 1.0)
    start = clock.now()
    task = asyncio.create_task(reader.read("z1"))
    await clock.run(limit - 0.01)
    assert not task.done()
    await clock.run(0.01)
    assert task.done()
    assert task.result().source == "database"
    assert clock.now() - start == pytest.approx(limit)


async def test_callable_timeout_switches_between_reads(clock: FakeClock) -> None:
    health = {"degraded": False}
    redis, db = Store(clock), Store(clock, {"z1": "9"})
    redis.hang = True
    reader = make(clock, redis, db, redis_timeout=lambda: 0.1 if health["degraded"] else 1.0)
    reasons = []
    for degraded in (False, True, False):
        health["degraded"] = degraded
        task = asyncio.create_task(reader.read("z1"))
        await clock.run(1.0)
        reasons.append(task.result().fallback_reason)
    assert reasons == [
        "redis: DeadlineExceeded: deadline of 1s exceeded",
        "redis: DeadlineExceeded: deadline of 0.1s exceeded",
        "redis: DeadlineExceeded: deadline of 1s exceeded",
    ]


async def test_all_down_serves_remembered_value_with_age(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    reader = make(clock, redis, db, default=lambda key: "default")
    assert (await reader.read("z1")).source == "redis"
    clock.advance(42.0)
    redis.error = ConnectionError("down")
    db.data.clear()
    out = await reader.read("z1")
    assert (out.value, out.source, out.freshness, out.confidence) == ("10", "memory", "very_stale", "low")
    assert out.age == pytest.approx(42.0)
    assert out.fallback_reason == "redis: ConnectionError: down; database: miss"
    assert reader.stats().served["memory"] == 1


async def test_value_served_by_later_tier_is_remembered(clock: FakeClock) -> None:
    redis, db = Store(clock), Store(clock, {"z1": "9"})
    reader = make(clock, redis, db)
    await reader.read("z1")
    db.error = OSError("db gone")
    out = await reader.read("z1")
    assert (out.value, out.source, out.age) == ("9", "memory", 0.0)


async def test_remember_false_goes_to_default(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock)
    reader = make(clock, redis, db, default=lambda key: "d", remember=False)
    await reader.read("z1")
    redis.data.clear()
    out = await reader.read("z1")
    assert out.source == "default"
    assert reader.stats().remembered == 0


async def test_nothing_remembered_serves_default_flagged_low(clock: FakeClock) -> None:
    redis, db = Store(clock), Store(clock)
    redis.error = ConnectionError("down")
    reader = make(clock, redis, db, default=lambda key: f"default-{key}")
    out = await reader.read("z9")
    assert (out.value, out.source, out.freshness, out.confidence) == (
        "default-z9",
        "default",
        "default",
        "low",
    )
    assert out.age is None
    assert out.degraded
    assert out.fallback_reason == "redis: ConnectionError: down; database: miss"


async def test_no_default_raises_all_fallbacks_failed_with_every_cause(clock: FakeClock) -> None:
    redis, db = Store(clock), Store(clock)
    boom = ConnectionError("down")
    redis.error = boom
    reader = make(clock, redis, db)
    with pytest.raises(AllFallbacksFailed) as info:
        await reader.read("z1")
    causes = info.value.causes
    assert [name for name, _ in causes] == ["redis", "database"]
    assert causes[0][1] is boom
    assert isinstance(causes[1][1], Decline)
    assert info.value.name == "pricing"
    assert reader.stats().unanswered == 1


async def test_lru_bound_drops_least_recently_used(clock: FakeClock) -> None:
    redis, db = Store(clock, {"a": "A", "b": "B", "c": "C"}), Store(clock)
    reader = make(clock, redis, db, default=lambda key: "-", max_remembered=2)
    await reader.read("a")
    await reader.read("b")
    redis.error = ConnectionError("down")
    assert (await reader.read("a")).source == "memory"  # touching a makes b the oldest
    redis.error = None
    await reader.read("c")  # evicts b
    assert reader.stats().remembered == 2
    redis.error = ConnectionError("down")
    got = {k: (await reader.read(k)).source for k in "abc"}
    assert got == {"a": "memory", "b": "default", "c": "memory"}


async def test_cancellation_propagates_without_falling_through(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    redis.hang = True
    defaults: list[str] = []

    def default(key: str) -> str:
        defaults.append(key)
        return "d"

    reader = make(clock, redis, db, default=default)
    task = asyncio.create_task(reader.read("z1"))
    await clock.run(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.reads == 0
    assert defaults == []
    assert sum(reader.stats().served.values()) == 0


async def test_outer_deadline_cancels_as_deadline_exceeded(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z1": "10"}), Store(clock, {"z1": "9"})
    redis.hang = True
    reader = make(clock, redis, db, default=lambda key: "d")

    async def bounded() -> object:
        async with deadline(0.2, clock=clock):
            return await reader.read("z1")

    task = asyncio.create_task(bounded())
    await clock.run(0.2)
    with pytest.raises(DeadlineExceeded):
        await task
    assert db.reads == 0


async def test_concurrent_reads_of_1000_keys(clock: FakeClock) -> None:
    keys = [f"k{i}" for i in range(1000)]

    class Yielding(Store):
        async def get(self, key: str) -> str | None:
            await asyncio.sleep(0)
            return await super().get(key)

    redis = Yielding(clock, {k: f"r-{k}" for k in keys[::2]})
    db = Yielding(clock, {k: f"d-{k}" for k in keys})
    reader = make(clock, redis, db)
    results = await asyncio.gather(*(reader.read(k) for k in keys))
    for i, (key, out) in enumerate(zip(keys, results, strict=True)):
        expected = ("r-" if i % 2 == 0 else "d-") + key
        assert out.value == expected
        assert out.source == ("redis" if i % 2 == 0 else "database")
    stats = reader.stats()
    assert stats.served["redis"] == 500
    assert stats.served["database"] == 500
    assert stats.misses["redis"] == 500
    assert stats.remembered == 1000


async def test_first_tier_serving_emits_no_event(clock: FakeClock, bus: EventBus) -> None:
    seen: list[FallbackServed] = []
    bus.subscribe(seen.append, FallbackServed)
    reader = make(clock, Store(clock, {"z": "1"}), Store(clock), bus=bus)
    await reader.read("z")
    assert seen == []


async def test_forget_drops_remembered_value(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z": "1"}), Store(clock)
    reader = make(clock, redis, db, default=lambda key: "d")
    await reader.read("z")
    reader.forget("z")
    redis.data.clear()
    assert (await reader.read("z")).source == "default"


async def test_infinite_timeout_means_none(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z": "1"}), Store(clock)
    reader = make(clock, redis, db, redis_timeout=math.inf)
    assert (await reader.read("z")).source == "redis"


async def test_nonpositive_callable_timeout_is_a_tier_failure(clock: FakeClock) -> None:
    redis, db = Store(clock, {"z": "1"}), Store(clock, {"z": "2"})
    reader = make(clock, redis, db, redis_timeout=lambda: 0.0)
    out = await reader.read("z")
    assert out.source == "database"
    assert redis.reads == 0
    assert out.fallback_reason is not None
    assert "DeadlineExceeded" in out.fallback_reason


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"redis_timeout": 0.0}, "tiers[0].timeout"),
        ({"redis_timeout": math.nan}, "tiers[0].timeout"),
        ({"max_remembered": 0}, "max_remembered"),
    ],
)
def test_bad_config_names_the_key(clock: FakeClock, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(clock, Store(clock), Store(clock), **kwargs)
    assert info.value.key == key


def test_tier_names_must_be_unique_and_not_reserved(clock: FakeClock) -> None:
    store = Store(clock)
    with pytest.raises(ConfigError):
        TieredReader("r", [Tier("a", store.get, "x", 1.0), Tier("a", store.get, "y", 1.0)], clock=clock)
    with pytest.raises(ConfigError):
        TieredReader("r", [Tier("memory", store.get, "x", 1.0)], clock=clock)
    with pytest.raises(ConfigError):
        TieredReader[str]("r", [], clock=clock)
