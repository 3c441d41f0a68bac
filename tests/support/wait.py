"""Waiting in tests: on a condition, with a deadline and a message naming what never came."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

__all__ = ["settle", "until"]


async def until(
    condition: Callable[[], object], what: str, *, timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` is true, or fail the test after ``timeout`` seconds naming ``what``.

    ``condition`` may return an awaitable (an ``async`` check), which is awaited. It is polled every
    ``interval`` seconds of the event loop's (real) clock; ``interval=0`` only yields to the loop
    between checks, for conditions that other tasks or a worker thread fulfil, so the wait never
    sleeps longer than the work takes. A test on a :class:`~brownout.testing.FakeClock` moves its
    fake time itself; this deadline is there only to turn a hang into a failure.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            # An async check is held to the same deadline: one that never returns (a request to an
            # app whose handler hangs, say) fails naming what it waited for, not at the suite's timeout.
            try:
                value = await asyncio.wait_for(value, max(0.0, end - loop.time()) + interval)
            except TimeoutError:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what} (the check itself never returned)"
                ) from None
        if value:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def settle(yields: int = 10) -> None:
    """Let every ready task run: yield to the event loop ``yields`` times (no time passes)."""
    for _ in range(yields):
        await asyncio.sleep(0)
