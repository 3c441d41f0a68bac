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
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from brownout.briefs.service import BriefService
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import ROLES, BrownoutConfig
from brownout.durable.outbox import EventOutbox, RedisStreamPublisher
from brownout.durable.spool import Spool, SpoolInUse, SpoolReplayer, default_data_fault, error_summary
from brownout.durable.store import BriefRecord, BriefStore
from brownout.errors import ConfigError, ServiceUnavailable
from brownout.events import DEFAULT_BUS, EventBus
from brownout.gateway.router import Gateway
from brownout.gateway.stats import Histogram
from brownout.health.modes import SystemModes
from brownout.llm.client import ModelClient
from brownout.llm.local import LocalModelServer, free_port
from brownout.llm.types import EndpointConfig
from brownout.policies.deadline import deadline
from brownout.recovery.manager import RecoveryAttempt, RecoveryManager
from brownout.server.edge import EdgeCache
from brownout.server.live import LiveHub
from brownout.server.operations import Operations
from brownout.server.shared import SharedState
from brownout.state.tiered import Tier

__all__ = ["RecoveryAction", "Runtime"]

_log = logging.getLogger("brownout.server")

REPLAY_BATCH = 500
"""Spooled brief writes replayed per database transaction."""


RecoveryAction = RecoveryAttempt
"""One recovery action run by hand or automatically, kept in the history."""


@dataclass
class HttpStats:
    """HTTP request and error counts (``http_requests_total``, ``http_errors_total`` by status), and how
    long refusals took (``brownout_shed_seconds``): from a request reaching the app to its 503/429 with
    ``Retry-After``. Shedding is only worth its name when it answers in milliseconds while the models are
    saturated; this histogram shows it does, from the server's side."""

    errors: Counter[int] = field(default_factory=Counter)
    requests: int = 0
    shed: Histogram = field(default_factory=lambda: Histogram(SHED_BUCKETS))


SHED_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Bucket bounds of ``brownout_shed_seconds`` (the goal: a refusal within 50 ms)."""


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
        db = config.database
        self.store = BriefStore(
            [db.url, *db.failover_urls],
            connect_timeout=db.connect_timeout,
            recheck_interval=db.check_interval,
            clock=clock,
        )
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
        # Recovery manager, resource monitor, system modes, adaptive cache TTL, loop-block detector.
        self.ops = Operations(self)
        self.service: BriefService | None = None
        self.edge: EdgeCache | None = None
        # The live view (SSE, WebSocket, dashboard) and the alert webhooks.
        self.live = LiveHub(
            self,
            clock=clock,
            events=events,
            interval=config.server.live_interval,
            max_clients=config.server.live_max_clients,
        )
        # The OpenAI-compatible gateway's model groups (its HTTP client opens in start()). Out of the
        # box it offers the generator's embedded model as the group "local", so an OpenAI client works
        # with no configuration: that server's port is chosen now, for the group's URL, and the server
        # is started on it in start().
        self._local_ports: dict[str, int] = {}
        gateway_config = config.gateway
        local_role = config.gateway_local_role
        if local_role is not None:
            self._local_ports[local_role] = free_port()
            url = f"http://127.0.0.1:{self._local_ports[local_role]}"
            gateway_config = gateway_config.with_local(url, model=local_role)
        self.gateway = Gateway(gateway_config, clock=clock, events=events)
        self._monitor: asyncio.Task[None] | None = None
        self._db_watch: asyncio.Task[None] | None = None
        self._schema_ready = False
        self.shared: SharedState | None = None
        self.outbox: EventOutbox | None = None
        """Domain events on their way to the Redis stream, when Redis and events are configured."""
        """Redis-backed shared state (breakers, cache, singleflight), when ``redis.url`` is set."""
        self._started = False
        self.start_error: BaseException | None = None
        """Why the last :meth:`start` failed, if it did (the server runner reports it)."""

    async def start(self) -> None:
        """Start model servers, clients, the store and the health monitor."""
        cfg = self.config
        try:
            # The files this process must own come first: a second server on the same spool or outbox
            # stops here, naming the setting, before it starts model servers or touches the database.
            await _own(self.spool, "database.spool_path")
            if cfg.redis.url is not None:
                self.shared = SharedState(cfg.redis, clock=self.clock, events=self.events)
                if cfg.events.enabled:
                    ev = cfg.events
                    self.outbox = EventOutbox(
                        ev.outbox_path,
                        RedisStreamPublisher(self.shared.client, stream=ev.stream, maxlen=ev.maxlen),
                        events=self.events,
                        clock=self.clock,
                        batch=ev.batch,
                        max_attempts=ev.max_attempts,
                    )
                    await _own(self.outbox.spool, "events.outbox_path")
            await self.gateway.start()
            endpoints: dict[str, list[EndpointConfig]] = {}
            to_start: list[LocalModelServer] = []
            for role in ROLES:
                section = cfg.models.roles[role]
                if section.endpoints:
                    endpoints[role] = list(section.endpoints)
                    continue
                local = cfg.models.local
                threads, parallel, ctx = local.server_settings(role)
                server = LocalModelServer(
                    role,
                    port=self._local_ports.get(role),
                    threads=threads,
                    parallel=parallel,
                    ctx=ctx,
                    model_path=local.model_path,
                    startup_timeout=local.startup_timeout,
                    clock=self.clock,
                    events=self.events,
                    log_dir=self.log_dir,
                )
                self.local[role] = server
                to_start.append(server)
                # Never more requests in flight than the server has slots: the rest wait in the
                # client's queue, where waiting is not counted against the model.
                endpoints[role] = [
                    EndpointConfig(url=server.url, model=role, max_concurrency=server.parallel)
                ]
            await asyncio.gather(*(s.start() for s in to_start))
            if self.shared is not None:
                await self.shared.start()
                if self.outbox is not None:
                    await self.outbox.start()
            group = cfg.circuit_breaker.group()
            for role in ROLES:
                # Configured endpoints are the same for every replica: their breakers share one state.
                # A local model server belongs to its replica, and so does its breaker.
                shared_breakers = (
                    self.shared is not None and cfg.redis.share_breakers and role not in self.local
                )
                section = cfg.models.roles[role]
                client = ModelClient(
                    role,
                    endpoints[role],
                    breakers=group,
                    timeout=section.timeout,
                    clock=self.clock,
                    events=self.events,
                    limiter=section.limiter.config(),
                    alive_window=section.alive_window,
                    breaker_factory=self.shared.breakers.breaker
                    if self.shared is not None and shared_breakers
                    else None,
                )
                if not cfg.circuit_breaker.enabled:
                    for breaker in client.breakers.values():
                        breaker.disable()
                self.clients[role] = client
            self.service = BriefService(
                cfg, self.clients, role_alive=self.role_alive, clock=self.clock, events=self.events
            )
            self.service.start()
            if self.shared is not None:
                self.service.share(
                    self.shared.cache_for(self.service.cache, cfg.cache.ttl_seconds), self.shared.flights
                )
            # Emergency mode (every model down) answers a repeat from its last full answer:
            # Redis (real-time), then the database (stale), then memory (very stale), else a template.
            tiers: list[Tier[dict[str, Any]]] = []
            if self.shared is not None and self.shared.cache is not None:
                shared_cache = self.shared.cache
                detector = self.shared.detector
                tiers.append(
                    Tier(
                        "redis",
                        shared_cache.get,
                        "real_time",
                        timeout=lambda: cfg.redis.timeout if detector.status != "healthy" else 1.0,
                    )
                )
            tiers.append(
                Tier("database", self.store.latest_full_answer, "stale", timeout=cfg.database.write_timeout)
            )
            self.service.read_stored_answers(tiers)
            if cfg.cache.enabled:  # cache.enabled: false -> every request is computed
                self.edge = EdgeCache(self.service.cache, max_entries=cfg.cache.max_size)
            await self._open_store()
            # Batches of REPLAY_BATCH in one transaction each (500: measured ~5,900 writes/s into local
            # PostgreSQL against ~4,800 at 100, see benchmarks/); while the database stays down, retries
            # back off to check_interval * 5 at most, and the watcher below wakes the replayer as soon as
            # it is back.
            self.replayer = SpoolReplayer(
                self.spool,
                self._save,
                batch_sink=self._save_batch,
                batch=REPLAY_BATCH,
                interval=cfg.database.check_interval,
                max_interval=cfg.database.check_interval * 5,
            )
            self.replayer.start()
            self._db_watch = asyncio.create_task(self._database_watch(), name="brownout-db-watch")
            await self.service.verify_constraints()
            await self.ops.start()
            self._monitor = asyncio.create_task(self._health_loop(), name="brownout-health")
            self.live.start()
            self._started = True
        except BaseException as e:
            # Kept for the runner: uvicorn logs a failed startup but does not hand the error back.
            self.start_error = e
            await self.stop()
            raise

    def role_alive(self, role: str) -> bool:
        """False while a role's local server is down or restarting (known at once, not at the next probe)."""
        server = self.local.get(role)
        return server is None or server.state == "running"

    async def _open_store(self) -> None:
        try:
            await self.store.init()
            self._schema_ready = True
            self.store_ok, self.store_error = True, None
        except Exception as e:  # the service answers without a database; /health says so
            self.store_ok, self.store_error = False, error_summary(e)
            _log.error("database unavailable at start: %s", self.store_error)

    async def _database_watch(self) -> None:
        """While writes are spooled (or the database is known down), check it every check_interval and
        wake the replayer the moment some host takes writes again (reconnecting or failing over)."""
        interval = self.config.database.check_interval
        while True:
            await self.clock.sleep(interval)
            if self.spool.pending == 0 and self.store_ok:
                continue
            try:
                if self._schema_ready:
                    await self.store.ping()
                else:  # the database was down at start: create or migrate the schema now
                    await self.store.init()
                    self._schema_ready = True
            except Exception as e:
                self.store_ok, self.store_error = False, error_summary(e)
                continue
            if not self.store_ok:
                _log.warning("database reachable again (%s)", self.store.writable_host)
            self.store_ok, self.store_error = True, None
            if self.replayer is not None and self.spool.pending:
                self.replayer.wake()

    async def _health_loop(self) -> None:
        interval = self.config.models.health_interval
        while True:
            await self.probe_all()
            await self.ops.after_probes()
            await self.clock.sleep(interval)

    async def probe_all(self) -> None:
        """Probe every role once, concurrently."""
        service = self.service
        if service is None:
            return
        interval = self.config.models.health_interval
        timeout = self.config.models.health_timeout

        async def check(role: str) -> None:
            # A role on configured endpoints is the same model for every replica: with Redis, one
            # replica probes it per interval and the others take its results. Local servers are
            # each replica's own and always probed here.
            shared = self.shared
            if shared is not None and role not in self.local:
                client = self.clients[role]
                got = await shared.probe_once(role, interval, lambda: client.probe(timeout=timeout))
                if got is not None:
                    service.record_health(role, got[0])
                    return
            await service.check_health(role)

        results = await asyncio.gather(*(check(r) for r in ROLES), return_exceptions=True)
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
            "cache_key": BriefService.cache_key(text.strip(), response["requested_mode"]),
        }
        if self.spool.pending == 0:
            try:
                async with deadline(self.config.database.write_timeout, clock=self.clock):
                    await self._save(payload["request_id"], "brief", payload)
                self.store_ok, self.store_error = True, None
                self._brief_created(payload)
                return
            except Exception as e:
                summary = error_summary(e)
                # A write refused for its data says nothing about the database's health.
                if not default_data_fault(e):
                    self.store_ok, self.store_error = False, summary
                _log.error("database write of %s failed, spooling it: %s", payload["request_id"], summary)
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
        self._brief_created(payload)

    def _brief_created(self, payload: dict[str, Any]) -> None:
        """Seed 002 §3's event for a stored (or spooled) brief, keyed by request id (sent once)."""
        if self.outbox is not None:
            self.outbox.emit(
                "brief_created",
                {
                    "request_id": payload["request_id"],
                    "requested_mode": payload["requested_mode"],
                    "served_mode": payload["served_mode"],
                    "degraded": payload["degraded"],
                },
            )

    async def _save(self, key: str, kind: str, payload: dict[str, Any]) -> None:
        """The spool's sink: one idempotent write of a brief record (by request_id)."""
        await self.store.save(BriefRecord.from_payload(payload))

    async def _save_batch(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        """The spool's batch sink: up to REPLAY_BATCH records in one transaction, idempotent by request_id."""
        await self.store.save_many([BriefRecord.from_payload(payload) for _, _, payload in entries])
        self.store_ok, self.store_error = True, None

    # ------------------------------------------------------------------ recovery

    # Seed 001's recovery manager, with the brief server's actions (brownout.server.operations).

    @property
    def history(self) -> deque[RecoveryAction]:
        """Every recovery action run, oldest first (bounded by ``recovery.history_size``)."""
        return self.ops.recovery.history

    @property
    def recovery(self) -> RecoveryManager:
        """The recovery manager."""
        return self.ops.recovery

    @property
    def modes(self) -> SystemModes:
        """The system modes (normal / degraded / emergency)."""
        return self.ops.modes

    async def run_action(self, action: str, target: str = "all") -> RecoveryAction:
        """Run one recovery action now; raises ValueError for an unknown action or target."""
        return await self.ops.recovery.trigger(action, target)

    async def reset(self) -> list[RecoveryAction]:
        """Close every breaker, restart local model servers that are not running, and undo lasting
        recovery changes (see :meth:`Operations.reset`)."""
        return await self.ops.reset()

    async def stop(self) -> None:
        """Stop everything; safe to call twice."""
        await self.ops.aclose()
        if self._db_watch is not None:
            self._db_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._db_watch
            self._db_watch = None
        await self.live.aclose()
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                await self.outbox.aclose()
            self.outbox = None
        if self.shared is not None:
            with contextlib.suppress(Exception):
                await self.shared.aclose()
            self.shared = None
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
        with contextlib.suppress(Exception):
            await self.gateway.aclose()
        self._started = False


async def _own(spool: Spool, key: str) -> None:
    """Open ``spool`` for this process alone; another owner is a configuration error naming ``key``.

    Lost entries found on open are logged by the spool and shown in ``/health``; the server keeps going.
    """
    try:
        await spool.open()
    except SpoolInUse as e:
        raise ConfigError(
            key,
            f"{e.path} is already in use by "
            + (f"process {e.owner_pid}" if e.owner_pid is not None else "another process")
            + " (another brownout server?): give each server process its own file",
        ) from e
