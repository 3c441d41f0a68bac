"""The job tables: submission, idempotent checkpoints, final states, leases -- and a model of crashes.

Real SQLite files in a temporary directory; wall time is a :class:`~brownout.testing.FakeClock`, so
leases run out when a test says so.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy.exc import IntegrityError

from brownout.durable.jobs import DatabaseClaims, ItemOutcome, JobStore, final_state, job_items
from brownout.durable.store import BriefStore
from brownout.testing import FakeClock


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobStore]:
    store = BriefStore(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await store.init()
    job_store = JobStore(store, clock=FakeClock(1_700_000_000.0))
    await job_store.init()
    await job_store.init()  # idempotent
    try:
        yield job_store
    finally:
        await store.aclose()


def _items(n: int) -> list[dict[str, str]]:
    return [{"text": f"text {i}", "mode": "fast"} for i in range(n)]


def _ok(i: int, *, mock: bool = False) -> ItemOutcome:
    return ItemOutcome(result={"i": i}, served_by="rules" if mock else "model:qwen", mock=mock)


async def test_a_submission_stores_the_job_and_every_item_once(jobs: JobStore) -> None:
    job, created = await jobs.submit("briefs", _items(3), request_hash="h")
    assert created
    assert (job.state, job.total, job.done, job.failed, job.mock) == ("queued", 3, 0, 0, 0)
    assert await jobs.get(job.id) == job
    items = await jobs.items(job.id)
    assert [(i.index, i.state, i.payload["text"]) for i in items] == [
        (k, "pending", f"text {k}") for k in range(3)
    ]
    assert await jobs.get("missing") is None


async def test_the_same_idempotency_key_finds_the_first_job_and_writes_nothing(jobs: JobStore) -> None:
    first, created = await jobs.submit("briefs", _items(2), idempotency_key="k", request_hash="a")
    again, created_again = await jobs.submit("briefs", _items(5), idempotency_key="k", request_hash="b")
    assert created
    assert not created_again
    assert again.id == first.id
    assert again.request_hash == "a"
    assert len(await jobs.list_jobs()) == 1
    assert await jobs.item_counts(first.id) == {"pending": 2}
    other, _ = await jobs.submit("briefs", _items(1), idempotency_key="other")
    assert other.id != first.id


async def test_an_item_is_stored_once_however_often_its_outcome_is_written(jobs: JobStore) -> None:
    job, _ = await jobs.submit("briefs", _items(2))
    assert await jobs.finish_item(job.id, 0, _ok(0, mock=True), attempts=1)
    # A retried write, or a second worker that also finished it: nothing changes, nothing counts twice.
    assert not await jobs.finish_item(job.id, 0, _ok(0), attempts=2)
    assert not await jobs.finish_item(job.id, 0, ItemOutcome(error="late failure"), attempts=3)
    row = await jobs.get(job.id)
    assert row is not None
    assert (row.done, row.failed, row.mock) == (1, 0, 1)
    (first, second) = await jobs.items(job.id)
    assert (first.state, first.result, first.served_by, first.mock, first.attempts) == (
        "succeeded",
        {"i": 0},
        "rules",
        True,
        1,
    )
    assert [i.index for i in await jobs.open_items(job.id)] == [1]
    assert second.state == "pending"
    # The table itself refuses a second row for the same (job, index).
    engine = await jobs.store.engine()
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                job_items.insert().values(
                    job_id=job.id,
                    idx=0,
                    state="pending",
                    payload="{}",
                    mock=False,
                    attempts=0,
                    updated_at=0.0,
                )
            )


async def test_a_job_ends_in_the_state_its_items_say(jobs: JobStore) -> None:
    assert final_state(3, 3, 0)[0] == "succeeded"
    assert final_state(3, 0, 3)[0] == "failed"
    assert final_state(3, 2, 1) == ("partially_succeeded", "1 of 3 items failed")
    claims = DatabaseClaims(jobs, "me", lease=10.0)
    job, _ = await jobs.submit("briefs", _items(2))
    assert await jobs.complete(job.id) is None  # not running yet
    (claimed,) = await claims.claim(5)
    assert claimed.state == "running"
    assert claimed.started_at is not None
    await jobs.finish_item(job.id, 0, _ok(0), attempts=1)
    assert await jobs.complete(job.id) is None  # an item is still open
    await jobs.finish_item(job.id, 1, ItemOutcome(error="network_error: down"), attempts=4)
    ended = await jobs.complete(job.id)
    assert ended is not None
    assert (ended.state, ended.reason, ended.owner) == ("partially_succeeded", "1 of 2 items failed", None)
    assert await jobs.complete(job.id) is None  # once
    assert await claims.claim(5) == []


async def test_cancel_stops_the_items_not_started_and_keeps_the_finished_ones(jobs: JobStore) -> None:
    job, _ = await jobs.submit("briefs", _items(4))
    await DatabaseClaims(jobs, "me", lease=10.0).claim(1)
    await jobs.finish_item(job.id, 0, _ok(0), attempts=1)
    assert await jobs.start_item(job.id, 1, 1)
    cancelled, changed = await jobs.cancel(job.id)
    assert changed
    assert cancelled is not None
    assert cancelled.state == "cancelled"
    assert await jobs.item_counts(job.id) == {"succeeded": 1, "running": 1, "cancelled": 2}
    # The running item may still finish and keep its result; a cancelled one may not start.
    assert await jobs.finish_item(job.id, 1, _ok(1), attempts=1)
    assert not await jobs.start_item(job.id, 2, 1)
    again, changed_again = await jobs.cancel(job.id)
    assert not changed_again
    assert again is not None
    assert again.state == "cancelled"
    assert await jobs.cancel("missing") == (None, False)


async def test_a_lease_keeps_a_job_to_one_worker_until_it_lapses_or_its_owner_returns(jobs: JobStore) -> None:
    clock = jobs.clock
    assert isinstance(clock, FakeClock)
    a = DatabaseClaims(jobs, "host:/a/spool.db", lease=10.0)
    b = DatabaseClaims(jobs, "host:/b/spool.db", lease=10.0)
    first, _ = await jobs.submit("briefs", _items(1))
    clock.advance(1)
    second, _ = await jobs.submit("briefs", _items(1))
    assert [j.id for j in await a.claim(1)] == [first.id]  # oldest first
    assert [j.id for j in await b.claim(5)] == [second.id]
    assert await a.claim(5, exclude=[first.id]) == []
    clock.advance(6)
    assert await a.renew([first.id, second.id]) == {first.id}  # it never held the second
    clock.advance(6)
    assert await b.claim(5, exclude=[second.id]) == []  # a's lease was renewed
    # a dies without releasing (kill -9): its job lapses after the lease...
    clock.advance(10.5)
    assert (a.taken_over, b.taken_over) == (0, 0)
    assert [j.id for j in await b.claim(5, exclude=[second.id])] == [first.id]
    assert b.taken_over == 1  # taken over from a, counted for the reclaim metric
    assert await a.renew([first.id]) == set()  # ...and a, were it alive, learns it lost the job
    # b comes back as the same owner after a crash: its own jobs come back at once, lease or not.
    assert {j.id for j in await b.claim(5)} == {first.id, second.id}
    assert b.taken_over == 1  # its own jobs are not a takeover
    await b.release([first.id])
    assert [j.id for j in await a.claim(5)] == [first.id]


class ClaimMachine(RuleBasedStateMachine):
    """Two workers claim, work, crash, come back and release over jobs in one database: every item is
    stored exactly once, counted once, and a finished item is never handed out again."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="claim-machine-"))
        self.briefs = BriefStore(f"sqlite+aiosqlite:///{self.dir / 'jobs.db'}")
        self.clock = FakeClock(1_700_000_000.0)
        self.jobs = JobStore(self.briefs, clock=self.clock)
        self._run(self.briefs.init())
        self._run(self.jobs.init())
        self.claims = {w: DatabaseClaims(self.jobs, w, lease=10.0) for w in ("a", "b")}
        self.held: dict[str, set[str]] = {"a": set(), "b": set()}
        self.job_ids: list[str] = []
        self.stored: dict[tuple[str, int], int] = {}  # item -> times a write was accepted
        self.totals: dict[str, int] = {}

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(n=st.integers(1, 4))
    def submit(self, n: int) -> None:
        job, _ = self._run(self.jobs.submit("briefs", _items(n)))
        self.job_ids.append(job.id)
        self.totals[job.id] = n

    @rule(worker=st.sampled_from("ab"))
    def claim(self, worker: str) -> None:
        got = self._run(self.claims[worker].claim(3, exclude=self.held[worker]))
        for job in got:
            other = "b" if worker == "a" else "a"
            # Taken from the other worker only when its lease had lapsed (it is then no longer its).
            self.held[other].discard(job.id)
            self.held[worker].add(job.id)

    @precondition(lambda self: self.held["a"] or self.held["b"])
    @rule(worker=st.sampled_from("ab"), pick=st.integers(0, 100), fail=st.booleans())
    def work_one_item(self, worker: str, pick: int, fail: bool) -> None:
        held = sorted(self.held[worker])
        if not held:
            return
        job_id = held[pick % len(held)]
        items = self._run(self.jobs.open_items(job_id))
        if not items:
            return
        item = items[pick % len(items)]
        outcome = ItemOutcome(error="pipeline error") if fail else _ok(item.index)
        if self._run(self.jobs.finish_item(job_id, item.index, outcome, attempts=1)):
            key = (job_id, item.index)
            self.stored[key] = self.stored.get(key, 0) + 1

    @rule(worker=st.sampled_from("ab"))
    def write_a_finished_item_again(self, worker: str) -> None:
        for job_id, index in list(self.stored)[:1]:
            assert not self._run(self.jobs.finish_item(job_id, index, _ok(index), attempts=2))

    @rule(worker=st.sampled_from("ab"))
    def crash(self, worker: str) -> None:
        self.held[worker] = set()  # nothing released: the leases stay in the database

    @rule(worker=st.sampled_from("ab"))
    def release(self, worker: str) -> None:
        self._run(self.claims[worker].release(self.held[worker]))
        self.held[worker] = set()

    @rule(worker=st.sampled_from("ab"))
    def renew(self, worker: str) -> None:
        self.held[worker] = self._run(self.claims[worker].renew(self.held[worker]))

    @rule(seconds=st.sampled_from([1.0, 5.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def complete_what_is_done(self) -> None:
        for job_id in self.job_ids:
            self._run(self.jobs.complete(job_id))

    @invariant()
    def every_item_once(self) -> None:
        assert all(n == 1 for n in self.stored.values())
        for job_id in self.job_ids:
            job = self._run(self.jobs.get(job_id))
            counts = self._run(self.jobs.item_counts(job_id))
            assert sum(counts.values()) == self.totals[job_id]
            finished = counts.get("succeeded", 0) + counts.get("failed", 0)
            assert finished == job.done + job.failed == sum(1 for k in self.stored if k[0] == job_id)
            assert job.done == counts.get("succeeded", 0)
            open_items = self._run(self.jobs.open_items(job_id))
            assert all((job_id, i.index) not in self.stored for i in open_items)
            if job.state in ("succeeded", "partially_succeeded", "failed"):
                assert not open_items
                assert job.owner is None

    def teardown(self) -> None:
        self._run(self.briefs.aclose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestClaimMachine = ClaimMachine.TestCase
TestClaimMachine.settings = settings(
    max_examples=20, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


async def test_the_overview_says_how_long_the_stalest_running_job_has_not_moved(jobs: JobStore) -> None:
    clock = jobs.clock
    assert isinstance(clock, FakeClock)
    claims = DatabaseClaims(jobs, "me", lease=60.0)
    assert (await jobs.overview())[2] is None  # nothing runs
    first, _ = await jobs.submit("briefs", _items(2))
    (claimed,) = await claims.claim(5)
    clock.advance(30)
    second, _ = await jobs.submit("briefs", _items(2))
    await claims.claim(5, exclude=[first.id])
    counts, oldest, stalest = await jobs.overview()
    assert counts == {"running": 2}
    assert oldest is None
    assert stalest == claimed.updated_at  # the first job has not moved since its claim
    clock.advance(5)
    await jobs.finish_item(first.id, 0, _ok(0), attempts=1)  # progress: now the second is the stalest
    assert (await jobs.overview())[2] == claimed.updated_at + 30
    # An item waiting to retry (running, no outcome) does not start again once its job is cancelled,
    # whichever replica holds it; and a cancelled job is not held against the workers.
    assert await jobs.start_item(second.id, 0, 1)
    await jobs.cancel(second.id)
    assert not await jobs.start_item(second.id, 0, 2)
    assert (await jobs.overview())[2] == claimed.updated_at + 35
