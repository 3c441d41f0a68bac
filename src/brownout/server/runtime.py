"""Everything ``brownout serve`` runs, assembled from the config and started and stopped together.

For each model role the runtime either uses the configured external endpoints or starts a local
llama.cpp server (``LocalModelServer``) and points a :class:`~brownout.llm.client.ModelClient` at it.
It builds the brief service and the store, runs the periodic health probes (seed 000: every 10-30 s),
and records served briefs. ``stop()`` stops every child process, so Ctrl-C leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from brownout.briefs.service import BriefService
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import ROLES, BrownoutConfig
from brownout.durable.spool import Spool, SpoolReplayer
from brownout.durable.store import BriefRecord, BriefStore
from brownout.errors import ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus
from brownout.llm.client import ModelClient
from brownout.llm.local import LocalModelServer
from brownout.llm.types import EndpointConfig
from brownout.policies.deadline import deadline
from brownout.server.edge import EdgeCache

__all__ = ["RecoveryAction", "Runtime"]

_log = logging.getLogger("brownout.server")


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    """One recovery action run by hand or automatically, kept in the history."""

    action: str
    target: str
    at: float
    ok: bool
    detail: str


@dataclass
class HttpStats:
    """HTTP error counts by status (``http_errors_total``)."""

    errors: Counter[int] = field(default_factory=Counter)


class Runtime:
    """The running server's parts; see the module docstring."""

    def __init__(
        self,
        config: BrownoutConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        log_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.events = events
        self.log_dir = log_dir
        self.local: dict[str, LocalModelServer] = {}
        self.clients: dict[str, ModelClient] = {}
        self.store = BriefStore(config.database.url)
        self.spool = Spool(
            config.database.spool_path,
            name="briefs-spool",
            clock=clock,
            events=events,
            alert_pending=config.database.spool_alert,
        )
        self.replayer: SpoolReplayer | None = None
        self.store_ok = False
        self.store_error: str | None = None
        self.http = HttpStats()
        self.history: list[RecoveryAction] = []
        self.service: BriefService | None = None
        self.edge: EdgeCache | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        """Start model servers, clients, the store and the health monitor."""
        cfg = self.config
        try:
            endpoints: dict[str, list[EndpointConfig]] = {}
            to_start: list[LocalModelServer] = []
            for role in ROLES:
                section = cfg.models.roles[role]
                if section.endpoints:
                    endpoints[role] = list(section.endpoints)
                    continue
                local = cfg.models.local
                server = LocalModelServer(
                    role,
                    threads=local.threads,
                    ctx=local.ctx,
                    model_path=local.model_path,
                    startup_timeout=local.startup_timeout,
                    clock=self.clock,
                    events=self.events,
                    log_dir=self.log_dir,
                )
                self.local[role] = server
                to_start.append(server)
                endpoints[role] = [EndpointConfig(url=server.url, model=role)]
            await asyncio.gather(*(s.start() for s in to_start))
            group = cfg.circuit_breaker.group()
            for role in ROLES:
                client = ModelClient(
                    role,
                    endpoints[role],
                    breakers=group,
                    timeout=cfg.models.roles[role].timeout,
                    clock=self.clock,
                    events=self.events,
                )
                if not cfg.circuit_breaker.enabled:
                    for breaker in client.breakers.values():
                        breaker.disable()
                self.clients[role] = client
            self.service = BriefService(
                cfg, self.clients, role_alive=self.role_alive, clock=self.clock, events=self.events
            )
            self.service.start()
            self.edge = EdgeCache(self.service.cache, max_entries=cfg.cache.max_size)
            await self._open_store()
            await self.spool.open()
            self.replayer = SpoolReplayer(self.spool, self._save)
            self.replayer.start()
            await self.service.verify_constraints()
            self._monitor = asyncio.create_task(self._health_loop(), name="brownout-health")
            self._started = True
        except BaseException:
            await self.stop()
            raise

    def role_alive(self, role: str) -> bool:
        """False while a role's local server is down or restarting (known at once, not at the next probe)."""
        server = self.local.get(role)
        return server is None or server.state == "running"

    async def _open_store(self) -> None:
        try:
            await self.store.init()
            self.store_ok, self.store_error = True, None
        except Exception as e:  # the service answers without a database; /health says so
            self.store_ok, self.store_error = False, f"{type(e).__name__}: {e}"
            _log.error("database unavailable at start: %s", self.store_error)

    async def _health_loop(self) -> None:
        interval = self.config.models.health_interval
        while True:
            await self.probe_all()
            await self.clock.sleep(interval)

    async def probe_all(self) -> None:
        """Probe every role once, concurrently."""
        service = self.service
        if service is None:
            return
        results = await asyncio.gather(*(service.check_health(r) for r in ROLES), return_exceptions=True)
        for role, result in zip(ROLES, results, strict=True):
            if isinstance(result, BaseException):
                _log.warning("health probe of %s failed: %s", role, result)

    async def record(self, text: str, response: dict[str, Any]) -> None:
        """Persist a served brief before it is acknowledged: in the database, or else in the spool.

        While anything waits in the spool, new writes queue behind it so the database receives them
        in order. Raises ServiceUnavailable only when neither the database nor the spool took the
        write -- then the request must not be acknowledged.
        """
        payload = {
            "request_id": response["request_id"],
            "text": text,
            "requested_mode": response["requested_mode"],
            "served_mode": response["served_mode"],
            "degraded": bool(response.get("degraded")),
            "response": response,
            "created_at": datetime.now(UTC).isoformat(),
        }
        if self.spool.pending == 0:
            try:
                async with deadline(self.config.database.write_timeout, clock=self.clock):
                    await self._save(payload["request_id"], "brief", payload)
                self.store_ok, self.store_error = True, None
                return
            except Exception as e:
                self.store_ok, self.store_error = False, f"{type(e).__name__}: {e}"
                _log.error(
                    "database write of %s failed, spooling it: %s", payload["request_id"], self.store_error
                )
        try:
            await self.spool.append(payload["request_id"], "brief", payload)
        except Exception as e:
            _log.error("could not spool brief %s: %s", payload["request_id"], e)
            raise ServiceUnavailable(
                "The brief could not be stored (database and local spool both unavailable)",
                retry_after=30.0,
                policy="store",
            ) from e
        if self.replayer is not None:
            self.replayer.wake()

    async def _save(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        """The spool's sink: one idempotent write of a brief record (by request_id)."""
        await self.store.save(
            BriefRecord(
                request_id=payload["request_id"],
                text=payload["text"],
                requested_mode=payload["requested_mode"],
                served_mode=payload["served_mode"],
                degraded=payload["degraded"],
                response=payload["response"],
                created_at=datetime.fromisoformat(payload["created_at"]),
            )
        )

    # ------------------------------------------------------------------ recovery

    ACTIONS: ClassVar[dict[str, str]] = {
        "reset_breakers": "close every circuit breaker (all roles, or one with target=<role>)",
        "restart_model_server": "restart a local model server (target=<role>, or all)",
        "clear_cache": "empty the response cache",
        "check_health": "probe every model now",
    }

    async def run_action(self, action: str, target: str = "all") -> RecoveryAction:
        """Run one recovery action; raises ValueError for an unknown action or target."""
        if action not in self.ACTIONS:
            raise ValueError(f"unknown action {action!r}; choose from {sorted(self.ACTIONS)}")
        roles = list(ROLES) if target in ("all", "") else [target]
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown target {target!r}; choose from {[*ROLES, 'all']}")
        ok, detail = True, ""
        try:
            if action == "reset_breakers":
                for role in roles:
                    for breaker in self.clients[role].breakers.values():
                        breaker.reset()
                detail = f"closed breakers of {', '.join(roles)}"
            elif action == "restart_model_server":
                restarted = []
                for role in roles:
                    server = self.local.get(role)
                    if server is not None:
                        await server.restart(reason="recovery action")
                        restarted.append(role)
                detail = f"restarted {', '.join(restarted) or 'nothing (no local servers)'}"
            elif action == "clear_cache":
                assert self.service is not None
                self.service.cache.clear()
                if self.edge is not None:
                    self.edge.clear()
                detail = "response cache cleared"
            elif action == "check_health":
                await self.probe_all()
                detail = "probed " + ", ".join(ROLES)
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        entry = RecoveryAction(action, target or "all", self.clock.now(), ok, detail)
        self.history.append(entry)
        del self.history[:-100]
        return entry

    async def reset(self) -> list[RecoveryAction]:
        """Close every breaker and restart every local model server that is not running."""
        done = [await self.run_action("reset_breakers")]
        for role, server in self.local.items():
            if server.state != "running":
                done.append(await self.run_action("restart_model_server", role))
        return done

    async def stop(self) -> None:
        """Stop everything; safe to call twice."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self.service is not None:
            await self.service.aclose()
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.gather(*(s.stop() for s in self.local.values()), return_exceptions=True)
        if self.replayer is not None:
            await self.replayer.aclose()
            self.replayer = None
        with contextlib.suppress(Exception):
            await self.spool.aclose()
        with contextlib.suppress(Exception):
            await self.store.aclose()
        self._started = False
