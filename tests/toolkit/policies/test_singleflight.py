"""Singleflight: one computation per key for any number of concurrent callers."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from brownout.policies.singleflight import Singleflight, SingleflightStats
from support.wait import settle


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports to its exception handler (e.g. "exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)


class Gate:
    """A computation that waits until released and counts how often it ran."""

    def __init__(self, value: object = "value", error: Exception | None = None) -> None:
        self.value = value
        self.error = error
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def __call__(self) -> object:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.value


async def test_1000_concurrent_callers_share_one_computation() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate(value={"answer": 42})
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(1000)]
    await settle()
    assert flight.in_flight == 1
    assert "k" in flight
    gate.release.set()
    results = await asyncio.gather(*tasks)
    assert gate.started == 1
    assert all(r is results[0] for r in results)
    assert results[0] == {"answer": 42}
    assert flight.stats == SingleflightStats(calls=1000, computations=1, coalesced=999)
    await settle()
    assert flight.in_flight == 0
    assert "k" not in flight


async def test_error_is_shared_by_every_waiter_and_the_next_call_recomputes() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate(error=ValueError("model exploded"))
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(1000)]
    await settle()
    gate.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.started == 1
    assert all(isinstance(r, ValueError) and str(r) == "model exploded" for r in results)
    await settle()
    assert flight.in_flight == 0

    async def ok() -> object:
        return "recovered"

    assert await flight.do("k", ok) == "recovered"
    assert flight.stats.computations == 2


async def test_sequential_calls_do_not_cache() -> None:
    flight: Singleflight[str, int] = Singleflight()
    runs = 0

    async def compute() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await flight.do("k", compute) == 1
    assert await flight.do("k", compute) == 2
    assert runs == 2


async def test_a_call_right_after_the_computation_finished_computes_again() -> None:
    flight: Singleflight[str, int] = Singleflight()
    runs = 0

    async def compute() -> int:
        nonlocal runs
        runs += 1
        return runs

    first = flight.start("k", compute)
    # This task is queued behind the computation's first step, but ahead of the computation's done
    # callbacks: it calls while the finished computation is still registered.
    later = asyncio.create_task(flight.do("k", compute))
    assert await first == 1
    assert await later == 2
    assert runs == 2


async def test_cancelling_one_waiter_leaves_the_computation_and_the_others() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate()
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(10)]
    await settle()
    tasks[0].cancel()  # the caller that started the computation
    await settle()
    assert tasks[0].cancelled()
    assert gate.cancelled == 0
    assert flight.in_flight == 1
    gate.release.set()
    results = await asyncio.gather(*tasks[1:])
    assert results == ["value"] * 9
    assert gate.started == 1
    assert gate.finished == 1


async def test_cancelling_many_waiters_leaves_the_rest() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate()
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(1000)]
    await settle()
    for task in tasks[:999]:
        task.cancel()
    await settle()
    assert all(t.cancelled() for t in tasks[:999])
    assert not tasks[999].done()
    gate.release.set()
    assert await tasks[999] == "value"
    assert gate.cancelled == 0
    assert gate.finished == 1


async def test_computation_finishes_when_every_waiter_is_cancelled(
    loop_errors: list[dict[str, Any]],
) -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate()
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(100)]
    await settle()
    for task in tasks:
        task.cancel()
    await settle()
    assert all(t.cancelled() for t in tasks)
    assert flight.in_flight == 1  # still running for nobody
    gate.release.set()
    await settle()
    assert gate.finished == 1
    assert gate.cancelled == 0
    assert flight.in_flight == 0
    assert loop_errors == []


async def test_failure_with_no_waiters_is_not_reported_as_never_retrieved(
    loop_errors: list[dict[str, Any]],
) -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate(error=RuntimeError("nobody listens"))
    tasks = [asyncio.create_task(flight.do("k", gate)) for _ in range(5)]
    await settle()
    for task in tasks:
        task.cancel()
    await settle()
    gate.release.set()
    await settle()
    assert gate.finished == 1
    del tasks
    gc.collect()
    await settle()
    assert loop_errors == []


async def test_failed_background_start_nobody_awaits_is_not_reported(
    loop_errors: list[dict[str, Any]],
) -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate(error=RuntimeError("nobody awaits"))
    flight.start("k", gate)  # the task is dropped on purpose
    await settle()
    gate.release.set()
    await settle()
    assert gate.finished == 1
    assert flight.in_flight == 0
    gc.collect()
    await settle()
    assert loop_errors == []


async def test_different_keys_compute_independently() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gates = {"a": Gate(value="A"), "b": Gate(value="B")}
    tasks = [asyncio.create_task(flight.do(key, gates[key])) for key in ["a", "b"] * 50]
    await settle()
    assert flight.in_flight == 2
    gates["a"].release.set()
    await settle()
    assert flight.in_flight == 1
    assert "b" in flight
    gates["b"].release.set()
    results = await asyncio.gather(*tasks)
    assert results == ["A", "B"] * 50
    assert gates["a"].started == 1
    assert gates["b"].started == 1
    assert flight.stats == SingleflightStats(calls=100, computations=2, coalesced=98)


async def test_forget_starts_a_new_computation_for_later_callers() -> None:
    flight: Singleflight[str, object] = Singleflight()
    old, new = Gate(value="old"), Gate(value="new")
    early = [asyncio.create_task(flight.do("k", old)) for _ in range(3)]
    await settle()
    assert flight.forget("k") is True
    assert flight.forget("k") is False
    late = [asyncio.create_task(flight.do("k", new)) for _ in range(3)]
    await settle()
    assert old.started == 1
    assert new.started == 1
    old.release.set()
    assert await asyncio.gather(*early) == ["old"] * 3
    await settle()
    # The old computation finishing must not detach the new one.
    assert "k" in flight
    assert flight.in_flight == 1
    new.release.set()
    assert await asyncio.gather(*late) == ["new"] * 3
    assert flight.stats.computations == 2


async def test_start_returns_the_running_computation() -> None:
    flight: Singleflight[str, object] = Singleflight()
    gate = Gate()
    task = flight.start("k", gate)
    assert flight.start("k", gate) is task
    waiter = asyncio.create_task(flight.do("k", gate))
    await settle()
    gate.release.set()
    assert await waiter == "value"
    assert await task == "value"
    assert gate.started == 1
    assert flight.stats == SingleflightStats(calls=3, computations=1, coalesced=2)
