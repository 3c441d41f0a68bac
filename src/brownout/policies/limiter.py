"""An adaptive concurrency limiter: as many calls in flight to a server as it can run, the rest wait here.

A model server that is handed more requests than it has slots queues them inside itself, where a
caller cannot see the wait, cannot leave the queue in order, and blames the wait on the model (a
timeout counts against its breaker). The limiter keeps that queue on our side instead: at most
``limit`` calls are in flight, further callers wait in a first-in, first-out queue, each for at most
its own deadline (or ``max_wait``), and one whose time runs out leaves with
:class:`~brownout.errors.Overloaded` -- *busy*, not *failed*: nothing was sent, so nothing counts
against the server.

Callers of different importance can share one server through one limiter: each call may give a
``priority`` (lower first, default 0). A freed permit goes to the oldest waiter of the lowest priority
number waiting; within a priority the queue is first-in, first-out. A waiter of a higher number waits
while more important calls keep the server busy -- up to its own timeout, after which it leaves with
``Overloaded`` like any other -- so the work that matters most gets the server's whole capacity under
load (a model server shared by a brief's generator and its optional stages, say), and
:meth:`AdaptiveLimiter.estimated_wait` for a priority counts only the waiters that come before it.

The limit adapts to the server's measured latency, so it sits at the server's throughput knee -- the
concurrency beyond which more requests in flight only make each one slower.

Algorithm (a Vegas variant for few, slow slots)
-----------------------------------------------

TCP Vegas, and Netflix's concurrency-limits ``VegasLimit`` after it, estimate how many requests are
*queued inside the server* from the latency: with a no-load latency ``base`` and a measured latency
``rtt`` at limit ``L``, the server is running ``L * base / rtt`` requests at full speed and the other
``queued = L * (1 - base / rtt)`` are waiting. The limit grows while that estimate is below ``alpha``
and shrinks once it is above ``beta``:

* samples are grouped into *rounds* of ``limit`` completed calls (about one service time of a full
  server); ``rtt`` is the mean latency of a round, so one short or long answer does not move the limit;
* ``base`` is the lowest round mean seen, re-learned from the current round every ``baseline_rounds``
  rounds, so a model that got slower for good (longer prompts) does not look queued for ever (not
  while the limit sits at ``max_limit``: there a fresh baseline could change nothing);
* ``queued < alpha`` (default 0.5) and the round was *saturated* (every permit was in use at some
  point): ``limit + 1``. A round that never used its whole limit teaches nothing about more (the
  caller was the bottleneck), so the limit does not grow on it;
* ``queued > beta`` (default 1.5): ``limit - 1``;
* a *drop* (a call that timed out or that the server refused as overloaded -- the caller says which,
  see :meth:`Permit.release`) shrinks the limit at once to ``limit * drop_ratio`` (at least by one);
* the limit stays within ``min_limit .. max_limit``, and never drops below the calls already in
  flight -- it shrinks further as they finish -- so ``in_flight <= limit`` always holds.

Why Vegas rather than Gradient2: a language model answers in seconds, so a server yields few samples a
minute, and Gradient2's long-term latency average (hundreds of samples) would take many minutes to mean
anything and drifts with the load it is meant to judge. Vegas needs only a no-load baseline and one
round of samples, and its dead band (``alpha .. beta``, one queued request wide) suits servers with a
handful of slots, where one request queued in the server costs a whole service time. With the knee at
``k`` slots the limit settles at ``k`` or ``k + 1``: at ``k`` nothing queues (it probes one higher), at
``k + 1`` one request queues (inside the dead band), at ``k + 2`` two do (it backs off). For a local
llama.cpp server the caller sets ``max_limit`` to its slot count, so nothing ever queues inside it.

Within a server's slots (``slots``: a server known to run that many calls at once, each in its own
slot, none queued) a longer latency is not a queue: the calls share the server's compute, each
token of each call is slower, and the server does more work a second all the same -- a 2-thread
llama.cpp server with four slots wrote 118 tokens/s against 105 with two, each call's tokens at
two fifths of the speed of a lone call's. Vegas reads that slowdown as requests queued and held such a
server at three calls of four. So up to ``slots`` the limit follows the work done a second
(``limit / latency`` over a round, latency per unit of work when calls say their size): it grows
on a saturated round, and shrinks by one once a round's work a second falls more than
``slots_tolerance`` below that of the limit one lower (sharing then costs more than it gives). A
limit whose last round at one higher did that does not grow back to it for ``baseline_rounds``
rounds, so it does not flap (no no-load latency is measured within the slots: it is not used).
Above ``slots``, and without ``slots``, Vegas as above.

A latency ceiling (``latency_budget``): the most work a second is not always what callers need. On a
slow machine a 2-thread llama.cpp server did the most work with four calls at once, but each call then
took 8 s at the median and 15 s at the 95th percentile, and half of them were cut at their requests'
10 s target; one or two calls at once made as many whole answers, almost none cut. On the same
machine another hour, four calls at once made the most whole answers even with a third of them cut.
So when callers say how long a call may hold its permit and still be in time, the limiter steers by
*goodput* -- the work done a second by the calls that were in time -- wherever calls run late: a
call is late when it held its permit ``latency_budget`` seconds or more, whether it then finished
or was cut there. Over each window of ``late_window`` calls granted at the current limit (closed
sooner once twice as many of them ran late as ``late_share`` of a whole window, and at least
``limit`` calls came back: where nearly every call runs late the verdict is clear after a few) it
measures the goodput at that limit (the work a second times the share of calls in time, a late call
counted as ``late_value`` of one -- nothing by default, half for a brief cut short at its target;
the calls a second when calls do not say their size) and keeps it for ``late_memory`` windows (a window at a
limit whose goodput is still known counts a third: a window is a few dozen seconds of calls, and one
with a few long answers more runs late by chance):

* more than ``late_share`` of the window's calls late: a *ceiling* comes down to one below the
  limit, and the limit with it -- unless the goodput one lower is known and not higher by more than
  ``slots_tolerance`` (fewer calls at once would lose more work than the late calls do). Where no
  goodput one lower is known, the work a second measured there within the slots stands in for it
  (the most it could be, had none of its calls run late): a window there costs a few dozen seconds
  of the server run below what it can do, so the limit goes to look only where it could gain. The
  limit cannot grow above the ceiling whatever the work rate or the queue estimate say;
* with the limit at the ceiling: the ceiling and the limit rise by one unless the goodput one higher
  is known and lower by more than ``slots_tolerance``. Where two limits make about as many answers
  in time, the higher one wins: its late calls are answers too (a brief cut short at its target,
  say), which the lower limit would not have made at all. A goodput measured more than
  ``late_memory`` windows ago is no longer known: conditions change, and a window there finds out.

So the limit climbs to the concurrency that makes the most answers in time, and it looks again
now and then. Without ``latency_budget`` there is no ceiling but ``max_limit``.

Latency is the time a permit is held (from the grant to :meth:`Permit.release`); the wait in our own
queue is never part of it. A call of a known size -- a language model's answer, whose length varies
five-fold from one prompt to the next -- can say how much work it was (``release(work=...)``, the
tokens written): its latency sample is then the time *per unit of work*, the server's speed, which
is what load changes; a whole call's time is mostly the answer's length, and a round of one or two
of them moved the limit on nothing but that (a short answer learned as the no-load latency made
every longer one look queued). The first sample with a size switches the limiter to per-unit
samples for good (learning the baseline again); samples without one are then left out.

A service-time average (an exponentially weighted moving average of every permit's whole hold time,
``ewma_alpha``) gives :meth:`AdaptiveLimiter.estimated_wait`, the expected
wait of a newcomer -- what admission control and the dimmer need to decide, before anything waits,
whether a call can start in time -- and the ``retry_after`` of an ``Overloaded``.

::

    limiter = AdaptiveLimiter("generator", LimiterConfig(max_limit=4))

    result = await limiter.call(generate, prompt)       # engine
    async with limiter:                                  # block form
        ...
    permit = await limiter.acquire(timeout=2.0)          # explicit permit: say how the call went
    try:
        ...
    finally:
        permit.release(dropped=timed_out)

Events: :class:`LimitChanged` when the limit moves, :class:`~brownout.events.CallRejected`
(``kind="limiter"``) when a caller is turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pydantic import Field, model_validator

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import Overloaded
from brownout.events import DEFAULT_BUS, CallRejected, Event, EventBus
from brownout.policies._base import CallForms, EnteredGuards, PolicyConfig

__all__ = ["AdaptiveLimiter", "LimitChanged", "LimiterConfig", "LimiterStats", "Permit"]

_QUEUE_FULL = "queue_full"
_QUEUE_TIMEOUT = "queue_timeout"
_DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class LimitChanged(Event):
    """An adaptive limiter moved its concurrency limit from ``old`` to ``new`` because of ``reason``."""

    old: int
    new: int
    reason: str


class LimiterConfig(PolicyConfig):
    """Settings of an :class:`AdaptiveLimiter` (see the module docstring for the algorithm)."""

    min_limit: int = Field(default=1, ge=1, description="The limit never goes below this many calls.")
    max_limit: int = Field(
        default=16,
        ge=1,
        description="The limit never goes above this (a local model server's slot count).",
    )
    initial_limit: int = Field(
        default=4, ge=1, description="The limit to start from (clamped to min_limit..max_limit)."
    )
    max_queue: int = Field(default=1000, ge=0, description="Callers allowed to wait; 0 means never wait.")
    max_wait: float = Field(
        default=60.0, gt=0, description="Longest a caller without its own timeout waits, in seconds."
    )
    alpha: float = Field(
        default=0.5, ge=0, description="Grow the limit while fewer requests than this queue in the server."
    )
    beta: float = Field(
        default=1.5, gt=0, description="Shrink the limit once more requests than this queue in the server."
    )
    baseline_rounds: int = Field(
        default=20, ge=1, description="Rounds after which the no-load latency is learned afresh."
    )
    drop_ratio: float = Field(
        default=0.9, gt=0, lt=1, description="Factor applied to the limit on a dropped call."
    )
    ewma_alpha: float = Field(
        default=0.2, gt=0, le=1, description="Weight of the newest call in the service-time average."
    )
    default_service_time: float = Field(
        default=1.0, gt=0, description="Service time assumed until one has been measured, in seconds."
    )
    min_retry_after: float = Field(default=0.1, ge=0, description="Lower bound of a retry_after.")
    max_retry_after: float = Field(default=300.0, ge=0, description="Upper bound of a retry_after.")
    slots: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Calls the server runs at once without queueing any (a local model server's slots): up to "
            "this many, the limit follows the work done a second, not the latency; none: unknown"
        ),
    )
    slots_tolerance: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description=(
            "Within the slots, shrink once a round's work a second falls this far below the limit one lower."
        ),
    )

    latency_budget: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Seconds a call may hold its permit and still be in time for its caller; while more than "
            "late_share of a window of calls take this long or longer, the limit steers by the work "
            "done a second by the calls in time (module docstring); none: no latency ceiling"
        ),
    )
    late_share: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of late calls in a window beyond which the limit comes down.",
    )
    late_window: int = Field(
        default=20, ge=2, description="Calls granted at one limit over which the late share is judged."
    )
    late_value: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "What a late call is worth beside one in time, in the goodput the latency ceiling steers "
            "by: 0, missed; more where a late call still served something (an answer cut short)."
        ),
    )
    late_memory: int = Field(
        default=10,
        ge=1,
        description="Windows for which the goodput measured at a limit is trusted, then measured again.",
    )

    def capped(self, top: int) -> LimiterConfig:
        """These settings under a hard ceiling of ``top`` calls (a server's slots): ``max_limit``
        at most ``top``, ``min_limit`` and ``initial_limit`` brought down to it where above."""
        top = min(top, self.max_limit)
        return self.model_copy(
            update={
                "max_limit": top,
                "min_limit": min(self.min_limit, top),
                "initial_limit": min(self.initial_limit, top),
            }
        )

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        if self.min_limit > self.max_limit:
            raise ValueError(f"min_limit ({self.min_limit}) must not exceed max_limit ({self.max_limit})")
        if self.alpha >= self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")
        if self.min_retry_after > self.max_retry_after:
            raise ValueError(
                f"min_retry_after ({self.min_retry_after}) must not exceed "
                f"max_retry_after ({self.max_retry_after})"
            )
        return self


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot of an :class:`AdaptiveLimiter`'s counters since it was built.

    ``granted`` counts permits handed out, ``queued`` callers that had to wait (whatever became of
    them), ``rejected`` callers turned away by reason, ``dropped`` permits released as drops.
    ``service_time`` is the average time a permit is held; ``baseline`` the no-load latency the limit
    is judged against -- seconds per unit of work when ``per_work`` (calls said their size), else
    seconds per call. ``ceiling`` is the latency ceiling the limit may not grow above (None while
    no window ran late, or without ``latency_budget``); ``late`` counts the calls that held their
    permit ``latency_budget`` seconds or more.
    """

    limit: int
    in_flight: int
    queue_size: int
    granted: int
    queued: int
    rejected: dict[str, int]
    dropped: int
    service_time: float | None
    baseline: float | None
    per_work: bool = False
    ceiling: int | None = None
    late: int = 0


class Permit:
    """The right to have one call in flight; give it back with :meth:`release` exactly once."""

    __slots__ = ("_epoch", "_limiter", "_released", "granted_at", "waited")

    def __init__(self, limiter: AdaptiveLimiter, granted_at: float, waited: float, epoch: int) -> None:
        self._limiter = limiter
        self._epoch = epoch
        self._released = False
        self.granted_at = granted_at
        """Clock time of the grant: the call's latency is measured from here."""
        self.waited = waited
        """Seconds the caller waited in the limiter's queue before the grant (0 when a permit was free)."""

    @property
    def released(self) -> bool:
        """True once the permit was given back."""
        return self._released

    def release(self, *, dropped: bool = False, sample: bool = True, work: float | None = None) -> None:
        """Give the permit back (to the oldest waiter, if any).

        ``dropped``: the call timed out or the server said it was overloaded -- the limit shrinks.
        ``sample=False``: the call's latency says nothing about the server's load (it failed at once,
        or it was a tiny probe), so it is left out of the latency rounds. ``work``: how much work the
        call was (tokens written, say; positive), so that its sample is the time per unit of work
        (module docstring). Releasing twice does nothing.
        """
        if self._released:
            return
        self._released = True
        self._limiter._release(self, dropped=dropped, sample=sample, work=work)


_entered: EnteredGuards[Permit] = EnteredGuards("brownout_limiter_permit")


class AdaptiveLimiter(CallForms):
    """Limits the calls in flight to one server to an adaptive ``limit``; see the module docstring.

    Waiters are served strictly in arrival order: a freed permit goes to the oldest waiter, so a
    newcomer can never barge ahead of the queue.
    """

    __slots__ = (
        "_baseline",
        "_ceiling",
        "_clock",
        "_dropped",
        "_epoch",
        "_events",
        "_goodput_at",
        "_granted",
        "_in_flight",
        "_lanes",
        "_late",
        "_late_holds",
        "_late_n",
        "_late_work",
        "_limit",
        "_per_work",
        "_probe_from",
        "_queued",
        "_rate_at",
        "_rejected",
        "_round_n",
        "_round_peak",
        "_round_sum",
        "_rounds",
        "_service",
        "_window_start",
        "_windows",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "limiter",
        config: LimiterConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.name = name
        self.config = config if config is not None else LimiterConfig()
        cfg = self.config
        self._clock = clock
        self._events = events
        self._limit = min(max(cfg.initial_limit, cfg.min_limit), cfg.max_limit)
        self._in_flight = 0
        # Each waiter is a future resolved with the limit epoch its permit was granted in, or None
        # (its time ran out), queued in the lane of its priority (lower first).
        # Invariant: waiters exist only while every permit is taken.
        self._lanes: dict[int, deque[asyncio.Future[int | None]]] = {}
        self._service: float | None = None
        self._baseline: float | None = None
        self._round_sum = 0.0
        self._round_n = 0
        self._round_peak = 0
        self._rounds = 0
        self._epoch = 0
        self._probe_from: int | None = None
        self._per_work = False
        # Within the slots: the work a second of the last round at each limit.
        self._rate_at: dict[int, float] = {}
        # The latency ceiling (module docstring): the hold times (and times per unit of work) of the
        # calls granted at the current limit in this window, how many of them were late, and when
        # the window began.
        self._ceiling: int | None = None
        self._late_holds: list[float] = []
        self._late_work: list[float] = []
        self._late_n = 0
        self._window_start = clock.now()
        self._windows = 0
        # The goodput measured at each limit, and the window it was measured in.
        self._goodput_at: dict[int, tuple[float, int]] = {}
        self._late = 0
        self._granted = 0
        self._queued = 0
        self._dropped = 0
        self._rejected: dict[str, int] = {_QUEUE_FULL: 0, _QUEUE_TIMEOUT: 0, _DEADLINE: 0}

    # -- read-only state ------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The calls allowed in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Calls holding a permit now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a permit now (of every priority)."""
        return sum(len(lane) for lane in self._lanes.values())

    def queued_before(self, priority: int = 0) -> int:
        """Callers waiting now that a newcomer of ``priority`` would queue behind (that priority's
        and the lower numbers')."""
        return sum(len(lane) for p, lane in self._lanes.items() if p <= priority)

    @property
    def ceiling(self) -> int | None:
        """The latency ceiling the limit may not grow above now (None: only ``max_limit``)."""
        return self._ceiling

    @property
    def free(self) -> int:
        """Permits a newcomer could take at once (0 when it would have to wait)."""
        return 0 if self._lanes else max(0, self._limit - self._in_flight)

    @property
    def service_time(self) -> float | None:
        """The service-time average in seconds (None before the first call finished)."""
        return self._service

    @property
    def stats(self) -> LimiterStats:
        """Counters since construction (a snapshot)."""
        return LimiterStats(
            limit=self._limit,
            in_flight=self._in_flight,
            queue_size=self.queued,
            granted=self._granted,
            queued=self._queued,
            rejected=dict(self._rejected),
            dropped=self._dropped,
            service_time=self._service,
            baseline=self._baseline,
            per_work=self._per_work,
            ceiling=self._ceiling,
            late=self._late,
        )

    def estimated_wait(self, ahead: int = 0, *, priority: int = 0) -> float:
        """Seconds a caller of ``priority`` arriving now would expect to wait for a permit (0 when one
        is free).

        With every permit taken, permits come free about ``limit`` per service time, and the newcomer
        needs the ones owed to everybody queued ahead of it plus its own:
        ``(queued + ahead + 1 - free) * service_time / limit``, where ``queued`` counts the waiters of
        its priority and the lower numbers (:meth:`queued_before`) and ``ahead`` the callers the
        limiter cannot see yet that will come before this one (e.g. waiting in an admission queue in
        front of it). Before any call finished, the service time is ``default_service_time``. Callers
        of a more important priority that arrive later will pass it too: for a lower-priority caller
        this is a lower bound.
        """
        ahead = self.queued_before(priority) + ahead + 1 - max(0, self._limit - self._in_flight)
        if ahead <= 0:
            return 0.0
        service = self._service if self._service is not None else self.config.default_service_time
        return ahead * service / self._limit

    def retry_after(self, priority: int = 0) -> float:
        """The ``retry_after`` a rejected caller of ``priority`` would get now: its estimated wait,
        within bounds."""
        cfg = self.config
        return min(max(self.estimated_wait(priority=priority), cfg.min_retry_after), cfg.max_retry_after)

    # -- permits --------------------------------------------------------------------------------

    async def acquire(
        self, timeout: float | None = None, *, shed_late: bool = False, priority: int = 0
    ) -> Permit:
        """Wait for a permit, for at most ``timeout`` seconds (default ``max_wait``), in the queue of
        ``priority`` (lower numbers are served first; see the module docstring).

        Raises :class:`~brownout.errors.Overloaded` (``reason`` ``"queue_full"`` or
        ``"queue_timeout"``) when the caller cannot have one in time; a caller cancelled while
        waiting leaves the queue and takes nothing. With ``shed_late``, a caller that would have to
        wait is refused at once (reason ``"deadline"``) when :meth:`estimated_wait` already exceeds
        its ``timeout`` (once a service time has been measured): waiting only to time out would hold
        it for nothing.
        """
        clock = self._clock
        asked = clock.now()
        if not self._lanes and self._in_flight < self._limit:
            return self._grant(asked, asked)
        wait = self.config.max_wait if timeout is None else min(timeout, self.config.max_wait)
        if wait <= 0:
            raise self._reject(_QUEUE_TIMEOUT, asked, priority)
        # Before any call finished there is no service time to estimate from: nobody is refused.
        if (
            shed_late
            and timeout is not None
            and self._service is not None
            and self.estimated_wait(priority=priority) > timeout
        ):
            raise self._reject(_DEADLINE, asked, priority)
        if self.queued >= self.config.max_queue:
            raise self._reject(_QUEUE_FULL, asked, priority)
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        lane = self._lanes.get(priority)
        if lane is None:
            # Lanes are kept in priority order, so that granting walks them most important first.
            lane = deque()
            self._lanes[priority] = lane
            if len(self._lanes) > 1:
                self._lanes = dict(sorted(self._lanes.items()))
        lane.append(future)
        self._queued += 1
        timer = clock.call_later(wait, functools.partial(self._expire, future, priority))
        try:
            granted = await future
        except BaseException:
            # Cancelled while queued, or right after being handed a permit (the future has its result
            # but this task never resumed to use it): give that permit on.
            timer.cancel()
            if future.done() and not future.cancelled():
                if future.result() is not None:
                    self._in_flight -= 1
                    self._granted -= 1
                    self._grant_waiters()
            else:
                self._leave(future, priority)
            raise
        timer.cancel()
        if granted is None:
            raise self._reject(_QUEUE_TIMEOUT, clock.now(), priority)
        now = clock.now()
        return Permit(self, now, now - asked, granted)

    def try_acquire(self) -> Permit | None:
        """A permit if one is free now and nobody waits, else None (never waits)."""
        if not self._lanes and self._in_flight < self._limit:
            now = self._clock.now()
            return self._grant(now, now)
        return None

    def _grant(self, now: float, asked: float) -> Permit:
        self._in_flight += 1
        self._granted += 1
        if self._in_flight > self._round_peak:
            self._round_peak = self._in_flight
        return Permit(self, now, now - asked, self._epoch)

    def _expire(self, future: asyncio.Future[int | None], priority: int) -> None:
        """Timer callback: the waiter's time ran out before a permit came free."""
        if not future.done():
            self._leave(future, priority)
            future.set_result(None)

    def _leave(self, future: asyncio.Future[int | None], priority: int) -> None:
        """Take a waiter out of its lane (an emptied lane goes, so that no lanes means no waiters)."""
        lane = self._lanes.get(priority)
        if lane is None:
            return
        with contextlib.suppress(ValueError):
            lane.remove(future)
        if not lane:
            del self._lanes[priority]

    def _grant_waiters(self) -> None:
        """Hand free permits to the oldest live waiters, most important lane first."""
        lanes = self._lanes
        while lanes and self._in_flight < self._limit:
            priority, lane = next(iter(lanes.items()))
            future = lane.popleft()
            if not lane:
                del lanes[priority]
            if future.done():  # cancelled but not yet resumed
                continue
            self._in_flight += 1
            self._granted += 1
            if self._in_flight > self._round_peak:
                self._round_peak = self._in_flight
            future.set_result(self._epoch)

    def _release(self, permit: Permit, *, dropped: bool, sample: bool, work: float | None = None) -> None:
        elapsed = max(0.0, self._clock.now() - permit.granted_at)
        service = self._service
        alpha = self.config.ewma_alpha
        self._service = elapsed if service is None else service + alpha * (elapsed - service)
        self._in_flight -= 1
        if dropped:
            self._dropped += 1
            self._shrink(max(1, math.floor(self._limit * (1.0 - self.config.drop_ratio))), "drop")
        elif sample and permit._epoch == self._epoch:
            # Only calls granted under the current limit say how the server runs at that limit.
            if self.config.latency_budget is not None and self._judge_lateness(elapsed, work):
                pass  # the limit moved: this call was granted at another, and its round is over
            elif work is not None and work > 0:
                if not self._per_work:
                    # Seconds per unit of work from now on: what was learned per call does not compare.
                    self._per_work = True
                    self._baseline = None
                    self._round_sum = 0.0
                    self._round_n = 0
                self._sample(elapsed / work)
            elif not self._per_work:
                self._sample(elapsed)
        if self._probe_from is not None and self._limit > self.config.min_limit:
            self._shrink(self._limit, "measuring the no-load latency")
        self._grant_waiters()

    # -- the algorithm --------------------------------------------------------------------------

    def _top(self) -> int:
        """The highest the limit may grow to now: ``max_limit``, or the latency ceiling below it."""
        top = self.config.max_limit
        return top if self._ceiling is None else min(top, self._ceiling)

    def _judge_lateness(self, held: float, work: float | None) -> bool:
        """Count a call that held its permit ``held`` seconds (``work`` its size, when it said) towards
        the window of the latency ceiling (module docstring); True when the limit moved."""
        cfg = self.config
        budget = cfg.latency_budget
        if budget is None:
            return False
        if held >= budget:
            self._late += 1
            self._late_n += 1
        holds = self._late_holds
        holds.append(held)
        if work is not None and work > 0:
            self._late_work.append(held / work)
        limit = self._limit
        # A window closes after late_window calls -- or as soon as twice as many of them ran late as
        # the whole window may, once every slot's call is in: where nearly every call runs late,
        # twenty of them take minutes, and the verdict is clear after a few.
        condemned = self._late_n > 2 * cfg.late_share * cfg.late_window and len(holds) >= limit
        if len(holds) < max(cfg.late_window, limit) and not condemned:
            return False
        n, late = len(holds), self._late_n
        per_work = self._late_work
        now = self._clock.now()
        if len(per_work) == n:
            # Work a second: the limit's calls at once, each at its mean time per unit of work.
            rate = limit * n / sum(per_work) if sum(per_work) > 0 else 0.0
        else:
            rate = n / max(now - self._window_start, 1e-9)
        goodput = rate * (n - late + cfg.late_value * late) / n
        self._window_start = now
        holds.clear()
        per_work.clear()
        self._late_n = 0
        self._windows += 1
        known = self._known_goodput(limit)
        if known is not None:
            # One window with a few long answers more runs late by chance: the newest window counts
            # a third, so that one such window does not move the limit.
            goodput = known + (goodput - known) / 3
        self._goodput_at[limit] = (goodput, self._windows)
        # Differences smaller than this are noise: where two limits do about as well, the higher one.
        margin = 1.0 + cfg.slots_tolerance
        if late > cfg.late_share * n and limit > cfg.min_limit:
            below = self._known_goodput(limit - 1)
            if below is None:
                # Not measured there (recently): at most all the work a second measured there, had
                # none of its calls run late -- when that is known, and else worth finding out.
                below = self._rate_at.get(limit - 1, math.inf)
            if below > goodput * margin:
                # Too many calls at this concurrency miss their callers' time, and one fewer at once
                # makes (or may make) more answers in time: a ceiling one below, which the work rate
                # and the queue estimate cannot lift.
                lower = limit - 1
                self._ceiling = lower if self._ceiling is None else min(self._ceiling, lower)
                self._shrink(1, f"{late} of {n} calls held their permit {budget:.3g}s or more")
                return self._limit != limit
        top = self._ceiling
        if top is not None and limit >= top:
            above = self._known_goodput(top + 1)
            if above is None or (above > 0 and above * margin >= goodput):
                # One more at once made about as many answers in time or more -- and more answers
                # in all, cut ones included -- or it is a while since that was seen: go there now.
                # (Left to the work rate, a limit that came down through the levels below could take
                # many rounds to climb back, each level's last round remembered.)
                self._ceiling = None if top + 1 >= cfg.max_limit else top + 1
                if limit < cfg.max_limit:
                    self._set(limit + 1, "one more call at once did as much in time, or was not seen lately")
                    return True
        return False

    def _known_goodput(self, limit: int) -> float | None:
        """The goodput measured at ``limit`` within the last ``late_memory`` windows, else None."""
        seen = self._goodput_at.get(limit)
        if seen is None or self._windows - seen[1] > self.config.late_memory:
            return None
        return seen[0]

    def _sample(self, rtt: float) -> None:
        self._round_sum += rtt
        self._round_n += 1
        limit = self._limit
        if self._round_n < limit:
            return
        cfg = self.config
        mean = self._round_sum / self._round_n
        saturated = self._round_peak >= limit
        self._round_sum = 0.0
        self._round_n = 0
        self._round_peak = self._in_flight
        self._rounds += 1
        if limit == cfg.min_limit:
            # As few calls in flight as allowed: this round *is* the no-load latency.
            self._baseline = mean
            if self._probe_from is not None:
                restore, self._probe_from = self._probe_from, None
                unit = "s per unit of work" if self._per_work else "s"
                self._set(min(restore, self._top()), f"no-load latency measured: {mean:.3g}{unit}")
                return
        base = self._baseline
        if base is None or mean < base:
            base = self._baseline = mean
        if cfg.slots is not None and limit <= cfg.slots and mean > 0:
            self._by_work_rate(limit, limit / mean, saturated)
        else:
            self._by_queue(limit, base, mean, saturated)
        if self._rounds % cfg.baseline_rounds == 0 and cfg.min_limit < self._limit < self._top():
            # The lowest latency seen may be stale (the model got slower for good, or it was learned
            # while the server already queued): measure it again with min_limit calls in flight.
            # Not at max_limit (or the latency ceiling): there a fresh baseline could only allow
            # growth the ceiling forbids
            # (had the latency said "queued", the limit would be below it now), and each measurement
            # runs the server below its slots for a round -- a few per cent of a model server's
            # answers, every time.
            if cfg.slots is not None and self._limit <= cfg.slots:
                # Within the slots the no-load latency is not used: forget the rates measured, so that
                # a limit held below the slots tries one more again.
                self._rate_at.clear()
            else:
                self._probe_from = self._limit
                self._shrink(self._limit, "measuring the no-load latency")

    def _by_work_rate(self, limit: int, rate: float, saturated: bool) -> None:
        """Within the slots (module docstring): follow the work done a second."""
        cfg = self.config
        self._rate_at[limit] = rate
        lower = self._rate_at.get(limit - 1)
        if lower is not None and rate < lower * (1.0 - cfg.slots_tolerance):
            self._shrink(1, f"work a second {rate:.3g} at {limit} calls, {lower:.3g} at {limit - 1}")
            return
        higher = self._rate_at.get(limit + 1)
        if (
            saturated
            and limit < self._top()
            and (higher is None or higher >= rate * (1.0 - cfg.slots_tolerance))
        ):
            self._set(limit + 1, "within the server's slots, and the work done a second did not fall")

    def _by_queue(self, limit: int, base: float, mean: float, saturated: bool) -> None:
        """Vegas (module docstring): follow the requests the latency says are queued in the server."""
        cfg = self.config
        queued = limit * (1.0 - base / mean) if mean > 0 else 0.0
        if queued > cfg.beta:
            # Straight to about the calls the server runs at full speed, at least one lower.
            target = min(limit - 1, math.ceil(limit * base / mean))
            self._shrink(limit - target, f"latency: about {queued:.2g} requests queued in the server")
        elif queued < cfg.alpha and saturated and limit < self._top():
            self._set(limit + 1, "latency at its no-load level with every permit in use")

    def _shrink(self, by: int, reason: str) -> None:
        # Never below the calls in flight: those already hold their permits, and in_flight <= limit
        # must hold; the limit shrinks further as they finish.
        target = max(self.config.min_limit, self._limit - by, self._in_flight)
        if target < self._limit:
            self._set(target, reason)

    def _set(self, new: int, reason: str) -> None:
        old = self._limit
        self._limit = new
        # A new limit starts a new round: calls granted before were taken at another concurrency.
        self._epoch += 1
        self._round_sum = 0.0
        self._round_n = 0
        self._round_peak = self._in_flight
        self._late_holds.clear()
        self._late_work.clear()
        self._late_n = 0
        self._window_start = self._clock.now()
        if self._events.active:
            self._events.emit(LimitChanged(self.name, self._clock.now(), old, new, reason))

    def _reject(self, reason: str, now: float, priority: int = 0) -> Overloaded:
        self._rejected[reason] += 1
        retry_after = self.retry_after(priority)
        if self._events.active:
            self._events.emit(CallRejected(self.name, now, "limiter", reason, retry_after))
        return Overloaded(
            self.name,
            reason,
            retry_after=retry_after,
            queue_size=self.queued,
            in_flight=self._in_flight,
        )

    # -- call forms -----------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` under a permit.

        A ``TimeoutError`` from it is a drop; another exception (or a cancellation) gives the permit
        back without a latency sample.
        """
        permit = await self.acquire()
        try:
            result = await fn(*args, **kwargs)
        except TimeoutError:
            permit.release(dropped=True)
            raise
        except BaseException:
            # A failure or a cancellation says nothing about how fast the server answers.
            permit.release(sample=False)
            raise
        permit.release()
        return result

    async def __aenter__(self) -> Self:
        """Take a permit for the block (waiting up to ``max_wait``)."""
        _entered.push(await self.acquire())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Give the permit back, judged as :meth:`call` judges its outcome."""
        permit = _entered.pop()
        if exc_type is None:
            permit.release()
        elif issubclass(exc_type, TimeoutError):
            permit.release(dropped=True)
        else:
            permit.release(sample=False)

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimiter({self.name!r}, in_flight={self._in_flight}/{self._limit}, queued={self.queued})"
        )
