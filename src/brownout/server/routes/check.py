"""The pre-promotion check's read-only routes (``brownout check --url``; see :mod:`brownout.server.check`).

``GET /api/v1/config/summary`` (the guard settings in force, no secrets) and
``GET /api/v1/selftest/cache`` (cache expiry and regeneration, on a copy of the live cache).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from brownout.briefs.service import BriefService
from brownout.config import BrownoutConfig
from brownout.server.check import cache_selftest, config_summary

__all__ = ["install"]


def install(router: APIRouter, *, config: BrownoutConfig, service: BriefService) -> None:
    """Add ``GET /api/v1/config/summary`` and ``GET /api/v1/selftest/cache`` to ``router``."""

    @router.get("/api/v1/config/summary")
    async def summary() -> dict[str, Any]:
        """The guard settings in force (no secrets)."""
        return config_summary(config)

    @router.get("/api/v1/selftest/cache")
    async def selftest_cache() -> dict[str, Any]:
        """Cache expiry and regeneration, verified on a same-class, same-settings cache (no waiting)."""
        return await cache_selftest(config, service.cache if service.started else None)
