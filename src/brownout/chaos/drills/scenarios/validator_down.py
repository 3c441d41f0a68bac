"""Validator down: the validator (mistral) answers 503 everywhere; requests downshift to ``fast``."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, CALL, MODEL_VERIFY, PROBE, RECOVER, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="validator-down",
    title="Validator down",
    category="Model",
    severity="High",
    kind="model",
    seed="000 (validator down)",
    event="The validator (mistral) answers 503 everywhere, /health included (a server still loading).",
    detection=(CALL, BREAKER, PROBE),
    response=(
        "A request whose validate call fails is validated by rules (warning 'IFRA check skipped').",
        "The mistral breaker opens and the health probe fails: `creative` and `balanced` requests "
        "downshift to `fast` (features_lost: validation).",
        RECOVER,
    ),
    impact=(
        ("Failed requests", "0"),
        ("Quality", "no model validation; rule-based checks only"),
        ("Mode", "creative -> fast"),
    ),
    verification=(*MODEL_VERIFY, "answers downshifted to `fast`"),
    play="model_fault",
    fault=Fault("control", ("mistral",), frozen({"mode": "down"})),
    goals=Goals(must_see=("downshifted",), served_modes=("fast",)),
)
