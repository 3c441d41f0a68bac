"""Which chat requests the gateway may answer from its cache, and under what key.

Only deterministic requests are cached: ``temperature`` exactly 0 and not streamed. The key is a
digest of the whole request (group name included, ``stream`` fields left out) with its keys sorted,
so the same request written with its fields in another order hits the same entry, and any other
difference -- a message, ``max_tokens``, a ``seed``, a schema -- is a different entry. The cache
itself is :class:`brownout.policies.cache.Cache`, whose singleflight lets N identical requests that
arrive together cause one upstream call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["cache_key", "deterministic"]

_IGNORED = frozenset({"stream", "stream_options"})


def deterministic(body: Mapping[str, Any]) -> bool:
    """True for a request whose answer may be reused: temperature 0 and not streamed."""
    temperature = body.get("temperature")
    return (
        type(temperature) in (int, float)  # not bool: True == 1 and False == 0 in Python
        and temperature == 0
        and body.get("stream") is not True
    )


def cache_key(group: str, body: Mapping[str, Any]) -> str:
    """The cache key of ``body`` sent to ``group``: a 128-bit digest of its canonical JSON."""
    canonical = json.dumps(
        [group, {k: v for k, v in body.items() if k not in _IGNORED}],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
