"""System modes (normal, degraded, emergency) and the adaptive cache TTL.

**Modes.** :class:`SystemModes` derives the mode from the health of the components, every
``interval`` seconds (and on demand):

* ``emergency`` -- a *core* component (one the service cannot do without) is unhealthy;
* ``degraded`` -- some component is not healthy;
* ``normal`` -- every component is healthy.

A mode that escalated one step per reported failure would never come back down, so here the mode is
recomputed from health: it rises at once, and falls only after ``recover_after`` consecutive
evaluations agree that things are better (then to the worst of those), so a flapping component
does not flap the mode. Each mode switches features off (:data:`DEFAULT_SWITCH_OFF`: non-critical
features when degraded, all but the minimum in an emergency); a mode change calls
``on_change`` -- the server applies the switches there -- and emits
:class:`~brownout.events.SystemModeChanged`. Each component failure is kept in
:attr:`SystemModes.failure_history` with the mode it happened in and, later, when it recovered.

**Adaptive TTL.** :class:`AdaptiveTTL` lets the cache carry more of the load when the load is high: the
TTL starts at ``base`` (3600 s); every ``interval`` (60 s) it is doubled when the load factor is above
``high_load`` (0.8) and halved when it is below ``low_load`` (0.3), within ``[min_ttl, max_ttl]``
(600 s, 86400 s). Under high load more answers come from the cache; when idle, fresher ones. While
``may_shorten()`` says no (the system is degraded, and the cache should carry more, not less), it is
never lowered.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from brownout.background import Periodic
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, CacheTTLChanged, EventBus, SystemModeChanged

__all__ = [
    "DEFAULT_SWITCH_OFF",
    "FEATURES",
    "AdaptiveTTL",
    "ComponentHealth",
    "ComponentStatus",
    "FailureRecord",
    "SystemMode",
    "SystemModes",
    "derive_mode",
]

_log = logging.getLogger("brownout.health")

ComponentStatus = Literal["healthy", "degraded", "unhealthy"]
"""The health of one component."""


class SystemMode(StrEnum):
    """The system-wide mode, derived from the health of the components."""

    NORMAL = "normal"
    DEGRADED = "degraded"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        """0 for normal, 1 for degraded, 2 for emergency."""
        return _MODE_RANK[self]


_MODE_RANK = {SystemMode.NORMAL: 0, SystemMode.DEGRADED: 1, SystemMode.EMERGENCY: 2}

FEATURES: Mapping[str, str] = {
    "creative_hints": "the creative hinter model (llama) is not called: creative requests are served "
    "as balanced",
    "model_validation": "the validator model (mistral) is not called: briefs are validated by the rules",
    "cache_ttl_shortening": "the adaptive cache TTL is never lowered: more answers come from the cache",
}
"""What ``brownout serve`` can switch off, and what that means."""

DEFAULT_SWITCH_OFF: Mapping[SystemMode, tuple[str, ...]] = {
    SystemMode.NORMAL: (),
    SystemMode.DEGRADED: ("creative_hints", "cache_ttl_shortening"),
    SystemMode.EMERGENCY: ("creative_hints", "model_validation", "cache_ttl_shortening"),
}
"""Features each mode switches off (degraded disables non-critical features and lets the cache TTL only
rise; emergency keeps the minimum -- here, one model call per brief)."""


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One component's health: ``core`` components put the system in emergency when unhealthy."""

    name: str
    status: ComponentStatus
    core: bool = False
    detail: str = ""


@dataclass(slots=True)
class FailureRecord:
    """A component failure: when (clock and Unix time), how bad, the mode then, and when it recovered."""

    component: str
    status: str
    detail: str
    at: float
    wall_time: float
    mode: str
    recovered_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "component": self.component,
            "status": self.status,
            "detail": self.detail,
            "at": self.at,
            "wall_time": self.wall_time,
            "mode": self.mode,
            "recovered_at": self.recovered_at,
        }


def derive_mode(components: Iterable[ComponentHealth]) -> tuple[SystemMode, str]:
    """The mode the components call for, and why (the components that are not healthy)."""
    items = list(components)
    core = [c for c in items if c.core and c.status == "unhealthy"]
    sick = [c for c in items if c.status != "healthy"]
    if not sick:
        return SystemMode.NORMAL, "all components healthy"
    reason = "; ".join(f"{c.name} {c.status}" + (f" ({c.detail})" if c.detail else "") for c in sick)
    return (SystemMode.EMERGENCY if core else SystemMode.DEGRADED), reason


class SystemModes:
    """Derives and holds the system mode; see the module docstring.

    ``components()`` returns the components' health now. ``switch_off`` maps each mode to the features
    it turns off. ``on_change(old, new, reason)`` is called on every mode change.
    """

    def __init__(
        self,
        components: Callable[[], Iterable[ComponentHealth]],
        *,
        interval: float = 10.0,
        recover_after: int = 2,
        switch_off: Mapping[SystemMode, Sequence[str]] = DEFAULT_SWITCH_OFF,
        history_size: int = 100,
        on_change: Callable[[SystemMode, SystemMode, str], object] | None = None,
        name: str = "system-mode",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not interval > 0:
            raise ConfigError("modes.interval", f"must be positive, got {interval}")
        if recover_after < 1:
            raise ConfigError("modes.recover_after", f"must be at least 1, got {recover_after}")
        self.name = name
        """The ``source`` of this object's events."""
        self.interval = interval
        """Seconds between evaluations."""
        self.recover_after = recover_after
        """Consecutive better evaluations needed before the mode goes down."""
        self.switch_off: dict[SystemMode, tuple[str, ...]] = {
            m: tuple(switch_off.get(m, ())) for m in SystemMode
        }
        """Features switched off, by mode."""
        self.mode = SystemMode.NORMAL
        """The current mode."""
        self.reason = "starting"
        """Why the mode is what it is."""
        self.since = clock.now()
        """Clock time of the last mode change."""
        self.components: dict[str, ComponentHealth] = {}
        """The components at the last evaluation."""
        self.failure_history: deque[FailureRecord] = deque(maxlen=history_size)
        """Component failures, oldest first (bounded)."""
        self.changes: Counter[str] = Counter()
        """Mode changes by new mode: ``system_mode_changes_total{mode}``."""
        self.evaluations = 0
        """Evaluations so far."""
        self._components = components
        self._recent: deque[SystemMode] = deque(maxlen=recover_after)
        self._on_change = on_change
        self._clock = clock
        self._events = events
        self._evaluating = Periodic(
            f"brownout-{name}", self.evaluate, lambda: self.interval, clock=clock, logger=_log
        )

    @property
    def switched_off(self) -> tuple[str, ...]:
        """The features the current mode switches off."""
        return self.switch_off[self.mode]

    def is_on(self, feature: str) -> bool:
        """False while the current mode switches ``feature`` off."""
        return feature not in self.switch_off[self.mode]

    def evaluate(self) -> SystemMode:
        """Read the components' health, update history and the mode; returns the mode."""
        now = self._clock.now()
        current = {c.name: c for c in self._components()}
        self._track_failures(current, now)
        self.components = current
        self.evaluations += 1
        target, reason = derive_mode(current.values())
        self._recent.append(target)
        if target.rank >= self.mode.rank:
            self._set(target, reason)
        elif len(self._recent) == self.recover_after and all(m.rank < self.mode.rank for m in self._recent):
            worst = max(self._recent, key=lambda m: m.rank)
            self._set(worst, reason if worst == target else f"recovering: {reason}")
        return self.mode

    def reset(self) -> SystemMode:
        """Forget the evaluations that hold the mode up and take the mode the health calls for now."""
        self._recent.clear()
        now = self._clock.now()
        current = {c.name: c for c in self._components()}
        self._track_failures(current, now)
        self.components = current
        target, reason = derive_mode(current.values())
        self._set(target, reason)
        return self.mode

    def _set(self, mode: SystemMode, reason: str) -> None:
        old = self.mode
        self.reason = reason
        if mode == old:
            return
        self.mode = mode
        self.since = self._clock.now()
        self.changes[mode.value] += 1
        self._recent.clear()
        log = _log.info if mode.rank < old.rank else _log.warning
        log("system mode %s -> %s: %s", old.value, mode.value, reason)
        if self._on_change is not None:
            try:
                self._on_change(old, mode, reason)
            except Exception:
                _log.exception("applying system mode %s failed", mode.value)
        if self._events.active:
            self._events.emit(
                SystemModeChanged(
                    source=self.name,
                    at=self.since,
                    old=old.value,
                    new=mode.value,
                    reason=reason,
                    switched_off=self.switch_off[mode],
                )
            )

    def _track_failures(self, current: Mapping[str, ComponentHealth], now: float) -> None:
        rank = {"healthy": 0, "degraded": 1, "unhealthy": 2}
        for name, comp in current.items():
            before = self.components.get(name)
            old = rank[before.status] if before is not None else 0
            new = rank[comp.status]
            if new > old:
                self.failure_history.append(
                    FailureRecord(name, comp.status, comp.detail, now, time.time(), self.mode.value)
                )
            elif new == 0 and old > 0:
                for record in reversed(self.failure_history):
                    if record.component == name and record.recovered_at is None:
                        record.recovered_at = now
                        break

    def start(self) -> None:
        """Evaluate now and every ``interval`` seconds, in a background task."""
        self._evaluating.start()

    async def aclose(self) -> None:
        """Stop evaluating."""
        await self._evaluating.stop()

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: the mode, why, since when, what it switches off, components, failures."""
        return {
            "mode": self.mode.value,
            "reason": self.reason,
            "since": self.since,
            "switched_off": {f: FEATURES.get(f, f) for f in self.switched_off},
            "components": {
                c.name: {"status": c.status, "core": c.core, "detail": c.detail}
                for c in self.components.values()
            },
            "failure_history": [r.as_dict() for r in list(self.failure_history)[-20:]],
        }


class AdaptiveTTL:
    """A cache TTL that follows the load; see the module docstring.

    ``load()`` returns the load factor (0 idle .. 1 overloaded; clamped); ``apply(ttl)`` sets the TTL
    of new cache entries; ``may_shorten()`` False forbids lowering it.
    """

    def __init__(
        self,
        *,
        load: Callable[[], float],
        apply: Callable[[float], object],
        may_shorten: Callable[[], bool] = lambda: True,
        base: float = 3600.0,
        min_ttl: float = 600.0,
        max_ttl: float = 86400.0,
        high_load: float = 0.8,
        low_load: float = 0.3,
        interval: float = 60.0,
        name: str = "cache-ttl",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if not 0 < min_ttl <= base <= max_ttl:
            raise ConfigError(
                "modes.adaptive_ttl", f"need 0 < min <= base <= max, got {min_ttl}/{base}/{max_ttl}"
            )
        if not 0 <= low_load < high_load <= 1:
            raise ConfigError(
                "modes.adaptive_ttl", f"need 0 <= low_load < high_load <= 1, got {low_load}/{high_load}"
            )
        if not interval > 0:
            raise ConfigError("modes.adaptive_ttl.interval", f"must be positive, got {interval}")
        self.name = name
        """The ``source`` of this object's events."""
        self.base = base
        """The starting TTL, seconds."""
        self.min_ttl = min_ttl
        """The lowest TTL."""
        self.max_ttl = max_ttl
        """The highest TTL."""
        self.high_load = high_load
        """Load above which the TTL doubles."""
        self.low_load = low_load
        """Load below which the TTL halves."""
        self.interval = interval
        """Seconds between adjustments."""
        self.current = base
        """The TTL in force."""
        self.last_load: float | None = None
        """The load factor at the last adjustment."""
        self.adjustments: Counter[str] = Counter()
        """Adjustments by direction ("up", "down", "held": halving refused by ``may_shorten``)."""
        self._load = load
        self._apply = apply
        self._may_shorten = may_shorten
        self._clock = clock
        self._events = events
        self._adjusting = Periodic(
            f"brownout-{name}", self.tick, lambda: self.interval, clock=clock, immediately=False, logger=_log
        )

    def adjust(self, load: float) -> float:
        """Move the TTL for ``load`` (doubled above ``high_load``, halved below ``low_load``); returns it."""
        load = min(1.0, max(0.0, load))
        self.last_load = load
        old = self.current
        new = old
        if load > self.high_load:
            new = min(old * 2, self.max_ttl)
        elif load < self.low_load:
            if self._may_shorten():
                new = max(old / 2, self.min_ttl)
            elif old > self.min_ttl:
                self.adjustments["held"] += 1
        if new != old:
            self.current = new
            self.adjustments["up" if new > old else "down"] += 1
            _log.info("cache TTL %s -> %s s (load %.2f)", f"{old:g}", f"{new:g}", load)
            if self._events.active:
                self._events.emit(
                    CacheTTLChanged(source=self.name, at=self._clock.now(), old=old, new=new, load=load)
                )
        self._apply(new)
        return new

    def tick(self) -> float:
        """Read the load and adjust once."""
        return self.adjust(self._load())

    def start(self) -> None:
        """Apply ``base`` now, then adjust every ``interval`` seconds in a background task."""
        self._apply(self.current)
        self._adjusting.start()

    async def aclose(self) -> None:
        """Stop adjusting."""
        await self._adjusting.stop()

    def status(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "ttl_seconds": self.current,
            "base": self.base,
            "min": self.min_ttl,
            "max": self.max_ttl,
            "last_load": self.last_load,
            "adjustments": dict(self.adjustments),
        }
