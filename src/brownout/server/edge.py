"""The edge cache: repeated brief requests answered from pre-serialised bytes.

The response cache already saves the models; what is left on a cache hit is the web framework's
own work -- routing, body parsing and validation, JSON encoding -- several times what the lookup
costs. The edge cache sits in the ASGI middleware, in front of all that: a request whose body bytes
match an earlier request's, and whose cached answer is still the one the service holds, is answered
with the stored bytes plus a fresh ``request_id``.

It never answers anything the service would not: every hit re-checks the service cache (same TTL,
same invalidation -- a cleared or expired entry falls through to the normal path) and counts as a
cache hit there. Only full-quality answers are in the service cache, so only they get here.

Its answers say what the service's own cache hits say (:func:`~brownout.briefs.service.cache_hit`):
a ``cache`` stage and the answer's current ``cache_age_seconds``. The stored bytes have two holes,
the request id and the age, filled in on each hit.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any

from brownout.briefs.service import cache_hit, cached_at_epoch
from brownout.clock import WALL_CLOCK, Clock
from brownout.policies.cache import Cache

__all__ = ["EdgeCache", "encode_json"]

_PLACEHOLDER = "\x00brownout-request-id\x00"
_AGE_PLACEHOLDER = "\x00brownout-cache-age\x00"


def encode_json(content: Any) -> bytes:
    """JSON bytes exactly as Starlette's ``JSONResponse`` renders them."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


class _Entry:
    __slots__ = ("age_first", "at", "head", "key", "middle", "ref", "tail")

    def __init__(
        self,
        key: str,
        ref: dict[str, Any],
        parts: tuple[bytes, bytes, bytes],
        age_first: bool,
        at: float | None,
    ) -> None:
        self.key = key
        self.ref = ref
        self.head, self.middle, self.tail = parts
        self.age_first = age_first
        self.at = at


class EdgeCache:
    """Maps request bodies to serialised cached answers; see the module docstring.

    ``wall_clock`` tells the age of an answer (the service's ``wall_clock``: wall time, since answers
    carry the wall-clock time they were cached at).
    """

    __slots__ = ("_cache", "_entries", "_wall", "hits", "max_entries")

    def __init__(
        self, cache: Cache[str, dict[str, Any]], max_entries: int = 1000, *, wall_clock: Clock = WALL_CLOCK
    ) -> None:
        self._cache = cache
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._wall = wall_clock
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
        rid = uuid.uuid4().hex.encode()
        # The same number json.dumps writes for the service's round(age, 1) (float repr), or null.
        at = entry.at
        age = b"null" if at is None else repr(round(max(0.0, self._wall.now() - at), 1)).encode()
        if entry.age_first:
            return entry.head + age + entry.middle + rid + entry.tail
        return entry.head + rid + entry.middle + age + entry.tail

    def remember(self, body: bytes, key: str) -> None:
        """Serve later requests with exactly ``body`` from the service cache entry ``key``, if any."""
        ref = self._cache.peek(key)
        if ref is None:
            return
        rendered = encode_json(cache_hit(ref, age=_AGE_PLACEHOLDER, request_id=_PLACEHOLDER, latency_ms=0.0))
        rid = encode_json(_PLACEHOLDER)[1:-1]  # inside its quotes: the id is a string
        age = encode_json(_AGE_PLACEHOLDER)  # with its quotes: the age is a number (or null)
        age_at, rid_at = rendered.find(age), rendered.find(rid)
        if age_at < 0 or rid_at < 0:  # cannot happen: cache_hit writes both
            return
        first, second = (age, rid) if age_at < rid_at else (rid, age)
        head, _, rest = rendered.partition(first)
        middle, _, tail = rest.partition(second)
        self._entries[body] = _Entry(key, ref, (head, middle, tail), age_at < rid_at, cached_at_epoch(ref))
        self._entries.move_to_end(body)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
