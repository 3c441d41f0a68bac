"""The Clock implementations (FakeClock, SystemClock) and the EventBus side channel."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from brownout import events as events_module
from brownout.clock import SYSTEM_CLOCK, Clock, SystemClock, TimerHandle
from brownout.events import (
    DEFAULT_BUS,
    BreakerStateChanged,
    CallRejected,
    Event,
    EventBus,
    RetryAttempted,
)
from brownout.testing import FakeClock, FakeTimer

# ------------------------------------------------------------------------------------- FakeClock


def test_fake_clock_starts_where_told_and_is_a_clock() -> None:
    assert FakeClock().now() == 1000.0
    assert FakeClock(start=5).now() == 5.0
    clock = FakeClock()
    assert isinstance(clock, Clock)
    assert isinstance(clock.call_later(1, lambda: None), TimerHandle)


def test_advance_fires_due_timers_in_time_order_at_their_own_time(clock: FakeClock) -> None:
    fired: list[tuple[str, float]] = []
    clock.call_later(3, lambda: fired.append(("c", clock.now())))
    clock.call_later(1, lambda: fired.append(("a", clock.now())))
    clock.call_later(2, lambda: fired.append(("b1", clock.now())))
    clock.call_later(2, lambda: fired.append(("b2", clock.now())))  # same time: scheduling order
    clock.call_later(10, lambda: fired.append(("late", clock.now())))

    clock.advance(2.5)
    assert fired == [("a", 1001.0), ("b1", 1002.0), ("b2", 1002.0)]
    assert clock.now() == 1002.5
    clock.advance(0.5)
    assert fired[-1] == ("c", 1003.0)
    assert clock.pending_timers == 1


def test_advance_fires_timers_scheduled_by_timers_within_the_span(clock: FakeClock) -> None:
    fired: list[float] = []

    def first() -> None:
        fired.append(clock.now())
        clock.call_later(1, lambda: fired.append(clock.now()))

    clock.call_later(1, first)
    clock.advance(5)
    assert fired == [1001.0, 1002.0]
    assert clock.now() == 1005.0


def test_negative_delay_fires_on_the_next_advance(clock: FakeClock) -> None:
    fired: list[float] = []
    clock.call_later(-5, lambda: fired.append(clock.now()))
    clock.advance(0)
    assert fired == [1000.0]


def test_cancelled_timer_does_not_fire(clock: FakeClock) -> None:
    fired: list[str] = []
    keep = clock.call_later(1, lambda: fired.append("keep"))
    drop = clock.call_later(1, lambda: fired.append("drop"))
    assert isinstance(drop, FakeTimer)
    drop.cancel()
    drop.cancel()  # cancelling twice is harmless
    assert clock.pending_timers == 1
    clock.advance(1)
    assert fired == ["keep"]
    keep.cancel()  # after it ran: no effect
    assert fired == ["keep"]


def test_pending_timers_counts_live_timers_only(clock: FakeClock) -> None:
    assert clock.pending_timers == 0
    timers = [clock.call_later(d, lambda: None) for d in (1, 2, 3)]
    assert clock.pending_timers == 3
    timers[2].cancel()
    assert clock.pending_timers == 2
    clock.advance(1)
    assert clock.pending_timers == 1
    clock.advance(100)
    assert clock.pending_timers == 0


def test_clock_cannot_go_backwards(clock: FakeClock) -> None:
    fired: list[str] = []
    clock.call_later(0, lambda: fired.append("x"))
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    assert clock.now() == 1000.0
    assert fired == []


async def test_sleep_waits_for_fake_time(clock: FakeClock) -> None:
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(5)
        woke.append(clock.now())

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    assert clock.pending_timers == 1
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(0.1)
    await task
    assert woke == [1005.0]
    assert clock.sleeps == [5.0]


async def test_run_lets_chained_sleeps_each_wake_before_time_moves_on(clock: FakeClock) -> None:
    woke: list[float] = []

    async def worker() -> None:
        for delay in (1, 2, 3):
            await clock.sleep(delay)
            woke.append(clock.now())

    task = asyncio.create_task(worker())
    await clock.run(6)
    assert woke == [1001.0, 1003.0, 1006.0]
    assert task.done()
    assert clock.now() == 1006.0


async def test_advance_alone_wakes_only_the_first_of_chained_sleeps(clock: FakeClock) -> None:
    # The contrast that makes run() necessary: advance() is synchronous, so the woken task schedules
    # its next sleep only afterwards, from the time advance() ended at.
    woke: list[float] = []

    async def worker() -> None:
        for delay in (1, 2):
            await clock.sleep(delay)
            woke.append(clock.now())

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    clock.advance(3)
    for _ in range(5):
        await asyncio.sleep(0)
    assert woke == [1003.0]
    clock.advance(2)
    await task
    assert woke == [1003.0, 1005.0]


async def test_run_stops_at_the_target(clock: FakeClock) -> None:
    fired: list[float] = []
    clock.call_later(2, lambda: fired.append(clock.now()))
    clock.call_later(7, lambda: fired.append(clock.now()))
    await clock.run(5)
    assert fired == [1002.0]
    assert clock.now() == 1005.0
    assert clock.pending_timers == 1


async def test_cancelling_a_sleeper_cancels_its_timer(clock: FakeClock) -> None:
    task = asyncio.create_task(clock.sleep(10))
    await asyncio.sleep(0)
    assert clock.pending_timers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.pending_timers == 0


async def test_autojump_moves_time_and_records_sleeps() -> None:
    clock = FakeClock(autojump=True)
    await clock.sleep(1.5)
    await clock.sleep(0)
    await clock.sleep(-2)  # recorded as no wait at all
    await clock.sleep(3)
    assert clock.sleeps == [1.5, 0.0, 0.0, 3.0]
    assert clock.now() == 1004.5
    assert clock.pending_timers == 0


async def test_autojump_fires_timers_it_jumps_over() -> None:
    clock = FakeClock(autojump=True)
    fired: list[float] = []
    clock.call_later(1, lambda: fired.append(clock.now()))
    await clock.sleep(2)
    assert fired == [1001.0]
    assert clock.now() == 1002.0


def test_fake_clock_repr() -> None:
    assert repr(FakeClock(start=3, autojump=True)) == "FakeClock(now=3.0, autojump=True)"


# ------------------------------------------------------------------------------------- SystemClock


def test_system_clock_now_is_monotonic_time() -> None:
    assert isinstance(SYSTEM_CLOCK, SystemClock)
    assert isinstance(SYSTEM_CLOCK, Clock)
    before = time.monotonic()
    readings = [SYSTEM_CLOCK.now() for _ in range(1000)]
    after = time.monotonic()
    assert readings == sorted(readings)
    assert before <= readings[0] <= readings[-1] <= after
    assert repr(SYSTEM_CLOCK) == "SystemClock()"


async def test_system_clock_call_later_fires_on_the_running_loop() -> None:
    clock = SystemClock()
    fired = asyncio.get_running_loop().create_future()
    handle = clock.call_later(0, lambda: fired.set_result("fired"))
    assert isinstance(handle, TimerHandle)
    assert await asyncio.wait_for(fired, timeout=5) == "fired"


async def test_system_clock_call_later_negative_delay_and_cancel() -> None:
    clock = SystemClock()
    fired: list[str] = []
    clock.call_later(-1, lambda: fired.append("negative"))
    clock.call_later(0, lambda: fired.append("cancelled")).cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert fired == ["negative"]


def test_system_clock_call_later_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        SystemClock().call_later(0, lambda: None)


async def test_system_clock_sleep_zero_and_negative_return() -> None:
    clock = SystemClock()
    await clock.sleep(0)
    await clock.sleep(-5)  # clamped, not an error

    # sleep(0) yields to the loop: a task created before it gets to run.
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    await clock.sleep(0)
    assert ran == ["other"]
    await task


# ------------------------------------------------------------------------------------- EventBus


def _changed(source: str = "b") -> BreakerStateChanged:
    return BreakerStateChanged(source, 1.0, "closed", "open", "failure rate 5/10")


def _rejected(source: str = "b") -> CallRejected:
    return CallRejected(source, 2.0, "breaker", "open", 30.0)


def test_bus_is_inactive_until_someone_subscribes(bus: EventBus) -> None:
    assert bus.active is False
    unsubscribe = bus.subscribe(lambda e: None)
    assert bus.active is True
    unsubscribe()
    assert bus.active is False


def test_subscribers_get_the_events_of_their_type(bus: EventBus) -> None:
    everything: list[Event] = []
    rejections: list[Event] = []
    changes: list[Event] = []
    bus.subscribe(everything.append)
    bus.subscribe(rejections.append, CallRejected)
    bus.subscribe(changes.append, BreakerStateChanged)
    first, second, third = _changed(), _rejected(), RetryAttempted("r", 3.0, 2, 0.5, "ModelDown")
    for event in (first, second, third):
        bus.emit(event)
    assert everything == [first, second, third]
    assert rejections == [second]
    assert changes == [first]


def test_subscribers_are_called_in_subscription_order(bus: EventBus) -> None:
    order: list[str] = []
    bus.subscribe(lambda e: order.append("first"))
    bus.subscribe(lambda e: order.append("second"))
    bus.emit(_changed())
    assert order == ["first", "second"]


def test_unsubscribe_stops_delivery_and_is_idempotent(bus: EventBus) -> None:
    got: list[Event] = []
    other: list[Event] = []
    unsubscribe = bus.subscribe(got.append)
    bus.subscribe(other.append)
    bus.emit(_changed("one"))
    unsubscribe()
    unsubscribe()  # a second call is harmless
    bus.emit(_changed("two"))
    assert [e.source for e in got] == ["one"]
    assert [e.source for e in other] == ["one", "two"]
    assert bus.active


def test_a_subscriber_may_unsubscribe_itself_during_delivery(bus: EventBus) -> None:
    got: list[str] = []
    after: list[str] = []

    def once(event: Event) -> None:
        got.append(event.source)
        unsubscribe()

    unsubscribe = bus.subscribe(once)
    bus.subscribe(lambda e: after.append(e.source))
    bus.emit(_changed("one"))
    bus.emit(_changed("two"))
    assert got == ["one"]
    assert after == ["one", "two"]


def test_a_raising_subscriber_is_logged_once_and_does_not_stop_others(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError(f"broken handler got {event.source}")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    with caplog.at_level(logging.ERROR, logger="brownout.events"):
        bus.emit(_changed("one"))
        bus.emit(_changed("two"))
        bus.emit(_rejected("three"))
    assert [e.source for e in got] == ["one", "two", "three"]
    records = [r for r in caplog.records if r.name == "brownout.events"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert "broken" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


def test_each_broken_subscriber_is_logged_once(bus: EventBus, caplog: pytest.LogCaptureFixture) -> None:
    def broken_a(event: Event) -> None:
        raise RuntimeError("a")

    def broken_b(event: Event) -> None:
        raise RuntimeError("b")

    bus.subscribe(broken_a)
    bus.subscribe(broken_b)
    with caplog.at_level(logging.ERROR, logger="brownout.events"):
        for _ in range(3):
            bus.emit(_changed())
    assert len([r for r in caplog.records if r.name == "brownout.events"]) == 2


def test_events_are_frozen_slotted_dataclasses() -> None:
    event = _rejected()
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.retry_after = 0.0  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    for name in events_module.__all__:
        obj = getattr(events_module, name)
        if isinstance(obj, type) and issubclass(obj, Event):
            assert dataclasses.is_dataclass(obj), name
            assert obj.__dataclass_params__.frozen, name  # type: ignore[attr-defined]
            assert obj.__doc__, name


def test_default_bus_is_a_shared_event_bus() -> None:
    assert isinstance(DEFAULT_BUS, EventBus)
    got: list[Event] = []
    unsubscribe = DEFAULT_BUS.subscribe(got.append)
    try:
        event = _changed()
        DEFAULT_BUS.emit(event)
        assert got == [event]
    finally:
        unsubscribe()
