"""The circuit breaker: windows, states, filters, operator controls, forms, events and config."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from brownout.errors import CircuitOpen, ConfigError, Rejected
from brownout.events import BreakerStateChanged, CallRejected, Event, EventBus
from brownout.policies.breaker import (
    BreakerConfig,
    BreakerGroupConfig,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
)
from brownout.testing import FakeClock
from support.wait import settle

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN


class Boom(Exception):
    """The dependency failed."""


async def ok(value: Any = "ok") -> Any:
    return value


async def fail() -> Any:
    raise Boom("down")


def make(clock: FakeClock, bus: EventBus | None = None, name: str = "model", **cfg: Any) -> CircuitBreaker:
    """A breaker on the fake clock and a private bus (never the process-wide one)."""
    return CircuitBreaker(name, BreakerConfig(**cfg), clock=clock, events=bus or EventBus())


async def run(breaker: CircuitBreaker, pattern: str) -> None:
    """Make one call per letter: ``S`` succeeds, ``F`` raises :class:`Boom` (swallowed here)."""
    for letter in pattern:
        if letter == "S":
            assert await breaker.call(ok) == "ok"
        else:
            with pytest.raises(Boom):
                await breaker.call(fail)


class Gate:
    """Calls held in flight until the test releases them with an outcome."""

    def __init__(self) -> None:
        self.events: list[asyncio.Event] = []
        self.outcomes: list[BaseException | None] = []
        self.started = 0

    def fn(self) -> Callable[[], Awaitable[str]]:
        i = len(self.events)
        self.events.append(asyncio.Event())
        self.outcomes.append(None)

        async def held() -> str:
            self.started += 1
            await self.events[i].wait()
            error = self.outcomes[i]
            if error is not None:
                raise error
            return f"held-{i}"

        return held

    def release(self, i: int, error: BaseException | None = None) -> None:
        self.outcomes[i] = error
        self.events[i].set()


async def start(breaker: CircuitBreaker, gate: Gate) -> asyncio.Task[Any]:
    """Start a call held in flight by ``gate`` and let it take its permit."""
    task = asyncio.create_task(breaker.call(gate.fn()))
    await settle()
    return task


async def open_breaker(breaker: CircuitBreaker) -> None:
    """Fail calls until the breaker opens."""
    for _ in range(breaker.config.window_size):
        if breaker.state is OPEN:
            return
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert breaker.state is OPEN


# -- config ------------------------------------------------------------------------------------------


def test_seed_defaults() -> None:
    cfg = BreakerConfig()
    assert cfg.failure_rate_threshold == 0.5
    assert cfg.success_threshold == 5
    assert cfg.open_wait == 60.0
    assert cfg.half_open_max_calls == 3
    assert cfg.slow_call_rate_threshold is None
    assert cfg.window_type == "count"
    assert cfg.open_wait_multiplier == 1.0
    assert cfg.record_exceptions == (Exception,)
    assert cfg.ignore_exceptions == ()
    assert CircuitBreaker().state is CLOSED


def test_state_metric_values() -> None:
    assert BreakerState.CLOSED.metric == 0
    assert BreakerState.OPEN.metric == 1
    assert BreakerState.HALF_OPEN.metric == 2
    assert BreakerState.FORCED_OPEN.metric == 1
    assert BreakerState.FORCED_CLOSED.metric == 0
    assert BreakerState.DISABLED.metric == 0


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": 0}, "slow_call_rate_threshold"),
        ({"slow_call_rate_threshold": 1.01}, "slow_call_rate_threshold"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
        ({"window_size": 0}, "window_size"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"window_size": 10, "minimum_calls": 11}, "minimum_calls"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"open_wait": 0}, "open_wait"),
        ({"open_wait_multiplier": 0.5}, "open_wait_multiplier"),
        ({"open_wait": 60, "open_wait_max": 30}, "open_wait_max"),
        ({"half_open_retry_after": -1}, "half_open_retry_after"),
        ({"window_type": "sliding"}, "window_type"),
        ({"failure_threshold": 0.5}, "failure_threshold"),
        # inf and NaN never mean anything a user wants, and the shared breaker's Lua cannot take them
        ({"open_wait": float("inf")}, "open_wait"),
        ({"open_wait_max": float("inf")}, "open_wait_max"),
        ({"failure_rate_threshold": float("nan")}, "failure_rate_threshold"),
    ],
)
def test_invalid_config_names_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BreakerConfig(**settings)


def test_minimum_calls_may_exceed_seconds_of_a_time_window() -> None:
    # In a time window minimum_calls counts calls, window_size counts seconds: no relation between them.
    cfg = BreakerConfig(window_type="time", window_size=10, minimum_calls=50)
    assert cfg.minimum_calls == 50


def test_config_is_frozen() -> None:
    cfg = BreakerConfig()
    with pytest.raises(ValidationError):
        cfg.open_wait = 1  # type: ignore[misc]


def test_group_default_has_no_override() -> None:
    # Names of dependencies are the application's: the toolkit's default group treats all alike.
    group = BreakerGroupConfig()
    assert group.overrides == {}
    assert group.for_name("qwen") is group.defaults
    assert BreakerRegistry().get("qwen").config == BreakerConfig()


async def test_registry_applies_a_per_name_override(clock: FakeClock, bus: EventBus) -> None:
    group = BreakerGroupConfig(overrides={"qwen": {"failure_rate_threshold": 0.4}})
    registry = BreakerRegistry(group, clock=clock, events=bus)
    qwen, mistral = registry.get("qwen"), registry["mistral"]
    assert qwen.config.failure_rate_threshold == 0.4
    assert mistral.config.failure_rate_threshold == 0.5
    assert qwen.config.success_threshold == 5  # the rest comes from the defaults
    assert registry.get("qwen") is qwen
    assert registry["qwen"] is qwen
    assert dict(registry.all()) == {"qwen": qwen, "mistral": mistral}
    assert qwen.name == "qwen"

    # 4 failures in 10 calls open qwen (0.4) but not mistral (0.5).
    for breaker in (qwen, mistral):
        await run(breaker, "SSSSSSFFFF")
    assert qwen.state is OPEN
    assert mistral.state is CLOSED
    assert registry.available() == ["mistral"]

    registry.reset_all()
    assert qwen.state is CLOSED
    assert registry.available() == ["qwen", "mistral"]


def test_group_config_custom_defaults_and_overrides() -> None:
    group = BreakerGroupConfig(
        defaults=BreakerConfig(open_wait=30, open_wait_max=30),
        overrides={"llama": {"success_threshold": 2}},
    )
    assert group.for_name("llama").success_threshold == 2
    assert group.for_name("llama").open_wait == 30
    assert group.for_name("qwen") is group.defaults  # only the names given are overridden


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"failure_threshold": 0.4}, "failure_threshold"),
        ({"window_size": 5, "minimum_calls": 6}, "minimum_calls"),
    ],
)
def test_bad_override_names_breaker_and_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field) as info:
        BreakerGroupConfig(overrides={"qwen": override})
    assert "overrides.qwen" in str(info.value)


def test_for_name_raises_config_error_with_key() -> None:
    # model_construct skips validation, so the lazy check in for_name is what catches the bad value.
    group = BreakerGroupConfig.model_construct(overrides={"qwen": {"open_wait": -1}})
    with pytest.raises(ConfigError, match="open_wait") as info:
        group.for_name("qwen")
    assert info.value.key == "overrides.qwen"


# -- the count window ----------------------------------------------------------------------------------


async def test_does_not_open_before_minimum_calls(clock: FakeClock) -> None:
    breaker = make(clock, window_size=10, minimum_calls=10)
    await run(breaker, "F" * 9)
    assert breaker.state is CLOSED
    assert breaker.metrics().failure_rate == 1.0
    await run(breaker, "F")
    assert breaker.state is OPEN
    assert breaker.metrics().opened == 1


async def test_successes_do_not_reset_failures(clock: FakeClock) -> None:
    # The seed's breaker zeroed its failure count on every success, so alternating outcomes never opened it.
    breaker = make(clock, window_size=10, minimum_calls=10)
    await run(breaker, "SF" * 4 + "S")
    assert breaker.state is CLOSED
    m = breaker.metrics()
    assert (m.calls, m.failures) == (9, 4)
    await run(breaker, "F")  # 5 failures in 10 calls: exactly 0.5
    assert breaker.state is OPEN


async def test_rate_below_threshold_stays_closed(clock: FakeClock) -> None:
    breaker = make(clock, window_size=10, minimum_calls=10, failure_rate_threshold=0.6)
    await run(breaker, "SF" * 5)
    assert breaker.state is CLOSED
    await run(breaker, "SF")  # the window slides: still 5 of 10
    assert breaker.state is CLOSED
    await run(breaker, "F")  # the oldest S drops out: 6 failures in 10 calls
    assert breaker.state is OPEN


async def test_alternating_failures_open_at_half(clock: FakeClock) -> None:
    # F,S,F,S,... : after the 10th call (a success) the window holds 5 failures in 10 calls = 0.5.
    breaker = make(clock, window_size=10, minimum_calls=10)
    await run(breaker, "FS" * 5)
    assert breaker.state is OPEN


async def test_success_reaching_minimum_calls_opens(clock: FakeClock) -> None:
    breaker = make(clock, window_size=8, minimum_calls=4)
    await run(breaker, "FFF")
    assert breaker.state is CLOSED  # 3 < minimum_calls
    await run(breaker, "S")  # 3 failures in 4 calls = 0.75 >= 0.5
    assert breaker.state is OPEN


async def test_rate_exactly_at_threshold_opens_for_decimal_thresholds(clock: FakeClock) -> None:
    breaker = make(clock, window_size=100, minimum_calls=100, failure_rate_threshold=0.55)
    await run(breaker, "S" * 45 + "F" * 55)
    assert breaker.metrics().failure_rate == 0.55
    assert breaker.state is OPEN


async def test_count_window_slides(clock: FakeClock) -> None:
    breaker = make(clock, window_size=10, minimum_calls=10)
    await run(breaker, "FFFF" + "S" * 6)
    m = breaker.metrics()
    assert (m.calls, m.failures, m.failure_rate) == (10, 4, 0.4)
    await run(breaker, "SS")  # the two oldest failures drop out
    assert (breaker.metrics().calls, breaker.metrics().failures) == (10, 2)
    await run(breaker, "S" * 8)  # ten newer successes: no old failure counts any more
    assert (breaker.metrics().calls, breaker.metrics().failures) == (10, 0)
    await run(breaker, "FFFF")  # had the old failures stayed, this would be 8 of 10
    assert breaker.state is CLOSED
    assert breaker.metrics().failures == 4
    await run(breaker, "F")
    assert breaker.state is OPEN


async def test_successes_after_minimum_calls_keep_their_order(clock: FakeClock) -> None:
    # Once the window holds minimum_calls outcomes, successes may be counted lazily; they must still
    # enter the window in the order the calls finished, or later evictions drop the wrong outcomes.
    breaker = make(clock, window_size=4, minimum_calls=4, failure_rate_threshold=0.75)
    await run(breaker, "SSSF")
    await run(breaker, "SSF")  # window, oldest first: F S S F
    await run(breaker, "SS")  # S F S S (had the failure gone in before the successes: S S S S)
    m = breaker.metrics()
    assert (m.calls, m.failures, m.state) == (4, 1, CLOSED)
    await run(breaker, "S" * 25)  # more successes than the window holds
    assert (breaker.metrics().calls, breaker.metrics().failures) == (4, 0)
    await run(breaker, "SFF")
    assert breaker.state is CLOSED  # S S F F: 0.5
    await run(breaker, "F")
    assert breaker.state is OPEN  # S F F F: 0.75


@pytest.mark.parametrize("form", ["call", "wrap"])
async def test_late_outcomes_of_hot_path_calls_are_discarded(clock: FakeClock, form: str) -> None:
    breaker = make(clock, window_size=4, minimum_calls=4, success_threshold=1)
    await run(breaker, "SSSS")  # enough outcomes for the success hot path
    gate = Gate()
    fns = [gate.fn(), gate.fn()]
    if form == "call":
        late = [asyncio.create_task(breaker.call(fn)) for fn in fns]
    else:
        late = [asyncio.create_task(breaker.wrap(fn)()) for fn in fns]
    await settle()
    assert gate.started == 2
    await run(breaker, "FF")
    assert breaker.state is OPEN
    clock.advance(60)
    await run(breaker, "S")  # the probe closes it with a fresh window
    assert breaker.state is CLOSED
    gate.release(0)
    gate.release(1, Boom("late"))
    assert await late[0] == "held-0"
    with pytest.raises(Boom):
        await late[1]
    m = breaker.metrics()
    assert (m.calls, m.failures, m.state) == (0, 0, CLOSED)


async def test_wrap_counts_every_outcome(clock: FakeClock) -> None:
    breaker = make(clock, window_size=8, minimum_calls=2)
    wrapped_ok, wrapped_fail = breaker.wrap(ok), breaker.wrap(fail)
    for _ in range(20):
        assert await wrapped_ok() == "ok"
    assert (breaker.metrics().calls, breaker.metrics().failures) == (8, 0)
    for expected in range(1, 4):
        with pytest.raises(Boom):
            await wrapped_fail()
        assert (breaker.metrics().calls, breaker.metrics().failures) == (8, expected)
    assert breaker.state is CLOSED
    with pytest.raises(Boom):
        await wrapped_fail()  # 4 of 8
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpen):
        await wrapped_ok()


# -- the time window -----------------------------------------------------------------------------------


async def test_time_window_expires_old_outcomes(clock: FakeClock) -> None:
    breaker = make(clock, window_type="time", window_size=10, minimum_calls=100)
    await run(breaker, "FFF")  # t=1000
    clock.advance(4)
    await run(breaker, "SS")  # t=1004
    clock.advance(3)
    await run(breaker, "F")  # t=1007
    assert (breaker.metrics().calls, breaker.metrics().failures) == (6, 4)
    clock.advance(2.999)  # t=1009.999: everything is younger than 10 s
    assert (breaker.metrics().calls, breaker.metrics().failures) == (6, 4)
    clock.advance(0.001)  # t=1010: the t=1000 outcomes are 10 s old
    assert (breaker.metrics().calls, breaker.metrics().failures) == (3, 1)
    clock.advance(4)  # t=1014: the t=1004 ones go
    assert (breaker.metrics().calls, breaker.metrics().failures) == (1, 1)
    clock.advance(3)  # t=1017: all gone
    m = breaker.metrics()
    assert (m.calls, m.failures, m.failure_rate) == (0, 0, 0.0)


async def test_time_window_buckets_roll(clock: FakeClock) -> None:
    breaker = make(clock, window_type="time", window_size=5, minimum_calls=100)
    seen = []
    for _ in range(12):  # one failure per second, wrapping the 5 buckets more than twice
        await run(breaker, "F")
        seen.append(breaker.metrics().calls)
        clock.advance(1)
    assert seen == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5]
    assert breaker.metrics().calls == 4  # t=1012: the t=1007 outcome expired
    await run(breaker, "SS")
    assert (breaker.metrics().calls, breaker.metrics().failures) == (6, 4)


async def test_time_window_jump_longer_than_window_clears_all(clock: FakeClock) -> None:
    breaker = make(clock, window_type="time", window_size=10, minimum_calls=100)
    for second in range(10):
        clock.advance(1 if second else 0)
        await run(breaker, "FS")
    assert breaker.metrics().calls == 20  # t=1009: ten busy seconds
    clock.advance(25)
    assert breaker.metrics().calls == 0
    # No stale bucket comes back as the window wraps after the jump.
    for second in range(15):
        clock.advance(1 if second else 0)
        await run(breaker, "S")
    assert (breaker.metrics().calls, breaker.metrics().failures) == (10, 0)


async def test_time_window_opens_on_rate_of_recent_outcomes(clock: FakeClock) -> None:
    breaker = make(clock, window_type="time", window_size=10, minimum_calls=5)
    await run(breaker, "FFFF")
    clock.advance(10)
    await run(breaker, "F")  # the first four expired: 1 call, below minimum_calls
    assert breaker.state is CLOSED
    await run(breaker, "FFF")
    assert breaker.state is CLOSED
    await run(breaker, "F")
    assert breaker.state is OPEN


# -- slow calls ----------------------------------------------------------------------------------------


def slow_fn(
    clock: FakeClock, seconds: float, error: BaseException | None = None
) -> Callable[[], Awaitable[str]]:
    """A call that takes ``seconds`` of fake time."""

    async def fn() -> str:
        clock.advance(seconds)
        if error is not None:
            raise error
        return "slow"

    return fn


async def test_slow_call_rate_opens(clock: FakeClock) -> None:
    breaker = make(
        clock,
        window_size=4,
        minimum_calls=4,
        failure_rate_threshold=1.0,
        slow_call_rate_threshold=0.5,
        slow_call_duration=2.0,
    )
    assert await breaker.call(slow_fn(clock, 1.999)) == "slow"  # just under: not slow
    await run(breaker, "S")
    assert await breaker.call(slow_fn(clock, 2.0)) == "slow"  # at the duration: slow
    m = breaker.metrics()
    assert (m.calls, m.failures, m.slow_calls) == (3, 0, 1)
    assert breaker.state is CLOSED
    assert await breaker.call(slow_fn(clock, 5.0)) == "slow"  # the slow call's result is returned
    m = breaker.metrics()
    assert (m.calls, m.slow_calls, m.slow_call_rate) == (4, 2, 0.5)
    assert breaker.state is OPEN


async def test_slow_failure_counts_as_both(clock: FakeClock) -> None:
    breaker = make(
        clock, window_size=10, minimum_calls=10, slow_call_rate_threshold=0.5, slow_call_duration=1
    )
    with pytest.raises(Boom):
        await breaker.call(slow_fn(clock, 3, Boom()))
    m = breaker.metrics()
    assert (m.calls, m.failures, m.slow_calls) == (1, 1, 1)


async def test_slow_calls_not_tracked_without_threshold(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=4, slow_call_duration=1.0)
    for _ in range(8):
        await breaker.call(slow_fn(clock, 100))
    m = breaker.metrics()
    assert (m.calls, m.slow_calls, m.state) == (4, 0, CLOSED)


async def test_slow_probe_reopens(clock: FakeClock) -> None:
    breaker = make(
        clock,
        window_size=2,
        minimum_calls=2,
        slow_call_rate_threshold=1.0,
        slow_call_duration=5,
        open_wait=10,
    )
    await breaker.call(slow_fn(clock, 5))
    await breaker.call(slow_fn(clock, 5))
    assert breaker.state is OPEN
    clock.advance(10)
    assert await breaker.call(slow_fn(clock, 6)) == "slow"
    assert breaker.state is OPEN


# -- open ------------------------------------------------------------------------------------------------


async def test_open_rejects_with_remaining_wait(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, open_wait=60)
    await run(breaker, "FF")
    assert breaker.state is OPEN
    assert not breaker.available
    clock.advance(20)
    ran = []

    async def fn() -> None:
        ran.append(1)

    with pytest.raises(CircuitOpen) as info:
        await breaker.call(fn)
    assert isinstance(info.value, Rejected)
    assert info.value.state == "open"
    assert info.value.retry_after == pytest.approx(40)
    assert info.value.policy == "model"
    assert ran == []
    clock.advance(15)
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(fn)
    assert info.value.retry_after == pytest.approx(25)
    m = breaker.metrics()
    assert (m.state, m.rejected, m.opened) == (OPEN, 2, 1)
    assert m.retry_after == pytest.approx(25)
    assert breaker.retry_after() == pytest.approx(25)
    # The window that opened it is kept for inspection while open.
    assert (m.calls, m.failures) == (2, 2)

    clock.advance(24.999)
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.state is HALF_OPEN
    assert breaker.available
    assert breaker.retry_after() == 0.0
    assert await breaker.call(ok) == "ok"


# -- half-open -------------------------------------------------------------------------------------------


async def test_half_open_limits_probes_and_closes_after_successes(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, half_open_retry_after=2.5)
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    probes = [await start(breaker, gate) for _ in range(3)]
    assert gate.started == 3
    assert breaker.state is HALF_OPEN
    assert not breaker.available
    assert breaker.retry_after() == 2.5

    with pytest.raises(CircuitOpen) as info:
        await breaker.call(ok)
    assert info.value.state == "half_open"
    assert info.value.retry_after == 2.5
    assert breaker.metrics().rejected == 1

    for i in range(3):
        gate.release(i)
    assert await asyncio.gather(*probes) == ["held-0", "held-1", "held-2"]
    assert breaker.state is HALF_OPEN  # 3 of the 5 successes needed
    assert breaker.available
    assert await breaker.call(ok) == "ok"
    assert breaker.state is HALF_OPEN
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CLOSED
    m = breaker.metrics()
    assert (m.calls, m.failures, m.rejected, m.opened) == (0, 0, 1, 1)  # a fresh window


async def test_failed_probe_reopens_and_discards_other_probes(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, success_threshold=2)
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    first, second = await start(breaker, gate), await start(breaker, gate)
    gate.release(0, Boom("still down"))
    with pytest.raises(Boom):
        await first
    assert breaker.state is OPEN
    assert breaker.metrics().opened == 2
    gate.release(1)
    assert await second == "held-1"  # its success belongs to the previous half-open period
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(60)


async def test_half_open_admits_exactly_max_calls_of_1000(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, half_open_max_calls=3)
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    fns = [gate.fn() for _ in range(1000)]
    tasks = [asyncio.create_task(breaker.call(fn)) for fn in fns]
    await settle()
    assert gate.started == 3
    for i in range(1000):
        gate.release(i)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    rejected = [r for r in results if isinstance(r, CircuitOpen)]
    assert len(rejected) == 997
    assert all(r.state == "half_open" for r in rejected)
    assert sum(isinstance(r, str) for r in results) == 3
    assert breaker.metrics().rejected == 997
    assert breaker.state is HALF_OPEN


async def test_open_wait_backoff_grows_caps_and_resets(clock: FakeClock) -> None:
    breaker = make(
        clock,
        window_size=2,
        minimum_calls=2,
        success_threshold=1,
        open_wait=60,
        open_wait_multiplier=2,
        open_wait_max=200,
    )
    await open_breaker(breaker)
    waits = [breaker.retry_after()]
    for _ in range(3):
        clock.advance(waits[-1])
        await run(breaker, "F")  # the probe fails: open again, for longer
        assert breaker.state is OPEN
        waits.append(breaker.retry_after())
    assert waits == [60, 120, 200, 200]

    clock.advance(200)
    await run(breaker, "S")  # a successful probe closes it; the next open waits the base time again
    assert breaker.state is CLOSED
    await open_breaker(breaker)
    assert breaker.retry_after() == 60

    clock.advance(60)
    await run(breaker, "F")
    assert breaker.retry_after() == 120
    breaker.reset()  # reset also forgets the repeated opens
    await open_breaker(breaker)
    assert breaker.retry_after() == 60


async def test_default_open_wait_does_not_grow(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2)
    await open_breaker(breaker)
    for _ in range(3):
        clock.advance(60)
        await run(breaker, "F")
        assert breaker.retry_after() == 60


async def test_backoff_survives_a_long_outage(clock: FakeClock) -> None:
    breaker = make(
        clock, window_size=1, minimum_calls=1, open_wait=1, open_wait_multiplier=2, open_wait_max=10
    )
    for _ in range(1100):  # about 3 hours of a dead dependency at the 10 s cap
        with pytest.raises(Boom):
            await breaker.call(fail)
        assert breaker.state is OPEN
        assert breaker.retry_after() == 10 or breaker.metrics().opened < 5
        clock.advance(10)


# -- record / ignore filters -------------------------------------------------------------------------------


async def test_ignored_exceptions_count_as_neither(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=2, ignore_exceptions=(KeyError,))

    async def missing() -> None:
        raise KeyError("x")

    for _ in range(10):
        with pytest.raises(KeyError):
            await breaker.call(missing)
    m = breaker.metrics()
    assert (m.state, m.calls, m.failures) == (CLOSED, 0, 0)
    await run(breaker, "FS")
    assert (breaker.metrics().calls, breaker.metrics().failures) == (2, 1)


async def test_ignore_wins_over_record(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=1, ignore_exceptions=(Boom,))
    await run(breaker, "FFF")
    assert breaker.metrics().calls == 0
    assert breaker.state is CLOSED


async def test_unrecorded_exceptions_are_not_counted(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=1, record_exceptions=(Boom,))

    async def bad_input() -> None:
        raise ValueError("caller's fault")

    for _ in range(5):
        with pytest.raises(ValueError, match="caller's fault"):
            await breaker.call(bad_input)
    assert (breaker.metrics().calls, breaker.state) == (0, CLOSED)
    await run(breaker, "F")
    assert breaker.state is OPEN


async def test_ignored_exception_frees_half_open_slot(clock: FakeClock) -> None:
    breaker = make(
        clock, window_size=2, minimum_calls=2, half_open_max_calls=1, ignore_exceptions=(KeyError,)
    )
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    probe = await start(breaker, gate)
    assert not breaker.available
    gate.release(0, KeyError("x"))
    with pytest.raises(KeyError):
        await probe
    assert breaker.state is HALF_OPEN
    assert breaker.available
    assert await breaker.call(ok) == "ok"


async def test_cancelled_call_is_not_counted(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=1)
    gate = Gate()
    task = await start(breaker, gate)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (breaker.metrics().calls, breaker.state) == (0, CLOSED)


async def test_cancelled_probe_frees_its_slot(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, half_open_max_calls=1)
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    probe = await start(breaker, gate)
    assert not breaker.available
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state is HALF_OPEN
    assert breaker.available


async def test_cancelled_call_never_counted_even_when_recording_base_exception(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=1, record_exceptions=(BaseException,))
    gate = Gate()
    task = await start(breaker, gate)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (breaker.metrics().calls, breaker.state) == (0, CLOSED)


async def test_failure_result_counts_but_returns_the_value(clock: FakeClock) -> None:
    breaker = make(
        clock,
        window_size=4,
        minimum_calls=2,
        failure_result=lambda r: isinstance(r, dict) and r.get("status", 200) >= 500,
    )
    assert await breaker.call(ok, {"status": 200}) == {"status": 200}
    assert breaker.metrics().failures == 0
    assert await breaker.call(ok, {"status": 503}) == {"status": 503}
    m = breaker.metrics()
    assert (m.calls, m.failures, m.state) == (2, 1, OPEN)


async def test_raising_failure_result_does_not_wedge_half_open(clock: FakeClock) -> None:
    breaker = make(
        clock,
        window_size=2,
        minimum_calls=2,
        half_open_max_calls=1,
        failure_result=lambda r: r["status"] >= 500,  # raises on a result that is not a dict
    )
    await open_breaker(breaker)
    clock.advance(60)
    with pytest.raises(TypeError):
        await breaker.call(ok, "not a dict")
    # Whether the raising check counts as a failure (open again) or as nothing (slot freed), a call
    # made after another open wait must be let through.
    clock.advance(60)
    assert await breaker.call(ok, {"status": 200}) == {"status": 200}


# -- late outcomes -------------------------------------------------------------------------------------------


async def test_outcomes_of_calls_from_an_earlier_state_are_discarded(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=2, success_threshold=1, half_open_max_calls=1)
    gate = Gate()
    late_fail, late_ok = await start(breaker, gate), await start(breaker, gate)
    await run(breaker, "FF")
    assert breaker.state is OPEN

    gate.release(0, Boom("late"))
    with pytest.raises(Boom):
        await late_fail
    m = breaker.metrics()
    assert (m.calls, m.failures, m.opened) == (2, 2, 1)
    assert breaker.retry_after() == 60  # not re-opened by the late failure

    clock.advance(60)
    assert breaker.state is HALF_OPEN
    gate.release(1)
    assert await late_ok == "held-1"
    # A probe success would close it (success_threshold=1); a closed-era success does not, and takes no slot.
    assert breaker.state is HALF_OPEN
    assert breaker.available
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CLOSED


async def test_late_failure_after_close_is_not_counted(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2, success_threshold=1)
    gate = Gate()
    late = await start(breaker, gate)
    await open_breaker(breaker)
    clock.advance(60)
    await run(breaker, "S")
    assert breaker.state is CLOSED
    gate.release(0, Boom("late"))
    with pytest.raises(Boom):
        await late
    assert breaker.metrics().calls == 0


# -- operator states -----------------------------------------------------------------------------------------


async def test_force_open_rejects_everything(clock: FakeClock) -> None:
    breaker = make(clock, open_wait=30)
    breaker.force_open()
    assert breaker.state is BreakerState.FORCED_OPEN
    assert breaker.metrics().state.metric == 1
    assert not breaker.available
    for _ in range(3):
        with pytest.raises(CircuitOpen) as info:
            await breaker.call(ok)
        assert info.value.state == "forced_open"
        assert info.value.retry_after == 30
        clock.advance(1000)  # time does not end a forced state
    assert breaker.state is BreakerState.FORCED_OPEN
    assert breaker.metrics().rejected == 3
    breaker.reset()
    assert breaker.state is CLOSED
    assert await breaker.call(ok) == "ok"


async def test_force_closed_never_opens_but_records(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=2)
    await run(breaker, "F")
    breaker.force_closed()
    await run(breaker, "FFFFF")
    m = breaker.metrics()
    assert (m.state, m.calls, m.failures, m.opened, m.state.metric) == (
        BreakerState.FORCED_CLOSED,
        4,
        4,
        0,
        0,
    )
    assert breaker.available
    breaker.reset()
    assert (breaker.state, breaker.metrics().calls) == (CLOSED, 0)


async def test_force_closed_leaves_open_state(clock: FakeClock) -> None:
    breaker = make(clock, window_size=2, minimum_calls=2)
    await open_breaker(breaker)
    breaker.force_closed()
    assert await breaker.call(ok) == "ok"


async def test_disable_records_nothing(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=4)
    await run(breaker, "SF")
    breaker.disable()
    await run(breaker, "FFFFFFFF")
    m = breaker.metrics()
    assert (m.state, m.calls, m.failures, m.opened, m.state.metric) == (BreakerState.DISABLED, 2, 1, 0, 0)
    breaker.reset()
    await run(breaker, "FFFF")
    assert breaker.state is OPEN


async def test_reset_closes_with_an_empty_window(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=2)
    await open_breaker(breaker)
    breaker.reset()
    m = breaker.metrics()
    assert (m.state, m.calls, m.failures, m.retry_after) == (CLOSED, 0, 0, 0.0)
    assert m.opened == 1  # lifetime counters survive a reset
    await run(breaker, "SF")
    assert breaker.state is OPEN


# -- forms ---------------------------------------------------------------------------------------------------


async def test_call_passes_arguments(clock: FakeClock) -> None:
    breaker = make(clock)

    async def add(a: int, b: int, *, c: int) -> int:
        return a + b + c

    assert await breaker.call(add, 1, 2, c=3) == 6
    assert breaker.metrics().calls == 1


async def test_decorator_and_wrap(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=3)

    @breaker
    async def generate(prompt: str) -> str:
        """Generate."""
        if prompt == "bad":
            raise Boom(prompt)
        return prompt.upper()

    assert generate.__name__ == "generate"
    assert generate.__doc__ == "Generate."
    assert await generate("hi") == "HI"
    wrapped = breaker.wrap(fail)
    with pytest.raises(Boom):
        await wrapped()
    assert (breaker.metrics().calls, breaker.metrics().failures) == (2, 1)
    with pytest.raises(Boom):
        await generate("bad")
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpen):
        await generate("hi")


async def test_async_with_counts_block_outcomes(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=3)
    async with breaker:
        pass
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    assert (breaker.metrics().calls, breaker.metrics().failures) == (2, 1)
    with pytest.raises(Boom):
        async with breaker:
            raise Boom
    assert breaker.state is OPEN
    ran = False
    with pytest.raises(CircuitOpen):
        async with breaker:
            ran = True
    assert not ran


async def test_guard_record_result(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=2, failure_result=lambda r: r == {"status": 503})
    async with breaker.guard() as g:
        g.record_result({"status": 200})
    async with breaker.guard() as g:
        g.record_result({"status": 503})
    assert breaker.state is OPEN
    m = breaker.metrics()
    assert (m.calls, m.failures) == (2, 1)


async def test_guard_records_once(clock: FakeClock) -> None:
    breaker = make(clock, window_size=4, minimum_calls=4)

    async def block() -> None:
        async with breaker.guard() as g:
            g.record_result("fine")
            raise Boom  # after record_result the exit records nothing more

    with pytest.raises(Boom):
        await block()
    m = breaker.metrics()
    assert (m.calls, m.failures) == (1, 0)
    async with breaker.guard():
        pass  # no record_result: the exit records a success
    assert breaker.metrics().calls == 2


async def test_nested_async_with_of_two_breakers(clock: FakeClock) -> None:
    outer = make(clock, name="outer", window_size=4, minimum_calls=4)
    inner = make(clock, name="inner", window_size=4, minimum_calls=4)
    async with outer:
        async with inner:
            pass
        with pytest.raises(Boom):
            async with inner:
                raise Boom
    assert (outer.metrics().calls, outer.metrics().failures) == (1, 0)
    assert (inner.metrics().calls, inner.metrics().failures) == (2, 1)
    with pytest.raises(Boom):
        async with inner, outer:
            raise Boom
    assert (outer.metrics().calls, outer.metrics().failures) == (2, 1)
    assert (inner.metrics().calls, inner.metrics().failures) == (3, 2)


async def test_async_with_in_concurrent_tasks(clock: FakeClock) -> None:
    # The per-block permit lives in a context variable, so interleaved tasks do not swap permits.
    breaker = make(clock, window_size=100, minimum_calls=100)

    async def block(i: int) -> None:
        async with breaker:
            await asyncio.sleep(0)
            if i % 2:
                raise Boom

    results = await asyncio.gather(*(block(i) for i in range(50)), return_exceptions=True)
    assert sum(isinstance(r, Boom) for r in results) == 25
    assert (breaker.metrics().calls, breaker.metrics().failures) == (50, 25)


# -- events --------------------------------------------------------------------------------------------------


async def test_events_on_transitions_and_rejections(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    breaker = make(
        clock, bus, window_size=2, minimum_calls=2, failure_rate_threshold=1.0, success_threshold=1
    )
    await run(breaker, "SS")
    assert seen == []  # nothing on the success path
    await run(breaker, "FF")
    with pytest.raises(CircuitOpen):
        await breaker.call(ok)
    clock.advance(60)
    await run(breaker, "S")
    breaker.force_open()
    with pytest.raises(CircuitOpen):
        await breaker.call(ok)
    breaker.reset()

    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert [(e.old, e.new) for e in changes] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "forced_open"),
        ("forced_open", "closed"),
    ]
    assert all(e.source == "model" for e in seen)
    assert changes[0].reason == "failure rate 2/2"
    assert changes[0].at == 1000.0
    assert changes[1].reason == "open wait elapsed"
    assert changes[1].at == 1060.0
    assert "probes succeeded" in changes[2].reason
    assert changes[4].reason == "reset"

    rejections = [e for e in seen if isinstance(e, CallRejected)]
    assert [(e.kind, e.reason, e.retry_after) for e in rejections] == [
        ("breaker", "open", 60.0),
        ("breaker", "forced_open", 60.0),
    ]
    assert len(seen) == len(changes) + len(rejections)


async def test_half_open_busy_rejection_event(clock: FakeClock, bus: EventBus) -> None:
    rejections: list[CallRejected] = []
    bus.subscribe(rejections.append, CallRejected)
    breaker = make(clock, bus, window_size=2, minimum_calls=2, half_open_max_calls=1)
    await open_breaker(breaker)
    clock.advance(60)
    gate = Gate()
    probe = await start(breaker, gate)
    with pytest.raises(CircuitOpen):
        await breaker.call(ok)
    gate.release(0)
    await probe
    assert [(e.reason, e.retry_after) for e in rejections] == [("half_open", 1.0)]


async def test_no_event_for_repeated_operator_state(clock: FakeClock, bus: EventBus) -> None:
    seen: list[BreakerStateChanged] = []
    bus.subscribe(seen.append, BreakerStateChanged)
    breaker = make(clock, bus)
    breaker.reset()
    breaker.disable()
    breaker.disable()
    assert [(e.old, e.new, e.reason) for e in seen] == [("closed", "disabled", "disabled")]


# -- concurrency ---------------------------------------------------------------------------------------------


async def test_1000_concurrent_calls_with_30_percent_failures(clock: FakeClock) -> None:
    breaker = make(clock, window_size=1000, minimum_calls=100, failure_rate_threshold=0.5)
    running = 0
    peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        if i % 10 < 3:
            raise Boom(str(i))
        return i

    results = await asyncio.gather(*(breaker.call(work, i) for i in range(1000)), return_exceptions=True)
    assert peak == 1000  # all in flight at once
    assert sum(isinstance(r, Boom) for r in results) == 300
    assert sorted(r for r in results if isinstance(r, int)) == [i for i in range(1000) if i % 10 >= 3]
    m = breaker.metrics()
    assert (m.state, m.calls, m.failures, m.rejected, m.opened) == (CLOSED, 1000, 300, 0, 0)
    assert m.failure_rate == 0.3
