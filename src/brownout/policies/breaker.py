"""The circuit breaker.

A breaker watches the outcomes of calls to one dependency and stops calling it while it is failing,
so a dead model costs callers a fast :class:`~brownout.errors.CircuitOpen` (with ``retry_after``)
instead of a timeout, and the dependency gets room to recover.

States (``circuit_breaker_state`` metric value in brackets):

* ``closed`` [0] -- calls run; outcomes go into a sliding window (the last N calls, or the last N
  seconds). Once the window holds at least ``minimum_calls`` outcomes, the breaker opens when the
  failure rate reaches ``failure_rate_threshold`` or the slow-call rate reaches
  ``slow_call_rate_threshold``.
* ``open`` [1] -- calls are rejected until ``open_wait`` has passed (longer on repeated opens when
  ``open_wait_multiplier`` > 1), then the breaker is half-open.
* ``half_open`` [2] -- at most ``half_open_max_calls`` probe calls run at a time; after
  ``success_threshold`` consecutive successful probes the breaker closes with a fresh window; any
  failed probe (or slow one, when slow calls are tracked) opens it again.
* ``forced_open`` [1], ``forced_closed`` [0], ``disabled`` [0] -- set by an operator and left only by
  :meth:`CircuitBreaker.reset`. Forced-closed runs every call and keeps recording (metrics only);
  disabled runs every call and records nothing.

A success does not reset the failure count (a breaker that did could never open under alternating
outcomes, and its "failure rate" would mean nothing): rates are computed over the whole window,
successes included. Exceptions count as failures when they match ``record_exceptions`` and
not ``ignore_exceptions`` (ignored ones count as neither); ``failure_result`` lets a *result* such as
an HTTP 503 response count as a failure while still being returned to the caller. A cancelled call is
never counted.

Outcomes of calls that started before a state change (a slow call from the closed era finishing while
the breaker is half-open) are discarded, so probes are judged only by probes.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar

from pydantic import Field, model_validator

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import CircuitOpen, ConfigError
from brownout.events import DEFAULT_BUS, BreakerStateChanged, CallRejected, EventBus
from brownout.policies._base import CallForms, EnteredGuards, PolicyConfig
from brownout.policies.retry import capped_exponential

__all__ = [
    "BreakerConfig",
    "BreakerGroupConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "open_wait",
]


P = ParamSpec("P")
T = TypeVar("T")


class BreakerState(enum.Enum):
    """The states of a circuit breaker. ``metric`` is the value of the ``circuit_breaker_state`` gauge."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"
    DISABLED = "disabled"

    @property
    def metric(self) -> int:
        """0 closed, 1 open, 2 half-open (forced states map to what they behave like)."""
        return _METRIC[self]


_METRIC = {
    BreakerState.CLOSED: 0,
    BreakerState.OPEN: 1,
    BreakerState.HALF_OPEN: 2,
    BreakerState.FORCED_OPEN: 1,
    BreakerState.FORCED_CLOSED: 0,
    BreakerState.DISABLED: 0,
}

_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


class BreakerConfig(PolicyConfig):
    """Settings of one circuit breaker; by default it opens at a 50 % failure rate and stays open 60 s."""

    failure_rate_threshold: float = Field(
        default=0.5, gt=0, le=1, description="failure rate (0..1] at which the breaker opens (default 0.5)"
    )
    slow_call_rate_threshold: float | None = Field(
        default=None, gt=0, le=1, description="slow-call rate (0..1] at which it opens; None: not tracked"
    )
    slow_call_duration: float = Field(default=60.0, gt=0, description="seconds above which a call is slow")
    window_type: Literal["count", "time"] = Field(
        default="count", description="'count': the last window_size calls; 'time': the last window_size s"
    )
    window_size: int = Field(default=100, ge=1, description="calls (count window) or seconds (time window)")
    minimum_calls: int = Field(
        default=10, ge=1, description="outcomes needed in the window before a rate counts"
    )
    half_open_max_calls: int = Field(
        default=3,
        ge=1,
        description="probe calls allowed at once while half-open (default 3)",
    )
    success_threshold: int = Field(
        default=5, ge=1, description="consecutive successful probes that close the breaker (default 5)"
    )
    open_wait: float = Field(default=60.0, gt=0, description="seconds to stay open before probing")
    open_wait_multiplier: float = Field(
        default=1.0, ge=1, description="open_wait grows by this factor on each re-open without a close"
    )
    open_wait_max: float | None = Field(
        default=None, gt=0, description="cap on the grown open wait, seconds (default: max(600, open_wait))"
    )
    half_open_retry_after: float = Field(
        default=1.0, ge=0, description="retry_after given when all half-open probe slots are busy"
    )
    record_exceptions: tuple[type[BaseException], ...] = Field(
        default=(Exception,), description="exceptions that count as failures"
    )
    ignore_exceptions: tuple[type[BaseException], ...] = Field(
        default=(), description="exceptions that count as neither success nor failure"
    )
    failure_result: Callable[[Any], bool] | None = Field(
        default=None, description="predicate on a returned value: True counts the call as a failure"
    )

    @model_validator(mode="after")
    def _check(self) -> BreakerConfig:
        if self.window_type == "count" and self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) cannot exceed window_size ({self.window_size}) "
                "for a count window: the failure rate would never count"
            )
        if self.open_wait_max is not None and self.open_wait_max < self.open_wait:
            raise ValueError(f"open_wait_max ({self.open_wait_max}) must be >= open_wait ({self.open_wait})")
        return self

    @property
    def open_wait_cap(self) -> float:
        """The longest open wait: ``open_wait_max``, or ``max(600, open_wait)`` when that is unset."""
        return self.open_wait_max if self.open_wait_max is not None else max(600.0, self.open_wait)


def open_wait(config: BreakerConfig, opens: int) -> float:
    """Seconds a breaker stays open on its ``opens``-th opening in a row (1 for the first).

    ``min(open_wait_cap, open_wait * open_wait_multiplier ** (opens - 1))``, computed by
    :func:`~brownout.policies.retry.capped_exponential`: a dependency that stays down for thousands of
    probe cycles keeps the breaker at the cap instead of overflowing it. A close (or
    :meth:`CircuitBreaker.reset`) starts the count again.
    """
    return capped_exponential(config.open_wait, config.open_wait_multiplier, opens - 1, config.open_wait_cap)


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of a breaker's window and counters."""

    name: str
    state: BreakerState
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    rejected: int
    opened: int
    retry_after: float


class _CountWindow:
    """Outcomes of the last ``size`` calls in a ring; each slot holds bit 0 = failed, bit 1 = slow."""

    __slots__ = ("calls", "failures", "i", "ring", "size", "slows")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.i = 0
        self.calls = 0
        self.failures = 0
        self.slows = 0

    def add(self, outcome: int, now: float) -> None:
        i = self.i
        old = self.ring[i]
        self.ring[i] = outcome
        self.i = i + 1 if i + 1 < self.size else 0
        if self.calls < self.size:
            self.calls += 1
        elif old:
            self.failures -= old & 1
            self.slows -= old >> 1
        if outcome:
            self.failures += outcome & 1
            self.slows += outcome >> 1

    def add_successes(self, k: int) -> None:
        """Record ``k`` plain successes at once (the hot path counts them and adds them lazily)."""
        if k >= self.size:
            self.ring = bytearray(self.size)
            self.calls = self.size
            self.failures = self.slows = 0
            return
        for _ in range(k):
            self.add(0, 0.0)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slows


class _TimeWindow:
    """Outcomes of the last ``size`` seconds, in one bucket per whole second of clock time."""

    __slots__ = ("b_calls", "b_fail", "b_slow", "calls", "failures", "head", "size", "slows")

    def __init__(self, size: int, now: float) -> None:
        self.size = size
        self.b_calls = [0] * size
        self.b_fail = [0] * size
        self.b_slow = [0] * size
        self.head = int(now)
        self.calls = 0
        self.failures = 0
        self.slows = 0

    def _roll(self, sec: int) -> None:
        # Empty every bucket between the last second written and ``sec``.
        size = self.size
        if sec - self.head >= size:
            self.b_calls = [0] * size
            self.b_fail = [0] * size
            self.b_slow = [0] * size
            self.calls = self.failures = self.slows = 0
        else:
            for s in range(self.head + 1, sec + 1):
                j = s % size
                self.calls -= self.b_calls[j]
                self.failures -= self.b_fail[j]
                self.slows -= self.b_slow[j]
                self.b_calls[j] = self.b_fail[j] = self.b_slow[j] = 0
        self.head = sec

    def add(self, outcome: int, now: float) -> None:
        sec = int(now)
        if sec > self.head:
            self._roll(sec)
        j = self.head % self.size
        self.b_calls[j] += 1
        self.calls += 1
        if outcome:
            f = outcome & 1
            s = outcome >> 1
            self.b_fail[j] += f
            self.b_slow[j] += s
            self.failures += f
            self.slows += s

    def totals(self, now: float) -> tuple[int, int, int]:
        sec = int(now)
        if sec > self.head:
            self._roll(sec)
        return self.calls, self.failures, self.slows


class _Guard:
    """The permit of one call made through ``async with breaker:`` or :meth:`CircuitBreaker.guard`."""

    __slots__ = ("_breaker", "_done", "_gen", "_start")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._done = False

    async def __aenter__(self) -> _Guard:
        b = self._breaker
        self._gen = b._acquire()
        self._start = b._clock.now() if b._timed else 0.0
        return self

    def record_result(self, result: Any) -> None:
        """Record a returned value now (applies ``failure_result``); the block's exit records nothing more."""
        b = self._breaker
        self._done = True
        elapsed = b._clock.now() - self._start if b._timed else 0.0
        b._on_result(self._gen, result, elapsed)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        self._done = True
        b = self._breaker
        elapsed = b._clock.now() - self._start if b._timed else 0.0
        if exc is None:
            b._on_success(self._gen, elapsed)
        else:
            b._on_error(self._gen, exc, elapsed)


_entered: EnteredGuards[_Guard] = EnteredGuards("brownout_breaker_entered")


class CircuitBreaker(CallForms):
    """A circuit breaker for one dependency; see the module docstring for the states.

    Forms: ``await breaker.call(fn, *args)``, ``@breaker`` on an ``async def``, ``breaker.wrap(fn)``,
    ``async with breaker:`` (exceptions count; use ``async with breaker.guard() as g:`` and
    ``g.record_result(value)`` when a returned value may be a failure).
    """

    __slots__ = (
        "_clock",
        "_consecutive_opens",
        "_events",
        "_failure_result",
        "_fast",
        "_fast_eligible",
        "_gen",
        "_half_open_in_flight",
        "_half_open_successes",
        "_ignore",
        "_open_until",
        "_opened",
        "_pending_ok",
        "_record",
        "_rejected",
        "_slow_after",
        "_state",
        "_timed",
        "_window",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str = "breaker",
        config: BreakerConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.name = name
        self.config = cfg = config or BreakerConfig()
        self._clock = clock
        self._events = events
        self._record = cfg.record_exceptions
        self._ignore = cfg.ignore_exceptions
        self._failure_result = cfg.failure_result
        tracks_slow = cfg.slow_call_rate_threshold is not None
        self._slow_after = cfg.slow_call_duration if tracks_slow else float("inf")
        # Reading the clock costs; do it only when the outcome depends on time.
        self._timed = tracks_slow or cfg.window_type == "time"
        self._state = _CLOSED
        # Hot path switch: closed, count window, no slow-call or result checks. Successes are then
        # only counted (``_pending_ok``) and added to the window when it is next read.
        self._fast_eligible = not self._timed and self._failure_result is None
        self._fast = False  # switched on once the window holds minimum_calls outcomes
        self._pending_ok = 0
        self._gen = 0
        self._open_until = 0.0
        self._consecutive_opens = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._rejected = 0
        self._opened = 0
        self._window: _CountWindow | _TimeWindow = self._new_window()

    def _new_window(self) -> _CountWindow | _TimeWindow:
        cfg = self.config
        if cfg.window_type == "count":
            return _CountWindow(cfg.window_size)
        return _TimeWindow(cfg.window_size, self._clock.now())

    # ------------------------------------------------------------------ reading state

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose wait is over reports, and becomes, half-open)."""
        if self._state is _OPEN and self._clock.now() >= self._open_until:
            self._transition(_HALF_OPEN, "open wait elapsed")
        return self._state

    @property
    def available(self) -> bool:
        """True when a call made now would be permitted (does not take a permit)."""
        state = self.state
        if state is _HALF_OPEN:
            return self._half_open_in_flight < self.config.half_open_max_calls
        return state is not _OPEN and state is not BreakerState.FORCED_OPEN

    def retry_after(self) -> float:
        """Seconds until the breaker may let a call through (0 when it would now)."""
        state = self.state
        if state is _OPEN:
            return max(0.0, self._open_until - self._clock.now())
        if state is BreakerState.FORCED_OPEN:
            return self.config.open_wait
        if state is _HALF_OPEN and self._half_open_in_flight >= self.config.half_open_max_calls:
            return self.config.half_open_retry_after
        return 0.0

    def metrics(self) -> BreakerMetrics:
        """A snapshot of the window and counters."""
        self._flush()
        calls, failures, slows = self._window.totals(self._clock.now())
        return BreakerMetrics(
            name=self.name,
            state=self.state,
            calls=calls,
            failures=failures,
            slow_calls=slows,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slows / calls if calls else 0.0,
            rejected=self._rejected,
            opened=self._opened,
            retry_after=self.retry_after(),
        )

    # ------------------------------------------------------------------ operator controls

    def reset(self) -> None:
        """Close the breaker with an empty window, leaving any forced or disabled state."""
        self._consecutive_opens = 0
        self._pending_ok = 0
        self._window = self._new_window()
        self._transition(_CLOSED, "reset")

    def force_open(self) -> None:
        """Reject every call until :meth:`reset`."""
        self._transition(BreakerState.FORCED_OPEN, "forced open")

    def open_for(self, seconds: float, reason: str = "held open") -> None:
        """Open now for ``seconds`` whatever the window says (a dependency's own ``Retry-After``).

        Afterwards the breaker probes as after any open wait. An open breaker whose wait ends later
        keeps it; operator states (forced open or closed, disabled) are left alone; the grown open wait
        of repeated failures is not changed.
        """
        if not 0.0 <= seconds < float("inf"):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        state = self.state
        if state is not _CLOSED and state is not _OPEN and state is not _HALF_OPEN:
            return
        until = self._clock.now() + seconds
        if state is _OPEN:
            if self._open_until >= until:
                return
            self._open_until = until
            return
        self._open_until = until
        self._opened += 1
        self._transition(_OPEN, reason)

    def force_closed(self) -> None:
        """Run every call and keep recording, but never open, until :meth:`reset`."""
        self._transition(BreakerState.FORCED_CLOSED, "forced closed")

    def disable(self) -> None:
        """Run every call and record nothing until :meth:`reset`."""
        self._transition(BreakerState.DISABLED, "disabled")

    # ------------------------------------------------------------------ the engine

    async def call(self, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)`` if the breaker permits, recording the outcome."""
        if self._fast:
            # Hot path (also inlined in wrap): no permit to take, no clock to read; a success is one
            # increment. ``gen`` drops the outcome if the state changed while the call ran.
            gen = self._gen
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                self._on_error(gen, e, 0.0)
                raise
            if gen == self._gen:
                self._pending_ok += 1
            return result
        gen = self._acquire()
        clock = self._clock
        start = clock.now() if self._timed else 0.0
        try:
            result = await fn(*args, **kwargs)
        except BaseException as e:
            self._on_error(gen, e, clock.now() - start if self._timed else 0.0)
            raise
        self._on_result(gen, result, clock.now() - start if self._timed else 0.0)
        return result

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Return ``fn`` protected by this breaker (the decorator form).

        The closed-state hot path of :meth:`call` is repeated here so a decorated call costs one
        coroutine frame, not two; everything else goes through :meth:`call`.
        """
        breaker = self
        call = self.call

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            if breaker._fast:
                gen = breaker._gen
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as e:
                    breaker._on_error(gen, e, 0.0)
                    raise
                if gen == breaker._gen:
                    breaker._pending_ok += 1
                return result
            outcome: T = await call(fn, *args, **kwargs)
            return outcome

        return protected

    def guard(self) -> _Guard:
        """A one-call permit as an async context manager, with ``record_result`` for result checks."""
        return _Guard(self)

    async def __aenter__(self) -> _Guard:
        guard = _Guard(self)
        await guard.__aenter__()
        _entered.push(guard)
        return guard

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _entered.pop().__aexit__(exc_type, exc, tb)

    def _acquire(self) -> int:
        """Take a permit or raise :class:`CircuitOpen`; returns the state generation of the permit."""
        state = self._state
        if state is _CLOSED or state is BreakerState.FORCED_CLOSED or state is BreakerState.DISABLED:
            return self._gen
        if state is _OPEN:
            now = self._clock.now()
            if now < self._open_until:
                self._reject("open", self._open_until - now)
            self._transition(_HALF_OPEN, "open wait elapsed")
        if self._state is _HALF_OPEN:
            if self._half_open_in_flight < self.config.half_open_max_calls:
                self._half_open_in_flight += 1
                return self._gen
            self._reject("half_open", self.config.half_open_retry_after)
        self._reject(self._state.value, self.config.open_wait)

    def _reject(self, state: str, retry_after: float) -> NoReturn:
        self._rejected += 1
        if self._events.active:
            self._events.emit(CallRejected(self.name, self._clock.now(), "breaker", state, retry_after))
        raise CircuitOpen(self.name, state, retry_after=retry_after)

    def _on_result(self, gen: int, result: Any, elapsed: float) -> None:
        slow = 2 if elapsed >= self._slow_after else 0
        predicate = self._failure_result
        if predicate is None:
            self._on_outcome(gen, slow)
            return
        try:
            failed = predicate(result)
        except BaseException:
            # A predicate that cannot judge the value: count the call as failed (which also frees a
            # half-open probe slot, so the breaker cannot wedge) and let the caller see the error.
            self._on_outcome(gen, 1 | slow)
            raise
        self._on_outcome(gen, (1 | slow) if failed else slow)

    def _on_success(self, gen: int, elapsed: float) -> None:
        self._on_outcome(gen, 2 if elapsed >= self._slow_after else 0)

    def _on_error(self, gen: int, error: BaseException, elapsed: float) -> None:
        if (
            isinstance(error, self._ignore)
            or not isinstance(error, self._record)
            or isinstance(error, asyncio.CancelledError)  # a cancelled call says nothing of its target
        ):
            # Neither success nor failure; a half-open probe just gives its slot back.
            if gen == self._gen and self._state is _HALF_OPEN:
                self._half_open_in_flight -= 1
            return
        self._on_outcome(gen, 1 | (2 if elapsed >= self._slow_after else 0))

    def _on_outcome(self, gen: int, outcome: int) -> None:
        """Record one outcome (bit 0 failed, bit 1 slow) of a call permitted in generation ``gen``."""
        if gen != self._gen:
            return  # the call began under an earlier state; its outcome says nothing about this one
        self._flush()
        state = self._state
        if state is _HALF_OPEN:
            self._half_open_in_flight -= 1
            if outcome:
                self._open("probe failed" if outcome & 1 else "probe slow")
                return
            self._half_open_successes += 1
            if self._half_open_successes >= self.config.success_threshold:
                self._consecutive_opens = 0
                self._window = self._new_window()
                self._transition(_CLOSED, f"{self._half_open_successes} probes succeeded")
            return
        if state is BreakerState.DISABLED:
            return
        now = self._clock.now() if self._timed else 0.0
        window = self._window
        window.add(outcome, now)
        if state is not _CLOSED:
            return
        calls, failures, slows = window.totals(now)
        cfg = self.config
        if calls < cfg.minimum_calls:
            return
        # Rates are compared as quotients: a correctly rounded division equals the threshold literal
        # exactly when the true rate does (55/100 == 0.55, whereas 0.55 * 100 == 55.000000000000007).
        if failures and failures / calls >= cfg.failure_rate_threshold:
            self._open(f"failure rate {failures}/{calls}")
        elif (
            cfg.slow_call_rate_threshold is not None
            and slows
            and slows / calls >= cfg.slow_call_rate_threshold
        ):
            self._open(f"slow-call rate {slows}/{calls}")
        elif not self._fast and self._fast_eligible:
            # The window now holds enough outcomes for a rate, and after this point a plain success
            # can only lower the failure rate of a count window: successes may take the hot path.
            self._fast = True

    def _flush(self) -> None:
        """Move the successes counted by the hot path into the window."""
        k = self._pending_ok
        if k:
            self._pending_ok = 0
            window = self._window
            if isinstance(window, _CountWindow):
                window.add_successes(k)

    def _open(self, reason: str) -> None:
        cfg = self.config
        self._consecutive_opens += 1
        self._open_until = self._clock.now() + open_wait(cfg, self._consecutive_opens)
        self._opened += 1
        self._transition(_OPEN, reason)

    def _transition(self, new: BreakerState, reason: str) -> None:
        self._flush()
        old = self._state
        self._state = new
        self._fast = (
            new is _CLOSED
            and self._fast_eligible
            and self._window.totals(0.0)[0] >= self.config.minimum_calls
        )
        self._gen += 1
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        if self._events.active and old is not new:
            self._events.emit(BreakerStateChanged(self.name, self._clock.now(), old.value, new.value, reason))

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"


class BreakerGroupConfig(PolicyConfig):
    """Breakers for a set of named dependencies: shared defaults plus per-name overrides.

    There is no override by default: which dependency deserves its own settings is the application's
    knowledge, so it names them (the brief server, for one, opens its generator model's breaker
    earlier, from its ``circuit_breaker.models`` config).
    """

    defaults: BreakerConfig = Field(default_factory=BreakerConfig)
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-name settings that replace the defaults",
    )

    def for_name(self, name: str) -> BreakerConfig:
        """The effective config of breaker ``name`` (validated; a bad override names its key)."""
        override = self.overrides.get(name)
        if not override:
            return self.defaults
        merged = {**self.defaults.model_dump(), **override}
        try:
            return BreakerConfig.model_validate(merged)
        except ValueError as e:
            raise ConfigError(f"overrides.{name}", str(e)) from e

    @model_validator(mode="after")
    def _check_overrides(self) -> BreakerGroupConfig:
        for name in self.overrides:
            self.for_name(name)
        return self


class BreakerRegistry:
    """Creates and keeps one :class:`CircuitBreaker` per name from a :class:`BreakerGroupConfig`."""

    def __init__(
        self,
        config: BreakerGroupConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.config = config or BreakerGroupConfig()
        self._clock = clock
        self._events = events
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """The breaker called ``name``, created on first use."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self.config.for_name(name), clock=self._clock, events=self._events)
            self._breakers[name] = breaker
        return breaker

    def __getitem__(self, name: str) -> CircuitBreaker:
        return self.get(name)

    def all(self) -> Mapping[str, CircuitBreaker]:
        """Every breaker created so far, by name."""
        return dict(self._breakers)

    def available(self) -> list[str]:
        """Names of the breakers that would permit a call now."""
        return [name for name, b in self._breakers.items() if b.available]

    def reset_all(self) -> None:
        """Reset every breaker to closed."""
        for breaker in self._breakers.values():
            breaker.reset()
