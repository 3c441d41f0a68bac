"""The edge cache: repeated request bodies answered from pre-serialised bytes, never staler than the cache,
and saying what the service's own cache hits say (a ``cache`` stage and the answer's age)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from brownout.briefs.service import cache_hit
from brownout.policies.cache import Cache, CacheConfig
from brownout.server.edge import EdgeCache, encode_json
from brownout.testing import FakeClock

BODY = b'{"text":"lemon and sea","mode":"fast"}'
STAGES = [{"stage": "generate", "served_by": "model:qwen", "latency_ms": 2000.0}]
ANSWER: dict[str, Any] = {
    "brief": {"style": "fresh", "description": "Zitrone und Meer \u2014 fr\u00eache"},
    "served_mode": "fast",
    "stages": STAGES,
    "cached": False,
    "cached_at": "1970-01-01T00:16:40.000Z",  # the fake clocks' start, 1000 s after the epoch
    "cache_age_seconds": None,
    "request_id": "first",
    "latency_ms": 2000.0,
}


def make(clock: FakeClock) -> tuple[Cache[str, dict[str, Any]], EdgeCache]:
    cache: Cache[str, dict[str, Any]] = Cache("briefs", CacheConfig(ttl=600), clock=clock)
    return cache, EdgeCache(cache, max_entries=2, wall_clock=clock)


def test_encoding_matches_starlette_json_response() -> None:
    assert encode_json(ANSWER) == JSONResponse(ANSWER).body


def test_a_remembered_body_is_answered_with_a_fresh_request_id_and_counts_a_hit(clock: FakeClock) -> None:
    cache, edge = make(clock)
    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    first, second = edge.lookup(BODY), edge.lookup(BODY)
    assert first is not None
    assert second is not None
    a, b = json.loads(first), json.loads(second)
    assert a["request_id"] != b["request_id"]
    assert len(a["request_id"]) == 32
    assert a == {
        **ANSWER,
        "cached": True,
        "cache_age_seconds": 0.0,
        "stages": [{"stage": "cache", "served_by": "cache", "latency_ms": 0.0}],
        "cached_stages": STAGES,
        "request_id": a["request_id"],
        "latency_ms": 0.0,
    }
    assert cache.stats().hits == 2
    assert edge.hits == 2


def test_a_hit_tells_the_answers_current_age_in_the_bytes_the_service_would_send(clock: FakeClock) -> None:
    cache, edge = make(clock)
    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    for waited, age in ((12.34, 12.3), (0.05, 12.4), (47.0, 59.4)):
        clock.advance(waited)
        got = edge.lookup(BODY)
        assert got is not None
        rid = json.loads(got)["request_id"]
        # Byte for byte what the service's own cache hit renders (Starlette's encoding), at that age.
        assert got == JSONResponse(cache_hit(ANSWER, age=age, request_id=rid, latency_ms=0.0)).body


def test_an_answer_that_does_not_say_when_it_was_cached_has_no_age(clock: FakeClock) -> None:
    cache, edge = make(clock)
    undated = {k: v for k, v in ANSWER.items() if k != "cached_at"}
    cache.set("k", undated)
    edge.remember(BODY, "k")
    got = edge.lookup(BODY)
    assert got is not None
    answer = json.loads(got)
    assert answer["cache_age_seconds"] is None
    assert answer["stages"] == [{"stage": "cache", "served_by": "cache", "latency_ms": 0.0}]


def test_other_bodies_miss(clock: FakeClock) -> None:
    cache, edge = make(clock)
    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    assert edge.lookup(BODY + b" ") is None


def test_never_staler_than_the_service_cache(clock: FakeClock) -> None:
    cache, edge = make(clock)
    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    clock.advance(601)  # expired in the service cache
    assert edge.lookup(BODY) is None
    assert len(edge) == 0
    assert cache.stats().misses == 0  # the normal path counts the miss, once

    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    cache.clear()  # an operator's clear_cache
    assert edge.lookup(BODY) is None

    cache.set("k", ANSWER)
    edge.remember(BODY, "k")
    cache.set("k", {**ANSWER, "served_mode": "balanced"})  # replaced by a newer answer
    assert edge.lookup(BODY) is None


def test_nothing_is_remembered_for_an_uncached_key(clock: FakeClock) -> None:
    _, edge = make(clock)
    edge.remember(BODY, "missing")
    assert len(edge) == 0


def test_bounded_least_recently_used(clock: FakeClock) -> None:
    cache, edge = make(clock)
    for i in range(3):
        cache.set(f"k{i}", {**ANSWER, "n": i})
    edge.remember(b"0", "k0")
    edge.remember(b"1", "k1")
    assert edge.lookup(b"0") is not None  # 0 is now the most recent
    edge.remember(b"2", "k2")
    assert len(edge) == 2
    assert edge.lookup(b"1") is None
    assert edge.lookup(b"0") is not None
