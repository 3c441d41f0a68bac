"""Generator down: the generator (qwen) answers HTTP 500; requests are served by fallbacks."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, CALL, MODEL_VERIFY, PROBE, RECOVER, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="generator-down",
    title="Generator down",
    category="Model",
    severity="Critical",
    kind="model",
    seed="000 (generator down)",
    event="The generator (qwen) answers HTTP 500 to every call.",
    detection=(CALL, BREAKER, PROBE),
    response=(
        "A request whose generate call fails falls back stage by stage: a similar earlier brief "
        "(similarity >= 0.8), a retry with reduced context, a rule-based brief.",
        "The qwen breaker opens; new requests skip the generator and are served in `fallback` mode.",
        RECOVER,
    ),
    impact=(
        ("Failed requests", "0"),
        ("Quality", "fallback briefs (similar earlier brief, rules); reliability medium/low"),
        ("Latency", "one failed call and its retry until the breaker opens, then none"),
    ),
    verification=(*MODEL_VERIFY, "answers served in `fallback` mode while the generator is down"),
    play="model_fault",
    fault=Fault("control", ("qwen",), frozen({"mode": "error", "status": 500})),
    goals=Goals(must_see=("fallback",), served_modes=("fallback",)),
    fast=True,
)
