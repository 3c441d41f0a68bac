"""Background work that an object owns: a loop that runs a step every so often, and one-shot tasks.

Every long-lived part of brownout that does something periodically -- the health probes, the resource
monitor, the system mode, the cache sweeper, the shared breakers' sync -- runs it through
:class:`Periodic`; every part that starts short tasks it must not lose -- an event on its way to the
outbox, a breaker's outcome on its way to Redis, a recovery run -- keeps them in a :class:`TaskSet`.
So the life cycle of background work is written once:

* ``start()`` runs it on the running event loop; a second call while it runs does nothing;
* ``stop()`` cancels it and returns once it has ended, so nothing is left pending; a second call does
  nothing. A round that swallows the cancellation (or turns it into an error of its own, as a client
  library may) still ends the loop. If the caller is itself cancelled while it waits, that
  cancellation propagates (the background task, already cancelled, ends on its own);
* a step that raises is logged with the loop's name and the loop goes on: a bug in one round must not
  leave the service unwatched. :class:`asyncio.CancelledError` is never caught;
* waiting goes through the injected :class:`~brownout.clock.Clock`, so tests on
  :class:`~brownout.testing.FakeClock` never sleep for real.

A loop that is not periodic -- a queue consumer, a replayer with its own backoff, a process supervisor
-- keeps its own task: forcing it into a fixed rhythm would change what it does.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Final, Self, TypeVar, final

from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = ["STOP", "Periodic", "TaskSet"]

_log = logging.getLogger("brownout.background")

T = TypeVar("T")


@final
class _Stop:
    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


STOP: Final = _Stop()
"""What a :class:`Periodic` step returns to end its loop (it has nothing left to do)."""


class Periodic:
    """Runs ``step`` every ``interval`` seconds of ``clock`` time in a background task.

    ``step`` is a plain function or a coroutine function (its result is awaited). With ``immediately``
    (the default) the first step runs as soon as the task starts, then one every ``interval``; without
    it the loop waits one interval first. The interval counts from the end of one step to the start of
    the next. ``interval`` may be a function, read before each wait, for an owner whose interval is a
    setting it lets users change.

    A step that raises :class:`Exception` is logged (on ``logger``, with ``name``) and the next one
    runs on schedule; a step that returns :data:`STOP` ends the loop. Only one step runs at a time,
    even when the loop is restarted while its last task is still being stopped. ``name`` also names
    the task (``asyncio.Task.get_name``).
    """

    __slots__ = ("_clock", "_immediately", "_interval", "_log", "_step", "_stopping", "_task", "name")

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        interval: float | Callable[[], float],
        *,
        clock: Clock = SYSTEM_CLOCK,
        immediately: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        """Names the task and the log lines of failed steps."""
        self._step = step
        if callable(interval):
            self._interval = interval
        else:
            fixed = float(interval)
            self._interval = lambda: fixed
        self._clock = clock
        self._immediately = immediately
        self._log = logger if logger is not None else _log
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not ended yet

    @property
    def interval(self) -> float:
        """Seconds between the end of one step and the start of the next (as read now)."""
        return self._interval()

    @property
    def running(self) -> bool:
        """True from :meth:`start` until :meth:`stop`, or until a step returned :data:`STOP`."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop on the running event loop; does nothing while it runs."""
        if self.running:
            return
        previous = [t for t in self._stopping if not t.done()]
        task = asyncio.get_running_loop().create_task(self._run(previous), name=self.name)
        task.add_done_callback(self._ended)
        self._task = task

    async def stop(self) -> None:
        """Cancel the loop and return once its task has ended; does nothing when it is not running.

        A step in progress is cancelled at its next ``await``. Called from inside a step, it only
        cancels (the step cannot wait for itself to end).
        """
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
        current = asyncio.current_task()
        stopping = [t for t in self._stopping if t is not current and not t.done()]
        if stopping:
            # asyncio.wait, not `await task`: a cancellation of our caller must still reach our caller.
            await asyncio.wait(stopping)

    async def __aenter__(self) -> Self:
        """Start the loop."""
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the loop."""
        await self.stop()

    async def _run(self, previous: list[asyncio.Task[None]]) -> None:
        if previous:  # restarted while earlier tasks were being stopped: one step at a time
            await asyncio.wait(previous)
        clock, step, stopping = self._clock, self._step, self._stopping
        task = asyncio.current_task()
        if not self._immediately:
            await clock.sleep(self._interval())
        while True:
            try:
                result = step()
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                if task in stopping:
                    return  # stop() came during the round and the round turned it into an error
                self._log.exception("%s: a step failed; the loop goes on", self.name)
            else:
                if result is STOP:
                    return
            if task in stopping:
                # stop() cancelled this round and the round swallowed the cancellation (a client
                # library may): end here, or stop() would wait for a loop that never ends.
                return
            await clock.sleep(self._interval())

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._stopping.discard(task)
        # Steps' errors are caught, so this is the clock failing or a BaseException: say so, once.
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error("%s stopped: %r", self.name, error, exc_info=error)

    def __repr__(self) -> str:
        return f"<Periodic {self.name!r} {'running' if self.running else 'stopped'}>"


class TaskSet:
    """One-shot background tasks an object owns: kept until they end, waited for or cancelled at close.

    asyncio keeps only a weak reference to a running task, so a task nobody holds can vanish mid-way;
    a set keeps it. A task that fails is logged (on ``logger``, with ``name``) as it ends -- nobody
    awaits its result. Iterating gives the tasks running now.
    """

    __slots__ = ("_log", "_tasks", "name")

    def __init__(self, name: str, *, logger: logging.Logger | None = None) -> None:
        self.name = name
        """Names the log lines of failed tasks."""
        self._log = logger if logger is not None else _log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in a task of its own on the running event loop, and keep it until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def wait(self) -> None:
        """Return once every task running now has ended (their errors are logged, not raised)."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)

    async def cancel(self) -> None:
        """Cancel every task running now and return once they have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error("%s: a background task failed: %r", self.name, error, exc_info=error)

    def __repr__(self) -> str:
        return f"<TaskSet {self.name!r} {len(self._tasks)} running>"
