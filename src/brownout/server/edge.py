"""The edge cache: repeated brief requests answered from pre-serialised bytes.

The response cache already saves the models; what is left on a cache hit is the web framework's
own work -- routing, body parsing and validation, JSON encoding -- several times what the lookup
costs. The edge cache sits in the ASGI middleware, in front of all that: a request whose body bytes
match an earlier request's, and whose cached answer is still the one the service holds, is answered
with the stored bytes plus a fresh ``request_id``.

It never answers anything the service would not: every hit re-checks the service cache (same TTL,
same invalidation -- a cleared or expired entry falls through to the normal path) and counts as a
cache hit there. Only full-quality answers are in the service cache, so only they get here.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any

from brownout.policies.cache import Cache

__all__ = ["EdgeCache", "encode_json"]

_PLACEHOLDER = "\x00brownout-request-id\x00"


def encode_json(content: Any) -> bytes:
    """JSON bytes exactly as Starlette's ``JSONResponse`` renders them."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


class _Entry:
    __slots__ = ("key", "prefix", "ref", "suffix")

    def __init__(self, key: str, ref: dict[str, Any], prefix: bytes, suffix: bytes) -> None:
        self.key = key
        self.ref = ref
        self.prefix = prefix
        self.suffix = suffix


class EdgeCache:
    """Maps request bodies to serialised cached answers; see the module docstring."""

    __slots__ = ("_cache", "_entries", "hits", "max_entries")

    def __init__(self, cache: Cache[str, dict[str, Any]], max_entries: int = 1000) -> None:
        self._cache = cache
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, body: bytes) -> bytes | None:
        """The response body for ``body`` if its cached answer is still current, else None."""
        entry = self._entries.get(body)
        if entry is None:
            return None
        cache = self._cache
        if cache.peek(entry.key) is not entry.ref:
            # Expired, cleared or replaced: the normal path decides (and counts the miss once).
            del self._entries[body]
            return None
        cache.get(entry.key)  # a hit for the cache's statistics and LRU order
        self._entries.move_to_end(body)
        self.hits += 1
        return entry.prefix + uuid.uuid4().hex.encode() + entry.suffix

    def remember(self, body: bytes, key: str) -> None:
        """Serve later requests with exactly ``body`` from the service cache entry ``key``, if any."""
        ref = self._cache.peek(key)
        if ref is None:
            return
        rendered = encode_json({**ref, "cached": True, "request_id": _PLACEHOLDER, "latency_ms": 0.0})
        prefix, _, suffix = rendered.partition(encode_json(_PLACEHOLDER)[1:-1])
        self._entries[body] = _Entry(key, ref, prefix, suffix)
        self._entries.move_to_end(body)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
