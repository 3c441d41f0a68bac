"""Retries with capped exponential backoff, full jitter, retry budgets and deadline awareness.

One engine, two forms::

    retry = Retry("model", RetryConfig(max_attempts=3, backoff_base=1.0))

    answer = await retry.call(client.complete, prompt)       # or @retry above an async def

    async for attempt in retry.attempts():                   # stamina-style block form
        with attempt:
            answer = await client.complete(prompt)

After a failed attempt the retry waits ``min(backoff_max, backoff_base * backoff_multiplier**(n-1))``
seconds (computed by :func:`capped_exponential`, so no number of attempts can overflow it) -- a
uniformly random fraction of it with ``jitter="full"`` (AWS's "full jitter", which spreads a crowd of
retrying clients best) -- and tries again, unless one of these says stop:

* the attempts are used up (``"attempts exhausted"``);
* the error carries a ``retry_after`` hint longer than ``max_retry_after`` (``"retry_after too long"``);
  a shorter hint is honoured: the wait is at least the hint;
* the wait would reach past the caller's deadline (:func:`brownout.policies.deadline.remaining`), so
  sleeping is pointless (``"deadline"``);
* the :class:`RetryBudget` is spent (``"retry budget exhausted"``): retries are limited to a fraction
  of recent calls, as in Envoy, Finagle and the Google SRE book, so that a failing dependency sees at
  most ``1 + ratio`` times its normal load instead of ``max_attempts`` times.

Giving up re-raises the *last* error unchanged, with a note saying why the retry stopped; errors the
config does not name as retriable, and ``BaseException`` s that are not ``Exception`` s (cancellation,
``KeyboardInterrupt``), pass through at once with no note. Each attempt calls the function again --
it never re-examines the same failed output, which would fail the same way every time.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus, RetryAttempted, RetryGaveUp
from brownout.policies._base import CallForms, PolicyConfig
from brownout.policies.deadline import remaining

__all__ = [
    "GIVE_UP_REASONS",
    "Attempt",
    "Retry",
    "RetryBudget",
    "RetryConfig",
    "RetryStats",
    "capped_exponential",
]


# Past this exponent every multiplier but 1 has long saturated (to 0, or to any cap a float can hold).
_HUGE_EXPONENT: Final = 1e300


def capped_exponential(base: float, multiplier: float, exponent: float, cap: float) -> float:
    """``min(cap, base * multiplier ** exponent)``, computed so that it never overflows.

    Exponential backoff is at its most dangerous in the longest outages: after about a thousand failed
    attempts ``2.0 ** n`` no longer fits in a float and Python raises :class:`OverflowError` (and
    ``2 ** n`` on ints stays exact but grows without bound, slower with every failure), killing or
    stalling whatever loop was backing off -- exactly when it matters that the loop keeps trying. Here
    the cap is applied in the exponent's domain first: once ``exponent`` is a whole step past
    ``log(cap / base) / log(multiplier)`` the answer is ``cap`` without computing the power, so any
    exponent, however large (an ``int`` past the float range included), returns ``cap`` at once.
    Below that point the result is exactly ``min(cap, base * multiplier ** exponent)`` as floats compute
    it. Every exponential backoff in brownout goes through this one function.

    ``base`` and ``cap`` are seconds ``>= 0`` (``cap`` may be ``math.inf``: the result then grows until
    it is ``inf``), ``multiplier`` is ``>= 0`` (below 1 the result shrinks towards 0), and a negative
    ``exponent`` counts as ``0``. Raises :class:`ValueError` for a negative or NaN ``base``,
    ``multiplier`` or ``cap`` and a NaN ``exponent``: a wait computed from those would be meaningless,
    and a silent ``nan`` would make the caller sleep for no time at all.
    """
    # ``not x >= 0`` is also true for NaN; ``exponent != exponent`` is NaN's test that also takes ints
    # too large for a float (math.isnan would raise OverflowError on those).
    if not (base >= 0.0 and multiplier >= 0.0 and cap >= 0.0) or exponent != exponent:
        raise ValueError(
            "capped_exponential needs base, multiplier and cap >= 0 and a numeric exponent; got "
            f"base={base!r}, multiplier={multiplier!r}, exponent={exponent!r}, cap={cap!r}"
        )
    if exponent <= 0 or base == 0.0 or multiplier == 1.0:
        return float(min(cap, base))
    if base == math.inf or (base >= cap and multiplier > 1.0):
        return float(cap)  # (an infinite base would make ``inf * 0.0`` a NaN below when multiplier < 1)
    # Past ~1e300 every multiplier other than 1 has saturated (to 0, or past the cap), and clamping
    # keeps a huge int exponent from overflowing its conversion to float.
    power = float(exponent) if exponent < _HUGE_EXPONENT else _HUGE_EXPONENT
    if multiplier > 1.0 and cap != math.inf:
        # log(cap / base) is inf when the ratio overflows; then the power below decides (and saturates).
        reaches_cap = math.log(cap / base) / math.log(multiplier)
        # A margin of one whole step (and a relative one for multipliers a hair above 1), so float error
        # in the logarithms never returns the cap where the formula itself stays below it.
        if power >= reaches_cap * (1.0 + 1e-9) + 1.0:
            return float(cap)
    try:
        return min(float(cap), base * float(multiplier**power))
    except OverflowError:  # multiplier ** power beyond the float range: far past any finite cap
        return float(cap)


GIVE_UP_REASONS: Final = (
    "attempts exhausted",
    "retry budget exhausted",
    "deadline",
    "retry_after too long",
)
"""Every reason a :class:`Retry` gives up for, as used in notes, events and :class:`RetryStats`."""

# A retry needs a whole token of budget; the epsilon absorbs float error (0.29 * 100 == 28.999999999999996).
_EPSILON = 1e-9


class RetryConfig(PolicyConfig):
    """Config of a :class:`Retry`; by default 3 attempts with a 1 s backoff base."""

    max_attempts: int = Field(default=3, ge=1, description="attempts in all, the first one included")
    backoff_base: float = Field(default=1.0, ge=0, description="seconds of backoff before the 2nd attempt")
    backoff_multiplier: float = Field(default=2.0, ge=1, description="growth of the backoff per attempt")
    backoff_max: float = Field(default=30.0, ge=0, description="cap on one backoff, in seconds")
    jitter: Literal["full", "none"] = Field(
        default="full", description='"full": wait uniform(0, backoff); "none": wait exactly the backoff'
    )
    retry_on: tuple[type[BaseException], ...] = Field(
        default=(Exception,), description="exception types worth another attempt"
    )
    retry_if: Callable[[BaseException], bool] | None = Field(
        default=None, description="extra predicate on the error; both it and retry_on must accept"
    )
    max_retry_after: float = Field(
        default=60.0, ge=0, description="give up at once if the error asks to wait longer than this"
    )
    budget_ratio: float | None = Field(
        default=0.2, ge=0, le=1, description="retries allowed per recent call; None disables the budget"
    )
    budget_min_per_second: float = Field(
        default=10.0, ge=0, description="retries per second always allowed, however few the calls"
    )
    budget_window: float = Field(default=10.0, gt=0, description="seconds of history the budget counts")

    @field_validator("retry_on", mode="before")
    @classmethod
    def _one_type_is_a_tuple(cls, value: object) -> object:
        # ``retry_on=TimeoutError`` reads naturally; accept it as a one-element tuple.
        return (value,) if isinstance(value, type) else value

    @field_validator("retry_on")
    @classmethod
    def _not_empty(cls, value: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
        if not value:
            raise ValueError("must name at least one exception type (a retry that never retries is a bug)")
        return value


class RetryBudget:
    """Limits retries to a fraction of recent calls, so retries cannot multiply the load on a dependency.

    A retry may proceed while ``retries + 1 <= ratio * calls + min_per_second * window`` over the last
    ``window`` seconds of clock time. Calls and retries are counted per whole second of clock time in
    a fixed ring of buckets (``window`` rounded up to whole seconds): :meth:`record_call` is one clock
    read, one comparison and one increment, and allocates nothing. One budget may be shared by
    several :class:`Retry` objects (say, every retry in front of the same model server).
    """

    __slots__ = (
        "_calls",
        "_cur_calls",
        "_cur_retries",
        "_cur_sec",
        "_n",
        "_next",
        "_now",
        "_reserve",
        "_retries",
        "_stamps",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError("ratio", f"must be between 0 and 1, got {ratio!r}")
        if not min_per_second >= 0.0:
            raise ConfigError("min_per_second", f"must be >= 0, got {min_per_second!r}")
        if not window > 0.0:
            raise ConfigError("window", f"must be > 0, got {window!r}")
        self.ratio = float(ratio)
        """Retries allowed per call in the window."""
        self.min_per_second = float(min_per_second)
        """Retries per second allowed regardless of the call count (lets a quiet service still retry)."""
        self.window = float(window)
        """Seconds of history counted."""
        self._reserve = self.min_per_second * self.window
        self._now = clock.now
        self._n = max(1, math.ceil(self.window))
        # The current second is counted in plain slots (the hot path touches nothing else) and moved
        # into the ring when the clock enters a later second. ``_next`` is when that happens.
        self._cur_sec = math.floor(self._now())
        self._next = float(self._cur_sec + 1)
        self._cur_calls = 0
        self._cur_retries = 0
        # The ring: past seconds' counts, each bucket tagged with the second it counts.
        self._stamps = [-(1 << 62)] * self._n
        self._calls = [0] * self._n
        self._retries = [0] * self._n

    def record_call(self) -> None:
        """Count one logical call (not each attempt)."""
        if self._now() >= self._next:
            self._roll()
        self._cur_calls += 1

    def _roll(self) -> None:
        """Move the current second's counts into the ring and start counting the clock's second."""
        sec = math.floor(self._now())
        if sec <= self._cur_sec:  # pragma: no cover - a clock that went backwards; keep counting
            return
        i = self._cur_sec % self._n
        self._stamps[i] = self._cur_sec
        self._calls[i] = self._cur_calls
        self._retries[i] = self._cur_retries
        self._cur_sec = sec
        self._next = float(sec + 1)
        self._cur_calls = 0
        self._cur_retries = 0

    def _totals(self) -> tuple[int, int]:
        """Calls and retries in the window, the current second included."""
        if self._now() >= self._next:
            self._roll()
        sec = self._cur_sec
        oldest = sec - self._n
        calls = self._cur_calls
        retries = self._cur_retries
        for i, stamp in enumerate(self._stamps):
            if oldest < stamp < sec:
                calls += self._calls[i]
                retries += self._retries[i]
        return calls, retries

    def try_spend(self) -> bool:
        """Count one retry and return True if the budget allows it; return False (counting nothing) if not."""
        calls, retries = self._totals()
        if retries + 1 > self.ratio * calls + self._reserve + _EPSILON:
            return False
        self._cur_retries += 1
        return True

    @property
    def available(self) -> int:
        """How many retries the budget would allow right now."""
        calls, retries = self._totals()
        return max(0, math.floor(self.ratio * calls + self._reserve + _EPSILON) - retries)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio!r}, min_per_second={self.min_per_second!r}, "
            f"window={self.window!r}, available={self.available})"
        )


@dataclass(frozen=True, slots=True)
class RetryStats:
    """Counters of a :class:`Retry` since it was made.

    ``calls`` counts logical calls (each ``call()`` or ``attempts()`` loop once), ``retries`` the
    attempts after the first, ``gave_up`` the calls that failed retriably and stopped, by reason (every
    reason of :data:`GIVE_UP_REASONS` is present).
    """

    calls: int
    retries: int
    gave_up: dict[str, int]


class Retry(CallForms):
    """Runs a call again after retriable failures, with backoff, a retry budget and deadline awareness.

    Forms: ``await retry.call(fn, *args)``, ``@retry`` / ``retry.wrap(fn)``, and
    ``async for attempt in retry.attempts(): with attempt: ...``. All share one decision engine.
    """

    __slots__ = (
        "_backoff_base",
        "_backoff_max",
        "_budget",
        "_calls",
        "_clock",
        "_events",
        "_full_jitter",
        "_gave_up",
        "_max_attempts",
        "_max_retry_after",
        "_multiplier",
        "_random",
        "_retries",
        "_retry_if",
        "_retry_on",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "retry",
        config: RetryConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        budget: RetryBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        """Names this retry in notes, events and reprs."""
        self.config = config if config is not None else RetryConfig()
        """The validated config."""
        cfg = self.config
        self._clock = clock
        self._events = events
        if budget is None and cfg.budget_ratio is not None:
            budget = RetryBudget(cfg.budget_ratio, cfg.budget_min_per_second, cfg.budget_window, clock=clock)
        self._budget = budget
        self._random: Callable[[], float] = rng.random if rng is not None else random.random
        # Config values copied to slots: the failure path reads them on every attempt.
        self._max_attempts = cfg.max_attempts
        self._backoff_base = cfg.backoff_base
        self._multiplier = cfg.backoff_multiplier
        self._backoff_max = cfg.backoff_max
        self._full_jitter = cfg.jitter == "full"
        self._retry_on = cfg.retry_on
        self._retry_if = cfg.retry_if
        self._max_retry_after = cfg.max_retry_after
        self._calls = 0
        self._retries = 0
        self._gave_up = dict.fromkeys(GIVE_UP_REASONS, 0)

    @property
    def budget(self) -> RetryBudget | None:
        """The retry budget in force (shared or this retry's own), or None when disabled."""
        return self._budget

    @property
    def stats(self) -> RetryStats:
        """A snapshot of this retry's counters."""
        return RetryStats(self._calls, self._retries, dict(self._gave_up))

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Return ``await fn(*args, **kwargs)``, trying again after retriable failures.

        Raises the last error (with a note saying why the retry stopped) when it gives up, and
        non-retriable errors at once.
        """
        self._calls += 1
        budget = self._budget
        if budget is not None:
            budget.record_call()
        attempt = 1
        while True:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                delay = self._after_failure(exc, attempt)
                if delay is None:
                    raise
            await self._clock.sleep(delay)
            attempt += 1

    def attempts(self) -> AsyncIterator[Attempt]:
        """Iterate over attempts: ``async for attempt in retry.attempts(): with attempt: ...``.

        ``with attempt:`` swallows a retriable error when another attempt will follow (the loop then
        waits the backoff and yields the next attempt) and lets it propagate, noted, when the retry
        gives up. A block that finishes without error ends the loop.
        """
        return _Attempts(self)

    def _after_failure(self, exc: Exception, attempt: int) -> float | None:
        """The engine: decide what follows failed attempt number ``attempt``.

        Returns the seconds to wait before the next attempt (having counted the retry and spent the
        budget), or None when the error must propagate -- either it is not retriable, or the retry
        gives up, in which case the note is already on ``exc``.
        """
        if not isinstance(exc, self._retry_on):
            return None
        retry_if = self._retry_if
        if retry_if is not None and not retry_if(exc):
            return None
        delay = 0.0
        if attempt >= self._max_attempts:
            reason = "attempts exhausted"
        else:
            hint = _retry_after(exc)
            if hint is not None and hint > self._max_retry_after:
                reason = "retry_after too long"
            else:
                delay = self._backoff(attempt)
                if hint is not None and hint > delay:
                    delay = hint
                left = remaining()
                budget = self._budget
                # Waiting until (or past) the deadline cannot help: the next attempt would have no time.
                if left is not None and delay >= left:
                    reason = "deadline"
                # The budget is asked last, so a retry refused for another reason spends nothing.
                elif budget is not None and not budget.try_spend():
                    reason = "retry budget exhausted"
                else:
                    self._retries += 1
                    if self._events.active:
                        self._events.emit(
                            RetryAttempted(self.name, self._clock.now(), attempt + 1, delay, _describe(exc))
                        )
                    return delay
        self._gave_up[reason] += 1
        exc.add_note(f"brownout retry {self.name!r} gave up after {attempt} attempts: {reason}")
        if self._events.active:
            self._events.emit(RetryGaveUp(self.name, self._clock.now(), attempt, reason, _describe(exc)))
        return None

    def _backoff(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based), capped and jittered."""
        ceiling = capped_exponential(self._backoff_base, self._multiplier, attempt - 1, self._backoff_max)
        if self._full_jitter:
            return ceiling * self._random()
        return ceiling

    def __repr__(self) -> str:
        return f"Retry({self.name!r}, max_attempts={self._max_attempts}, budget={self._budget!r})"


class Attempt:
    """One attempt of an :meth:`Retry.attempts` loop; guard its work with ``with attempt:``."""

    __slots__ = ("_run", "number")

    def __init__(self, run: _Attempts, number: int) -> None:
        self._run = run
        self.number = number
        """The attempt number, 1 for the first."""

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # Only Exceptions are retried; cancellation and other BaseExceptions always propagate.
        if not isinstance(exc, Exception):
            return False
        delay = self._run._retry._after_failure(exc, self.number)
        if delay is None:
            return False
        self._run._delay = delay
        return True

    def __repr__(self) -> str:
        return f"Attempt(number={self.number})"


class _Attempts:
    """The async iterator behind :meth:`Retry.attempts` (one per loop)."""

    __slots__ = ("_delay", "_number", "_retry")

    def __init__(self, retry: Retry) -> None:
        self._retry = retry
        self._number = 0
        # Set by Attempt.__exit__ when a failure is to be retried; None means stop after this attempt.
        self._delay: float | None = None

    def __aiter__(self) -> _Attempts:
        return self

    async def __anext__(self) -> Attempt:
        retry = self._retry
        if self._number == 0:
            retry._calls += 1
            if retry._budget is not None:
                retry._budget.record_call()
        else:
            delay = self._delay
            if delay is None:
                # The last attempt succeeded (or was not used): the loop is over.
                raise StopAsyncIteration
            self._delay = None
            await retry._clock.sleep(delay)
        self._number += 1
        return Attempt(self, self._number)


def _retry_after(exc: BaseException) -> float | None:
    """The error's own ``retry_after`` hint in seconds (Rejected and friends carry one), if numeric."""
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, bool) or not isinstance(hint, int | float) or math.isnan(hint):
        return None
    return max(0.0, float(hint))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
