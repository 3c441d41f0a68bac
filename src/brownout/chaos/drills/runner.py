"""Runs drills for real: checks what a scenario needs, then runs its play and returns its result.

For each :class:`~brownout.chaos.drills.spec.Scenario`, :func:`run_scenario` creates a temporary
directory and a :class:`~brownout.chaos.drills.harness.Drill`, runs the scenario's play (from
:data:`~brownout.chaos.drills.scenarios.PLAYS`), which starts in that directory:

* one fault-injecting model server per role as its own process (``python -m brownout.chaos.fakellm
  --port N``), switched at run time through ``POST /_control`` and frozen with SIGSTOP for a hang;
* for data scenarios a private PostgreSQL (:class:`brownout.chaos.servers.PostgresServer`);
* the brownout server itself as a subprocess, ``python -m brownout serve --config <drill.yaml>``, with
  the drill settings: short breaker waits, model timeouts and health intervals, so a drill takes
  seconds (:class:`~brownout.chaos.drills.harness.DrillSettings`);

and drives load, injects the fault, restores, measures and judges. Everything is stopped afterwards,
whatever happened.

A scenario whose requirements are missing (:func:`missing`) is not run: its result has status
``waiting`` and names what it waits on.

``DrillError``, ``DrillProgress``, ``DrillSettings`` and ``server_config`` live in
:mod:`~brownout.chaos.drills.harness` and :mod:`~brownout.chaos.drills.processes`, ``PLAYS`` in
:mod:`~brownout.chaos.drills.scenarios`; they are re-exported here, where they were first importable from.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from brownout.chaos.drills.harness import Drill, DrillProgress, DrillSettings, config_has, server_config
from brownout.chaos.drills.measure import ScenarioResult
from brownout.chaos.drills.processes import DrillError
from brownout.chaos.drills.scenarios import CATALOG, PLAYS
from brownout.chaos.drills.spec import Scenario
from brownout.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "PLAYS",
    "REQUIREMENTS",
    "DrillError",
    "DrillProgress",
    "DrillSettings",
    "missing",
    "run_drills",
    "run_scenario",
    "server_config",
]

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


def _need_server_redis() -> str | None:
    if config_has("redis"):
        return None
    return "the server keeps no shared state in Redis yet (no `redis` section in brownout.config)"


def _need_failover() -> str | None:
    if config_has("database", "failover_urls"):
        return None
    return "the server cannot follow a PostgreSQL primary switch yet (no `database.failover_urls`)"


def _need_broker() -> str | None:
    if config_has("events", "outbox_path") and config_has("redis", "url"):
        return None
    return "the server publishes no events to a broker yet (no `events` outbox section)"


def _need_loop_detector() -> str | None:
    if config_has("loop_block"):
        return None
    return "no event-loop blocking detector in the server yet (no `loop_block` section)"


def _need_resource_monitor() -> str | None:
    if config_has("resources") and config_has("recovery"):
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
