"""The job workers alone, on a fake clock: interactive first, memory pauses intake, retries with
backoff, and a job resumed by new workers on the same database without redoing a finished item.

The database is a real SQLite file; the items run through a scripted handler. Time is a
:class:`~brownout.testing.FakeClock` that the test moves while it waits for a condition, so backoffs
and polls take no real time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from brownout.briefs.jobs import BriefsJob, is_mock
from brownout.config import JobsSection
from brownout.durable.jobs import FINAL_STATES, DatabaseClaims, ItemOutcome, JobStore
from brownout.durable.store import BriefStore
from brownout.errors import ServiceUnavailable
from brownout.events import EventBus
from brownout.policies.admission import Admission, AdmissionConfig
from brownout.policies.dimmer import Dimmer, DimmerConfig
from brownout.server.jobs import InteractiveFirst, JobsCollector, JobWorkers, describe_failure, transient
from brownout.testing import FakeClock
from support.otlp import memory_tracing
from support.wait import until


class Script:
    """A job handler whose items answer, fail or wait as a test says."""

    type = "briefs"

    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()
        self.failures: dict[int, list[BaseException]] = {}
        self.hold: set[int] = set()
        self.release = asyncio.Event()
        self.running: set[int] = set()

    def check(self, item: Mapping[str, Any]) -> None:
        """Every item is fine."""

    async def run(self, item: Mapping[str, Any]) -> ItemOutcome:
        index = int(item["i"])
        self.calls[index] += 1
        self.running.add(index)
        try:
            pending = self.failures.get(index)
            if pending:
                raise pending.pop(0)
            if index in self.hold:
                await self.release.wait()
            return ItemOutcome(result={"i": index}, served_by="model:qwen")
        finally:
            self.running.discard(index)


class World:
    """A database, a fake clock and a way to build workers on them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = FakeClock()
        self.wall = FakeClock(1_700_000_000.0)
        self.stores: list[BriefStore] = []

    def workers(
        self, handler: Script, *, gate: InteractiveFirst | None = None, **settings: Any
    ) -> tuple[JobWorkers, JobStore]:
        briefs = BriefStore(f"sqlite+aiosqlite:///{self.path}")
        self.stores.append(briefs)
        jobs = JobStore(briefs, clock=self.wall)
        section = JobsSection(**{"poll_interval": 0.5, "backoff_base": 1.0, **settings})
        claims = DatabaseClaims(jobs, "host:/spool.db", lease=section.lease)
        workers = JobWorkers(
            section, jobs, claims, {"briefs": handler}, gate=gate, clock=self.clock, wall_clock=self.wall
        )
        return workers, jobs

    async def drive(self, condition: Callable[[], object], what: str, step: float = 0.1) -> None:
        """Move fake time forward in small steps until ``condition()`` holds."""

        async def check() -> object:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if not value:
                self.clock.advance(step)
                self.wall.advance(step)
            return value

        await until(check, what, interval=0.002)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path / "jobs.db")
    try:
        yield w
    finally:
        for store in w.stores:
            await store.aclose()


async def _ended(jobs: JobStore, job_id: str) -> bool:
    row = await jobs.get(job_id)
    return row is not None and row.state in FINAL_STATES


def _items(n: int) -> list[dict[str, int]]:
    return [{"i": i} for i in range(n)]


async def test_items_wait_while_interactive_requests_are_queued_or_in_flight(world: World) -> None:
    admission = Admission("briefs", AdmissionConfig(max_concurrent=3, max_queue=10), clock=world.clock)
    dimmer = Dimmer("briefs", ("a", "b"), DimmerConfig(), clock=world.clock, events=EventBus())
    memory = {"critical": False}
    gate = InteractiveFirst(admission, dimmer, threshold=2, memory_critical=lambda: memory["critical"])
    script = Script()
    workers, jobs = world.workers(script, gate=gate, concurrency=2)
    done = asyncio.Event()

    async def interactive() -> None:
        await done.wait()

    # Two interactive requests in flight: at the threshold, job items wait.
    calls = [asyncio.create_task(admission.call(interactive)) for _ in range(2)]
    await until(lambda: admission.in_flight == 2, "the interactive requests to start")
    await workers.start()
    job, _ = await jobs.submit("briefs", _items(3))
    workers.kick()
    await world.drive(lambda: workers.waiting_for(job.id) is not None, "the job to wait its turn")
    assert workers.waiting_for(job.id) == "2 interactive requests in flight"
    world.clock.advance(5.0)
    await asyncio.sleep(0.05)
    assert sum(script.calls.values()) == 0
    assert gate.reason(0) == "2 interactive requests in flight"
    # One more waits in the queue behind them: still interactive first, whatever the threshold.
    gate.threshold = 10
    more = [asyncio.create_task(admission.call(interactive)) for _ in range(2)]
    await until(lambda: admission.queue_size == 1, "an interactive request to queue")
    assert gate.reason(0) == "interactive requests are waiting"
    # The dimmer dimming while interactive requests run: the server is at its latency target.
    done.set()
    await asyncio.gather(*calls, *more)
    dimmer.force(0.5)
    assert gate.reason(0) is None  # nothing interactive in flight: the dimmer alone says nothing
    hold = asyncio.Event()

    async def one() -> None:
        await hold.wait()

    running = asyncio.create_task(admission.call(one))
    await until(lambda: admission.in_flight == 1, "one interactive request")
    assert gate.reason(0) == "the server is dimming under interactive load"
    # The job's own items in the admission are not interactive.
    assert gate.reason(1) is None
    hold.set()
    await running
    dimmer.force(None)
    # Interactive traffic gone: the items start and finish.
    await world.drive(lambda: _ended(jobs, job.id), "the job to end")
    assert script.calls == Counter({0: 1, 1: 1, 2: 1})
    # Memory critical: no job is claimed at all.
    memory["critical"] = True
    paused, _ = await jobs.submit("briefs", _items(1))
    workers.kick()
    await world.drive(lambda: workers.waiting == "memory is critical: job intake paused", "intake to pause")
    world.clock.advance(5.0)
    await asyncio.sleep(0.05)
    row = await jobs.get(paused.id)
    assert row is not None
    assert row.state == "queued"
    metrics = {m.name: m for m in JobsCollector(workers).collect()}
    assert metrics["brownout_jobs_waiting"].samples[0].value == 1.0
    memory["critical"] = False
    await world.drive(lambda: _ended(jobs, paused.id), "the paused job to run once memory is back")
    await workers.aclose()


async def test_transient_failures_are_retried_with_backoff_and_others_fail_the_item(world: World) -> None:
    script = Script()
    script.failures = {
        0: [ConnectionRefusedError("connection refused"), ServiceUnavailable("busy", retry_after=1.0)],
        1: [ValueError("a bug")],
        2: [ConnectionResetError("connection reset")] * 5,
    }
    workers, jobs = world.workers(script, concurrency=1, max_attempts=3, backoff_base=2.0, backoff_max=4.0)
    await workers.start()
    job, _ = await jobs.submit("briefs", _items(3))
    workers.kick()
    await world.drive(lambda: _ended(jobs, job.id), "the job to end")
    items = {i.index: i for i in await jobs.items(job.id)}
    assert (items[0].state, items[0].attempts) == ("succeeded", 3)
    assert (items[1].state, items[1].attempts) == ("failed", 1)
    assert items[1].error is not None
    assert items[1].error.endswith("ValueError: a bug")
    assert (items[2].state, items[2].attempts) == ("failed", 3)
    assert items[2].error is not None
    assert items[2].error.startswith("network_error: ConnectionResetError")
    row = await jobs.get(job.id)
    assert row is not None
    assert (row.state, row.reason) == ("partially_succeeded", "2 of 3 items failed")
    assert workers.retries == 4
    assert workers.outcomes == Counter({"succeeded": 1, "failed": 2})
    # Backoffs waited on the injected clock, capped at backoff_max (full jitter: up to the cap).
    assert all(0 <= s <= 4.0 for s in world.clock.sleeps if s not in (0.5,))
    await workers.aclose()


def test_failures_are_classified_before_they_are_retried() -> None:
    assert transient(ConnectionRefusedError("refused"))
    assert transient(MemoryError())
    assert transient(ServiceUnavailable("queue full", retry_after=3.0))
    assert transient(RuntimeError("failed to load model: file missing"))
    assert not transient(ValueError("bad"))
    assert describe_failure(MemoryError()).startswith("system_resource_error: MemoryError")
    assert is_mock({"reliability": "low"})
    assert not is_mock({"reliability": "medium"})
    assert BriefsJob.type == "briefs"


async def test_new_workers_on_the_same_database_resume_without_redoing_a_finished_item(world: World) -> None:
    first = Script()
    first.hold = {3, 4}  # these never finish in the first life
    workers, jobs = world.workers(first, concurrency=2)
    await workers.start()
    job, _ = await jobs.submit("briefs", _items(8))
    workers.kick()
    await world.drive(lambda: first.running == {3, 4}, "items 3 and 4 to be in flight")
    assert await jobs.item_counts(job.id) == {"succeeded": 3, "running": 2, "pending": 3}
    # The workers stop mid-job: the two items in flight are cancelled without an outcome.
    await workers.aclose()
    assert await jobs.item_counts(job.id) == {"succeeded": 3, "running": 2, "pending": 3}
    # A new runtime on the same database (a new store, new workers) carries on from the checkpoint.
    second = Script()
    again, jobs_again = world.workers(second, concurrency=2)
    await again.start()
    await world.drive(lambda: _ended(jobs_again, job.id), "the resumed job to end")
    assert sorted(second.calls) == [3, 4, 5, 6, 7]  # never 0, 1 or 2 again
    assert all(n == 1 for n in second.calls.values())
    assert await jobs_again.item_counts(job.id) == {"succeeded": 8}
    row = await jobs_again.get(job.id)
    assert row is not None
    assert (row.state, row.done, row.failed) == ("succeeded", 8, 0)
    assert [i.result for i in await jobs_again.items(job.id)] == [{"i": i} for i in range(8)]
    await again.aclose()


async def test_a_job_run_is_one_trace_with_a_span_per_item(world: World) -> None:
    script = Script()
    workers, jobs = world.workers(script, concurrency=2)
    with memory_tracing() as finished:
        await workers.start()
        job, _ = await jobs.submit("briefs", _items(3))
        workers.kick()
        await world.drive(lambda: _ended(jobs, job.id), "the job to end")
        await workers.aclose()
        spans = finished()
    (run,) = [s for s in spans if s.name == "job briefs"]
    items = [s for s in spans if s.name == "job item"]
    assert run.attributes is not None
    assert dict(run.attributes) == {
        "brownout.job.id": job.id,
        "brownout.job.type": "briefs",
        "brownout.job.total": 3,
    }
    assert sorted(s.attributes["brownout.job.item"] for s in items if s.attributes) == [0, 1, 2]
    for item in items:
        assert item.parent is not None
        assert item.parent.span_id == run.context.span_id  # the items are the job's children
        assert item.attributes is not None
        assert item.attributes["brownout.job.item_ok"] is True
        assert item.attributes["brownout.job.item_mock"] is False


class _StuckClaims:
    """Claims whose release never answers (a database that stopped answering mid-stop)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.released = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def release(self, job_ids: Any) -> None:
        self.released.set()
        await asyncio.Event().wait()  # never


async def test_a_database_that_does_not_answer_does_not_hold_the_workers_stop(world: World) -> None:
    script = Script()
    script.hold = {0, 1}
    workers, jobs = world.workers(script, concurrency=2)
    stuck = _StuckClaims(workers.claims)
    workers.claims = stuck
    workers.hand_back_timeout = 0.05
    await workers.start()
    job, _ = await jobs.submit("briefs", _items(4))
    workers.kick()
    await world.drive(lambda: script.running == {0, 1}, "two items in flight")
    await asyncio.wait_for(workers.aclose(), 5.0)  # bounded: the lease is left to run out instead
    assert stuck.released.is_set()
    assert await jobs.item_counts(job.id) == {"running": 2, "pending": 2}


async def test_with_nothing_to_do_the_workers_look_less_often_and_a_job_brings_them_back(
    world: World,
) -> None:
    script = Script()
    workers, jobs = world.workers(script, poll_interval=0.5, idle_poll_interval=4.0)
    looks: list[float] = []
    overview = jobs.overview

    async def counted() -> tuple[dict[str, int], float | None, float | None]:
        looks.append(world.clock.now())
        return await overview()

    jobs.overview = counted  # type: ignore[method-assign]
    await workers.start()
    await world.drive(lambda: workers.interval == 4.0, "the idle wait to reach its ceiling")
    # Twice the wait after each empty round, from poll_interval: three rounds took it 0.5 -> 1 -> 2 -> 4.
    assert len(looks) == 3
    assert looks[2] - looks[1] > looks[1] - looks[0] >= 1.0
    started = len(looks)
    world.clock.advance(20.0)
    world.wall.advance(20.0)
    await until(lambda: len(looks) >= started + 1, "a look within the idle wait")
    await asyncio.sleep(0.05)
    assert len(looks) - started <= 20 / 4.0 + 1  # at most one look per idle wait (40 at poll_interval)
    assert workers.interval == 4.0
    # A job submitted through another replica (no kick here) is found within the idle wait, and the
    # wait is back at poll_interval while it runs.
    job, _ = await jobs.submit("briefs", _items(2))
    before, seen = world.clock.now(), len(looks)
    await world.drive(lambda: workers.running == [job.id] or _ended(jobs, job.id), "the job to be claimed")
    assert len(looks) == seen + 1  # the next look takes it
    assert world.clock.now() - before <= 4.0 + 0.5  # (the drive moves fake time while a look runs)
    assert workers.interval == 0.5
    await world.drive(lambda: _ended(jobs, job.id), "the job to end")
    # A submission here resets the wait at once.
    await world.drive(lambda: workers.interval == 4.0, "the idle wait to grow again")
    workers.kick()
    assert workers.interval == 0.5
    await workers.aclose()
