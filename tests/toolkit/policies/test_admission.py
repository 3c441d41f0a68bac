"""Admission: a bulkhead with a bounded FIFO queue, load shedding and a queue-depth trip."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from brownout.errors import Overloaded, Rejected
from brownout.events import CallRejected, Event, EventBus
from brownout.policies.admission import Admission, AdmissionConfig
from brownout.policies.deadline import deadline
from brownout.testing import FakeClock
from support.wait import settle


class Gate:
    """Bodies that block until the test lets them finish, recording who ran and how many at once."""

    def __init__(self) -> None:
        self.release: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.running = 0
        self.peak = 0

    async def body(self, i: int) -> int:
        self.started.append(i)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.setdefault(i, asyncio.Event()).wait()
        finally:
            self.running -= 1
        return i

    def finish(self, i: int) -> None:
        self.release.setdefault(i, asyncio.Event()).set()


async def quick() -> None:
    """A call that returns at once (for calls a test expects to be refused)."""


def make(clock: FakeClock, bus: EventBus | None = None, **cfg: Any) -> Admission:
    return Admission("gpu", AdmissionConfig(**cfg), clock=clock, events=bus or EventBus())


# -- basic behaviour ----------------------------------------------------------------------------


async def test_fast_path_runs_and_frees_the_slot(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=2)

    async def work(x: int, *, y: int) -> int:
        assert adm.in_flight == 1
        return x + y

    assert await adm.call(work, 1, y=2) == 3
    assert adm.in_flight == 0
    assert adm.queue_size == 0
    stats = adm.stats
    assert (stats.admitted, stats.queued, stats.completed) == (1, 0, 1)
    assert stats.rejected == {"queue_full": 0, "queue_timeout": 0, "tripped": 0, "deadline": 0}


async def test_thousand_concurrent_tasks_respect_the_limit_in_fifo_order(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=10, max_queue=2000, max_wait=1e9)
    running = 0
    peak = 0
    order: list[int] = []

    async def body(i: int) -> int:
        nonlocal running, peak
        order.append(i)
        running += 1
        peak = max(peak, running)
        assert adm.in_flight <= 10
        for _ in range(3):  # stay inside a while so that slots really overlap
            await asyncio.sleep(0)
        running -= 1
        return i

    tasks = [asyncio.create_task(adm.call(body, i)) for i in range(1000)]
    results = await asyncio.gather(*tasks)

    assert results == list(range(1000))
    assert peak == 10  # saturated, and never above the limit
    assert order == list(range(1000))  # admitted first come, first served
    assert adm.in_flight == 0
    assert adm.queue_size == 0
    stats = adm.stats
    assert (stats.admitted, stats.queued, stats.completed) == (1000, 990, 1000)
    assert sum(stats.rejected.values()) == 0


async def test_a_freed_slot_goes_to_the_waiter_not_to_a_newcomer(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    waiter = asyncio.create_task(adm.call(gate.body, 1))
    await settle()
    assert adm.queue_size == 1

    gate.finish(0)
    await holder  # the slot is now handed to the waiter, which has not run yet
    assert adm.in_flight == 1
    newcomer = asyncio.create_task(adm.call(gate.body, 2))
    await settle()
    assert gate.started == [0, 1]  # the newcomer queued behind instead of barging
    assert adm.queue_size == 1
    gate.finish(1)
    gate.finish(2)
    assert await waiter == 1
    assert await newcomer == 2
    assert gate.started == [0, 1, 2]
    assert adm.in_flight == 0


async def test_exceptions_release_the_slot_to_the_next_waiter(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)
    gate = Gate()

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("model crashed")

    failing = asyncio.create_task(adm.call(boom))
    waiter = asyncio.create_task(adm.call(gate.body, 1))
    await settle()
    with pytest.raises(ValueError, match="model crashed"):
        await failing
    await settle()
    assert gate.started == [1]
    gate.finish(1)
    assert await waiter == 1
    assert adm.in_flight == 0
    assert adm.stats.completed == 2


async def test_max_queue_zero_never_waits(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_queue=0)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    await settle()
    with pytest.raises(Overloaded) as info:
        await adm.call(gate.body, 1)
    assert info.value.reason == "queue_full"
    assert (info.value.queue_size, info.value.in_flight) == (0, 1)
    gate.finish(0)
    await holder


# -- shedding -----------------------------------------------------------------------------------


async def test_queue_full_rejects_with_the_load_and_retry_after(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    adm = make(clock, bus, max_concurrent=2, max_queue=3)
    gate = Gate()
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(5)]
    await settle()
    assert (adm.in_flight, adm.queue_size) == (2, 3)
    assert seen == []  # admitting and queueing emit nothing

    with pytest.raises(Overloaded) as info:
        await adm.call(gate.body, 99)
    err = info.value
    assert isinstance(err, Rejected)
    assert err.reason == "queue_full"
    assert (err.queue_size, err.in_flight) == (3, 2)
    assert err.retry_after == 30.0  # no service time observed yet: the seed's default
    assert err.policy == "gpu"
    assert seen == [
        CallRejected(source="gpu", at=clock.now(), kind="admission", reason="queue_full", retry_after=30.0)
    ]
    assert adm.stats.rejected["queue_full"] == 1

    for i in range(5):
        gate.finish(i)
    assert await asyncio.gather(*tasks) == list(range(5))
    assert 99 not in gate.started
    assert (adm.in_flight, adm.queue_size) == (0, 0)


async def test_queue_timeout_after_max_wait(clock: FakeClock, bus: EventBus) -> None:
    seen: list[CallRejected] = []
    bus.subscribe(seen.append, CallRejected)
    adm = make(clock, bus, max_concurrent=1, max_wait=5.0)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    waiter = asyncio.create_task(adm.call(gate.body, 1))
    await settle()
    assert adm.queue_size == 1

    await clock.run(4.9)
    assert not waiter.done()
    await clock.run(0.1)
    assert waiter.done()
    with pytest.raises(Overloaded) as info:
        await waiter
    assert info.value.reason == "queue_timeout"
    assert (info.value.queue_size, info.value.in_flight) == (0, 1)
    assert [e.reason for e in seen] == ["queue_timeout"]
    assert adm.queue_size == 0
    assert adm.stats.rejected["queue_timeout"] == 1

    gate.finish(0)
    await holder
    assert gate.started == [0]  # the timed-out caller never ran
    assert adm.in_flight == 0
    assert clock.pending_timers == 0


async def test_a_granted_waiter_does_not_time_out_later(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_wait=5.0)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    waiter = asyncio.create_task(adm.call(gate.body, 1))
    await settle()
    gate.finish(0)
    await holder
    await clock.run(60)  # far past max_wait, while it runs
    gate.finish(1)
    assert await waiter == 1
    assert adm.stats.rejected["queue_timeout"] == 0


# -- cancellation -------------------------------------------------------------------------------


async def test_cancel_while_queued_leaves_the_queue(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    waiters = [asyncio.create_task(adm.call(gate.body, i)) for i in (1, 2, 3)]
    await settle()
    assert adm.queue_size == 3

    waiters[1].cancel()
    await settle()
    assert waiters[1].cancelled()
    assert adm.queue_size == 2
    assert clock.pending_timers == 2  # its max_wait timer went with it

    for i in range(4):
        gate.finish(i)
    await holder
    assert await waiters[0] == 1
    assert await waiters[2] == 3
    assert gate.started == [0, 1, 3]
    assert (adm.in_flight, adm.queue_size) == (0, 0)


async def test_cancel_right_after_hand_off_gives_the_slot_back(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)
    gate = Gate()
    first = asyncio.create_task(adm.call(gate.body, 1))
    second = asyncio.create_task(adm.call(gate.body, 2))
    async with adm:
        await settle()
        assert adm.queue_size == 2
    # Leaving the block handed the slot to ``first`` synchronously; it has not resumed yet.
    assert adm.queue_size == 1
    assert adm.in_flight == 1
    first.cancel()
    await settle()
    assert first.cancelled()
    assert gate.started == [2]  # the slot went on to the next waiter
    gate.finish(2)
    assert await second == 2
    assert (adm.in_flight, adm.queue_size) == (0, 0)


async def test_cancel_during_the_call_releases_the_slot(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)
    gate = Gate()
    running = asyncio.create_task(adm.call(gate.body, 0))
    waiter = asyncio.create_task(adm.call(gate.body, 1))
    await settle()
    running.cancel()
    await settle()
    assert gate.started == [0, 1]
    gate.finish(1)
    assert await waiter == 1
    assert adm.in_flight == 0


# -- the queue-depth trip (seed 003) ------------------------------------------------------------


async def test_trip_at_depth_rejects_everything_for_the_cooldown(clock: FakeClock, bus: EventBus) -> None:
    seen: list[CallRejected] = []
    bus.subscribe(seen.append, CallRejected)
    adm = make(
        clock, bus, max_concurrent=1, max_queue=10, trip_queue_depth=2, trip_cooldown=30.0, max_wait=1e6
    )
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    queued = [asyncio.create_task(adm.call(gate.body, i)) for i in (1, 2)]
    await settle()
    assert adm.queue_size == 2
    assert not adm.tripped

    with pytest.raises(Overloaded) as info:
        await adm.call(gate.body, 3)
    assert info.value.reason == "tripped"
    assert info.value.retry_after == 30.0
    assert adm.tripped

    # The callers already queued are still served.
    for i in range(3):
        gate.finish(i)
    await holder
    assert await asyncio.gather(*queued) == [1, 2]
    assert (adm.in_flight, adm.queue_size) == (0, 0)

    # Slots are free now, yet every new call is refused until the cooldown is over.
    clock.advance(10)
    with pytest.raises(Overloaded) as info:
        await adm.call(quick)
    assert info.value.reason == "tripped"
    assert info.value.retry_after == pytest.approx(20.0)
    clock.advance(19.9)
    with pytest.raises(Overloaded):
        await adm.call(quick)

    clock.advance(0.1)
    assert not adm.tripped
    gate.finish(6)
    assert await adm.call(gate.body, 6) == 6
    assert gate.started == [0, 1, 2, 6]
    assert adm.stats.rejected["tripped"] == 3
    assert [e.reason for e in seen] == ["tripped"] * 3


async def test_no_trip_below_the_depth(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, trip_queue_depth=3)
    gate = Gate()
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(3)]
    await settle()
    assert adm.queue_size == 2
    assert not adm.tripped
    for i in range(3):
        gate.finish(i)
    assert await asyncio.gather(*tasks) == [0, 1, 2]
    assert adm.stats.rejected["tripped"] == 0


# -- retry_after estimate -----------------------------------------------------------------------


async def test_retry_after_follows_the_service_time_ewma(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=2, ewma_alpha=0.5, min_retry_after=0.5, max_retry_after=100.0)
    assert adm.retry_after() == 30.0

    async def takes(seconds: float) -> None:
        clock.advance(seconds)

    await adm.call(takes, 4.0)
    assert adm.retry_after() == pytest.approx(4.0 * 1 / 2)
    await adm.call(takes, 8.0)  # ewma = 4 + 0.5 * (8 - 4) = 6
    assert adm.retry_after() == pytest.approx(6.0 / 2)

    gate = Gate()
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(5)]
    await settle()
    assert adm.queue_size == 3
    assert adm.retry_after() == pytest.approx(6.0 * (3 + 1) / 2)
    for i in range(5):
        gate.finish(i)
    await asyncio.gather(*tasks)


async def test_rejection_carries_the_estimate(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_queue=1, ewma_alpha=1.0)

    async def takes(seconds: float) -> None:
        clock.advance(seconds)

    await adm.call(takes, 3.0)
    gate = Gate()
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(2)]
    await settle()
    with pytest.raises(Overloaded) as info:
        await adm.call(gate.body, 9)
    assert info.value.retry_after == pytest.approx(3.0 * (1 + 1) / 1)
    for i in range(2):
        gate.finish(i)
    await asyncio.gather(*tasks)


async def test_retry_after_is_clamped(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, ewma_alpha=1.0, min_retry_after=2.0, max_retry_after=50.0)

    async def takes(seconds: float) -> None:
        clock.advance(seconds)

    await adm.call(takes, 0.1)
    assert adm.retry_after() == 2.0
    await adm.call(takes, 1000.0)
    assert adm.retry_after() == 50.0


async def test_block_form_observes_service_time(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, ewma_alpha=1.0)
    async with adm as entered:
        assert entered is adm
        assert adm.in_flight == 1
        clock.advance(7.0)
    assert adm.in_flight == 0
    assert adm.retry_after() == pytest.approx(7.0)
    with pytest.raises(KeyError):
        async with adm:
            raise KeyError("boom")
    assert adm.in_flight == 0
    assert adm.stats.completed == 2


# -- forms, events, config ----------------------------------------------------------------------


async def test_decorator_and_wrap_forms(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)

    @adm
    async def double(x: int) -> int:
        """Doubles."""
        assert adm.in_flight == 1
        return 2 * x

    async def triple(x: int) -> int:
        return 3 * x

    assert await double(4) == 8
    assert double.__doc__ == "Doubles."
    assert await adm.wrap(triple)(4) == 12
    assert adm.stats.completed == 2


async def test_no_events_on_success(clock: FakeClock, bus: EventBus) -> None:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    adm = make(clock, bus, max_concurrent=2)

    async def ok() -> int:
        await asyncio.sleep(0)
        return 1

    assert await asyncio.gather(*(adm.call(ok) for _ in range(20))) == [1] * 20
    assert seen == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_queue": -1}, "max_queue"),
        ({"max_wait": 0}, "max_wait"),
        ({"ewma_alpha": 1.5}, "ewma_alpha"),
        ({"trip_cooldown": 0}, "trip_cooldown"),
        ({"trip_queue_depth": 0}, "trip_queue_depth"),
        ({"max_queue": 10, "trip_queue_depth": 11}, "trip_queue_depth"),
        ({"min_retry_after": 10, "max_retry_after": 5, "default_retry_after": 7}, "min_retry_after"),
        ({"default_retry_after": 400}, "default_retry_after"),
        ({"max_concurent": 3}, "max_concurent"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        AdmissionConfig(**kwargs)
    assert field in str(info.value)


def test_config_defaults_are_the_seeds() -> None:
    cfg = AdmissionConfig()
    assert (cfg.max_queue, cfg.default_retry_after, cfg.trip_cooldown) == (500, 30.0, 30.0)
    assert cfg.trip_queue_depth is None
    assert Admission().name == "admission"


# -- invariants under random interleavings ------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 0)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("advance"), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(_op, max_size=40),
    max_concurrent=st.integers(1, 3),
    max_queue=st.integers(0, 4),
    trip=st.booleans(),
)
def test_invariants_hold_under_any_interleaving(
    ops: list[tuple[str, int]], max_concurrent: int, max_queue: int, trip: bool
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        cfg = AdmissionConfig(
            max_concurrent=max_concurrent,
            max_queue=max_queue,
            max_wait=5.0,
            trip_queue_depth=max_queue if trip and max_queue >= 1 else None,
            trip_cooldown=3.0,
        )
        adm = Admission("prop", cfg, clock=clock, events=EventBus())
        gate = Gate()
        tasks: list[asyncio.Task[int]] = []

        def check() -> None:
            assert adm.in_flight == gate.running <= max_concurrent
            waiting = sum(1 for i, t in enumerate(tasks) if not t.done() and i not in gate.started)
            assert adm.queue_size == waiting <= max_queue
            if adm.queue_size:
                assert adm.in_flight == max_concurrent

        for op, arg in ops:
            if op == "start":
                tasks.append(asyncio.create_task(adm.call(gate.body, len(tasks))))
            elif op == "finish" and arg < len(tasks):
                gate.finish(arg)
            elif op == "cancel" and arg < len(tasks):
                tasks[arg].cancel()
            elif op == "advance":
                await clock.run(float(arg))
            await settle()
            check()

        for i in range(len(tasks)):
            gate.finish(i)
        await clock.run(10.0)
        await settle()
        check()
        assert (adm.in_flight, adm.queue_size) == (0, 0)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            assert outcome == i or isinstance(outcome, Overloaded | asyncio.CancelledError)
        stats = adm.stats
        assert stats.admitted == stats.completed == len(set(gate.started))
        assert clock.pending_timers == 0

    asyncio.run(scenario())


# -- deadline-aware admission -------------------------------------------------------------------


async def _busy(clock: FakeClock, adm: Admission, gate: Gate, *, service: float, queued: int) -> list[Any]:
    """Teach ``adm`` a service time of ``service`` s, then hold its one slot and queue ``queued``."""

    async def timed() -> None:
        await clock.sleep(service)

    first = asyncio.create_task(adm.call(timed))
    await settle()
    await clock.run(service)
    await first
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(queued + 1)]
    await settle()
    assert (adm.in_flight, adm.queue_size) == (1, queued)
    return tasks


async def test_a_caller_that_cannot_start_in_time_is_refused_at_once(clock: FakeClock, bus: EventBus) -> None:
    seen: list[CallRejected] = []
    bus.subscribe(seen.append, CallRejected)
    adm = make(clock, bus, max_concurrent=1, max_queue=100, max_wait=1e6)
    gate = Gate()
    tasks = await _busy(clock, adm, gate, service=2.0, queued=3)
    queued_before, at = adm.stats.queued, clock.now()
    # Four ahead of it (one running, three waiting) at 2 s each: 8 s before it starts, 5 s left.
    assert adm.estimated_wait() == pytest.approx(8.0)
    with pytest.raises(Overloaded) as info:
        await adm.call_within(5.0, gate.body, 99)
    assert info.value.reason == "deadline"
    # Never waited: it did not join the queue, and no (fake) time passed.
    assert adm.stats.queued == queued_before
    assert clock.now() == at
    assert 99 not in gate.started
    # retry_after is the backlog's drain time: four calls of 2 s on one slot.
    assert info.value.retry_after == pytest.approx(8.0)
    assert [e.reason for e in seen] == ["deadline"]
    assert adm.stats.rejected["deadline"] == 1
    # A caller with enough time left waits its turn as before.
    patient = asyncio.create_task(adm.call_within(9.0, gate.body, 100))
    await settle()
    assert adm.queue_size == 4
    for i in [0, 1, 2, 3, 100]:
        gate.finish(i)
    await asyncio.gather(*tasks, patient)
    assert adm.stats.rejected["deadline"] == 1


async def test_check_refuses_as_call_within_would_without_queueing(clock: FakeClock, bus: EventBus) -> None:
    seen: list[CallRejected] = []
    bus.subscribe(seen.append, CallRejected)
    adm = make(clock, bus, max_concurrent=1, max_queue=3, max_wait=1e6, trip_queue_depth=None)
    adm.check(0.0)  # nothing known, nothing running: never refused
    gate = Gate()
    tasks = await _busy(clock, adm, gate, service=2.0, queued=2)
    # Three ahead at 2 s each: 6 s to start.
    with pytest.raises(Overloaded) as info:
        adm.check(5.0)
    assert info.value.reason == "deadline"
    assert info.value.retry_after == pytest.approx(6.0)
    adm.check(7.0)  # time enough: it may queue
    adm.check(None)  # no budget: the queue has room
    assert (adm.in_flight, adm.queue_size, adm.stats.queued) == (1, 2, 2)  # nothing taken or joined
    tasks.append(asyncio.create_task(adm.call(gate.body, 3)))
    await settle()
    with pytest.raises(Overloaded) as full:
        adm.check(None)
    assert full.value.reason == "queue_full"
    assert [e.reason for e in seen] == ["deadline", "queue_full"]
    assert adm.stats.rejected["deadline"] == adm.stats.rejected["queue_full"] == 1
    for i in range(4):
        gate.finish(i)
    await asyncio.gather(*tasks)
    adm.check(0.0)  # a free slot again


async def test_a_queued_caller_never_waits_past_its_budget(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_wait=1e6)
    gate = Gate()
    tasks = await _busy(clock, adm, gate, service=2.0, queued=0)
    # One ahead at 2 s: the estimate (2 s) fits a 3 s budget, so it queues...
    waiter = asyncio.create_task(adm.call_within(3.0, gate.body, 7))
    await settle()
    assert adm.queue_size == 1
    # ...but the call ahead runs long: at its budget it leaves rather than start too late.
    await clock.run(3.0)
    with pytest.raises(Overloaded) as info:
        await waiter
    assert info.value.reason == "queue_timeout"
    assert adm.queue_size == 0
    assert 7 not in gate.started
    gate.finish(0)
    await asyncio.gather(*tasks)


async def test_the_queue_learns_its_real_pace_so_later_refusals_come_at_once(clock: FakeClock) -> None:
    # A hopeful estimator (0.5 s per place) while the slot is really held 4 s: the first caller
    # queues on the estimate and leaves at its 3 s budget, seconds later. What it waited teaches the
    # queue its pace, and the next caller in the same spot is refused at once instead of at its budget.
    adm = Admission(
        "gpu",
        AdmissionConfig(max_concurrent=1, max_wait=1e6),
        clock=clock,
        events=EventBus(),
        wait_estimator=lambda position: 0.5 * position,
    )
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    await settle()
    hopeful = asyncio.create_task(adm.call_within(3.0, gate.body, 1))
    await settle()
    assert adm.queue_size == 1  # 0.5 s estimated: it queues
    await clock.run(3.0)
    with pytest.raises(Overloaded) as first:
        await hopeful
    assert first.value.reason == "queue_timeout"
    at, queued = clock.now(), adm.stats.queued
    with pytest.raises(Overloaded) as second:
        await adm.call_within(2.0, gate.body, 2)
    assert second.value.reason == "deadline"
    assert clock.now() == at  # refused without waiting
    assert adm.stats.queued == queued
    gate.finish(0)
    await holder


async def test_the_enclosing_deadline_scope_is_the_budget(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_wait=1e6)
    gate = Gate()
    tasks = await _busy(clock, adm, gate, service=2.0, queued=1)
    with pytest.raises(Overloaded) as info:
        async with deadline(3.0, clock=clock):
            await adm.call(gate.body, 99)  # 6 s to start, 3 s left
    assert info.value.reason == "deadline"
    with pytest.raises(Overloaded):
        async with deadline(3.0, clock=clock), adm:  # the block form too
            pass
    assert adm.stats.queued == 1
    for i in range(2):
        gate.finish(i)
    await asyncio.gather(*tasks)


async def test_no_estimate_yet_means_no_deadline_refusal_but_for_no_time_at_all(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_wait=1e6)
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    await settle()
    assert adm.estimated_wait() is None
    waiter = asyncio.create_task(adm.call_within(0.001, gate.body, 1))
    await settle()
    assert adm.queue_size == 1  # nothing is known of the service time: it may wait
    # ...unless it has no time at all: it could only wait to fail, and is told so at once.
    with pytest.raises(Overloaded) as info:
        adm.check(0.0)
    assert info.value.reason == "deadline"
    at = clock.now()
    with pytest.raises(Overloaded) as late:
        await adm.call_within(0.0, gate.body, 2)
    assert late.value.reason == "deadline"
    assert clock.now() == at  # refused without waiting
    assert adm.queue_size == 1
    assert 2 not in gate.started
    gate.finish(0)
    gate.finish(1)
    await asyncio.gather(holder, waiter)
    assert adm.estimated_wait() == 0.0
    assert await adm.call_within(0.0, quick) is None  # a free slot: no waiting, no refusal


async def test_an_estimator_passed_in_decides_the_wait(clock: FakeClock) -> None:
    positions: list[int] = []

    def estimator(position: int) -> float:
        positions.append(position)
        return 30.0 * position  # the model server's own queue is long

    adm = Admission(
        "gpu", AdmissionConfig(max_concurrent=1), clock=clock, events=EventBus(), wait_estimator=estimator
    )
    gate = Gate()
    holder = asyncio.create_task(adm.call(gate.body, 0))
    await settle()
    with pytest.raises(Overloaded) as info:
        await adm.call_within(10.0, gate.body, 1)
    assert info.value.reason == "deadline"
    assert positions == [1]
    gate.finish(0)
    await holder


async def test_a_free_slot_ignores_the_deadline(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1)

    async def timed() -> int:
        await clock.sleep(50.0)
        return 1

    first = asyncio.create_task(adm.call(timed))
    await settle()
    await clock.run(50.0)
    await first
    # A 50 s average service time, but a free slot now: nothing to wait for.
    assert await adm.call_within(0.5, quick) is None


# -- paced returns ------------------------------------------------------------------------------


async def _saturated(clock: FakeClock, adm: Admission, gate: Gate, *, service: float) -> list[Any]:
    """Teach ``adm`` a service time of ``service`` s, then hold every one of its slots."""

    async def takes() -> None:
        clock.advance(service)

    await adm.call(takes)
    slots = adm.config.max_concurrent
    tasks = [asyncio.create_task(adm.call(gate.body, i)) for i in range(slots)]
    await settle()
    assert (adm.in_flight, adm.queue_size) == (slots, 0)
    return tasks


async def _refused(adm: Admission, budget: float | None = None) -> float:
    with pytest.raises(Overloaded) as info:
        adm.check(budget)
    return info.value.retry_after


async def test_paced_refusals_each_get_their_own_place_in_the_line(clock: FakeClock, bus: EventBus) -> None:
    # Two slots of 8 s: one comes free every 4 s, and pacing 2 brings two callers back for each,
    # places 2 s apart. The backlog drains in 4 s (the unpaced retry_after): the line starts there.
    seen: list[CallRejected] = []
    bus.subscribe(seen.append, CallRejected)
    adm = make(clock, bus, max_concurrent=2, max_queue=0, ewma_alpha=1.0, retry_pacing=2, retry_pacing_max=10)
    plain = make(clock, max_concurrent=2, max_queue=0, ewma_alpha=1.0)
    gate, plain_gate = Gate(), Gate()
    tasks = await _saturated(clock, adm, gate, service=8.0)
    tasks += await _saturated(clock, plain, plain_gate, service=8.0)
    assert [await _refused(plain) for _ in range(4)] == [4.0] * 4  # all back together, all refused again
    assert [await _refused(adm) for _ in range(6)] == [4.0, 6.0, 8.0, 10.0, 10.0, 10.0]  # capped at 10 s
    assert [e.retry_after for e in seen] == [4.0, 6.0, 8.0, 10.0, 10.0, 10.0]  # the events say the same
    assert adm.retry_line == 10.0  # how far ahead the line reaches
    assert plain.retry_line == 0.0  # no line without pacing
    # A caller refused elsewhere for the same capacity takes a place in the same line.
    clock.advance(6.0)
    assert adm.place_in_line(1.0) == pytest.approx(6.0)  # the line ended 4 s from now; 2 s after it
    assert await _refused(adm) == pytest.approx(8.0)
    # After a lull the line is empty again: the next caller is told when the backlog drains.
    clock.advance(30.0)
    assert adm.retry_line == 0.0
    assert await _refused(adm) == 4.0
    assert adm.stats.rejected["queue_full"] == 8
    for i in range(2):
        gate.finish(i)
        plain_gate.finish(i)
    await asyncio.gather(*tasks)


async def test_pacing_needs_a_service_time_and_never_shortens_a_longer_wait(clock: FakeClock) -> None:
    adm = make(clock, max_concurrent=1, max_queue=0, retry_pacing=4, retry_pacing_max=10)
    assert adm.place_in_line(3.0) == 3.0  # no service time seen: no pace to keep
    assert adm.place_in_line() == 0.0
    gate = Gate()
    tasks = await _saturated(clock, adm, gate, service=40.0)
    # The backlog needs 40 s, past the line's 10 s horizon: the caller is told 40 s, not 10.
    assert await _refused(adm) == 40.0
    assert await _refused(adm) == 40.0  # the horizon is the longer wait
    gate.finish(0)
    await asyncio.gather(*tasks)


def test_pacing_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="retry_pacing"):
        AdmissionConfig(retry_pacing=0)
    with pytest.raises(ValidationError, match="retry_pacing_max"):
        AdmissionConfig(retry_pacing_max=0)
    assert AdmissionConfig().retry_pacing is None  # off unless asked for


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0, 20, allow_nan=False), st.floats(0, 30, allow_nan=False)),
        min_size=1,
        max_size=60,
    ),
    service=st.floats(0.5, 30, allow_nan=False),
    slots=st.integers(1, 8),
    pacing=st.floats(0.5, 8, allow_nan=False),
    horizon=st.floats(1, 120, allow_nan=False),
)
def test_paced_callers_come_back_no_closer_than_their_spacing(
    steps: list[tuple[float, float]], service: float, slots: int, pacing: float, horizon: float
) -> None:
    # Whatever the times and floors of the refusals: nobody is told to come back before its floor,
    # nor past the horizon unless its floor is later; and each caller's return is at least one place
    # after the last one's, unless the horizon cut the line short.
    async def scenario() -> None:
        clock = FakeClock()
        adm = make(clock, max_concurrent=slots, retry_pacing=pacing, retry_pacing_max=horizon, ewma_alpha=1.0)

        async def takes() -> None:
            clock.advance(service)

        await adm.call(takes)
        spacing = service / (slots * pacing)
        last = -math.inf
        for advance, floor in steps:
            clock.advance(advance)
            now = clock.now()
            wait = adm.place_in_line(floor)
            assert floor <= wait <= max(floor, horizon) + 1e-9
            capped = math.isclose(wait, max(floor, horizon), abs_tol=1e-9)
            assert capped or now + wait >= last + spacing - 1e-9
            last = now + wait

    asyncio.run(scenario())
