"""Answers say what really happened: a cache hit says it is one and how old it is, and a brief the
validator model objected to does not pass for a clean, highly reliable one.

Real pipeline runs: the brief service (or the whole app) over real HTTP to fault-injecting model
servers on 127.0.0.1. Wall time, which dates cached answers, is a fake clock where a test needs
exact ages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefService
from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig
from brownout.events import EventBus
from brownout.llm.client import ModelClient
from brownout.llm.types import EndpointConfig
from brownout.testing import FakeClock
from support.stack import make_config, serve, stage_sources
from support.wait import until

TEXT = "a fresh citrus perfume for hot summer days"

REJECTION = {
    "valid": False,
    "issues": ["intensity too high for a light summer scent"],
    "ifra_concerns": ["bergamot oil above the phototoxicity limit"],
}
CONCERN_ONLY = {"valid": True, "issues": [], "ifra_concerns": ["oakmoss above the IFRA limit"]}
REMARK_ONLY = {"valid": True, "issues": ["a little sweet for the brief"], "ifra_concerns": []}


@contextlib.asynccontextmanager
async def service_on(
    fakes: dict[str, FakeLLM], tmp_path: Path, wall: FakeClock
) -> AsyncIterator[BriefService]:
    """The brief service alone, each role on its fake, with ``wall`` as its wall clock."""
    config: BrownoutConfig = make_config({r: f.url for r, f in fakes.items()}, tmp_path / "b.db")
    group = config.circuit_breaker.group()
    bus = EventBus()
    clients = {
        role: ModelClient(
            role, [EndpointConfig(url=fakes[role].url, model=role)], breakers=group, timeout=2.0, events=bus
        )
        for role in ROLES
    }
    service = BriefService(config, clients, wall_clock=wall, events=bus)
    try:
        yield service
    finally:
        await service.aclose()
        for client in clients.values():
            await client.aclose()


# -------------------------------------------------------------------------------- cache hits


async def test_a_cache_hit_says_it_came_from_the_cache_and_how_old_it_is(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    wall = FakeClock(start=1_700_000_000.0)
    async with service_on(fakes, tmp_path, wall) as service:
        first = await service.create_brief(TEXT, "balanced")
        assert first["cached"] is False
        assert (first["cached_at"], first["cache_age_seconds"]) == (None, None)
        assert stage_sources(first) == [("generate", "model:qwen"), ("validate", "model:mistral")]
        calls = {role: fake.chat_requests for role, fake in fakes.items()}

        wall.advance(42.25)
        hit = await service.create_brief(TEXT, "balanced")
        assert {role: fake.chat_requests for role, fake in fakes.items()} == calls  # no model ran
        assert hit["cached"] is True
        assert hit["cached_at"] == "2023-11-14T22:13:20.000Z"
        assert hit["cache_age_seconds"] == 42.2
        assert [(s["stage"], s["served_by"]) for s in hit["stages"]] == [("cache", "cache")]
        # How the answer was made when it was new, for whoever wants to know.
        assert hit["cached_stages"] == first["stages"]
        assert hit["brief"] == first["brief"]
        assert hit["request_id"] != first["request_id"]
        # Both have every key an answer always has, and none it is not typed to have.
        for answer in (first, hit):
            assert BriefAnswer.__required_keys__ <= answer.keys() <= BriefAnswer.__annotations__.keys()
        assert "cached_stages" in hit

        wall.advance(600.0)  # wall time only: the cache's own TTL runs on the service clock
        later = await service.create_brief(TEXT, "balanced")
        assert later["cache_age_seconds"] == 642.2
        assert later["cached_at"] == hit["cached_at"]


async def test_the_edge_and_the_service_describe_a_cache_hit_alike(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        body = json.dumps({"text": TEXT, "mode": "fast"}).encode()
        headers = {"content-type": "application/json"}
        first = (await stack.http.post("/v1/briefs", content=body, headers=headers)).json()
        edge_hits = stack.runtime.edge.hits if stack.runtime.edge is not None else -1
        # The same bytes: answered by the edge cache in the middleware.
        from_edge = (await stack.http.post("/v1/briefs", content=body, headers=headers)).json()
        assert stack.runtime.edge is not None
        assert stack.runtime.edge.hits == edge_hits + 1
        # The same request in other bytes: answered by the service's cache.
        from_service = await stack.brief("  A fresh citrus perfume for HOT summer days", "fast")
        assert stack.runtime.edge.hits == edge_hits + 1

        for hit in (from_edge, from_service):
            assert hit["cached"] is True
            assert [(s["stage"], s["served_by"]) for s in hit["stages"]] == [("cache", "cache")]
            assert hit["cached_stages"] == first["stages"]
            assert isinstance(hit["cache_age_seconds"], float)
            assert 0.0 <= hit["cache_age_seconds"] < 600.0  # within the cache's TTL
            assert datetime.fromisoformat(hit["cached_at"]).tzinfo is not None
        assert from_edge["cached_at"] == from_service["cached_at"]
        assert sorted(from_edge) == sorted(from_service)


# -------------------------------------------------------------------------------- validation


async def _brief_with_verdict(
    fakes: dict[str, FakeLLM], tmp_path: Path, verdict: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A balanced brief whose validator answers ``verdict``; then the same request again."""
    fakes["mistral"].set("ok", content=json.dumps(verdict))
    async with serve(fakes, tmp_path) as stack:
        body = await stack.brief(TEXT, "balanced")
        again = await stack.brief(TEXT, "balanced")
    return body, again


async def test_a_rejected_brief_carries_the_objections_and_is_not_highly_reliable(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    body, again = await _brief_with_verdict(fakes, tmp_path, REJECTION)
    assert stage_sources(body) == [("generate", "model:qwen"), ("validate", "model:mistral")]
    validation = body["validation"]
    assert validation["valid"] is False  # the verdict as the validator gave it
    assert validation["errors"] == ["intensity too high for a light summer scent"]
    assert validation["ifra_compliance"] is False
    assert body["warnings"] == [
        "Validator: intensity too high for a light summer scent",
        "Validator: IFRA: bergamot oil above the phototoxicity limit",
    ]
    assert body["reliability"] == "medium"
    assert body["degraded"] is True
    # Not cached as a full-quality answer: the same request is generated and validated again.
    assert again["cached"] is False
    assert fakes["qwen"].chat_requests >= 2


async def test_an_ifra_concern_alone_lowers_the_reliability(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    body, _ = await _brief_with_verdict(fakes, tmp_path, CONCERN_ONLY)
    assert body["validation"]["valid"] is True
    assert body["validation"]["ifra_compliance"] is False
    assert body["warnings"] == ["Validator: IFRA: oakmoss above the IFRA limit"]
    assert body["reliability"] == "medium"
    assert body["degraded"] is True


async def test_a_passing_verdict_with_a_remark_stays_high_but_says_the_remark(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    body, again = await _brief_with_verdict(fakes, tmp_path, REMARK_ONLY)
    assert body["validation"]["valid"] is True
    assert body["validation"]["ifra_compliance"] is True
    assert body["warnings"] == ["Validator: a little sweet for the brief"]
    assert body["reliability"] == "high"
    assert body["degraded"] is False
    assert again["cached"] is True  # a full-quality answer is cached
    assert again["warnings"] == body["warnings"]


async def test_a_clean_verdict_says_nothing_and_stays_high(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    body, _ = await _brief_with_verdict(fakes, tmp_path, {"valid": True, "issues": [], "ifra_concerns": []})
    assert body["warnings"] == []
    assert body["reliability"] == "high"
    assert body["validation"]["ifra_compliance"] is True


# -------------------------------------------------------------------------------- start-up checks


async def test_the_constraint_checks_ask_every_model_at_once(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    # Each model holds its check until all three have asked: one after the other, the first would
    # wait forever (here: until the check's own 10 s timeout) and the others never be asked.
    for fake in fakes.values():
        fake.set("hang")
    async with service_on(fakes, tmp_path, FakeClock()) as service:
        checks = asyncio.create_task(service.verify_constraints())
        await until(lambda: all(f.open_chats == 1 for f in fakes.values()), "every model asked at once")
        assert not checks.done()
        checks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checks
    assert [f.chat_requests for f in fakes.values()] == [1, 1, 1]


async def test_the_constraint_checks_learn_which_models_ignore_the_schema(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    fakes["qwen"].set(content=json.dumps({"answer": "alpha"}))
    fakes["mistral"].set(content=json.dumps({"answer": "hello there"}))  # the constraint was not applied
    fakes["llama"].set("error")  # down at start: keeps the configured assumption
    async with service_on(fakes, tmp_path, FakeClock()) as service:
        assert await service.verify_constraints() == {"qwen": True, "mistral": False, "llama": True}
        checks = service.constraint_checks
        assert (checks["qwen"], checks["mistral"]) == ("applied", "not applied")
        assert checks["llama"].startswith("skipped: ")
