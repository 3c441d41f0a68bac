"""Recovery actions and the chain of actions run for each kind of failure.

An :class:`Action` is a named async step with a description. It returns an :class:`ActionResult` whose
status is ``"ok"`` (it did its job), ``"failed"`` (it tried and could not) or ``"skipped"`` (it does not
apply here: no local model server to restart, a backend that already runs on the CPU). Actions that
change how the service runs until reset (:data:`REDUCE_GENERATION_PARAMS`, :data:`FALLBACK_TO_RULES`)
carry an ``undo``; ``final`` actions end a chain when they succeed (the failure is then *mitigated*).

:data:`DEFAULT_CHAINS` tries the cheapest remedy first and falls back to rules last, mapped onto what
this stack can do:

=================================  =====================================================================
failure                            chain
=================================  =====================================================================
model_loading_failure              clear_cache → retry_model_load → cpu_offload → fallback_to_rules
vram_exhaustion                    clear_cache → cpu_offload → reduce_generation_params → fallback_to_rules
generation_pipeline_error          clear_cache → restart_model_server → reduce_generation_params →
                                   fallback_to_rules
hardware_optimization_failure      check_health → clear_cache → cpu_offload → fallback_to_rules
system_resource_error              check_health → clear_cache → reduce_generation_params
network_error                      retry_model_load → fallback_to_rules
unknown                            check_health → clear_cache → restart_model_server
=================================  =====================================================================

Two choices worth knowing: the usual ``apply_vram_optimization`` step becomes
``reduce_generation_params`` or ``cpu_offload`` (llama.cpp has no separate optimisation switch), and a
system resource error does not end in ``fallback_to_rules``: resource pressure passes, and the system
modes already shed load while it lasts, whereas rules-only mode stays until an operator resets it.

:func:`brief_server_actions` builds the concrete actions for ``brownout serve`` against structural
types (any object with the right attributes), so this module imports nothing from the server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ModelIntegrityError
from brownout.events import DEFAULT_BUS, EventBus
from brownout.policies.retry import Retry, RetryConfig
from brownout.recovery.artifact import ModelArtifact
from brownout.recovery.classify import FailureType

__all__ = [
    "CHECK_HEALTH",
    "RECOVERY_SOURCE",
    "CLEAR_CACHE",
    "CPU_OFFLOAD",
    "DEFAULT_CHAINS",
    "FALLBACK_TO_RULES",
    "REDUCE_GENERATION_PARAMS",
    "RESET_BREAKERS",
    "RESTART_MODEL_SERVER",
    "RETRY_MODEL_LOAD",
    "Action",
    "ActionResult",
    "ActionStatus",
    "BackoffSpec",
    "Plant",
    "brief_server_actions",
    "chain_for",
]

_log = logging.getLogger("brownout.recovery")

ActionStatus = Literal["ok", "failed", "skipped"]
"""What came of one action: did its job, tried and could not, or did not apply."""

CLEAR_CACHE = "clear_cache"
RESET_BREAKERS = "reset_breakers"
CHECK_HEALTH = "check_health"
RESTART_MODEL_SERVER = "restart_model_server"
RETRY_MODEL_LOAD = "retry_model_load"
REDUCE_GENERATION_PARAMS = "reduce_generation_params"
CPU_OFFLOAD = "cpu_offload"
FALLBACK_TO_RULES = "fallback_to_rules"

DEFAULT_CHAINS: Mapping[FailureType, tuple[str, ...]] = {
    FailureType.MODEL_LOADING: (CLEAR_CACHE, RETRY_MODEL_LOAD, CPU_OFFLOAD, FALLBACK_TO_RULES),
    FailureType.VRAM_EXHAUSTION: (CLEAR_CACHE, CPU_OFFLOAD, REDUCE_GENERATION_PARAMS, FALLBACK_TO_RULES),
    FailureType.PIPELINE_ERROR: (
        CLEAR_CACHE,
        RESTART_MODEL_SERVER,
        REDUCE_GENERATION_PARAMS,
        FALLBACK_TO_RULES,
    ),
    FailureType.HARDWARE_OPTIMISATION: (CHECK_HEALTH, CLEAR_CACHE, CPU_OFFLOAD, FALLBACK_TO_RULES),
    FailureType.SYSTEM_RESOURCE: (CHECK_HEALTH, CLEAR_CACHE, REDUCE_GENERATION_PARAMS),
    FailureType.NETWORK: (RETRY_MODEL_LOAD, FALLBACK_TO_RULES),
    FailureType.UNKNOWN: (CHECK_HEALTH, CLEAR_CACHE, RESTART_MODEL_SERVER),
}
"""The action chain per failure type (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The outcome of one action: ``status`` and a ``detail`` saying what was done or why not."""

    status: ActionStatus
    detail: str

    @classmethod
    def ok(cls, detail: str) -> ActionResult:
        """It did its job."""
        return cls("ok", detail)

    @classmethod
    def failed(cls, detail: str) -> ActionResult:
        """It tried and could not."""
        return cls("failed", detail)

    @classmethod
    def skipped(cls, detail: str) -> ActionResult:
        """It does not apply here."""
        return cls("skipped", detail)


@dataclass(frozen=True, slots=True)
class Action:
    """One recovery action.

    ``run(target)`` does it (``target`` is a model role or ``"all"``; actions with ``takes_target``
    False ignore it). ``undo()`` reverts a lasting change and returns what it undid, or None when
    nothing was in force. ``final``: success ends the chain as a mitigation.
    """

    name: str
    description: str
    run: Callable[[str], Awaitable[ActionResult]]
    undo: Callable[[], Awaitable[str | None]] | None = None
    takes_target: bool = False
    final: bool = False


@dataclass(frozen=True, slots=True)
class BackoffSpec:
    """Attempts and exponential backoff of a retried step (reloading or re-downloading a model)."""

    max_attempts: int
    initial_delay: float
    backoff_factor: float
    max_delay: float

    def retry(self, name: str, *, clock: Clock, events: EventBus) -> Retry:
        """A :class:`~brownout.policies.retry.Retry` with these numbers (no jitter: one caller)."""
        return Retry(
            name,
            RetryConfig(
                max_attempts=self.max_attempts,
                backoff_base=self.initial_delay,
                backoff_multiplier=max(1.0, self.backoff_factor),
                backoff_max=self.max_delay,
                jitter="none",
                budget_ratio=None,
                max_retry_after=max(60.0, self.max_delay),
            ),
            clock=clock,
            events=events,
        )


# -- what the brief server's actions act on (structural types) ---------------------------------------


class _Clearable(Protocol):
    def clear(self) -> None: ...


class _Sized(_Clearable, Protocol):
    def __len__(self) -> int: ...


class _Breaker(Protocol):
    def reset(self) -> None: ...


class _Client(Protocol):
    @property
    def breakers(self) -> Mapping[str, _Breaker]: ...


class _Server(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def model_path(self) -> Path: ...

    async def restart(self, reason: str = "manual") -> None: ...


class _Service(Protocol):
    @property
    def cache(self) -> _Sized: ...

    @property
    def switched_off(self) -> dict[str, frozenset[str]]: ...

    generation_limit: tuple[int, float] | None

    def role_healthy(self, role: str) -> bool: ...


class Plant(Protocol):
    """What the brief server's actions act on; ``brownout.server.operations.ServerParts`` is one."""

    @property
    def service(self) -> _Service | None: ...

    @property
    def edge(self) -> _Clearable | None: ...

    @property
    def local(self) -> Mapping[str, _Server]: ...

    @property
    def clients(self) -> Mapping[str, _Client]: ...

    async def probe_all(self) -> None: ...


RECOVERY_SOURCE = "recovery"
"""The key under which recovery switches roles off in the service's ``switched_off``."""


def brief_server_actions(
    plant: Plant,
    *,
    roles: Sequence[str],
    generator: str,
    artifacts: Callable[[Path], ModelArtifact | None] = lambda path: None,
    resource_problem: Callable[[], Awaitable[str | None]] | None = None,
    load: BackoffSpec = BackoffSpec(2, 2.0, 1.5, 10.0),
    download: BackoffSpec = BackoffSpec(3, 5.0, 2.0, 60.0),
    reduced: tuple[int, float] = (256, 0.5),
    clock: Clock = SYSTEM_CLOCK,
    events: EventBus = DEFAULT_BUS,
) -> dict[str, Action]:
    """The recovery actions of ``brownout serve``, acting on ``plant`` (its runtime).

    ``roles`` are the model roles and ``generator`` the one without which no model answer exists.
    ``artifacts(path)`` gives the integrity record of a local model file; ``resource_problem()``
    re-samples the machine and describes a critical resource, or returns None. ``load`` and
    ``download`` are the backoffs of reloading and re-downloading a model, and ``reduced`` is the
    (max_tokens, temperature) cap of :data:`REDUCE_GENERATION_PARAMS` (the same numbers as the
    generator's reduced-context retry).
    """

    def chosen(target: str) -> list[str]:
        return list(roles) if target in ("all", "") else [target]

    def servers_of(target: str) -> dict[str, _Server]:
        # Each local server of the chosen roles once, named by the roles it serves: one server shared
        # by every role is restarted once, and for all of them (its name says so).
        found: dict[int, tuple[list[str], _Server]] = {}
        for role in chosen(target):
            server = plant.local.get(role)
            if server is not None:
                found.setdefault(id(server), ([], server))[0].append(role)
        named: dict[str, _Server] = {}
        for wanted, server in found.values():
            sharing = [r for r, s in plant.local.items() if s is server]
            name = wanted[0] if len(sharing) == 1 else f"the shared server of {', '.join(sharing)}"
            named[name] = server
        return named

    def service() -> _Service:
        svc = plant.service
        if svc is None:
            raise RuntimeError("the service is not started")
        return svc

    async def clear_cache(target: str) -> ActionResult:
        cache = service().cache
        dropped = len(cache)
        cache.clear()
        edge = plant.edge
        if edge is not None:
            edge.clear()
        return ActionResult.ok(
            f"response cache cleared ({dropped} entries); no GPU memory is held in this process "
            "(the models run in their own servers)"
        )

    async def reset_breakers(target: str) -> ActionResult:
        done = chosen(target)
        for role in done:
            for breaker in plant.clients[role].breakers.values():
                breaker.reset()
        return ActionResult.ok(f"closed breakers of {', '.join(done)}")

    async def check_health(target: str) -> ActionResult:
        await plant.probe_all()
        svc = service()
        sick = [r for r in roles if not svc.role_healthy(r)]
        problem = await resource_problem() if resource_problem is not None else None
        found = [f"{', '.join(sick)} unhealthy"] if sick else []
        if problem:
            found.append(problem)
        if found:
            return ActionResult.failed("; ".join(found))
        return ActionResult.ok(
            f"probed {', '.join(roles)}: all healthy"
            + ("" if resource_problem is None else "; resources below critical")
        )

    async def restart(target: str) -> ActionResult:
        servers = servers_of(target)
        if not servers:
            return ActionResult.skipped(
                f"{', '.join(chosen(target))} served by external endpoints: no local model server to restart"
            )
        failed: list[str] = []
        for name, server in servers.items():
            try:
                await server.restart(reason="recovery action")
            except Exception as e:
                failed.append(f"{name}: {type(e).__name__}: {e}")
        if failed:
            return ActionResult.failed("; ".join(failed))
        return ActionResult.ok(f"restarted {', '.join(servers)}")

    async def retry_model_load(target: str) -> ActionResult:
        servers = servers_of(target)
        if not servers:
            return ActionResult.skipped(
                f"{', '.join(chosen(target))} served by external endpoints: their servers load the model"
            )
        notes: list[str] = []
        for path in sorted({s.model_path for s in servers.values()}):
            artifact = artifacts(path)
            if artifact is None:
                notes.append(f"{path.name}: no checksum known")
                continue
            try:
                await artifact.verify()
                notes.append(f"{path.name}: sha256 verified ({artifact.origin})")
                continue
            except ModelIntegrityError as e:
                problem = str(e)
            if artifact.source is None:
                return ActionResult.failed(f"{problem}; no source to download it from")
            try:
                await download.retry("recovery.download", clock=clock, events=events).call(artifact.refetch)
            except Exception as e:
                return ActionResult.failed(
                    f"{problem}; download by {artifact.source.description} failed: {e}"
                )
            notes.append(f"{path.name}: downloaded again by {artifact.source.description}, sha256 verified")
        reload = load.retry("recovery.load", clock=clock, events=events)
        for name, server in servers.items():
            try:
                await reload.call(server.restart, "recovery: reload model")
            except Exception as e:
                return ActionResult.failed("; ".join([*notes, f"reloading {name} failed: {e}"]))
        return ActionResult.ok("; ".join([*notes, f"reloaded {', '.join(servers)}"]))

    async def reduce_params(target: str) -> ActionResult:
        svc = service()
        svc.generation_limit = reduced
        return ActionResult.ok(
            f"max_tokens capped at {reduced[0]} and temperature at {reduced[1]:g} for every role until reset"
        )

    async def restore_params() -> str | None:
        svc = plant.service
        if svc is None or svc.generation_limit is None:
            return None
        svc.generation_limit = None
        return "generation parameters restored"

    async def cpu_offload(target: str) -> ActionResult:
        local = [r for r in chosen(target) if r in plant.local]
        if local:
            return ActionResult.skipped(
                f"{', '.join(local)} already run every layer on the CPU (llama.cpp CPU build); "
                "no smaller quantised model is configured"
            )
        return ActionResult.skipped(
            "the models are served by external endpoints: offloading and quantisation are theirs to change"
        )

    async def fallback(target: str) -> ActionResult:
        # One failing role falls back to its own stage's rules; "all" stops model calls altogether
        # (without the generator no later stage runs).
        role = generator if target in ("all", "") else target
        svc = service()
        svc.switched_off[RECOVERY_SOURCE] = svc.switched_off.get(RECOVERY_SOURCE, frozenset()) | {role}
        if role == generator:
            return ActionResult.ok(
                f"{generator} switched off until reset: every brief is served without a model call "
                "(a similar earlier brief, else the rules)"
            )
        return ActionResult.ok(
            f"{role} switched off until reset: its stage is served by its rule-based fallback"
        )

    async def restore_models() -> str | None:
        svc = plant.service
        roles = svc.switched_off.pop(RECOVERY_SOURCE, None) if svc is not None else None
        if not roles:
            return None
        return f"{', '.join(sorted(roles))} switched back on"

    actions = [
        Action(CLEAR_CACHE, "empty the response cache", clear_cache),
        Action(
            RESET_BREAKERS,
            "close every circuit breaker (all roles, or one with target=<role>)",
            reset_breakers,
            takes_target=True,
        ),
        Action(CHECK_HEALTH, "probe every model now and re-sample CPU, memory and GPU", check_health),
        Action(
            RESTART_MODEL_SERVER,
            "restart a local model server (target=<role>, or all)",
            restart,
            takes_target=True,
        ),
        Action(
            RETRY_MODEL_LOAD,
            "verify the model file's sha256 (download it again with backoff if it is missing or "
            "corrupt), then reload the local model servers with backoff",
            retry_model_load,
            takes_target=True,
        ),
        Action(
            REDUCE_GENERATION_PARAMS,
            f"cap max_tokens at {reduced[0]} and temperature at {reduced[1]:g} until reset",
            reduce_params,
            undo=restore_params,
        ),
        Action(
            CPU_OFFLOAD,
            "move the model to the CPU or a smaller quantised model, where the backend allows",
            cpu_offload,
            takes_target=True,
        ),
        Action(
            FALLBACK_TO_RULES,
            f"until reset, serve a role's stage from its rules (target=<role>); all: switch {generator} "
            "off, so briefs come from similar earlier ones and the rules",
            fallback,
            undo=restore_models,
            takes_target=True,
            final=True,
        ),
    ]
    return {a.name: a for a in actions}


def chain_for(failure_type: FailureType, chains: Mapping[FailureType, Iterable[str]]) -> tuple[str, ...]:
    """The chain for ``failure_type``, or the ``unknown`` chain."""
    chain = chains.get(failure_type)
    if chain is None:
        chain = chains.get(FailureType.UNKNOWN, ())
    return tuple(chain)
