"""The server's operations layer: recovery manager, resource monitor, system modes, adaptive cache TTL
and the event-loop blocking detector, wired to the server's parts.

:class:`Operations` is built by :class:`~brownout.server.runtime.Runtime` from the config and the parts it
watches and acts on (:class:`ServerParts`: the brief service, the model clients and local servers, the
edge cache, the records, one round of health probes), and started and stopped with it. What it
connects:

* **recovery** (act on a failure, not only report it) -- :class:`~brownout.recovery.RecoveryManager`
  with the brief server's actions. Failures reach it three ways: a model role failing
  ``recovery.unhealthy_probes`` health probes in a row (its error is classified: a local server that
  died while starting is a model loading failure, a refused connection a network error, ...), a critical
  resource (proactive), and the recovery API (manual). A chain is *resolved* when the roles concerned
  pass a fresh probe (or, for resource failures, no resource is critical any more). When resources come
  back from critical, the lasting changes their chains made (reduced generation parameters) are undone.
  **Busy is not down**: before an automatic chain clears the cache, restarts or reloads a model,
  caps its generation or switches it off, :class:`~brownout.recovery.busy.BusyCheck` asks whether the
  model is only busy (alive, and its latest probe passed recently, or it has requests in flight and
  its server is computing); then the action is skipped and recorded as ``model busy, not down``. A
  proactive chain for CPU or memory (our own processes at critical: that is load, not failure) only
  reports: it probes and re-samples, and clears, restarts and caps nothing. An action on a local
  model server counts every role the server serves (a shared server is restarted once, and not while
  any of its roles is busy). When a supervised local server is replaced by a new healthy process
  (``ModelServerRestarted``), its roles' breakers that failures opened are closed and the roles probed
  at once: the failures were the old process's.
* **resources** (CPU, memory, GPU memory) -- :class:`~brownout.health.ResourceMonitor`; the worst level
  is a component of the system mode (not a core one: at worst it degrades the mode). The local model
  servers' CPU is left out of its CPU reading (their memory counts): a model computing is load.
* **modes** (normal, degraded, emergency) -- :class:`~brownout.health.SystemModes` over these
  components: ``model:qwen`` (core), ``model:mistral``, ``model:llama``, ``database`` (degraded while
  writes are spooled), ``resources`` and ``recovery`` (degraded while recovery has switched a role off).
  Event-loop blocks are counted and alerted, not a component: one slow request is a bug to fix, not a
  reason to switch features off. The mode's switched-off features become roles switched off in the brief
  service: ``creative_hints`` -> llama, ``model_validation`` -> mistral.
* **adaptive TTL** (a busy server answers more from the cache) -- :class:`~brownout.health.AdaptiveTTL`
  sets the response cache's TTL from the load factor ``max(queue fill, CPU use)``; it is not lowered
  while the mode switches off ``cache_ttl_shortening``.
* **loop blocks** (every request waits while the event loop is held) --
  :class:`~brownout.health.LoopBlockDetector`; the app adds its middleware.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from brownout.background import TaskSet
from brownout.briefs.service import BriefService
from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.config import ROLES, BrownoutConfig
from brownout.events import DEFAULT_BUS, EventBus, ModelServerRestarted
from brownout.health.loop import LoopBlockDetector
from brownout.health.modes import AdaptiveTTL, ComponentHealth, ComponentStatus, SystemMode, SystemModes
from brownout.health.resources import HostReader, Level, ResourceMonitor, ResourceSample, Thresholds
from brownout.llm.client import ModelClient
from brownout.llm.local import LocalModelServer
from brownout.policies.breaker import BreakerState
from brownout.recovery.actions import (
    CLEAR_CACHE,
    CPU_OFFLOAD,
    FALLBACK_TO_RULES,
    RECOVERY_SOURCE,
    REDUCE_GENERATION_PARAMS,
    RESET_BREAKERS,
    RESTART_MODEL_SERVER,
    RETRY_MODEL_LOAD,
    BackoffSpec,
    brief_server_actions,
)
from brownout.recovery.artifact import ModelArtifact
from brownout.recovery.busy import BusyCheck, ModelActivity
from brownout.recovery.classify import FailureType
from brownout.recovery.manager import RecoveryAttempt, RecoveryBusy, RecoveryManager
from brownout.server.edge import EdgeCache
from brownout.server.records import BriefRecords

__all__ = ["FEATURE_ROLES", "GENERATOR", "Operations", "ServerParts"]

_log = logging.getLogger("brownout.server")

T = TypeVar("T")

GENERATOR = "qwen"
"""The role without which no model answer exists (a core component)."""

FEATURE_ROLES = {"creative_hints": "llama", "model_validation": "mistral"}
"""The model role each switchable feature of the system modes stands for."""

MODE_SOURCE = "system_mode"
"""The key under which the system mode switches roles off in the service."""

DISRUPTIVE = frozenset(
    {CLEAR_CACHE, RESTART_MODEL_SERVER, RETRY_MODEL_LOAD, REDUCE_GENERATION_PARAMS, FALLBACK_TO_RULES}
)
"""Actions that drop a model's work or take answers away: never run on a model that is only busy."""

LOAD_ONLY_REPORTED = DISRUPTIVE | {CPU_OFFLOAD}
"""What a proactive CPU or memory chain does not do: high use of our own resources is load."""

LOAD_NOT_FAILURE = (
    "load, not failure: our own processes use this much because they are working; reported, not "
    "acted on (admission and the system mode shed load)"
)


def _backoff(section: Any) -> BackoffSpec:
    return BackoffSpec(section.max_attempts, section.initial_delay, section.backoff_factor, section.max_delay)


@dataclass(frozen=True)
class ServerParts:
    """What the operations layer watches and acts on, each built before it (this is also the
    :class:`~brownout.recovery.actions.Plant` the recovery actions act on)."""

    service: BriefService
    clients: Mapping[str, ModelClient]
    local: Mapping[str, LocalModelServer]
    edge: EdgeCache | None
    records: BriefRecords
    probe_all: Callable[[], Coroutine[Any, Any, None]]
    """One round of health probes over every role."""


class Operations:
    """See the module docstring; ``parts`` are the server's parts it watches and acts on."""

    def __init__(
        self,
        config: BrownoutConfig,
        parts: ServerParts,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
    ) -> None:
        self.config = config
        self.parts = parts
        cfg = config
        lb = cfg.loop_block
        self.loop_blocks = LoopBlockDetector(
            threshold=lb.threshold, interval=lb.interval, clock=clock, events=events
        )
        """The event-loop blocking detector (its middleware is added by the app)."""
        rs = cfg.resources
        self.resources = ResourceMonitor(
            cpu=Thresholds(rs.cpu_warning, rs.cpu_critical),
            memory=Thresholds(rs.memory_warning, rs.memory_critical),
            gpu=Thresholds(rs.gpu_warning, rs.gpu_critical),
            interval=rs.interval,
            on_critical=self._on_critical,
            on_level=self._on_level,
            clock=clock,
            events=events,
            # A local model server computing its calls uses its threads fully: load, not a fault.
            cpu_exempt=lambda: {s.pid for s in parts.local.values() if s.pid is not None},
        )
        """The resource monitor."""
        rc = cfg.recovery
        self._hosts: dict[str, HostReader] = {}
        self.busy = BusyCheck(self._activity, recent=max(60.0, 3 * cfg.models.health_interval), clock=clock)
        """Tells a model that is only busy from one that is down (fed by every probe round)."""
        self.artifacts: dict[Path, ModelArtifact] = {}
        """Integrity records of the local model files, by path."""
        actions = brief_server_actions(
            parts,
            roles=ROLES,
            generator=GENERATOR,
            artifacts=self.artifact,
            resource_problem=self._resource_problem if cfg.resources.enabled else None,
            load=_backoff(rc.load),
            download=_backoff(rc.download),
            reduced=(rc.reduced_max_tokens, rc.reduced_temperature),
            clock=clock,
            events=events,
        )
        self.recovery = RecoveryManager(
            actions,
            targets=ROLES,
            cooldown=rc.cooldown,
            max_attempts=rc.max_attempts,
            history_size=rc.history_size,
            resolved=self._resolved,
            guard=self._guard,
            clock=clock,
            events=events,
        )
        """The recovery manager."""
        md = cfg.modes
        self.modes = SystemModes(
            self.components,
            interval=md.interval,
            recover_after=md.recover_after,
            switch_off={
                SystemMode.NORMAL: (),
                SystemMode.DEGRADED: tuple(md.degraded_switch_off),
                SystemMode.EMERGENCY: tuple(md.emergency_switch_off),
            },
            on_change=self._apply_mode,
            clock=clock,
            events=events,
        )
        """The system modes."""
        at = md.adaptive_ttl
        self.ttl = AdaptiveTTL(
            load=self.load_factor,
            apply=self._apply_ttl,
            may_shorten=lambda: self.modes.is_on("cache_ttl_shortening"),
            base=at.base,
            min_ttl=at.min,
            max_ttl=at.max,
            high_load=at.high_load,
            low_load=at.low_load,
            interval=at.interval,
            clock=clock,
            events=events,
        )
        """The adaptive cache TTL."""
        self.probe_streaks: Counter[str] = Counter()
        """Failed health probes in a row, by role."""
        self._tasks = TaskSet("operations", logger=_log)  # checksums, recoveries and resets under way
        self._reset_task: asyncio.Task[list[RecoveryAttempt]] | None = None
        self._events = events
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Start the watchers (the service is running), and record model checksums if none ship."""
        cfg = self.config
        if cfg.loop_block.enabled:
            self.loop_blocks.start()
        if cfg.resources.enabled:
            self.resources.start()
        self.modes.start()
        if cfg.modes.adaptive_ttl.enabled:
            self.ttl.start()
        if self._unsubscribe is None:
            self._unsubscribe = self._events.subscribe(self._on_server_replaced, ModelServerRestarted)
        for path in {server.model_path for server in self.parts.local.values()}:
            artifact = self.artifact(path)
            if artifact is not None and artifact.expected is None:
                # The servers just loaded it: this is the first successful load.
                self._tasks.spawn(artifact.record())

    async def aclose(self) -> None:
        """Stop the watchers and any recovery still running."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self._tasks.cancel()
        await self.recovery.aclose()
        await self.ttl.aclose()
        await self.modes.aclose()
        await self.resources.aclose()
        await self.loop_blocks.aclose()

    # ------------------------------------------------------------------ recovery

    def _on_server_replaced(self, event: ModelServerRestarted) -> None:
        # A supervised local model server was replaced by a new process that passed its health check
        # (after a crash, a wedge or a restart). What its roles' breakers counted were the old
        # process's failures, and their last probe saw it down: without this they would serve rules
        # for the breaker's whole open wait (and until the next probe round) while the model is back.
        roles = [r for r, s in self.parts.local.items() if s.role == event.source]
        if roles:
            self._tasks.spawn(self.after_replacement(roles))

    async def after_replacement(self, roles: list[str]) -> None:
        """Once the local model server of ``roles`` is a new healthy process: close their breakers
        that failures opened (an operator's forced state stays) and probe them at once."""
        reopened: list[str] = []
        for role in roles:
            client = self.parts.clients.get(role)
            for breaker in client.breakers.values() if client is not None else ():
                if breaker.state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
                    breaker.reset()
                    reopened.append(breaker.name)
        svc = self.parts.service
        await asyncio.gather(*(svc.check_health(r) for r in roles), return_exceptions=True)
        self.modes.evaluate()
        _log.info(
            "local model server of %s replaced: %s; probed again",
            ", ".join(roles),
            f"closed the breakers of {', '.join(reopened)}" if reopened else "no breaker was open",
        )

    def artifact(self, path: Path) -> ModelArtifact | None:
        """The integrity record of the local model file ``path`` (made on first use)."""
        found = self.artifacts.get(path)
        if found is None:
            rc = self.config.recovery
            found = ModelArtifact.for_model(path, url=rc.model_url, record_file=rc.checksum_file)
            self.artifacts[path] = found
        return found

    async def after_probes(self) -> None:
        """Called after each round of health probes: hand a role failing ``unhealthy_probes`` probes in
        a row to recovery (the manager's cooldown and attempt limit bound the repeats)."""
        svc = self.parts.service
        needed = self.config.recovery.unhealthy_probes
        for role in ROLES:
            probe = svc.stats.health.get(role)
            if probe is not None:
                self.busy.probed(role, probe.healthy)
        # Lasting changes recovery made for failing models (fallback_to_rules switches a role off) end
        # when every role they switched off passes its probes again: the service comes back to full
        # mode by itself, not only after an operator's reset.
        forced = svc.switched_off.get(RECOVERY_SOURCE, frozenset())
        if forced and all(svc.role_healthy(r) for r in forced):
            # Only what automatic chains applied: an operator's manual action stays until reset, and
            # resource chains are released by the resource monitor.
            automatic = {t.value for t in FailureType} - {
                FailureType.SYSTEM_RESOURCE.value,
                FailureType.VRAM_EXHAUSTION.value,
            }
            kinds = {kind for by in self.recovery.in_force.values() for kind in by} & automatic
            for kind in sorted(kinds):
                undone = await self.recovery.release(FailureType(kind))
                if undone:
                    _log.info("models healthy again: undid %s", ", ".join(a.action for a in undone))
        for role in ROLES:
            if svc.role_healthy(role):
                self.probe_streaks[role] = 0
                continue
            self.probe_streaks[role] += 1
            if self.probe_streaks[role] >= needed and self.config.recovery.enabled:
                self._tasks.spawn(self.recovery.handle_failure(self.why_unhealthy(role), target=role))

    def _activity(self, role: str) -> ModelActivity:
        """What ``role``'s model is doing now: its process up, requests in flight, CPU used, calls
        completed (the progress a busy model makes)."""
        parts = self.parts
        server = parts.local.get(role)
        pid = server.pid if server is not None else None
        # Down or restarting is known at once from the server's state, not at the next probe.
        alive = server is None or (server.state == "running" and pid is not None)
        client = parts.clients.get(role)
        status = client.endpoints_status() if client else []
        in_flight = sum(int(ep.get("in_flight", 0)) for ep in status)
        completed = sum(int(ep.get("completed", 0)) for ep in status) if client else None
        cpu: float | None = None
        if pid is not None:
            host = self._hosts.setdefault(role, HostReader())
            tree = host.processes(pid, memory=False)
            cpu = sum(p.cpu_seconds for p in tree) if tree else None
        return ModelActivity(alive, in_flight, cpu, completed)

    def _guard(self, kind: FailureType, target: str, action: str, trigger: str) -> str | None:
        """Why an action of an automatic or proactive chain must not run now (None: it may)."""
        if trigger == "proactive" and kind is FailureType.SYSTEM_RESOURCE and action in LOAD_ONLY_REPORTED:
            return LOAD_NOT_FAILURE
        if action in DISRUPTIVE:
            return self.busy.any_busy(ROLES if target in ("all", "") else self.sharing(target))
        return None

    def sharing(self, role: str) -> list[str]:
        """``role`` and the roles whose local model server is the same as its own (an action on that
        server -- a restart -- drops their work too)."""
        server = self.parts.local.get(role)
        if server is None:
            return [role]
        return [role, *(r for r, s in self.parts.local.items() if s is server and r != role)]

    def why_unhealthy(self, role: str) -> str:
        """The best description of why ``role`` is unhealthy (for classification)."""
        parts = self.parts
        server = parts.local.get(role)
        if server is not None and server.state != "running":
            return f"local model server {server.state}: {server.last_error or 'no error recorded'}"
        probe = parts.service.stats.health.get(role)
        if probe is not None and not probe.healthy:
            return probe.error or "health probe failed"
        client = parts.clients.get(role)
        if client is not None and not client.available:
            return f"{role}: circuit breaker open"
        return f"{role} unhealthy"

    async def _resolved(self, failure_type: FailureType, target: str) -> bool:
        if failure_type in (FailureType.SYSTEM_RESOURCE, FailureType.VRAM_EXHAUSTION):
            return await self._resource_problem() is None
        svc = self.parts.service
        roles = list(ROLES) if target in ("all", "") else [target]
        await asyncio.gather(*(svc.check_health(r) for r in roles), return_exceptions=True)
        return all(svc.role_healthy(r) for r in roles)

    async def _resource_problem(self) -> str | None:
        """Re-sample now; describe the critical resources, or None."""
        sample = await self.resources.check()
        critical = [
            f"{name} at {pct:.0f}%"
            for name, pct in sample.readings().items()
            if self.resources.thresholds_for(name).level(pct) == "critical"
        ]
        return "; ".join(critical) if critical else None

    async def _on_critical(self, resource: str, sample: ResourceSample) -> None:
        if not self.config.recovery.enabled or self.recovery.busy:
            return  # busy: a chain runs (maybe the one re-sampling now)
        kind = FailureType.VRAM_EXHAUSTION if resource.startswith("gpu") else FailureType.SYSTEM_RESOURCE
        percent = sample.readings().get(resource, 0.0)
        self._tasks.spawn(
            self.recovery.handle_failure(
                f"{resource} at {percent:.0f}% (critical)", failure_type=kind, trigger="proactive"
            )
        )

    async def _on_level(self, resource: str, old: Level, new: Level, sample: ResourceSample) -> None:
        if old == "critical" and not self.resources.critical():
            kind = FailureType.VRAM_EXHAUSTION if resource.startswith("gpu") else FailureType.SYSTEM_RESOURCE
            undone = await self.recovery.release(kind)
            if undone:
                _log.info("resources below critical: undid %s", ", ".join(a.action for a in undone))

    async def reset(self) -> list[RecoveryAttempt]:
        """The recovery API's reset: close every breaker, restart local servers that are not running,
        undo lasting recovery changes (models back on, generation parameters restored), forget
        attempts and cooldowns, and re-derive the system mode now."""
        rec = self.recovery
        done: list[RecoveryAttempt] = []
        steps = [(RESET_BREAKERS, "all")]
        down: dict[int, str] = {}  # a shared server once, by its first role
        for role, server in self.parts.local.items():
            if server.state != "running":
                down.setdefault(id(server), role)
        steps += [(RESTART_MODEL_SERVER, r) for r in down.values()]
        for action, target in steps:
            try:
                done.append(await rec.trigger(action, target))
            except RecoveryBusy as e:  # a chain is doing it right now: that run finishes it
                _log.info("recovery reset: %s", e)
        done.extend(await rec.reset())
        self.probe_streaks.clear()
        self.modes.reset()
        return done

    def start_reset(self) -> asyncio.Task[list[RecoveryAttempt]]:
        """Run :meth:`reset` as a task of its own (the API waits for it a bounded time); raises
        :class:`~brownout.recovery.manager.RecoveryBusy` at once while an earlier reset still runs."""
        running = self._reset_task
        if running is not None and not running.done():
            raise RecoveryBusy(
                "a recovery reset is running already; ask again when it has ended",
                retry_after=self.config.recovery.admin_timeout,
            )
        task = self._tasks.spawn(self.reset())
        self._reset_task = task
        return task

    # ------------------------------------------------------------------ modes and TTL

    def components(self) -> list[ComponentHealth]:
        """The health of every component the system mode is derived from."""
        svc = self.parts.service
        records = self.parts.records
        out: list[ComponentHealth] = []
        for role in ROLES:
            ok = svc.role_healthy(role)
            out.append(
                ComponentHealth(
                    f"model:{role}",
                    "healthy" if ok else "unhealthy",
                    core=role == GENERATOR,
                    detail="" if ok else self.why_unhealthy(role),
                )
            )
        if records.ok:
            out.append(ComponentHealth("database", "healthy"))
        else:
            spool = records.spool.stats()
            status: ComponentStatus = "unhealthy" if spool.alert else "degraded"
            out.append(
                ComponentHealth("database", status, detail=f"{records.error}; {spool.pending} writes spooled")
            )
        level = self.resources.level
        # A warning is reported (health, alerts, webhooks) but switches nothing off: a warning asks for
        # attention, the critical level for action.
        status_of: dict[str, ComponentStatus] = {
            "ok": "healthy",
            "warning": "healthy",
            "critical": "unhealthy",
        }
        detail = ", ".join(f"{r} {lv}" for r, lv in self.resources.levels.items() if lv != "ok")
        # Not core: a busy CPU is what a local model on CPU looks like. Critical resources degrade
        # the mode (the hinter is switched off) and run their recovery chain; they never reach
        # emergency, which would stop validation too.
        out.append(ComponentHealth("resources", status_of[level], core=False, detail=detail))
        forced = sorted(svc.switched_off.get(RECOVERY_SOURCE, ()))
        out.append(
            ComponentHealth(
                "recovery",
                "degraded" if forced else "healthy",
                detail=f"{', '.join(forced)} switched off by recovery until reset" if forced else "",
            )
        )
        return out

    def _apply_mode(self, old: SystemMode, new: SystemMode, reason: str) -> None:
        svc = self.parts.service
        roles = frozenset(FEATURE_ROLES[f] for f in self.modes.switch_off[new] if f in FEATURE_ROLES)
        if roles:
            svc.switched_off[MODE_SOURCE] = roles
        else:
            svc.switched_off.pop(MODE_SOURCE, None)

    def load_factor(self) -> float:
        """0 (idle) .. 1 (overloaded): the larger of the queue's fill and the CPU use."""
        queue = 0.0
        max_size = self.config.queue.max_size
        if max_size > 0:
            queue = self.parts.service.admission.queue_size / max_size
        last = self.resources.last
        cpu = (last.cpu_percent or 0.0) / 100 if last is not None else 0.0
        return min(1.0, max(queue, cpu))

    def _apply_ttl(self, ttl: float) -> None:
        self.parts.service.cache.ttl = ttl

    # ------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        """A JSON-ready view of everything here."""
        return {
            "system_mode": self.modes.status(),
            "resources": self.resources.status(),
            "cache_ttl": self.ttl.status(),
            "event_loop": self.loop_blocks.status(),
            "recovery": self.recovery.status(),
        }
