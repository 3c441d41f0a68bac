"""All models down: every role answers 503; requests are served in ``emergency`` mode."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, CALL, MODEL_VERIFY, PROBE, RECOVER, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="all-models-down",
    title="All models down",
    category="Model",
    severity="Critical",
    kind="model",
    seed="000 (all models down)",
    event="All three model roles answer HTTP 503 (with /health failing too).",
    detection=(CALL, BREAKER, PROBE),
    response=(
        "Requests are served in `emergency` mode: the exact cached answer, else the popular brief "
        "for the mode; only when neither exists, 503 with Retry-After 300.",
        RECOVER,
    ),
    impact=(
        ("Failed requests", "0"),
        ("Quality", "cached or popular briefs (reliability low)"),
        ("Mode", "creative -> emergency"),
    ),
    verification=(*MODEL_VERIFY, "answers served in `emergency` mode"),
    play="model_fault",
    fault=Fault("control", ("qwen", "mistral", "llama"), frozen({"mode": "down"})),
    goals=Goals(must_see=("fallback",), served_modes=("emergency",)),
)
