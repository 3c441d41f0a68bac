"""The server's job workers: claim jobs, run their items through the pipeline, checkpoint each one.

:class:`JobWorkers` runs in ``brownout serve`` from :meth:`start` to :meth:`aclose`. Every
``jobs.poll_interval`` (and at once after a submission) it renews the leases of the jobs it holds and
claims more (:class:`~brownout.durable.jobs.JobClaims`, up to ``jobs.max_running_jobs``). For each
job it reads the items still without an outcome -- after a restart, only those: a finished item is
never redone -- and starts them one at a time, at most ``jobs.concurrency`` running over all jobs:

* **interactive first**: an item starts only while :class:`InteractiveFirst` sees no reason to wait
  -- interactive ``/v1/briefs`` requests waiting in the admission queue, as many in flight as
  ``jobs.interactive_threshold``, the dimmer dimming while they run, or the resource monitor's memory
  at ``critical`` (then no job is claimed either: job intake pauses before it hurts anybody);
* **retries**: a transient failure (network, resource exhaustion, a model that is loading, the
  service shedding load -- :func:`transient`) is tried again with capped exponential backoff and full
  jitter, up to ``jobs.max_attempts``; any other failure, or the last attempt's, is the item's error;
* **checkpoint**: the outcome is written as the item finishes (``JobStore.finish_item``, idempotent),
  then a ``job`` message goes to the live channel with the progress;
* **the end**: once every item has an outcome the job ends ``succeeded``, ``partially_succeeded`` or
  ``failed`` (a live message, and its webhook when it has one). ``POST /v1/jobs/{id}/cancel`` ends it
  ``cancelled`` at once: no new item starts (an item waiting to retry stops), the running ones may
  finish and keep their results.

Stopping cancels the items in flight (they have no outcome, so the next worker runs them again) and
releases the leases, so a restarted server -- or another one -- carries on at once.

**Several replicas** (``queue``: a :class:`~brownout.durable.job_queue.RedisItemQueue`, with
``redis.url`` and one PostgreSQL database for all): the replica holding a job puts its open items in
the Redis stream, once, and every replica's consumer loop takes items from it as its slots and the
interactive-first rule allow -- a big job runs on all replicas at once. A consumer touches the
entries it runs every ``lease / 3``; a replica that dies leaves its entries idle, and after
``jobs.lease`` seconds the others take them (``XAUTOCLAIM``), while its jobs' database leases lapse
and another replica holds them. Whoever writes a job's last outcome ends it. When Redis stops
answering, the holder runs its job's open items itself, from the database, as with one server: the
job keeps going and nothing is lost (items another replica was running may run twice then; their
outcome is stored once).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from brownout import telemetry
from brownout.background import Periodic, TaskSet
from brownout.clock import SYSTEM_CLOCK, WALL_CLOCK, Clock
from brownout.config import JobsSection
from brownout.durable.job_queue import Delivery, RedisItemQueue
from brownout.durable.jobs import (
    ACTIVE_STATES,
    FINAL_STATES,
    JOB_STATES,
    ItemOutcome,
    ItemRow,
    JobClaims,
    JobRow,
    JobStore,
)
from brownout.errors import ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus
from brownout.policies.admission import Admission
from brownout.policies.dimmer import Dimmer
from brownout.policies.retry import Retry, RetryConfig
from brownout.recovery.classify import FailureType, classify

__all__ = ["InteractiveFirst", "JobHandler", "JobWorkers", "JobsCollector", "describe_failure", "transient"]

_log = logging.getLogger("brownout.jobs")


_TRANSIENT_TYPES = frozenset(
    {
        FailureType.NETWORK,
        FailureType.SYSTEM_RESOURCE,
        FailureType.VRAM_EXHAUSTION,
        FailureType.MODEL_LOADING,
    }
)


def transient(error: BaseException) -> bool:
    """Whether another attempt at an item may succeed: the service said "not now" (503: busy, or the
    database and spool away), or the failure classifies as network, resource exhaustion or a model
    still loading (:func:`~brownout.recovery.classify.classify`)."""
    if isinstance(error, ServiceUnavailable):
        return True
    return classify(error).type in _TRANSIENT_TYPES


def describe_failure(error: BaseException) -> str:
    """An item's error as stored and shown: the failure kind, then what happened."""
    kind = classify(error).type
    message = str(error) or type(error).__name__
    return f"{kind.value}: {type(error).__name__}: {message}"[:2000]


class JobHandler(Protocol):
    """What runs the items of one job type (:class:`~brownout.briefs.jobs.BriefsJob`)."""

    @property
    def type(self) -> str:
        """The job type's name."""

    def check(self, item: Mapping[str, Any]) -> None:
        """Raise ValueError for an item that can never be served (checked at submission)."""

    async def run(self, item: Mapping[str, Any]) -> ItemOutcome:
        """Run one item; raise when it failed."""


class InteractiveFirst:
    """Says whether a job item must wait now, and why (None: it may start).

    Reads what the server already knows of its load: the brief ``admission`` (requests in flight and
    waiting -- the workers' own items among them, ``own`` of them, are not interactive), the
    ``dimmer`` (dimming means the latency target is at risk), and ``memory_critical`` (the resource
    monitor's verdict)."""

    def __init__(
        self,
        admission: Admission,
        dimmer: Dimmer,
        *,
        threshold: int,
        memory_critical: Callable[[], bool] = lambda: False,
    ) -> None:
        self.admission = admission
        self.dimmer = dimmer
        self.threshold = threshold
        self.memory_critical = memory_critical

    def intake_paused(self) -> str | None:
        """Why no job may be claimed now, or None."""
        if self.memory_critical():
            return "memory is critical: job intake paused"
        return None

    def reason(self, own: int) -> str | None:
        """Why a job item may not start now, given ``own`` items of the workers in flight; or None."""
        paused = self.intake_paused()
        if paused is not None:
            return paused
        admission = self.admission
        # Job items may be anywhere in the admission (running or queued): what is left is interactive.
        interactive = max(0, admission.in_flight + admission.queue_size - own)
        if interactive == 0:
            return None
        if admission.queue_size > 0:
            return "interactive requests are waiting"
        if interactive >= self.threshold:
            return f"{interactive} interactive requests in flight"
        if self.dimmer.level > 0:
            return "the server is dimming under interactive load"
        return None


@dataclass
class _Run:
    """One job this worker holds: its counters as it goes and why it stopped."""

    job: JobRow
    done: int
    failed: int
    mock: int
    stopped: str | None = None
    """Why no more items start: cancelled, lost to another worker, the server stopping."""
    waiting: str | None = None
    """Why its next item waits (interactive first), or None."""
    items: TaskSet = field(default_factory=lambda: TaskSet("job items", logger=_log))


class _Stopped(Exception):
    """The item's job stopped (cancelled, lost) before this attempt: it is not run."""


class JobWorkers:
    """Runs the jobs of ``store`` (module docstring), claimed through ``claims``.

    ``handlers`` run the items, by job type; ``gate`` decides when items wait; ``publish(kind, data,
    keep)`` sends a live message (the live hub's ``publish``; ``keep``: for late joiners too);
    ``clock`` paces the loop and the retries; ``wall_clock`` times the figures shown."""

    def __init__(
        self,
        section: JobsSection,
        store: JobStore,
        claims: JobClaims,
        handlers: Mapping[str, JobHandler],
        *,
        gate: InteractiveFirst | None = None,
        publish: Callable[[str, Mapping[str, Any], bool], object] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        wall_clock: Clock = WALL_CLOCK,
        events: EventBus = DEFAULT_BUS,
        queue: RedisItemQueue | None = None,
    ) -> None:
        self.section = section
        self.queue = queue
        self.hand_back_timeout = 5.0
        """Longest wait, at stop, to release job leases or hand running items back to the other
        replicas (seconds of the event loop's own time: the stop must end whatever the clock says)."""
        """The Redis stream the replicas share items through (None: this server runs its jobs alone)."""
        self.queue_error: str | None = None
        """Why the stream did not answer the last time it was used (None: it did, or there is none)."""
        self.claimed: Counter[str] = Counter()
        """Work this process took: ``job`` (a database lease), ``item`` (a stream entry)."""
        self.reclaimed: Counter[str] = Counter()
        """Of that, what it took over from a worker that stopped: a lapsed lease, an idle entry."""
        self.stalest: float | None = None
        """Wall time of the last progress of the running job that moved least recently."""
        self.store = store
        self.claims = claims
        self.handlers = dict(handlers)
        self.gate = gate
        self.publish = publish
        self.clock = clock
        self.wall_clock = wall_clock
        self.ready = False
        """True once the job tables exist (the database may be away at start)."""
        self.in_flight = 0
        """Items running now, over all jobs."""
        self.outcomes: Counter[str] = Counter()
        """Items finished by this process, by outcome: ``succeeded`` (a model's), ``mock``, ``failed``."""
        self.retries = 0
        """Item attempts that failed transiently and were tried again."""
        self.counts: dict[str, int] = {}
        """Jobs by state, as of the last round (for the metrics)."""
        self.oldest_queued: float | None = None
        """Wall time the oldest queued job was submitted, as of the last round."""
        self.waiting: str | None = None
        """Why items wait now (interactive first, memory), or None."""
        self._runs: dict[str, _Run] = {}
        self._deliveries: dict[str, Delivery] = {}  # stream entries running here, by entry id
        self._backlog: list[Delivery] = []  # entries this consumer held before a restart
        self._jobs = TaskSet("jobs", logger=_log)
        self._items = TaskSet("job stream items", logger=_log)
        self._consumer = TaskSet("jobs-consumer", logger=_log)
        self._last_heartbeat = float("-inf")
        self._last_reclaim = float("-inf")
        self._side = TaskSet("jobs-side", logger=_log)  # rounds kicked by a submission, webhooks
        self._round_lock = asyncio.Lock()
        self._last_renew = float("-inf")
        self._nappers: set[asyncio.Future[None]] = set()
        self.interval = section.poll_interval
        """Seconds until the next round: ``jobs.poll_interval``, doubling while there is nothing to do
        (no job queued or running anywhere) up to ``jobs.idle_poll_interval``."""
        self._loop = Periodic("brownout-jobs", self._round, lambda: self.interval, clock=clock, logger=_log)
        self._retry = Retry(
            "jobs",
            RetryConfig(
                max_attempts=section.max_attempts,
                backoff_base=section.backoff_base,
                backoff_max=section.backoff_max,
                jitter="full",
                retry_if=transient,
                budget_ratio=None,
                max_retry_after=max(60.0, section.backoff_max),
            ),
            clock=clock,
            events=events,
        )

    # ------------------------------------------------------------------ life cycle

    @property
    def running(self) -> list[str]:
        """The ids of the jobs this worker holds now."""
        return list(self._runs)

    @property
    def shared(self) -> bool:
        """True when the items go through the Redis stream and it answered last time."""
        return self.queue is not None and self.queue_error is None

    async def start(self) -> None:
        """Create the job tables (or, with the database away, leave that to the loop's rounds) and
        start the loop -- and the stream's consumer, with several replicas."""
        await self._prepare()
        self._loop.start()
        if self.queue is not None:
            self._consumer.spawn(self._consume(), name="brownout-jobs-consumer")

    async def _prepare(self) -> bool:
        if not self.ready:
            try:
                await self.store.init()
            except Exception as e:
                _log.warning("jobs wait for the database: %s", e)
                return False
            self.ready = True
        return True

    def kick(self) -> None:
        """Run a round now rather than at the next poll (a job was just submitted)."""
        self.interval = self.section.poll_interval
        self._side.spawn(self._round(), name="brownout-jobs-kick")

    async def aclose(self) -> None:
        """Stop: no new items, the running ones cancelled (they will run again), leases released."""
        await self._loop.stop()
        for run in self._runs.values():
            run.stopped = run.stopped or "the server is stopping"
        held = list(self._runs)
        await self._consumer.cancel()
        entries = list(self._deliveries)
        await self._items.cancel()
        await self._jobs.cancel()
        await self._side.cancel()
        # Handing work back is a courtesy to the other replicas (without it they wait out the lease):
        # a database or Redis that does not answer must not hold the server's stop, so each is bounded.
        if held and self.ready:
            try:
                async with asyncio.timeout(self.hand_back_timeout):
                    await self.claims.release(held)
            except Exception as e:  # the next owner waits out the lease instead
                _log.warning("could not release %d job lease(s): %r", len(held), e)
        if self.queue is not None:
            try:
                async with asyncio.timeout(self.hand_back_timeout):
                    # The items cut short have no outcome: the other replicas take them at once.
                    await self.queue.let_go(entries, lease=self.section.lease)
            except Exception as e:  # they wait out the lease instead
                _log.warning("could not hand back %d job item(s): %r", len(entries), e)
            await self.queue.aclose()

    # ------------------------------------------------------------------ the loop

    async def _round(self) -> None:
        """Renew the leases held, refresh the figures, claim more jobs when there is room; then set
        the wait until the next round.

        With nothing to do the wait doubles, up to ``jobs.idle_poll_interval``: looking twice a second,
        a server without jobs handed its database thread about a hundred calls a second, each waking
        a thread on the cores a local model needs. A submission here kicks a round at once and resets
        the wait; one through another replica is seen within the longer wait; a queued or running job
        anywhere, or one held here, keeps ``jobs.poll_interval``."""
        busy = True
        try:
            busy = await self._look()
        finally:
            section = self.section
            if busy:
                self.interval = section.poll_interval
            else:
                ceiling = max(section.poll_interval, section.idle_poll_interval)
                self.interval = min(self.interval * 2, ceiling)

    async def _look(self) -> bool:
        """One round's work (see :meth:`_round`); False when there was nothing to do."""
        async with self._round_lock:
            if not await self._prepare():
                return True  # the database is away: look again soon
            now = self.clock.now()
            if self._runs and now - self._last_renew >= self.section.lease / 3:
                self._last_renew = now
                held = set(self._runs)
                kept = await self.claims.renew(held)
                for job_id in held - kept:
                    run = self._runs.get(job_id)
                    if run is not None and run.stopped is None:
                        run.stopped = "the job ended, was cancelled or was taken over by another worker"
                        self._wake()
            if self._deliveries and now - self._last_heartbeat >= self.section.lease / 3:
                self._last_heartbeat = now
                await self._heartbeat()
            self.counts, self.oldest_queued, self.stalest = await self.store.overview()
            active = bool(self._runs or self._deliveries or self._backlog)
            active = active or any(self.counts.get(state, 0) for state in ACTIVE_STATES)
            paused = self.gate.intake_paused() if self.gate is not None else None
            self.waiting = paused
            room = self.section.max_running_jobs - len(self._runs)
            if paused is not None or room <= 0:
                return active
            before = self.claims.taken_over
            for job in await self.claims.claim(room, exclude=list(self._runs)):
                if job.id in self._runs:
                    continue
                active = True
                self.claimed["job"] += 1
                run = _Run(job, done=job.done, failed=job.failed, mock=job.mock)
                self._runs[job.id] = run
                self._jobs.spawn(self._run_job(run), name=f"brownout-job-{job.id}")
            self.reclaimed["job"] += self.claims.taken_over - before
            return active

    async def cancel(self, job_id: str) -> JobRow | None:
        """Cancel ``job_id`` (``JobStore.cancel``); if this worker runs it, no new item starts from now."""
        job, changed = await self.store.cancel(job_id)
        if job is None or not changed:
            return job
        run = self._runs.get(job_id)
        if run is not None:
            run.stopped = run.stopped or "cancelled"
            self._wake()
        self._ended(job)
        return job

    def waiting_for(self, job_id: str) -> str | None:
        """Why the job's next item waits now, or None (not held here, or not waiting)."""
        run = self._runs.get(job_id)
        return None if run is None else run.waiting

    # ------------------------------------------------------------------ one job

    async def _run_job(self, run: _Run) -> None:
        job = run.job
        attributes: dict[str, str | int] = {
            "brownout.job.id": job.id,
            "brownout.job.type": job.type,
            "brownout.job.total": job.total,
        }
        # One trace per job run: its items (tasks spawned inside it) are its children.
        with telemetry.span(f"job {job.type}", attributes=attributes):
            await self._run_job_items(run)

    async def _run_job_items(self, run: _Run) -> None:
        job = run.job
        try:
            handler = self.handlers.get(job.type)
            self._publish(job, run)
            if self.queue is not None and await self._share(run, self.queue):
                items: list[ItemRow] = []  # every item has an outcome: the replicas ran them
            else:
                items = await self.store.open_items(job.id)
            for item in items:
                if not await self._turn(run):
                    break
                if handler is None:  # a type this server does not run (an older or newer server's)
                    await self._finish(run, item, ItemOutcome(error=f"unknown job type {job.type!r}"), 0)
                    continue
                self.in_flight += 1
                run.items.spawn(
                    self._run_item(run, handler, item), name=f"brownout-job-{job.id}-{item.index}"
                )
            await run.items.wait()
            if run.stopped is not None:
                return
            ended = await self.store.complete(job.id)
            if ended is not None:
                self._ended(ended)
        except asyncio.CancelledError:
            await run.items.cancel()
            raise
        finally:
            self._runs.pop(job.id, None)

    async def _turn(self, run: _Run) -> bool:
        """Wait until an item of ``run`` may start (a free slot, nothing interactive first); False when
        the job stopped meanwhile."""
        while run.stopped is None:
            reason = self.gate.reason(self.in_flight) if self.gate is not None else None
            self.waiting = reason
            if reason is None and self.in_flight >= self.section.concurrency:
                reason = f"all {self.section.concurrency} job slots are busy"
            run.waiting = reason
            if reason is None:
                return True
            await self._nap(self.section.poll_interval)
        run.waiting = None
        return False

    async def _attempts(
        self, job_id: str, handler: JobHandler, item: ItemRow, stopped: Callable[[], str | None]
    ) -> tuple[ItemOutcome | None, int]:
        """Run ``item``, tried again on transient failures: its outcome and the attempts it took, or
        None when it must not run (its job stopped, it has an outcome already)."""
        attempts = item.attempts

        async def attempt() -> ItemOutcome:
            nonlocal attempts
            why = stopped()
            if why is not None:
                raise _Stopped(why)
            if attempts > item.attempts:
                self.retries += 1
            attempts += 1
            if not await self.store.start_item(job_id, item.index, attempts):
                raise _Stopped("the item has an outcome already, or its job ended")
            return await handler.run(item.payload)

        attributes: dict[str, str | int] = {"brownout.job.id": job_id, "brownout.job.item": item.index}
        with telemetry.span("job item", attributes=attributes) as span:
            outcome: ItemOutcome | None
            try:
                outcome = await self._retry.call(attempt)
            except _Stopped:
                outcome = None
            except Exception as e:
                outcome = ItemOutcome(error=describe_failure(e))
            if span is not None:
                span.set_attribute("brownout.job.item_attempts", attempts)
                if outcome is not None:
                    span.set_attribute("brownout.job.item_ok", outcome.ok)
                    span.set_attribute("brownout.job.item_mock", outcome.mock)
            return outcome, attempts

    async def _run_item(self, run: _Run, handler: JobHandler, item: ItemRow) -> None:
        try:
            outcome, attempts = await self._attempts(run.job.id, handler, item, lambda: run.stopped)
            if outcome is not None:
                await self._finish(run, item, outcome, attempts)
        finally:
            self.in_flight -= 1
            self._wake()

    # ------------------------------------------------------------------ several replicas (the stream)

    async def _share(self, run: _Run, queue: RedisItemQueue) -> bool:
        """Hold ``run``'s job while the replicas run its items from the stream: put them in (once;
        again after Redis came back empty), then wait until every item has an outcome (True). False
        when the job stopped, or when Redis stopped answering: then this worker runs what is left."""
        job = run.job
        checked = float("-inf")
        while run.stopped is None:
            now = self.clock.now()
            if now - checked >= self.section.lease / 3:
                checked = now
                try:
                    if not await queue.dispatched(job.id):
                        left = [i.index for i in await self.store.open_items(job.id)]
                        added = await queue.dispatch(job.id, left, stamp=self.wall_clock.now())
                        if added is not None:
                            _log.info("job %s: %d item(s) in the stream for every replica", job.id, added)
                    self.queue_error = None
                except Exception as e:  # Redis away: this worker runs the job alone
                    self._queue_failed(e)
            if self.queue_error is not None:
                _log.warning(
                    "job %s: Redis does not answer, its items run here: %s", job.id, self.queue_error
                )
                return False
            if await self.store.open_count(job.id) == 0:
                return True
            await self._nap(self.section.poll_interval)
        return False

    def _queue_failed(self, error: BaseException) -> None:
        first = self.queue_error is None
        self.queue_error = f"{type(error).__name__}: {error}"[:300]
        if first:
            _log.warning("the job stream does not answer: %s", self.queue_error)

    async def _slots(self) -> int:
        """Wait until items may start here (interactive first, a free slot): how many."""
        while True:
            reason = self.gate.reason(self.in_flight) if self.gate is not None else None
            self.waiting = reason
            if reason is None and self.in_flight < self.section.concurrency:
                return self.section.concurrency - self.in_flight
            await self._nap(self.section.poll_interval)

    async def _consume(self) -> None:
        """Take items from the stream while there are free slots: first the entries this consumer
        held before a restart, then those idle past the lease (their consumer stopped), then new ones."""
        queue = self.queue
        assert queue is not None
        fresh = True
        while True:
            free = await self._slots()
            try:
                if fresh:
                    await queue.ensure_group()
                    self._backlog = await queue.own_pending(10_000)
                    fresh = False
                got: list[Delivery] = []
                while self._backlog and len(got) < free:
                    got.append(self._backlog.pop(0))
                now = self.clock.now()
                if not got and now - self._last_reclaim >= self.section.poll_interval:
                    self._last_reclaim = now
                    taken = await queue.reclaim(free, idle=self.section.lease)
                    got = [d for d in taken if d.entry not in self._deliveries]
                    self.reclaimed["item"] += len(got)
                if not got:
                    got = await queue.read(free, block=self.section.poll_interval)
                self.queue_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._queue_failed(e)
                await self._nap(self.section.poll_interval)
                continue
            for delivery in got:
                if delivery.entry in self._deliveries:
                    continue
                self.claimed["item"] += 1
                self.in_flight += 1
                self._deliveries[delivery.entry] = delivery
                self._items.spawn(
                    self._run_delivery(queue, delivery),
                    name=f"brownout-job-{delivery.job_id}-{delivery.index}",
                )

    async def _heartbeat(self) -> None:
        """Tell the stream the entries running here are still running (their idle time starts over)."""
        if self.queue is None:
            return
        try:
            await self.queue.heartbeat(list(self._deliveries))
        except Exception as e:  # a missed heartbeat: the lease still has two thirds to go
            self._queue_failed(e)

    async def _run_delivery(self, queue: RedisItemQueue, delivery: Delivery) -> None:
        """Run one item taken from the stream, store its outcome, end its job if it was the last one,
        and acknowledge the entry (a crash before that: another replica takes it after the lease)."""
        job_id = delivery.job_id
        try:
            job = await self.store.get(job_id)
            item = await self.store.item(job_id, delivery.index)
            if job is not None and item is not None and job.state in ACTIVE_STATES:
                handler = self.handlers.get(job.type)
                attempts = item.attempts
                outcome: ItemOutcome | None
                if item.state not in ("pending", "running"):
                    outcome = None  # done before (a second delivery): nothing to do
                elif handler is None:
                    outcome = ItemOutcome(error=f"unknown job type {job.type!r}")
                elif attempts >= self.section.max_attempts:
                    # Every worker that ran it stopped in the middle: do not let it stop the next one.
                    outcome = ItemOutcome(
                        error=f"gave up after {attempts} attempts: the workers running it stopped"
                    )
                else:
                    run = self._runs.get(job_id)
                    outcome, attempts = await self._attempts(
                        job_id, handler, item, lambda: None if run is None else run.stopped
                    )
                if outcome is not None:
                    await self._finish_shared(job, item, outcome, attempts)
            try:
                await queue.ack([delivery.entry])
            except Exception as e:  # the entry stays pending: whoever takes it finds the item done
                self._queue_failed(e)
        finally:
            self._deliveries.pop(delivery.entry, None)
            self.in_flight -= 1
            self._wake()

    async def _finish_shared(self, job: JobRow, item: ItemRow, outcome: ItemOutcome, attempts: int) -> None:
        """Store a stream item's outcome; say the progress; end the job when it was its last item."""
        if not await self.store.finish_item(job.id, item.index, outcome, attempts=attempts):
            return  # written before (it counts once)
        self.outcomes["failed" if not outcome.ok else "mock" if outcome.mock else "succeeded"] += 1
        now = await self.store.get(job.id)
        if now is None:
            return
        self._publish(now, None, state="running" if now.state in ACTIVE_STATES else None)
        if now.finished < now.total or now.state != "running":
            return
        ended = await self.store.complete(job.id)
        if ended is not None:
            self._ended(ended)

    async def _finish(self, run: _Run, item: ItemRow, outcome: ItemOutcome, attempts: int) -> None:
        if not await self.store.finish_item(run.job.id, item.index, outcome, attempts=attempts):
            return  # written before (it counts once)
        if outcome.ok:
            run.done += 1
            run.mock += outcome.mock
            self.outcomes["mock" if outcome.mock else "succeeded"] += 1
        else:
            run.failed += 1
            self.outcomes["failed"] += 1
        self._publish(run.job, run, state="running" if run.stopped is None else None)

    # ------------------------------------------------------------------ telling

    def _publish(self, job: JobRow, run: _Run | None, *, state: str | None = None) -> None:
        """A ``job`` message on the live channel: the job's state and progress."""
        if self.publish is None:
            return
        done, failed, mock = (
            (run.done, run.failed, run.mock) if run is not None else (job.done, job.failed, job.mock)
        )
        state = state or job.state
        data = {
            "job": {
                "id": job.id,
                "type": job.type,
                "state": state,
                "reason": job.reason,
                "progress": {"done": done, "failed": failed, "total": job.total, "mock": mock},
            }
        }
        try:
            # Progress is not kept for late joiners (a 1,000-item job would push every other event out
            # of the history); a job's end is.
            self.publish("job", data, state in FINAL_STATES)
        except Exception as e:  # the live channel must never stop a job
            _log.warning("could not publish job progress: %s", e)

    def _ended(self, job: JobRow) -> None:
        """A job ended: say so on the live channel, and to its webhook."""
        self._publish(job, None)
        if self.queue is not None:
            self._side.spawn(self._forget(self.queue, job.id), name=f"brownout-job-forget-{job.id}")
        if job.webhook and self.section.webhooks:
            self._side.spawn(self._notify(job.webhook, job), name=f"brownout-job-webhook-{job.id}")

    async def _notify(self, url: str, job: JobRow) -> None:
        """POST the job's end to its webhook, retried on a connection error, a timeout or 5xx/408/429."""
        body = {
            "id": job.id,
            "type": job.type,
            "state": job.state,
            "reason": job.reason,
            "progress": {"done": job.done, "failed": job.failed, "total": job.total, "mock": job.mock},
        }
        retry = Retry(
            "jobs-webhook",
            RetryConfig(
                max_attempts=self.section.webhook_retries + 1,
                backoff_base=1.0,
                jitter="none",
                retry_on=(httpx.TransportError, _WebhookRefused),
                budget_ratio=None,
            ),
            clock=self.clock,
            events=EventBus(),
        )

        async def post() -> None:
            async with httpx.AsyncClient(timeout=self.section.webhook_timeout) as http:
                response = await http.post(url, json=body)
            if response.status_code >= 500 or response.status_code in (408, 429):
                raise _WebhookRefused(response.status_code)

        try:
            await retry.call(post)
        except (httpx.HTTPError, _WebhookRefused) as e:
            _log.warning("job %s: webhook not delivered: %s", job.id, type(e).__name__)

    # ------------------------------------------------------------------ waiting

    async def _nap(self, seconds: float) -> None:
        """Wait ``seconds`` of clock time, or less: until an item ends or a job stops."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._nappers.add(future)

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        handle = self.clock.call_later(seconds, wake)
        try:
            await future
        finally:
            handle.cancel()
            self._nappers.discard(future)

    def _wake(self) -> None:
        for future in list(self._nappers):
            if not future.done():
                future.set_result(None)

    async def _forget(self, queue: RedisItemQueue, job_id: str) -> None:
        try:
            await queue.forget(job_id)
        except Exception as e:  # a marker left behind costs a few bytes, nothing else
            self._queue_failed(e)


class _WebhookRefused(Exception):
    """A webhook receiver answered 5xx, 408 or 429 (worth another try)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")


class JobsCollector(Collector):
    """The workers' figures as Prometheus metrics, read at scrape time."""

    def __init__(self, workers: JobWorkers) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        """``brownout_jobs`` by state, ``brownout_job_items_total`` by outcome, retries, queue age."""
        w = self.workers
        jobs = GaugeMetricFamily(
            "brownout_jobs", "Jobs by state (as of the workers' last round)", labels=["state"]
        )
        for state in JOB_STATES:
            jobs.add_metric([state], w.counts.get(state, 0))
        yield jobs
        items = CounterMetricFamily(
            "brownout_job_items",
            "Job items finished by this process, by outcome (succeeded: a model's answer; mock: rule-based)",
            labels=["outcome"],
        )
        for outcome in ("succeeded", "mock", "failed"):
            items.add_metric([outcome], w.outcomes.get(outcome, 0))
        yield items
        yield CounterMetricFamily(
            "brownout_job_item_retries",
            "Job item attempts tried again after a transient failure",
            value=w.retries,
        )
        age = 0.0 if w.oldest_queued is None else max(0.0, w.wall_clock.now() - w.oldest_queued)
        yield GaugeMetricFamily("brownout_jobs_queue_age_seconds", "Age of the oldest queued job", value=age)
        yield GaugeMetricFamily("brownout_job_items_in_flight", "Job items running now", value=w.in_flight)
        claims = CounterMetricFamily(
            "brownout_jobs_claims",
            "Work this process took: job (a database lease on a job), item (an entry of the shared stream)",
            labels=["what"],
        )
        reclaims = CounterMetricFamily(
            "brownout_jobs_reclaims",
            "Work this process took over from a worker that stopped: a job whose lease ran out, an item "
            "idle past the lease in the shared stream",
            labels=["what"],
        )
        for what in ("job", "item"):
            claims.add_metric([what], w.claimed.get(what, 0))
            reclaims.add_metric([what], w.reclaimed.get(what, 0))
        yield claims
        yield reclaims
        stalled = 0.0 if w.stalest is None else max(0.0, w.wall_clock.now() - w.stalest)
        yield GaugeMetricFamily(
            "brownout_jobs_stalled_seconds",
            "Seconds since the running job that moved least recently last made progress (0: none runs)",
            value=stalled,
        )
        yield GaugeMetricFamily(
            "brownout_jobs_shared",
            "1 while job items go through the Redis stream the replicas share (0: run here alone)",
            value=1.0 if w.shared else 0.0,
        )
        yield GaugeMetricFamily(
            "brownout_jobs_waiting",
            "1 while job items wait for interactive traffic or for memory (interactive first)",
            value=1.0 if w.waiting is not None else 0.0,
        )
