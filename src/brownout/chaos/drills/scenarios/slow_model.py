"""Slow model: the validator answers after three times its timeout; requests downshift to ``fast``."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, MODEL_VERIFY, PROBE, RECOVER, TIMEOUT, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="slow-model",
    title="Slow model (latency above its timeout)",
    category="Model",
    severity="High",
    kind="model",
    seed="000 (model timeouts), 004 (circuit breaker)",
    event="The validator answers only after 3 s, three times its 1 s timeout.",
    detection=(TIMEOUT, BREAKER, PROBE),
    response=(
        "Each validate call is cut at the role's timeout and the request is validated by rules.",
        "Timeouts count as breaker failures: the breaker opens and requests downshift to `fast`.",
        RECOVER,
    ),
    impact=(
        ("Failed requests", "0"),
        ("Latency", "+1 timeout per request until the breaker opens"),
        ("Mode", "creative -> fast"),
    ),
    verification=(*MODEL_VERIFY, "answers downshifted to `fast`"),
    play="model_fault",
    fault=Fault("control", ("mistral",), frozen({"mode": "slow", "delay": 3.0}), latency=True),
    goals=Goals(must_see=("downshifted",), served_modes=("fast",)),
)
