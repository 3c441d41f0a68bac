"""The recovery manager (seed 001): classify a failure, run its action chain, keep a history.

::

    manager = RecoveryManager(actions, clock=clock)
    outcome = await manager.handle_failure(exc)               # automatic: classify, run the chain
    attempt = await manager.trigger("clear_cache")             # manual: one action, now
    outcome = await manager.handle_failure(failure_type=FailureType.NETWORK, trigger="manual")
    await manager.reset()                                      # undo lasting changes, forget attempts

A chain runs its actions in order. After each action that did its job, the ``resolved`` check (if
given) asks whether the failure is gone; the chain stops there (outcome ``"resolved"``). A ``final``
action that succeeds (falling back to rules) ends the chain as ``"mitigated"``. A chain that runs out
of actions is ``"unresolved"``. Without a ``resolved`` check, the first action that does its job ends
the chain as resolved.

Limits, all in clock time (seed 001: ``recovery_cooldown_seconds = 30``, ``max_recovery_attempts = 3``):

* **cooldown per failure type**: the same kind of failure is handled at most once per ``cooldown``
  seconds; a report inside the cooldown is *suppressed* (counted, not acted on);
* **max attempts per failure type**: after ``max_attempts`` handlings that did not resolve it, the
  failure type is given up on (suppressed) until it is resolved or the manager is reset;
* **cooldown per action**: inside a chain, an action that ran less than ``cooldown`` seconds ago (for
  any reason) is skipped, so two failure kinds reported together do not restart a model twice;
* one chain at a time; a failure reported while a chain runs is suppressed as ``"in progress"``;
* **guard**: before each action of an automatic or proactive chain, ``guard(failure_type, target,
  action, trigger)`` may give a reason not to run it (``brownout serve``: the model is busy, not down;
  a resource is high from our own load). The action is recorded as skipped with that reason. A chain
  in which the guard held something back and every other action was skipped too (a health check,
  which only reports, aside) ends *suppressed* with the guard's reason: it used no attempt, because
  nothing was tried.

Manual triggers (the recovery API) are an operator's decision: they bypass both cooldowns and the
attempt limit, but are recorded like every other run.

Every run of an action is a :class:`RecoveryAttempt` in :attr:`RecoveryManager.history` (bounded) and a
:class:`~brownout.events.RecoveryActionRun` event. Counters for metrics: :attr:`~RecoveryManager.runs`
(by action and status), :attr:`~RecoveryManager.failures` (handled, by failure type),
:attr:`~RecoveryManager.suppressed` (by reason) and :attr:`~RecoveryManager.outcomes_total` (by
outcome).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus, RecoveryActionRun
from brownout.recovery.actions import CHECK_HEALTH, DEFAULT_CHAINS, Action, ActionResult, chain_for
from brownout.recovery.classify import FailureType, classify

__all__ = ["OutcomeStatus", "RecoveryAttempt", "RecoveryManager", "RecoveryOutcome", "Trigger"]

_log = logging.getLogger("brownout.recovery")

Trigger = Literal["automatic", "proactive", "manual"]
"""Why an action ran: a reported failure, a critical resource level, or an operator."""

OutcomeStatus = Literal["resolved", "mitigated", "unresolved", "suppressed"]
"""How a handled failure ended."""

MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class RecoveryAttempt:
    """One run of one action, as kept in the history.

    ``at`` is the manager's clock time, ``wall_time`` the Unix time (for display). ``ok`` is True only
    for status "ok".
    """

    action: str
    target: str
    at: float
    ok: bool
    detail: str
    status: str = "ok"
    failure_type: str = MANUAL
    trigger: str = MANUAL
    wall_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RecoveryOutcome:
    """How one handled failure ended: ``status``, the ``attempts`` made and a ``reason``."""

    failure_type: FailureType
    target: str
    trigger: str
    status: OutcomeStatus
    reason: str
    evidence: str = ""
    attempts: tuple[RecoveryAttempt, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "failure_type": self.failure_type.value,
            "target": self.target,
            "trigger": self.trigger,
            "status": self.status,
            "reason": self.reason,
            "evidence": self.evidence,
            "attempts": [a.as_dict() for a in self.attempts],
        }


class RecoveryManager:
    """See the module docstring.

    ``actions`` by name; ``chains`` maps each failure type to action names (default
    :data:`~brownout.recovery.actions.DEFAULT_CHAINS`); ``targets`` are the valid non-"all" targets of
    actions that take one (model roles). ``resolved(failure_type, target)`` tells whether a failure is
    gone. ``guard(failure_type, target, action, trigger)`` returns a reason to skip an action of a
    non-manual chain, or None. ``history_size`` bounds the history.
    """

    def __init__(
        self,
        actions: Mapping[str, Action],
        *,
        chains: Mapping[FailureType, Sequence[str]] = DEFAULT_CHAINS,
        targets: Sequence[str] = (),
        cooldown: float = 30.0,
        max_attempts: int = 3,
        history_size: int = 100,
        resolved: Callable[[FailureType, str], Awaitable[bool]] | None = None,
        guard: Callable[[FailureType, str, str, str], str | None] | None = None,
        name: str = "recovery",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        if cooldown < 0:
            raise ConfigError("recovery.cooldown", f"must not be negative, got {cooldown}")
        if max_attempts < 1:
            raise ConfigError("recovery.max_attempts", f"must be at least 1, got {max_attempts}")
        if history_size < 1:
            raise ConfigError("recovery.history_size", f"must be at least 1, got {history_size}")
        for failure_type, chain in chains.items():
            unknown = [a for a in chain if a not in actions]
            if unknown:
                raise ConfigError(f"recovery.chains.{failure_type.value}", f"unknown action(s) {unknown}")
        self.name = name
        """The ``source`` of this manager's events."""
        self.actions: dict[str, Action] = dict(actions)
        """The actions, by name."""
        self.chains: dict[FailureType, tuple[str, ...]] = {t: tuple(c) for t, c in chains.items()}
        """The chain of action names per failure type."""
        self.targets = tuple(targets)
        """Valid targets besides "all"."""
        self.cooldown = cooldown
        """Seconds between two handlings of one failure type, and between two runs of one action."""
        self.max_attempts = max_attempts
        """Unresolved handlings of one failure type before it is given up on until reset."""
        self.history: deque[RecoveryAttempt] = deque(maxlen=history_size)
        """Every action run, oldest first (bounded)."""
        self.outcomes: deque[RecoveryOutcome] = deque(maxlen=history_size)
        """Every handled (or suppressed) failure, oldest first (bounded)."""
        self.runs: Counter[tuple[str, str]] = Counter()
        """Action runs by (action, status): ``recovery_actions_total{action,status}``."""
        self.failures: Counter[str] = Counter()
        """Failures reported, by failure type: ``recovery_failures_total{type}``."""
        self.suppressed: Counter[str] = Counter()
        """Failures not acted on, by reason ("cooldown", "max_attempts", "in_progress")."""
        self.outcomes_total: Counter[str] = Counter()
        """Handled failures by outcome status."""
        self._resolved = resolved
        self.guard = guard
        """Asked before each action of a non-manual chain; a reason it gives skips the action."""
        self._clock = clock
        self._events = events
        self._lock = asyncio.Lock()
        self._attempts: Counter[FailureType] = Counter()  # unresolved handlings per type
        self._last_handled: dict[FailureType, float] = {}
        self._action_runs: Counter[str] = Counter()
        self._action_last: dict[str, float] = {}
        self._action_last_result: dict[str, RecoveryAttempt] = {}
        # Lasting changes in force: action name -> the failure types (or "manual") that applied it.
        self._in_force: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ reading

    @property
    def busy(self) -> bool:
        """True while a chain or a manual action runs."""
        return self._lock.locked()

    @property
    def in_force(self) -> dict[str, list[str]]:
        """Lasting changes in force (e.g. ``fallback_to_rules``) and what applied them."""
        return {name: sorted(by) for name, by in self._in_force.items()}

    def attempts(self, failure_type: FailureType) -> int:
        """Unresolved handlings of ``failure_type`` since it was last resolved or reset."""
        return self._attempts[failure_type]

    def cooldown_left(self, failure_type: FailureType) -> float:
        """Seconds until ``failure_type`` may be handled again (0 when it may now)."""
        last = self._last_handled.get(failure_type)
        if last is None:
            return 0.0
        return max(0.0, self.cooldown - (self._clock.now() - last))

    def action_cooldown_left(self, name: str) -> float:
        """Seconds until action ``name`` may run again inside a chain (0 when it may now)."""
        last = self._action_last.get(name)
        if last is None:
            return 0.0
        return max(0.0, self.cooldown - (self._clock.now() - last))

    def actions_info(self) -> list[dict[str, Any]]:
        """Every action with its description, cooldown, attempts, the failure types whose chains use
        it, whether a lasting change of it is in force, and its last run."""
        out = []
        for name, action in self.actions.items():
            last = self._action_last_result.get(name)
            out.append(
                {
                    "name": name,
                    "description": action.description,
                    "takes_target": action.takes_target,
                    "cooldown_seconds": self.cooldown,
                    "cooldown_remaining": round(self.action_cooldown_left(name), 3),
                    "attempts": self._action_runs[name],
                    "used_for": [t.value for t, chain in self.chains.items() if name in chain],
                    "in_force": name in self._in_force,
                    "last": last.as_dict() if last is not None else None,
                }
            )
        return out

    def failure_types_info(self) -> list[dict[str, Any]]:
        """Every failure type with its chain, attempts, the attempt limit and cooldown left."""
        return [
            {
                "failure_type": t.value,
                "chain": list(chain),
                "attempts": self._attempts[t],
                "max_attempts": self.max_attempts,
                "given_up": self._attempts[t] >= self.max_attempts,
                "cooldown_remaining": round(self.cooldown_left(t), 3),
            }
            for t, chain in self.chains.items()
        ]

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary: settings, attempts, lasting changes and counters."""
        return {
            "busy": self.busy,
            "cooldown_seconds": self.cooldown,
            "max_attempts": self.max_attempts,
            "in_force": self.in_force,
            "failure_types": self.failure_types_info(),
            "failures": dict(self.failures),
            "suppressed": dict(self.suppressed),
            "outcomes": dict(self.outcomes_total),
            "last_outcome": self.outcomes[-1].as_dict() if self.outcomes else None,
        }

    # ------------------------------------------------------------------ acting

    def check_target(self, action: str, target: str) -> None:
        """Raise ValueError naming the choices when ``action`` or ``target`` is unknown."""
        if action not in self.actions:
            raise ValueError(f"unknown action {action!r}; choose from {sorted(self.actions)}")
        if target not in ("all", "") and target not in self.targets:
            raise ValueError(f"unknown target {target!r}; choose from {[*self.targets, 'all']}")

    async def trigger(self, action: str, target: str = "all") -> RecoveryAttempt:
        """Run one action now (manual: no cooldown, no attempt limit); ValueError for unknown names."""
        self.check_target(action, target)
        async with self._lock:
            return await self._run(self.actions[action], target or "all", MANUAL, MANUAL)

    async def handle_failure(
        self,
        error: BaseException | str | None = None,
        *,
        failure_type: FailureType | str | None = None,
        target: str = "all",
        trigger: Trigger = "automatic",
    ) -> RecoveryOutcome:
        """Classify ``error`` (unless ``failure_type`` is given) and run its chain, within the limits.

        ``target`` is the model role concerned, or "all". A ``"manual"`` trigger bypasses the
        cooldowns and the attempt limit. Raises ValueError for an unknown failure type or target.
        """
        if failure_type is not None:
            try:
                kind = FailureType(failure_type)
            except ValueError:
                choices = [t.value for t in FailureType]
                raise ValueError(f"unknown failure type {failure_type!r}; choose from {choices}") from None
            evidence = "" if error is None else classify(error).evidence
        elif error is not None:
            found = classify(error)
            kind, evidence = found.type, found.evidence
        else:
            raise ValueError("give an error or a failure_type")
        if target not in ("all", "") and target not in self.targets:
            raise ValueError(f"unknown target {target!r}; choose from {[*self.targets, 'all']}")
        target = target or "all"
        self.failures[kind.value] += 1
        manual = trigger == MANUAL
        if not manual:
            reason = self._refusal(kind)
            if reason is not None:
                return self._suppress(kind, target, trigger, reason, evidence)
        if self._lock.locked() and not manual:
            return self._suppress(kind, target, trigger, "in_progress", evidence)
        async with self._lock:
            if not manual:
                # Re-checked under the lock: another chain may have handled this type meanwhile.
                reason = self._refusal(kind)
                if reason is not None:
                    return self._suppress(kind, target, trigger, reason, evidence)
            self._last_handled[kind] = self._clock.now()
            outcome = await self._run_chain(kind, target, trigger, evidence)
        if outcome.status == "resolved":
            self._attempts.pop(kind, None)
        elif outcome.status == "suppressed":
            self.suppressed[outcome.reason.split(":", 1)[0]] += 1  # held back by the guard: no attempt
        else:
            self._attempts[kind] += 1
            if self._attempts[kind] >= self.max_attempts:
                _log.warning(
                    "recovery gave up on %s after %d attempts; POST /api/v1/recovery/reset to retry",
                    kind.value,
                    self._attempts[kind],
                )
        self._finish(outcome)
        return outcome

    async def release(self, failure_type: FailureType) -> list[RecoveryAttempt]:
        """``failure_type`` is gone (e.g. a resource is back below its limits): forget its attempts and
        undo the lasting changes that only its chains applied."""
        self._attempts.pop(failure_type, None)
        async with self._lock:
            return await self._undo(lambda by: by.discard(failure_type.value))

    async def reset(self) -> list[RecoveryAttempt]:
        """Undo every lasting change (re-enabling the models), forget attempts and cooldowns."""
        async with self._lock:
            undone = await self._undo(lambda by: by.clear())
        self._attempts.clear()
        self._last_handled.clear()
        self._action_last.clear()
        return undone

    # ------------------------------------------------------------------ internals

    def _refusal(self, kind: FailureType) -> str | None:
        if self._attempts[kind] >= self.max_attempts:
            return "max_attempts"
        if self.cooldown_left(kind) > 0:
            return "cooldown"
        return None

    def _suppress(
        self, kind: FailureType, target: str, trigger: str, reason: str, evidence: str
    ) -> RecoveryOutcome:
        self.suppressed[reason] += 1
        outcome = RecoveryOutcome(kind, target, trigger, "suppressed", reason, evidence)
        self._finish(outcome)
        return outcome

    def _finish(self, outcome: RecoveryOutcome) -> None:
        self.outcomes.append(outcome)
        self.outcomes_total[outcome.status] += 1

    async def _run_chain(
        self, kind: FailureType, target: str, trigger: str, evidence: str
    ) -> RecoveryOutcome:
        done: list[RecoveryAttempt] = []
        held: str | None = None  # the guard's first reason in this chain
        for name in chain_for(kind, self.chains):
            action = self.actions[name]
            if trigger != MANUAL and self.guard is not None:
                why = self.guard(kind, target, name, trigger)
                if why is not None:
                    held = held or why
                    done.append(self._record(name, target, kind.value, trigger, ActionResult.skipped(why)))
                    continue
            if trigger != MANUAL:
                wait = self.action_cooldown_left(name)
                if wait > 0:
                    done.append(
                        self._record(
                            name,
                            target,
                            kind.value,
                            trigger,
                            ActionResult.skipped(f"cooling down ({wait:.0f} s left)"),
                        )
                    )
                    continue
            attempt = await self._run(action, target, kind.value, trigger)
            done.append(attempt)
            if attempt.status != "ok":
                continue
            if action.final:
                return RecoveryOutcome(
                    kind, target, trigger, "mitigated", f"{name}: {attempt.detail}", evidence, tuple(done)
                )
            if self._resolved is None:
                return RecoveryOutcome(
                    kind, target, trigger, "resolved", f"after {name}", evidence, tuple(done)
                )
            try:
                gone = await self._resolved(kind, target)
            except Exception as e:
                _log.warning("recovery: the resolved check failed after %s: %s", name, e)
                gone = False
            if gone:
                return RecoveryOutcome(
                    kind, target, trigger, "resolved", f"after {name}", evidence, tuple(done)
                )
        if held is not None and all(a.status == "skipped" for a in done if a.action != CHECK_HEALTH):
            # Nothing disruptive ran and nothing failed but the report: not an attempt at recovery.
            return RecoveryOutcome(kind, target, trigger, "suppressed", held, evidence, tuple(done))
        return RecoveryOutcome(
            kind, target, trigger, "unresolved", "every action of the chain was tried", evidence, tuple(done)
        )

    async def _run(self, action: Action, target: str, failure_type: str, trigger: str) -> RecoveryAttempt:
        self._action_last[action.name] = self._clock.now()
        self._action_runs[action.name] += 1
        try:
            result = await action.run(target)
        except Exception as e:  # an action's bug must not end the chain or reach the caller
            _log.exception("recovery action %s failed", action.name)
            result = ActionResult.failed(f"{type(e).__name__}: {e}")
        if result.status == "ok" and action.undo is not None:
            self._in_force.setdefault(action.name, set()).add(failure_type)
        return self._record(action.name, target, failure_type, trigger, result)

    async def _undo(self, forget: Callable[[set[str]], None]) -> list[RecoveryAttempt]:
        undone: list[RecoveryAttempt] = []
        for name in list(self._in_force):
            by = self._in_force[name]
            forget(by)
            if by:
                continue
            del self._in_force[name]
            undo = self.actions[name].undo
            if undo is None:
                continue
            try:
                detail = await undo()
            except Exception as e:
                _log.exception("undoing recovery action %s failed", name)
                undone.append(
                    self._record(f"undo_{name}", "all", MANUAL, MANUAL, ActionResult.failed(str(e)))
                )
                continue
            if detail is not None:
                undone.append(self._record(f"undo_{name}", "all", MANUAL, MANUAL, ActionResult.ok(detail)))
        return undone

    def _record(
        self, name: str, target: str, failure_type: str, trigger: str, result: ActionResult
    ) -> RecoveryAttempt:
        now = self._clock.now()
        attempt = RecoveryAttempt(
            action=name,
            target=target,
            at=now,
            ok=result.status == "ok",
            detail=result.detail,
            status=result.status,
            failure_type=failure_type,
            trigger=trigger,
            wall_time=time.time(),  # display only; every decision uses the clock
        )
        self.history.append(attempt)
        self.runs[(name, result.status)] += 1
        if name in self.actions:
            self._action_last_result[name] = attempt
        log = _log.info if result.status != "failed" else _log.warning
        log("recovery %s %s (%s, %s): %s", name, result.status, failure_type, trigger, result.detail)
        events = self._events
        if events.active:
            events.emit(
                RecoveryActionRun(
                    source=self.name,
                    at=now,
                    action=name,
                    target=target,
                    failure_type=failure_type,
                    trigger=trigger,
                    status=result.status,
                    detail=result.detail,
                )
            )
        return attempt
