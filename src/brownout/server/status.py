"""What the server shows of itself, read from its running parts (cheap: no I/O, no awaits).

:class:`ServerStatus` is given the parts it reads -- the brief service, the model clients and local
model servers, the records (database and spool), Redis, the event outbox, the gateway and the system
modes -- and builds two views of them:

* :meth:`~ServerStatus.snapshot`, the live state sent by ``GET /api/v1/status``, the live view's
  streams and the dashboard (system mode, each model's health and breakers, queue, dimmer, cache,
  spool, database, Redis, gateway);
* the parts of ``GET /health``: :meth:`~ServerStatus.model`, :meth:`~ServerStatus.database`,
  :meth:`~ServerStatus.spool`, :meth:`~ServerStatus.outbox` and :meth:`~ServerStatus.dimmer`.

Until the service has started, the snapshot says ``"starting"`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from brownout.briefs.service import BriefService
from brownout.config import ROLES, BrownoutConfig
from brownout.durable.outbox import EventOutbox
from brownout.durable.spool import Spool
from brownout.gateway.router import Gateway
from brownout.health.modes import SystemModes
from brownout.llm.client import ModelClient
from brownout.llm.local import LocalModelServer
from brownout.policies.cpu_budget import CpuBudget
from brownout.server.records import BriefRecords
from brownout.server.shared import SharedState

__all__ = ["ServerStatus", "display_time", "plain"]


def display_time() -> str:
    """Wall-clock time for display (never used for timing)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plain(x: Any) -> Any:
    """An enum's value; anything else as it is (for JSON)."""
    return x.value if isinstance(x, Enum) else x


_LOST_IDS = 100
"""Lost entries named in /health (``count`` says how many there are in all)."""

# What /health shows of each model endpoint's concurrency limiter.
_CONCURRENCY_KEYS = ("breaker", "limit", "latency_ceiling", "late", "in_flight", "queued", "estimated_wait")


class ServerStatus:
    """The server's state as plain JSON data (see the module docstring)."""

    def __init__(
        self,
        config: BrownoutConfig,
        *,
        service: BriefService,
        clients: Mapping[str, ModelClient],
        local: Mapping[str, LocalModelServer],
        records: BriefRecords,
        shared: SharedState | None,
        outbox: EventOutbox | None,
        gateway: Gateway,
        modes: SystemModes,
    ) -> None:
        self.config = config
        self.service = service
        self.clients = clients
        self.local = local
        self.records = records
        self.shared = shared
        self._outbox = outbox
        self.gateway = gateway
        self.modes = modes

    # ------------------------------------------------------------------ the live snapshot

    def snapshot(self, live_clients: int = 0) -> dict[str, Any]:
        """The live state now; ``live_clients`` is how many live streams are connected."""
        svc = self.service
        if not svc.started:
            return {
                "status": "starting",
                "system_mode": "starting",
                "at": display_time(),
                "models": {},
                "breakers": {},
            }
        models: dict[str, Any] = {}
        breakers: dict[str, str] = {}
        for role in ROLES:
            client = self.clients.get(role)
            probe = svc.stats.health.get(role)
            server = self.local.get(role)
            role_breakers: dict[str, str] = {}
            if client is not None:
                role_breakers = {name: str(plain(b.state)) for name, b in client.breakers.items()}
            breakers.update(role_breakers)
            models[role] = {
                "status": "healthy" if svc.role_available(role) else "unhealthy",
                "breakers": role_breakers,
                "last_check": None
                if probe is None
                else {
                    "healthy": probe.healthy,
                    "latency_ms": round(probe.latency * 1000, 1),
                    "error": probe.error,
                },
                "server": server.state if server is not None else None,
                # Each endpoint's adaptive concurrency limit (and the latency ceiling that holds it
                # down, when its calls ran late): calls in flight, and waiting in our queue.
                "concurrency": [
                    {k: ep[k] for k in _CONCURRENCY_KEYS}
                    for ep in (client.endpoints_status() if client is not None else [])
                ],
            }
        healthy = [r for r, m in models.items() if m["status"] == "healthy"]
        cache = svc.cache.stats()
        if len(healthy) == len(ROLES) and self.records.ok:
            status = "healthy"
        elif "qwen" in healthy or cache.size > 0:
            status = "degraded"
        else:
            status = "unhealthy"
        lookups = cache.hits + cache.misses
        spool = self.records.spool.stats()
        modes = self.modes
        return {
            "status": status,
            "system_mode": str(plain(modes.mode)),
            "mode_reason": str(modes.reason),
            "switched_off": list(modes.switched_off),
            "available_modes": [
                m.name
                for m in svc.pipeline.modes
                if all(svc.role_available(r) for r in svc.pipeline.roles(m))
            ],
            "models": models,
            "breakers": breakers,
            "queue": {
                "size": svc.admission.queue_size,
                "max_size": self.config.queue.max_size,
                "in_flight": svc.admission.in_flight,
            },
            "dimmer": self._dimmer_level(),
            "cache": {
                "size": cache.size,
                "max_size": cache.max_entries,
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
                "ttl_seconds": cache.ttl,
            },
            "spool": {"pending": spool.pending, "alert": spool.alert},
            "database": {"status": "healthy" if self.records.ok else "unhealthy"},
            "redis": {"status": self.shared.detector.status if self.shared is not None else "not configured"},
            "gateway": self._gateway_summary(),
            "live_clients": live_clients,
            "at": display_time(),
        }

    def _dimmer_level(self) -> dict[str, Any]:
        """The brief service's dimmer: level 0 is full service; higher levels leave out optional steps."""
        dim = self.service.dimmer.snapshot()
        return {
            "level": dim.level,
            "value": dim.value,
            "dimming": dim.step,
            "target_p95": dim.target_p95,
            "observed_p95": dim.observed_p95,
        }

    def _gateway_summary(self) -> dict[str, Any]:
        """The gateway's model groups: overall status, and per group whether it can answer."""
        status = self.gateway.status()
        groups = {
            name: "available" if g.get("available") else "unavailable" for name, g in status["groups"].items()
        }
        return {"status": status["status"], "groups": groups}

    # ------------------------------------------------------------------ /health

    def model(self, role: str) -> dict[str, Any]:
        """One model role for /health: breakers, endpoints, the latest probe and its local server."""
        svc = self.service
        client = self.clients[role]
        probe = svc.stats.health.get(role)
        server = self.local.get(role)
        return {
            "status": "healthy" if svc.role_available(role) else "unhealthy",
            "breakers": {name: b.state.value for name, b in client.breakers.items()},
            "endpoints": client.endpoints_status(),
            "last_check": None
            if probe is None
            else {
                "healthy": probe.healthy,
                "latency_ms": round(probe.latency * 1000, 1),
                "error": probe.error,
                # Busy: every slot was answering calls, so the model counts as healthy unprobed.
                "busy": probe.busy,
                "queued_ms": round(probe.queued * 1000, 1),
            },
            "server": server.status() if server is not None else None,
        }

    def database(self) -> dict[str, Any]:
        """``unhealthy`` while the database refuses writes, ``degraded`` while acknowledged writes wait in
        the spool (the database is back, or took some writes, but is not yet caught up), else ``healthy``.

        ``error`` is a summary (the driver's error class and short message), never the SQL statement or
        its parameters, which hold customers' text.
        """
        records = self.records
        pending = records.spool.pending
        if not records.ok:
            status = "unhealthy"
        elif pending:
            status = "degraded"
        else:
            status = "healthy"
        return {
            "status": status,
            "error": records.error,
            "spooled_writes": pending,
            "writable_host": records.store.writable_host,
            "read_only": records.store.read_only,
            "failovers": records.store.failovers,
        }

    def spool(self) -> dict[str, Any]:
        """The write spool: what waits, its replay, and what a damaged file lost."""
        spool = self.records.spool
        st = spool.stats()
        return {
            "pending": st.pending,
            "oldest_age_seconds": round(st.oldest_age, 3),
            "replayed": st.replayed,
            "failed_attempts": st.failed_attempts,
            "last_error": st.last_error,
            "alert": st.alert,
            "dead_letters": st.dead,
            "lost": _lost(spool),
        }

    def outbox(self) -> dict[str, Any]:
        """The domain events on their way to Redis (``not configured`` without Redis events)."""
        outbox = self._outbox
        if outbox is None:
            return {"status": "not configured"}
        st = outbox.stats()
        return {
            "status": "healthy" if st.pending == 0 else "spooling",
            "pending": st.pending,
            "oldest_age_seconds": round(st.oldest_age, 3),
            "published": st.replayed,
            "dead_letters": st.dead,
            "last_error": st.last_error,
            "lost": _lost(outbox.spool),
        }

    def dimmer(self) -> dict[str, Any]:
        """The dimmer for /health: its level (0: full service), value and the latency it steers by."""
        svc = self.service
        dim = svc.dimmer.snapshot()
        return {
            "level": dim.level,
            "value": dim.value,
            "dimming": dim.step,
            "target_p95": dim.target_p95,
            "observed_p95": dim.observed_p95,
            "targets": dict(svc.config.dimmer.targets),
            "enabled": svc.config.dimmer.enabled,
            "cpu_budget": _cpu_budget(svc.cpu_budget),
        }


def _cpu_budget(budget: CpuBudget | None) -> dict[str, Any] | None:
    """The service's CPU budget for /health: cores allowed and used, the share of quick answers it
    refuses now and how many it refused; None when off."""
    if budget is None:
        return None
    snap = budget.snapshot()
    return {"cores": snap.budget, "used": snap.used, "refusing": snap.refusing, "refused": snap.refused}


def _lost(spool: Spool) -> dict[str, Any]:
    """Acknowledged entries a damaged spool file lost (found on open, kept until cleared)."""
    lost = spool.lost
    return {
        "count": len(lost),
        "ids": [e.key for e in lost[:_LOST_IDS]],
        "files": sorted({e.file for e in lost}),
    }
