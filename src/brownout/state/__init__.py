"""Where shared state lives when one process is not enough: Redis (and, by default, memory).

:mod:`brownout.state.redis` holds the Redis health detector and the shared cache with a local front that
keeps answering through a Redis outage; :mod:`brownout.state.singleflight` the cross-replica
singleflight; :mod:`brownout.state.tiered` the tiered reader with freshness labels (Redis → database →
memory → default). Redis support needs the optional ``redis`` package (the ``redis`` extra, or the
``server`` one), so the names below are imported on first use: importing :mod:`brownout.state` alone
does not require it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brownout.state.redis import (
        RedisHealth,
        RedisHealthConfig,
        RedisHealthDetector,
        RedisStatus,
        SharedCache,
        SharedCacheConfig,
        SharedCacheStats,
    )
    from brownout.state.singleflight import RedisSingleflight, RemoteComputationFailed
    from brownout.state.tiered import Tier, TieredReader, TieredValue

__all__ = [
    "RedisHealth",
    "RedisHealthConfig",
    "RedisHealthDetector",
    "RedisStatus",
    "SharedCache",
    "SharedCacheConfig",
    "SharedCacheStats",
    "RedisSingleflight",
    "RemoteComputationFailed",
    "Tier",
    "TieredReader",
    "TieredValue",
]

_LAZY = {
    **dict.fromkeys(__all__[:7], "brownout.state.redis"),
    "RedisSingleflight": "brownout.state.singleflight",
    "RemoteComputationFailed": "brownout.state.singleflight",
    "Tier": "brownout.state.tiered",
    "TieredReader": "brownout.state.tiered",
    "TieredValue": "brownout.state.tiered",
}


def __getattr__(name: str) -> Any:
    """Import the Redis-backed names on first use (they need the optional ``redis`` package)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
