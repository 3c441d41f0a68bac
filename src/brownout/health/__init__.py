"""Watching the system: resources, event-loop blocking, system modes and the adaptive cache TTL.

* :mod:`brownout.health.resources` -- :class:`ResourceMonitor` (CPU, memory, GPU memory);
* :mod:`brownout.health.loop` -- :class:`LoopBlockDetector` and its ASGI middleware (who held the loop);
* :mod:`brownout.health.modes` -- :class:`SystemModes` normal/degraded/emergency and
  :class:`AdaptiveTTL` (a cache TTL that follows the load).
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
