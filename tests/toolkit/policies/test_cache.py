"""Cache: LRU + TTL, stale-while-revalidate, stale-if-error, XFetch early refresh, stampede protection."""

from __future__ import annotations

import asyncio
import gc
import math
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from brownout.errors import ConfigError
from brownout.events import CacheRefreshFailed, Event, EventBus
from brownout.policies.cache import Cache, CacheConfig, CacheResult, CacheStats
from brownout.testing import FakeClock
from support.wait import settle


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports to its exception handler (e.g. "exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


class FixedRandom(random.Random):
    """An rng whose every draw is ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.value


class Compute:
    """A computation that counts its runs, optionally waits for a gate, and returns or raises."""

    def __init__(self, value: object = "new", *, error: Exception | None = None, gated: bool = False) -> None:
        self.value = value
        self.error = error
        self.runs = 0
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self) -> object:
        self.runs += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


def make(
    clock: FakeClock, bus: EventBus | None = None, rng: random.Random | None = None, **cfg: Any
) -> Cache[str, Any]:
    return Cache("test", CacheConfig(**cfg), clock=clock, events=bus or EventBus(), rng=rng)


# -- config ---------------------------------------------------------------------------------------


def test_defaults_are_seed_004() -> None:
    cfg = CacheConfig()
    assert (cfg.max_entries, cfg.ttl, cfg.sweep_interval) == (1000, 600.0, 60.0)
    assert (cfg.stale_while_revalidate, cfg.stale_if_error, cfg.early_refresh_beta) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_entries", 0),
        ("ttl", -1),
        ("ttl", 0),
        ("sweep_interval", 0),
        ("stale_while_revalidate", -0.5),
        ("stale_if_error", -1),
        ("early_refresh_beta", -1),
        ("no_such_key", 1),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        CacheConfig(**{field: value})


def test_bad_per_call_ttl_is_rejected(clock: FakeClock) -> None:
    cache = make(clock)
    with pytest.raises(ConfigError, match="ttl"):
        cache.set("k", 1, ttl=0)
    assert len(cache) == 0


# -- LRU, TTL and stats ---------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_and_counts(clock: FakeClock) -> None:
    cache = make(clock, max_entries=3)
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("c", 3)
    assert cache.get("a") == 1  # a becomes most recent; b is now the oldest
    cache.set("d", 4)
    assert "b" not in cache
    assert [k for k in ("a", "b", "c", "d") if k in cache] == ["a", "c", "d"]
    cache.set("c", 33)  # overwriting refreshes recency without evicting
    assert cache.stats().evictions == 1
    cache.set("e", 5)  # a is now the oldest
    assert "a" not in cache
    assert cache.get("c") == 33
    assert cache.stats().evictions == 2
    assert len(cache) == 3


def test_seed_004_ttl_scenario(clock: FakeClock) -> None:
    cache = make(clock, max_entries=100, ttl=5)
    cache.set("test_key", "test_value")
    assert cache.get("test_key") == "test_value"
    clock.advance(6)
    assert cache.get("test_key") is None
    assert len(cache) == 0  # removed lazily by the lookup
    cache.set("test_key", "test_value_2")
    assert cache.get("test_key") == "test_value_2"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.expirations) == (2, 1, 1)


def test_expiry_boundary_and_per_entry_ttl(clock: FakeClock) -> None:
    cache = make(clock, ttl=10)
    cache.set("default", 1)
    cache.set("short", 2, ttl=1)
    clock.advance(1)
    assert "short" not in cache  # exactly at expiry it is no longer fresh
    assert "default" in cache
    clock.advance(8.999)
    assert cache.peek("default") == 1
    clock.advance(0.001)
    assert cache.peek("default") is None


def test_stats_are_exact(clock: FakeClock) -> None:
    cache = make(clock, max_entries=4, ttl=10)
    assert cache.stats() == CacheStats(
        hits=0,
        misses=0,
        evictions=0,
        expirations=0,
        stale_served=0,
        refreshes=0,
        refresh_failures=0,
        size=0,
        max_entries=4,
        utilisation=0.0,
        ttl=10.0,
    )
    for key in "abcde":
        cache.set(key, key)
    assert cache.get("a") is None  # evicted
    assert cache.get("b") == "b"
    assert cache.get("e") == "e"
    assert cache.peek("c") == "c"  # peek and `in` do not count
    assert "d" in cache
    clock.advance(10)
    assert cache.get("b") is None  # expired
    assert cache.stats() == CacheStats(
        hits=2,
        misses=2,
        evictions=1,
        expirations=1,
        stale_served=0,
        refreshes=0,
        refresh_failures=0,
        size=3,
        max_entries=4,
        utilisation=0.75,
        ttl=10.0,
    )


def test_delete_and_clear(clock: FakeClock) -> None:
    cache = make(clock)
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert "a" not in cache
    cache.clear()
    assert len(cache) == 0
    assert cache.get("b") is None


def test_sweep_removes_only_entries_past_their_stale_window(clock: FakeClock) -> None:
    cache = make(clock, ttl=10, stale_while_revalidate=5, stale_if_error=20)
    cache.set("old", 1, ttl=1)
    cache.set("young", 2)
    clock.advance(2)
    assert cache.sweep() == 0  # "old" expired but may still be served stale for 20 s
    assert len(cache) == 2
    clock.advance(19)  # old: expired 20 s ago; young: expired 11 s ago
    assert cache.sweep() == 1
    assert len(cache) == 1
    assert cache.get("young") is None  # stale, not served by get, but kept
    assert len(cache) == 1
    clock.advance(9)
    assert cache.get("young") is None  # now past its window: removed lazily
    assert len(cache) == 0
    assert cache.stats().expirations == 2


async def test_sweeper_runs_on_clock_time_and_aclose_stops_it(clock: FakeClock) -> None:
    cache = make(clock, ttl=30, sweep_interval=60)
    cache.start()
    cache.start()  # idempotent
    cache.set("a", 1)
    await clock.run(59)
    assert len(cache) == 1  # expired at 30 s, but no sweep has run yet
    await clock.run(1)
    assert len(cache) == 0
    assert cache.stats().expirations == 1
    cache.set("b", 2, ttl=90)  # set at 60 s, expires at 150 s
    await clock.run(60)
    assert len(cache) == 1  # the sweep at 120 s keeps it
    await clock.run(60)  # the sweep at 180 s removes it
    assert len(cache) == 0
    await cache.aclose()
    assert clock.pending_timers == 0
    cache.set("c", 3)
    await clock.run(600)
    assert len(cache) == 1  # nothing sweeps any more
    assert cache.stats().expirations == 2


async def test_async_with_starts_and_stops_the_sweeper(clock: FakeClock) -> None:
    async with make(clock, ttl=1, sweep_interval=10) as cache:
        cache.set("a", 1)
        await clock.run(10)
        assert len(cache) == 0
    assert clock.pending_timers == 0


# -- fetch / get_or_compute -----------------------------------------------------------------------


async def test_fetch_miss_then_hit(clock: FakeClock) -> None:
    cache = make(clock, ttl=10)
    compute = Compute("v")
    assert await cache.fetch("k", compute) == CacheResult("v", "miss", 0.0)
    clock.advance(4)
    assert await cache.fetch("k", compute) == CacheResult("v", "hit", 4.0)
    assert await cache.get_or_compute("k", compute) == "v"
    assert compute.runs == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 1)


async def test_fetch_stores_with_per_call_ttl(clock: FakeClock) -> None:
    cache = make(clock, ttl=100)
    await cache.fetch("k", Compute("v"), ttl=2)
    clock.advance(2)
    assert "k" not in cache


async def test_1000_concurrent_cold_misses_compute_once(clock: FakeClock) -> None:
    cache = make(clock)
    compute = Compute({"prediction": 0.7}, gated=True)
    tasks = [asyncio.create_task(cache.get_or_compute("hot", compute)) for _ in range(1000)]
    await settle()
    compute.gate.set()
    results = await asyncio.gather(*tasks)
    assert compute.runs == 1
    assert all(r is results[0] for r in results)
    assert cache.get("hot") == {"prediction": 0.7}
    stats = cache.stats()
    assert (stats.misses, stats.hits) == (1000, 1)


async def test_concurrent_miss_statuses(clock: FakeClock) -> None:
    cache = make(clock)
    compute = Compute("v", gated=True)
    tasks = [asyncio.create_task(cache.fetch("k", compute)) for _ in range(50)]
    await settle()
    compute.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.status for r in results} == {"miss"}
    assert compute.runs == 1


async def test_value_is_cached_even_if_every_caller_is_cancelled(clock: FakeClock) -> None:
    cache = make(clock)
    compute = Compute("v", gated=True)
    tasks = [asyncio.create_task(cache.get_or_compute("k", compute)) for _ in range(10)]
    await settle()
    for task in tasks:
        task.cancel()
    await settle()
    compute.gate.set()
    await settle()
    assert cache.peek("k") == "v"
    assert compute.runs == 1


async def test_compute_error_propagates_without_stale_value(clock: FakeClock) -> None:
    cache = make(clock, ttl=10)
    with pytest.raises(RuntimeError, match="down"):
        await cache.fetch("k", Compute(error=RuntimeError("down")))
    assert len(cache) == 0
    assert await cache.get_or_compute("k", Compute("v")) == "v"  # the next call computes again


async def test_compute_time_is_measured_on_the_clock(clock: FakeClock) -> None:
    # -ln(1 - r) = 1, so early refresh fires within delta * beta = delta seconds of expiry.
    rng = FixedRandom(1 - math.exp(-1))
    cache = make(clock, rng=rng, ttl=200)

    async def slow() -> str:
        clock.advance(3)  # the computation takes 3 s of clock time
        return "v"

    await cache.fetch("k", slow)
    expires_at = clock.now() + 200
    clock.advance(200 - 3 * 37 - 1)
    refresh = Compute("new")
    await cache.fetch("k", refresh)
    assert rng.draws == 0  # too far from expiry for any draw to fire: none is made
    clock.advance(expires_at - 3.1 - clock.now())
    await cache.fetch("k", refresh)
    await settle()
    assert rng.draws == 1
    assert refresh.runs == 0
    clock.advance(0.2)  # 2.9 s before expiry
    await cache.fetch("k", refresh)
    await settle()
    assert refresh.runs == 1


# -- stale-while-revalidate -----------------------------------------------------------------------


async def test_stale_while_revalidate_serves_stale_with_one_refresh(clock: FakeClock) -> None:
    cache = make(clock, ttl=10, stale_while_revalidate=5)
    cache.set("k", "old")
    clock.advance(12)
    refresh = Compute("new", gated=True)
    results = await asyncio.gather(*(cache.fetch("k", refresh) for _ in range(1000)))
    assert all(r == CacheResult("old", "stale", 12.0) for r in results)
    await settle()
    assert refresh.runs == 1
    stats = cache.stats()
    assert (stats.refreshes, stats.stale_served, stats.misses) == (1, 1000, 1000)
    refresh.gate.set()
    await settle()
    result = await cache.fetch("k", refresh)
    assert result == CacheResult("new", "hit", 0.0)
    assert refresh.runs == 1


async def test_outside_the_stale_window_the_caller_waits_for_the_computation(clock: FakeClock) -> None:
    cache = make(clock, ttl=10, stale_while_revalidate=5)
    cache.set("k", "old")
    clock.advance(15)
    assert await cache.fetch("k", Compute("new")) == CacheResult("new", "miss", 0.0)
    assert cache.stats().expirations == 1


async def test_failed_background_refresh_keeps_the_old_value(
    clock: FakeClock, bus: EventBus, loop_errors: list[dict[str, Any]]
) -> None:
    events: list[Event] = []
    bus.subscribe(events.append)
    cache = make(clock, bus, ttl=10, stale_while_revalidate=30)
    cache.set("k", "old")
    clock.advance(11)
    failing = Compute(error=ConnectionError("model down"))
    assert (await cache.fetch("k", failing)).status == "stale"
    await settle()
    assert failing.runs == 1
    assert cache.stats().refresh_failures == 1
    assert events == [
        CacheRefreshFailed(
            source="test", at=clock.now(), key="k", error="ConnectionError: model down", served_stale=True
        )
    ]
    # Still served stale, and a new refresh is tried (the previous one is over).
    assert await cache.fetch("k", failing) == CacheResult("old", "stale", 11.0)
    await settle()
    assert failing.runs == 2
    assert cache.stats().refresh_failures == 2
    gc.collect()
    await settle()
    assert loop_errors == []


async def test_aclose_cancels_a_running_refresh(clock: FakeClock, loop_errors: list[dict[str, Any]]) -> None:
    cache = make(clock, ttl=10, stale_while_revalidate=30)
    cache.set("k", "old")
    clock.advance(11)
    hanging = Compute(gated=True)
    await cache.fetch("k", hanging)
    await settle()
    assert hanging.runs == 1
    await cache.aclose()
    await settle()
    assert cache.peek("k") is None
    assert cache.stats().refresh_failures == 0  # cancelled is not failed
    # The cache remains usable and refreshes again.
    assert (await cache.fetch("k", Compute("new"))).status == "stale"
    await settle()
    assert cache.get("k") == "new"
    gc.collect()
    await settle()
    assert loop_errors == []


# -- stale-if-error -------------------------------------------------------------------------------


async def test_stale_if_error_serves_flagged_stale_then_raises_outside_the_window(
    clock: FakeClock, bus: EventBus
) -> None:
    events: list[CacheRefreshFailed] = []
    bus.subscribe(events.append, CacheRefreshFailed)
    cache = make(clock, bus, ttl=10, stale_if_error=30)
    cache.set("k", "old")
    clock.advance(15)
    failing = Compute(error=TimeoutError("slow model"), gated=True)
    tasks = [asyncio.create_task(cache.fetch("k", failing)) for _ in range(100)]
    await settle()
    failing.gate.set()
    results = await asyncio.gather(*tasks)
    assert failing.runs == 1
    assert all(r == CacheResult("old", "stale_error", 15.0) for r in results)
    assert len(events) == 100
    assert events[0].served_stale is True
    assert events[0].error == "TimeoutError: slow model"
    stats = cache.stats()
    assert (stats.stale_served, stats.misses, stats.refreshes) == (100, 100, 0)
    clock.advance(25)  # 40 s after storing: 30 s past expiry, out of the window
    with pytest.raises(TimeoutError):
        await cache.fetch("k", failing)
    assert len(cache) == 0


async def test_stale_if_error_does_not_hide_success(clock: FakeClock) -> None:
    cache = make(clock, ttl=10, stale_if_error=30)
    cache.set("k", "old")
    clock.advance(15)
    assert await cache.fetch("k", Compute("new")) == CacheResult("new", "miss", 0.0)
    assert cache.get("k") == "new"


async def test_without_stale_if_error_an_expired_value_is_not_served(clock: FakeClock) -> None:
    cache = make(clock, ttl=10, stale_while_revalidate=0, stale_if_error=0)
    cache.set("k", "old")
    clock.advance(10)
    with pytest.raises(ValueError, match="bad"):
        await cache.fetch("k", Compute(error=ValueError("bad")))


# -- XFetch early refresh -------------------------------------------------------------------------


def _fires(now: float, delta: float, beta: float, r: float, expires_at: float) -> bool:
    return now - delta * beta * math.log(1.0 - r) >= expires_at


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("remaining", [0.1, 1.0, 2.0, 5.0, 20.0, 90.0])
async def test_xfetch_refreshes_exactly_when_the_formula_says(
    clock: FakeClock, r: float, beta: float, remaining: float
) -> None:
    cache = make(clock, rng=FixedRandom(r), ttl=100, early_refresh_beta=beta)
    delta = 2.0
    cache.set("k", "old", delta=delta)
    expires_at = clock.now() + 100
    clock.advance(100 - remaining)
    refresh = Compute("new")
    result = await cache.fetch("k", refresh)
    assert (result.value, result.status) == ("old", "hit")  # a hit is served either way
    assert result.age == pytest.approx(100 - remaining)
    await settle()
    expected = _fires(clock.now(), delta, beta, r, expires_at)
    assert refresh.runs == int(expected)
    assert cache.stats().refreshes == int(expected)
    assert cache.peek("k") == ("new" if expected else "old")


async def test_xfetch_threshold_with_known_draw(clock: FakeClock) -> None:
    # u = 1 - r = 0.5, so a refresh fires within delta * beta * ln 2 = 2 * ln 2 ~= 1.386 s of expiry.
    cache = make(clock, rng=FixedRandom(0.5), ttl=100)
    cache.set("k", "old", delta=2.0)
    clock.advance(100 - 1.4)
    refresh = Compute("new")
    await cache.fetch("k", refresh)
    await settle()
    assert refresh.runs == 0
    clock.advance(0.02)  # 1.38 s before expiry
    await cache.fetch("k", refresh)
    await settle()
    assert refresh.runs == 1
    assert cache.get("k") == "new"


async def test_xfetch_beta_zero_never_refreshes_early(clock: FakeClock) -> None:
    rng = FixedRandom(0.999999)
    cache = make(clock, rng=rng, ttl=100, early_refresh_beta=0)
    cache.set("k", "old", delta=50.0)
    clock.advance(99.99)
    refresh = Compute("new")
    assert (await cache.fetch("k", refresh)).status == "hit"
    await settle()
    assert refresh.runs == 0
    assert rng.draws == 0


async def test_xfetch_needs_a_compute_time(clock: FakeClock) -> None:
    rng = FixedRandom(0.999999)
    cache = make(clock, rng=rng, ttl=100)
    cache.set("k", "old")  # delta 0: nothing known about the cost, no early refresh
    clock.advance(99.99)
    refresh = Compute("new")
    await cache.fetch("k", refresh)
    await settle()
    assert refresh.runs == 0


async def test_xfetch_starts_one_refresh_for_many_hits(clock: FakeClock) -> None:
    cache = make(clock, rng=FixedRandom(0.9), ttl=100)
    cache.set("k", "old", delta=5.0)
    clock.advance(99)
    refresh = Compute("new", gated=True)
    results = await asyncio.gather(*(cache.get_or_compute("k", refresh) for _ in range(1000)))
    assert results == ["old"] * 1000
    await settle()
    assert refresh.runs == 1
    assert cache.stats().refreshes == 1
    assert cache.stats().hits == 1000
    refresh.gate.set()
    await settle()
    assert cache.peek("k") == "new"


async def test_xfetch_with_a_seeded_rng_matches_the_formula(clock: FakeClock) -> None:
    cache = make(clock, rng=random.Random(42), ttl=10)
    for i in range(30):
        cache.set(f"k{i}", i, delta=1.0)
    expires_at = clock.now() + 10
    clock.advance(9)
    replay = random.Random(42)
    expected = [_fires(clock.now(), 1.0, 1.0, replay.random(), expires_at) for _ in range(30)]
    computes = [Compute(f"new{i}") for i in range(30)]
    for i in range(30):
        assert (await cache.fetch(f"k{i}", computes[i])).status == "hit"
    await settle()
    assert [c.runs == 1 for c in computes] == expected
    # With 1 s left, delta 1 and beta 1 a refresh fires when u <= 1/e: about 37% of draws.
    assert 0 < sum(expected) < 30
    assert cache.stats().refreshes == sum(expected)
