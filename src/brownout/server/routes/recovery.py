"""The recovery API: ``GET /api/v1/recovery/status|health|actions`` and
``POST /api/v1/recovery/trigger|reset``.

The two POST routes need the bearer token of ``server.admin_token`` and are refused (403) when none
is configured. A manual run or reset that takes longer than ``recovery.admin_timeout`` is answered
202 and goes on; ``GET /api/v1/recovery/status`` shows its progress.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from brownout.config import ROLES, BrownoutConfig
from brownout.recovery.manager import RecoveryBusy, RecoveryOutcome
from brownout.server.errors import ApiError
from brownout.server.operations import Operations
from brownout.server.routes import running
from brownout.server.status import ServerStatus

__all__ = ["TriggerRequest", "install"]


class TriggerRequest(BaseModel):
    """The body of ``POST /api/v1/recovery/trigger``."""

    model_config = ConfigDict(extra="forbid")

    action: str | None = Field(default=None, description="one of GET /api/v1/recovery/actions")
    failure_type: str | None = Field(
        default=None, description="instead of an action: run this failure type's whole chain"
    )
    target: str = Field(default="all", description="a model role, or all")

    @model_validator(mode="after")
    def _one_of(self) -> TriggerRequest:
        if (self.action is None) == (self.failure_type is None):
            raise ValueError("give exactly one of action and failure_type")
        return self


def install(router: APIRouter, *, config: BrownoutConfig, state: ServerStatus, ops: Operations) -> None:
    """Add the recovery API to ``router``: what it shows from ``state`` and ``ops`` (the recovery
    manager, the system modes, the resource monitor), what it runs through ``ops``."""

    def require_admin(authorization: str | None = Header(default=None)) -> None:
        token = config.server.admin_token
        if token is None:
            raise ApiError(
                403,
                "admin endpoints are disabled: set server.admin_token (or BROWNOUT_ADMIN_TOKEN)",
                code="admin_disabled",
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.encode(), token.get_secret_value().encode()
        ):
            raise ApiError(
                401,
                "a valid bearer token is required (Authorization: Bearer <server.admin_token>)",
                code="invalid_token" if authorization else "missing_token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @router.get("/api/v1/recovery/status")
    async def recovery_status() -> dict[str, Any]:
        svc = running(state.service)
        return {
            "breakers": {
                name: b.metrics().state.value
                for client in state.clients.values()
                for name, b in client.breakers.items()
            },
            "model_servers": {role: s.status() for role, s in state.local.items()},
            "available_modes": [
                m.name
                for m in svc.pipeline.modes
                if all(svc.role_available(r) for r in svc.pipeline.roles(m))
            ],
            "history": [_action(a) for a in list(ops.recovery.history)[-20:]],
            "system_mode": ops.modes.mode.value,
            "switched_off": {by: sorted(roles) for by, roles in svc.switched_off.items()},
            "generation_limit": svc.generation_limit,
            "recovery": ops.recovery.status(),
        }

    @router.get("/api/v1/recovery/health")
    async def recovery_health() -> dict[str, Any]:
        running(state.service)
        return {
            "models": {role: state.model(role) for role in ROLES},
            "database": state.records.ok,
            "system_mode": ops.modes.status(),
            "resources": ops.resources.status(),
            "event_loop": ops.loop_blocks.status(),
            "cache_ttl": ops.ttl.status(),
        }

    @router.get("/api/v1/recovery/actions")
    async def recovery_actions() -> dict[str, Any]:
        return {
            "actions": ops.recovery.actions_info(),
            "failure_types": ops.recovery.failure_types_info(),
            "history": [_action(a) for a in list(ops.recovery.history)[-50:]],
        }

    admin_timeout = config.recovery.admin_timeout

    async def finished(task: asyncio.Task[Any]) -> bool:
        """Wait at most ``recovery.admin_timeout`` for ``task``, never cancelling it: False when it
        still goes on; else True, or what it raised."""
        await asyncio.wait({task}, timeout=admin_timeout)
        if not task.done():
            return False
        task.result()
        return True

    def accepted(run: dict[str, Any] | None, what: str) -> JSONResponse:
        # 202: the work was accepted and goes on; GET /api/v1/recovery/status shows its progress.
        return JSONResponse(
            {
                "status": "running",
                "detail": f"the {what} goes on after {admin_timeout:g} s; "
                "GET /api/v1/recovery/status shows its progress",
                "run": run,
            },
            status_code=202,
        )

    def busy(e: RecoveryBusy) -> ApiError:
        return ApiError(503, str(e), code="recovery_busy", retry_after=e.retry_after)

    @router.post(
        "/api/v1/recovery/trigger",
        dependencies=[Depends(require_admin)],
        responses={202: {"description": "accepted; still running after `recovery.admin_timeout`"}},
    )
    async def recovery_trigger(body: TriggerRequest) -> Any:
        rec = ops.recovery
        try:
            if body.failure_type is not None:
                started = rec.start_failure(
                    failure_type=body.failure_type, target=body.target, trigger="manual"
                )
            else:
                assert body.action is not None
                started = rec.start_trigger(body.action, body.target)
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_value") from e
        except RecoveryBusy as e:
            raise busy(e) from e
        if isinstance(started, RecoveryOutcome):  # a manual chain is never held back; kept total
            return started.as_dict()
        assert started.task is not None
        if not await finished(started.task):
            return accepted(started.as_dict(), f"recovery run {started.id}")
        if started.outcome is not None:
            return {**started.outcome.as_dict(), "run_id": started.id}
        return _action(started.attempt)

    @router.post(
        "/api/v1/recovery/reset",
        dependencies=[Depends(require_admin)],
        responses={202: {"description": "accepted; still running after `recovery.admin_timeout`"}},
    )
    async def recovery_reset() -> Any:
        try:
            task = ops.start_reset()
        except RecoveryBusy as e:
            raise busy(e) from e
        if not await finished(task):
            return accepted(None, "reset")
        return {"done": [_action(a) for a in task.result()]}


def _action(a: Any) -> dict[str, Any]:
    return {
        "action": a.action,
        "target": a.target,
        "at": a.at,
        "ok": a.ok,
        "detail": a.detail,
        "status": getattr(a, "status", "ok" if a.ok else "failed"),
        "failure_type": getattr(a, "failure_type", "manual"),
        "trigger": getattr(a, "trigger", "manual"),
    }
