"""The recovery manager under interleavings: a hypothesis state machine drives resource levels
(critical to normal while a chain runs), probe results, automatic failures, operator triggers,
releases and resets against a manager whose actions take (fake) time and call back into the manager
and into the server's level callbacks -- the shape of the reported deadlock. Every call is bounded by
``asyncio.wait_for`` and must finish inside its bound; chains always end with one outcome; attempts,
cooldowns and one-run-per-action hold; lasting changes in force match what is applied."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from types import SimpleNamespace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from brownout.events import EventBus
from brownout.health.resources import Level, ResourceMonitor, ResourceSample, Thresholds
from brownout.recovery import Action, ActionResult, FailureType, RecoveryManager
from brownout.recovery.manager import RecoveryBusy, RecoveryRun
from brownout.server.operations import Operations
from brownout.testing import FakeClock

BOUND = 5.0
"""Real seconds any single call may take: with a fake clock and no real waits, a call that does not
finish in this time waits for something that will never come."""

COOLDOWN = 30.0
MAX_ATTEMPTS = 2
KINDS = (FailureType.SYSTEM_RESOURCE, FailureType.NETWORK, FailureType.PIPELINE_ERROR)
CHAINS = {
    FailureType.SYSTEM_RESOURCE: ("resample", "reduce", "callback"),
    FailureType.NETWORK: ("callback", "rules"),
    FailureType.PIPELINE_ERROR: ("slow", "reduce", "rules"),
}
LASTING = ("reduce", "rules")


class _OpsShim:
    """What ``Operations._on_level`` and ``_on_critical`` read of the server: the real callbacks run
    against this manager and monitor."""

    def __init__(self, machine: RecoveryMachine) -> None:
        self.recovery = machine.manager
        self.resources = machine.monitor
        self.config = SimpleNamespace(recovery=SimpleNamespace(enabled=True))
        self._machine = machine

    def _spawn(self, coro: Any) -> None:
        self._machine.spawned.append(asyncio.get_running_loop().create_task(coro))


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.cpu = 10.0
        self.healthy = False
        self.applied: dict[str, bool] = dict.fromkeys(LASTING, False)
        self.running_now: Counter[str] = Counter()
        self.overlaps: list[str] = []  # one action run twice at once (must stay empty)
        self.problems: list[str] = []  # call-backs that did not behave
        self.spawned: list[asyncio.Task[Any]] = []
        self.started: list[RecoveryRun] = []
        self.monitor = ResourceMonitor(
            cpu=Thresholds(80.0, 95.0),
            sampler=lambda first: ResourceSample(self.clock.now(), self.cpu, 40.0),
            on_level=self._on_level,
            on_critical=self._on_critical,
            clock=self.clock,
            events=EventBus(),
        )
        actions = {name: self._action(name) for name in ("resample", "reduce", "callback", "slow", "rules")}
        self.manager = RecoveryManager(
            actions,
            chains=CHAINS,
            cooldown=COOLDOWN,
            max_attempts=MAX_ATTEMPTS,
            history_size=100_000,
            resolved=self._resolved,
            clock=self.clock,
            events=EventBus(),
        )
        self.ops = _OpsShim(self)

    # ------------------------------------------------------------------ the plant

    async def _on_level(self, resource: str, old: Level, new: Level, sample: ResourceSample) -> None:
        await Operations._on_level(self.ops, resource, old, new, sample)  # type: ignore[arg-type]

    async def _on_critical(self, resource: str, sample: ResourceSample) -> None:
        await Operations._on_critical(self.ops, resource, sample)  # type: ignore[arg-type]

    async def _resolved(self, kind: FailureType, target: str) -> bool:
        if kind is FailureType.SYSTEM_RESOURCE:
            sample = await self.monitor.check()  # the re-sample that may leave critical mid-chain
            return (sample.cpu_percent or 0.0) < 95.0
        return self.healthy

    def _action(self, name: str) -> Action:
        async def run(target: str) -> ActionResult:
            self.running_now[name] += 1
            if self.running_now[name] > 1:
                self.overlaps.append(name)
            try:
                if name == "resample":
                    await self.monitor.check()
                elif name == "callback":
                    await self._call_back()
                else:
                    await self.clock.sleep(5.0 if name == "slow" else 1.0)
                if name in LASTING:
                    self.applied[name] = True
                return ActionResult.ok(f"{name} done")
            finally:
                self.running_now[name] -= 1

        async def undo() -> str | None:
            self.applied[name] = False
            return f"{name} undone"

        return Action(
            name, f"the {name} action", run, undo=undo if name in LASTING else None, final=name == "rules"
        )

    async def _call_back(self) -> None:
        """From inside a running chain: everything that once waited for that chain."""
        manager = self.manager
        late = await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)
        if late.status != "suppressed":
            self.problems.append(f"a failure reported mid-chain was acted on: {late}")
        # While resample runs in another run it is refused at once (RecoveryBusy), never waited for.
        with contextlib.suppress(RecoveryBusy):
            await manager.trigger("resample")
        await manager.release(FailureType.SYSTEM_RESOURCE)
        await Operations._on_level(self.ops, "cpu", "critical", "ok", ResourceSample(0.0, 5.0, 40.0))  # type: ignore[arg-type]
        manager.status()

    # ------------------------------------------------------------------ driving

    def teardown(self) -> None:
        try:
            # Let every chain run out: time moves until nothing runs (bounded).
            for _ in range(200):
                if not self.manager.busy and all(t.done() for t in self.spawned):
                    break
                self._tick(10.0)
            assert not self.manager.busy, f"still running: {self.manager.running}"
            self._consistent()
        finally:
            for task in self.spawned:
                task.cancel()
            self.loop.run_until_complete(self.manager.aclose())
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def bounded(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, BOUND))

    def inside(self, fn: Any) -> Any:
        """Call ``fn`` (a synchronous start) on the machine's running loop."""

        async def call() -> Any:
            return fn()

        return self.loop.run_until_complete(call())

    def _settle(self) -> None:
        for _ in range(20):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._settle()

    def _started(self, got: Any, kind: FailureType, manual: bool, before: tuple[int, float, bool]) -> None:
        if isinstance(got, RecoveryRun):
            attempts, cooldown, busy = before
            if not manual:
                # Attempts, cooldowns and one chain at a time were respected when it began.
                assert attempts < MAX_ATTEMPTS
                assert cooldown == 0
                assert not busy
            self.started.append(got)

    @rule(cpu=st.sampled_from([10.0, 85.0, 99.0]))
    def level(self, cpu: float) -> None:
        self.cpu = cpu
        self.bounded(self.monitor.check())
        self._settle()

    @rule(healthy=st.booleans())
    def probe(self, healthy: bool) -> None:
        self.healthy = healthy
        if healthy:  # what after_probes does when the models pass again
            for kind in (FailureType.NETWORK, FailureType.PIPELINE_ERROR):
                self.bounded(self.manager.release(kind))
        else:
            self.automatic(FailureType.PIPELINE_ERROR)

    @rule(kind=st.sampled_from(KINDS))
    def automatic(self, kind: FailureType) -> None:
        before = (self.manager.attempts(kind), self.manager.cooldown_left(kind), self.manager.busy)
        got = self.inside(lambda: self.manager.start_failure(failure_type=kind))
        self._started(got, kind, False, before)
        self._settle()

    @rule(kind=st.sampled_from(KINDS))
    def operator_chain(self, kind: FailureType) -> None:
        got = self.inside(lambda: self.manager.start_failure(failure_type=kind, trigger="manual"))
        self._started(got, kind, True, (0, 0.0, False))
        self._settle()

    @rule(action=st.sampled_from(["resample", "reduce", "slow", "rules", "callback"]))
    def operator_action(self, action: str) -> None:
        holder = action in self.manager._running_actions
        try:
            run = self.inside(lambda: self.manager.start_trigger(action))
        except RecoveryBusy:
            assert holder  # refused only while that very action runs
            return
        assert not holder
        self.started.append(run)
        self._settle()

    @rule(kind=st.sampled_from(KINDS))
    def release(self, kind: FailureType) -> None:
        self.bounded(self.manager.release(kind))

    @rule()
    def reset(self) -> None:
        self.bounded(self.manager.reset())
        assert all(self.manager.attempts(k) == 0 for k in KINDS)

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0, 31.0]))
    def tick(self, seconds: float) -> None:
        self._tick(seconds)

    # ------------------------------------------------------------------ what must hold

    @invariant()
    def never_overlapping_nor_misbehaving(self) -> None:
        assert self.overlaps == []
        assert self.problems == []

    @invariant()
    def status_answers(self) -> None:
        status = self.manager.status()
        assert status["busy"] == self.manager.busy
        assert {r["id"] for r in status["running"]} == {r.id for r in self.manager.running}

    @invariant()
    def runs_end_with_one_outcome(self) -> None:
        outcomes = list(self.manager.outcomes)
        for run in self.started:
            if not run.done:
                assert run.outcome is None
                assert run.attempt is None
                continue
            if run.kind == "chain":
                assert run.outcome is not None
                assert sum(o is run.outcome for o in outcomes) == 1
            else:
                assert run.attempt is not None
        finished_chains = [r for r in self.manager._done_runs if r.kind == "chain"]
        held = [o for o in outcomes if o.reason in ("cooldown", "max_attempts", "in_progress")]
        assert len(outcomes) == len(finished_chains) + len(held)
        assert sum(self.manager.outcomes_total.values()) == len(outcomes)

    def _consistent(self) -> None:
        # At rest: what is recorded as in force is exactly what is applied, and nothing is orphaned.
        assert not self.manager.busy
        in_force = self.manager.in_force
        assert all(by for by in in_force.values())
        assert set(in_force) == {name for name, on in self.applied.items() if on}
        history = set(map(id, self.manager.history))
        for run in self.manager._done_runs:
            assert all(id(a) in history for a in run.attempts)


def test_recovery_never_waits_beyond_its_bound_under_any_interleaving() -> None:
    run_state_machine_as_test(
        RecoveryMachine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
    )
