"""Time as a dependency.

Every time-based policy in brownout reads time and waits through a :class:`Clock` it is given, never
through :func:`time.monotonic` or :func:`asyncio.sleep` directly. Production code uses
:data:`SYSTEM_CLOCK`; tests pass :class:`brownout.testing.FakeClock` and move time by hand, so no unit
test sleeps for real.

A clock has three operations:

* ``now()`` -- monotonic seconds as a float (only differences are meaningful);
* ``await sleep(seconds)`` -- wait that long in clock time;
* ``call_later(delay, callback)`` -- run ``callback`` after ``delay`` seconds of clock time, returning a
  handle with ``cancel()``. Deadlines use this to enforce themselves without a timer per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "WALL_CLOCK", "Clock", "SystemClock", "TimerHandle", "WallClock"]


@runtime_checkable
class TimerHandle(Protocol):
    """What :meth:`Clock.call_later` returns: something that can be cancelled."""

    def cancel(self) -> None:
        """Cancel the callback if it has not run yet."""


@runtime_checkable
class Clock(Protocol):
    """The time source every time-based policy takes."""

    def now(self) -> float:
        """Monotonic time in seconds."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback`` after ``delay`` seconds of this clock's time (needs a running loop)."""


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`asyncio.sleep` and the event loop's timers.

    ``now`` is bound straight to the C function rather than wrapped in a Python method, because it is
    read on the hot path of every breaker and cache call.
    """

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the running event loop."""
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        """Schedule on the running event loop."""
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()
"""The process-wide real clock; the default for every policy."""


class WallClock(SystemClock):
    """The real clock on wall time (:func:`time.time`): for state that several processes -- possibly
    on several machines -- compare, such as a breaker's open-until time kept in Redis. Monotonic time
    means nothing outside its own machine's boot; NTP-synchronised wall clocks agree to milliseconds."""

    now = staticmethod(time.time)

    def __repr__(self) -> str:
        return "WallClock()"


WALL_CLOCK: Clock = WallClock()
"""The process-wide wall clock; the default of state shared across replicas."""
