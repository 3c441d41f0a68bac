"""The dimmer wired into the brief service: what a request leaves out under load, and what it says.

Real pipeline runs over real HTTP to fault-injecting model servers on 127.0.0.1 (the ``fakes``
fixture). The dimmer's value is pinned (``force``) where a test needs a given level; the bounded load
test lets the controller move it by itself.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from brownout.briefs.service import BriefService
from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig
from brownout.events import EventBus
from brownout.llm.client import ModelClient
from brownout.llm.types import EndpointConfig
from test_server import make_config

TEXT = "a fresh citrus perfume for hot summer days"


@contextlib.asynccontextmanager
async def service_on(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    overrides: Mapping[str, Any] | None = None,
    bus: EventBus | None = None,
) -> AsyncIterator[BriefService]:
    """The brief service alone, each role on its fake."""
    config: BrownoutConfig = make_config({r: f.url for r, f in fakes.items()}, tmp_path / "b.db", overrides)
    group = config.circuit_breaker.group()
    events = bus or EventBus()
    clients = {
        role: ModelClient(
            role,
            [EndpointConfig(url=fakes[role].url, model=role)],
            breakers=group,
            timeout=5.0,
            events=events,
        )
        for role in ROLES
    }
    service = BriefService(config, clients, events=events, rng=random.Random(3))
    try:
        yield service
    finally:
        await service.aclose()
        for client in clients.values():
            await client.aclose()


def calls(fakes: dict[str, FakeLLM]) -> dict[str, int]:
    return {role: fake.chat_requests for role, fake in fakes.items()}


async def test_at_low_load_an_ordinary_brief_is_unchanged(fakes: dict[str, FakeLLM], tmp_path: Path) -> None:
    async with service_on(fakes, tmp_path) as svc:
        answer = await svc.create_brief(TEXT, "creative")
        assert answer["served_mode"] == "creative"
        assert answer["downshifted"] is False
        assert answer["reason"] is None
        assert "dimmed" not in answer
        assert svc.dimmer.level == 0
        assert calls(fakes) == {"qwen": 1, "mistral": 1, "llama": 1}
        assert sum(svc.stats.dimmed.values()) == 0


@pytest.mark.parametrize(
    ("value", "mode", "served", "dimmed", "model_calls"),
    [
        (0.25, "creative", "balanced", ["creative_hints"], {"qwen": 1, "mistral": 1, "llama": 0}),
        (0.25, "balanced", "balanced", None, {"qwen": 1, "mistral": 1, "llama": 0}),
        (0.5, "creative", "fast", ["creative_hints", "validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
        (0.5, "balanced", "fast", ["validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
        (0.5, "fast", "fast", None, {"qwen": 1, "mistral": 0, "llama": 0}),
        # Generation is dimmed only where a similar earlier brief can stand in: none here, so it runs.
        (0.75, "creative", "fast", ["creative_hints", "validation"], {"qwen": 1, "mistral": 0, "llama": 0}),
    ],
)
async def test_a_dimmer_level_serves_the_right_mode_and_says_so(
    fakes: dict[str, FakeLLM],
    tmp_path: Path,
    value: float,
    mode: str,
    served: str,
    dimmed: list[str] | None,
    model_calls: dict[str, int],
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        svc.dimmer.force(value)
        answer = await svc.create_brief(TEXT, mode)
        assert answer["requested_mode"] == mode
        assert answer["served_mode"] == served
        assert calls(fakes) == model_calls
        if dimmed is None:
            assert "dimmed" not in answer
            assert answer["downshifted"] is False
            return
        assert answer["dimmed"] == dimmed
        assert answer["reason"] == "load"
        assert answer["downshifted"] is True
        assert answer["impact"]  # what the customer loses, as for any downshift
        assert answer["degraded"] is True
        assert all(svc.stats.dimmed[step] == 1 for step in dimmed)
        # A dimmed answer is not cached as if it were the full one.
        assert svc.cache.peek(svc.cache_key(TEXT, mode)) is None


async def test_past_the_validator_a_similar_brief_stands_in_for_generating(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        first = await svc.create_brief(TEXT, "fast")
        assert first["stages"][0]["served_by"] == "model:qwen"
        svc.dimmer.force(0.75)
        before = calls(fakes)
        answer = await svc.create_brief(TEXT + " please", "creative")  # similar, not the same request
        assert calls(fakes) == before  # no model call at all
        assert answer["served_mode"] == "fallback"
        assert answer["stages"][0]["served_by"] == "cache"
        assert answer["dimmed"] == ["creative_hints", "validation", "generation"]
        assert answer["reason"] == "load"
        assert answer["reliability"] == "medium"


async def test_fully_dimmed_the_rules_answer_without_any_model_call(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path) as svc:
        svc.dimmer.force(1.0)
        answer = await svc.create_brief("a warm amber scent for winter nights", "balanced")
        assert calls(fakes) == {"qwen": 0, "mistral": 0, "llama": 0}
        assert answer["served_mode"] == "fallback"
        assert answer["stages"][0]["served_by"] == "rules"
        assert answer["dimmed"] == ["validation", "generation"]
        assert answer["reliability"] == "low"


async def test_the_dimmer_can_be_switched_off_or_pinned_in_config(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with service_on(fakes, tmp_path, {"dimmer": {"enabled": False}}) as svc:
        svc.dimmer.observe(100.0)
        assert svc.dimmer.decide().dimmed == ()
    async with service_on(fakes, tmp_path, {"dimmer": {"force_value": 0.5}}) as svc:
        assert svc.dimmer.level == 2
