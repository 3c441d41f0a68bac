"""Everything ``brownout serve`` runs, built from the config in one step and started and stopped together.

:class:`Runtime` is the server's composition root. Its constructor builds every part once, in order,
each given the parts it uses (never the runtime): for each model role the configured external
endpoints, or a local llama.cpp server (:class:`~brownout.llm.local.LocalModelServer`; by default one
server for every local role, ``models.local.layout``), and a
:class:`~brownout.llm.client.ModelClient` on them; the brief service; the records (database and
spool, :mod:`brownout.server.records`); Redis-backed shared state and the event outbox when
configured; the gateway; the operations layer (:mod:`brownout.server.operations`); the status views
(:mod:`brownout.server.status`); and the live view (:mod:`brownout.server.live`). Building does no
I/O beyond reading how many cores the process may use (the shared model server's threads default to
them): :meth:`Runtime.start` takes the files this process must own, starts the model servers, opens
the database and starts the periodic health probes (every ``models.health_interval``).
:meth:`Runtime.stop` stops every child process, so Ctrl-C leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from brownout import telemetry
from brownout.background import Periodic
from brownout.briefs.answer import BriefAnswer
from brownout.briefs.jobs import BRIEFS, BriefsJob
from brownout.briefs.service import CUT_BRIEF_VALUE, ROLE_OF_STAGE, BriefService, generator_latency_budget
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import ROLES, BrownoutConfig, LocalModelsSection
from brownout.durable.job_queue import RedisItemQueue
from brownout.durable.jobs import DatabaseClaims, JobStore
from brownout.durable.outbox import EventOutbox, RedisStreamPublisher
from brownout.durable.spool import Spool, SpoolInUse, SpoolReplayer
from brownout.durable.store import BriefStore
from brownout.errors import ConfigError
from brownout.events import DEFAULT_BUS, EventBus
from brownout.gateway.router import Gateway
from brownout.gateway.stats import Histogram
from brownout.health.modes import SystemModes
from brownout.health.resources import HostReader, usable_cores
from brownout.llm.client import ModelClient, SharedEndpoint
from brownout.llm.local import LocalModelServer, free_port
from brownout.llm.types import EndpointConfig
from brownout.policies.limiter import AdaptiveLimiter
from brownout.recovery.manager import RecoveryAttempt, RecoveryManager
from brownout.server.edge import EdgeCache
from brownout.server.history import LiveHistory, new_latency_histogram, read_parts
from brownout.server.jobs import InteractiveFirst, JobWorkers
from brownout.server.live import LiveHub, WebhookSender
from brownout.server.operations import Operations, ServerParts
from brownout.server.records import BriefRecords
from brownout.server.shared import SharedState
from brownout.server.status import ServerStatus
from brownout.state.tiered import Tier

__all__ = ["SLOT_PRIORITY", "HttpStats", "ModelProbes", "RecoveryAction", "Runtime"]

SLOT_PRIORITY: Final = {"qwen": 0, "gateway": 0, "mistral": 1, "llama": 2}
"""Who gets a freed slot of a local model server first (lower first). The generator's calls and the
gateway's requests to the embedded model -- each one a caller waiting for its answer -- first, in the
order they asked: under a brief load that keeps the generator busy, a gateway request still gets its
turn instead of waiting out its budget behind every later brief. Then the brief's optional stages,
the validator and the hinter, which the dimmer drops under load."""

_log = logging.getLogger("brownout.server")


RecoveryAction = RecoveryAttempt
"""One recovery action run by hand or automatically, kept in the history."""


@dataclass
class HttpStats:
    """HTTP request and error counts (``http_requests_total``, ``http_errors_total`` by status), and how
    long refusals took (``brownout_shed_seconds``): from a request reaching the app to its 503/429 with
    ``Retry-After``. Shedding is only worth its name when it answers in milliseconds while the models are
    saturated; this histogram shows it does, from the server's side. ``briefs`` times each brief answered
    (200), for the latency curves of the dashboard (:mod:`brownout.server.history`)."""

    errors: Counter[int] = field(default_factory=Counter)
    requests: int = 0
    shed: Histogram = field(default_factory=lambda: Histogram(SHED_BUCKETS))
    briefs: Histogram = field(default_factory=new_latency_histogram)


SHED_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Bucket bounds of ``brownout_shed_seconds`` (the goal: a refusal within 50 ms)."""


STARVED_SHARE: Final = 0.5
"""A local model server whose threads, summed, waited for a CPU at least this many seconds per second
of a probe that timed out was starved by other processes: the probe says nothing of the model."""


class ModelProbes:
    """One round of health probes over every model role, concurrently (the runtime runs a round every
    ``models.health_interval``; the recovery action that re-probes runs one at once).

    A probe of a local model server that timed out while the server's threads spent the time waiting
    for a CPU (:data:`STARVED_SHARE`; ``wait_of(pid)`` reads their run-queue wait so far) was starved
    by other processes on the machine -- a neighbour's load, a benchmark beside it -- not failed by
    the model: it is recorded as a busy probe (healthy, its ``error`` saying ``starved: ...``), so no
    mode falls and no recovery restarts a healthy server for it. A wedged or stopped server neither
    runs nor waits, and its timed-out probe stays a failure.
    """

    def __init__(
        self,
        service: BriefService,
        clients: Mapping[str, ModelClient],
        local: Mapping[str, LocalModelServer],
        shared: SharedState | None,
        *,
        interval: float,
        timeout: float,
        clock: Clock = SYSTEM_CLOCK,
        wait_of: Callable[[int], float | None] | None = None,
    ) -> None:
        self.service = service
        self.clients = clients
        self.local = local
        self.shared = shared
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._wait_of = wait_of if wait_of is not None else HostReader().run_queue_wait

    async def _probe_local(self, roles: Sequence[str], pid: int | None) -> None:
        """Probe the first of ``roles`` on their local server (process ``pid``) and record the outcome
        for each of them, a timeout while the server waited for a CPU as starved (class docstring)."""
        service = self.service
        role = roles[0]
        before = self._wait_of(pid) if pid is not None else None
        start = self._clock.now()
        results = await service.backends[role].probe(timeout=self.timeout)
        if before is not None and pid is not None and results and not any(r.healthy for r in results):
            span = self._clock.now() - start
            after = self._wait_of(pid)
            waited = None if after is None else after - before
            timed_out = all((r.error or "").startswith("timeout") for r in results)
            if timed_out and waited is not None and span > 0 and waited >= STARVED_SHARE * span:
                note = (
                    f"starved: its server's threads waited {waited:.1f} s for a CPU during the "
                    f"{span:.1f} s probe (other processes had the cores); not counted against the model"
                )
                _log.warning("health probe of %s timed out while %s", role, note.removeprefix("starved: "))
                results = [dataclasses.replace(r, healthy=True, busy=True, error=note) for r in results]
        service.record_health(role, results)
        for other in roles[1:]:
            service.record_health(other, [dataclasses.replace(r, role=other) for r in results])

    async def probe_all(self) -> None:
        """Probe every role once, concurrently.

        Roles that share one local model server (``models.local.layout: shared``, the default) are one
        model in one process: one probe, on the first of them, gives the verdict of all. Three probes
        at once cost the server more work for the same answer, on cores another process (a
        neighbour's model server, a benchmark's) may need at that moment.
        """
        service = self.service
        sharing: dict[int, list[str]] = {}
        for role in ROLES:
            server = self.local.get(role)
            if server is not None:
                sharing.setdefault(id(server), []).append(role)

        async def check(role: str) -> None:
            # A role on configured endpoints is the same model for every replica: with Redis, one
            # replica probes it per interval and the others take its results. Local servers are
            # each replica's own and always probed here.
            shared = self.shared
            if shared is not None and role not in self.local:
                client = self.clients[role]
                got = await shared.probe_once(role, self.interval, lambda: client.probe(timeout=self.timeout))
                if got is not None:
                    service.record_health(role, got[0])
                    return
            server = self.local.get(role)
            if server is not None:
                await self._probe_local(sharing[id(server)], server.pid)
                return
            await service.check_health(role)

        # One check per shared local server (its first role speaks for the others).
        probed = [r for r in ROLES if r not in self.local or sharing[id(self.local[r])][0] == r]
        results = await asyncio.gather(*(check(r) for r in probed), return_exceptions=True)
        for role, result in zip(probed, results, strict=True):
            if isinstance(result, BaseException):
                _log.warning("health probe of %s failed: %s", role, result)


def _role_alive(local: Mapping[str, LocalModelServer]) -> Callable[[str], bool]:
    """False while a role's local server is down or restarting (known at once, not at the next probe)."""

    def alive(role: str) -> bool:
        server = local.get(role)
        return server is None or server.state == "running"

    return alive


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
        self.http = HttpStats()
        self.telemetry: telemetry.Telemetry | None = None
        """Tracing, while it is on (from :meth:`start` to :meth:`stop`)."""
        cfg = config
        # Redis-backed shared state (breakers, cache, singleflight) when ``redis.url`` is set, and the
        # domain events on their way to its stream when events are on too; both connect in start().
        self.shared: SharedState | None = None
        if cfg.redis.url is not None:
            self.shared = SharedState(cfg.redis, clock=clock, events=events)
        self.outbox: EventOutbox | None = None
        if self.shared is not None and cfg.events.enabled:
            ev = cfg.events
            self.outbox = EventOutbox(
                ev.outbox_path,
                RedisStreamPublisher(self.shared.client, stream=ev.stream, maxlen=ev.maxlen),
                events=events,
                clock=clock,
                batch=ev.batch,
                max_attempts=ev.max_attempts,
            )
        # Served briefs are stored before they are acknowledged: the database, else the local spool.
        self.records = BriefRecords(cfg.database, outbox=self.outbox, clock=clock, events=events)
        # The OpenAI-compatible gateway's model groups (its HTTP client opens in start()). Out of the
        # box it offers the generator's embedded model as the group "local", so an OpenAI client works
        # with no configuration: that server's port is chosen now, for the group's URL.
        self._local_ports: dict[str, int] = {}
        gateway_config = cfg.gateway
        local_role = cfg.gateway_local_role
        if local_role is not None:
            self._local_ports[local_role] = free_port()
            url = f"http://127.0.0.1:{self._local_ports[local_role]}"
            gateway_config = gateway_config.with_local(url, model=local_role)
        self.gateway = Gateway(gateway_config, clock=clock, events=events)
        # Each model role: its configured endpoints, or a local model server -- one for every local
        # role (models.local.layout: shared, the default) or one of its own (per_role).
        self.cores = usable_cores()
        """The CPU cores this process may use (the shared model server's threads by default)."""
        self.local: dict[str, LocalModelServer] = {}
        """The local model server of each role served locally (one object for all, when shared)."""
        endpoints: dict[str, list[EndpointConfig]] = {}
        local = cfg.models.local
        servers: dict[str, LocalModelServer] = {}
        for role in ROLES:
            section = cfg.models.roles[role]
            if section.endpoints:
                endpoints[role] = list(section.endpoints)
                continue
            name = local.server_name(role)
            server = servers.get(name)
            if server is None:
                server = servers[name] = self._local_server(local, name, role, clock, events, log_dir)
            self.local[role] = server
            # Never more requests in flight than the server has slots: the rest wait in the
            # client's queue, where waiting is not counted against the model.
            endpoints[role] = [EndpointConfig(url=server.url, model=role, max_concurrency=server.parallel)]
        # The generator's calls are cut at their requests' latency target: where many run that late,
        # its limit climbs to the concurrency that makes the most answers in time (the latency
        # ceiling of brownout.policies.limiter). A call cut there is still served, its description
        # cut short: worth half a whole one.
        generator = ROLE_OF_STAGE["generate"]
        budgets = {role: generator_latency_budget(cfg) if role == generator else None for role in ROLES}
        late_value = {"late_value": CUT_BRIEF_VALUE}
        # A shared server has one concurrency limit for all its roles' calls (its slots), and their
        # signs of life are one: its generator's calls and the gateway's (below) wait first, then the
        # validator's, then the hinter's (SLOT_PRIORITY), so that under load the server does the
        # work the answers need most. The limit follows the generator's limiter settings and learns
        # from the generator's calls alone, whose length is steady (the others' are shorter and
        # would read as a queue).
        shares: dict[str, SharedEndpoint] = {}
        if local.shared and len(self.local) > 1:
            server = next(iter(self.local.values()))
            first = next(iter(self.local))
            # The server runs its slots' calls at once, none queued: the limit follows the work it
            # does a second up to them (brownout.policies.limiter), not Vegas's queue estimate.
            limits = (
                cfg.models.roles[first]
                .limiter.config(budgets[first])
                .capped(server.parallel)
                .model_copy(update={"slots": server.parallel, **late_value})
            )
            shares[server.url] = SharedEndpoint(
                AdaptiveLimiter(server.role, limits, clock=clock, events=events)
            )
        self.clients: dict[str, ModelClient] = {}
        group = cfg.circuit_breaker.group()
        shared = self.shared
        first_local = next(iter(self.local), None)
        for role in ROLES:
            # Configured endpoints are the same for every replica: their breakers share one state.
            # A local model server belongs to its replica, and so does its breaker.
            share_breakers = shared is not None and cfg.redis.share_breakers and role not in self.local
            section = cfg.models.roles[role]
            on_shared = bool(shares) and role in self.local
            self.clients[role] = ModelClient(
                role,
                endpoints[role],
                breakers=group,
                timeout=section.timeout,
                clock=clock,
                events=events,
                limiter=(
                    section.limiter.config(budgets[role]).model_copy(
                        update={"slots": self.local[role].parallel, **late_value}
                    )
                    if role in self.local
                    else section.limiter.config(budgets[role]).model_copy(update=late_value)
                ),
                alive_window=section.alive_window,
                breaker_factory=shared.breakers.breaker if shared is not None and share_breakers else None,
                shared=shares if on_shared else None,
                priority=SLOT_PRIORITY[role],
                learns_limit=not on_shared or role == first_local,
            )
        if local_role is not None and local_role in self.local:
            # The gateway's group of the embedded model calls the same server: its requests wait for
            # that server's slots with the pipeline's calls, in our queue, never in the server's.
            share = self.clients[local_role].share_of(self.local[local_role].url)
            if share is not None:
                self.gateway.share_slots(gateway_config.local.name, share, priority=SLOT_PRIORITY["gateway"])
        self.service = BriefService(
            cfg,
            self.clients,
            role_alive=_role_alive(self.local),
            clock=clock,
            events=events,
            cores=self.cores,
        )
        """The brief service (answers once :meth:`start` has started it)."""
        if shared is not None:
            self.service.share(shared.cache_for(self.service.cache, cfg.cache.ttl_seconds), shared.flights)
        # Emergency mode (every model down) answers a repeat from its last full answer:
        # Redis (real-time), then the database (stale), then memory (very stale), else a template.
        tiers: list[Tier[dict[str, Any]]] = []
        if shared is not None and shared.cache is not None:
            shared_cache = shared.cache
            detector = shared.detector
            tiers.append(
                Tier(
                    "redis",
                    shared_cache.get,
                    "real_time",
                    timeout=lambda: cfg.redis.timeout if detector.status != "healthy" else 1.0,
                )
            )
        tiers.append(
            Tier(
                "database",
                self.records.store.latest_full_answer,
                "stale",
                timeout=cfg.database.write_timeout,
            )
        )
        self.service.read_stored_answers(tiers)
        self.edge: EdgeCache | None = None
        if cfg.cache.enabled:  # cache.enabled: false -> every request is computed
            self.edge = EdgeCache(self.service.cache, max_entries=cfg.cache.max_size)
        self.probes = ModelProbes(
            self.service,
            self.clients,
            self.local,
            shared,
            interval=cfg.models.health_interval,
            timeout=cfg.models.health_timeout,
            clock=clock,
        )
        # Recovery manager, resource monitor, system modes, adaptive cache TTL, loop-block detector.
        self.ops = Operations(
            cfg,
            ServerParts(
                service=self.service,
                clients=self.clients,
                local=self.local,
                edge=self.edge,
                records=self.records,
                probe_all=self.probes.probe_all,
            ),
            clock=clock,
            events=events,
        )
        self.status = ServerStatus(
            cfg,
            service=self.service,
            clients=self.clients,
            local=self.local,
            records=self.records,
            shared=shared,
            outbox=self.outbox,
            gateway=self.gateway,
            modes=self.ops.modes,
        )
        """The snapshot and the /health views of the parts above."""
        # The live view (SSE, WebSocket, dashboard) and the alert webhooks.
        self.live = LiveHub(
            self.status.snapshot,
            webhooks=WebhookSender(cfg.webhooks, clock=clock),
            clock=clock,
            events=events,
            interval=cfg.server.live_interval,
            max_clients=cfg.server.live_max_clients,
            # The dashboard's charts: a point every few seconds, read from the counters above.
            charts=LiveHistory(
                lambda: read_parts(self.status, self.http.briefs),
                interval=cfg.server.history_interval,
                window=cfg.server.history_window,
                clock=clock,
            ),
        )
        # Long-running jobs (POST /v1/jobs), kept in the briefs' database and run here. The owner names
        # this server's spool, which one process alone can hold: a server that comes back after a crash
        # takes its jobs back at once instead of waiting out its own lease.
        jobs_cfg = cfg.jobs
        job_store = JobStore(self.records.store)
        owner = f"{socket.gethostname()}:{os.path.abspath(cfg.database.spool_path)}"
        resources = self.ops.resources
        # With Redis and one PostgreSQL database for all replicas, the items go through a Redis stream
        # every replica reads (jobs.distribute); the owner is then this replica's consumer name too.
        queue = None
        if cfg.jobs_distributed and cfg.redis.url is not None:
            queue = RedisItemQueue.from_url(
                cfg.redis.url, prefix=cfg.redis.prefix, consumer=owner, block=jobs_cfg.poll_interval
            )
        elif cfg.jobs.enabled and cfg.redis.url is not None and cfg.jobs.distribute == "auto":
            _log.warning(
                "jobs run on the replica they were submitted to: sharing them between replicas needs "
                "a PostgreSQL database.url all replicas use (set jobs.distribute: local to say this is meant)"
            )
        self.jobs = JobWorkers(
            jobs_cfg,
            job_store,
            DatabaseClaims(job_store, owner, lease=jobs_cfg.lease),
            {BRIEFS: BriefsJob(self.service)},
            gate=InteractiveFirst(
                self.service.admission,
                self.service.dimmer,
                threshold=jobs_cfg.interactive_threshold,
                memory_critical=lambda: resources.levels.get("memory") == "critical",
            ),
            publish=lambda kind, data, keep: self.live.publish(kind, data, record=keep),
            clock=clock,
            events=events,
            queue=queue,
        )
        """The job workers (from :meth:`start`, when ``jobs.enabled``)."""
        # Probes every role every models.health_interval, from start() to stop().
        self._monitor = Periodic(
            "brownout-health",
            self._probe_round,
            lambda: self.config.models.health_interval,
            clock=clock,
            logger=_log,
        )
        self.start_error: BaseException | None = None
        """Why the last :meth:`start` failed, if it did (the server runner reports it)."""

    def _local_server(
        self,
        local: LocalModelsSection,
        name: str,
        role: str,
        clock: Clock,
        events: EventBus,
        log_dir: Path | None,
    ) -> LocalModelServer:
        """The local model server ``name`` (a role's own, or the shared one), first wanted by ``role``."""
        threads, parallel, ctx = local.server_settings(role, self.cores)
        # The generator's server is the gateway's "local" group: its port was chosen for the group.
        port = next((p for r, p in self._local_ports.items() if local.server_name(r) == name), None)
        return LocalModelServer(
            name,
            port=port,
            threads=threads,
            parallel=parallel,
            ctx=ctx,
            model_path=local.model_path,
            startup_timeout=local.startup_timeout,
            clock=clock,
            events=events,
            log_dir=log_dir,
        )

    @property
    def local_servers(self) -> list[LocalModelServer]:
        """Each local model server once (several roles may share one)."""
        return list({id(s): s for s in self.local.values()}.values())

    # ------------------------------------------------------------------ the parts, by their usual names

    @property
    def store(self) -> BriefStore:
        """The database of served briefs."""
        return self.records.store

    @property
    def spool(self) -> Spool:
        """The local spool in front of the database."""
        return self.records.spool

    @property
    def replayer(self) -> SpoolReplayer:
        """Moves spooled writes into the database."""
        return self.records.replayer

    @property
    def store_ok(self) -> bool:
        """Whether the database took the last write or check."""
        return self.records.ok

    @property
    def store_error(self) -> str | None:
        """Why the database is not ok (a summary, never the SQL)."""
        return self.records.error

    @property
    def recovery(self) -> RecoveryManager:
        """The recovery manager."""
        return self.ops.recovery

    @property
    def modes(self) -> SystemModes:
        """The system modes (normal / degraded / emergency)."""
        return self.ops.modes

    @property
    def started(self) -> bool:
        """True while the service answers (from :meth:`start` until :meth:`stop`)."""
        return self.service.started

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Start model servers, clients, the store and the health monitor."""
        cfg = self.config
        try:
            # Traces first, so that nothing this server does once it answers goes untraced (off
            # unless the telemetry section or an OTEL_EXPORTER_OTLP_ENDPOINT asks for it).
            if self.telemetry is None:
                self.telemetry = telemetry.start(cfg.telemetry, self.events)
            # The files this process must own come first: a second server on the same spool or outbox
            # stops here, naming the setting, before it starts model servers or touches the database.
            await _own(self.records.spool, "database.spool_path")
            if self.outbox is not None:
                await _own(self.outbox.spool, "events.outbox_path")
            await self.gateway.start()
            await asyncio.gather(*(s.start() for s in self.local_servers))
            if self.shared is not None:
                await self.shared.start()
                if self.outbox is not None:
                    await self.outbox.start()
            if not cfg.circuit_breaker.enabled:
                for client in self.clients.values():
                    for breaker in client.breakers.values():
                        breaker.disable()
            self.service.start()
            await self.records.open()
            if cfg.jobs.enabled:
                await self.jobs.start()
            await self.service.verify_constraints()
            await self.ops.start()
            self._monitor.start()
            self.live.start()
        except BaseException as e:
            # Kept for the runner: uvicorn logs a failed startup but does not hand the error back.
            self.start_error = e
            await self.stop()
            raise

    async def _probe_round(self) -> None:
        # The health monitor's round, every models.health_interval from start to stop.
        await self.probes.probe_all()
        await self.ops.after_probes()

    async def probe_all(self) -> None:
        """Probe every role once, concurrently."""
        await self.probes.probe_all()

    async def record(self, text: str, response: BriefAnswer) -> None:
        """Persist a served brief before it is acknowledged (see :meth:`BriefRecords.record`)."""
        await self.records.record(text, response)

    async def stop(self) -> None:
        """Stop everything; safe to call twice."""
        await self.jobs.aclose()  # first: its items must not find the service or the store gone
        await self.ops.aclose()
        await self.live.aclose()
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                await self.outbox.aclose()
        if self.shared is not None:
            with contextlib.suppress(Exception):
                await self.shared.aclose()
        await self._monitor.stop()
        await self.service.aclose()
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.gather(*(s.stop() for s in self.local_servers), return_exceptions=True)
        await self.records.aclose()
        with contextlib.suppress(Exception):
            await self.gateway.aclose()
        traces, self.telemetry = self.telemetry, None
        if traces is not None:
            # Last, so the shutdown's own spans go too; sending the buffered spans may take the
            # exporter's timeout, which must not hold the event loop.
            await asyncio.to_thread(traces.shutdown)


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
