"""Background work: the periodic loop every long-lived part runs its rounds in, and the set of one-shot tasks.

All on :class:`FakeClock`: nothing here sleeps for real.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.background import STOP, Periodic, TaskSet
from brownout.testing import FakeClock


def _alive(name: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]


# -- Periodic: the rhythm ------------------------------------------------------------------------


async def test_the_first_round_runs_at_start_then_one_every_interval(clock: FakeClock) -> None:
    seen: list[float] = []
    loop = Periodic("rounds", lambda: seen.append(clock.now()), 5.0, clock=clock)
    loop.start()
    await clock.run(0)
    assert seen == [1000.0]
    await clock.run(12)
    assert seen == [1000.0, 1005.0, 1010.0]
    await loop.stop()
    await clock.run(20)
    assert seen == [1000.0, 1005.0, 1010.0]
    assert clock.pending_timers == 0


async def test_without_immediately_the_loop_waits_one_interval_first(clock: FakeClock) -> None:
    seen: list[float] = []
    loop = Periodic("later", lambda: seen.append(clock.now()), 5.0, clock=clock, immediately=False)
    loop.start()
    await clock.run(4.9)
    assert seen == []
    await clock.run(5.2)
    assert seen == [1005.0, 1010.0]
    await loop.stop()


async def test_the_interval_counts_from_the_end_of_a_round(clock: FakeClock) -> None:
    seen: list[float] = []

    async def slow_round() -> None:
        seen.append(clock.now())
        await clock.sleep(2)

    loop = Periodic("slow", slow_round, 5.0, clock=clock)
    loop.start()
    await clock.run(15)
    assert seen == [1000.0, 1007.0, 1014.0]
    await loop.stop()


async def test_an_interval_given_as_a_function_is_read_before_each_wait(clock: FakeClock) -> None:
    interval = [5.0]
    seen: list[float] = []
    loop = Periodic("follows", lambda: seen.append(clock.now()), lambda: interval[0], clock=clock)
    loop.start()
    await clock.run(0)  # the first round ran, the 5 s wait after it began
    interval[0] = 1.0  # read when the wait after the next round begins
    await clock.run(7)
    assert seen == [1000.0, 1005.0, 1006.0, 1007.0]
    assert loop.interval == 1.0
    await loop.stop()


async def test_a_long_stretch_of_fake_time_takes_no_real_time() -> None:
    clock = FakeClock()
    rounds = 0

    def count() -> None:
        nonlocal rounds
        rounds += 1

    started = time.monotonic()
    async with Periodic("an hour", count, 60.0, clock=clock) as loop:
        await clock.run(3600)
        assert loop.running
    assert rounds == 61
    assert time.monotonic() - started < 5


# -- Periodic: errors and endings -----------------------------------------------------------------


async def test_a_failing_round_is_logged_with_the_name_and_the_loop_goes_on(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")

    loop = Periodic("flaky-loop", flaky, 1.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="brownout.background"):
        loop.start()
        await clock.run(3)
    assert calls == 4
    assert loop.running
    failed = [r for r in caplog.records if r.name == "brownout.background"]
    assert len(failed) == 1
    assert "flaky-loop" in failed[0].getMessage()
    assert failed[0].exc_info is not None
    assert "boom" in str(failed[0].exc_info[1])
    await loop.stop()


async def test_a_failing_round_goes_to_the_owners_logger(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    owner = logging.getLogger("brownout.test-owner")

    def fail() -> None:
        raise ValueError("bad")

    with caplog.at_level(logging.ERROR, logger="brownout.test-owner"):
        async with Periodic("owned", fail, 1.0, clock=clock, logger=owner):
            await clock.run(0)
    assert [r.name for r in caplog.records] == ["brownout.test-owner"]


async def test_a_cancellation_inside_a_round_is_not_swallowed(clock: FakeClock) -> None:
    async def cancelled() -> None:
        raise asyncio.CancelledError

    loop = Periodic("cancelled-round", cancelled, 1.0, clock=clock)
    loop.start()
    await clock.run(0)
    assert not loop.running  # the loop ended: it did not log and go on
    await loop.stop()


async def test_a_round_returning_stop_ends_the_loop(clock: FakeClock) -> None:
    seen: list[float] = []

    def until_three() -> object:
        seen.append(clock.now())
        return STOP if len(seen) == 3 else 0  # a falsy result is not a stop

    loop = Periodic("three", until_three, 1.0, clock=clock)
    loop.start()
    await clock.run(10)
    assert seen == [1000.0, 1001.0, 1002.0]
    assert not loop.running
    assert clock.pending_timers == 0
    await loop.stop()
    loop.start()  # and it can run again
    await clock.run(0)
    assert len(seen) == 4
    await loop.stop()


# -- Periodic: start and stop -------------------------------------------------------------------------


async def test_start_and_stop_are_idempotent(clock: FakeClock) -> None:
    loop = Periodic("once", lambda: None, 1.0, clock=clock)
    await loop.stop()  # before any start
    loop.start()
    loop.start()
    assert len(_alive("once")) == 1
    await loop.stop()
    await loop.stop()
    assert _alive("once") == []
    assert not loop.running
    assert repr(loop) == "<Periodic 'once' stopped>"


async def test_stop_cancels_a_round_in_progress_and_returns_once_it_has_ended(clock: FakeClock) -> None:
    events: list[str] = []

    async def long_round() -> None:
        events.append("began")
        try:
            await clock.sleep(100)
        finally:
            await asyncio.sleep(0)  # a cleanup that itself awaits
            events.append("cleaned up")

    loop = Periodic("long", long_round, 1.0, clock=clock)
    loop.start()
    await clock.run(1)
    await loop.stop()
    assert events == ["began", "cleaned up"]
    assert _alive("long") == []


@pytest.mark.parametrize("swallow", ["drop", "as an error"])
async def test_stop_ends_the_loop_even_when_the_round_swallows_the_cancellation(
    clock: FakeClock, swallow: str, caplog: pytest.LogCaptureFixture
) -> None:
    rounds = 0

    async def stubborn() -> None:
        nonlocal rounds
        rounds += 1
        try:
            await clock.sleep(100)
        except asyncio.CancelledError:
            if swallow == "as an error":
                raise ConnectionError("connection lost while cancelled") from None
            # dropped: the round just returns, as a library that absorbs a cancellation would

    loop = Periodic("stubborn", stubborn, 1.0, clock=clock)
    loop.start()
    await clock.run(1)
    async with asyncio.timeout(5):  # a hang here is the failure this test is about
        await loop.stop()
    await clock.run(10)
    assert rounds == 1
    assert _alive("stubborn") == []
    assert "a step failed" not in caplog.text  # a stop is not a failure to report


async def test_a_round_may_stop_its_own_loop(clock: FakeClock) -> None:
    seen: list[float] = []
    loop: Periodic

    async def last() -> None:
        seen.append(clock.now())
        await loop.stop()  # cannot wait for itself: the loop ends at the round's next await

    loop = Periodic("self-stopping", last, 1.0, clock=clock)
    loop.start()
    await clock.run(5)
    assert seen == [1000.0]
    assert not loop.running
    assert _alive("self-stopping") == []


async def test_a_cancelled_caller_of_stop_is_cancelled_and_the_next_start_waits(clock: FakeClock) -> None:
    release = asyncio.Event()
    active = 0
    most = 0

    async def stubborn() -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            await clock.sleep(100)
        finally:
            await release.wait()  # a slow cleanup: the task outlives its cancellation
            active -= 1

    loop = Periodic("stubborn", stubborn, 1.0, clock=clock)
    loop.start()
    await clock.run(0)
    stopper = asyncio.create_task(loop.stop())
    await clock.run(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper  # the caller's cancellation reaches the caller
    assert len(_alive("stubborn")) == 1  # the cancelled loop still cleans up
    loop.start()  # a restart meanwhile waits for it: one round at a time
    await clock.run(0)
    assert (active, most) == (1, 1)
    release.set()
    await clock.run(0)
    assert (active, most) == (1, 1)  # the new loop's first round, after the old one ended
    await loop.stop()
    assert _alive("stubborn") == []


# -- Periodic: any order of start, stop and time ------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("start")),
        st.tuples(st.just("stop")),
        st.tuples(st.just("stop-soon")),
        st.tuples(st.just("stop-abandoned")),
        st.tuples(st.just("run"), st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0])),
        st.tuples(st.just("yield")),
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=_OPS,
    round_time=st.sampled_from([0.0, 0.5, 3.0]),
    cleanup_time=st.sampled_from([0.0, 0.5]),
    immediately=st.booleans(),
)
def test_property_start_and_stop_in_any_order_never_overlap_rounds_or_leave_a_task(
    ops: list[tuple[Any, ...]], round_time: float, cleanup_time: float, immediately: bool
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        active = 0
        most = 0

        async def one_round() -> None:
            nonlocal active, most
            active += 1
            most = max(most, active)
            try:
                if round_time:
                    await clock.sleep(round_time)
            finally:
                try:  # a cleanup that awaits (where an overlap would show); a cancellation may cut it short
                    await asyncio.sleep(0)
                    if cleanup_time:
                        await clock.sleep(cleanup_time)
                finally:
                    active -= 1

        loop = Periodic("prop", one_round, 1.0, clock=clock, immediately=immediately)
        stoppers: list[asyncio.Task[None]] = []

        async def stop_and_look() -> None:
            await loop.stop()
            assert _alive("prop") == []  # stop() returns once the loop's tasks have ended

        async def stopped() -> None:
            # stop(), moving fake time meanwhile: a cleanup may be waiting on the clock.
            stopping = asyncio.create_task(stop_and_look())
            for _ in range(10):
                await clock.run(0.5)
                if stopping.done():
                    break
            assert stopping.done()
            await stopping

        for op in ops:
            if op[0] == "start":
                loop.start()
                assert loop.running
            elif op[0] == "stop":
                await stopped()
                assert not loop.running
                assert _alive("prop") == []
            elif op[0] == "stop-soon":
                stoppers.append(asyncio.create_task(loop.stop()))
            elif op[0] == "stop-abandoned":
                abandoned = asyncio.create_task(loop.stop())
                await asyncio.sleep(0)
                abandoned.cancel()
                stoppers.append(abandoned)
            elif op[0] == "run":
                await clock.run(op[1])
            else:
                await asyncio.sleep(0)
            assert most <= 1
        await stopped()
        await asyncio.gather(*stoppers, return_exceptions=True)
        assert _alive("prop") == []
        assert not loop.running
        assert active == 0
        assert most <= 1

    asyncio.run(scenario())


# -- TaskSet ------------------------------------------------------------------------------------------


async def test_a_task_set_keeps_its_tasks_until_they_end(clock: FakeClock) -> None:
    tasks = TaskSet("errands")
    first = tasks.spawn(clock.sleep(1), name="errand-1")
    second = tasks.spawn(clock.sleep(2))
    assert len(tasks) == 2
    assert set(tasks) == {first, second}
    assert first.get_name() == "errand-1"
    await clock.run(1.5)
    assert list(tasks) == [second]
    assert repr(tasks) == "<TaskSet 'errands' 1 running>"
    waiting = asyncio.create_task(tasks.wait())
    await clock.run(0)
    assert not waiting.done()
    await clock.run(1)
    await waiting
    assert len(tasks) == 0
    await tasks.wait()  # nothing to wait for


async def test_a_task_set_logs_a_failed_task_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("lost")

    tasks = TaskSet("outbox-appends")
    with caplog.at_level(logging.ERROR, logger="brownout.background"):
        tasks.spawn(fail())
        await tasks.wait()  # the error is logged, not raised
        await asyncio.sleep(0)
    messages = [r.getMessage() for r in caplog.records if r.name == "brownout.background"]
    assert len(messages) == 1
    assert "outbox-appends" in messages[0]
    assert "lost" in messages[0]
    assert len(tasks) == 0


async def test_cancel_ends_every_task_and_returns_once_they_have_ended(clock: FakeClock) -> None:
    cleaned: list[int] = []

    async def errand(n: int) -> None:
        try:
            await clock.sleep(100)
        finally:
            await asyncio.sleep(0)
            cleaned.append(n)

    tasks = TaskSet("runs")
    spawned = [tasks.spawn(errand(n)) for n in range(3)]
    await clock.run(0)
    await tasks.cancel()
    assert sorted(cleaned) == [0, 1, 2]
    assert all(t.cancelled() for t in spawned)
    await asyncio.sleep(0)
    assert len(tasks) == 0
