"""What the model-fault scenarios share: their play and the template rows they have in common.

:func:`play` (``model_fault``) drives a fault on one or more model roles under load -- a FakeLLM
behaviour switched on through ``POST /_control``, or the fake's process frozen with SIGSTOP -- then
restores it, waits for full mode and judges. Each scenario module that uses it (``generator_down``,
``model_hang``, ...) holds only its :class:`~brownout.chaos.drills.spec.Scenario`.
"""

from __future__ import annotations

import signal

from brownout.chaos.drills.harness import Drill
from brownout.chaos.drills.spec import DetectionRow

__all__ = ["BREAKER", "CALL", "MODEL_VERIFY", "PROBE", "RECOVER", "TIMEOUT", "play"]

BREAKER = DetectionRow(
    "Circuit breaker (per endpoint)", "failure rate over the last calls (0.5; qwen 0.4)", "5 calls"
)
PROBE = DetectionRow("Health monitor", "test inference on every role", "health_interval + health_timeout")
CALL = DetectionRow("Model client", "HTTP 5xx / connection error on a call", "immediate")
TIMEOUT = DetectionRow("Model client", "no answer within the role's timeout", "models.roles.<role>.timeout")
MODEL_VERIFY = (
    "bounded load from an async client on 127.0.0.1 in the scenario's mode, unique texts",
    "0 failed requests (5xx without Retry-After, timeouts, connection errors)",
    "detection within 1 s of the first failed call (breaker open, role unhealthy, or a degraded answer)",
    "full mode back within the breaker's open wait plus one probe after the fault is restored",
    "every acknowledged brief is in the database (or still in the spool)",
)
RECOVER = "After restore and the breaker's open wait, probes succeed, the breaker closes: full mode returns."


async def play(d: Drill) -> None:
    """A fault on one or more model roles (FakeLLM behaviour or SIGSTOP) under load, then restore."""
    s = d.scenario
    d.phase("starting fakes and server")
    load, _ = await d.begin()
    load.start()
    d.phase("warm-up")
    await d.clock.sleep(d.settings.warmup)
    d.phase(f"fault: {s.fault.action} {', '.join(s.fault.roles)}")
    fault_at = d.mark("fault")
    for role in s.fault.roles:
        if s.fault.action == "sigstop":
            d.fakes[role].signal(signal.SIGSTOP)
        else:
            await d.fakes[role].set(s.fault.behaviour)
    await d.clock.sleep(s.fault.hold)
    d.phase("restore")
    for role in s.fault.roles:
        if s.fault.action == "sigstop":
            d.fakes[role].signal(signal.SIGCONT)
        else:
            await d.fakes[role].set({"mode": "ok"})
    restore_at = d.mark("restore")
    budget = d.recovery_budget()
    d.phase("recovering")
    await d.wait_recovered(restore_at, budget)
    await d.end_load()
    d.phase("auditing writes")
    d.common_checks(fault_at, restore_at)
    d.recovery_check(restore_at, budget)
    await d.finish_sqlite()
