"""Choosing an endpoint: which of several replicas of a service gets the next call.

Each endpoint keeps an :class:`EndpointLoad` -- its calls in flight, a moving average of its recent
latency and, optionally, the :class:`~brownout.policies.limiter.AdaptiveLimiter` that guards its
slots -- and :func:`pick` chooses among the endpoints that may take a call now::

    class Replica:
        def __init__(self, url: str) -> None:
            self.url = url
            self.breaker = CircuitBreaker(url)
            self.load = EndpointLoad()

        @property
        def available(self) -> bool:
            return self.breaker.available

    replica = pick(replicas, tried)           # None when no replica is available
    replica.load.begin()
    try:
        answer = await send(replica)
    finally:
        replica.load.end()
    replica.load.observe(elapsed)

The rule
--------

Among the available endpoints (those whose ``available`` is true), the one that sorts first by:

1. **not tried yet** in this request -- a retry goes to another endpoint while there is one; an
   endpoint already tried is chosen again only when every untried one is unavailable;
2. **the shortest wait for a slot**, :meth:`AdaptiveLimiter.estimated_wait` (0 without a limiter, and
   0 while a slot is free) -- so an endpoint with a free slot comes before one without;
3. **the least expected latency**, ``(in_flight + 1) * latency average`` -- the time the call would
   take if the endpoint worked through its calls one after another;
4. **the fewest calls in flight**, then **the order given**.

Why this order. The wait for a slot comes first because it is time in *our* queue, before anything is
sent: a limiter with no free slot was adapted to what its server can run, and one more call there
only waits, however fast the server answers once it starts.
Among endpoints that can start the call now, the expected latency is the classic "least expected
latency" rule: fewest-in-flight alone would give a replica three times slower the same share of the
calls, and lowest-latency alone would send a burst of calls all to the one replica that was fastest
a moment ago. Their product keeps what each gets right -- among replicas of equal speed it is fewest
in flight, among idle ones it is fastest first -- and a slower replica still gets calls once the
faster one has enough in flight. It overstates the latency of a server that runs calls in parallel,
but it overstates it alike for every replica, and only the order matters here.

An endpoint that has not answered yet has no latency average: it counts as the fastest, so a new
replica gets tried (and measured) rather than left idle because the others are known.
Among endpoints that tie -- all unknown, or equally fast and loaded -- the fewest in flight wins,
so calls picked at the same moment spread over them; only then does the order given decide.

What counts as "in flight": with a limiter, its permits held -- a call counts from the moment it has
its slot, so calls picked together spread even when something is awaited between the pick and the
send; without one, the calls counted by :meth:`EndpointLoad.begin` and :meth:`EndpointLoad.end`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Container, Iterable
from typing import Final, Protocol, TypeVar

from brownout.errors import ConfigError
from brownout.policies.limiter import AdaptiveLimiter

__all__ = ["LATENCY_ALPHA", "RECENT_LATENCIES", "Balanced", "EndpointLoad", "pick"]

LATENCY_ALPHA: Final = 0.3
"""Weight of the newest answer in the latency average: about the last five answers matter."""

RECENT_LATENCIES: Final = 32
"""Latencies an :class:`EndpointLoad` keeps for :meth:`EndpointLoad.quantile`: a few minutes of a
busy language model's answers."""


class EndpointLoad:
    """What :func:`pick` knows of one endpoint: its calls in flight, latency average and limiter.

    ``limiter``: the endpoint's concurrency limiter, if it has one; its expected wait for a slot (for
    a call of ``priority``, when the limiter is shared by calls of several priorities) ranks the
    endpoint first, and its permits held are the calls in flight. ``alpha``: the weight of the newest
    answer in the latency average (default :data:`LATENCY_ALPHA`).
    """

    __slots__ = ("_calls", "_recent", "_sorted", "alpha", "ewma", "limiter", "priority")

    def __init__(
        self, limiter: AdaptiveLimiter | None = None, *, alpha: float = LATENCY_ALPHA, priority: int = 0
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ConfigError("alpha", f"must be in (0, 1], got {alpha!r}")
        self.limiter = limiter
        """The endpoint's concurrency limiter, or None."""
        self.priority = priority
        """The priority its owner's calls wait for a permit in (lower first)."""
        self.alpha = alpha
        """Weight of the newest answer in :attr:`ewma`."""
        self.ewma: float | None = None
        """The latency average in seconds (None until the first answer)."""
        self._calls = 0
        self._recent: deque[float] = deque(maxlen=RECENT_LATENCIES)
        # The recent latencies in order, kept until the next answer: every request asks for a quantile
        # (its plan), and answers are far fewer than requests.
        self._sorted: list[float] | None = None

    @property
    def in_flight(self) -> int:
        """Calls on the endpoint now: the limiter's permits held, or those counted by :meth:`begin`."""
        limiter = self.limiter
        return self._calls if limiter is None else limiter.in_flight

    def begin(self) -> None:
        """Count one more call in flight (without a limiter; with one, its permits are the count)."""
        self._calls += 1

    def end(self) -> None:
        """Count one call fewer in flight (the pair of :meth:`begin`)."""
        self._calls -= 1

    def observe(self, seconds: float) -> None:
        """Fold one answer's latency into the average (a timed-out call's time counts too: the
        endpoint was that slow)."""
        ewma = self.ewma
        self.ewma = seconds if ewma is None else ewma + self.alpha * (seconds - ewma)
        self._recent.append(seconds)
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the last :data:`RECENT_LATENCIES` latencies
        (None until the first answer): how long a call takes in the tail, where the average says how
        long it takes in the middle."""
        recent = self._sorted
        if recent is None:
            recent = self._sorted = sorted(self._recent)
        if not recent:
            return None
        return recent[min(len(recent) - 1, max(0, math.ceil(q * len(recent)) - 1))]

    def rank(self, tried: bool = False) -> tuple[bool, float, float, int]:
        """The endpoint's place in :func:`pick`'s order, lower first: ``(tried, wait for a slot,
        expected latency, in flight)`` (see the module docstring)."""
        limiter = self.limiter
        if limiter is None:
            in_flight, wait = self._calls, 0.0
        else:
            in_flight, wait = limiter.in_flight, limiter.estimated_wait(priority=self.priority)
        ewma = self.ewma
        # No answer yet: counts as the fastest, so the endpoint gets tried.
        return tried, wait, 0.0 if ewma is None else (in_flight + 1) * ewma, in_flight

    def __repr__(self) -> str:
        latency = "unknown" if self.ewma is None else f"{self.ewma:.3g}s"
        return f"EndpointLoad(in_flight={self.in_flight}, latency={latency})"


class Balanced(Protocol):
    """An endpoint :func:`pick` can choose: its load, and whether it may take a call now (typically
    its circuit breaker's ``available``)."""

    @property
    def load(self) -> EndpointLoad:
        """The endpoint's load statistics."""
        ...

    @property
    def available(self) -> bool:
        """True when the endpoint may take a call now."""
        ...


B = TypeVar("B", bound=Balanced)


def pick(endpoints: Iterable[B], tried: Container[B] | None = None) -> B | None:
    """The available endpoint for the next call, by the rule of the module docstring; None when none
    is available.

    ``tried``: the endpoints this request already tried; one of them is chosen only when no untried
    endpoint is available.
    """
    best: B | None = None
    best_key: tuple[bool, float, float, int] | None = None
    for ep in endpoints:
        if not ep.available:
            continue
        key = ep.load.rank(tried is not None and ep in tried)
        if best_key is None or key < best_key:
            best, best_key = ep, key
    return best
