"""PostgreSQL primary switch: the primary is killed, the synchronous standby promoted; the server follows."""

from __future__ import annotations

import asyncio

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.measure import database_ok
from brownout.chaos.drills.scenarios._shared import pg_request_ids, spool_check, start_postgres
from brownout.chaos.drills.spec import DetectionRow, Fault, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="postgres-failover",
    title="PostgreSQL primary switch",
    category="Data",
    severity="Critical",
    kind="data",
    seed="003 (primary database failure)",
    event="The PostgreSQL primary is killed; a streaming standby is promoted and becomes the primary.",
    detection=(
        DetectionRow("Application", "connection error", "immediate"),
        DetectionRow("Failover", "primary lost, standby promoted", "seconds"),
    ),
    response=(
        "Writes spool locally while no primary answers.",
        "The server switches to the promoted standby and replays the spool there, in order.",
    ),
    impact=(("Failed requests", "0"), ("Lost writes", "0"), ("Write downtime", "the switch's duration")),
    verification=(
        "bounded load; primary killed; standby promoted",
        "0 failed requests; every acknowledged brief is a row on the new primary",
    ),
    play="database_switch",
    fault=Fault("sigkill", hold=4.0),
    mode="fast",
    requires=("fakellm", "postgres", "database-failover"),
)


async def play(d: Drill) -> None:
    """Primary killed under load; the synchronous standby is promoted; the server follows it."""
    d.component = database_ok
    s = d.scenario
    d.phase("starting PostgreSQL primary and standby, fakes and server")
    primary = await start_postgres(d)
    database = await asyncio.to_thread(primary.create_database)
    from brownout.chaos.servers import PostgresServer

    standby = PostgresServer(standby_of=primary)
    d.servers.append(standby)
    await standby.astart()
    # Synchronous commit ("zero data loss" on failover): a write is acknowledged only once the
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
    spool_check(d)
    d.check(
        "the server writes to the promoted standby",
        str(standby.port) in str(db.get("writable_host")),
        f"writable host {db.get('writable_host')}, failovers {db.get('failovers')}",
    )
    d.phase("auditing writes")
    rows = await asyncio.to_thread(pg_request_ids, standby, database.name)
    assert d.server is not None
    await d.server.stop()
    d.audit_writes(rows, d.workdir / "spool.db")
