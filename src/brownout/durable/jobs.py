"""Long-running jobs kept in the brief store's database, item by item, and the leases on them.

A job is a list of items of one type (``briefs``: customer texts) handed over in one request and
worked through by the server's workers (:mod:`brownout.server.jobs`). Everything about it lives in
two tables of the same database as the briefs (SQLite by default, PostgreSQL when configured),
written through the :class:`~brownout.durable.store.BriefStore`'s engine:

* ``jobs`` -- one row per job: its state and why, its progress counters, the submission's
  ``Idempotency-Key`` (unique: a retried submission finds the job it created), an optional webhook
  URL, and the lease (``owner``, ``lease_until``) of the worker running it;
* ``job_items`` -- one row per item, keyed by ``(job_id, idx)``: its input, its state, and once it is
  done its result (the checkpoint), what served it, whether it is a mock answer, or its error.

**Exactly once.** Every item row is written once, with the job, in the submission's transaction. An
item's outcome is a conditional update -- only an item still ``pending`` or ``running`` takes one --
done in one transaction with the job's counters, so writing the same outcome twice (a worker that
retries a write, two workers that both finished it) changes nothing the second time and counts once.
A restarted worker picks up only the items without an outcome: a finished item is never redone.

**States.** A job is ``queued`` until a worker claims it, then ``running``, then ``succeeded`` (every
item has a result), ``partially_succeeded`` (some failed), ``failed`` (none succeeded) or
``cancelled``; ``reason`` says why in words. An item is ``pending``, ``running``, ``succeeded``,
``failed`` or ``cancelled`` (it had not started when its job was cancelled).

**Claims.** Which worker runs which job goes through :class:`JobClaims`; the one implementation here,
:class:`DatabaseClaims`, is a lease in the ``jobs`` row: a worker claims a queued job, or a running
one whose lease has run out, renews its leases while it works (``lease / 3``), and releases them when
it stops. A worker that dies without releasing (``kill -9``) holds its jobs only until the lease runs
out -- and not even that long when the same server comes back, since a worker's ``owner`` names what
only one process can hold at a time (its spool file), so a returning owner takes its jobs back at
once. Times are wall-clock epoch seconds: they are compared across processes and restarts. With
several replicas on Redis and one PostgreSQL database, the job's lease stays here while its items are
handed out through a Redis stream (:mod:`brownout.durable.job_queue`); the outcomes are written here
all the same, so the exactly-once rule does not depend on Redis.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from brownout.clock import WALL_CLOCK, Clock
from brownout.durable.store import BriefStore

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "JOB_STATES",
    "DatabaseClaims",
    "ItemOutcome",
    "ItemRow",
    "JobClaims",
    "JobRow",
    "JobState",
    "JobStore",
    "final_state",
]

JobState = Literal["queued", "running", "succeeded", "partially_succeeded", "failed", "cancelled"]
"""Where a job is in its life."""

JOB_STATES: Final[tuple[JobState, ...]] = (
    "queued",
    "running",
    "succeeded",
    "partially_succeeded",
    "failed",
    "cancelled",
)
"""Every job state, in life order."""

ACTIVE_STATES: Final = ("queued", "running")
"""States of a job that still has work to do."""

FINAL_STATES: Final = ("succeeded", "partially_succeeded", "failed", "cancelled")
"""States a job never leaves."""

_OPEN_ITEMS: Final = ("pending", "running")

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("type", String(32), nullable=False),
    Column("state", String(24), nullable=False),
    Column("reason", Text, nullable=True),
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("mock", Integer, nullable=False),
    # A retried submission with the same key finds this job (unique; NULL when none was sent).
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=False),
    Column("webhook", Text, nullable=True),
    Column("owner", String(255), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
)
Index("ix_jobs_state_created", jobs.c.state, jobs.c.created_at)

job_items = Table(
    "job_items",
    metadata,
    Column("job_id", String(32), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("result", Text, nullable=True),
    Column("served_by", String(64), nullable=True),
    Column("mock", Boolean, nullable=False),
    Column("error", Text, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    # One row per item of a job, ever: the exactly-once guarantee starts here.
    PrimaryKeyConstraint("job_id", "idx", name="pk_job_items"),
)


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job as stored."""

    id: str
    type: str
    state: str
    reason: str | None
    total: int
    done: int
    failed: int
    mock: int
    idempotency_key: str | None
    request_hash: str
    webhook: str | None
    owner: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> int:
        """Items with an outcome (a result or an error)."""
        return self.done + self.failed


@dataclass(frozen=True, slots=True)
class ItemRow:
    """One item of a job as stored; ``result`` is the checkpoint written when it was done."""

    job_id: str
    index: int
    state: str
    payload: dict[str, Any]
    result: dict[str, Any] | None
    served_by: str | None
    mock: bool
    error: str | None
    attempts: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What became of one item: a ``result`` (and what served it, whether it is a mock), or an ``error``."""

    result: dict[str, Any] | None = None
    served_by: str | None = None
    mock: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the item has a result."""
        return self.result is not None


def final_state(total: int, done: int, failed: int) -> tuple[JobState, str]:
    """The final state of a job whose every item has an outcome, and the reason in words."""
    if failed == 0:
        return "succeeded", f"all {total} items succeeded"
    if done == 0:
        return "failed", f"all {total} items failed"
    return "partially_succeeded", f"{failed} of {total} items failed"


def _job(row: Any) -> JobRow:
    return JobRow(**{c.name: getattr(row, c.name) for c in jobs.columns})


def _item(row: Any) -> ItemRow:
    return ItemRow(
        job_id=row.job_id,
        index=row.idx,
        state=row.state,
        payload=json.loads(row.payload),
        result=None if row.result is None else json.loads(row.result),
        served_by=row.served_by,
        mock=bool(row.mock),
        error=row.error,
        attempts=row.attempts,
        updated_at=row.updated_at,
    )


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


class JobStore:
    """The ``jobs`` and ``job_items`` tables (module docstring), in ``store``'s database.

    Every method opens its own transaction through the store's engine, so the writable host is found
    (and found again after a failover) the way the brief store finds it. ``clock`` is wall time.
    """

    def __init__(self, store: BriefStore, *, clock: Clock = WALL_CLOCK) -> None:
        self.store = store
        self.clock = clock

    async def init(self) -> None:
        """Create the tables if they are not there (idempotent; several replicas may race to it)."""
        engine = await self.store.engine()
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # The brief store's migration lock: replicas starting together create the tables once.
                await conn.execute(text("SELECT pg_advisory_xact_lock(4242424242)"))
            await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))

    def _insert(self) -> Any:
        return pg_insert if self.store.dialect == "postgresql" else sqlite_insert

    # ------------------------------------------------------------------ submission

    async def submit(
        self,
        job_type: str,
        items: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        request_hash: str = "",
        webhook: str | None = None,
    ) -> tuple[JobRow, bool]:
        """Store a new ``queued`` job with ``items``; ``(job, True)``. When ``idempotency_key`` is
        already taken, nothing is written and the job that took it comes back: ``(job, False)``.

        The job and all its items are one transaction: a job is never seen with part of its items.
        """
        now = self.clock.now()
        job_id = uuid.uuid4().hex
        row: dict[str, Any] = {
            "id": job_id,
            "type": job_type,
            "state": "queued",
            "reason": "waiting for a worker",
            "total": len(items),
            "done": 0,
            "failed": 0,
            "mock": 0,
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
            "webhook": webhook,
            "owner": None,
            "lease_until": None,
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
        }
        engine = await self.store.engine()
        async with engine.begin() as conn:
            stmt = (
                self._insert()(jobs).values(**row).on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            created = (await conn.execute(stmt)).rowcount == 1
            if created:
                await conn.execute(
                    job_items.insert(),
                    [
                        {
                            "job_id": job_id,
                            "idx": i,
                            "state": "pending",
                            "payload": _dump(dict(item)),
                            "result": None,
                            "served_by": None,
                            "mock": False,
                            "error": None,
                            "attempts": 0,
                            "updated_at": now,
                        }
                        for i, item in enumerate(items)
                    ],
                )
                return JobRow(**row), True
            taken = (await conn.execute(select(jobs).where(jobs.c.idempotency_key == idempotency_key))).one()
            return _job(taken), False

    # ------------------------------------------------------------------ reads

    async def get(self, job_id: str) -> JobRow | None:
        """The job ``job_id``, or None."""
        engine = await self.store.engine()
        async with engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return None if row is None else _job(row)

    async def items(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> list[ItemRow]:
        """The items of ``job_id`` in index order, from ``offset``, at most ``limit``."""
        stmt = select(job_items).where(job_items.c.job_id == job_id).order_by(job_items.c.idx).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        engine = await self.store.engine()
        async with engine.connect() as conn:
            return [_item(r) for r in await conn.execute(stmt)]

    async def item(self, job_id: str, index: int) -> ItemRow | None:
        """Item ``index`` of ``job_id``, or None."""
        stmt = select(job_items).where(job_items.c.job_id == job_id, job_items.c.idx == index)
        engine = await self.store.engine()
        async with engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else _item(row)

    async def open_count(self, job_id: str) -> int:
        """How many items of ``job_id`` have no outcome yet."""
        stmt = (
            select(func.count())
            .select_from(job_items)
            .where(job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_ITEMS))
        )
        engine = await self.store.engine()
        async with engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def open_items(self, job_id: str) -> list[ItemRow]:
        """The items of ``job_id`` without an outcome yet (``pending``, or ``running`` when a worker
        stopped in the middle of them), in index order: what a worker still has to do."""
        stmt = (
            select(job_items)
            .where(job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_ITEMS))
            .order_by(job_items.c.idx)
        )
        engine = await self.store.engine()
        async with engine.connect() as conn:
            return [_item(r) for r in await conn.execute(stmt)]

    async def list_jobs(self, *, state: str | None = None, offset: int = 0, limit: int = 100) -> list[JobRow]:
        """Jobs, newest first, optionally only those in ``state``."""
        stmt = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id).offset(offset).limit(limit)
        if state is not None:
            stmt = stmt.where(jobs.c.state == state)
        engine = await self.store.engine()
        async with engine.connect() as conn:
            return [_job(r) for r in await conn.execute(stmt)]

    async def summary(self) -> tuple[dict[str, int], float | None]:
        """Jobs by state, and when the oldest queued job was submitted (None: none queued)."""
        counts, oldest, _ = await self.overview()
        return counts, oldest

    async def overview(self) -> tuple[dict[str, int], float | None, float | None]:
        """Jobs by state; when the oldest queued job was submitted; and the last progress of the running
        job that moved least recently (its ``updated_at``: a claim or an item's outcome), None when
        none runs -- what a stuck-job alert watches."""
        engine = await self.store.engine()
        async with engine.connect() as conn:
            counts = {
                state: int(n)
                for state, n in await conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
            }
            oldest = (
                await conn.execute(select(func.min(jobs.c.created_at)).where(jobs.c.state == "queued"))
            ).scalar()
            stalest = (
                await conn.execute(select(func.min(jobs.c.updated_at)).where(jobs.c.state == "running"))
            ).scalar()
        return (
            counts,
            None if oldest is None else float(oldest),
            None if stalest is None else float(stalest),
        )

    # ------------------------------------------------------------------ items

    async def start_item(self, job_id: str, index: int, attempts: int) -> bool:
        """Mark an item ``running`` (its ``attempts`` so far); False when it already has an outcome, was
        cancelled, or its job ended (cancelled: an item waiting to retry, on any replica) -- then it
        must not run."""
        job_active = select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE_STATES)).exists()
        stmt = (
            update(job_items)
            .where(
                job_items.c.job_id == job_id,
                job_items.c.idx == index,
                job_items.c.state.in_(_OPEN_ITEMS),
                job_active,
            )
            .values(state="running", attempts=attempts, updated_at=self.clock.now())
        )
        engine = await self.store.engine()
        async with engine.begin() as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def finish_item(self, job_id: str, index: int, outcome: ItemOutcome, *, attempts: int) -> bool:
        """Store an item's outcome (its checkpoint) and count it in the job, in one transaction.

        Idempotent: only an item without an outcome takes one, so a second write of the same item
        (a retried write, a second worker) stores and counts nothing and returns False."""
        now = self.clock.now()
        ok = outcome.ok
        stmt = (
            update(job_items)
            .where(job_items.c.job_id == job_id, job_items.c.idx == index, job_items.c.state.in_(_OPEN_ITEMS))
            .values(
                state="succeeded" if ok else "failed",
                result=None if outcome.result is None else _dump(outcome.result),
                served_by=outcome.served_by,
                mock=outcome.mock,
                error=outcome.error,
                attempts=attempts,
                updated_at=now,
            )
        )
        engine = await self.store.engine()
        async with engine.begin() as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                return False
            counters: dict[str, Any] = {"updated_at": now}
            if ok:
                counters["done"] = jobs.c.done + 1
                if outcome.mock:
                    counters["mock"] = jobs.c.mock + 1
            else:
                counters["failed"] = jobs.c.failed + 1
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(**counters))
            return True

    # ------------------------------------------------------------------ job states

    async def complete(self, job_id: str) -> JobRow | None:
        """End a running job whose items all have an outcome: its final state from its counters.

        Returns the job as ended, or None when it was not running (already ended, cancelled, or lost
        to another worker) or still has open items."""
        now = self.clock.now()
        engine = await self.store.engine()
        async with engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
            if row is None or row.state != "running":
                return None
            left = (
                await conn.execute(
                    select(func.count())
                    .select_from(job_items)
                    .where(job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_ITEMS))
                )
            ).scalar_one()
            if left:
                return None
            state, reason = final_state(row.total, row.done, row.failed)
            if row.mock:
                reason += f" ({row.mock} in mock mode: rule-based, no model)"
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == "running")
                .values(
                    state=state, reason=reason, owner=None, lease_until=None, finished_at=now, updated_at=now
                )
            )
            if result.rowcount != 1:
                return None
            ended = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
            return _job(ended)

    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[JobRow | None, bool]:
        """Cancel a queued or running job: its items not started yet are ``cancelled``; those running
        may still finish and keep their results. Returns the job (None: no such job) and whether this
        call cancelled it (False when it had already ended)."""
        now = self.clock.now()
        engine = await self.store.engine()
        async with engine.begin() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(ACTIVE_STATES))
                .values(state="cancelled", reason=reason, finished_at=now, updated_at=now)
            )
            changed = result.rowcount == 1
            if changed:
                await conn.execute(
                    update(job_items)
                    .where(job_items.c.job_id == job_id, job_items.c.state == "pending")
                    .values(state="cancelled", updated_at=now)
                )
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return (None if row is None else _job(row)), changed

    # ------------------------------------------------------------------ leases (DatabaseClaims)

    async def claim(
        self,
        owner: str,
        *,
        lease: float,
        limit: int,
        exclude: Iterable[str] = (),
        taken_over: Callable[[str, str], object] | None = None,
    ) -> list[JobRow]:
        """Take up to ``limit`` jobs for ``owner``, oldest first: queued ones, running ones whose lease
        ran out, and running ones ``owner`` held before (it came back) -- but none of ``exclude``
        (those it holds and runs now). Each becomes ``running`` with a lease of ``lease`` seconds; a
        job another worker claims first is skipped. ``taken_over(job_id, previous_owner)`` is called
        for each job taken from another owner whose lease ran out."""
        if limit <= 0:
            return []
        now = self.clock.now()
        claimable = and_(
            jobs.c.state.in_(ACTIVE_STATES),
            or_(jobs.c.owner.is_(None), jobs.c.owner == owner, jobs.c.lease_until < now),
        )
        skip = list(exclude)
        if skip:
            claimable = and_(claimable, jobs.c.id.not_in(skip))
        engine = await self.store.engine()
        taken: list[JobRow] = []
        async with engine.begin() as conn:
            candidates = (
                await conn.execute(
                    select(jobs.c.id, jobs.c.state, jobs.c.owner)
                    .where(claimable)
                    .order_by(jobs.c.created_at, jobs.c.id)
                    .limit(limit)
                )
            ).all()
            for job_id, state, previous in candidates:
                values: dict[str, Any] = {
                    "owner": owner,
                    "lease_until": now + lease,
                    "state": "running",
                    "reason": "running",
                    "updated_at": now,
                }
                if state == "queued":
                    values["started_at"] = now
                # The same condition again: between the read and this write another worker may have won.
                result = await conn.execute(
                    update(jobs).where(jobs.c.id == job_id, claimable).values(**values)
                )
                if result.rowcount == 1:
                    row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
                    taken.append(_job(row))
                    if taken_over is not None and previous is not None and previous != owner:
                        taken_over(job_id, previous)
        return taken

    async def renew(self, owner: str, job_ids: Iterable[str], *, lease: float) -> set[str]:
        """Extend ``owner``'s leases on ``job_ids``; the ids it still holds (a job cancelled or taken
        over meanwhile is no longer held: its worker stops starting items)."""
        ids = list(job_ids)
        if not ids:
            return set()
        now = self.clock.now()
        engine = await self.store.engine()
        async with engine.begin() as conn:
            held = and_(jobs.c.id.in_(ids), jobs.c.owner == owner, jobs.c.state == "running")
            await conn.execute(update(jobs).where(held).values(lease_until=now + lease))
            return {r[0] for r in await conn.execute(select(jobs.c.id).where(held))}

    async def release(self, owner: str, job_ids: Iterable[str]) -> None:
        """Give up ``owner``'s leases on ``job_ids`` (a stopping worker): another takes them at once."""
        ids = list(job_ids)
        if not ids:
            return
        engine = await self.store.engine()
        async with engine.begin() as conn:
            await conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.owner == owner)
                .values(owner=None, lease_until=None, updated_at=self.clock.now())
            )

    async def item_counts(self, job_id: str) -> dict[str, int]:
        """How many items of ``job_id`` are in each state (audits and tests: every item once)."""
        engine = await self.store.engine()
        async with engine.connect() as conn:
            return await _item_counts(conn, job_id)


async def _item_counts(conn: AsyncConnection, job_id: str) -> dict[str, int]:
    rows = await conn.execute(
        select(job_items.c.state, func.count())
        .where(job_items.c.job_id == job_id)
        .group_by(job_items.c.state)
    )
    return {state: int(n) for state, n in rows}


class JobClaims(Protocol):
    """Which jobs this worker runs: claimed, kept alive while it works, given back when it stops.

    The embedded default keeps the claims in the database (:class:`DatabaseClaims`); a shared broker
    for several replicas can stand in its place without the workers changing."""

    owner: str
    """Who claims: the same for a server that comes back, so it takes its own jobs back at once."""

    taken_over: int
    """Jobs claimed so far from another owner that stopped without giving them back (for metrics)."""

    async def claim(self, limit: int, exclude: Iterable[str] = ()) -> list[JobRow]:
        """Up to ``limit`` jobs to run now, none of ``exclude`` (they are ``running`` and held when
        returned)."""

    async def renew(self, job_ids: Iterable[str]) -> set[str]:
        """Keep holding ``job_ids``; returns those still held."""

    async def release(self, job_ids: Iterable[str]) -> None:
        """Stop holding ``job_ids``."""


class DatabaseClaims:
    """:class:`JobClaims` as a lease of ``lease`` seconds in the ``jobs`` row (module docstring)."""

    def __init__(self, store: JobStore, owner: str, *, lease: float) -> None:
        self.store = store
        self.owner = owner
        self.lease = lease
        self.taken_over = 0
        """Jobs claimed from another owner whose lease had run out (it stopped without releasing)."""

    async def claim(self, limit: int, exclude: Iterable[str] = ()) -> list[JobRow]:
        """Claim up to ``limit`` jobs (queued, or with a lapsed lease, or this owner's from before)."""
        return await self.store.claim(
            self.owner, lease=self.lease, limit=limit, exclude=exclude, taken_over=self._taken_over
        )

    def _taken_over(self, job_id: str, previous: str) -> None:
        self.taken_over += 1

    async def renew(self, job_ids: Iterable[str]) -> set[str]:
        """Extend the leases; the jobs still held."""
        return await self.store.renew(self.owner, job_ids, lease=self.lease)

    async def release(self, job_ids: Iterable[str]) -> None:
        """Give the jobs back."""
        await self.store.release(self.owner, job_ids)
