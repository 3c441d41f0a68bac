"""Helpers for testing code that uses brownout, chiefly :class:`FakeClock`.

``FakeClock`` is a :class:`brownout.clock.Clock` whose time moves only when told to, in the spirit of
resilience4j's mocked ``Clock`` and Trio's ``MockClock``::

    clock = FakeClock()
    breaker = CircuitBreaker("model", clock=clock)
    ...
    clock.advance(60)          # the breaker's open wait is over, without waiting a minute

Code that *sleeps* on the clock (retries, sweepers, queue timeouts) waits for fake time too. Either
move time by hand with ``await clock.run(seconds)``, which fires each timer in order and lets the
woken tasks run, or build the clock with ``autojump=True`` so that any ``sleep`` returns at once after
moving time forward by the requested amount (handy for sequential code such as a retry loop).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

__all__ = ["FakeClock", "FakeTimer"]


class FakeTimer:
    """A callback scheduled on a :class:`FakeClock`."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback."""
        self.cancelled = True


class FakeClock:
    """A clock for tests whose time moves only through :meth:`advance`, :meth:`run` or autojump."""

    def __init__(self, start: float = 1000.0, *, autojump: bool = False) -> None:
        self._now = float(start)
        self.autojump = autojump
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()
        self.sleeps: list[float] = []
        """Every duration passed to :meth:`sleep`, in order (tests assert backoff schedules on it)."""

    def now(self) -> float:
        """The fake current time."""
        return self._now

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        """Run ``callback`` once fake time has moved ``delay`` seconds forward."""
        timer = FakeTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of fake time (returns at once, after moving time, when autojumping)."""
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        if self.autojump:
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every timer that falls due, in order.

        Timer callbacks run synchronously; tasks they wake run at the caller's next ``await``.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not timer.cancelled:
                timer.callback()
        self._now = target

    async def run(self, seconds: float, *, step_yields: int = 5) -> None:
        """Move time forward by ``seconds``, stopping at each due timer to let woken tasks run.

        Use this when tasks sleep in chains (sleep, work, sleep again): each wake-up gets the loop
        before time moves on.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        target = self._now + seconds
        await _settle(step_yields)
        while self._timers and self._timers[0][0] <= target:
            self.advance(max(0.0, self._timers[0][0] - self._now))
            await _settle(step_yields)
        self.advance(max(0.0, target - self._now))
        await _settle(step_yields)

    @property
    def pending_timers(self) -> int:
        """How many scheduled callbacks have neither run nor been cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, autojump={self.autojump!r})"


async def _settle(yields: int) -> None:
    for _ in range(yields):
        await asyncio.sleep(0)
