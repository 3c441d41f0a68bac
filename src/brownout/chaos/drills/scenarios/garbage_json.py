"""Garbage JSON: the generator answers chatty text, not JSON; the JSON guard gives up, fallbacks serve."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import MODEL_VERIFY, play
from brownout.chaos.drills.spec import DetectionRow, Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="garbage-json",
    title="Model answers garbage JSON",
    category="Model",
    severity="High",
    kind="model",
    seed="004 (JSON hard guard)",
    event="The generator answers HTTP 200 with chatty text that is not JSON "
    "('Sure! Here is your brief: {oops').",
    detection=(
        DetectionRow("JSON guard", "parse + schema validation of every answer", "immediate"),
        DetectionRow("JSON guard", "re-asks with the validation error (json_guard.max_retries)", "3 re-asks"),
    ),
    response=(
        "The guard repairs what it can, re-asks the model with the validation error, then gives up.",
        "The generate stage is served by its fallbacks (similar earlier brief, reduced context, rules); "
        "the breaker stays closed because the endpoint itself answers.",
        "When the model answers valid JSON again, the next request is served in full.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Quality", "fallback briefs, counted in llm_json_fallback_used_total"),
        ("Load", "up to 1 + max_retries generator calls per request"),
    ),
    verification=(
        *MODEL_VERIFY[:2],
        "detection: the first answer served by a fallback within 1 s of the first garbage answer",
        "full answers again right after restore",
        MODEL_VERIFY[4],
    ),
    play="model_fault",
    fault=Fault("control", ("qwen",), frozen({"mode": "garbage"})),
    goals=Goals(must_see=("fallback",)),
)
