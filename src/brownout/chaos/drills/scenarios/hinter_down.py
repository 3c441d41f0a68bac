"""Creative hinter down: the hinter (llama) answers HTTP 500; ``creative`` downshifts to ``balanced``."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, CALL, MODEL_VERIFY, PROBE, RECOVER, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario, frozen

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="hinter-down",
    title="Creative hinter down",
    category="Model",
    severity="Medium",
    kind="model",
    seed="000 (hinter down)",
    event="The hinter (llama) answers HTTP 500 to every call.",
    detection=(CALL, BREAKER, PROBE),
    response=(
        "A request whose hint call fails gets template hints for its style.",
        "The llama breaker opens: `creative` requests downshift to `balanced` "
        "(features_lost: creative_hints).",
        RECOVER,
    ),
    impact=(("Failed requests", "0"), ("Quality", "template hints"), ("Mode", "creative -> balanced")),
    verification=(*MODEL_VERIFY, "answers downshifted to `balanced`"),
    play="model_fault",
    fault=Fault("control", ("llama",), frozen({"mode": "error", "status": 500})),
    goals=Goals(must_see=("downshifted",), served_modes=("balanced",)),
)
