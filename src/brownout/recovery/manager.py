"""The recovery manager: classify a failure, run its action chain, keep a history.

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

Limits, all in clock time (by default a 30 s cooldown and 3 attempts):

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

**Nothing waits for a chain.** A chain's actions and checks call back into what surrounds the manager:
a resolved check re-samples resources, the new level makes the server call :meth:`release`, a probe
round hands another failure in. With a lock held across a chain, such a call-back waited for the very
chain that made it, and from then on every reset and trigger waited too, for ever. So there is no
lock. Every change of the manager's state (runs in progress, attempts, cooldowns, lasting changes in
force) happens in a short stretch of plain code with no ``await`` in it -- on one event loop that is
atomic -- and actions, checks and undos are awaited outside those stretches. The rules that the lock
used to enforce are kept as state, checked and set in one such stretch, and a caller that meets them
is answered at once instead of being made to wait:

* an automatic or proactive failure reported while any run is in progress is suppressed as
  ``"in_progress"`` (as before);
* one action never runs twice at once, nor while its undo runs: inside a chain it is then skipped
  ("already running"), a manual :meth:`trigger` raises :class:`RecoveryBusy` (a 503 with
  ``Retry-After`` in the recovery API);
* :meth:`release` and :meth:`reset` never wait: they forget and undo now. A lasting change whose
  action is running at that moment is left to that run, which lifts it when it ends if nobody holds
  it any more; a chain of a released (or reset) failure type lifts what it applied when it ends, and
  a chain that was running during a reset does not count against the attempts the reset forgot.

So no call into the manager can wait for something that waits for it: deadlock-free by construction,
not by timeouts. Each chain or manual action is a :class:`RecoveryRun` with an id; :meth:`start_trigger`
and :meth:`start_failure` run one as a task the manager owns (the recovery API answers with the run's
id when it takes longer than its timeout), and :meth:`status` shows the runs in progress.

Every run of an action is a :class:`RecoveryAttempt` in :attr:`RecoveryManager.history` (bounded) and a
:class:`~brownout.events.RecoveryActionRun` event. Counters for metrics: :attr:`~RecoveryManager.runs`
(by action and status), :attr:`~RecoveryManager.failures` (handled, by failure type),
:attr:`~RecoveryManager.suppressed` (by reason) and :attr:`~RecoveryManager.outcomes_total` (by
outcome).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from brownout.background import TaskSet
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError, ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus, RecoveryActionRun
from brownout.recovery.actions import CHECK_HEALTH, DEFAULT_CHAINS, Action, ActionResult, chain_for
from brownout.recovery.classify import FailureType, classify

__all__ = [
    "OutcomeStatus",
    "RecoveryAttempt",
    "RecoveryBusy",
    "RecoveryManager",
    "RecoveryOutcome",
    "RecoveryRun",
    "Trigger",
]

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


class RecoveryBusy(ServiceUnavailable):
    """A manual action cannot start now: the same action (or its undo, or a reset) is running.

    Raised at once, never after waiting; ``retry_after`` says when to ask again.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, policy="recovery")


RunKind = Literal["chain", "action"]


@dataclass(eq=False, slots=True)
class RecoveryRun:
    """One chain, or one manual action, in progress or done.

    ``name`` is the failure type (a chain) or the action (a manual action), ``evidence`` what the
    failure's classification went by; ``attempts`` grow as the
    run goes, ``current`` is the action running now. When it is done, ``outcome`` (a chain) or
    ``attempt`` (an action) is set. ``task`` is set when the manager runs it as its own task
    (:meth:`RecoveryManager.start_trigger`, :meth:`RecoveryManager.start_failure`).
    """

    id: int
    kind: RunKind
    name: str
    target: str
    trigger: str
    started: float
    epoch: int
    evidence: str = ""
    attempts: list[RecoveryAttempt] = field(default_factory=list)
    current: str | None = None
    released: bool = False
    ended: float | None = None
    outcome: RecoveryOutcome | None = None
    attempt: RecoveryAttempt | None = None
    task: asyncio.Task[Any] | None = None

    @property
    def done(self) -> bool:
        """True once the run has ended (with its outcome or attempt)."""
        return self.ended is not None

    def result(self) -> dict[str, Any]:
        """What the run came to, JSON-ready: the outcome of a chain, the attempt of an action."""
        if self.outcome is not None:
            return self.outcome.as_dict()
        if self.attempt is not None:
            return self.attempt.as_dict()
        raise RuntimeError(f"recovery run {self.id} has not ended")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run and its progress."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "target": self.target,
            "trigger": self.trigger,
            "started": self.started,
            "state": "done" if self.done else "running",
            "current_action": self.current,
            "attempts": [a.as_dict() for a in self.attempts],
            "result": self.result() if self.done else None,
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
        # All the mutable state below is changed only in stretches of code without an await (see the
        # module docstring): no lock, so nothing a chain calls back into can wait for that chain.
        self._ids = itertools.count(1)
        self._epoch = 0  # moves on every reset: runs started before it no longer count attempts
        self._runs: dict[int, RecoveryRun] = {}  # in progress, by id
        self._done_runs: deque[RecoveryRun] = deque(maxlen=history_size)
        self._running_actions: dict[str, str] = {}  # action name -> what runs it ("run 3", "undo")
        self._tasks = TaskSet(f"recovery {name}", logger=_log)  # runs started by start_trigger/start_failure
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
        """True while a chain, a manual action or an undo runs."""
        return bool(self._runs) or bool(self._running_actions)

    @property
    def running(self) -> list[RecoveryRun]:
        """The runs in progress, oldest first."""
        return list(self._runs.values())

    def run(self, run_id: int) -> RecoveryRun | None:
        """The run ``run_id``, in progress or among the last ``history_size`` done (else None)."""
        found = self._runs.get(run_id)
        if found is not None:
            return found
        return next((r for r in self._done_runs if r.id == run_id), None)

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
            "running": [r.as_dict() for r in self._runs.values()],
            "recent_runs": [r.as_dict() for r in list(self._done_runs)[-10:]],
        }

    # ------------------------------------------------------------------ acting

    def check_target(self, action: str, target: str) -> None:
        """Raise ValueError naming the choices when ``action`` or ``target`` is unknown."""
        if action not in self.actions:
            raise ValueError(f"unknown action {action!r}; choose from {sorted(self.actions)}")
        if target not in ("all", "") and target not in self.targets:
            raise ValueError(f"unknown target {target!r}; choose from {[*self.targets, 'all']}")

    async def trigger(self, action: str, target: str = "all") -> RecoveryAttempt:
        """Run one action now (manual: no cooldown, no attempt limit); ValueError for unknown names,
        :class:`RecoveryBusy` (at once) when that action is running already."""
        return await self._action_run(self._begin_action(action, target))

    def start_trigger(self, action: str, target: str = "all") -> RecoveryRun:
        """Like :meth:`trigger`, but run the action as a task the manager owns and return its run at
        once (errors for unknown names, or an action already running, are raised here)."""
        asyncio.get_running_loop()  # first: without a loop, no run may be taken (raises RuntimeError)
        run = self._begin_action(action, target)
        run.task = self._tasks.spawn(self._action_run(run), name=f"brownout-{self.name}-run")
        return run

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
        begun = self._begin_chain(error, failure_type, target, trigger)
        if isinstance(begun, RecoveryOutcome):
            return begun
        return await self._chain_run(begun)

    def start_failure(
        self,
        error: BaseException | str | None = None,
        *,
        failure_type: FailureType | str | None = None,
        target: str = "all",
        trigger: Trigger = "automatic",
    ) -> RecoveryRun | RecoveryOutcome:
        """Like :meth:`handle_failure`, but run the chain as a task the manager owns and return its
        run at once; a failure not acted on is answered with its suppressed outcome."""
        asyncio.get_running_loop()  # first: without a loop, no run may be taken (raises RuntimeError)
        begun = self._begin_chain(error, failure_type, target, trigger)
        if isinstance(begun, RecoveryOutcome):
            return begun
        begun.task = self._tasks.spawn(self._chain_run(begun), name=f"brownout-{self.name}-run")
        return begun

    async def release(self, failure_type: FailureType) -> list[RecoveryAttempt]:
        """``failure_type`` is gone (e.g. a resource is back below its limits): forget its attempts and
        undo the lasting changes that only its chains applied. Never waits for a running chain: one
        of this type lifts what it applies when it ends."""
        self._attempts.pop(failure_type, None)
        for run in self._runs.values():
            if run.kind == "chain" and run.name == failure_type.value:
                run.released = True
        return await self._undo(lambda by: by.discard(failure_type.value))

    async def reset(self) -> list[RecoveryAttempt]:
        """Undo every lasting change (re-enabling the models), forget attempts and cooldowns. Never
        waits for a running chain: it lifts what it applies when it ends, and its attempt does not
        count."""
        self._epoch += 1
        for run in self._runs.values():
            if run.kind == "chain":
                run.released = True
        self._attempts.clear()
        self._last_handled.clear()
        self._action_last.clear()
        return await self._undo(lambda by: by.clear())

    async def aclose(self) -> None:
        """Cancel the runs started with :meth:`start_trigger` or :meth:`start_failure` (shutting down)."""
        await self._tasks.cancel()

    # ------------------------------------------------------------------ internals

    def _open(self, kind: RunKind, name: str, target: str, trigger: str) -> RecoveryRun:
        run = RecoveryRun(next(self._ids), kind, name, target, trigger, self._clock.now(), self._epoch)
        self._runs[run.id] = run
        return run

    def _close(self, run: RecoveryRun) -> None:
        run.ended = self._clock.now()
        run.current = None
        self._runs.pop(run.id, None)
        self._done_runs.append(run)

    def _begin_action(self, action: str, target: str) -> RecoveryRun:
        # No await in here: the check that the action is free and taking it are one step.
        self.check_target(action, target)
        holder = self._running_actions.get(action)
        if holder is not None:
            raise RecoveryBusy(
                f"recovery action {action} is running already ({holder}); ask again when it has ended",
                retry_after=max(1.0, self.cooldown / 10),
            )
        return self._open("action", action, target or "all", MANUAL)

    async def _action_run(self, run: RecoveryRun) -> RecoveryAttempt:
        try:
            attempt = await self._run(self.actions[run.name], run.target, MANUAL, MANUAL, run)
        except asyncio.CancelledError:
            run.attempt = self._record(
                run.name, run.target, MANUAL, MANUAL, ActionResult.failed("cancelled: the server is stopping")
            )
            raise
        finally:
            self._close(run)
        run.attempt = attempt
        return attempt

    def _begin_chain(
        self,
        error: BaseException | str | None,
        failure_type: FailureType | str | None,
        target: str,
        trigger: str,
    ) -> RecoveryRun | RecoveryOutcome:
        # No await in here: the limits are checked and the run is taken in one step.
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
        if trigger != MANUAL:
            reason = self._refusal(kind)
            if reason is not None:
                return self._suppress(kind, target, trigger, reason, evidence)
            if self.busy:
                return self._suppress(kind, target, trigger, "in_progress", evidence)
        self._last_handled[kind] = self._clock.now()
        run = self._open("chain", kind.value, target, trigger)
        run.evidence = evidence
        return run

    async def _chain_run(self, run: RecoveryRun) -> RecoveryOutcome:
        kind, evidence = FailureType(run.name), run.evidence
        try:
            outcome = await self._run_chain(kind, run.target, run.trigger, evidence, run)
        except asyncio.CancelledError:
            # Every chain that started ends with one outcome, even one cut short by a shutdown.
            outcome = RecoveryOutcome(
                kind,
                run.target,
                run.trigger,
                "unresolved",
                "cancelled: the server is stopping",
                evidence,
                tuple(run.attempts),
            )
            run.outcome = outcome
            self._close(run)
            self.outcomes_total[outcome.status] += 1
            self.outcomes.append(outcome)
            raise
        counts = run.epoch == self._epoch  # a reset since it started forgot the attempts it would add
        if outcome.status == "resolved":
            self._attempts.pop(kind, None)
        elif outcome.status == "suppressed":
            self.suppressed[outcome.reason.split(":", 1)[0]] += 1  # held back by the guard: no attempt
        elif counts:
            self._attempts[kind] += 1
            if self._attempts[kind] >= self.max_attempts:
                _log.warning(
                    "recovery gave up on %s after %d attempts; POST /api/v1/recovery/reset to retry",
                    kind.value,
                    self._attempts[kind],
                )
        run.outcome = outcome
        self._close(run)
        self._finish(outcome)
        if run.released:
            # Released (or reset) while it ran: what it applied after that is lifted now.
            await self._undo(lambda by: by.discard(kind.value))
        return outcome

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
        self, kind: FailureType, target: str, trigger: str, evidence: str, run: RecoveryRun
    ) -> RecoveryOutcome:
        done = run.attempts  # shown as progress while the chain runs
        held: str | None = None  # the guard's first reason in this chain
        for name in chain_for(kind, self.chains):
            action = self.actions[name]
            if trigger != MANUAL and self.guard is not None:
                why = self.guard(kind, target, name, trigger)
                if why is not None:
                    held = held or why
                    done.append(self._record(name, target, kind.value, trigger, ActionResult.skipped(why)))
                    continue
            holder = self._running_actions.get(name)
            if holder is not None:
                # Never wait for it: the run that has it may be waiting on us.
                done.append(
                    self._record(
                        name, target, kind.value, trigger, ActionResult.skipped(f"already running ({holder})")
                    )
                )
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
            attempt = await self._run(action, target, kind.value, trigger, run)
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

    async def _run(
        self, action: Action, target: str, failure_type: str, trigger: str, run: RecoveryRun
    ) -> RecoveryAttempt:
        name = action.name
        self._running_actions[name] = f"run {run.id}"
        self._action_last[name] = self._clock.now()
        self._action_runs[name] += 1
        run.current = name
        try:
            result = await action.run(target)
        except Exception as e:  # an action's bug must not end the chain or reach the caller
            _log.exception("recovery action %s failed", name)
            result = ActionResult.failed(f"{type(e).__name__}: {e}")
        finally:
            del self._running_actions[name]
            run.current = None
        if result.status == "ok" and action.undo is not None:
            self._in_force.setdefault(name, set()).add(failure_type)
        attempt = self._record(name, target, failure_type, trigger, result)
        run.attempts.append(attempt)
        if self._in_force.get(name) == set():
            # Released while it ran, and nothing holds it now: lift it (see _undo).
            await self._undo(lambda by: None)
        return attempt

    async def _undo(self, forget: Callable[[set[str]], None]) -> list[RecoveryAttempt]:
        # Decide and take everything to undo first, without an await; then undo outside.
        todo: list[tuple[str, Callable[[], Awaitable[str | None]]]] = []
        for name in list(self._in_force):
            by = self._in_force[name]
            forget(by)
            if by or name in self._running_actions:
                continue  # still held, or running now: the run lifts it when it ends
            del self._in_force[name]
            undo = self.actions[name].undo
            if undo is not None:
                self._running_actions[name] = "undo"
                todo.append((name, undo))
        undone: list[RecoveryAttempt] = []
        try:
            for i, (name, undo) in enumerate(todo):
                try:
                    detail = await undo()
                except Exception as e:
                    _log.exception("undoing recovery action %s failed", name)
                    undone.append(
                        self._record(f"undo_{name}", "all", MANUAL, MANUAL, ActionResult.failed(str(e)))
                    )
                    continue
                finally:
                    del self._running_actions[name]
                    todo[i] = ("", undo)
                if detail is not None:
                    undone.append(
                        self._record(f"undo_{name}", "all", MANUAL, MANUAL, ActionResult.ok(detail))
                    )
        finally:
            for name, _ in todo:  # cancelled part-way: free what was not undone
                if name:
                    self._running_actions.pop(name, None)
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
