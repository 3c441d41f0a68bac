"""Tests of brownout.policies.deadline: scopes, nesting, propagation, cancellation and the policy forms."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from pydantic import ValidationError

from brownout.clock import SYSTEM_CLOCK
from brownout.errors import DeadlineExceeded, Rejected
from brownout.events import DeadlineExpired, Event, EventBus
from brownout.policies import deadline as deadline_module
from brownout.policies.deadline import Deadline, DeadlineConfig, current_deadline, deadline, remaining
from brownout.testing import FakeClock


class Op:
    """An awaited operation of fixed fake duration that records whether it finished or was cancelled."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.finished = False
        self.cancelled = False

    async def __call__(self) -> str:
        try:
            await self.clock.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True
        return "done"


def queued(clock: FakeClock) -> int:
    """Entries the clock's deadline watcher holds, finished or not."""
    return deadline_module._watchers[id(clock)].queued


# --- one scope -------------------------------------------------------------------------------------


async def test_block_that_finishes_in_time_returns_normally(clock: FakeClock) -> None:
    op = Op(clock, 1.5)

    async def work() -> str:
        async with deadline(2.0, clock=clock):
            return await op()

    task = asyncio.create_task(work())
    await clock.run(1.5)
    assert task.done()
    assert task.result() == "done"
    assert op.finished
    await clock.run(10.0)  # the (lazily kept) watcher timer firing later cancels nothing
    assert not op.cancelled


async def test_overrun_raises_deadline_exceeded_and_cancels_the_operation(
    clock: FakeClock, bus: EventBus
) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    op = Op(clock, 10.0)

    async def work() -> str:
        async with deadline(2.0, clock=clock, events=bus, name="predict"):
            return await op()

    task = asyncio.create_task(work())
    await clock.run(1.9)
    assert not task.done()
    assert not op.cancelled
    await clock.run(0.1)
    assert task.done()
    exc = task.exception()
    assert isinstance(exc, DeadlineExceeded)
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, Rejected)
    assert exc.timeout == 2.0
    assert exc.retry_after == 1.0
    assert exc.policy == "predict"
    assert isinstance(exc.__cause__, asyncio.CancelledError)
    assert op.cancelled
    assert not op.finished
    assert seen == [DeadlineExpired("predict", 1002.0, 2.0)]


async def test_no_event_when_the_block_finishes_in_time(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)

    async def work() -> None:
        async with deadline(2.0, clock=clock, events=bus):
            await clock.sleep(1.0)

    task = asyncio.create_task(work())
    await clock.run(5.0)
    task.result()
    assert seen == []


async def test_other_errors_pass_through_unchanged(clock: FakeClock) -> None:
    error = KeyError("x")
    with pytest.raises(KeyError) as info:
        async with deadline(2.0, clock=clock):
            raise error
    assert info.value is error
    assert remaining() is None


async def test_remaining_outside_any_scope_is_none(clock: FakeClock) -> None:
    assert remaining() is None
    assert current_deadline() is None
    async with deadline(None, clock=clock):
        assert remaining() is None
        assert current_deadline() is None
    async with deadline(3.0, clock=clock):
        assert remaining() == 3.0
        assert current_deadline() == clock.now() + 3.0
    assert remaining() is None


async def test_remaining_counts_down_with_clock_time(clock: FakeClock) -> None:
    samples: list[float | None] = []

    async def work() -> None:
        async with deadline(3.0, clock=clock):
            samples.append(remaining())
            await clock.sleep(1.0)
            samples.append(remaining())
            await clock.sleep(1.5)
            samples.append(remaining())

    task = asyncio.create_task(work())
    await clock.run(3.0)
    task.result()
    assert samples == [3.0, 2.0, 0.5]


async def test_non_positive_timeout_raises_at_once(clock: FakeClock) -> None:
    ran = False
    for timeout in (0.0, -1.0):
        with pytest.raises(DeadlineExceeded):
            async with deadline(timeout, clock=clock):
                ran = True
    assert not ran
    assert remaining() is None


# --- nesting ---------------------------------------------------------------------------------------


async def test_inner_looser_scope_is_bound_by_the_outer(clock: FakeClock) -> None:
    op = Op(clock, 10.0)
    seen: dict[str, Any] = {}

    async def work() -> str:
        async with deadline(2.0, clock=clock, name="outer"):
            outer_when = current_deadline()
            try:
                async with deadline(5.0, clock=clock, name="inner"):
                    seen["remaining"] = remaining()
                    seen["same_when"] = current_deadline() == outer_when
                    return await op()
            except BaseException as e:
                seen["inner_saw"] = e
                raise

    task = asyncio.create_task(work())
    await clock.run(1.5)
    assert not task.done()
    await clock.run(0.5)
    exc = task.exception()
    assert isinstance(exc, DeadlineExceeded)
    assert exc.timeout == 2.0  # the outer's deadline fired, and the outer reported it
    assert exc.policy == "outer"
    assert seen["remaining"] == 2.0
    assert seen["same_when"]
    # The inner scope did not own the cancellation, so it let it pass as a cancellation.
    assert isinstance(seen["inner_saw"], asyncio.CancelledError)
    assert op.cancelled


async def test_inner_tighter_scope_fires_and_outer_continues(clock: FakeClock) -> None:
    inner_op = Op(clock, 10.0)
    seen: dict[str, Any] = {}

    async def work() -> str:
        async with deadline(5.0, clock=clock, name="outer"):
            try:
                async with deadline(1.0, clock=clock, name="inner"):
                    seen["inner_remaining"] = remaining()
                    await inner_op()
            except DeadlineExceeded as e:
                seen["inner_error"] = e
            seen["after_inner"] = remaining()
            await clock.sleep(2.0)  # still well inside the outer's 5 s
            return "outer ok"

    task = asyncio.create_task(work())
    await clock.run(1.0)
    assert "inner_error" in seen
    assert not task.done()
    await clock.run(2.0)
    assert task.result() == "outer ok"
    assert seen["inner_remaining"] == 1.0
    assert seen["inner_error"].timeout == 1.0
    assert seen["inner_error"].policy == "inner"
    assert seen["after_inner"] == 4.0
    assert inner_op.cancelled


async def test_both_scopes_expiring_together_report_the_outer(clock: FakeClock) -> None:
    seen: list[BaseException] = []

    async def work() -> None:
        async with deadline(2.0, clock=clock, name="outer"):
            try:
                async with deadline(1.9, clock=clock, name="inner"):
                    await clock.sleep(10.0)
            except BaseException as e:
                seen.append(e)
                raise

    task = asyncio.create_task(work())
    await clock.run(0)
    clock.advance(2.5)  # one jump past both deadlines: both fire before the task runs again
    await clock.run(0)
    exc = task.exception()
    # The inner scope sees a second cancellation that is not its own, so it does not claim it.
    assert isinstance(seen[0], asyncio.CancelledError)
    assert isinstance(exc, DeadlineExceeded)
    assert exc.policy == "outer"


async def test_entering_a_scope_after_the_outer_deadline_raises_at_once(clock: FakeClock) -> None:
    seen: dict[str, Any] = {}
    entered: list[float | None] = []

    async def work() -> None:
        async with deadline(1.0, clock=clock, name="outer"):
            # Swallowing a cancellation is bad manners, but it leaves us inside an expired scope.
            with contextlib.suppress(asyncio.CancelledError):
                await clock.sleep(5.0)
            seen["remaining"] = remaining()
            for timeout in (10.0, None):
                try:
                    async with deadline(timeout, clock=clock, name="late"):
                        entered.append(timeout)
                except DeadlineExceeded as e:
                    seen.setdefault("errors", []).append(e)
            seen["clean_exit"] = True

    task = asyncio.create_task(work())
    await clock.run(2.0)
    task.result()
    assert seen["remaining"] == 0.0
    assert entered == []
    assert [e.policy for e in seen["errors"]] == ["late", "late"]
    assert seen["clean_exit"]


async def test_deadline_none_inherits_the_enclosing_one(clock: FakeClock) -> None:
    async def work() -> float | None:
        async with deadline(2.0, clock=clock), deadline(None, clock=clock):
            left = remaining()
            await clock.sleep(10.0)
            return left

    task = asyncio.create_task(work())
    await clock.run(2.0)
    assert isinstance(task.exception(), DeadlineExceeded)


async def test_outer_deadline_on_another_clock_still_bounds_remaining(clock: FakeClock) -> None:
    other = FakeClock(start=50.0)
    async with deadline(2.0, clock=clock), deadline(10.0, clock=other):
        assert remaining() == 2.0
        assert current_deadline() == 52.0  # expressed on the inner scope's clock


# --- cancellation from outside ---------------------------------------------------------------------


async def test_external_cancel_stays_a_cancellation(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    op = Op(clock, 10.0)

    async def work() -> str:
        async with deadline(5.0, clock=clock, events=bus):
            return await op()

    task = asyncio.create_task(work())
    await clock.run(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert op.cancelled
    assert seen == []
    await clock.run(10.0)  # the deadline passing later has nothing left to cancel


async def test_external_cancel_at_the_moment_the_deadline_fires_stays_a_cancellation(
    clock: FakeClock,
) -> None:
    async def work() -> None:
        async with deadline(2.0, clock=clock):
            await clock.sleep(10.0)

    task = asyncio.create_task(work())
    await clock.run(0)
    clock.advance(2.0)  # the watcher cancels the task...
    task.cancel()  # ...and so does someone else, before the task runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


# --- many tasks and many scopes --------------------------------------------------------------------


async def test_1000_concurrent_tasks_each_with_its_own_deadline(clock: FakeClock) -> None:
    n = 1000
    limits = [1.0 + (i % 10) * 0.1 for i in range(n)]
    overruns = {i for i in range(n) if (i // 10) % 2 == 1}
    durations = [limits[i] + 0.05 if i in overruns else limits[i] - 0.05 for i in range(n)]
    ops = [Op(clock, d) for d in durations]

    async def work(i: int) -> str:
        async with deadline(limits[i], clock=clock):
            return await ops[i]()

    tasks = [asyncio.create_task(work(i)) for i in range(n)]
    await clock.run(3.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    raised = {i for i, r in enumerate(results) if isinstance(r, DeadlineExceeded)}
    assert raised == overruns
    assert len(raised) == n // 2
    assert all(results[i] == "done" for i in range(n) if i not in overruns)
    assert all(ops[i].cancelled == (i in overruns) for i in range(n))
    assert {results[i].timeout for i in raised} == set(limits)  # type: ignore[union-attr]


async def test_quick_scopes_do_not_leak_watcher_entries(clock: FakeClock) -> None:
    policy = Deadline("p", DeadlineConfig(timeout=30.0), clock=clock)

    async def nothing() -> None:
        await asyncio.sleep(0)

    for _ in range(5000):
        async with deadline(30.0, clock=clock):
            pass
        await policy.call(nothing)
        async with policy:
            pass
    assert queued(clock) <= 2


async def test_quick_scopes_with_distinct_timeouts_are_released_when_time_passes(clock: FakeClock) -> None:
    # More distinct timeouts than the watcher keeps lanes for: the rest go through its heap.
    for i in range(5000):
        async with deadline(1.0 + i / 10_000, clock=clock):
            pass
    await clock.run(0.5)
    assert queued(clock) <= 5000
    await clock.run(0.6)  # the earliest (finished) deadline passes: the watcher wakes and sweeps
    assert queued(clock) == 0


async def test_entries_queued_behind_a_live_scope_are_released(clock: FakeClock) -> None:
    long_op = Op(clock, 3.0)

    async def long() -> str:
        async with deadline(5.0, clock=clock):
            return await long_op()

    task = asyncio.create_task(long())
    await clock.run(0)
    for _ in range(5000):
        async with deadline(5.0, clock=clock):
            pass
    assert queued(clock) <= 5001  # bounded by what starts during one live scope of that timeout
    await clock.run(3.0)
    assert task.result() == "done"
    async with deadline(5.0, clock=clock):
        pass
    assert queued(clock) <= 1


async def test_many_live_and_quick_scopes_keep_deadlines_enforced(clock: FakeClock) -> None:
    # 50 long scopes stay live while 5000 quick ones come and go around them.
    ops = [Op(clock, 100.0) for _ in range(50)]

    async def slow(op: Op) -> str:
        async with deadline(20.0, clock=clock):
            return await op()

    async def quick() -> None:
        for _ in range(100):
            async with deadline(5.0, clock=clock):
                await asyncio.sleep(0)

    slow_tasks = [asyncio.create_task(slow(op)) for op in ops]
    quick_tasks = [asyncio.create_task(quick()) for _ in range(50)]
    await asyncio.gather(*quick_tasks)
    assert queued(clock) <= 200
    await clock.run(19.0)
    assert not any(t.done() for t in slow_tasks)
    await clock.run(1.0)
    results = await asyncio.gather(*slow_tasks, return_exceptions=True)
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert all(op.cancelled for op in ops)


async def test_scopes_that_expire_leave_the_heap(clock: FakeClock) -> None:
    async def work() -> None:
        async with deadline(1.0, clock=clock):
            await clock.sleep(5.0)

    tasks = [asyncio.create_task(work()) for _ in range(100)]
    await clock.run(1.0)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert queued(clock) == 0


# --- the Deadline policy ---------------------------------------------------------------------------


async def test_policy_call_success_and_overrun(clock: FakeClock) -> None:
    policy = Deadline("model", DeadlineConfig(timeout=2.0), clock=clock, events=EventBus())
    fast, slow = Op(clock, 1.0), Op(clock, 3.0)

    async def both() -> tuple[Any, Any]:
        a = await policy.call(fast)
        try:
            b: Any = await policy.call(slow)
        except DeadlineExceeded as e:
            b = e
        return a, b

    task = asyncio.create_task(both())
    await clock.run(3.0)
    a, b = task.result()
    assert a == "done"
    assert isinstance(b, DeadlineExceeded)
    assert b.timeout == 2.0
    assert b.policy == "model"
    assert slow.cancelled


async def test_policy_call_passes_arguments_and_errors(clock: FakeClock) -> None:
    policy = Deadline(config=DeadlineConfig(timeout=2.0), clock=clock)

    async def add(a: int, *, b: int) -> int:
        assert remaining() == 2.0
        return a + b

    async def fail() -> None:
        raise LookupError("nope")

    assert await policy.call(add, 1, b=2) == 3
    with pytest.raises(LookupError, match="nope"):
        await policy.call(fail)
    assert remaining() is None


async def test_policy_call_respects_a_tighter_enclosing_deadline(clock: FakeClock) -> None:
    policy = Deadline(config=DeadlineConfig(timeout=30.0), clock=clock)
    seen: list[float | None] = []

    async def probe() -> None:
        seen.append(remaining())
        await clock.sleep(10.0)

    async def work() -> None:
        async with deadline(1.0, clock=clock, name="request"):
            await policy.call(probe)

    task = asyncio.create_task(work())
    await clock.run(1.0)
    exc = task.exception()
    assert isinstance(exc, DeadlineExceeded)
    assert exc.policy == "request"
    assert seen == [1.0]


async def test_policy_decorator(clock: FakeClock) -> None:
    policy = Deadline("decorated", DeadlineConfig(timeout=1.0), clock=clock)

    @policy
    async def nap(seconds: float) -> float:
        """Sleeps on the fake clock."""
        await clock.sleep(seconds)
        return seconds

    assert nap.__name__ == "nap"
    ok = asyncio.create_task(nap(0.5))
    late = asyncio.create_task(nap(5.0))
    await clock.run(1.0)
    assert ok.result() == 0.5
    assert isinstance(late.exception(), DeadlineExceeded)


async def test_policy_async_with_used_concurrently(clock: FakeClock) -> None:
    policy = Deadline("shared", DeadlineConfig(timeout=2.0), clock=clock)
    n = 200
    ops = [Op(clock, 1.0 if i % 2 == 0 else 3.0) for i in range(n)]

    async def work(i: int) -> str:
        async with policy as scope:
            assert isinstance(scope, deadline)
            assert remaining() == 2.0
            return await ops[i]()

    tasks = [asyncio.create_task(work(i)) for i in range(n)]
    await clock.run(5.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(results):
        if i % 2 == 0:
            assert r == "done"
        else:
            assert isinstance(r, DeadlineExceeded)
    assert remaining() is None


async def test_policy_async_with_nested_on_one_object(clock: FakeClock) -> None:
    outer = Deadline("outer", DeadlineConfig(timeout=5.0), clock=clock)
    inner = Deadline("inner", DeadlineConfig(timeout=1.0), clock=clock)
    seen: list[Any] = []

    async def work() -> None:
        async with outer:
            try:
                async with inner, inner:  # the same policy object entered twice in one task
                    seen.append(remaining())
                    await clock.sleep(3.0)
            except DeadlineExceeded as e:
                seen.append(e.policy)
            seen.append(remaining())

    task = asyncio.create_task(work())
    await clock.run(2.0)
    task.result()
    assert seen == [1.0, "inner", 4.0]


async def test_policy_async_with_overrun_cancels(clock: FakeClock) -> None:
    policy = Deadline("block", DeadlineConfig(timeout=1.0), clock=clock)
    op = Op(clock, 5.0)

    async def work() -> None:
        async with policy:
            await op()

    task = asyncio.create_task(work())
    await clock.run(1.0)
    assert isinstance(task.exception(), DeadlineExceeded)
    assert op.cancelled


async def test_policy_scope_is_fresh_each_time(clock: FakeClock) -> None:
    policy = Deadline(config=DeadlineConfig(timeout=1.0), clock=clock)
    assert policy.scope() is not policy.scope()
    async with policy.scope():
        assert remaining() == 1.0


def test_policy_config_defaults_and_validation() -> None:
    assert DeadlineConfig().timeout == 30.0
    assert Deadline().timeout == 30.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValidationError) as info:
            DeadlineConfig(timeout=bad)
        assert info.value.errors()[0]["loc"] == ("timeout",)
    with pytest.raises(ValidationError, match="deadline"):
        DeadlineConfig(deadline=3.0)  # type: ignore[call-arg]


# --- the real clock (the only real-time tests: short) ----------------------------------------------


async def test_real_clock_tiny_timeout_interrupts_a_wait() -> None:
    event = asyncio.Event()
    with pytest.raises(DeadlineExceeded) as info:
        async with deadline(0.01):
            await event.wait()
    assert info.value.timeout == 0.01
    assert remaining() is None


async def test_real_clock_fast_block_and_default_clock() -> None:
    async with deadline(5.0) as scope:
        await asyncio.sleep(0)
        left = remaining()
        assert left is not None
        assert 0.0 < left <= 5.0
    assert scope._clock is SYSTEM_CLOCK
    assert remaining() is None


# --- regressions: scopes in spawned tasks, and non-finite timeouts -----------------------------


async def test_scope_in_a_spawned_task_is_enforced(clock: FakeClock) -> None:
    # create_task copies the context, so the child sees the parent's 2 s scope; that scope only ever
    # cancels the parent, so the child's own scope must enforce (at the tighter of the two).
    started = asyncio.Event()

    async def child() -> str:
        async with deadline(10.0, clock=clock):
            started.set()
            await clock.sleep(1000.0)
            return "ran to the end"

    async with deadline(2.0, clock=clock):
        task = asyncio.create_task(child())
        await started.wait()
    await clock.run(50.0)
    assert task.done()
    assert isinstance(task.exception(), DeadlineExceeded)


async def test_policy_call_in_a_spawned_task_is_enforced(clock: FakeClock) -> None:
    policy = Deadline("model", DeadlineConfig(timeout=10.0), clock=clock)

    async def job() -> str:
        await clock.sleep(1000.0)
        return "ran to the end"

    async with deadline(2.0, clock=clock):
        task = asyncio.create_task(policy.call(job))
        await asyncio.sleep(0)
    await clock.run(1.0)
    assert not task.done()
    await clock.run(1.5)  # the inherited 2 s deadline is the tighter one, and it is enforced here
    assert task.done()
    assert isinstance(task.exception(), DeadlineExceeded)


async def test_singleflight_computation_under_a_deadline_policy_is_bounded(clock: FakeClock) -> None:
    from brownout.policies.singleflight import Singleflight

    policy = Deadline("model", DeadlineConfig(timeout=10.0), clock=clock)
    flight: Singleflight[str, str] = Singleflight("f")

    async def job() -> str:
        await clock.sleep(1000.0)
        return "x"

    async def caller() -> str:
        async with deadline(2.0, clock=clock):
            return await flight.do("k", lambda: policy.call(job))

    t = asyncio.create_task(caller())
    await clock.run(3.0)
    assert isinstance(t.exception(), DeadlineExceeded)
    await clock.run(50.0)
    assert flight.in_flight == 0


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_numeric_timeouts_are_config_errors(bad: float) -> None:
    from brownout.errors import ConfigError

    with pytest.raises(ConfigError, match="timeout"):
        deadline(bad)


async def test_infinite_timeout_sets_no_entry_of_its_own(clock: FakeClock) -> None:
    import math

    async def forever() -> None:
        async with deadline(math.inf, clock=clock):
            await clock.sleep(10**9)

    t = asyncio.create_task(forever())
    await clock.run(0)
    for _ in range(5000):
        async with deadline(math.inf, clock=clock):
            assert remaining() is None
    watcher = deadline_module._watchers.get(id(clock))
    assert watcher is None or watcher.queued == 0
    t.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await t
