"""Admission control: a bulkhead with a bounded FIFO queue that sheds load it cannot serve in time.

At most ``max_concurrent`` calls run at once. Further callers wait in a first-in, first-out queue of at
most ``max_queue`` callers, each for at most ``max_wait`` seconds; past that, calls are *shed* with
:class:`~brownout.errors.Overloaded`, whose ``retry_after`` estimates when the backlog will have
drained (by default at most 500 callers wait, and ``retry_after`` is 30 s until a service time has
been seen). The ``trip_queue_depth`` option is a queue-depth breaker: once the queue reaches that depth
the admission *trips* and rejects every new call for ``trip_cooldown`` seconds, giving the backend room
to recover instead of a queue that never empties.

::

    admission = Admission("generator", AdmissionConfig(max_concurrent=4, max_queue=100))

    result = await admission.call(generate, prompt)      # engine
    async with admission:                                 # block form
        ...
    @admission                                            # decorator form
    async def generate(prompt: str) -> str: ...

A freed slot is handed straight to the oldest waiting caller, so a newcomer can never barge ahead of the
queue and ``in_flight`` never exceeds ``max_concurrent``.

**Deadlines.** A call may carry a deadline: the enclosing :func:`~brownout.policies.deadline.deadline`
scope (its :func:`~brownout.policies.deadline.remaining` time), or an explicit budget with
:meth:`Admission.call_within`. A caller that would have to queue is told *at once* -- without
waiting -- when the estimated wait to start already exceeds what it has left: ``Overloaded`` with
reason ``"deadline"`` and a ``retry_after`` estimating when the backlog will have drained. Waiting in
the queue only to fail at the deadline would hold the caller for nothing; shedding answers at once
even while every slot is busy. The wait is estimated as ``position * ewma / max_concurrent``
(``position``: callers ahead plus this one; ``ewma``: the average service time), or by a
``wait_estimator`` passed in (e.g. one that knows the model server's own queue). Before any call has
completed there is no estimate, and only a caller with no time left at all (a budget of 0) is refused
for its deadline.

**Paced returns.** By default ``retry_after`` says when the backlog will have drained: a few seconds
while the queue is short. With many polite callers competing for few slots, that sends every refused
caller back every few seconds, and nearly all of them are refused again -- work for nothing on both
sides. With ``retry_pacing`` set (e.g. 4), each refused caller is given its own place in a line of
returning callers, ``retry_pacing`` of them for each slot that comes free (slots come free every
``service time / max_concurrent`` seconds): the Retry-After then grows with the number of callers
competing (200 callers for 4 slots of 8 s each: about 100 s, capped at ``retry_pacing_max``), while
enough come back to keep every slot busy. The line ends no later than ``retry_pacing_max`` from now
and drains as time passes, so a lull resets it. Callers refused elsewhere on the same capacity's
behalf (a CPU budget, say) take their place with :meth:`Admission.place_in_line`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pydantic import Field, model_validator

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import Overloaded
from brownout.events import DEFAULT_BUS, CallRejected, EventBus
from brownout.policies._base import CallForms, PolicyConfig
from brownout.policies.deadline import remaining

__all__ = ["Admission", "AdmissionConfig", "AdmissionStats"]

_QUEUE_FULL = "queue_full"
_QUEUE_TIMEOUT = "queue_timeout"
_TRIPPED = "tripped"
_DEADLINE = "deadline"


class AdmissionConfig(PolicyConfig):
    """Settings of an :class:`Admission`; by default 10 calls run at once and up to 500 wait."""

    max_concurrent: int = Field(default=10, ge=1, description="Calls allowed to run at the same time.")
    max_queue: int = Field(
        default=500,
        ge=0,
        description="Callers allowed to wait for a slot (default 500); 0 means never wait.",
    )
    max_wait: float = Field(
        default=30.0, gt=0, description="Longest a caller waits in the queue, in seconds."
    )
    default_retry_after: float = Field(
        default=30.0, ge=0, description="retry_after until a service time has been observed (default 30 s)."
    )
    min_retry_after: float = Field(default=1.0, ge=0, description="Lower bound of the retry_after estimate.")
    max_retry_after: float = Field(
        default=300.0, ge=0, description="Upper bound of the retry_after estimate."
    )
    ewma_alpha: float = Field(
        default=0.2, gt=0, le=1, description="Weight of the newest observation in the service-time average."
    )
    retry_pacing: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Give each refused caller its own place in a line of returning callers, this many for each "
            "slot that comes free (4 keeps the slots busy; None, the default: retry_after only "
            "estimates when the backlog drains)."
        ),
    )
    retry_pacing_max: float = Field(
        default=60.0,
        gt=0,
        description=(
            "The longest retry_after the paced line gives (default 60 s, the longest Retry-After "
            "the OpenAI SDK honours)."
        ),
    )
    trip_queue_depth: int | None = Field(
        default=None,
        ge=1,
        description=(
            "A caller that finds this many already waiting trips the admission, which then rejects "
            "every new call for trip_cooldown (50 is a sensible depth; off by default)."
        ),
    )
    trip_cooldown: float = Field(
        default=30.0, gt=0, description="How long a tripped admission rejects every call (default 30 s)."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        if self.min_retry_after > self.max_retry_after:
            raise ValueError(
                f"min_retry_after ({self.min_retry_after}) must not exceed "
                f"max_retry_after ({self.max_retry_after})"
            )
        if not self.min_retry_after <= self.default_retry_after <= self.max_retry_after:
            raise ValueError(
                f"default_retry_after ({self.default_retry_after}) must lie within "
                f"[min_retry_after, max_retry_after] = [{self.min_retry_after}, {self.max_retry_after}]"
            )
        if self.trip_queue_depth is not None and self.trip_queue_depth > self.max_queue:
            raise ValueError(
                f"trip_queue_depth ({self.trip_queue_depth}) must not exceed max_queue ({self.max_queue}); "
                "the queue could never reach it"
            )
        return self


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """A snapshot of an :class:`Admission`'s counters since it was built.

    ``admitted`` counts calls that got a slot (``completed`` + ``in_flight``); ``queued`` counts callers
    that had to wait, whatever became of them; ``rejected`` counts shed calls by reason; ``completed``
    counts slots given back, whether the call succeeded, failed or was cancelled.
    """

    admitted: int
    queued: int
    rejected: Mapping[str, int]
    completed: int
    in_flight: int
    queue_size: int


class Admission(CallForms):
    """A bulkhead of ``max_concurrent`` slots with a bounded FIFO wait queue and load shedding.

    See the module docstring for the forms and :class:`AdmissionConfig` for the settings. Rejections
    raise :class:`~brownout.errors.Overloaded` with ``reason`` ``"queue_full"``, ``"queue_timeout"`` or
    ``"tripped"`` and emit :class:`~brownout.events.CallRejected` (``kind="admission"``).

    ``retry_after`` on a rejection is estimated from an exponentially weighted moving average of the
    observed service time (clock time from getting a slot to giving it back):
    ``ewma * (queue_size + 1) / max_concurrent``, clamped to ``[min_retry_after, max_retry_after]``;
    with ``retry_pacing``, each rejected caller is then given its own place in a line of returning
    callers (:meth:`place_in_line`, the module docstring's "Paced returns").
    """

    __slots__ = (
        "_clock",
        "_completed",
        "_default_retry_after",
        "_events",
        "_ewma",
        "_ewma_alpha",
        "_fast_limit",
        "_in_flight",
        "_line_end",
        "_max",
        "_max_queue",
        "_max_retry_after",
        "_max_wait",
        "_min_retry_after",
        "_pace",
        "_pacing",
        "_pacing_max",
        "_queued",
        "_rejected",
        "_starts",
        "_trip_cooldown",
        "_trip_depth",
        "_tripped_until",
        "_wait_estimator",
        "_waiters",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "admission",
        config: AdmissionConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        wait_estimator: Callable[[int], float | None] | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else AdmissionConfig()
        # position in the queue (1: next) -> seconds until that caller starts, or None: unknown.
        self._wait_estimator = wait_estimator
        self._clock = clock
        self._events = events
        cfg = self.config
        # Config values are copied to plain attributes: the fast path reads them on every call.
        self._max = cfg.max_concurrent
        # The fast path compares against this instead of ``_max`` so that tripping (which sets it to 0)
        # costs the untripped fast path no extra branch.
        self._fast_limit = cfg.max_concurrent
        self._max_queue = cfg.max_queue
        self._max_wait = cfg.max_wait
        self._default_retry_after = cfg.default_retry_after
        self._min_retry_after = cfg.min_retry_after
        self._max_retry_after = cfg.max_retry_after
        self._ewma_alpha = cfg.ewma_alpha
        self._trip_depth = cfg.trip_queue_depth
        self._trip_cooldown = cfg.trip_cooldown
        self._tripped_until = float("-inf")
        self._pacing = cfg.retry_pacing
        self._pacing_max = cfg.retry_pacing_max
        # Clock time the last paced caller was told to come back (see place_in_line).
        self._line_end = float("-inf")
        self._in_flight = 0
        # Each waiter is a future resolved with True (a slot was handed over) or False (timed out).
        # Invariant: waiters exist only while every slot is taken.
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._ewma: float | None = None
        self._completed = 0
        # Measured seconds of queue wait per place in the queue (None until a queued caller started or
        # left): the estimate the queue itself proves, see _wait_for.
        self._pace: float | None = None
        self._queued = 0
        self._rejected: dict[str, int] = {_QUEUE_FULL: 0, _QUEUE_TIMEOUT: 0, _TRIPPED: 0, _DEADLINE: 0}
        # Slot start times of the ``async with`` form, per task (the block form has nowhere else to
        # keep them; ``call`` keeps its start time in a local).
        self._starts: dict[asyncio.Task[Any] | None, float] = {}

    # -- read-only state ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Calls holding a slot right now."""
        return self._in_flight

    @property
    def queue_size(self) -> int:
        """Callers waiting for a slot right now."""
        return len(self._waiters)

    @property
    def tripped(self) -> bool:
        """True while a queue-depth trip is rejecting every new call."""
        return self._fast_limit == 0 and self._tripped_until > self._clock.now()

    @property
    def stats(self) -> AdmissionStats:
        """Counters since construction (a snapshot)."""
        return AdmissionStats(
            admitted=self._completed + self._in_flight,
            queued=self._queued,
            rejected=dict(self._rejected),
            completed=self._completed,
            in_flight=self._in_flight,
            queue_size=len(self._waiters),
        )

    @property
    def service_time(self) -> float | None:
        """The average service time of a call in seconds (None before the first call completed)."""
        return self._ewma

    def estimated_wait(self) -> float | None:
        """Seconds a caller arriving now would wait before it starts (0 with a free slot), or None
        before any call completed (no service time to estimate from)."""
        if self._in_flight < self._fast_limit and not self._waiters:
            return 0.0
        return self._wait_for(len(self._waiters) + 1)

    def retry_after(self) -> float:
        """The current ``retry_after`` estimate for a caller joining the queue now, in seconds."""
        return self._estimate(len(self._waiters))

    @property
    def retry_line(self) -> float:
        """Seconds from now until the last caller refused so far was told to come back (0 when none
        is away, or without ``retry_pacing``): how far ahead the line of returning callers reaches."""
        return max(0.0, self._line_end - self._clock.now())

    def place_in_line(self, at_least: float = 0.0) -> float:
        """The ``retry_after`` for a caller refused now: with ``retry_pacing``, its own place in the
        line of returning callers (never sooner than ``at_least`` seconds); else ``at_least``.

        Every refusal of this admission takes its place here; call it for a caller refused elsewhere
        on behalf of the same capacity (a CPU budget, say), so that it takes one too. Places are
        ``service time / (max_concurrent * retry_pacing)`` apart: as many callers come back as the
        slots can take, ``retry_pacing`` times over. The line starts no sooner than ``at_least`` (a
        caller told to come back before the backlog could drain would only be refused again) and
        ends no later than ``retry_pacing_max`` from now. Before any service time has been seen
        there is no pace to keep, and ``at_least`` is returned.
        """
        pacing, ewma = self._pacing, self._ewma
        if pacing is None or not ewma:
            return at_least
        now = self._clock.now()
        spacing = ewma / (self._max * pacing)
        horizon = max(at_least, self._pacing_max)
        place = min(max(self._line_end + spacing, now + at_least), now + horizon)
        self._line_end = place
        return max(at_least, place - now)  # (not a hair under the floor by rounding)

    # -- call forms -----------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` once a slot is free; raise ``Overloaded`` if shed.

        Inside a deadline scope, a caller that could not start before it ends is shed at once.
        """
        # Fast path: a free slot means nobody waits (a freed slot is handed to a waiter rather than
        # freed, so waiters exist only while every slot is taken); no await, no allocation.
        if self._in_flight < self._fast_limit:
            self._in_flight += 1
        else:
            await self._acquire_slow(remaining())
        # The body of ``_run``, inlined: this is the hot path of every call.
        now = self._clock.now
        start = now()
        try:
            return await fn(*args, **kwargs)
        finally:
            elapsed = now() - start
            ewma = self._ewma
            self._ewma = elapsed if ewma is None else ewma + self._ewma_alpha * (elapsed - ewma)
            self._completed += 1
            if self._waiters:
                self._hand_off()
            else:
                self._in_flight -= 1

    def check(self, budget: float | None = None) -> None:
        """Raise ``Overloaded`` now if :meth:`call_within` with ``budget`` would shed a caller arriving
        now at once (tripped, ``"deadline"``, ``"queue_full"``); take no slot and join no queue.

        For a caller with work to do before its call (a task to start, a lookup, a lock to take):
        refused here, it is answered within its own step of the event loop, instead of after that
        work -- under a burst, a refusal that waits for one more turn of the loop waits behind every
        other request of the burst. A caller that passes still goes through :meth:`call_within`,
        which decides again on the state it then finds (a slot may have been taken meanwhile). A
        queue-depth trip is never started here, only honoured."""
        if self._in_flight < self._fast_limit:
            return
        now = self._clock.now()
        if self._fast_limit == 0 and self._tripped_until > now:
            raise self._reject(_TRIPPED, self._tripped_until - now, now)
        waiters = self._waiters
        if self._in_flight < self._max and not waiters:
            return
        depth = len(waiters)
        if self._trip_depth is not None and depth >= self._trip_depth:
            return  # call_within trips the admission and refuses (and counts) it
        refusal = self._shed_at_once(depth, budget, now)
        if refusal is not None:
            raise refusal

    async def call_within(
        self, budget: float | None, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Like :meth:`call`, for a caller with ``budget`` seconds left to *start* (None: the enclosing
        deadline's); shed at once with reason ``"deadline"`` when the estimated wait exceeds it (or
        it is 0 and every slot is taken), and with ``"queue_timeout"`` if it queued and the budget
        ran out before a slot came free."""
        if self._in_flight < self._fast_limit:
            self._in_flight += 1
        else:
            await self._acquire_slow(remaining() if budget is None else budget)
        return await self._run(fn, args, kwargs)

    async def _run(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``fn`` on the slot just taken and give the slot back, timing it."""
        now = self._clock.now
        start = now()
        try:
            return await fn(*args, **kwargs)
        finally:
            elapsed = now() - start
            ewma = self._ewma
            self._ewma = elapsed if ewma is None else ewma + self._ewma_alpha * (elapsed - ewma)
            self._completed += 1
            if self._waiters:
                self._hand_off()
            else:
                self._in_flight -= 1

    async def __aenter__(self) -> Self:
        """Take a slot for the block (waiting in the queue if needed); raise ``Overloaded`` if shed."""
        if self._in_flight < self._fast_limit:  # same fast path as ``call``
            self._in_flight += 1
        else:
            await self._acquire_slow(remaining())
        # setdefault: if one task nests the same admission, time from the outermost slot (nesting a
        # bulkhead in itself is a deadlock risk anyway; this just keeps the bookkeeping sane).
        self._starts.setdefault(asyncio.current_task(), self._clock.now())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Give the slot back (to the next waiter, if any); never suppresses an exception."""
        start = self._starts.pop(asyncio.current_task(), None)
        if start is None:
            self._give_back()
        else:
            self._release(self._clock.now() - start)

    # -- engine ---------------------------------------------------------------------------------

    async def _acquire_slow(self, budget: float | None = None) -> None:
        """Take a slot when the fast path could not: check the trip, the deadline, queue or shed.

        ``budget``: seconds the caller has left to start (None: no deadline).
        """
        now = self._clock.now()
        if self._fast_limit == 0:
            remaining = self._tripped_until - now
            if remaining > 0:
                raise self._reject(_TRIPPED, remaining, now)
            # The cooldown is over: reopen the fast path.
            self._fast_limit = self._max
        waiters = self._waiters
        if self._in_flight < self._max and not waiters:
            self._in_flight += 1
            return
        depth = len(waiters)
        if self._trip_depth is not None and depth >= self._trip_depth:
            # The queue-depth breaker: a queue this deep means the backend is not keeping up; stop
            # accepting work for a while rather than let every caller time out in the queue.
            self._tripped_until = now + self._trip_cooldown
            self._fast_limit = 0
            raise self._reject(_TRIPPED, self._trip_cooldown, now)
        refusal = self._shed_at_once(depth, budget, now)
        if refusal is not None:
            raise refusal

        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        self._queued += 1
        entered, position = now, depth + 1
        # A caller with a deadline to start never waits past it: when the estimate was wrong, leaving
        # at the deadline beats starting too late to finish in time.
        wait = self._max_wait if budget is None else max(0.0, min(self._max_wait, budget))
        timer = self._clock.call_later(wait, functools.partial(self._expire, future))
        try:
            granted = await future
        except BaseException:
            # Cancelled while queued, or right after being handed a slot (the future already has
            # its result but this task never resumed to use it).
            timer.cancel()
            if future.done() and not future.cancelled():
                if future.result():
                    self._give_back()
            else:
                with contextlib.suppress(ValueError):  # already skipped by a release
                    waiters.remove(future)
            raise
        timer.cancel()
        left = self._clock.now()
        # What this caller's wait says about the queue's real pace (a caller that timed out gives a
        # lower bound, which is what matters: the estimate must learn it was too hopeful).
        self._observe_pace((left - entered) / position)
        if not granted:
            raise self._reject(_QUEUE_TIMEOUT, self._estimate(len(waiters)), left)

    def _shed_at_once(self, depth: int, budget: float | None, now: float) -> Overloaded | None:
        """The refusal (counted) of a caller that would queue behind ``depth`` others with ``budget``
        seconds to start, or None when it may queue."""
        if budget is not None:
            # No time left to start: refused whatever the estimate (there may be none yet) -- it
            # could only wait to fail.
            wait = self._wait_for(depth + 1) if budget > 0 else math.inf
            if wait is not None and wait > budget:
                # It could not start in time: say so now rather than after waiting to fail.
                return self._reject(_DEADLINE, self._estimate(depth), now)
        if depth >= self._max_queue:
            return self._reject(_QUEUE_FULL, self._estimate(depth), now)
        return None

    def _expire(self, future: asyncio.Future[bool]) -> None:
        """Timer callback: the waiter waited ``max_wait`` without getting a slot."""
        if not future.done():
            # Not done means still queued: handed-over and cancelled futures are done.
            self._waiters.remove(future)
            future.set_result(False)

    def _release(self, elapsed: float) -> None:
        """Record a call's service time and give its slot back."""
        ewma = self._ewma
        self._ewma = elapsed if ewma is None else ewma + self._ewma_alpha * (elapsed - ewma)
        self._give_back()

    def _give_back(self) -> None:
        """Hand the slot to the oldest live waiter, or free it if nobody waits."""
        self._completed += 1
        if self._waiters:
            self._hand_off()
        else:
            self._in_flight -= 1

    def _hand_off(self) -> None:
        """Give a slot to the oldest live waiter (freeing it if every waiter is gone)."""
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():  # skip waiters cancelled but not yet resumed
                # The slot changes hands without ``in_flight`` dropping, so nobody can barge in.
                future.set_result(True)
                return
        self._in_flight -= 1

    def _observe_pace(self, per_place: float) -> None:
        pace = self._pace
        self._pace = per_place if pace is None else pace + self._ewma_alpha * (per_place - pace)

    def _wait_for(self, position: int) -> float | None:
        """Estimated seconds until the caller at ``position`` in the queue (1: next) starts.

        The larger of two estimates: the model's (``service time * position / max_concurrent``, or
        the ``wait_estimator``'s) and the queue's measured pace (seconds each place ahead has really
        cost the callers before). Service times alone can be too hopeful -- quick answers pull the
        average down while the slow ones hold the slots -- and a caller admitted on a hopeful
        estimate is refused at its deadline, seconds later, instead of at once.
        """
        if self._wait_estimator is not None:
            modelled = self._wait_estimator(position)
        else:
            ewma = self._ewma
            modelled = None if ewma is None else ewma * position / self._max
        pace = self._pace
        if pace is None:
            return modelled
        measured = pace * position
        return measured if modelled is None else max(modelled, measured)

    def _estimate(self, queue_size: int) -> float:
        ewma = self._ewma
        if ewma is None:
            return self._default_retry_after
        estimate = ewma * (queue_size + 1) / self._max
        return min(max(estimate, self._min_retry_after), self._max_retry_after)

    def _reject(self, reason: str, retry_after: float, now: float) -> Overloaded:
        """Count a rejection, emit its event, and build the error to raise (with pacing, the
        rejected caller takes its place in the line of returning callers)."""
        self._rejected[reason] += 1
        if self._pacing is not None:
            retry_after = self.place_in_line(retry_after)
        if self._events.active:
            self._events.emit(
                CallRejected(
                    source=self.name, at=now, kind="admission", reason=reason, retry_after=retry_after
                )
            )
        return Overloaded(
            self.name,
            reason,
            retry_after=retry_after,
            queue_size=len(self._waiters),
            in_flight=self._in_flight,
        )

    def __repr__(self) -> str:
        return (
            f"Admission({self.name!r}, in_flight={self._in_flight}/{self._max}, "
            f"queue_size={len(self._waiters)}/{self._max_queue})"
        )
