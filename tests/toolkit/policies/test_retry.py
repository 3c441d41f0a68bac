"""Tests of brownout.policies.retry: backoff, jitter, hints, deadlines, budgets and the call forms."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from brownout.errors import ConfigError, Overloaded, Rejected
from brownout.events import Event, EventBus, RetryAttempted, RetryGaveUp
from brownout.policies.deadline import deadline
from brownout.policies.retry import GIVE_UP_REASONS, Retry, RetryBudget, RetryConfig, RetryStats
from brownout.testing import FakeClock


class Boom(Exception):
    """A retriable failure numbered by attempt, so tests can tell which one was re-raised."""


class Fatal(Exception):
    """An error the tests configure as not retriable."""


class Abort(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt, but safe inside asyncio)."""


class HintedError(Exception):
    """Not a brownout error, but carries a numeric retry_after hint (as an HTTP 429 wrapper might)."""

    def __init__(self, retry_after: object) -> None:
        super().__init__(f"slow down ({retry_after!r})")
        self.retry_after = retry_after


class FixedRandom(random.Random):
    """An rng whose random() always returns ``value``: makes full jitter predictable."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class Flaky:
    """An async callable that fails ``failures`` times (with ``make(n)``) and then returns ``"ok"``."""

    def __init__(self, failures: int, make: Callable[[int], BaseException] = lambda n: Boom(n)) -> None:
        self.failures = failures
        self.make = make
        self.calls = 0
        self.raised: list[BaseException] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            exc = self.make(self.calls)
            self.raised.append(exc)
            raise exc
        return "ok"


def always(make: Callable[[int], BaseException] = lambda n: Boom(n)) -> Flaky:
    return Flaky(10**9, make)


@pytest.fixture
def jclock() -> FakeClock:
    """A fake clock whose sleeps return at once after moving time (retry loops are sequential)."""
    return FakeClock(autojump=True)


def make_retry(clock: FakeClock, bus: EventBus | None = None, **cfg: Any) -> Retry:
    cfg.setdefault("jitter", "none")
    cfg.setdefault("budget_ratio", None)
    return Retry("model", RetryConfig(**cfg), clock=clock, events=bus or EventBus())


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


# --- the basic loop --------------------------------------------------------------------------------


async def test_succeeds_after_k_failures(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=4)
    fn = Flaky(3)
    assert await retry.call(fn) == "ok"
    assert fn.calls == 4
    assert jclock.sleeps == [1.0, 2.0, 4.0]
    assert retry.stats == RetryStats(calls=1, retries=3, gave_up=dict.fromkeys(GIVE_UP_REASONS, 0))


async def test_first_try_success_does_not_sleep_or_retry(jclock: FakeClock) -> None:
    retry = make_retry(jclock)
    fn = Flaky(0)
    assert await retry.call(fn, 1, key="x") == "ok"
    assert fn.calls == 1
    assert jclock.sleeps == []
    assert retry.stats.retries == 0


async def test_passes_arguments_every_attempt(jclock: FakeClock) -> None:
    seen: list[tuple[Any, ...]] = []

    async def fn(a: int, *, b: str) -> str:
        seen.append((a, b))
        if len(seen) < 2:
            raise Boom(len(seen))
        return f"{a}{b}"

    assert await make_retry(jclock).call(fn, 1, b="x") == "1x"
    assert seen == [(1, "x"), (1, "x")]


async def test_attempts_exhausted_reraises_last_error_with_note(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    fn = always()
    with pytest.raises(Boom) as info:
        await retry.call(fn)
    assert fn.calls == 3
    assert info.value is fn.raised[-1]
    assert info.value.args == (3,)
    assert notes(info.value) == ["brownout retry 'model' gave up after 3 attempts: attempts exhausted"]
    # The earlier failures were swallowed by the retry, not noted.
    assert notes(fn.raised[0]) == []
    assert jclock.sleeps == [1.0, 2.0]
    assert retry.stats.gave_up["attempts exhausted"] == 1
    assert retry.stats.retries == 2


async def test_single_attempt_never_retries(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=1)
    fn = always()
    with pytest.raises(Boom) as info:
        await retry.call(fn)
    assert fn.calls == 1
    assert jclock.sleeps == []
    assert notes(info.value) == ["brownout retry 'model' gave up after 1 attempts: attempts exhausted"]


async def test_non_retriable_error_passes_through_at_once(jclock: FakeClock) -> None:
    retry = make_retry(jclock, retry_on=(Boom, TimeoutError))
    fn = always(lambda n: Fatal(n))
    with pytest.raises(Fatal) as info:
        await retry.call(fn)
    assert fn.calls == 1
    assert info.value is fn.raised[0]
    assert notes(info.value) == []
    assert jclock.sleeps == []
    assert retry.stats == RetryStats(calls=1, retries=0, gave_up=dict.fromkeys(GIVE_UP_REASONS, 0))


async def test_retry_on_accepts_a_single_type_and_subclasses(jclock: FakeClock) -> None:
    retry = make_retry(jclock, retry_on=OSError)
    fn = Flaky(2, lambda n: ConnectionResetError(n))  # a subclass of OSError
    assert await retry.call(fn) == "ok"
    assert fn.calls == 3


async def test_retry_if_must_also_accept(jclock: FakeClock) -> None:
    # Retry only odd-numbered failures: the 2nd failure stops the loop even though it is a Boom.
    retry = make_retry(jclock, max_attempts=5, retry_if=lambda e: e.args[0] % 2 == 1)
    fn = always()
    with pytest.raises(Boom) as info:
        await retry.call(fn)
    assert fn.calls == 2
    assert info.value.args == (2,)
    assert notes(info.value) == []


async def test_base_exceptions_are_never_retried(jclock: FakeClock) -> None:
    retry = make_retry(jclock, retry_on=(BaseException,))
    for make in (lambda n: Abort(n), lambda n: asyncio.CancelledError()):
        fn = always(make)
        with pytest.raises((Abort, asyncio.CancelledError)):
            await retry.call(fn)
        assert fn.calls == 1
    assert jclock.sleeps == []
    assert retry.stats.retries == 0


# --- backoff and jitter ----------------------------------------------------------------------------


async def test_no_jitter_exact_schedule_with_cap(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=7, backoff_base=0.5, backoff_multiplier=3.0, backoff_max=10.0)
    with pytest.raises(Boom):
        await retry.call(always())
    assert jclock.sleeps == [0.5, 1.5, 4.5, 10.0, 10.0, 10.0]


async def test_backoff_max_caps_every_wait(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=12, backoff_base=1.0, backoff_max=5.0)
    with pytest.raises(Boom):
        await retry.call(always())
    assert jclock.sleeps == [1.0, 2.0, 4.0] + [5.0] * 8


async def test_constant_backoff_with_multiplier_one(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=4, backoff_base=0.25, backoff_multiplier=1.0)
    with pytest.raises(Boom):
        await retry.call(always())
    assert jclock.sleeps == [0.25, 0.25, 0.25]


async def test_huge_attempt_counts_do_not_overflow(jclock: FakeClock) -> None:
    # 10.0 ** 400 overflows a float; the cap must still apply.
    retry = make_retry(jclock, max_attempts=401, backoff_multiplier=10.0, backoff_max=3.0)
    fn = Flaky(400)
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps[-1] == 3.0
    assert len(jclock.sleeps) == 400


async def test_full_jitter_stays_within_bounds_with_seeded_rng(jclock: FakeClock) -> None:
    config = RetryConfig(max_attempts=10, backoff_base=1.0, backoff_max=20.0, budget_ratio=None)
    retry = Retry("model", config, clock=jclock, events=EventBus(), rng=random.Random(42))
    with pytest.raises(Boom):
        await retry.call(always())
    ceilings = [min(20.0, 1.0 * 2.0 ** (n - 1)) for n in range(1, 10)]
    assert len(jclock.sleeps) == 9
    for delay, ceiling in zip(jclock.sleeps, ceilings, strict=True):
        assert 0.0 <= delay <= ceiling
    # Jitter really applies: the waits are not simply the ceilings.
    assert jclock.sleeps != ceilings
    # Same seed, same schedule: the rng is the only source of randomness.
    again = FakeClock(autojump=True)
    retry2 = Retry("model", config, clock=again, events=EventBus(), rng=random.Random(42))
    with pytest.raises(Boom):
        await retry2.call(always())
    assert again.sleeps == jclock.sleeps


async def test_full_jitter_scales_the_capped_backoff(jclock: FakeClock) -> None:
    config = RetryConfig(max_attempts=6, backoff_base=2.0, backoff_max=10.0, budget_ratio=None)
    retry = Retry("model", config, clock=jclock, events=EventBus(), rng=FixedRandom(0.5))
    with pytest.raises(Boom):
        await retry.call(always())
    assert jclock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_default_rng_is_used_without_one(jclock: FakeClock) -> None:
    retry = Retry("model", RetryConfig(max_attempts=50, budget_ratio=None), clock=jclock, events=EventBus())
    with pytest.raises(Boom):
        await retry.call(always())
    assert all(0.0 <= d <= 30.0 for d in jclock.sleeps)
    assert len(set(jclock.sleeps)) > 1


# --- retry_after hints -----------------------------------------------------------------------------


async def test_retry_after_hint_longer_than_backoff_is_honoured(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    fn = Flaky(2, lambda n: Rejected("busy", retry_after=7.0))
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps == [7.0, 7.0]


async def test_retry_after_hint_shorter_than_backoff_keeps_backoff(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3, backoff_base=4.0)
    fn = Flaky(2, lambda n: Overloaded("q", "queue_full", retry_after=1.0, queue_size=1, in_flight=1))
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps == [4.0, 8.0]


async def test_hint_beats_full_jitter(jclock: FakeClock) -> None:
    config = RetryConfig(max_attempts=2, backoff_base=4.0, budget_ratio=None)
    retry = Retry("model", config, clock=jclock, events=EventBus(), rng=FixedRandom(0.5))
    fn = Flaky(1, lambda n: HintedError(3))
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps == [3.0]  # jittered backoff would be 2.0; the hint wins


async def test_any_numeric_retry_after_attribute_counts(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=4)
    hints: list[object] = [5, 2.5, "soon"]  # a non-numeric hint is ignored: backoff applies
    fn = Flaky(3, lambda n: HintedError(hints[n - 1]))
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps == [5.0, 2.5, 4.0]


async def test_too_long_retry_after_gives_up_at_once(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=5, max_retry_after=60.0)
    fn = always(lambda n: Rejected("down for maintenance", retry_after=300.0))
    with pytest.raises(Rejected) as info:
        await retry.call(fn)
    assert fn.calls == 1
    assert jclock.sleeps == []
    assert notes(info.value) == ["brownout retry 'model' gave up after 1 attempts: retry_after too long"]
    assert retry.stats.gave_up["retry_after too long"] == 1


async def test_retry_after_equal_to_the_limit_is_acceptable(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=2, max_retry_after=60.0)
    fn = Flaky(1, lambda n: Rejected("busy", retry_after=60.0))
    assert await retry.call(fn) == "ok"
    assert jclock.sleeps == [60.0]


# --- deadlines -------------------------------------------------------------------------------------


async def test_never_sleeps_past_the_deadline(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=10, backoff_base=1.0)
    fn = always()
    start = jclock.now()
    with pytest.raises(Boom) as info:
        async with deadline(2.5, clock=jclock):
            await retry.call(fn)
    # Slept 1 s after attempt 1; the 2 s wait after attempt 2 would end at 3.0 > 2.5, so it stopped.
    assert jclock.sleeps == [1.0]
    assert sum(jclock.sleeps) < 2.5
    assert jclock.now() - start < 2.5
    assert fn.calls == 2
    assert info.value is fn.raised[-1]
    assert notes(info.value) == ["brownout retry 'model' gave up after 2 attempts: deadline"]
    assert retry.stats.gave_up["deadline"] == 1


async def test_hint_past_the_deadline_gives_up(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    fn = always(lambda n: Rejected("busy", retry_after=5.0))
    with pytest.raises(Rejected) as info:
        async with deadline(4.0, clock=jclock):
            await retry.call(fn)
    assert jclock.sleeps == []
    assert notes(info.value)[-1].endswith(": deadline")


async def test_wait_exactly_reaching_the_deadline_gives_up(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3, backoff_base=2.0)
    with pytest.raises(Boom) as info:
        async with deadline(2.0, clock=jclock):
            await retry.call(always())
    assert jclock.sleeps == []
    assert notes(info.value)[-1].endswith(": deadline")


async def test_deadline_with_room_does_not_interfere(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    async with deadline(100.0, clock=jclock):
        assert await retry.call(Flaky(2)) == "ok"
    assert jclock.sleeps == [1.0, 2.0]


async def test_deadline_give_up_does_not_spend_budget(jclock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0, clock=jclock)  # one retry in all
    retry = Retry("model", RetryConfig(jitter="none"), clock=jclock, events=EventBus(), budget=budget)
    with pytest.raises(Boom):
        async with deadline(0.5, clock=jclock):
            await retry.call(always())
    assert budget.available == 1


# --- retry budgets ---------------------------------------------------------------------------------


def test_budget_allows_ratio_of_calls(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0, clock=clock)
    assert not budget.try_spend()  # no calls, no reserve: nothing to spend
    for _ in range(100):
        budget.record_call()
    assert budget.available == 20
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 20
    assert budget.available == 0
    assert not budget.try_spend()


def test_budget_window_slides_with_clock_time(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(50):
        budget.record_call()
    clock.advance(5)
    for _ in range(50):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(30)) == 20
    clock.advance(4.9)  # the first 50 calls are still inside the window
    assert not budget.try_spend()
    clock.advance(0.1)  # 10 s after the first calls: they have left the window, the retries have not
    # 50 calls remain (10 retries' worth) but the 20 retries spent at t+5 are still inside: none left.
    assert budget.available == 0
    assert not budget.try_spend()
    clock.advance(5)  # now the t+5 calls and the retries spent then have left too
    assert budget.available == 0
    for _ in range(10):
        budget.record_call()
    assert budget.available == 2
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()


def test_budget_counts_retries_against_the_window_they_were_spent_in(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=3.0, clock=clock)
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.advance(1)
    for _ in range(10):
        budget.record_call()
    # 20 calls in the window allow 10 retries; 5 are spent.
    assert budget.available == 5
    clock.advance(2)  # the first second has left the 3 s window: 10 calls and the 5 retries with it
    assert budget.available == 5
    clock.advance(1)
    assert budget.available == 0


def test_budget_min_per_second_is_a_floor(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0, clock=clock)
    assert budget.available == 10
    assert sum(budget.try_spend() for _ in range(15)) == 10
    clock.advance(10)
    assert budget.available == 10


def test_budget_fractional_window_rounds_up_to_whole_seconds(clock: FakeClock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=1.5, clock=clock)
    budget.record_call()
    clock.advance(1)
    budget.record_call()
    assert budget.available == 2
    clock.advance(1)
    assert budget.available == 1


def test_budget_rejects_bad_settings(clock: FakeClock) -> None:
    for kwargs, key in (
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"window": 0.0}, "window"),
    ):
        with pytest.raises(ConfigError) as info:
            RetryBudget(clock=clock, **kwargs)
        assert info.value.key == key


async def test_retry_budget_limits_retries_across_calls(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=2, backoff_base=0.0, budget_ratio=0.2, budget_min_per_second=0.0)
    first: list[str] = []
    for i in range(100):
        with pytest.raises(Boom) as info:
            await retry.call(always())
        if i == 0:
            first = notes(info.value)
    stats = retry.stats
    assert stats.calls == 100
    assert stats.retries == 20
    assert stats.gave_up["retry budget exhausted"] == 80
    assert stats.gave_up["attempts exhausted"] == 20
    # One call earns 0.2 of a retry: the first call could not retry; the 100th spent the 20th retry.
    assert first == ["brownout retry 'model' gave up after 1 attempts: retry budget exhausted"]
    assert notes(info.value) == ["brownout retry 'model' gave up after 2 attempts: attempts exhausted"]


async def test_budget_from_config_and_disabled(jclock: FakeClock) -> None:
    retry = Retry(
        "r", RetryConfig(budget_ratio=0.5, budget_min_per_second=2.0, budget_window=4.0), clock=jclock
    )
    assert retry.budget is not None
    assert (retry.budget.ratio, retry.budget.min_per_second, retry.budget.window) == (0.5, 2.0, 4.0)
    assert Retry("r", RetryConfig(budget_ratio=None), clock=jclock).budget is None


async def test_budget_disabled_retries_freely(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3, backoff_base=0.0, budget_ratio=None)
    for _ in range(50):
        with pytest.raises(Boom):
            await retry.call(always())
    assert retry.stats.retries == 100


async def test_shared_budget_across_two_retries(jclock: FakeClock) -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, clock=jclock)
    cfg = RetryConfig(max_attempts=3, backoff_base=0.0, jitter="none")
    healthy = Retry("a", cfg, clock=jclock, events=EventBus(), budget=budget)
    failing = Retry("b", cfg, clock=jclock, events=EventBus(), budget=budget)
    assert healthy.budget is budget
    assert failing.budget is budget
    for _ in range(10):
        await healthy.call(Flaky(0))
    # 10 calls through "a" earn 5 retries, and each call through "b" half a retry more.
    with pytest.raises(Boom):
        await failing.call(always())
    with pytest.raises(Boom):
        await failing.call(always())
    with pytest.raises(Boom) as info:
        await failing.call(always())
    # 11, 12 and 13 calls allow 5, 6 and 6 retries in all: b's calls got 2, 2 and 2 retries.
    assert failing.stats.retries == 6
    assert budget.available == 0
    assert notes(info.value)[-1].endswith("attempts exhausted")
    # "a"'s 14th call earns the 7th retry and spends it; its next retry finds the budget empty.
    with pytest.raises(Boom) as info:
        await healthy.call(always())
    assert healthy.stats.retries == 1
    assert notes(info.value) == ["brownout retry 'a' gave up after 2 attempts: retry budget exhausted"]


async def test_1000_concurrent_calls_share_a_budget(clock: FakeClock) -> None:
    retry = Retry(
        "model",
        RetryConfig(
            max_attempts=2, jitter="none", backoff_base=1.0, budget_ratio=0.2, budget_min_per_second=0
        ),
        clock=clock,
        events=EventBus(),
    )
    fns = [Flaky(1) for _ in range(1000)]
    tasks = [asyncio.create_task(retry.call(fn)) for fn in fns]
    await clock.run(0)
    assert all(fn.calls == 1 for fn in fns)  # every first attempt failed; retries are waiting
    await clock.run(1.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(r == "ok" for r in results) == 200
    assert sum(isinstance(r, Boom) for r in results) == 800
    assert retry.stats.retries == 200
    assert retry.stats.gave_up["retry budget exhausted"] == 800


# --- the attempts() form ---------------------------------------------------------------------------


async def test_attempts_form_succeeds_after_failures(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=5)
    fn = Flaky(2)
    numbers: list[int] = []
    result = None
    async for attempt in retry.attempts():
        with attempt:
            numbers.append(attempt.number)
            result = await fn()
    assert result == "ok"
    assert numbers == [1, 2, 3]
    assert jclock.sleeps == [1.0, 2.0]
    assert retry.stats.calls == 1
    assert retry.stats.retries == 2


async def test_attempts_form_first_success_runs_once(jclock: FakeClock) -> None:
    retry = make_retry(jclock)
    numbers: list[int] = []
    async for attempt in retry.attempts():
        with attempt:
            numbers.append(attempt.number)
    assert numbers == [1]
    assert jclock.sleeps == []


async def test_attempts_form_exhausted_raises_last_error_with_note(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    fn = always()
    numbers: list[int] = []

    async def loop() -> None:
        async for attempt in retry.attempts():
            with attempt:
                numbers.append(attempt.number)
                await fn()

    with pytest.raises(Boom) as info:
        await loop()
    assert numbers == [1, 2, 3]
    assert info.value is fn.raised[-1]
    assert notes(info.value) == ["brownout retry 'model' gave up after 3 attempts: attempts exhausted"]
    assert jclock.sleeps == [1.0, 2.0]
    assert retry.stats.gave_up["attempts exhausted"] == 1


async def test_attempts_form_non_retriable_propagates_at_once(jclock: FakeClock) -> None:
    retry = make_retry(jclock, retry_on=(Boom,))
    numbers: list[int] = []

    async def loop() -> None:
        async for attempt in retry.attempts():
            with attempt:
                numbers.append(attempt.number)
                raise Fatal("no")

    with pytest.raises(Fatal) as info:
        await loop()
    assert numbers == [1]
    assert notes(info.value) == []
    assert jclock.sleeps == []


async def test_attempts_form_honours_deadline_and_hints(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=5)

    async def loop() -> None:
        async with deadline(10.0, clock=jclock):
            async for attempt in retry.attempts():
                with attempt:
                    raise Rejected("busy", retry_after=4.0)

    with pytest.raises(Rejected) as info:
        await loop()
    # Waits 4 s twice (t=8), then a third 4 s wait would pass the deadline at t=10.
    assert jclock.sleeps == [4.0, 4.0]
    assert notes(info.value) == ["brownout retry 'model' gave up after 3 attempts: deadline"]


async def test_attempts_form_does_not_retry_base_exceptions(jclock: FakeClock) -> None:
    retry = make_retry(jclock, retry_on=(BaseException,))
    numbers: list[int] = []

    async def loop() -> None:
        async for attempt in retry.attempts():
            with attempt:
                numbers.append(attempt.number)
                raise Abort

    with pytest.raises(Abort):
        await loop()
    assert numbers == [1]


async def test_attempts_form_counts_a_budgeted_call(jclock: FakeClock) -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, clock=jclock)
    retry = Retry("model", RetryConfig(jitter="none"), clock=jclock, events=EventBus(), budget=budget)
    async for attempt in retry.attempts():
        with attempt:
            if attempt.number == 1:
                raise Boom(1)
    assert retry.stats.retries == 1
    assert budget.available == 0  # the loop recorded one call, and spent its one retry


# --- cancellation ----------------------------------------------------------------------------------


async def test_cancellation_during_backoff_sleep_propagates(clock: FakeClock) -> None:
    retry = make_retry(clock, max_attempts=5, backoff_base=10.0)
    fn = always()
    task = asyncio.create_task(retry.call(fn))
    await clock.run(1.0)
    assert fn.calls == 1
    assert clock.sleeps == [10.0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await clock.run(100.0)
    assert fn.calls == 1  # nothing was tried after the cancellation
    assert notes(fn.raised[0]) == []
    assert clock.pending_timers == 0


async def test_cancellation_during_attempts_sleep_propagates(clock: FakeClock) -> None:
    retry = make_retry(clock, max_attempts=5, backoff_base=10.0)
    numbers: list[int] = []

    async def loop() -> None:
        async for attempt in retry.attempts():
            with attempt:
                numbers.append(attempt.number)
                raise Boom(attempt.number)

    task = asyncio.create_task(loop())
    await clock.run(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await clock.run(100.0)
    assert numbers == [1]


async def test_cancellation_during_an_attempt_is_not_retried(clock: FakeClock) -> None:
    retry = make_retry(clock, max_attempts=5, retry_on=(BaseException,))
    started = 0

    async def slow() -> None:
        nonlocal started
        started += 1
        await clock.sleep(100.0)

    task = asyncio.create_task(retry.call(slow))
    await clock.run(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started == 1
    assert retry.stats.retries == 0


# --- events, forms, config -------------------------------------------------------------------------


async def test_events_emitted_on_retry_and_give_up(jclock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    retry = make_retry(jclock, bus, max_attempts=3)
    start = jclock.now()
    with pytest.raises(Boom):
        await retry.call(always())
    assert seen == [
        RetryAttempted("model", start, attempt=2, delay=1.0, error="Boom: 1"),
        RetryAttempted("model", start + 1.0, attempt=3, delay=2.0, error="Boom: 2"),
        RetryGaveUp("model", start + 3.0, attempts=3, reason="attempts exhausted", error="Boom: 3"),
    ]


async def test_no_events_on_success_or_non_retriable(jclock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    retry = make_retry(jclock, bus, retry_on=(Boom,))
    await retry.call(Flaky(0))
    with pytest.raises(Fatal):
        await retry.call(always(lambda n: Fatal(n)))
    assert seen == []


async def test_decorator_and_wrap_forms(jclock: FakeClock) -> None:
    retry = make_retry(jclock, max_attempts=3)
    fn = Flaky(2)

    @retry
    async def predict(x: int) -> str:
        """Docstring survives."""
        return f"{await fn()}-{x}"

    assert await predict(7) == "ok-7"
    assert predict.__name__ == "predict"
    assert predict.__doc__ == "Docstring survives."
    wrapped: Callable[[], Awaitable[str]] = retry.wrap(Flaky(1))
    assert await wrapped() == "ok"
    assert retry.stats.calls == 2
    assert retry.stats.retries == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("backoff_base", -1.0),
        ("backoff_multiplier", 0.5),
        ("backoff_max", -1.0),
        ("jitter", "half"),
        ("retry_on", ()),
        ("retry_on", (int,)),
        ("retry_if", 3),
        ("max_retry_after", -1.0),
        ("budget_ratio", 1.5),
        ("budget_min_per_second", -1.0),
        ("budget_window", 0.0),
        ("max_retries", 3),  # the seed's name is not ours: unknown keys are errors
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        RetryConfig(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_config_defaults_follow_the_seed() -> None:
    config = RetryConfig()
    assert config.max_attempts == 3
    assert config.backoff_base == 1.0
    assert config.jitter == "full"
    assert config.retry_on == (Exception,)
    assert config.budget_ratio == 0.2


def test_repr_names_the_retry(clock: FakeClock) -> None:
    assert "'model'" in repr(Retry("model", clock=clock))
