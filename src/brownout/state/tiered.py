"""Tiered reads with freshness labels: real-time store, then slower stores, then memory, then a default.

A pricing service keeps answering through a Redis outage by reading, in order, Redis (real-time),
the database (stale), the last value this process saw (very stale) and finally a default price that is
flagged as low confidence. :class:`TieredReader` is that reader, for any storage::

    reader = TieredReader("pricing", [
        Tier("redis", redis_get, "real_time", timeout=lambda: 0.1 if detector.degraded else 1.0),
        Tier("database", db_get, "stale", timeout=2.0),
    ], default=lambda zone: DEFAULT_PRICE)
    answer = await reader.read("zone-7")
    answer.value, answer.source, answer.freshness, answer.fallback_reason, answer.confidence

Each tier is an async function of the key returning the value, or ``None`` for "not here" (a *miss*);
an exception or running past the tier's timeout is a *failure*. Either way the next tier is tried and
the reason is recorded (``"redis: miss"``, ``"redis: DeadlineExceeded: deadline of 0.1s exceeded"``).
The first tier to answer serves, and its value is remembered in process (a bounded LRU, with the time)
so that when every tier is down the reader can still answer with it, labelled ``"very_stale"`` with its
age. Only when nothing is remembered does the default answer; without a default,
:class:`~brownout.errors.AllFallbacksFailed` carries every tier's cause.

Cancellation always propagates: a cancelled request must not go on through the slower tiers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import AllFallbacksFailed, ConfigError
from brownout.events import DEFAULT_BUS, EventBus, FallbackServed
from brownout.policies.deadline import Deadline, DeadlineConfig, deadline
from brownout.policies.fallback import Decline

__all__ = [
    "DEFAULT_SOURCE",
    "MEMORY_SOURCE",
    "Confidence",
    "Tier",
    "TieredReader",
    "TieredStats",
    "TieredValue",
]

V = TypeVar("V")

Confidence = Literal["high", "medium", "low"]

MEMORY_SOURCE = "memory"
"""The ``source`` of an answer served from the value this process last read (freshness ``"very_stale"``)."""

DEFAULT_SOURCE = "default"
"""The ``source`` (and ``freshness``) of an answer served by the reader's ``default``."""

# A callable timeout may return many distinct values; a policy object is cached for the first few per
# tier (the common case is two: normal and degraded) and the rest use a one-off deadline scope.
_MAX_CACHED_DEADLINES = 8


@dataclass(frozen=True, slots=True)
class Tier(Generic[V]):
    """One place a :class:`TieredReader` looks.

    ``read(key)`` returns the value, or ``None`` when the key is not there (so ``None`` cannot be a
    value). ``freshness`` labels the answers this tier serves (``"real_time"``, ``"stale"``).
    ``timeout`` is in seconds (``math.inf`` for none), or a callable asked before every read -- so a
    Redis tier can allow 100 ms only while a health detector says Redis is degraded.
    """

    name: str
    read: Callable[[str], Awaitable[V | None]]
    freshness: str
    timeout: float | Callable[[], float]


@dataclass(frozen=True, slots=True)
class TieredValue(Generic[V]):
    """An answer of a :class:`TieredReader` and where it came from.

    ``source`` is the tier's name, :data:`MEMORY_SOURCE` or :data:`DEFAULT_SOURCE`; ``freshness`` is
    the tier's label, ``"very_stale"`` or ``"default"``. ``fallback_reason`` joins (with ``"; "``) why
    each earlier tier did not serve, and is None when the first tier served. ``confidence`` is
    ``"high"`` from the first tier, ``"medium"`` from a later one and ``"low"`` from memory or the
    default. ``age`` is the remembered value's age in seconds (None for the other sources).
    """

    value: V
    source: str
    freshness: str
    fallback_reason: str | None
    confidence: Confidence
    age: float | None

    @property
    def degraded(self) -> bool:
        """True unless the first tier served."""
        return self.fallback_reason is not None


@dataclass(frozen=True, slots=True)
class TieredStats:
    """Counters of a :class:`TieredReader`.

    ``served`` counts answers by source (every tier, ``"memory"`` and ``"default"`` are present);
    ``misses`` and ``failures`` count, per tier, reads that found nothing and reads that raised or
    timed out; ``unanswered`` counts reads that raised :class:`~brownout.errors.AllFallbacksFailed`;
    ``remembered`` is how many keys memory holds now.
    """

    served: dict[str, int]
    misses: dict[str, int]
    failures: dict[str, int]
    unanswered: int
    remembered: int


class _Slot(Generic[V]):
    """A tier prepared for reading: its timeout split into a fixed policy or a callable."""

    __slots__ = ("deadlines", "fixed", "freshness", "name", "policy_name", "read", "timeout_fn")

    def __init__(self, tier: Tier[V], policy_name: str) -> None:
        self.name = tier.name
        self.read = tier.read
        self.freshness = tier.freshness
        self.policy_name = policy_name
        self.deadlines: dict[float, Deadline] = {}
        # ``fixed`` is None for no timeout at all; ``timeout_fn`` is set for a callable timeout.
        self.fixed: Deadline | None = None
        self.timeout_fn: Callable[[], float] | None = None


class TieredReader(Generic[V]):
    """Reads a key from tiers in order and labels the answer with its source and freshness.

    ``name`` names the reader in events and errors. ``tiers`` are tried in order, each under its own
    timeout (a :func:`~brownout.policies.deadline.deadline` on ``clock``). ``default(key)`` answers
    when every tier failed or missed and nothing is remembered. ``remember`` keeps the last served
    value of up to ``max_remembered`` keys (least recently used dropped first). A
    :class:`~brownout.events.FallbackServed` event is emitted whenever the first tier did not serve.
    """

    __slots__ = (
        "_clock",
        "_default",
        "_events",
        "_failures",
        "_max_remembered",
        "_memory",
        "_misses",
        "_remember",
        "_served",
        "_slots",
        "_unanswered",
        "name",
        "tiers",
    )

    def __init__(
        self,
        name: str,
        tiers: Sequence[Tier[V]],
        *,
        default: Callable[[str], V] | None = None,
        remember: bool = True,
        max_remembered: int = 10_000,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not tiers:
            raise ConfigError("tiers", "a tiered reader needs at least one tier")
        if max_remembered < 1:
            raise ConfigError("max_remembered", f"must be >= 1, got {max_remembered!r}")
        names = [t.name for t in tiers]
        for i, tier in enumerate(tiers):
            if tier.name in (MEMORY_SOURCE, DEFAULT_SOURCE) or not tier.name:
                raise ConfigError(f"tiers[{i}].name", f"{tier.name!r} is empty or reserved")
            if names.count(tier.name) > 1:
                raise ConfigError(f"tiers[{i}].name", f"{tier.name!r} is used by more than one tier")
        self.name = name
        self.tiers: tuple[Tier[V], ...] = tuple(tiers)
        self._default = default
        self._remember = remember
        self._max_remembered = max_remembered
        self._clock = clock
        self._events = events
        self._memory: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self._slots: tuple[_Slot[V], ...] = tuple(self._prepare(i, t) for i, t in enumerate(self.tiers))
        self._served: dict[str, int] = dict.fromkeys((*names, MEMORY_SOURCE, DEFAULT_SOURCE), 0)
        self._misses: dict[str, int] = dict.fromkeys(names, 0)
        self._failures: dict[str, int] = dict.fromkeys(names, 0)
        self._unanswered = 0

    def _prepare(self, index: int, tier: Tier[V]) -> _Slot[V]:
        slot: _Slot[V] = _Slot(tier, f"{self.name}.{tier.name}")
        timeout = tier.timeout
        if callable(timeout):
            slot.timeout_fn = timeout
        elif math.isnan(timeout) or timeout <= 0:
            raise ConfigError(
                f"tiers[{index}].timeout", f"must be > 0 seconds (or math.inf), got {timeout!r}"
            )
        elif timeout != math.inf:
            slot.fixed = self._deadline_policy(slot, float(timeout))
        return slot

    def _deadline_policy(self, slot: _Slot[V], timeout: float) -> Deadline:
        return Deadline(
            slot.policy_name, DeadlineConfig(timeout=timeout), clock=self._clock, events=self._events
        )

    async def _read_tier(self, slot: _Slot[V], key: str) -> V | None:
        """One tier's read under its timeout (the callable one evaluated now)."""
        fn = slot.timeout_fn
        if fn is None:
            policy = slot.fixed
            if policy is None:
                return await slot.read(key)
            result: V | None = await policy.call(slot.read, key)
            return result
        timeout = fn()
        if timeout == math.inf:
            return await slot.read(key)
        if timeout > 0:  # False for NaN too: that goes to the scope below, which names the problem.
            policy = slot.deadlines.get(timeout)
            if policy is None and len(slot.deadlines) < _MAX_CACHED_DEADLINES:
                policy = slot.deadlines[timeout] = self._deadline_policy(slot, timeout)
            if policy is not None:
                result = await policy.call(slot.read, key)
                return result
        # Zero or negative: the scope raises DeadlineExceeded at once, a failure of this tier.
        async with deadline(timeout, clock=self._clock, events=self._events, name=slot.policy_name):
            return await slot.read(key)

    async def read(self, key: str) -> TieredValue[V]:
        """Read ``key`` from the first tier that answers; else memory, else the default.

        Raises :class:`~brownout.errors.AllFallbacksFailed` (with each tier's cause) when nothing can
        answer. :class:`asyncio.CancelledError` propagates at once.
        """
        causes: list[tuple[str, BaseException | None]] | None = None
        for slot in self._slots:
            try:
                value = await self._read_tier(slot, key)
            except Exception as exc:
                # Only Exception: a cancelled read must not carry on through the slower tiers.
                self._failures[slot.name] += 1
                if causes is None:
                    causes = []
                causes.append((slot.name, exc))
                continue
            if value is None:
                self._misses[slot.name] += 1
                if causes is None:
                    causes = []
                causes.append((slot.name, None))
                continue
            self._served[slot.name] += 1
            if self._remember:
                self._keep(key, value)
            if causes is None:
                # The first tier served: the hot path, no reason to build and no event.
                return TieredValue(value, slot.name, slot.freshness, None, "high", None)
            self._emit(slot.name, len(causes))
            return TieredValue(value, slot.name, slot.freshness, _reason(causes), "medium", None)
        assert causes is not None  # at least one tier, and none served
        return self._last_resort(key, causes)

    def _keep(self, key: str, value: V) -> None:
        memory = self._memory
        memory[key] = (value, self._clock.now())
        memory.move_to_end(key)
        if len(memory) > self._max_remembered:
            memory.popitem(last=False)

    def _last_resort(self, key: str, causes: list[tuple[str, BaseException | None]]) -> TieredValue[V]:
        """Every tier failed or missed: the remembered value, else the default, else raise."""
        held = self._memory.get(key) if self._remember else None
        if held is not None:
            self._memory.move_to_end(key)
            self._served[MEMORY_SOURCE] += 1
            self._emit(MEMORY_SOURCE, len(causes))
            value, at = held
            age = max(0.0, self._clock.now() - at)
            return TieredValue(value, MEMORY_SOURCE, "very_stale", _reason(causes), "low", age)
        if self._default is not None:
            value = self._default(key)
            self._served[DEFAULT_SOURCE] += 1
            self._emit(DEFAULT_SOURCE, len(causes))
            return TieredValue(value, DEFAULT_SOURCE, DEFAULT_SOURCE, _reason(causes), "low", None)
        self._unanswered += 1
        errors: list[tuple[str, BaseException]] = [
            (name, exc if exc is not None else Decline(f"{key!r} not found")) for name, exc in causes
        ]
        raise AllFallbacksFailed(self.name, errors) from errors[-1][1]

    def _emit(self, source: str, skipped: int) -> None:
        if self._events.active:
            self._events.emit(FallbackServed(self.name, self._clock.now(), source, skipped))

    def forget(self, key: str) -> None:
        """Drop the remembered value of ``key`` (if any)."""
        self._memory.pop(key, None)

    def stats(self) -> TieredStats:
        """A snapshot of the counters."""
        return TieredStats(
            served=dict(self._served),
            misses=dict(self._misses),
            failures=dict(self._failures),
            unanswered=self._unanswered,
            remembered=len(self._memory),
        )

    def __repr__(self) -> str:
        return f"TieredReader({self.name!r}, tiers={[t.name for t in self.tiers]!r})"


def _reason(causes: list[tuple[str, BaseException | None]]) -> str:
    """``"redis: miss; database: ConnectionError: refused"`` from the recorded causes."""
    parts = []
    for name, exc in causes:
        if exc is None:
            parts.append(f"{name}: miss")
        else:
            text = str(exc)
            parts.append(f"{name}: {type(exc).__name__}: {text}" if text else f"{name}: {type(exc).__name__}")
    return "; ".join(parts)
