"""``brownout serve``'s app over ASGI, on fault-injecting model servers: the harness of the server tests.

Each model role (qwen generator, mistral validator, llama hinter) points at its own
:class:`~brownout.chaos.fakellm.FakeLLM` on 127.0.0.1 (the ``fakes`` fixture); :func:`serve` builds
the app from :func:`make_config`, runs its lifespan and talks to it through ``httpx.ASGITransport``.
The clock is real, so waits are on conditions, never fixed sleeps, and model timeouts are short.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from brownout.briefs.schema import CreativeBrief
from brownout.briefs.service import BriefService
from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.events import EventBus
from brownout.policies.breaker import CircuitBreaker
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from support.wait import until

__all__ = [
    "Metrics",
    "Stack",
    "brief_of",
    "distinct_text",
    "make_config",
    "merge",
    "metric_values",
    "sample",
    "serve",
    "stage_sources",
]

Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Samples of a Prometheus text exposition, by (sample name, labels)."""


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, mappings merged key by key at every depth."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(
    urls: Mapping[str, str], db: Path, overrides: Mapping[str, Any] | None = None
) -> BrownoutConfig:
    """The defaults, with each role on its fake, short timeouts, no probing, no guard backoff.

    Breakers keep their seed thresholds but need 100 calls before a rate counts, so they stay closed
    unless a test asks for tighter ones.
    """
    base = load_config(None, environ={}).model_dump()
    ours: dict[str, Any] = {
        "models": {
            "local": {"enabled": False},
            "health_interval": 3600.0,
            "health_timeout": 2.0,
            "roles": {role: {"endpoints": [{"url": urls[role]}], "timeout": 1.0} for role in ROLES},
        },
        "json_guard": {"backoff_base": 0.0, "jitter": 0.0},
        "circuit_breaker": {"minimum_calls": 100, "window_size": 100},
        "database": {"url": f"sqlite+aiosqlite:///{db}", "spool_path": str(db.with_suffix(".spool.db"))},
    }
    return BrownoutConfig.model_validate(merge(merge(base, ours), overrides or {}))


def metric_values(text: str) -> Metrics:
    """Every sample of a Prometheus text exposition, by (sample name, labels)."""
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(
    metrics: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value (0 when absent, as for a counter never incremented)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


def brief_of(body: Mapping[str, Any]) -> CreativeBrief:
    """The brief of a response body, validated."""
    return CreativeBrief.model_validate(body["brief"])


def assert_overloaded(response: httpx.Response, queue_size: int) -> None:
    """``response`` is a refusal for load in the one error shape: 503, a ``Retry-After`` the body
    repeats, the queue's size and the cheaper mode to try."""
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert error["queue_size"] == queue_size
    assert "fast" in error["suggestion"]
    assert error["retry_after"] == int(response.headers["Retry-After"])


def stage_sources(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Each stage of an answer with what served it: ``[("generate", "model:qwen"), ...]``."""
    return [(s["stage"], s["served_by"]) for s in body["stages"]]


@dataclass
class Stack:
    """A running app with its runtime, its model fakes and an HTTP client."""

    app: FastAPI
    runtime: Runtime
    http: httpx.AsyncClient
    fakes: Mapping[str, FakeLLM]
    bus: EventBus

    @property
    def service(self) -> BriefService:
        assert self.runtime.service is not None
        return self.runtime.service

    def breaker(self, role: str) -> CircuitBreaker:
        (breaker,) = self.runtime.clients[role].breakers.values()
        return breaker

    async def post(self, text: str, mode: str = "balanced") -> httpx.Response:
        return await self.http.post("/v1/briefs", json={"text": text, "mode": mode})

    async def brief(self, text: str, mode: str = "balanced") -> dict[str, Any]:
        """POST a brief request that must succeed; returns the body, its brief validated."""
        response = await self.post(text, mode)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        brief_of(body)
        assert body["requested_mode"] == mode
        return body

    async def metrics(self) -> Metrics:
        response = await self.http.get("/metrics")
        assert response.status_code == 200
        return metric_values(response.text)


@contextlib.asynccontextmanager
async def serve(
    fakes: Mapping[str, FakeLLM],
    tmp_path: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    urls: Mapping[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Run the app on ``fakes`` (or ``urls``) with ``overrides``; yields once the first probes are in."""
    where = dict(urls) if urls is not None else {role: fake.url for role, fake in fakes.items()}
    config = make_config(where, tmp_path / "briefs.db", overrides)
    bus = EventBus()
    runtime = Runtime(config, events=bus)
    app = create_app(config, runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://brownout", timeout=30.0) as http:
            stack = Stack(app, runtime, http, fakes, bus)
            # The health loop probes every role once at start; let it finish so it cannot race a test.
            await until(lambda: len(stack.service.stats.health) == len(ROLES), "the first probes")
            yield stack


WORDS = [
    "amber",
    "cedar",
    "citrus",
    "vetiver",
    "rose",
    "jasmine",
    "musk",
    "vanilla",
    "pepper",
    "iris",
    "leather",
    "tobacco",
    "oud",
    "neroli",
    "bergamot",
    "fig",
    "tea",
    "sandalwood",
    "patchouli",
    "lavender",
    "mint",
    "ginger",
    "incense",
    "saffron",
    "plum",
]
"""Scent words that :func:`distinct_text` draws from."""


def distinct_text(i: int) -> str:
    """A different request each time (no exact or similar cache hit between them)."""
    rng = random.Random(i)
    return f"brief {i}: " + " ".join(rng.sample(WORDS, 6)) + f" for customer {i * 7919}"
