"""PostgreSQL down and back: killed under load, started again; every acknowledged write is audited."""

from __future__ import annotations

import asyncio

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.measure import database_ok
from brownout.chaos.drills.scenarios._shared import pg_request_ids, spool_check, start_postgres
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="postgres-down",
    title="PostgreSQL down and back",
    category="Data",
    severity="Critical",
    kind="data",
    seed="000 (pending writes), 003 (primary database failure)",
    event="The PostgreSQL holding the briefs is killed (SIGKILL) under load and restarted seconds later.",
    detection=(
        DetectionRow("Runtime.record", "database write error or write_timeout", "database.write_timeout"),
        DetectionRow("/health", "database status and spool pending", "immediate"),
    ),
    response=(
        "Each brief goes to the local fsync'd spool before the answer is sent; answers keep coming.",
        "While entries are pending, new writes queue behind them so the database receives them in order.",
        "When PostgreSQL is back, the replayer writes each spooled brief once, in order.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Lost writes", "0 (synchronous spool)"),
        ("Write latency", "one failed connection attempt, then a local fsync"),
    ),
    verification=(
        "bounded load in `fast` mode; PostgreSQL killed, then started again on the same port",
        "0 failed requests",
        "every acknowledged brief (HTTP 200, request_id) is a row in PostgreSQL once the spool drained",
        "detection: database unhealthy or spool pending within 1 s of the first failed write",
        "recovery: database healthy and spool empty",
    ),
    play="database_outage",
    fault=Fault("sigkill", hold=4.0),
    goals=Goals(must_see=(), served_modes=(), recover=True),
    mode="fast",
    requires=("fakellm", "postgres"),
    fast=True,
)


async def play(d: Drill) -> None:
    """Kill the PostgreSQL holding the briefs under load, start it again, audit every write."""
    d.component = database_ok
    s = d.scenario
    d.phase("starting PostgreSQL, fakes and server")
    pg = await start_postgres(d)
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
    spool_check(d)
    d.phase("auditing writes")
    rows = await asyncio.to_thread(pg_request_ids, pg, database.name)
    assert d.server is not None
    await d.server.stop()
    d.audit_writes(rows, d.workdir / "spool.db")
