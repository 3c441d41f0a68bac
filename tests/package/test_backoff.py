"""Every exponential backoff in brownout, driven through a million failures: finite, capped, growing.

A backoff is computed after a failure, so the longest outages give it the largest failure counts. Each
test here draws failure counts up to 10**6 (a database down for weeks at a one-second retry) and checks
the component's *own* backoff code: the wait is a finite number between 0 and the cap (plus the jitter
where one is added), it never shrinks as failures accumulate when jitter is off, and it equals the plain
formula ``min(cap, base * multiplier ** (failures - 1))`` wherever floats can compute that formula.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from brownout.chaos.servers import RedisServer
from brownout.durable.outbox import EventOutbox
from brownout.durable.spool import Spool, SpoolReplayer
from brownout.errors import GuardFailed
from brownout.events import EventBus
from brownout.llm.guard import GuardConfig, JSONGuard
from brownout.llm.local import LocalModelServer
from brownout.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from brownout.policies.retry import Retry, RetryConfig, capped_exponential
from brownout.recovery.actions import BackoffSpec
from brownout.state.breaker import RedisBreakers
from brownout.testing import FakeClock
from support.wait import until

FAILURES = st.integers(0, 10**6)
EXPONENTS = st.integers(-10, 10**9) | st.floats(-10.0, 1e9, allow_nan=False)
SECONDS = st.floats(0.0, 1e6, allow_nan=False)
MULTIPLIERS = st.floats(0.0, 100.0, allow_nan=False)


def formula(base: float, multiplier: float, exponent: float, cap: float) -> float | None:
    """``min(cap, base * multiplier ** exponent)`` the plain way, or None where floats cannot compute it."""
    try:
        return min(cap, base * multiplier ** max(0.0, exponent))
    except OverflowError:
        return None


def expected_wait(base: float, multiplier: float, exponent: float, cap: float) -> float:
    """What a backoff must wait: the plain formula, or the cap where the formula overflows (it is then
    far beyond any cap these tests draw, unless the base is 0)."""
    exact = formula(base, multiplier, exponent, cap)
    if exact is None:
        return cap if base > 0 else 0.0
    return exact


def assert_formula(result: float, expected: float | None) -> None:
    """``result`` is the plain formula's value wherever that one is computable (to float rounding)."""
    if expected is not None and not math.isnan(expected):
        assert math.isclose(result, expected, rel_tol=1e-12, abs_tol=0.0), (result, expected)


# -- the shared function ------------------------------------------------------------------------------


@given(
    base=SECONDS,
    multiplier=MULTIPLIERS,
    exponent=EXPONENTS,
    cap=SECONDS | st.just(math.inf),
)
@example(base=1.0, multiplier=2.0, exponent=10**9, cap=30.0)
@example(base=1.0, multiplier=2.0, exponent=1024, cap=math.inf)
@example(base=5e-324, multiplier=2.0, exponent=2000, cap=1e6)
@example(base=1e6, multiplier=2.0, exponent=3, cap=1.0)
def test_capped_exponential_never_raises_and_stays_in_bounds(
    base: float, multiplier: float, exponent: float, cap: float
) -> None:
    result = capped_exponential(base, multiplier, exponent, cap)
    assert isinstance(result, float)
    assert 0.0 <= result <= cap
    if cap != math.inf:
        assert math.isfinite(result)
    assert_formula(result, formula(base, multiplier, exponent, cap))


@given(
    base=st.floats(1e-9, 1e3),
    multiplier=st.floats(1.0, 100.0),
    cap=st.floats(0.0, 1e6) | st.just(math.inf),
    a=st.integers(0, 10**9),
    b=st.integers(0, 10**9),
)
def test_capped_exponential_never_shrinks_as_the_exponent_grows(
    base: float, multiplier: float, cap: float, a: int, b: int
) -> None:
    low, high = sorted((a, b))
    assert capped_exponential(base, multiplier, low, cap) <= capped_exponential(base, multiplier, high, cap)


@given(base=st.floats(1e-9, 1e3), multiplier=st.floats(1.0 + 1e-6, 100.0), cap=st.floats(1e-9, 1e6))
def test_capped_exponential_reaches_the_cap(base: float, multiplier: float, cap: float) -> None:
    assert capped_exponential(base, multiplier, 10**9, cap) == cap


@given(base=st.floats(0.0, 1e6), multiplier=st.floats(0.0, 1.0, exclude_max=True), n=st.integers(1, 10**9))
def test_a_multiplier_below_one_shrinks_towards_zero(base: float, multiplier: float, n: int) -> None:
    cap = 2 * base
    result = capped_exponential(base, multiplier, n, cap)
    assert 0.0 <= result <= base
    assert capped_exponential(base, multiplier, n + 1, cap) <= result


@given(base=st.floats(1.0, 1e6), cap=st.floats(0.0, 1.0, exclude_max=True), n=st.integers(0, 10**9))
def test_a_base_above_the_cap_gives_the_cap(base: float, cap: float, n: int) -> None:
    assert capped_exponential(base, 2.0, n, cap) == cap


def test_exact_where_the_formula_is_exact() -> None:
    # Whole seconds doubling: the plain formula, bit for bit, until the cap.
    assert [capped_exponential(1.0, 2.0, n, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert capped_exponential(0.5, 3.0, 4, math.inf) == 0.5 * 3.0**4
    assert capped_exponential(1.0, 2.0, -3, 30.0) == 1.0  # a negative exponent counts as 0


def test_exponents_beyond_the_float_range_give_the_cap() -> None:
    # An attempt counter is an int: 2 ** n on ints never overflows but gets huge; float(n) would raise.
    assert capped_exponential(1.0, 2.0, 10**400, 30.0) == 30.0
    assert capped_exponential(1.0, 2.0, 10**400, math.inf) == math.inf
    assert capped_exponential(1.0, 0.5, 10**400, 30.0) == 0.0
    assert capped_exponential(1.0, 2.0, math.inf, 30.0) == 30.0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ((-1.0, 2.0, 1, 30.0), "base=-1.0"),
        ((1.0, -2.0, 1, 30.0), "multiplier=-2.0"),
        ((1.0, 2.0, 1, -30.0), "cap=-30.0"),
        ((math.nan, 2.0, 1, 30.0), "base=nan"),
        ((1.0, math.nan, 1, 30.0), "multiplier=nan"),
        ((1.0, 2.0, math.nan, 30.0), "exponent=nan"),
        ((1.0, 2.0, 1, math.nan), "cap=nan"),
    ],
)
def test_meaningless_arguments_are_refused_by_name(
    args: tuple[float, float, float, float], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        capped_exponential(*args)


# -- each component's own backoff ------------------------------------------------------------------------


def check_waits(
    wait_after: Callable[[int], float],
    failures: tuple[int, int],
    *,
    base: float,
    multiplier: float,
    cap: float,
    jitter: float = 0.0,
) -> None:
    """The contract of a backoff after ``n`` failures in a row, for two counts drawn by hypothesis.

    ``wait_after(n)`` drives the component's own code. Without jitter the wait is the plain formula
    (exponent ``n - 1``; none before the first failure) and does not shrink as ``n`` grows; with jitter
    it lies between the formula and the formula plus ``jitter``.
    """
    waits = {}
    for n in failures:
        wait = waits[n] = wait_after(n)
        assert math.isfinite(wait), (n, wait)
        assert 0.0 <= wait <= cap + jitter, (n, wait)
        exact = expected_wait(base, multiplier, n - 1, cap)
        if jitter == 0.0:
            assert_formula(wait, exact)
        else:
            assert exact * (1 - 1e-12) <= wait <= exact * (1 + 1e-12) + jitter, (n, wait, exact)
    if jitter == 0.0:
        low, high = sorted(failures)
        assert waits[low] <= waits[high], waits


TWO_COUNTS = st.tuples(FAILURES, FAILURES)
BASES = st.floats(1e-6, 100.0)
GROWTH = st.floats(1.0, 10.0)
EXTRA = st.floats(0.0, 1e4)  # how far the cap lies above the base


class Boom(Exception):
    pass


@given(base=BASES, multiplier=GROWTH, extra=EXTRA, counts=TWO_COUNTS, full_jitter=st.booleans())
@example(base=1.0, multiplier=2.0, extra=29.0, counts=(1025, 10**6), full_jitter=False)
def test_retry_backoff(
    base: float, multiplier: float, extra: float, counts: tuple[int, int], full_jitter: bool
) -> None:
    cap = base + extra
    config = RetryConfig(
        max_attempts=10**6 + 2,
        backoff_base=base,
        backoff_multiplier=multiplier,
        backoff_max=cap,
        jitter="full" if full_jitter else "none",
        budget_ratio=None,
    )
    retry = Retry("backoff", config, clock=FakeClock(), events=EventBus(), rng=random.Random(7))

    def wait_after(n: int) -> float:
        # The retry's engine after failed attempt n (its attempts count from 1).
        delay = retry._after_failure(Boom("down"), max(1, n))
        assert delay is not None
        return delay

    if full_jitter:  # uniform(0, backoff): bounded by the backoff itself
        for n in counts:
            ceiling = expected_wait(base, multiplier, max(1, n) - 1, cap)
            assert 0.0 <= wait_after(n) <= ceiling * (1 + 1e-12)
    else:
        check_waits(lambda n: wait_after(max(1, n)), counts, base=base, multiplier=multiplier, cap=cap)


@given(
    initial=st.floats(0.0, 100.0),
    factor=st.floats(0.5, 10.0),
    extra=EXTRA,
    counts=TWO_COUNTS,
)
def test_recovery_download_and_reload_backoff(
    initial: float, factor: float, extra: float, counts: tuple[int, int]
) -> None:
    spec = BackoffSpec(
        max_attempts=10**6 + 2, initial_delay=initial, backoff_factor=factor, max_delay=initial + extra
    )
    retry = spec.retry("recovery.download", clock=FakeClock(), events=EventBus())

    def wait_after(n: int) -> float:
        delay = retry._after_failure(Boom("mirror down"), max(1, n))
        assert delay is not None
        return delay

    # A factor below 1 would shrink the waits; the spec takes it as 1 (no growth).
    multiplier = max(1.0, factor)
    check_waits(
        lambda n: wait_after(max(1, n)), counts, base=initial, multiplier=multiplier, cap=initial + extra
    )


@pytest.fixture(scope="module")
def never_opened(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file name for spools these tests build but never open (their backoff needs no file)."""
    return tmp_path_factory.mktemp("backoff") / "never-opened.db"


@given(interval=BASES, multiplier=GROWTH, extra=EXTRA, counts=TWO_COUNTS)
@example(interval=1.0, multiplier=2.0, extra=59.0, counts=(1025, 10**6))
def test_spool_replayer_backoff(
    never_opened: Path, interval: float, multiplier: float, extra: float, counts: tuple[int, int]
) -> None:
    spool = Spool(never_opened, clock=FakeClock())
    replayer = SpoolReplayer(
        spool, sink=_never_called, interval=interval, max_interval=interval + extra, multiplier=multiplier
    )

    def wait_after(n: int) -> float:
        replayer._failures = n
        return replayer._backoff()

    check_waits(wait_after, counts, base=interval, multiplier=multiplier, cap=interval + extra)


@given(interval=BASES, extra=EXTRA, counts=TWO_COUNTS)
def test_event_outbox_backoff(
    never_opened: Path, interval: float, extra: float, counts: tuple[int, int]
) -> None:
    outbox = EventOutbox(
        never_opened,
        publisher=_NoPublisher(),
        events=EventBus(),
        clock=FakeClock(),
        retry_interval=interval,
        max_retry_interval=interval + extra,
    )

    def wait_after(n: int) -> float:
        outbox.replayer._failures = n
        return outbox.replayer._backoff()

    check_waits(wait_after, counts, base=interval, multiplier=2.0, cap=interval + extra)


@given(base=st.floats(0.0, 100.0), cap=st.floats(0.0, 1e4), jitter=st.floats(0.0, 10.0), counts=TWO_COUNTS)
@example(base=1.0, cap=30.0, jitter=0.0, counts=(1025, 10**6))
def test_json_guard_backoff(base: float, cap: float, jitter: float, counts: tuple[int, int]) -> None:
    config = GuardConfig(backoff_base=base, backoff_max=cap, jitter=jitter, repair=False)
    guard = JSONGuard("brief", _Answer, config, clock=FakeClock(), events=EventBus(), rng=random.Random(3))
    # The guard's waits count re-asks from 1, like failures.
    check_waits(
        lambda n: guard._backoff(max(1, n)),
        (max(1, counts[0]), max(1, counts[1])),
        base=base,
        multiplier=2.0,
        cap=cap,
        jitter=jitter,
    )


@given(base=st.floats(0.0, 100.0), extra=EXTRA, counts=TWO_COUNTS)
# The supervisor used to stop doubling after 32 failures: a tiny base never reached its cap.
@example(base=1e-12, extra=1000.0, counts=(60, 10**6))
def test_local_model_supervisor_restart_backoff(
    never_opened: Path, base: float, extra: float, counts: tuple[int, int]
) -> None:
    model = never_opened.with_name("model.gguf")
    model.touch()  # the constructor checks that the model file exists; nothing starts here
    server = LocalModelServer(
        "generator",
        port=1,
        model_path=model,
        clock=FakeClock(),
        events=EventBus(),
        restart_backoff_base=base,
        restart_backoff_max=base + extra,
    )

    def wait_after(n: int) -> float:
        server._failures = n
        return server._backoff_delay()

    check_waits(wait_after, counts, base=base, multiplier=2.0, cap=base + extra)


@given(open_wait=st.floats(1e-3, 1e3), multiplier=GROWTH, extra=st.none() | EXTRA, counts=TWO_COUNTS)
@example(open_wait=1.0, multiplier=2.0, extra=9.0, counts=(1025, 10**6))
def test_breaker_open_wait(
    open_wait: float, multiplier: float, extra: float | None, counts: tuple[int, int]
) -> None:
    config = BreakerConfig(
        open_wait=open_wait,
        open_wait_multiplier=multiplier,
        open_wait_max=None if extra is None else open_wait + extra,
    )
    clock = FakeClock(start=0.0)  # the open wait is then exactly the time the breaker opens until
    breaker = CircuitBreaker("model", config, clock=clock, events=EventBus())

    def wait_after(n: int) -> float:
        # The breaker's own opening, as a failed probe would trigger it, after n - 1 opens in a row.
        breaker._consecutive_opens = max(1, n) - 1
        breaker._open("probe failed")
        assert breaker.state is BreakerState.OPEN
        return breaker.retry_after()

    counts = (max(1, counts[0]), max(1, counts[1]))
    check_waits(wait_after, counts, base=open_wait, multiplier=multiplier, cap=config.open_wait_cap)


@settings(max_examples=50, deadline=None)
@given(open_wait=st.floats(1e-3, 1e3), multiplier=GROWTH, extra=EXTRA, counts=TWO_COUNTS)
@example(open_wait=1.0, multiplier=2.0, extra=9.0, counts=(1025, 10**6))
async def test_shared_breaker_open_wait(
    redis_server: RedisServer, open_wait: float, multiplier: float, extra: float, counts: tuple[int, int]
) -> None:
    """The shared breaker computes its open wait in a Redis script: the same contract, in Lua's floats."""
    redis_server.ensure_running()
    client: Redis = Redis.from_url(
        redis_server.url, retry=RedisRetry(NoBackoff(), 0), socket_connect_timeout=1
    )
    try:
        config = BreakerConfig(
            open_wait=open_wait, open_wait_multiplier=multiplier, open_wait_max=open_wait + extra
        )
        registry = RedisBreakers(
            client, prefix=f"test:backoff:{uuid.uuid4().hex}", clock=FakeClock(start=0.0)
        )
        breaker = registry.breaker("model", config)
        state_key = breaker._keys[0]

        async def wait_after(n: int) -> float:
            # Half-open after n - 1 opens in a row; the probe fails and the script opens it the n-th time.
            await client.hset(state_key, mapping={"state": "half_open", "gen": 1, "opens": max(1, n) - 1})
            reply = await registry._run(
                registry._record, breaker, registry._record_args(breaker, 1, 0, 1, "")
            )
            assert reply is not None, registry.last_error
            assert reply[0] == b"open"
            return float(reply[2])  # open until, on a clock at 0: the wait

        waits = {n: await wait_after(n) for n in counts}
        # Redis keeps numbers as text with 14 significant digits: compare to that precision.
        for n, wait in waits.items():
            assert 0.0 < wait <= config.open_wait_cap * (1 + 1e-13)
            exact = expected_wait(open_wait, multiplier, max(1, n) - 1, config.open_wait_cap)
            assert math.isclose(wait, exact, rel_tol=1e-13), (n, wait, exact)
        low, high = sorted(counts)
        assert waits[low] <= waits[high]
        await registry.aclose()
    finally:
        await client.aclose()


class _Answer(BaseModel):
    ok: bool


class _NoPublisher:
    """An outbox publisher the backoff tests never reach (nothing is published)."""

    async def publish(self, events: list[tuple[str, str, dict[str, Any]]], /) -> None:
        raise AssertionError("the backoff tests publish nothing")


async def _never_called(key: str, kind: str, payload: dict[str, Any]) -> None:
    raise AssertionError("the backoff tests replay nothing")


# -- long outages, end to end ------------------------------------------------------------------------------

# Past 1,024 failures in a row ``2.0 ** failures`` no longer fits in a float: the old replayer died here.
LONG_OUTAGE = 1_100


async def test_spool_replayer_outlives_a_long_outage_and_delivers(tmp_path: Path) -> None:
    clock = FakeClock(start=0.0, autojump=True)  # each backoff passes at once, in fake time
    spool = Spool(tmp_path / "spool.db", clock=clock, events=EventBus(), max_attempts=None)
    delivered: list[str] = []
    done = asyncio.Event()
    failures = 0

    async def database(key: str, kind: str, payload: dict[str, Any]) -> None:
        nonlocal failures
        if failures < LONG_OUTAGE:
            failures += 1
            raise ConnectionError("database down")
        delivered.append(key)
        done.set()

    replayer = SpoolReplayer(spool, database, interval=1.0, max_interval=60.0, multiplier=2.0)
    try:
        await spool.append("brief-1", "brief", {"text": "acknowledged before the outage"})
        replayer.start()
        task = replayer._task
        assert task is not None
        finished, _ = await asyncio.wait(
            [asyncio.ensure_future(done.wait()), task], timeout=120, return_when=asyncio.FIRST_COMPLETED
        )
        assert task not in finished, task.exception() if task.done() else "replayer stopped"
        assert done.is_set(), f"not delivered after {failures} failures"
        assert delivered == ["brief-1"]
        assert replayer.running
        # Every wait between attempts was on the schedule: doubling from 1 s, then 60 s to the end.
        waits = [w for w in clock.sleeps if w > 0]
        assert waits[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
        assert len(waits) == LONG_OUTAGE
        assert set(waits[6:]) == {60.0}
        await until(
            lambda: spool.pending == 0 and replayer.consecutive_failures == 0,
            "an empty spool",
            timeout=20,
            interval=0,
        )
    finally:
        await replayer.aclose()
        await spool.aclose()


async def test_retry_keeps_its_schedule_through_a_long_outage() -> None:
    clock = FakeClock(start=0.0, autojump=True)
    config = RetryConfig(
        max_attempts=LONG_OUTAGE + 1, backoff_base=0.5, backoff_max=30.0, jitter="none", budget_ratio=None
    )
    retry = Retry("database", config, clock=clock, events=EventBus())
    calls = 0

    async def database() -> str:
        nonlocal calls
        calls += 1
        if calls <= LONG_OUTAGE:
            raise ConnectionError("database down")
        return "written"

    assert await retry.call(database) == "written"
    assert calls == LONG_OUTAGE + 1
    assert clock.sleeps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert len(clock.sleeps) == LONG_OUTAGE
    assert set(clock.sleeps[6:]) == {30.0}


async def test_json_guard_keeps_its_schedule_through_a_long_run_of_bad_answers() -> None:
    clock = FakeClock(start=0.0, autojump=True)
    config = GuardConfig(
        max_retries=LONG_OUTAGE, backoff_base=0.5, backoff_max=30.0, jitter=0.25, repair=False
    )
    guard = JSONGuard("brief", _Answer, config, clock=clock, events=EventBus(), rng=random.Random(5))
    asked = 0

    async def model(messages: list[Any], max_tokens: int, response_format: dict[str, Any] | None) -> str:
        nonlocal asked
        asked += 1
        return "not JSON at all"

    with pytest.raises(GuardFailed) as failed:
        await guard.run(model, [{"role": "user", "content": "a fresh citrus scent"}])
    assert asked == LONG_OUTAGE + 1
    assert failed.value.attempts == LONG_OUTAGE + 1
    assert len(clock.sleeps) == LONG_OUTAGE
    # Doubling from 0.5 s up to 30 s, each plus at most 0.25 s of jitter.
    for n, wait in enumerate(clock.sleeps, start=1):
        floor = min(30.0, 0.5 * 2.0 ** min(n - 1, 10))
        assert floor <= wait <= floor + 0.25, (n, wait)
