"""What every drill's play works with: :class:`Drill`, the drill settings, the progress callbacks.

A play (``async def play(d: Drill) -> None`` in a scenario module) starts the stack through
:meth:`Drill.begin` -- fault-injecting model servers, the brownout server with the drill settings
(:class:`DrillSettings`: short breaker waits, model timeouts and health intervals, so a drill takes
seconds), a :class:`~brownout.chaos.drills.load.Load` and a
:class:`~brownout.chaos.drills.measure.HealthWatcher` -- then injects its fault, marks the timeline,
restores, and judges with the shared checks (:meth:`Drill.common_checks`, :meth:`Drill.recovery_check`,
:meth:`Drill.audit_writes`) and its own (:meth:`Drill.check`). The runner stops everything the drill
started, whatever happened.

Budgets (the goals of issue 5, made concrete for these settings):

* detection: within 1 s of the first failed call. The first failed call after the fault is expected
  one request interval (1/rate) plus one baseline request latency later, plus the role's timeout when
  the fault is latency (hang, slow): ``budget = 1/rate + p50 + [timeout] + 1 s``;
* recovery: the breaker's open wait plus one probe: ``budget = circuit_breaker.timeout + one health
  cycle (health_interval + health_timeout) + success_threshold probe calls at the load's rate + 0.5 s``
  of measurement slack (the health poll interval and the tail of a request).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from brownout.chaos.drills.load import Load, Sample
from brownout.chaos.drills.measure import (
    MODE_ROLES,
    ROLES,
    Check,
    Component,
    EventRecorder,
    HealthSample,
    HealthWatcher,
    ScenarioResult,
    detection_time,
    lost_writes,
    recovery_time,
    spooled_keys,
    sqlite_request_ids,
)
from brownout.chaos.drills.processes import BrownoutServer, ChildProcess, DrillError, FakeModel, log_tail
from brownout.chaos.drills.spec import Scenario
from brownout.clock import Clock
from brownout.llm.guard import GuardConfig, reask_wait

__all__ = [
    "ROLES",
    "Drill",
    "DrillError",
    "DrillProgress",
    "DrillSettings",
    "Play",
    "config_has",
    "seconds_text",
    "server_config",
]


@dataclass(frozen=True, slots=True)
class DrillSettings:
    """The drill server's settings and the drill's timings (seconds)."""

    breaker_timeout: float = 2.0
    role_timeout: float = 1.0
    health_interval: float = 0.5
    health_timeout: float = 0.5
    request_timeout: float = 5.0
    write_timeout: float = 1.0
    warmup: float = 2.0
    tail: float = 1.0
    poll: float = 0.1
    startup_timeout: float = 90.0
    data_recovery_budget: float = 5.0
    detect_slack: float = 1.0


class DrillProgress:
    """Receives a drill's progress; the base class ignores it (the CLI renders it with rich)."""

    def scenario_started(self, scenario: Scenario) -> None:
        """A scenario starts."""

    def phase(self, scenario: Scenario, text: str) -> None:
        """The scenario entered a phase (starting, warm-up, fault, restore, ...)."""

    def sample(self, scenario: Scenario, sample: Sample) -> None:
        """A request of the scenario's load finished."""

    def health(self, scenario: Scenario, sample: HealthSample) -> None:
        """A ``/health`` poll finished."""

    def scenario_finished(self, result: ScenarioResult) -> None:
        """A scenario has its result."""


def config_has(*path: str) -> bool:
    """Whether the server's config model has the (nested) field ``path``."""
    from pydantic import BaseModel

    from brownout.config import BrownoutConfig

    model: Any = BrownoutConfig
    for name in path:
        fields = getattr(model, "model_fields", {})
        if name not in fields:
            return False
        model = fields[name].annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            model = None
    return True


def server_config(
    settings: DrillSettings,
    port: int,
    urls: Mapping[str, str],
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The drill server's config: the defaults with short waits; roles missing from ``urls`` run the
    local model. ``overrides`` (a scenario's ``config``) are merged last."""
    local = [r for r in ROLES if r not in urls]
    roles: dict[str, Any] = {}
    for role in ROLES:
        roles[role] = {"timeout": settings.role_timeout}
        if role in urls:
            roles[role]["endpoints"] = [{"url": urls[role], "model": role}]
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "request_timeout": settings.request_timeout},
        "models": {
            "local": {"enabled": bool(local), "ctx": 2048},
            "roles": roles,
            "health_interval": settings.health_interval,
            "health_timeout": settings.health_timeout,
        },
        # Re-asks without the default 1 s backoff: a drill measures the guard, not its waiting.
        "json_guard": {"backoff_base": 0.05, "jitter": 0.05},
        "circuit_breaker": {"timeout": settings.breaker_timeout},
        "database": {
            "url": f"sqlite+aiosqlite:///{workdir / 'briefs.db'}",
            "spool_path": str(workdir / "spool.db"),
            "write_timeout": settings.write_timeout,
        },
    }
    # Sections of the operations layer, where the server has them: the system mode follows health
    # within a second instead of the default 10 s evaluations, and the database is looked for again
    # every half second while writes are spooled.
    if config_has("modes"):
        config["modes"] = {"interval": settings.health_interval}
    if config_has("database", "check_interval"):
        config["database"]["check_interval"] = settings.health_interval
    if config_has("database", "connect_timeout"):
        config["database"]["connect_timeout"] = settings.write_timeout
    return _merge(config, overrides or {})


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Drill:
    """One scenario's run: its stack, load, watchers, marks and result (what the plays work with)."""

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        settings: DrillSettings,
        clock: Clock,
        progress: DrillProgress,
    ) -> None:
        self.scenario = scenario
        self.workdir = workdir
        self.settings = settings
        self.clock = clock
        self.progress = progress
        self.fakes: dict[str, FakeModel] = {}
        self.server: BrownoutServer | None = None
        self.load: Load | None = None
        self.watcher: HealthWatcher | None = None
        self.events: EventRecorder | None = None
        self.servers: list[Any] = []  # private PostgreSQL / Redis servers a play started
        self.helpers: list[ChildProcess] = []
        # The non-model part the scenario's fault hits (None for model faults): a play whose fault hits
        # the database, Redis or the broker says so first, and detection and recovery then read its health.
        self.component: Component | None = None
        self.result = ScenarioResult(scenario.name, scenario.title, scenario.kind, mode=scenario.mode)
        self.result.rate = scenario.rate

    # ------------------------------------------------------------------ stack

    def phase(self, text: str) -> None:
        """Report a phase to the progress display."""
        self.progress.phase(self.scenario, text)

    def mark(self, label: str) -> float:
        """Record a moment of the timeline (fault, restore, ...) and return it."""
        t = self.clock.now()
        self.result.marks.append((t, label))
        return t

    async def begin(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        fakes: Iterable[str] = ROLES,
        database: bool = False,
        ready_timeout: float = 30.0,
    ) -> tuple[Load, HealthWatcher]:
        """Start the fakes and the server, wait until it could serve the scenario's mode in full, and
        start watching (``/health`` and the live stream). The load is built, not started."""
        for role in fakes:
            self.fakes[role] = FakeModel(role, self.workdir)
        await asyncio.gather(*(f.start(self.clock, 30.0) for f in self.fakes.values()))
        from brownout.chaos.servers import free_port

        urls = {role: fake.url for role, fake in self.fakes.items()}
        config = server_config(
            self.settings, free_port(), urls, self.workdir, _merge(self.scenario.config, overrides or {})
        )
        self.server = server = BrownoutServer(config, self.workdir)
        await server.start(self.clock, self.settings.startup_timeout)
        s = self.scenario
        self.load = load = Load(
            server.url,
            mode=s.mode,
            rate=s.rate,
            timeout=max(30.0, self.settings.request_timeout * 3),
            clock=self.clock,
            on_sample=lambda sample: self.progress.sample(s, sample),
        )
        self.watcher = watcher = HealthWatcher(
            server.url,
            interval=self.settings.poll,
            clock=self.clock,
            on_sample=lambda h: self.progress.health(s, h),
        )

        def ready(h: HealthSample) -> bool:
            return h.reachable and h.mode_available(s.mode) and (h.database_ok or not database)

        if await watcher.wait_for(ready, ready_timeout) is None:
            last = watcher.samples[-1] if watcher.samples else None
            raise DrillError(
                f"the stack never became ready for {s.mode!r} mode within {ready_timeout:g}s ({last})"
            )
        self.events = EventRecorder(server.url, clock=self.clock)
        self.events.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.events.connected.wait(), 5.0)
        watcher.start()
        self.result.t0 = self.clock.now()
        return load, watcher

    async def spawn_helper(self, name: str, code: str, ready: str, timeout: float = 30.0) -> ChildProcess:
        """Run ``python -c code`` as a helper process and wait until it prints ``ready``."""
        helper = ChildProcess(name, [sys.executable, "-c", code], self.workdir / f"{name}.log")
        self.helpers.append(helper)
        await helper.spawn()
        end = self.clock.now() + timeout
        while ready not in log_tail(helper.log, 5):
            if helper.proc is not None and helper.proc.returncode is not None:
                raise DrillError(f"{name} exited early:\n{log_tail(helper.log)}")
            if self.clock.now() > end:
                raise DrillError(f"{name} was not ready within {timeout:g}s:\n{log_tail(helper.log)}")
            await self.clock.sleep(0.05)
        return helper

    async def server_json(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` of the server as JSON (None when it does not answer 200 with an object)."""
        assert self.server is not None
        async with httpx.AsyncClient(base_url=self.server.url, timeout=10.0, trust_env=False) as http:
            try:
                response = await http.get(path)
                body = response.json()
            except (httpx.HTTPError, ValueError):
                return None
        return body if response.status_code == 200 and isinstance(body, dict) else None

    async def end_load(self) -> None:
        """Stop the load and the watchers; note what recovery left switched off (if anything)."""
        if self.load is not None:
            await self.load.stop()
        if self.watcher is not None:
            await self.watcher.aclose()
        status = await self.server_json("/api/v1/recovery/status")
        if status is not None:
            off = {k: v for k, v in (status.get("switched_off") or {}).items() if v}
            if off:
                self.result.extra["switched_off_at_end"] = off
            if status.get("system_mode") not in (None, "normal"):
                self.result.extra["system_mode_at_end"] = status.get("system_mode")
            in_force = (status.get("recovery") or {}).get("in_force")
            if in_force:
                self.result.extra["recovery_in_force_at_end"] = in_force
        if self.events is not None:
            await self.events.aclose()

    async def stop(self) -> None:
        """Stop everything the drill started; never raises."""
        for closer in (self.load, self.watcher, self.events):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.aclose()
        for helper in self.helpers:
            with contextlib.suppress(Exception):
                await helper.stop(5.0)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop()
        for fake in self.fakes.values():
            with contextlib.suppress(Exception):
                await fake.stop()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.cleanup)

    # ------------------------------------------------------------------ figures and checks

    def baseline_latency(self, before: float) -> float:
        """Median latency of the full answers before ``before`` (0 when there are none)."""
        assert self.load is not None
        full = [s.latency for s in self.load.samples if s.done < before and s.outcome == "full"]
        return statistics.median(full) if full else 0.0

    def detection_budget(self, fault_at: float) -> float:
        """Seconds the detection may take: the first failed call's expected time plus 1 s."""
        s = self.scenario
        budget = 1.0 / s.rate + self.baseline_latency(fault_at) + self.settings.detect_slack
        if s.fault.latency:
            budget += self.settings.role_timeout
        if s.fault.behaviour.get("mode") in ("garbage", "wrong_schema", "malformed"):
            # The first failed call is the first bad answer, but only the guard's last re-ask makes it
            # a failure (a fallback): its re-asks and their backoff come first.
            assert self.server is not None
            guard = self.server.config.json_guard
            # The guard's own waits (the service builds its guard with the default backoff_max), each
            # with the most jitter it can draw.
            waits = GuardConfig(backoff_base=guard.backoff_base)
            backoff = sum(reask_wait(waits, k) + guard.jitter for k in range(1, guard.max_retries + 1))
            budget += guard.max_retries * self.baseline_latency(fault_at) + backoff
        return budget

    def recovery_budget(self) -> float:
        """Seconds full mode may take to return: the breaker's open wait plus one probe (module
        docstring), plus the system mode's evaluations before it steps down where the server has them."""
        st = self.settings
        assert self.server is not None
        config = self.server.config
        success = config.circuit_breaker.success_threshold
        budget = (
            st.breaker_timeout + st.health_interval + st.health_timeout + success / self.scenario.rate + 0.5
        )
        modes = getattr(config, "modes", None)
        if modes is not None:
            budget += modes.interval * modes.recover_after
        return budget

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        """Add a line to the verdict."""
        self.result.checks.append(Check(name, bool(passed), detail))

    def failed_check(self) -> None:
        """The goal every drill shares: no request failed (a 503 with Retry-After is not a failure)."""
        assert self.load is not None
        failed = [x for x in self.load.samples if x.outcome == "failed"]
        self.check(
            "no failed requests",
            len(failed) <= self.scenario.goals.max_failed,
            f"{len(failed)} failed" + (f" (first: {failed[0].detail})" if failed else ""),
        )

    def common_checks(
        self, fault_at: float | None, restore_at: float | None, *, health_detection: bool = True
    ) -> None:
        """The checks every load-driven drill shares (goals, served modes, outcomes).

        Detection is read from ``/health`` and the answers unless the play measured it already, or
        ``health_detection`` is False (the play's own signal is the only one that counts)."""
        s, r = self.scenario, self.result
        assert self.load is not None
        assert self.watcher is not None
        samples, health = self.load.samples, self.watcher.samples
        r.counts = dict(self.load.counts())
        self.failed_check()
        if fault_at is not None:
            before = [x for x in samples if x.done < fault_at]
            self.check(
                "baseline served in full before the fault",
                any(x.outcome == "full" for x in before),
                f"{sum(x.outcome == 'full' for x in before)} of {len(before)} full",
            )
            component = self.component
            hit = s.fault.roles or (() if component is not None else MODE_ROLES[s.mode])
            if r.detection_s is None and health_detection:
                r.detection_s = detection_time(fault_at, health, samples, hit, component=component)
            if r.detection_budget_s is None:
                r.detection_budget_s = self.detection_budget(fault_at)
            if s.goals.detect:
                self.check(
                    "detected within 1 s of the first failed call",
                    r.detection_s is not None and r.detection_s <= r.detection_budget_s,
                    f"{seconds_text(r.detection_s)} (budget {r.detection_budget_s:.2f} s)",
                )
        if restore_at is not None and fault_at is not None:
            during = [x for x in samples if fault_at <= x.done <= restore_at + 0.5]
            for outcome in s.goals.must_see:
                n = sum(x.outcome == outcome for x in during)
                self.check(f"{outcome} answers during the fault", n > 0, f"{n} of {len(during)}")
            if s.goals.served_modes:
                modes = sorted({x.served_mode for x in during if x.served_mode})
                self.check(
                    f"served in {'/'.join(s.goals.served_modes)} mode during the fault",
                    any(m in s.goals.served_modes for m in modes),
                    f"modes seen: {', '.join(modes) or 'none'}",
                )

    def recovery_check(self, restore_at: float, budget: float) -> None:
        """Full mode back within ``budget`` seconds of ``restore_at``."""
        assert self.load is not None
        assert self.watcher is not None
        r = self.result
        r.recovery_s = recovery_time(
            restore_at,
            self.watcher.samples,
            self.load.samples,
            self.scenario.mode,
            component=self.component,
        )
        r.recovery_budget_s = budget
        if self.scenario.goals.recover:
            detail = f"{seconds_text(r.recovery_s)} (budget {budget:.2f} s)"
            off = r.extra.get("switched_off_at_end")
            if r.recovery_s is None and off:
                detail += f"; still switched off at the end: {off}"
            self.check(
                "full mode back within the budget after restore",
                r.recovery_s is not None and r.recovery_s <= budget,
                detail,
            )

    async def wait_recovered(self, restore_at: float, budget: float) -> None:
        """Keep the load running until full mode is back (or the budget plus 5 s ran out), then a tail."""
        assert self.load is not None
        assert self.watcher is not None
        end = restore_at + budget + 5.0
        while self.clock.now() < end:
            back = recovery_time(
                restore_at,
                self.watcher.samples,
                self.load.samples,
                self.scenario.mode,
                component=self.component,
            )
            if back is not None:
                break
            await self.clock.sleep(0.1)
        await self.clock.sleep(self.settings.tail)

    async def wait_recovered_with(self, load: Load, restore_at: float, budget: float) -> None:
        """Like :meth:`wait_recovered`, with the answers of ``load`` (a load started after ``restore_at``)."""
        assert self.watcher is not None
        end = restore_at + budget + 5.0
        while self.clock.now() < end:
            back = recovery_time(
                restore_at, self.watcher.samples, load.samples, self.scenario.mode, component=self.component
            )
            if back is not None:
                break
            await self.clock.sleep(0.1)
        await self.clock.sleep(self.settings.tail)

    def audit_writes(self, rows: set[str], spool: Path) -> None:
        """Acknowledged writes against ``rows`` and the spool file; adds the lost-writes check."""
        assert self.load is not None
        audit = lost_writes(self.load.samples, rows, spooled_keys(spool))
        self.result.writes = audit
        if self.scenario.goals.lost_writes:
            self.check(
                "no lost writes",
                audit.lost_count == 0,
                f"{audit.acknowledged} acknowledged, {audit.found} in the database, {audit.spooled} spooled, "
                f"{audit.lost_count} lost" + (f" (e.g. {audit.lost[0]})" if audit.lost else ""),
            )

    async def finish_sqlite(self) -> None:
        """Stop the server, then audit the acknowledged writes against its SQLite database."""
        assert self.server is not None
        await self.server.stop()
        rows = await asyncio.to_thread(sqlite_request_ids, self.workdir / "briefs.db")
        self.audit_writes(rows, self.workdir / "spool.db")


Play = Callable[[Drill], Awaitable[None]]
"""A scenario's play: drives its fault against a :class:`Drill` and adds the checks of its verdict."""


def seconds_text(value: float | None) -> str:
    """A duration for a check's detail: ``1.23 s``, or ``never`` for one that did not happen."""
    return "never" if value is None else f"{value:.2f} s"
