"""Watching the system: resources, event-loop blocking, system modes and the adaptive cache TTL.

* :mod:`brownout.health.resources` -- :class:`ResourceMonitor` (seed 001: CPU, memory, GPU memory);
* :mod:`brownout.health.loop` -- :class:`LoopBlockDetector` and its ASGI middleware (seed 003 §C);
* :mod:`brownout.health.modes` -- :class:`SystemModes` normal/degraded/emergency (seed 002) and
  :class:`AdaptiveTTL` (seed 000).
"""

from __future__ import annotations

from brownout.health.loop import LoopBlockDetector, LoopBlockMiddleware, current_route
from brownout.health.modes import AdaptiveTTL, ComponentHealth, SystemMode, SystemModes, derive_mode
from brownout.health.resources import ResourceMonitor, ResourceSample, Thresholds

__all__ = [
    "AdaptiveTTL",
    "ComponentHealth",
    "LoopBlockDetector",
    "LoopBlockMiddleware",
    "ResourceMonitor",
    "ResourceSample",
    "SystemMode",
    "SystemModes",
    "Thresholds",
    "current_route",
    "derive_mode",
]
