"""Deadlines that propagate through nested calls and enforce themselves.

A deadline is an absolute point in time carried in a :class:`contextvars.ContextVar`, so every policy
and client below the scope that set it can ask how much time is left (:func:`remaining`) -- a retry
never sleeps past it, a model client passes it on as its own timeout. When the deadline passes, the
task running the scope is cancelled and the scope raises :class:`~brownout.errors.DeadlineExceeded`.
Nested scopes take the tighter of the two deadlines; an inner scope never extends an outer one, and
one whose enclosing deadline is tighter leaves the enforcing to that one.

Why not ``asyncio.timeout`` per call: it schedules and cancels one loop timer per scope, which costs
microseconds on every call. Here all scopes of one clock and event loop share one *watcher* with one
timer. Scopes with the same timeout end in the order they began, so each distinct timeout gets a FIFO
*lane*: entering a scope appends to its lane (no heap, no timer unless it is the earliest deadline),
leaving marks the entry finished, and finished entries are dropped from the front of the lane as new
ones arrive. The timer fires at the earliest live deadline, cancels the tasks whose deadlines passed,
and re-arms itself. Timeouts beyond the first ``_MAX_LANES`` distinct values share a heap.

Memory: an entry stays queued until it reaches the front of its lane, so a lane holds at most the
calls started during the longest-running live call of that timeout (bounded by the timeout).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

from pydantic import Field

from brownout.clock import SYSTEM_CLOCK, Clock, TimerHandle
from brownout.errors import ConfigError, DeadlineExceeded
from brownout.events import DEFAULT_BUS, DeadlineExpired, EventBus
from brownout.policies._base import CallForms, EnteredGuards, PolicyConfig

__all__ = ["Deadline", "DeadlineConfig", "current_deadline", "deadline", "remaining"]

_get_running_loop = asyncio.get_running_loop

if sys.version_info < (3, 12):  # pragma: no cover - depends on the interpreter
    # On 3.11 asyncio.current_task() is a Python function around this C dict; reading the dict
    # directly is several times cheaper, and this module reads it on every call.
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        task: asyncio.Task[Any] | None = _current_tasks.get(loop)
        return task

else:  # pragma: no cover - depends on the interpreter

    def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return asyncio.current_task(loop)


_RUNNING, _FINISHED, _FIRED = 0, 1, 2

# One enforced scope is a small list rather than an object: it is built on every call, and a list
# literal costs a third of a slotted class's __init__: [when, clock, task, cancelling, state] -- cancel
# TASK at WHEN (on CLOCK) unless STATE says it finished first; CANCELLING is the task's cancel count
# on entry.
_WHEN, _CLOCK, _TASK, _CANCELLING, _STATE = range(5)


_current: ContextVar[list[Any] | None] = ContextVar("brownout_deadline", default=None)


def remaining() -> float | None:
    """Seconds left before the innermost enclosing deadline (may be negative), or None if there is none."""
    entry = _current.get()
    if entry is None:
        return None
    left: float = entry[_WHEN] - entry[_CLOCK].now()
    return left


def current_deadline() -> float | None:
    """The absolute time (on the deadline's clock) of the enclosing deadline, or None."""
    entry = _current.get()
    return None if entry is None else float(entry[_WHEN])


_MAX_LANES = 32


class _Watcher:
    """Cancels tasks whose deadlines passed, with one timer per clock and loop instead of one per call."""

    __slots__ = ("_armed_at", "_clock", "_handle", "_heap", "_lanes", "_loop", "_seq")

    def __init__(self, clock: Clock, loop: asyncio.AbstractEventLoop) -> None:
        self._clock = clock
        self._loop = loop
        self._lanes: dict[float, deque[list[Any]]] = {}
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._seq = itertools.count()
        self._handle: TimerHandle | None = None
        self._armed_at = float("inf")

    def lane(self, timeout: float) -> deque[list[Any]] | None:
        """The FIFO lane for ``timeout``, or None when there are too many distinct timeouts."""
        lane = self._lanes.get(timeout)
        if lane is None and len(self._lanes) < _MAX_LANES:
            lane = self._lanes[timeout] = deque()
        return lane

    def watch(self, entry: list[Any], lane: deque[list[Any]] | None) -> None:
        """Enforce ``entry``; ``lane`` is from :meth:`lane` (Deadline.call inlines this)."""
        if lane is None:
            heapq.heappush(self._heap, (entry[_WHEN], next(self._seq), entry))
        else:
            while lane and lane[0][_STATE]:
                lane.popleft()
            lane.append(entry)
        if entry[_WHEN] < self._armed_at:
            self._arm(entry[_WHEN])

    @property
    def queued(self) -> int:
        """Entries held, finished or not (for tests and diagnostics)."""
        return sum(len(lane) for lane in self._lanes.values()) + len(self._heap)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._clock.call_later(when - self._clock.now(), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = float("inf")
        now = self._clock.now()
        earliest = float("inf")
        for lane in self._lanes.values():
            while lane and (lane[0][_STATE] or lane[0][_WHEN] <= now):
                _expire(lane.popleft())
            if lane:
                earliest = min(earliest, lane[0][_WHEN])
        heap = self._heap
        while heap and (heap[0][2][_STATE] or heap[0][0] <= now):
            _expire(heapq.heappop(heap)[2])
        if heap:
            earliest = min(earliest, heap[0][0])
        if earliest != float("inf"):
            self._arm(earliest)


def _expire(entry: list[Any]) -> None:
    if entry[_STATE] == _RUNNING and entry[_TASK] is not None:
        entry[_STATE] = _FIRED
        entry[_TASK].cancel()


# One watcher per clock, rebuilt when a new event loop (a new test, asyncio.run called again) starts
# using the clock.
_watchers: dict[int, _Watcher] = {}


def _watcher(clock: Clock, loop: asyncio.AbstractEventLoop) -> _Watcher:
    w = _watchers.get(id(clock))
    if w is None or w._loop is not loop or w._clock is not clock:
        w = _watchers[id(clock)] = _Watcher(clock, loop)
    return w


def _finish(entry: list[Any], exc: BaseException | None, timeout: float, name: str, events: EventBus) -> None:
    """Close an enforced scope: raise DeadlineExceeded if our timer cancelled it."""
    if entry[_STATE] != _FIRED:
        entry[_STATE] = _FINISHED
        return
    entry[_STATE] = _FINISHED
    # Our timer cancelled the task. Turn that cancellation (and only that one) into DeadlineExceeded;
    # a cancellation someone else requested as well stays a cancellation.
    if entry[_TASK].uncancel() <= entry[_CANCELLING] and isinstance(exc, asyncio.CancelledError):
        if events.active:
            events.emit(DeadlineExpired(name, entry[_CLOCK].now(), timeout))
        raise DeadlineExceeded(timeout, policy=name) from exc


def _task_and_loop() -> tuple[asyncio.Task[Any], asyncio.AbstractEventLoop]:
    loop = _get_running_loop()
    task = _current_task(loop)
    if task is None:
        raise RuntimeError("a deadline needs to run inside an asyncio task")
    return task, loop


def _check_timeout(timeout: float | None) -> float | None:
    """Validate a scope's timeout; infinity means no deadline of its own."""
    if timeout is None or timeout == math.inf:
        return None
    if math.isnan(timeout) or timeout == -math.inf:
        raise ConfigError("timeout", f"must be a number of seconds or None, got {timeout!r}")
    return float(timeout)


def _open(timeout: float | None, clock: Clock, name: str) -> tuple[list[Any] | None, Token[list[Any] | None]]:
    """Enter a scope: returns the entry to enforce (None when an enclosing one does) and the token."""
    now = clock.now()
    outer = _current.get()
    when = math.inf if timeout is None else now + timeout
    lane_timeout = timeout
    task, loop = _task_and_loop()
    if outer is not None:
        outer_when = outer[_WHEN] if outer[_CLOCK] is clock else now + (outer[_WHEN] - outer[_CLOCK].now())
        if outer_when <= when:
            if outer_when <= now:
                raise DeadlineExceeded(timeout if timeout is not None else 0.0, policy=name)
            if outer[_TASK] is task:
                # The enclosing scope of this very task is tighter: it alone enforces, and owns the
                # cancellation. (On another clock, keep a converted copy so remaining() reads this one.)
                if outer[_CLOCK] is not clock:
                    outer = [outer_when, clock, task, 0, _FINISHED]
                return None, _current.set(outer)
            # The enclosing scope belongs to the task that spawned this one (create_task copies the
            # context) and will only ever cancel that task: enforce its deadline here ourselves.
            when = outer_when
            lane_timeout = None
    if when == math.inf:
        return None, _current.set(None)
    if timeout is not None and timeout <= 0:
        raise DeadlineExceeded(timeout, policy=name)
    entry = [when, clock, task, task.cancelling(), _RUNNING]
    w = _watcher(clock, loop)
    w.watch(entry, None if lane_timeout is None else w.lane(lane_timeout))
    return entry, _current.set(entry)


class deadline:  # lower-case: used like a function, ``async with deadline(2.0):``
    """An async context manager that bounds the time of its block.

    ``async with deadline(2.0): ...`` raises :class:`DeadlineExceeded` if the block is still running
    after 2 s of ``clock`` time (cancelling what it awaits), or at once if an enclosing deadline has
    already passed. ``timeout=None`` sets no deadline of its own but still honours enclosing ones.
    """

    __slots__ = ("_clock", "_entry", "_events", "_name", "_timeout", "_token")

    def __init__(
        self,
        timeout: float | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        name: str = "deadline",
    ) -> None:
        self._timeout = _check_timeout(timeout)
        self._clock = clock
        self._events = events
        self._name = name

    async def __aenter__(self) -> deadline:
        self._entry, self._token = _open(self._timeout, self._clock, self._name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._token)
        if self._entry is not None:
            _finish(self._entry, exc, self._timeout or 0.0, self._name, self._events)


class DeadlineConfig(PolicyConfig):
    """Config of a :class:`Deadline` policy."""

    timeout: float = Field(default=30.0, gt=0, description="seconds each call may take")


class Deadline(CallForms):
    """A policy that gives each call a deadline of ``config.timeout`` seconds (tightened by enclosing ones).

    Use it in a composition (``compose(Deadline(...), breaker, retry)``), as a decorator, as
    ``await d.call(fn, ...)``, or as ``async with d:``.
    """

    __slots__ = ("_clock", "_events", "_lane", "_watcher", "config", "name", "timeout")

    def __init__(
        self,
        name: str = "deadline",
        config: DeadlineConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.name = name
        self.config = config or DeadlineConfig()
        self.timeout = self.config.timeout
        self._clock = clock
        self._events = events
        self._watcher: _Watcher | None = None
        self._lane: deque[list[Any]] | None = None

    def scope(self) -> deadline:
        """A fresh deadline scope for one block."""
        return deadline(self.timeout, clock=self._clock, events=self._events, name=self.name)

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` within the deadline."""
        clock = self._clock
        outer = _current.get()
        if outer is not None and outer[_CLOCK] is not clock:
            # Deadlines on different clocks: the general path converts between them.
            async with self.scope():
                return await fn(*args, **kwargs)
        # The common case, inlined (this runs on every call): one entry appended to this policy's lane.
        loop = _get_running_loop()
        task = _current_task(loop)
        if task is None:
            raise RuntimeError("a deadline needs to run inside an asyncio task")
        when = clock.now() + self.timeout
        lane = self._lane
        if outer is not None and outer[_WHEN] <= when:
            if outer[_WHEN] <= clock.now():
                raise DeadlineExceeded(self.timeout, policy=self.name)
            if outer[_TASK] is task:
                # An enclosing deadline of this task is tighter and already enforced.
                return await fn(*args, **kwargs)
            # Inherited from the spawning task, which that scope alone would cancel: enforce it here.
            when = outer[_WHEN]
            lane = None
        w = self._watcher
        if w is None or w._loop is not loop:
            w = self._watcher = _watcher(clock, loop)
            self._lane = w.lane(self.timeout)
            if lane is not None:
                lane = self._lane
        entry = [when, clock, task, task.cancelling(), _RUNNING]
        if lane is None:
            w.watch(entry, None)
        else:
            # Watcher.watch, inlined.
            while lane and lane[0][_STATE]:
                lane.popleft()
            lane.append(entry)
            if when < w._armed_at:
                w._arm(when)
        token = _current.set(entry)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as e:
            _current.reset(token)
            _finish(entry, e, self.timeout, self.name, self._events)
            raise
        _current.reset(token)
        if entry[_STATE] == _FIRED:
            # Fired just as the call completed (it swallowed the cancellation): keep the result,
            # withdraw our cancellation request.
            task.uncancel()
        entry[_STATE] = _FINISHED
        return result

    async def __aenter__(self) -> deadline:
        # A fresh scope per block, so one Deadline object can guard concurrent blocks.
        scope = self.scope()
        await scope.__aenter__()
        _entered.push(scope)
        return scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _entered.pop().__aexit__(exc_type, exc, tb)


_entered: EnteredGuards[deadline] = EnteredGuards("brownout_deadline_entered")
