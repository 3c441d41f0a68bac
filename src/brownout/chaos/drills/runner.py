"""Runs a drill for real: starts the stack, drives load, injects the fault, restores, measures, judges.

For each :class:`~brownout.chaos.drills.catalog.Scenario` the runner starts, in a temporary directory:

* one fault-injecting model server per role as its own process (``python -m brownout.chaos.fakellm
  --port N``), switched at run time through ``POST /_control`` and frozen with SIGSTOP for a hang;
* for data scenarios a private PostgreSQL (:class:`brownout.testing_servers.PostgresServer`);
* the brownout server itself as a subprocess, ``python -m brownout serve --config <drill.yaml>``, with
  the drill settings: short breaker waits, model timeouts and health intervals, so a drill takes
  seconds (:class:`DrillSettings`);

then runs the scenario's *play* with a :class:`~brownout.chaos.drills.load.Load` and a
:class:`~brownout.chaos.drills.measure.HealthWatcher`, and stops everything, whatever happened.

A scenario whose requirements are missing (:func:`missing`) is not run: its result has status
``waiting`` and names what it waits on.

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
import atexit
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from brownout.bench import child_env, percentile
from brownout.bench.client import retry_pause
from brownout.chaos.drills.catalog import CATALOG, Scenario
from brownout.chaos.drills.load import Load, Sample, brief_text
from brownout.chaos.drills.measure import (
    MODE_ROLES,
    Check,
    Component,
    EventRecorder,
    HealthSample,
    HealthWatcher,
    ScenarioResult,
    broker_ok,
    database_ok,
    detection_time,
    lost_writes,
    recovery_time,
    redis_ok,
    spooled_keys,
    sqlite_request_ids,
)
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.llm.guard import GuardConfig, reask_wait

__all__ = [
    "DrillError",
    "DrillProgress",
    "DrillSettings",
    "missing",
    "run_drills",
    "run_scenario",
    "server_config",
]

ROLES = ("qwen", "mistral", "llama")

# Children still running, killed at interpreter exit: a drill interrupted half-way leaves no server.
_LIVE: set[int] = set()


@atexit.register
def _kill_live() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


class DrillError(RuntimeError):
    """The drill could not set up or drive the stack (not a verdict on the server)."""


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


# ---------------------------------------------------------------------------------------------- requirements


def _need_postgres() -> str | None:
    from brownout.chaos.servers import ServerBinaryMissing, find_postgres_bindir

    try:
        find_postgres_bindir()
    except ServerBinaryMissing as e:
        return str(e)
    return None


def _need_redis() -> str | None:
    from brownout.chaos.servers import ServerBinaryMissing, find_redis_server

    try:
        find_redis_server()
    except ServerBinaryMissing as e:
        return str(e)
    return None


def _need_local_model() -> str | None:
    import importlib.util

    from brownout.errors import ConfigError
    from brownout.llm._serve_local import default_model_path

    try:
        default_model_path()
    except ConfigError as e:
        return str(e)
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (pip install -e '.[server]')"
    return None


def _config_has(*path: str) -> bool:
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


def _need_server_redis() -> str | None:
    if _config_has("redis"):
        return None
    return "the server keeps no shared state in Redis yet (no `redis` section in brownout.config)"


def _need_failover() -> str | None:
    if _config_has("database", "failover_urls"):
        return None
    return "the server cannot follow a PostgreSQL primary switch yet (no `database.failover_urls`)"


def _need_broker() -> str | None:
    if _config_has("events", "outbox_path") and _config_has("redis", "url"):
        return None
    return "the server publishes no events to a broker yet (no `events` outbox section)"


def _need_loop_detector() -> str | None:
    if _config_has("loop_block"):
        return None
    return "no event-loop blocking detector in the server yet (no `loop_block` section)"


def _need_resource_monitor() -> str | None:
    if _config_has("resources") and _config_has("recovery"):
        return None
    return "no resource monitor and recovery manager in the server yet (no `resources`/`recovery` sections)"


REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "fakellm": lambda: None,
    "local-model": _need_local_model,
    "postgres": _need_postgres,
    "redis": _need_redis,
    "server-redis": _need_server_redis,
    "database-failover": _need_failover,
    "event-broker": _need_broker,
    "loop-detector": _need_loop_detector,
    "resource-monitor": _need_resource_monitor,
}
"""Each requirement's check: None when it is met, else why not."""


def missing(scenario: Scenario) -> list[str]:
    """What ``scenario`` waits on (empty when it can run here and now)."""
    out = []
    for name in scenario.requires:
        check = REQUIREMENTS.get(name)
        reason = f"unknown requirement {name!r}" if check is None else check()
        if reason is not None:
            out.append(f"{name}: {reason}")
    if scenario.play not in PLAYS and not out:
        out.append(f"the drill's play {scenario.play!r} is not written yet")
    return out


# ---------------------------------------------------------------------------------------------- processes


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Process:
    """A child process of the drill, its output in a log file."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def spawn(self) -> None:
        out = await asyncio.to_thread(open, self.log, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env(),
            )
        finally:
            out.close()
        _LIVE.add(self.proc.pid)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGSTOP freezes, SIGCONT thaws)."""
        pid = self.pid
        if pid is None:
            raise DrillError(f"{self.name} is not running")
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (after SIGCONT if frozen), then SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.paused:
                    proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        _LIVE.discard(proc.pid)


class FakeModel(_Process):
    """A ``brownout.chaos.fakellm`` process serving one role on 127.0.0.1."""

    def __init__(self, role: str, workdir: Path) -> None:
        from brownout.chaos.servers import free_port

        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "brownout.chaos.fakellm", "--port", str(self.port), "--model", role]
        super().__init__(f"fake {role}", command, workdir / f"fake-{role}.log")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=5.0, trust_env=False)

    async def start(self, clock: Clock, timeout: float) -> None:
        """Spawn it and wait until its control API answers."""
        await self.spawn()
        end = clock.now() + timeout
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise DrillError(f"{self.name} exited while starting:\n{_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get("/_control")).status_code == 200:
                    return
            if clock.now() > end:
                raise DrillError(f"{self.name} did not answer within {timeout:g}s:\n{_tail(self.log)}")
            await clock.sleep(0.05)

    async def set(self, behaviour: Mapping[str, Any]) -> None:
        """Switch its behaviour (the whole behaviour: fields left out take their defaults)."""
        response = await self._http.post("/_control", json=dict(behaviour))
        if response.status_code != 200:
            raise DrillError(f"{self.name} refused behaviour {dict(behaviour)}: {response.text}")

    async def counters(self) -> dict[str, Any]:
        """Its behaviour and request counters (``GET /_control``)."""
        data: dict[str, Any] = (await self._http.get("/_control")).json()
        return data

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the process and close the control client."""
        await super().stop(grace)
        await self._http.aclose()


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
            "local": {"enabled": bool(local), "threads": 1, "ctx": 2048},
            "roles": roles,
            "health_interval": settings.health_interval,
            "health_timeout": settings.health_timeout,
        },
        # Re-asks without the seed's 1 s backoff: a drill measures the guard, not its waiting.
        "json_guard": {"backoff_base": 0.05, "jitter": 0.05},
        "circuit_breaker": {"timeout": settings.breaker_timeout},
        "database": {
            "url": f"sqlite+aiosqlite:///{workdir / 'briefs.db'}",
            "spool_path": str(workdir / "spool.db"),
            "write_timeout": settings.write_timeout,
        },
    }
    # Sections of the operations layer, where the server has them: the system mode follows health
    # within a second instead of the seed's 10 s evaluations, and the database is looked for again
    # every half second while writes are spooled.
    if _config_has("modes"):
        config["modes"] = {"interval": settings.health_interval}
    if _config_has("database", "check_interval"):
        config["database"]["check_interval"] = settings.health_interval
    if _config_has("database", "connect_timeout"):
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


class BrownoutServer(_Process):
    """``python -m brownout serve --config <workdir>/drill.yaml`` on a free port of 127.0.0.1."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        from brownout.config import BrownoutConfig

        # Validate here, so a bad drill config is reported as such and not as a server that died.
        self.config = BrownoutConfig.model_validate(config)
        self.port = int(config["server"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "drill.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "brownout", "serve", "--config", str(path), "--log-level", "warning"]
        super().__init__("brownout server", command, workdir / "server.log")

    async def start(self, clock: Clock, timeout: float) -> None:
        """Spawn it and wait until ``/health`` answers."""
        await self.spawn()
        end = clock.now() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0, trust_env=False) as http:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise DrillError(f"the brownout server exited while starting:\n{_tail(self.log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        return
                if clock.now() > end:
                    raise DrillError(
                        f"the brownout server did not answer within {timeout:g}s:\n{_tail(self.log)}"
                    )
                await clock.sleep(0.1)


# ---------------------------------------------------------------------------------------------- a drill


_COMPONENTS: dict[str, Component] = {
    "database_outage": database_ok,
    "database_switch": database_ok,
    "redis_outage": redis_ok,
    "broker_outage": broker_ok,
}


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
        self.servers: list[Any] = []  # private PostgreSQL / Redis servers a play started (testing_servers)
        self.helpers: list[_Process] = []
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

    async def spawn_helper(self, name: str, code: str, ready: str, timeout: float = 30.0) -> _Process:
        """Run ``python -c code`` as a helper process and wait until it prints ``ready``."""
        helper = _Process(name, [sys.executable, "-c", code], self.workdir / f"{name}.log")
        self.helpers.append(helper)
        await helper.spawn()
        end = self.clock.now() + timeout
        while ready not in _tail(helper.log, 5):
            if helper.proc is not None and helper.proc.returncode is not None:
                raise DrillError(f"{name} exited early:\n{_tail(helper.log)}")
            if self.clock.now() > end:
                raise DrillError(f"{name} was not ready within {timeout:g}s:\n{_tail(helper.log)}")
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

    @property
    def component(self) -> Component | None:
        """The non-model part the scenario's fault hits (None for model faults)."""
        return _COMPONENTS.get(self.scenario.play)

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
                    f"{_s(r.detection_s)} (budget {r.detection_budget_s:.2f} s)",
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
            detail = f"{_s(r.recovery_s)} (budget {budget:.2f} s)"
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


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


# ---------------------------------------------------------------------------------------------- plays


async def _model_fault(d: Drill) -> None:
    """A fault on one or more model roles (FakeLLM behaviour or SIGSTOP) under load, then restore."""
    s = d.scenario
    d.phase("starting fakes and server")
    load, _ = await d.begin()
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase(f"fault: {s.fault.action} {', '.join(s.fault.roles)}")
    fault_at = d.mark("fault")
    for role in s.fault.roles:
        if s.fault.action == "sigstop":
            d.fakes[role].signal(signal.SIGSTOP)
        else:
            await d.fakes[role].set(s.fault.behaviour)
    await d.clock.sleep(s.fault.hold)
    d.phase("restore")
    for role in s.fault.roles:
        if s.fault.action == "sigstop":
            d.fakes[role].signal(signal.SIGCONT)
        else:
            await d.fakes[role].set({"mode": "ok"})
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    d.phase("recovering")
    await d.wait_recovered(restore_at, budget)
    await d.end_load()
    d.phase("auditing writes")
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


async def _local_model_crash(d: Drill) -> None:
    """SIGKILL the hinter's supervised local model server; the supervisor restarts it."""
    s = d.scenario
    role = s.fault.roles[0]
    d.phase("starting fakes, the local model and the server")
    # The real model answers in seconds, one request at a time: give its role the seed's timeout,
    # requests room, and health probes (which queue behind a generation) the seed's 10 s.
    load, watcher = await d.begin(
        {
            "models": {"roles": {role: {"timeout": 20.0}}, "health_timeout": 10.0},
            "server": {"request_timeout": 60.0},
        },
        fakes=[r for r in ROLES if r != role],
        ready_timeout=d.settings.startup_timeout,
    )
    load.start()
    d.phase("warm-up (until a full answer)")
    end = d.clock.now() + 90.0
    while not any(x.outcome == "full" for x in load.samples) and d.clock.now() < end:
        await d.clock.sleep(0.1)
    before = await watcher.poll()
    server = before.servers.get(role) or {}
    pid, restarts, url = server.get("pid"), int(server.get("restarts", 0)), server.get("url")
    if not pid:
        raise DrillError(f"/health shows no local model server pid for {role}: {server}")
    d.phase(f"fault: SIGKILL {role} model server (pid {pid})")
    fault_at = d.mark("fault")
    os.kill(int(pid), signal.SIGKILL)

    def restarted(h: HealthSample) -> bool:
        info = h.servers.get(role) or {}
        return h.reachable and info.get("state") == "running" and info.get("pid") not in (None, pid)

    d.phase("waiting for the supervisor's restart")
    back = await watcher.wait_for(restarted, 90.0)
    restore_at = d.mark("restarted") if back is not None else fault_at
    # The restart is the restore; full mode must follow within one health cycle and a probe.
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    after = await watcher.poll()
    await d.end_load()
    info = after.servers.get(role) or {}
    d.result.extra.update(
        pid_before=pid,
        pid_after=info.get("pid"),
        restarts=int(info.get("restarts", 0)) - restarts,
        restart_s=None if back is None else round(back.t - fault_at, 3),
    )
    d.check(
        "the supervisor restarted the model server",
        back is not None,
        f"running again after {_s(back.t - fault_at if back else None)}",
    )
    d.check(
        "same port, restart counted",
        info.get("url") == url and int(info.get("restarts", 0)) > restarts,
        f"url {info.get('url')}, restarts {restarts} -> {info.get('restarts')}",
    )
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


async def _postgres(d: Drill, **kwargs: Any) -> Any:
    from brownout.chaos.servers import PostgresServer

    pg = PostgresServer(**kwargs)
    d.servers.append(pg)
    await pg.astart()
    return pg


async def _database_outage(d: Drill) -> None:
    """Kill the PostgreSQL holding the briefs under load, start it again, audit every write."""
    s = d.scenario
    d.phase("starting PostgreSQL, fakes and server")
    pg = await _postgres(d)
    database = await asyncio.to_thread(pg.create_database)
    load, watcher = await d.begin({"database": {"url": database.url}}, database=True)
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: PostgreSQL killed")
    fault_at = d.mark("fault")
    if s.fault.action == "sigkill":
        await asyncio.to_thread(pg.kill)
    else:
        await pg.astop()
    await d.clock.sleep(s.fault.hold)
    d.phase("restore: PostgreSQL restarted")
    await pg.astart()
    restore_at = d.mark("restore")
    budget = d.settings.data_recovery_budget
    await d.wait_recovered(restore_at, budget)
    d.phase("waiting for the spool to drain")
    await load.stop()
    await watcher.wait_for(lambda h: h.reachable and h.spool_pending == 0 and h.database_ok, 30.0)
    await d.end_load()
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    _spool_check(d)
    d.phase("auditing writes")
    rows = await asyncio.to_thread(_pg_request_ids, pg, database.name)
    assert d.server is not None
    await d.server.stop()
    d.audit_writes(rows, d.workdir / "spool.db")


def _pg_request_ids(pg: Any, database: str) -> set[str]:
    return {str(row[0]) for row in pg.execute("SELECT request_id FROM briefs", database=database)}


def _spool_check(d: Drill) -> None:
    assert d.watcher is not None
    pending = max((h.spool_pending for h in d.watcher.samples), default=0)
    d.result.extra["max_spool_pending"] = pending
    d.check("writes were spooled while no database took them", pending > 0, f"max pending {pending}")


async def _database_switch(d: Drill) -> None:
    """Primary killed under load; the synchronous standby is promoted; the server follows it."""
    s = d.scenario
    d.phase("starting PostgreSQL primary and standby, fakes and server")
    primary = await _postgres(d)
    database = await asyncio.to_thread(primary.create_database)
    from brownout.chaos.servers import PostgresServer

    standby = PostgresServer(standby_of=primary)
    d.servers.append(standby)
    await standby.astart()
    # Synchronous commit (seed 003 scenario A: "zero data loss"): a write is acknowledged only once the
    # standby has it, so promoting the standby loses nothing that was acknowledged.
    await asyncio.to_thread(primary.execute, "ALTER SYSTEM SET synchronous_standby_names = '*'")
    await asyncio.to_thread(primary.execute, "SELECT pg_reload_conf()")
    load, watcher = await d.begin(
        {"database": {"url": database.url, "failover_urls": [standby.url_for(database.name)]}}, database=True
    )
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: primary killed")
    fault_at = d.mark("fault")
    await asyncio.to_thread(primary.kill)
    await d.clock.sleep(s.fault.hold)
    d.phase("promoting the standby")
    await asyncio.to_thread(standby.promote)
    restore_at = d.mark("promoted")
    budget = d.settings.data_recovery_budget
    await d.wait_recovered(restore_at, budget)
    await load.stop()
    d.phase("waiting for the spool to drain")
    await watcher.wait_for(lambda h: h.reachable and h.spool_pending == 0 and h.database_ok, 30.0)
    health = await d.server_json("/health")
    await d.end_load()
    db = (health or {}).get("database") or {}
    d.result.extra.update(writable_host=db.get("writable_host"), failovers=db.get("failovers"))
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    _spool_check(d)
    d.check(
        "the server writes to the promoted standby",
        str(standby.port) in str(db.get("writable_host")),
        f"writable host {db.get('writable_host')}, failovers {db.get('failovers')}",
    )
    d.phase("auditing writes")
    rows = await asyncio.to_thread(_pg_request_ids, standby, database.name)
    assert d.server is not None
    await d.server.stop()
    d.audit_writes(rows, d.workdir / "spool.db")


async def _redis(d: Drill) -> Any:
    from brownout.chaos.servers import RedisServer

    redis = RedisServer()
    d.servers.append(redis)
    await redis.astart()
    return redis


def _redis_config(d: Drill, url: str) -> dict[str, Any]:
    return {
        "redis": {"url": url, "health_interval": d.settings.health_interval},
        "events": {"outbox_path": str(d.workdir / "events.db")},
    }


async def _redis_outage(d: Drill) -> None:
    """Stop the Redis holding the shared state under load; it comes back empty, as a cache node."""
    s = d.scenario
    d.phase("starting Redis, fakes and server")
    redis = await _redis(d)
    load, watcher = await d.begin(_redis_config(d, redis.url))
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: Redis stopped")
    fault_at = d.mark("fault")
    await redis.astop()
    await d.clock.sleep(s.fault.hold)
    d.phase("restore: Redis started (empty)")
    await redis.astart()
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    await d.end_load()
    statuses = sorted({h.redis_status for h in watcher.samples if h.reachable and h.t >= fault_at})
    d.result.extra["redis_statuses"] = statuses
    d.check(
        "the server saw Redis go",
        any(st not in ("healthy", "") for st in statuses),
        f"redis statuses seen: {', '.join(statuses) or 'none'}",
    )
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


async def _broker_outage(d: Drill) -> None:
    """Freeze the broker (the Redis holding the event stream) under load; every brief's event must
    reach the stream exactly once when it is back."""
    s = d.scenario
    d.phase("starting Redis, fakes and server")
    redis = await _redis(d)
    config = _redis_config(d, redis.url)
    load, watcher = await d.begin(config)
    stream = d.server.config.events.stream if d.server is not None else "brownout:events"
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase("fault: broker frozen (SIGSTOP)")
    fault_at = d.mark("fault")
    await asyncio.to_thread(redis.pause)
    await d.clock.sleep(s.fault.hold)
    d.phase("restore: broker resumed")
    await asyncio.to_thread(redis.resume)
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    await load.stop()
    d.phase("waiting for the outbox to drain")
    await watcher.wait_for(lambda h: h.reachable and h.events_pending == 0, 30.0)
    await d.end_load()
    pending = max((h.events_pending for h in watcher.samples), default=0)
    dead = max((h.events_dead for h in watcher.samples), default=0)
    d.result.extra.update(max_events_pending=pending, dead_letters=dead)
    d.check("events waited in the outbox during the outage", pending > 0, f"max pending {pending}")
    d.check("no event moved to dead letters", dead == 0, f"{dead} dead letters")
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    published = await asyncio.to_thread(_stream_request_ids, redis, stream)
    assert d.load is not None
    acked = [x.request_id for x in d.load.samples if x.acknowledged and x.request_id]
    counts = {rid: published.count(rid) for rid in acked}
    lost = [rid for rid, n in counts.items() if n == 0]
    twice = [rid for rid, n in counts.items() if n > 1]
    d.result.extra.update(
        events_published=len(published), events_lost=len(lost), events_duplicated=len(twice)
    )
    d.check(
        "every stored brief's event published exactly once",
        not lost and not twice and bool(acked),
        f"{len(acked)} briefs, {len(lost)} events missing, {len(twice)} published twice",
    )
    await d.finish_sqlite()


def _stream_request_ids(redis: Any, stream: str) -> list[str]:
    """The ``request_id`` of every ``brief_created`` entry of the Redis stream (in order)."""
    entries = redis.command("XRANGE", stream, "-", "+", timeout=30.0)
    out: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        fields = entry[1] if isinstance(entry, list) and len(entry) == 2 else []
        pairs = dict(zip(fields[::2], fields[1::2], strict=False))
        if pairs.get(b"type") != b"brief_created":
            continue
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(pairs.get(b"data", b"{}"))
            if isinstance(data, dict) and data.get("request_id"):
                out.append(str(data["request_id"]))
    return out


async def _stampede(d: Drill) -> None:
    """Prime a key, let it expire, then 1000 identical requests at once; count generator calls."""
    s = d.scenario
    callers = 1000
    ttl = float(s.config.get("cache", {}).get("ttl_seconds", 1.0))
    d.phase("starting fakes and server")
    # No periodic health probes (they are chat calls too: only the pipeline's may be counted), and the
    # TTL fixed (an adaptive TTL would lengthen it under load).
    # The thousand callers all come from 127.0.0.1 here, where in production they are a thousand
    # clients: lift the per-address connection cap for the drill.
    overrides: dict[str, Any] = {
        "models": {"health_interval": 3600.0},
        "server": {"max_connections_per_client": 0},
    }
    if _config_has("modes", "adaptive_ttl"):
        overrides["modes"] = {"adaptive_ttl": {"enabled": False}}
    load, _watcher = await d.begin(overrides)
    text = "A fresh summer scent with lemon and sea breeze for the beach"
    d.phase("priming the key")
    primed = await load.send(text)
    if primed.outcome != "full":
        raise DrillError(f"priming request was not served in full: {primed.outcome} {primed.detail}")
    # The computation takes a few seconds, as a real model's would: the burst arrives while it runs.
    await d.fakes["qwen"].set({"mode": "ok", "delay": float(s.fault.behaviour.get("delay", 3.0))})
    await d.clock.sleep(ttl + 0.5)
    d.phase(f"opening {callers} connections")
    await load.warm(callers)
    before = int((await d.fakes["qwen"].counters())["chat_requests"])
    d.phase(f"{callers} concurrent requests on the expired key")
    d.mark("burst")
    burst = await load.burst(callers, text=lambda _: text)
    d.mark("answered")
    after = int((await d.fakes["qwen"].counters())["chat_requests"])
    await d.clock.sleep(d.settings.tail)
    await d.end_load()
    d.result.computations = after - before
    d.result.counts = dict(load.counts())
    d.result.extra.update(
        callers=callers,
        coalesced=sum(1 for x in burst if x.status == 200 and not x.cached),
        from_cache=sum(1 for x in burst if x.cached),
        p50_ms=round(statistics.median(x.latency for x in burst) * 1000, 1),
        max_ms=round(max(x.latency for x in burst) * 1000, 1),
    )
    d.failed_check()
    ok = sum(x.status == 200 for x in burst)
    d.check("every caller got a brief", ok == callers, f"{ok} of {callers}")
    want = s.goals.computations
    d.check(
        f"{want} computation for {callers} callers",
        d.result.computations == want,
        f"{d.result.computations} generator calls",
    )
    await d.finish_sqlite()


async def _queue_overflow(d: Drill) -> None:
    """700 concurrent requests against a 2 s generator: 500 wait, the overflow gets 503 + Retry-After."""
    s = d.scenario
    callers = 700
    d.phase("starting fakes and server")
    # Probes off: a 2 s generator must stay "healthy" so that requests queue for it.
    load, watcher = await d.begin({"models": {"health_interval": 3600.0}})
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    await load.stop()
    fault_at = d.mark("slow generator + flood")
    for role in s.fault.roles:
        await d.fakes[role].set(s.fault.behaviour)
    d.phase(f"{callers} concurrent requests")
    # The flood is new callers: new connections, not the warm-up's kept-alive ones.
    crowd = Load(
        load.base_url,
        mode=s.mode,
        clock=d.clock,
        timeout=load.timeout,
        text=lambda i: f"{brief_text(i)} (flood)",
        on_sample=lambda x: d.progress.sample(s, x),
    )
    flood = asyncio.create_task(crowd.burst(callers))
    # Hold the flood until the queue has been seen full (or 30 s), then let the generator go fast.
    await watcher.wait_for(lambda h: h.queue_size >= 500, 30.0)
    await d.clock.sleep(0.5)
    restore_at = d.mark("restore")
    for role in s.fault.roles:
        await d.fakes[role].set({"mode": "ok"})
    d.phase("draining the queue")
    try:
        await flood
    finally:
        await crowd.aclose()
    load.samples.extend(crowd.samples)
    load.start()
    await d.wait_recovered(restore_at, 60.0)
    await d.end_load()
    r = d.result
    r.counts = dict(load.counts())
    rejected = [x for x in load.samples if x.outcome == "rejected"]
    max_queue = max((h.queue_size for h in watcher.samples), default=0)
    r.extra.update(callers=callers, max_queue_size=max_queue)
    if rejected:
        r.detection_s = max(0.0, min(x.done for x in rejected) - fault_at)
    d.failed_check()
    d.check(
        "overflow refused with 503 + Retry-After",
        len(rejected) >= s.goals.min_rejected,
        f"{len(rejected)} rejected",
    )
    # Seed 000: the refusal says how full the queue is and suggests the fast mode. (How fast a refusal
    # comes back is the admission policy's tests' business: from here it would measure the client's
    # time to open 700 connections on the machine as much as the server.)
    limit = d.server.config.queue.max_size if d.server is not None else 500
    told = [
        x
        for x in rejected
        if (x.info or {}).get("queue_size", 0) >= limit and (x.info or {}).get("suggestion")
    ]
    d.check(
        "refusals carry queue_size and a suggestion",
        bool(rejected) and len(told) == len(rejected),
        f"{len(told)} of {len(rejected)} with queue_size >= {limit} and a suggestion",
    )
    d.check("queue reached its limit (500)", max_queue >= 500, f"max queue_size seen {max_queue}")
    d.recovery_check(restore_at, 60.0)
    await d.finish_sqlite()


def _garbage(chars: int) -> str:
    """Chatty, unclosed near-JSON of about ``chars`` characters: what a small model writes without a
    grammar, and what json_repair works hardest on."""
    words = "lorem ipsum, dolor sit amet, {oops [unclosed 'x': "
    return '{"description": "' + words * (chars // len(words))


async def _loop_block(d: Drill) -> None:
    """CPU-bound work on the server's event loop: the generator answers oversized malformed JSON for a
    moment, and the JSON guard's repair of it runs on the loop."""
    s = d.scenario
    d.phase("starting fakes and server")
    load, _watcher = await d.begin()
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    assert d.events is not None
    blocks_before = await _loop_blocks(d)
    d.phase("fault: oversized garbage answers (repair on the loop)")
    fault_at = d.mark("fault")
    for role in s.fault.roles:
        chars = int(s.fault.behaviour.get("chars", 16_000))
        await d.fakes[role].set({"mode": "ok", "content": _garbage(chars)})
    await d.clock.sleep(s.fault.hold)
    for role in s.fault.roles:
        await d.fakes[role].set({"mode": "ok"})
    restore_at = d.mark("restore")
    d.phase("recovering")
    budget = d.recovery_budget()
    await d.wait_recovered(restore_at, budget)
    status = await _loop_status(d)
    await d.end_load()
    blocks = int(status.get("blocked_total", 0)) - blocks_before
    reported = d.events.first(fault_at, "LoopBlocked")
    r = d.result
    r.extra.update(
        loop_blocks=blocks,
        max_block_ms=status.get("max_block_ms"),
        routes=sorted(status.get("by_route", {})),
    )
    if reported is not None:
        r.detection_s = reported.t - fault_at
    max_block = float(status.get("max_block_ms", 0.0)) / 1000
    # A block is reported when it ends: the budget allows for the block itself.
    r.detection_budget_s = d.detection_budget(fault_at) + max_block
    d.check(
        "the detector reported blocks of the loop",
        blocks > 0,
        f"{blocks} blocks, longest {max_block * 1000:.0f} ms",
    )
    d.check(
        "blocks attributed to the brief route",
        any("/v1/briefs" in route for route in status.get("by_route", {})),
        f"routes: {', '.join(sorted(status.get('by_route', {}))) or 'none'}",
    )
    d.common_checks(fault_at, restore_at, health_detection=False)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


async def _loop_status(d: Drill) -> dict[str, Any]:
    health = await d.server_json("/api/v1/recovery/health") or {}
    loop = health.get("event_loop")
    return loop if isinstance(loop, dict) else {}


async def _loop_blocks(d: Drill) -> int:
    return int((await _loop_status(d)).get("blocked_total", 0))


_HOG = """
import sys, time
chunk = 64 * 1024 * 1024
held = []
for _ in range(int(sys.argv[1]) // chunk + 1):
    held.append(b"\\x01" * chunk)  # written, so resident: real memory, not a reservation
print("HOLDING", sum(map(len, held)), flush=True)
time.sleep(600)
"""


async def _recovery_history(d: Drill) -> list[dict[str, Any]]:
    actions = await d.server_json("/api/v1/recovery/actions") or {}
    history = actions.get("history")
    return [a for a in history if isinstance(a, dict)] if isinstance(history, list) else []


async def _shed_counts(d: Drill) -> tuple[float, float]:
    """From the server's ``brownout_shed_seconds``: refusals so far, and those answered within 50 ms."""
    from prometheus_client.parser import text_string_to_metric_families

    assert d.server is not None
    async with httpx.AsyncClient(base_url=d.server.url, timeout=10.0, trust_env=False) as http:
        try:
            text = (await http.get("/metrics")).text
        except httpx.HTTPError:
            return 0.0, 0.0
    total = fast = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "brownout_shed_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels.get("le", "nan")) == 0.05:
                fast = sample.value
    return total, fast


def _meminfo() -> tuple[int, int]:
    """Total and available memory in bytes, as the kernel reports them (what psutil's percent uses)."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


async def _memory_pressure(d: Drill) -> None:
    """Real memory pressure: thresholds set just above the machine's use, then a helper process holds
    enough memory to cross the critical one; the monitor alerts and recovery runs its chain."""
    s = d.scenario
    total, available = _meminfo()
    used = 100.0 * (total - available) / total
    margin = float(s.fault.behaviour.get("margin", 2.0))
    warning, critical = min(used + margin, 99.0), min(used + 2 * margin, 99.5)
    # Hold enough to pass critical by one more margin, bounded to a quarter of what is available.
    need = int(total * (3 * margin) / 100)
    if need > available // 4:
        raise DrillError(f"not enough free memory for a bounded pressure drill ({need >> 20} MiB needed)")
    d.phase("starting fakes and server")
    interval = float(s.fault.behaviour.get("interval", 0.5))
    overrides: dict[str, Any] = {
        "resources": {
            "interval": interval,
            "memory_warning": round(warning, 1),
            "memory_critical": round(critical, 1),
            # CPU is not this drill's subject: on a shared machine it must not trigger recovery too.
            "cpu_warning": 100.0,
            "cpu_critical": 100.0,
        }
    }
    if _config_has("recovery", "cooldown"):
        # A short cooldown, as the breaker's: a CPU spike of a busy machine (100 % cannot be excluded
        # by a threshold) must not hold the memory's recovery back for the seed's 30 s.
        overrides["recovery"] = {"cooldown": 1.0}
    load, _watcher = await d.begin(overrides)
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    assert d.events is not None
    d.phase(f"fault: holding {need >> 20} MiB (critical at {critical:.1f} %)")
    # The machine's memory use, sampled by the drill: when it crossed the critical level is the fault.
    usage: list[tuple[float, float]] = []

    async def sample_memory() -> None:
        while True:
            t_total, t_available = _meminfo()
            usage.append((d.clock.now(), 100.0 * (t_total - t_available) / t_total))
            await d.clock.sleep(0.05)

    # What the server says of it (the live stream cuts bursts of alerts, so its state is polled too).
    levels: list[tuple[float, str]] = []

    async def poll_levels() -> None:
        while True:
            health = await d.server_json("/api/v1/recovery/health") or {}
            level = ((health.get("resources") or {}).get("levels") or {}).get("memory")
            levels.append((d.clock.now(), str(level)))
            await d.clock.sleep(0.1)

    history_before = len(await _recovery_history(d))
    sampler = asyncio.create_task(sample_memory())
    poller = asyncio.create_task(poll_levels())
    fault_at = d.mark("fault")
    try:
        hog = await d.spawn_helper("memory-hog", _HOG.replace("sys.argv[1]", str(need)), "HOLDING", 120.0)
        await d.clock.sleep(s.fault.hold)
        d.phase("restore: memory released")
        await hog.stop(5.0)
        restore_at = d.mark("restore")
        await d.clock.sleep(0.5)
    finally:
        sampler.cancel()
    crossed_at = next((t for t, pct in usage if pct >= critical), None)
    budget = d.recovery_budget() + interval
    await d.wait_recovered(restore_at, budget)
    await d.clock.sleep(2 * interval)
    poller.cancel()
    status = await d.server_json("/api/v1/recovery/status") or {}
    history = (await _recovery_history(d))[history_before:]
    await d.end_load()
    r = d.result
    event = d.events.first(fault_at, "ResourceAlert", resource="memory", level="critical")
    polled = next((t for t, level in levels if t >= fault_at and level == "critical"), None)
    seen = [t for t in (event.t if event else None, polled) if t is not None]
    alert_at = min(seen) if seen else None
    resource_actions = [a for a in history if a.get("failure_type") == "system_resource_error"]
    back_ok = any(t >= restore_at and level == "ok" for t, level in levels) or (
        d.events.first(restore_at, "ResourceAlert", resource="memory", level="ok") is not None
    )
    r.extra.update(
        used_percent=round(used, 1),
        critical_percent=round(critical, 1),
        held_mib=need >> 20,
        max_used_percent=round(max((pct for _, pct in usage), default=0.0), 1),
        recovery_actions=[f"{a.get('action')}:{a.get('status')}" for a in resource_actions],
        generation_limit_at_end=status.get("generation_limit"),
    )
    if alert_at is not None and crossed_at is not None:
        r.detection_s = max(0.0, alert_at - crossed_at)
    # Detection: within one monitor interval of the use crossing the critical level, plus 1 s.
    r.detection_budget_s = interval + d.settings.detect_slack
    d.check(
        "memory use crossed the critical level",
        crossed_at is not None,
        f"max {r.extra['max_used_percent']} % against critical {critical:.1f} %",
    )
    d.check(
        "memory pressure detected (critical alert) within one monitor interval + 1 s",
        r.detection_s is not None and r.detection_s <= r.detection_budget_s,
        "no critical memory level reported"
        if alert_at is None
        else f"critical {_s(r.detection_s)} after the crossing (budget {r.detection_budget_s:.2f} s)",
    )
    d.check(
        "a recovery action ran for the resource failure",
        bool(resource_actions),
        ", ".join(r.extra["recovery_actions"]) or "none in the recovery history",
    )
    d.check(
        "back to ok once the memory is released",
        back_ok and status.get("generation_limit") is None,
        f"memory level ok {'seen' if back_ok else 'not seen'}; "
        f"generation limit at end {status.get('generation_limit')}",
    )
    d.common_checks(fault_at, restore_at, health_detection=False)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()


def _default_settings() -> dict[str, Any]:
    """The built-in defaults of what the drill settings shorten: the overload drill judges the server as
    users run it (model timeouts, health probes, breakers, modes, the JSON guard, the local servers)."""
    from brownout.config import BrownoutConfig

    defaults = BrownoutConfig().model_dump(mode="json")
    out: dict[str, Any] = {
        "models": defaults["models"],
        "circuit_breaker": defaults["circuit_breaker"],
        "json_guard": defaults["json_guard"],
        "server": {"request_timeout": defaults["server"]["request_timeout"]},
    }
    if "modes" in defaults:
        out["modes"] = defaults["modes"]
    return out


async def _closed_loop(load: Load, clients: int, seconds: float, clock: Clock) -> None:
    """``clients`` clients, each sending its next request (a distinct text) as soon as the last came back,
    for ``seconds``; a refused client first waits the Retry-After it was given, as a polite client (the
    OpenAI SDK, any client honouring the header) would, with a little jitter (:func:`retry_pause`)."""
    until = clock.now() + seconds

    async def client() -> None:
        while clock.now() < until:
            sample = await load.send()
            if sample.outcome == "rejected":
                await clock.sleep(min(retry_pause(sample.retry_after), max(0.0, until - clock.now())))

    await asyncio.gather(*(client() for _ in range(clients)))


def _model_served_per_min(samples: Sequence[Sample], since: float, until: float) -> float:
    # Mode fast has one stage, the generator's: a full or downshifted answer is a brief it wrote (a
    # similar earlier brief or the rules are "fallback"; the texts are distinct, so no exact-cache hit).
    n = sum(1 for x in samples if since <= x.done < until and x.outcome in ("full", "downshifted"))
    return n * 60.0 / (until - since) if until > since else 0.0


def _p95_ms(values: Sequence[float]) -> float | None:
    return round(percentile(values, 95) * 1000, 1) if values else None


async def _overload(d: Drill) -> None:
    """The embedded default on the real local models, then 200 closed-loop clients: a busy model must not
    be treated as a broken one (issue 14's goals)."""
    from brownout.bench.overload import breaker_opens, new_actions

    s = d.scenario
    clients = int(s.fault.behaviour.get("clients", 200))
    baseline = float(s.fault.behaviour.get("baseline", 20.0))
    target = 10.0  # seconds: the p95 latency target of an accepted answer on the embedded default
    d.phase("starting the server on the embedded models")
    load, watcher = await d.begin(_default_settings(), fakes=(), ready_timeout=d.settings.startup_timeout)
    assert d.server is not None
    # The server keeps a request up to its own deadline (60 s by default): a client giving up sooner
    # would count its own impatience as a failed request.
    await load.aclose()
    d.load = load = Load(
        load.base_url,
        mode=s.mode,
        timeout=d.server.config.server.request_timeout + 10.0,
        clock=d.clock,
        on_sample=lambda sample: d.progress.sample(s, sample),
    )
    history_before = await _recovery_history(d)
    servers_before = {r: int(v.get("restarts", 0)) for r, v in (await watcher.poll()).servers.items()}

    d.phase(f"one client for {baseline:g} s (the generator's rate unloaded)")
    base_at = d.mark("one client")
    await _closed_loop(load, 1, baseline, d.clock)
    fault_at = d.mark(f"{clients} clients")
    d.phase(f"{clients} clients for {s.fault.hold:g} s")
    shed_before = await _shed_counts(d)
    await _closed_loop(load, clients, s.fault.hold, d.clock)
    restore_at = d.mark("load ends")
    shed_after = await _shed_counts(d)
    # The server's own view of the same refusals (request in -> 503 out), without the load client and
    # the machine's scheduling between the two processes.
    server_refused = shed_after[0] - shed_before[0]
    server_fast = shed_after[1] - shed_before[1]
    # The stragglers of the overload are in; a gentle load shows when full answers are back.
    d.phase("gentle load until full mode is back")
    gentle = Load(load.base_url, mode=s.mode, rate=0.5, clock=d.clock, timeout=load.timeout)
    gentle.start()
    try:
        await d.wait_recovered_with(gentle, restore_at, 10.0)
    finally:
        await gentle.aclose()
    load.samples.extend(gentle.samples)
    after = await watcher.poll()
    await d.end_load()
    history_after = await _recovery_history(d)

    r = d.result
    samples = load.samples
    r.counts = dict(load.counts())
    unloaded = _model_served_per_min(samples, base_at, fault_at)
    loaded = _model_served_per_min(samples, fault_at, restore_at)
    during = [x for x in samples if fault_at <= x.sent < restore_at]
    accepted = [x.latency for x in during if x.status == 200]
    refused = [x.latency for x in during if x.outcome == "rejected"]
    opens = breaker_opens([h.breakers for h in watcher.samples])
    actions = new_actions(history_before, history_after)
    restarts = {
        role: int(info.get("restarts", 0)) - servers_before.get(role, 0)
        for role, info in after.servers.items()
    }
    r.extra.update(
        clients=clients,
        generator_per_min_one_client=round(unloaded, 2),
        generator_per_min_overload=round(loaded, 2),
        accepted_p95_ms=_p95_ms(accepted),
        refused_p95_ms=_p95_ms(refused),
        refused=len(refused),
        server_refused=int(server_refused),
        server_refused_within_50ms=round(server_fast / server_refused, 4) if server_refused else None,
        breaker_opens=opens,
        recovery_actions=[f"{a.get('action')}({a.get('target')})" for a in actions],
        model_server_restarts=restarts,
        system_modes_seen=sorted({h.system_mode for h in watcher.samples if h.system_mode}),
    )
    d.failed_check()
    d.check("no breaker opened", not opens, f"opens: {opens or 'none'}")
    d.check(
        "no recovery action while the models are healthy",
        not actions and not any(restarts.values()),
        f"actions: {r.extra['recovery_actions'] or 'none'}; model server restarts: {restarts}",
    )
    d.check(
        "the generator kept serving at its rate",
        unloaded > 0 and loaded >= 0.9 * unloaded,
        f"{loaded:.1f} model briefs/min under {clients} clients, {unloaded:.1f} with one client "
        f"(goal >= 0.9x)",
    )
    d.check(
        f"accepted answers p95 within {target:g} s",
        bool(accepted) and percentile(accepted, 95) <= target,
        f"p95 {_s(percentile(accepted, 95) if accepted else None)} over {len(accepted)} briefs",
    )
    d.check(
        "refusals answered in < 50 ms p95",
        not refused or percentile(refused, 95) < 0.05,
        (
            f"p95 {_p95_ms(refused)} ms over {len(refused)} refusals; the server answered "
            f"{100 * server_fast / server_refused:.1f} % of its {int(server_refused)} within 50 ms"
            if refused and server_refused
            else f"p95 {_p95_ms(refused)} ms over {len(refused)} refusals"
            if refused
            else "no refusals"
        ),
    )
    d.recovery_check(restore_at, 10.0)
    await d.finish_sqlite()


PLAYS: dict[str, Callable[[Drill], Awaitable[None]]] = {
    "model_fault": _model_fault,
    "local_model_crash": _local_model_crash,
    "database_outage": _database_outage,
    "database_switch": _database_switch,
    "redis_outage": _redis_outage,
    "broker_outage": _broker_outage,
    "stampede": _stampede,
    "queue_overflow": _queue_overflow,
    "loop_block": _loop_block,
    "memory_pressure": _memory_pressure,
    "overload": _overload,
}
"""The plays written so far, by :attr:`Scenario.play` name."""


# ---------------------------------------------------------------------------------------------- entry points


async def run_scenario(
    scenario: Scenario,
    *,
    settings: DrillSettings | None = None,
    clock: Clock = SYSTEM_CLOCK,
    progress: DrillProgress | None = None,
    workdir: Path | None = None,
    keep: bool = False,
) -> ScenarioResult:
    """Run one scenario for real and return its result (status ``waiting`` if it cannot run here).

    The stack lives in ``workdir`` (a new temporary directory by default, removed afterwards unless
    ``keep``). Never raises for a drill that fails or errors: the result says so.
    """
    progress = progress or DrillProgress()
    progress.scenario_started(scenario)
    waits = missing(scenario)
    if waits:
        result = ScenarioResult(
            scenario.name, scenario.title, scenario.kind, status="waiting", waits_on=waits
        )
        result.mode = scenario.mode
        progress.scenario_finished(result)
        return result
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"brownout-drill-{scenario.name}-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    drill = Drill(scenario, work, settings or DrillSettings(), clock, progress)
    started = clock.now()
    try:
        await PLAYS[scenario.play](drill)
        drill.result.verdict()
    except Exception as e:  # set-up trouble or a bug in a play: reported with the scenario, the run goes on
        drill.result.status = "error"
        drill.result.error = f"{type(e).__name__}: {e}"
    finally:
        await drill.stop()
        result = drill.result
        result.duration_s = clock.now() - started
        if drill.load is not None:
            result.samples = list(drill.load.samples)
            if not result.counts:
                result.counts = dict(drill.load.counts())
        if drill.watcher is not None:
            result.health = list(drill.watcher.samples)
        if drill.events is not None:
            result.events = list(drill.events.events)
        if own_dir and not keep:
            shutil.rmtree(work, ignore_errors=True)
    progress.scenario_finished(result)
    return result


async def run_drills(
    scenarios: Sequence[Scenario] | None = None,
    *,
    settings: DrillSettings | None = None,
    clock: Clock = SYSTEM_CLOCK,
    progress: DrillProgress | None = None,
) -> list[ScenarioResult]:
    """Run ``scenarios`` (the whole catalog by default) one after another."""
    return [
        await run_scenario(s, settings=settings, clock=clock, progress=progress)
        for s in (CATALOG if scenarios is None else scenarios)
    ]
