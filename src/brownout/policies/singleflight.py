"""Request coalescing: concurrent callers for one key share one computation.

When a popular cache key expires and a thousand requests arrive at once, only one of them should run
the model; the rest wait for its answer (this prevents a "cache stampede")::

    flight: Singleflight[str, Prediction] = Singleflight("predict")
    prediction = await flight.do(key, lambda: model.predict(features))

The computation runs in a task of its own, not in any caller's task, and every caller -- the first
one included -- waits on a future of its own that the computation's completion resolves (one done
callback relays the outcome to all waiters, cheaper than a :func:`asyncio.shield` per waiter). So a
caller that is cancelled (its client went away, its deadline passed) stops waiting without
cancelling the computation, and the other callers still get the result. On Python 3.12 and newer
the computation's task starts eagerly, within the first caller's step, so it is not queued behind
the other callers that arrived in the same instant. Even when every caller has gone the computation
runs to completion: its work is usually what fills a cache (see :class:`brownout.policies.cache.Cache`),
and throwing it away would only make the next caller start it again.

The result -- value or exception -- is shared by everyone who waited; nothing is remembered once the
computation finishes, so the next call computes again. Caching results is the cache's job.

A failure reaches every waiter (none is left hanging on a future that is never resolved), and an
exception nobody waited for is retrieved, so asyncio does not log "Task exception was never
retrieved".
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Singleflight", "SingleflightStats"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class SingleflightStats:
    """Counters of a :class:`Singleflight` since it was made.

    ``calls`` = ``computations`` + ``coalesced``: every call either started a computation or joined
    one that was already running.
    """

    calls: int
    computations: int
    coalesced: int


class Singleflight(Generic[K, V]):
    """Coalesces concurrent calls per key into one computation whose result or error they share."""

    __slots__ = ("_calls", "_coalesced", "_computations", "_flights", "_waiters", "name")

    def __init__(self, name: str = "singleflight") -> None:
        self.name = name
        """Names this instance in reprs and logs."""
        self._flights: dict[K, asyncio.Future[V]] = {}
        self._waiters: dict[asyncio.Future[V], list[asyncio.Future[V]]] = {}
        self._calls = 0
        self._computations = 0
        self._coalesced = 0

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """Return ``await fn()``, sharing one run of it among all concurrent callers for ``key``.

        Only the first caller's ``fn`` is called; later callers join its computation until it
        finishes. Cancelling a caller cancels only its wait, never the computation.
        """
        self._calls += 1
        flight = self._flights.get(key)
        # A finished flight whose done callback has not run yet must not answer a new call: "the
        # next call after a computation finishes computes again" holds without a window.
        if flight is None or flight.done():
            flight = self._launch(key, fn)
        else:
            self._coalesced += 1
        waiter: asyncio.Future[V] = flight.get_loop().create_future()
        self._waiters[flight].append(waiter)
        return await waiter

    def start(self, key: K, fn: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        """Start the computation for ``key`` (or join the running one) without waiting for it.

        Returns the computation's task. Background work uses this: the caller keeps the task to
        cancel it on shutdown. Cancelling the task cancels the computation for every waiter.
        """
        self._calls += 1
        flight = self._flights.get(key)
        if flight is None or flight.done():
            return self._launch(key, fn)
        self._coalesced += 1
        return flight

    def _launch(self, key: K, fn: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        flight = _start(fn())
        self._flights[key] = flight
        self._waiters[flight] = []
        self._computations += 1
        flight.add_done_callback(functools.partial(self._landed, key))
        return flight

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        # forget() may have replaced this flight with a newer one; remove only our own.
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiters = self._waiters.pop(flight, ())
        if flight.cancelled():
            for waiter in waiters:
                waiter.cancel()
            return
        # Retrieving the exception also marks it retrieved: a computation begun with start() may have
        # no waiter at all, and asyncio would log "Task exception was never retrieved".
        error = flight.exception()
        if error is not None:
            for waiter in waiters:
                if not waiter.done():  # a cancelled waiter is done already
                    waiter.set_exception(error)
        else:
            value = flight.result()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(value)

    def forget(self, key: K) -> bool:
        """Detach the running computation for ``key``; the next caller starts a new one.

        Callers already waiting keep waiting for the old computation, which runs on. Use it when
        that computation is known to answer from out-of-date input. Returns whether one was running.
        """
        return self._flights.pop(key, None) is not None

    def __contains__(self, key: K) -> bool:
        """Whether a computation for ``key`` is running."""
        flight = self._flights.get(key)
        return flight is not None and not flight.done()

    @property
    def in_flight(self) -> int:
        """How many keys have a computation running."""
        return sum(1 for flight in self._flights.values() if not flight.done())

    @property
    def stats(self) -> SingleflightStats:
        """A snapshot of the counters."""
        return SingleflightStats(self._calls, self._computations, self._coalesced)

    def __repr__(self) -> str:
        return f"Singleflight({self.name!r}, in_flight={self.in_flight})"


def _start(aw: Awaitable[V]) -> asyncio.Future[V]:
    """Start ``aw`` as a task, eagerly where the interpreter can (3.12+: no wait in the ready queue)."""
    if sys.version_info >= (3, 12) and asyncio.iscoroutine(aw):
        loop = asyncio.get_running_loop()
        return asyncio.Task(aw, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    return asyncio.ensure_future(aw)
