"""Helpers several plays share: private PostgreSQL and Redis servers, and what they read back."""

from __future__ import annotations

from typing import Any

from brownout.chaos.drills.harness import Drill

__all__ = [
    "pg_request_ids",
    "recovery_history",
    "redis_config",
    "start_postgres",
    "start_redis",
    "spool_check",
]


async def start_postgres(d: Drill, **kwargs: Any) -> Any:
    """Start a private PostgreSQL (``kwargs`` for ``PostgresServer``); the drill removes it at the end."""
    from brownout.chaos.servers import PostgresServer

    pg = PostgresServer(**kwargs)
    d.servers.append(pg)
    await pg.astart()
    return pg


def pg_request_ids(pg: Any, database: str) -> set[str]:
    """The ``request_id`` of every brief stored in ``database`` on ``pg``."""
    return {str(row[0]) for row in pg.execute("SELECT request_id FROM briefs", database=database)}


def spool_check(d: Drill) -> None:
    """Check that writes waited in the spool during the outage (else the fault did not bite)."""
    assert d.watcher is not None
    pending = max((h.spool_pending for h in d.watcher.samples), default=0)
    d.result.extra["max_spool_pending"] = pending
    d.check("writes were spooled while no database took them", pending > 0, f"max pending {pending}")


async def start_redis(d: Drill) -> Any:
    """Start a private Redis; the drill removes it at the end."""
    from brownout.chaos.servers import RedisServer

    redis = RedisServer()
    d.servers.append(redis)
    await redis.astart()
    return redis


def redis_config(d: Drill, url: str) -> dict[str, Any]:
    """Server config overrides: shared state on the Redis at ``url``, events through an outbox to it."""
    return {
        "redis": {"url": url, "health_interval": d.settings.health_interval},
        "events": {"outbox_path": str(d.workdir / "events.db")},
    }


async def recovery_history(d: Drill) -> list[dict[str, Any]]:
    """The recovery actions the server has taken so far (``/api/v1/recovery/actions``)."""
    actions = await d.server_json("/api/v1/recovery/actions") or {}
    history = actions.get("history")
    return [a for a in history if isinstance(a, dict)] if isinstance(history, list) else []
