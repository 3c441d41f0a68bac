"""Model hang: the generator's process is frozen (SIGSTOP); calls time out, fallbacks serve."""

from __future__ import annotations

from brownout.chaos.drills.scenarios._model_fault import BREAKER, MODEL_VERIFY, PROBE, TIMEOUT, play
from brownout.chaos.drills.spec import Fault, Goals, Scenario

__all__ = ["SCENARIO", "play"]

SCENARIO = Scenario(
    name="model-hang",
    title="Model hang (SIGSTOP)",
    category="Model",
    severity="Critical",
    kind="model",
    seed="001 (wedged process)",
    event="The generator's server process is frozen with SIGSTOP: connections are accepted by the "
    "kernel but nothing ever answers.",
    detection=(TIMEOUT, BREAKER, PROBE),
    response=(
        "Calls time out after the role's timeout; the request's deadline bounds the whole pipeline "
        "and a late request is served from what needs no model call.",
        "The health probe times out and the breaker opens: requests are served in `fallback` mode "
        "without waiting.",
        "After SIGCONT the probes pass, the breaker closes and full mode returns.",
    ),
    impact=(
        ("Failed requests", "0"),
        ("Latency", "up to the request deadline for the first requests, then fallback at once"),
        ("Quality", "fallback briefs"),
    ),
    verification=(*MODEL_VERIFY, "answers served in `fallback` mode while frozen"),
    play="model_fault",
    fault=Fault("sigstop", ("qwen",), latency=True),
    goals=Goals(must_see=("fallback",), served_modes=("fallback",)),
)
