"""The creative-brief service: a three-model pipeline with downshift and fallbacks.

Modes (poorest first): ``fast`` = generate (qwen); ``balanced`` = + validate (mistral);
``creative`` = + hint (llama). A request names a mode and is served in the richest mode not above it
whose models are available (breaker not open, server alive, last health probe passed). While running,
a failing model call falls back stage by stage:

* generate: a similar earlier brief (similarity >= 0.8) → retry with reduced context (max_tokens 256,
  three times the role's timeout, temperature 0.5) → a rule-based brief from keywords (reliability
  "low") → 503;
* validate: rule-based validation (ranges, categories, notes) with "IFRA check skipped";
* hint: template hints by style.

When the generator is unavailable the request is served in ``fallback`` mode (the generate
fallbacks above); when every model is unavailable, in ``emergency`` mode: the exact cached answer,
then the popular brief for the mode, then 503 with Retry-After 300. When the request's deadline
(``server.request_timeout``) cuts the pipeline short, it is served in ``fallback`` mode from what needs
no model call: a similar earlier brief, else the rules.

Overload is not failure (the ``dimmer`` config section). Each request has a latency target (per
mode); the dimmer (:class:`~brownout.policies.dimmer.Dimmer`) watches the latency a new request can
expect and, as load rises, leaves out for a growing share of requests first the hinter (creative →
balanced), then the validator (→ fast), then serves a similar earlier brief in place of generating,
and only last the rules -- so the target holds and as many answers as possible still come from the
generator. That is the "fit the load" of the downshift rule. Such an answer says ``reason: "load"``
and ``dimmed: [...]`` (``description_tail``, ``creative_hints``, ``validation``, ``generation``); an
answer nothing was dimmed for has no ``dimmed``. A request that cannot even start within its target
is answered at once with 503 and an estimated Retry-After (admission with a deadline), never after
waiting to fail.
Beside a local generator, the answers that would come without it while it is saturated are also
held to a CPU budget (``dimmer.cpu_budget``, :mod:`brownout.policies.cpu_budget`): while the service's
own process uses more than its share of a core, a growing share of them is refused (503 +
Retry-After) instead, since each caller answered at once comes straight back and the work for it is
taken from the model's cores.

The path of one request under load, and its budgets
---------------------------------------------------

A request for mode ``m`` arrives at ``t0``; its target is ``T = dimmer.targets[m]``, of which the model
calls may use all but ``R`` (:data:`ANSWER_RESERVE`, kept for what follows them: storing the brief
before it is acknowledged, and answering); ``S`` is the generator's service time in the tail: the
90th percentile (:data:`PLAN_QUANTILE`) of the time its recent calls held a slot of the generator's
server (its call timeout until one has been measured) -- planned with the average, every
longer-than-average call of a request that waited its whole budget would end past the target.
It may wait in *one* budget, never two:

1. the exact-answer cache and the coalescing of identical requests: no wait;
2. the dimmer decides what it leaves out, *before* it queues anywhere. One that needs no model call
   (generation dimmed: a similar earlier brief, or the rules) is answered at once, queueing nowhere --
   unless the generator has a free slot right now: the dimmer chooses who does without the generator
   when callers would wait for it, and never leaves a slot of it idle (a pinned value is obeyed);
3. the admission queue (``queue.max_concurrent`` pipelines at once). The wait it expects counts the
   generator's queue too -- the callers waiting for a slot of the generator's server and those ahead
   in the admission queue, each one a service time over the server's concurrency limit -- so a
   request that could not *start its generator call* by ``t0 + T - R - S`` is refused at once: 503 and
   an estimated Retry-After. One admitted on an estimate that proved hopeful, still waiting at that
   time, has waited already: it leaves the queue then and is answered without the generator (as in
   step 2, ``reason: load``), not refused;
4. the pipeline; every model call may wait for a slot of its server (the model client's concurrency
   limiter) only until ``t0 + T - R`` minus that role's own expected service time, and is refused at once
   when the expected wait is longer. That is the same budget as step 3, not a second one: the time
   the request spent in the admission queue has already been taken from it. A generator call refused
   this way, or one that was sent and timed out on a live, busy server (*slow*, see
   :mod:`brownout.llm.client`), leaves the generation to a similar earlier brief or the rules
   (never to the reduced-context retry, which would only add load), and the answer says
   ``reason: "load"``, ``dimmed: ["generation"]`` -- unless the slow call had written a valid brief
   up to its description, which is then served cut short (``dimmed: ["description_tail"]``);
5. once sent, a model call runs until ``t0 + T - R`` or its role's ``timeout``, whichever comes first. A
   call the request's target cuts well before its own timeout (by more than
   :data:`~brownout.llm.client.EARLY_CUT`) is the request's doing -- its time went on waiting -- and
   never counts against the model, busy or not; what it had written is served cut short when it
   makes a brief (as above), else the similar brief or the rules answer, ``reason: "load"``. A cut
   about as long as the timeout is judged as a timeout (busy, or down: a hung model is still found).
   ``server.request_timeout`` remains the hard deadline of the whole pipeline.

So an accepted request plans to finish by ``t0 + T``: at most ``T - R - S`` waiting, then about ``S``
generating -- and a longer answer is cut at ``t0 + T - R`` rather than served late. The dimmer sees the
same picture: its queue signal is the wait a new request would have before its generator call starts
(admission queue and generator queue together), and each answer's latency reaches it split into that
wait and the service time.

What the validator model says reaches the answer's ``warnings``; when it rejects the brief or raises
an IFRA concern the brief is still served (it passed the schema's checks) with reliability ``medium``,
and is neither cached nor offered to similar requests. A cache hit has one ``cache`` stage and says how
old it is (``cached_at``, ``cache_age_seconds``).

Identical requests share one pipeline run (singleflight) and full-quality answers are cached (LRU +
TTL: 1000 entries, 10 minutes). Admission control bounds concurrent runs and the queue (500 by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from brownout import telemetry
from brownout.briefs.answer import BriefAnswer
from brownout.briefs.prompts import generator_messages, hinter_messages, validator_messages
from brownout.briefs.rules import (
    mode_impact,
    popular_brief,
    rule_based_brief,
    rule_based_validation,
    template_hints,
)
from brownout.briefs.schema import (
    MODES,
    CreativeBrief,
    HintList,
    ModelBrief,
    ValidationReport,
    ValidatorVerdict,
)
from brownout.briefs.similar import SimilarityIndex
from brownout.clock import SYSTEM_CLOCK, WALL_CLOCK, Clock
from brownout.config import BrownoutConfig
from brownout.errors import (
    AllFallbacksFailed,
    DeadlineExceeded,
    Overloaded,
    RemoteComputationFailed,
    ServiceUnavailable,
)
from brownout.events import DEFAULT_BUS, EventBus
from brownout.health.resources import usable_cores
from brownout.llm.client import EARLY_CUT
from brownout.llm.guard import GuardConfig, JSONGuard
from brownout.llm.pipeline import Mode, NoModeAvailable, Pipeline, PipelineContext, Stage
from brownout.llm.types import CUT_SHORT, Message, ProbeResult
from brownout.policies.admission import Admission, AdmissionConfig
from brownout.policies.cache import Cache, CacheConfig
from brownout.policies.cpu_budget import CpuBudget, CpuBudgetConfig
from brownout.policies.deadline import deadline
from brownout.policies.dimmer import Dimmer, DimmerConfig, DimmerDecision
from brownout.policies.fallback import Decline, Degraded, FallbackChain, FallbackResult, Strategy
from brownout.policies.singleflight import Singleflight
from brownout.state.tiered import Tier, TieredReader

if TYPE_CHECKING:  # Redis support is optional (the server extra); only its types are needed here
    from brownout.state.redis import SharedCache
    from brownout.state.singleflight import RedisSingleflight

__all__ = [
    "ANSWER_RESERVE",
    "Budget",
    "BriefContext",
    "BriefService",
    "BriefTicket",
    "ModelBackend",
    "ServiceStats",
    "cache_age",
    "cache_hit",
    "cached_at_epoch",
]

_log = logging.getLogger("brownout.briefs")

ROLE_OF_STAGE = {"generate": "qwen", "validate": "mistral", "hint": "llama"}

DIMMER_STEPS = ("creative_hints", "validation", "generation", "model")
"""What the dimmer leaves out as load rises, in order: the hinter, the validator, generating when a
similar earlier brief exists, and last any model call at all (a similar brief, else the rules)."""

_FEATURE_OF_STAGE = {"generate": "generation", "validate": "validation", "hint": "creative_hints"}

DIMMED_FEATURES = ("description_tail", "creative_hints", "validation", "generation")
"""What an answer's ``dimmed`` can name (the last step, no model at all, shows as ``generation``;
``description_tail``: the generator's answer was cut short at its time limit or its request's
target, see :meth:`_salvage_brief`)."""

ANSWER_RESERVE = 0.25
"""Seconds of a request's latency target kept for what follows its model calls -- storing the brief
before it is acknowledged, answering -- so that a call cut at the last moment still answers within the
target as the client times it (cut exactly at the target, the drill's accepted p95 came to 10.01 s at
the client against a 10 s target)."""


def generator_latency_budget(config: BrownoutConfig) -> float | None:
    """Seconds a generator call may hold its server's slot and still be in time: what the generator's
    ``latency_budget: auto`` stands for (:class:`~brownout.config.RoleLimiterSection`).

    The tightest latency target, less :data:`ANSWER_RESERVE` and the
    :data:`~brownout.llm.client.EARLY_CUT` by which a call cut sooner was cut for its request's
    waiting: a call that held its slot this long was cut at its request's target, or barely made it.
    None while the dimmer is off (no target is kept then, and the limit follows the work done alone).
    """
    dimmer = config.dimmer
    if not dimmer.enabled:
        return None
    target = min(dimmer.targets.values(), default=10.0)
    return round(max(target / 2, target - ANSWER_RESERVE - EARLY_CUT), 3)


CUT_BRIEF_VALUE = 0.5
"""What a generator call cut at its request's target is worth beside a whole one, where the
generator's concurrency limit weighs how many calls at once make the most answers in time
(:mod:`brownout.policies.limiter`, the latency ceiling): its brief is served, but with its
description cut short. At nothing, the limit gave up a third of the model's briefs under 200
clients for as many whole ones; at full value it would never trade a cut brief for a whole one."""


PLAN_QUANTILE = 0.9
"""The quantile of a model's recent call times a request plans its wait with: by the average, every
call longer than average of a request that waited its whole budget ended past the target (the p95 of
accepted answers went past it under 200 clients; by the 75th percentile, in one drill run of four);
by the slowest, nothing would ever wait."""

_MIN_CUT_WORDS = 4
"""Fewest words a description cut short must keep for the brief to be served as the model's."""

_MODE_RANK: dict[str, int] = {m: i for i, m in enumerate(MODES)}


def _stamp(epoch: float) -> str:
    """``epoch`` (wall-clock seconds) as ISO 8601 UTC with milliseconds: 2025-01-31T12:00:00.250Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cached_at_epoch(stored: Mapping[str, Any]) -> float | None:
    """When a stored answer was put in the cache (wall-clock seconds), or None when it does not say."""
    stamp = stored.get("cached_at")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def cache_age(stored: Mapping[str, Any], now: float) -> float | None:
    """How old a stored answer is at wall-clock time ``now``, in seconds (0.1 s steps), or None if unknown."""
    at = cached_at_epoch(stored)
    return None if at is None else round(max(0.0, now - at), 1)


def cache_hit(stored: Mapping[str, Any], *, age: Any, request_id: str, latency_ms: float) -> dict[str, Any]:
    """The answer to a request served from the exact-answer cache, saying so.

    No model ran for this request: its ``stages`` is one ``cache`` stage, and ``cache_age_seconds``
    tells how old the answer is (``cached_at`` says when it was made). How the cached answer was made
    when it was new is kept under ``cached_stages``. ``age`` is normally a float (or None when the
    stored answer does not say when it was made); the edge cache passes a placeholder it fills in later.
    """
    return {
        **stored,
        "cached": True,
        "cache_age_seconds": age,
        "stages": [{"stage": "cache", "served_by": "cache", "latency_ms": latency_ms}],
        "cached_stages": stored.get("stages", []),
        "request_id": request_id,
        "latency_ms": latency_ms,
    }


class ModelBackend(Protocol):
    """What the service needs of a model role's client (``brownout.llm.client.ModelClient``)."""

    role: str

    @property
    def available(self) -> bool:
        """True when some endpoint of the role would take a call now."""

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        temperature: float = 0.7,
        response_format: dict[str, Any] | None = None,
        timeout: float | None = None,
        queue_timeout: float | None = None,
        salvage: Callable[[str], str | None] | None = None,
        finish_by: float | None = None,
    ) -> Any:
        """One chat completion; returns an object with ``content``, ``latency`` (seconds sent) and
        ``finish_reason`` (``CUT_SHORT`` when ``salvage`` kept an answer cut short). ``finish_by``:
        the clock time the caller needs it by (a call still running then is cut there)."""

    async def probe(self, timeout: float = 5.0) -> list[ProbeResult]:
        """A tiny test inference on every endpoint."""

    def estimated_wait(self, ahead: int = 0) -> float:
        """Seconds a call arriving now (behind ``ahead`` more callers) would wait for a slot."""

    def service_time(self, quantile: float | None = None) -> float | None:
        """Seconds one call is expected to hold a slot (None before any was measured); with
        ``quantile``, that quantile of the recent calls' times."""


@dataclass
class Budget:
    """The time budget of one request (see "The path of one request" in the module docstring)."""

    finish_by: float | None = None
    """Clock time by which the request's model calls plan to be done (its arrival plus its target, less
    :data:`ANSWER_RESERVE`); None: no plan, model calls wait for a slot as long as the request's
    deadline allows."""
    queued: float = 0.0
    """Seconds its model calls spent waiting for a slot of their servers (not the models' time)."""
    overloaded: set[str] = field(default_factory=set)
    """Roles whose call was refused for load or was slow under load: busy, not down."""
    cut: set[str] = field(default_factory=set)
    """Roles whose answer was slow under load and kept as far as it was written (cut short)."""
    cut_at_target: set[str] = field(default_factory=set)
    """Of those, the ones cut at the request's target rather than at their own time limit."""


_ADMISSION_FRESH = 1.0
"""Seconds an admission made before a computation started stays its admission (see ``_compute``)."""


class _Admitted(NamedTuple):
    """A request's admission (:meth:`BriefService._admit`): its target and arrival, what the dimmer
    leaves out of it, its time budget, and the seconds it has to start its generator call (None:
    no limit but its deadline's)."""

    target: float
    queued_at: float
    decision: DimmerDecision
    plan: Budget
    start_budget: float | None


@dataclass(frozen=True, slots=True)
class BriefTicket:
    """A brief request checked and admitted (:meth:`BriefService.admit`), to be answered by
    :meth:`BriefService.answer`: its normalised text, mode, cache key and arrival, and either its
    cached answer or its admission (None: it joins a computation already running for its key)."""

    text: str
    mode: str
    key: str
    started: float
    cached: dict[str, Any] | None = None
    admitted: _Admitted | None = None


@dataclass
class BriefContext(PipelineContext):
    """One brief request flowing through the stages."""

    reliability: str = "high"
    freshness: dict[str, Any] | None = None
    """Where an emergency answer came from: source, freshness, fallback_reason (tiered reads)."""
    budget: Budget = field(default_factory=Budget)
    """Its time budget and what the load did to it."""
    similar: tuple[CreativeBrief, float] | None = None
    """The similar earlier brief found for its text and its score, once searched (None: none)."""
    similar_searched: bool = False
    """True once the similarity index was asked for its text (``similar`` holds the answer)."""


@dataclass
class ServiceStats:
    """Counters read by the metrics endpoint; the comment beside each names the metric it feeds."""

    requests: Counter[str] = field(default_factory=Counter)  # llm_requests_total{model}
    failures: Counter[str] = field(default_factory=Counter)  # llm_request_failures_total{model}
    downshifts: Counter[tuple[str, str]] = field(default_factory=Counter)  # llm_mode_downshift_total
    served: Counter[str] = field(default_factory=Counter)  # briefs by served mode
    rejected: Counter[str] = field(default_factory=Counter)  # 503s by reason
    dimmed: Counter[str] = field(default_factory=Counter)  # answers by what the dimmer left out
    fallback_used: int = 0  # llm_json_fallback_used_total: a stage served by a fallback after a bad answer
    health: dict[str, ProbeResult] = field(default_factory=dict)
    health_failures: Counter[str] = field(default_factory=Counter)


class BriefService:
    """See the module docstring. ``backends`` maps each role ("qwen", "mistral", "llama") to its client."""

    def __init__(
        self,
        config: BrownoutConfig,
        backends: Mapping[str, ModelBackend],
        *,
        role_alive: Callable[[str], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        wall_clock: Clock = WALL_CLOCK,
        rng: random.Random | None = None,
        cores: float | None = None,
    ) -> None:
        """``cores``: the CPU cores this process may use (None: read from the machine and its cgroup),
        for the CPU budget's ``auto``, which counts the cores the local model servers leave free."""
        self.config = config
        self.backends = dict(backends)
        self._role_alive = role_alive or (lambda role: True)
        self._clock = clock
        # Wall time, for what is compared across processes and shown to users: when a cached answer was
        # made (replicas share answers through Redis, where a monotonic time would mean nothing).
        self.wall_clock = wall_clock
        self._events = events
        self.stats = ServiceStats()
        # Whether each role's backend really applies a JSON-schema constraint (checked at start).
        self.constrained: dict[str, bool] = dict.fromkeys(self.backends, True)
        self.constraint_checks: dict[str, str] = {}
        """What :meth:`verify_constraints` learned per role: ``applied``, ``not applied``, or
        ``skipped: <why>`` (the role keeps its configured assumption)."""
        jg = config.json_guard
        guard_config = GuardConfig(
            enabled=jg.enabled,
            max_retries=jg.max_retries,
            backoff_base=jg.backoff_base,
            jitter=jg.jitter,
            fallback_enabled=jg.fallback_enabled,
            strict_schema=jg.strict_schema,
            extra_tokens=jg.extra_tokens,
        )
        self.guard_brief = JSONGuard("generate", ModelBrief, guard_config, clock=clock, events=events)
        self.guard_verdict = JSONGuard("validate", ValidatorVerdict, guard_config, clock=clock, events=events)
        self.guard_hints = JSONGuard("hint", HintList, guard_config, clock=clock, events=events)
        self.guards: dict[str, JSONGuard[Any]] = {
            "generate": self.guard_brief,
            "validate": self.guard_verdict,
            "hint": self.guard_hints,
        }
        c = config.cache
        self.cache: Cache[str, dict[str, Any]] = Cache(
            "briefs",
            CacheConfig(max_entries=c.max_size, ttl=c.ttl_seconds, sweep_interval=c.cleanup_interval),
            clock=clock,
            events=events,
        )
        self.similar: SimilarityIndex[CreativeBrief] = SimilarityIndex(
            max_entries=c.max_size, threshold=c.similar_threshold
        )
        # The similarity search runs on the event loop: it is pure Python (0.2 ms over 50 entries,
        # under 1 ms over a full index of 1,000 brief texts), so a worker thread would hold the GIL
        # for the same time and only add a hand-off per search -- under load, where every answer
        # without the model searches, the hand-offs were about a tenth of the service's samples in
        # a profile, and each woke a thread on the cores a local model needs.
        self._flights: Singleflight[str, dict[str, Any]] = Singleflight("briefs")
        q = config.queue
        self.admission = Admission(
            "briefs",
            AdmissionConfig(
                max_concurrent=q.max_concurrent,
                max_queue=q.max_size,
                max_wait=q.max_wait,
                default_retry_after=max(q.retry_after, 1.0),
                max_retry_after=max(300.0, q.retry_after),
                # With 200 polite clients and 4 pipelines, a Retry-After of "when the queue drains"
                # (a few seconds) sent nearly all of them back every few seconds to be refused again:
                # 36 to 64 refusals a second on 2 cores, on the cores the local model runs on.
                retry_pacing=q.retry_pacing,
            ),
            clock=clock,
            events=events,
            wait_estimator=self._start_wait,
        )
        d = config.dimmer
        self.dimmer = Dimmer(
            "briefs",
            DIMMER_STEPS,
            DimmerConfig(
                # The queue's wait is weighed against the tightest target: a request of that mode
                # arriving now must still make it.
                target_p95=min(d.targets.values(), default=10.0),
                window=d.window,
                interval=d.interval,
                setpoint=d.setpoint,
                dead_band=d.dead_band,
                gain=d.gain,
                recovery_gain=d.recovery_gain,
                proportional=d.proportional,
                max_step_up=d.max_step_up,
                max_step_down=d.max_step_down,
            ),
            clock=clock,
            events=events,
            rng=rng,
            queue_delay=self.queue_delay,
        )
        """Under load, which optional stages a request leaves out (see the module docstring)."""
        if not d.enabled:
            self.dimmer.force(0.0)
        elif d.force_value is not None:
            self.dimmer.force(d.force_value)
        local_generator = ROLE_OF_STAGE["generate"] in config.models.local_roles()
        spare = 0.0
        if local_generator and d.cpu_budget == "auto":
            usable = usable_cores() if cores is None else cores
            spare = max(0.0, usable - config.models.local_threads(usable))
        budget = d.effective_cpu_budget(local_generator, spare_cores=spare)
        self.cpu_budget: CpuBudget | None = (
            CpuBudget("briefs", CpuBudgetConfig(budget=budget, interval=d.interval), clock=clock, rng=rng)
            if budget is not None and d.enabled
            else None
        )
        """Keeps the service's own CPU use off its local generator's cores under a flood (see
        :mod:`brownout.policies.cpu_budget`); None when off."""
        self._health_ok: dict[str, bool] = {}
        self._started = False
        self.shared_cache: SharedCache | None = None
        """The Redis tier behind ``cache`` when Redis is configured (see :meth:`share`)."""
        self._shared_flights: RedisSingleflight[dict[str, Any]] | None = None
        self._stored: TieredReader[dict[str, Any]] | None = None
        self.switched_off: dict[str, frozenset[str]] = {}
        """Roles switched off although healthy, by who did it ("system_mode", "recovery"): the
        pipeline treats them as unavailable (downshift), and no model call reaches them."""
        self.generation_limit: tuple[int, float] | None = None
        """A cap on (max_tokens, temperature) of every model call, set by the recovery action
        ``reduce_generation_params`` until reset; None: the configured values."""
        generate_fallbacks: tuple[Strategy[Any], ...] = (
            Strategy("cache", self._similar_brief),
            Strategy(
                "reduced_context",
                self._generate_reduced,
                warning="Generated with reduced context after a model failure",
            ),
            Strategy("rules", self._rules_brief),
        )
        self._generate_chain: FallbackChain[CreativeBrief] = FallbackChain(
            "briefs.fallback", generate_fallbacks, clock=clock, events=events, default_retry_after=30.0
        )
        self._emergency_chain: FallbackChain[CreativeBrief] = FallbackChain(
            "briefs.emergency",
            (
                Strategy("cache", self._exact_brief),
                Strategy("stored", self._stored_brief),
                Strategy("popular", self._popular_brief),
            ),
            clock=clock,
            events=events,
            default_retry_after=300.0,
        )
        # Served when the request's own deadline cut the pipeline short: only what needs no model call.
        self._late_chain: FallbackChain[CreativeBrief] = FallbackChain(
            "briefs.late",
            (Strategy("cache", self._similar_brief), Strategy("rules", self._rules_brief)),
            clock=clock,
            events=events,
            default_retry_after=30.0,
        )
        self.pipeline: Pipeline[BriefContext] = Pipeline(
            "briefs",
            stages=[
                Stage("generate", "qwen", self._generate, generate_fallbacks),
                Stage(
                    "validate",
                    "mistral",
                    self._validate,
                    (Strategy("rules", self._validate_rules),),
                    "validation",
                ),
                Stage(
                    "hint",
                    "llama",
                    self._hint,
                    (Strategy("template", self._template_hints),),
                    "creative_hints",
                ),
            ],
            modes=[
                Mode("fast", ("generate",)),
                Mode("balanced", ("generate", "validate")),
                Mode("creative", ("generate", "validate", "hint")),
            ],
            available=self.role_available,
            clock=clock,
            events=events,
        )

    # ------------------------------------------------------------------ load

    def _generator(self) -> ModelBackend | None:
        return self.backends.get(ROLE_OF_STAGE["generate"])

    def generator_service(self, quantile: float | None = None) -> float:
        """Seconds the generator is expected to take for one call; with ``quantile``, that quantile
        of its recent calls. Until one has been measured: its call timeout (see :meth:`_planned`)."""
        return self._planned(ROLE_OF_STAGE["generate"], quantile)

    def _planned(self, role: str, quantile: float | None = PLAN_QUANTILE) -> float:
        """Seconds a ``role`` call is planned to hold its slot: the ``quantile`` of its recent calls
        (:meth:`ModelBackend.service_time`), or, before any of them finished, the longest a call may
        take (``models.roles.<role>.timeout``). Planned with nothing until measured, a fresh server
        under a burst let every caller queue for its whole target, and they were refused seconds
        later, when the first calls came back and showed there had never been room; planned with the
        timeout, the callers that find every slot taken are answered at once until the first calls
        have been measured."""
        backend = self.backends.get(role)
        measured = backend.service_time(quantile) if backend is not None else None
        return self.config.models.roles[role].timeout if measured is None else measured

    def _start_wait(self, position: int) -> float | None:
        """The admission's wait estimator: seconds until the caller at ``position`` in the admission
        queue (1: next) could start its generator call.

        Two things must come free first, and the later one decides: an admission slot (pipelines
        finish about ``max_concurrent`` per pipeline service time) and a slot of the generator's
        server, behind everybody already waiting for one and the ``position - 1`` callers ahead in
        the admission queue (model-server queueing is visible here, not hidden in the pipeline).
        """
        own = self.admission.service_time
        slot = None if own is None else own * position / self.admission.config.max_concurrent
        gen = self._generator()
        model = (
            gen.estimated_wait(position - 1) if gen is not None and gen.service_time() is not None else None
        )
        known = [w for w in (slot, model) if w is not None]
        return max(known) if known else None

    def queue_delay(self) -> float:
        """Seconds a request arriving now would wait before its generator call starts (the dimmer's
        queue signal): the admission queue's wait when it has one, else the generator's queue."""
        admission = self.admission.estimated_wait() or 0.0
        gen = self._generator()
        return max(admission, gen.estimated_wait() if gen is not None else 0.0)

    # ------------------------------------------------------------------ availability and health

    def role_available(self, role: str) -> bool:
        """A role serves when it is healthy and not switched off (system mode, recovery)."""
        if self.switched_off and any(role in roles for roles in self.switched_off.values()):
            return False
        return self.role_healthy(role)

    def role_healthy(self, role: str) -> bool:
        """A role is healthy when its server is alive, a breaker lets calls through, and its last probe
        passed (whether or not it is switched off)."""
        backend = self.backends.get(role)
        if backend is None:
            return False
        return self._role_alive(role) and backend.available and self._health_ok.get(role, True)

    async def check_health(self, role: str) -> list[ProbeResult]:
        """Probe ``role`` now with a small test inference and remember the outcome."""
        results = await self.backends[role].probe(timeout=self.config.models.health_timeout)
        self.record_health(role, results)
        return results

    def record_health(self, role: str, results: list[ProbeResult]) -> None:
        """Take probe results of ``role`` -- this process's, or another replica's shared through Redis."""
        ok = any(r.healthy for r in results)
        self._health_ok[role] = ok
        if results:
            # A busy probe sent nothing (latency 0): it says the model answers, not how fast. A probe
            # that measured the model is the role's best latency; a busy one only when none did.
            best = min(results, key=lambda r: (not r.healthy, r.busy, r.latency))
            self.stats.health[role] = best
        if not ok:
            self.stats.health_failures[role] += 1

    async def verify_constraints(self) -> dict[str, bool]:
        """Check, per role, that the backend really applies a JSON-schema constraint.

        A backend that ignores ``response_format`` would leave every answer to the guard's repair and
        re-ask path; knowing it, the guard stops asking for a constraint that is not applied.
        """
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["alpha", "omega"]}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "probe", "schema": schema, "strict": True}}
        messages: list[Message] = [{"role": "user", "content": "Say hello."}]

        async def check(role: str, backend: ModelBackend) -> None:
            try:
                # The answer is a few tokens, but the JSON grammar allows whitespace between them
                # and a small model uses it: the embedded model answers '{\n    "answer"\n\n:\n\n
                # "alpha"\n\n}' in 23 tokens, so at 16 the check was cut short and never learned
                # anything. The grammar ends the answer at its closing brace.
                result = await backend.chat(
                    messages, max_tokens=128, temperature=0.0, response_format=fmt, timeout=10.0
                )
                applied = json.loads(result.content).get("answer") in ("alpha", "omega")
            except Exception as e:  # a role that is down now keeps its configured assumption
                self.constraint_checks[role] = f"skipped: {e}"
                _log.info("constraint check of %s skipped: %s", role, e)
                return
            self.constrained[role] = applied
            self.constraint_checks[role] = "applied" if applied else "not applied"
            if not applied:
                _log.warning("%s ignores a JSON schema: its answers are left to the JSON guard", role)

        # Every role at once: the server starts answering after the slowest model, not after the sum
        # of them (three hung models held the startup 30 s when checked one after the other).
        await asyncio.gather(*(check(role, backend) for role, backend in self.backends.items()))
        return dict(self.constrained)

    # ------------------------------------------------------------------ the request

    def validate_request(self, text: str, mode: str) -> str:
        """Normalise and check a request; raises ValueError with a reason (an HTTP 422)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        stripped = text.strip()
        if not stripped:
            raise ValueError("text must not be empty")
        limit = self.config.server.max_text_chars
        if len(stripped) > limit:
            raise ValueError(f"text is {len(stripped)} characters long; the limit is {limit}")
        return stripped

    @staticmethod
    def cache_key(text: str, mode: str) -> str:
        """The response-cache key of a request: mode and whitespace-normalised, lower-cased text."""
        norm = " ".join(text.lower().split())
        return f"{mode}:{hashlib.sha256(norm.encode()).hexdigest()[:32]}"

    async def create_brief(self, text: str, mode: str) -> BriefAnswer:
        """Serve one brief request; raises ValueError (bad input) or ServiceUnavailable (503).

        :meth:`admit` then :meth:`answer`: the HTTP front calls the first as soon as the request's
        body is read, so that a refusal costs as little as it can.
        """
        return await self.answer(await self.admit(text, mode))

    async def admit(self, text: str, mode: str) -> BriefTicket:
        """The first half of :meth:`create_brief`: check the request, look for its answer in the
        cache, and decide on its admission; raises ValueError (bad input) or ServiceUnavailable (a
        503: refused at once for load). Nothing here waits for a model.

        The ticket is for :meth:`answer`, right after: its admission is taken again when more than
        a second old (see ``_compute``).
        """
        text = self.validate_request(text, mode)
        started = self._clock.now()
        key = self.cache_key(text, mode)
        caching = self.config.cache.enabled
        cached = self.cache.get(key) if caching else None
        if cached is None and caching and self.shared_cache is not None:
            cached = await self.shared_cache.get(key)  # another replica's answer (never raises)
        if cached is not None:
            return BriefTicket(text, mode, key, started, cached=cached)
        flights = self._shared_flights if self._shared_flights is not None else self._flights
        # A request that starts a computation is admitted (or refused) here, in the step of the event
        # loop it arrived in: the computation runs as a task of its own, a turn of the loop later,
        # and under a burst every refusal made there would wait behind the whole burst. One that
        # joins a computation already running for its key in this process is never refused (with
        # Redis, one another replica runs is joined only by those admitted here).
        if key in flights:
            return BriefTicket(text, mode, key, started)
        try:
            admitted = self._admit(mode)
        except Overloaded as e:
            raise self._refusal(e, mode) from e
        return BriefTicket(text, mode, key, started, admitted=admitted)

    async def answer(self, ticket: BriefTicket) -> BriefAnswer:
        """The second half of :meth:`create_brief`: the answer to an admitted request (raises
        ServiceUnavailable when it cannot be given).

        The helpers below build the answer as a plain dict (it also passes through the cache, Redis
        and the singleflight as one); it is typed once, here, where it leaves the service.
        """
        text, mode, key, started = ticket.text, ticket.mode, ticket.key, ticket.started
        if ticket.cached is not None:
            hit = cache_hit(
                ticket.cached,
                age=cache_age(ticket.cached, self.wall_clock.now()),
                request_id=uuid.uuid4().hex,
                latency_ms=_ms(self._clock.now() - started),
            )
            return cast(BriefAnswer, hit)
        flights = self._shared_flights if self._shared_flights is not None else self._flights
        admitted = ticket.admitted
        try:
            response: dict[str, Any] = await flights.do(key, lambda: self._compute(key, text, mode, admitted))
        except Overloaded as e:
            raise self._refusal(e, mode) from e
        except ServiceUnavailable as e:
            self.stats.rejected[e.policy or "unavailable"] += 1
            raise
        except RemoteComputationFailed as e:
            # The replica that computed this key failed (its error came through Redis): answer as it did.
            self.stats.rejected["unavailable"] += 1
            raise ServiceUnavailable(f"Another replica's computation failed: {e}", retry_after=5.0) from e
        answer = {**response, "request_id": uuid.uuid4().hex, "latency_ms": _ms(self._clock.now() - started)}
        return cast(BriefAnswer, answer)

    def _refusal(self, e: Overloaded, mode: str) -> ServiceUnavailable:
        """The 503 for a request refused for load (counted here), with what to do about it."""
        self.stats.rejected["queue_full" if e.reason == "queue_full" else e.reason] += 1
        if e.reason == "cpu_budget":
            return ServiceUnavailable(
                "Service busy - the models are saturated and the server's own work is over its "
                "CPU budget (dimmer.cpu_budget)",
                retry_after=e.retry_after,
            )
        if e.reason in ("deadline", "queue_timeout"):
            # Refused at once: the estimate of when the backlog drains is the useful Retry-After.
            return ServiceUnavailable(
                f"Service busy - this request could not start within its "
                f"{self.config.dimmer.target(mode):g}s latency target",
                retry_after=max(1.0, e.retry_after),
            )
        return ServiceUnavailable(
            "Service busy - queue full", retry_after=max(e.retry_after, self.config.queue.retry_after)
        )

    def share(
        self,
        cache: SharedCache | None,
        flights: RedisSingleflight[dict[str, Any]] | None,
    ) -> None:
        """Share answers and computations with other replicas through Redis.

        ``cache`` (a :class:`~brownout.state.redis.SharedCache` whose local front is :attr:`cache`)
        is asked after a local miss and given every full-quality answer; ``flights`` coalesces the
        computations of one key across replicas. Either may be None.
        """
        self.shared_cache = cache
        self._shared_flights = flights

    def _admit(self, mode: str) -> _Admitted:
        """Decide on arrival what a ``mode`` request leaves out and its time budget; raise
        ``Overloaded`` when it is refused at once (the CPU budget, or a generator call that could not
        start in time). Nothing here waits."""
        target = self.config.dimmer.target(mode)
        queued_at = self._clock.now()
        # What this request leaves out is decided on arrival: one that needs no model call queues
        # nowhere (it would only wait behind model work it does not need).
        decision = self.dimmer.decide()
        if decision.dims("generation") and self._generator_idle():
            # A free slot of the generator's server left idle helps nobody's latency: this request
            # would start at once. The dimmer decides who does without the generator when callers
            # would wait, never that a slot stays empty (under 200 clients, slots were left empty a
            # third of the time). The optional stages before generation stay as decided.
            decision = decision.keeping("generation")
        shed = self.config.dimmer.shed_late
        # One budget for the whole request (module docstring): it must start its generator call by
        # t0 + T - S, and every model call may wait for a slot only while it can still finish by t0 + T.
        usable = max(0.0, target - ANSWER_RESERVE)
        plan = Budget(finish_by=queued_at + usable if shed else None)
        start_budget = max(0.0, usable - self.generator_service(PLAN_QUANTILE)) if shed else None
        if self.cpu_budget is not None and (decision.dims("model") or self._no_room(start_budget)):
            # This one will be answered without the model whatever happens next: refused first when
            # the CPU budget says so (before the similar-brief search, the costly part). One the
            # generator could still take in time is never refused here.
            self._within_cpu_budget()
        if not decision.dims("generation"):
            # Bound for the admission queue: refused now if it could not start in time.
            self.admission.check(start_budget)
        return _Admitted(target, queued_at, decision, plan, start_budget)

    async def _compute(
        self, key: str, text: str, mode: str, admitted: _Admitted | None = None
    ) -> dict[str, Any]:
        # Admitted by the caller that started this computation, in the same moment; here when it had
        # not been (a flight that had just finished when the caller looked, or a direct call), or
        # when its admission is stale: a computation taken over from another replica that died
        # holding it starts only when that replica's lock expires, and its budget starts then.
        if admitted is None or self._clock.now() - admitted.queued_at > _ADMISSION_FRESH:
            admitted = self._admit(mode)
        target, queued_at, decision, plan, start_budget = admitted
        if decision.dims("generation"):
            ctx = self._load_context(text, mode)
            if decision.dims("model") or self._search_similar(ctx) is not None:
                return await self._load_fallback(ctx, decision, mode)
        began: list[float] = []
        try:
            response: dict[str, Any] = await self.admission.call_within(
                start_budget, self._run, text, mode, began, decision, plan
            )
        except Overloaded as e:
            if e.reason != "queue_timeout":
                raise
            # Admitted on an estimate that proved hopeful: it waited to its deadline to start and no
            # pipeline came. It has waited already; a 503 now would have it wait again for nothing,
            # while what is left of its target is ample for an answer without the generator.
            self._within_cpu_budget()
            return await self._load_fallback(self._load_context(text, mode), decision, mode)
        finally:
            if began:  # it ran (refused requests never started and have no latency to report)
                latency = self._clock.now() - queued_at
                waited = began[0] - queued_at + plan.queued
                self.dimmer.observe(latency, target=target, waited=min(latency, max(0.0, waited)))
        if not response["degraded"] and self.config.cache.enabled:
            # The cached copy says when it was made, so that a later hit can tell its age.
            stored = {**response, "cached_at": _stamp(self.wall_clock.now())}
            if self.shared_cache is not None:
                await self.shared_cache.set(key, stored)  # and the local front
            else:
                self.cache.set(key, stored)
        return response

    @staticmethod
    def _load_context(text: str, mode: str) -> BriefContext:
        """A request's context whose generation is left out for load (not for a fault)."""
        ctx = BriefContext(text=text, requested_mode=mode)
        ctx.budget.overloaded.add(ROLE_OF_STAGE["generate"])
        return ctx

    async def _load_fallback(self, ctx: BriefContext, decision: DimmerDecision, mode: str) -> dict[str, Any]:
        """The answer for load without the generator -- a similar earlier brief, else the rules --
        saying what was left out: what ``decision`` dims for ``mode``, and the generation."""
        dimmed, _ = self._dimmed_for(decision, mode)
        served = await self._serve_fallback(ctx, "fallback", "load", self._late_chain)
        return self._mark_dimmed(served, [*dimmed, "generation"])

    def _generator_idle(self) -> bool:
        """True when the generator has a free slot right now (its call would not wait) and the
        dimmer's value is its controller's, not pinned by an operator (a pin is obeyed as it is)."""
        gen = self._generator()
        return not self.dimmer.forced and gen is not None and gen.available and gen.estimated_wait() == 0.0

    def _no_room(self, start_budget: float | None) -> bool:
        """True when a generator call made now could not start within ``start_budget`` seconds: it
        would be refused for load and the answer come without the model."""
        gen = self._generator()
        return start_budget is not None and gen is not None and gen.estimated_wait() > start_budget

    def _within_cpu_budget(self) -> None:
        """Before answering without the model because it is saturated: raise ``Overloaded``
        (reason ``cpu_budget``) for the share of such requests :attr:`cpu_budget` refuses now.

        Our own work for answers that come at once is taken from the cores the local model runs on,
        and a caller answered at once comes straight back for another; a refusal with a Retry-After
        makes a polite one wait instead."""
        if self.cpu_budget is not None and self.cpu_budget.refuse():
            raise Overloaded(
                "briefs",
                "cpu_budget",
                # Its caller competes for the same pipelines as those the admission refuses: it
                # takes its place in the same line of returning callers.
                retry_after=self.admission.place_in_line(max(1.0, self.queue_delay())),
                queue_size=self.admission.queue_size,
                in_flight=self.admission.in_flight,
            )

    def _dimmed_for(self, decision: DimmerDecision, mode: str) -> tuple[list[str], str | None]:
        """What ``decision`` leaves out of a ``mode`` request, and the richest mode that leaves."""
        rank = _MODE_RANK[mode]
        dimmed: list[str] = []
        ceiling: str | None = None
        if decision.dims("creative_hints") and rank >= _MODE_RANK["creative"]:
            dimmed.append("creative_hints")
            ceiling = "balanced"
        if decision.dims("validation") and rank >= _MODE_RANK["balanced"]:
            dimmed.append("validation")
            ceiling = "fast"
        return dimmed, ceiling

    async def _run(
        self,
        text: str,
        mode: str,
        began: list[float] | None = None,
        decision: DimmerDecision | None = None,
        plan: Budget | None = None,
    ) -> dict[str, Any]:
        if began is not None:
            began.append(self._clock.now())
        if decision is None:
            decision = self.dimmer.decide()
        plan = plan if plan is not None else Budget()
        dimmed, ceiling = self._dimmed_for(decision, mode)
        response = await self._run_pipeline(text, mode, ceiling, plan)
        if ROLE_OF_STAGE["generate"] in plan.cut and response["stages"][0]["served_by"].startswith("model:"):
            dimmed = sorted([*dimmed, "description_tail"], key=DIMMED_FEATURES.index)
        for stage in response["stages"]:
            # A stage served without its model because the model was busy (not down): the load left
            # it out, and the answer says so like any other dimmed step.
            feature = _FEATURE_OF_STAGE.get(stage["stage"])
            role = ROLE_OF_STAGE.get(stage["stage"])
            if (
                feature is not None
                and role in plan.overloaded
                and not stage["served_by"].startswith("model:")
                and feature not in dimmed
            ):
                dimmed = sorted([*dimmed, feature], key=DIMMED_FEATURES.index)
        return self._mark_dimmed(response, dimmed) if dimmed else response

    def _mark_dimmed(self, response: dict[str, Any], dimmed: list[str]) -> dict[str, Any]:
        """Say in the answer what the load left out (and count it for the metrics)."""
        if not dimmed:
            return response
        for step in dimmed:
            self.stats.dimmed[step] += 1
        return {
            **response,
            "dimmed": dimmed,
            "reason": "load" if response["reason"] in (None, "load") else response["reason"],
        }

    async def _run_pipeline(
        self, text: str, mode: str, ceiling: str | None, plan: Budget | None = None
    ) -> dict[str, Any]:
        ctx = BriefContext(text=text, requested_mode=mode, budget=plan if plan is not None else Budget())
        try:
            async with deadline(self.config.server.request_timeout, clock=self._clock):
                try:
                    result = await self.pipeline.run(mode, ctx, ceiling=ceiling)
                except NoModeAvailable as e:
                    return await self._without_generator(ctx, e)
                except AllFallbacksFailed as e:
                    raise ServiceUnavailable(
                        "No brief could be produced: every strategy failed",
                        retry_after=e.retry_after,
                        policy="fallback",
                    ) from e
        except DeadlineExceeded as e:
            # A hung model outlasted the request's deadline, which cancelled the pipeline mid-stage.
            # The answers that need no model call are still instant: serve one, not an error.
            return await self._serve_fallback(
                ctx, "fallback", f"request deadline of {e.timeout:g}s passed", self._late_chain
            )
        brief: CreativeBrief = ctx.values["generate"]
        validation: ValidationReport | None = ctx.values.get("validate")
        if validation is not None and validation.has_critical_errors and validation.source == "rules":
            # Without the validator model, critical rule errors reject the model's brief: serve the
            # rule-based one instead.
            brief = rule_based_brief(text, mode)
            ctx.reliability = "low"
        hints: list[str] | None = ctx.values.get("hint")
        if hints:
            brief = brief.model_copy(update={"creative_hints": hints[:5]})
        served = result.served_mode
        # llm_json_fallback_used_total: stages a fallback served because the guard gave up.
        self.stats.fallback_used += sum(
            1
            for s in result.stages
            if not s.served_by.startswith("model:") and any("GuardFailed" in c for c in s.causes)
        )
        if result.selection.downshifted:
            self.stats.downshifts[(mode, served)] += 1
        warnings = list(result.warnings)
        if validation is not None and validation.source == "model":
            # What the validator model said reaches the answer's warnings, and a rejection or an IFRA
            # concern lowers the reliability: a brief the validator objected to is served (it passed
            # the schema's checks), but never as if it had passed (README: "What an answer says").
            warnings += [f"Validator: {item}" for item in [*validation.errors, *validation.warnings]]
            if (not validation.valid or validation.ifra_compliance is False) and ctx.reliability == "high":
                ctx.reliability = "medium"
        generated_by = result.stages[0].served_by
        cut = generated_by.startswith("model:") and ROLE_OF_STAGE["generate"] in ctx.budget.cut
        if cut:
            role = ROLE_OF_STAGE["generate"]
            stopped = (
                f"the request's {self.config.dimmer.target(ctx.requested_mode):g}s latency target"
                if role in ctx.budget.cut_at_target
                else f"its {self.config.models.roles[role].timeout:g}s time limit"
            )
            warnings.append(
                f"Description cut short: the generator was busy and its answer was stopped at {stopped}"
            )
        if generated_by.startswith("model:") and ctx.reliability == "high" and not cut:
            self.similar.add(text, brief)  # whole answers only: a cut one is no model for others
        if ctx.reliability == "high" and result.degraded:
            ctx.reliability = "medium"
        self.stats.served[served] += 1
        return {
            "brief": brief.model_dump(mode="json"),
            "requested_mode": mode,
            "served_mode": served,
            "downshifted": result.selection.downshifted,
            "reason": result.selection.reason or None,
            "impact": mode_impact(mode, served) if result.selection.downshifted else {},
            "warnings": list(dict.fromkeys(warnings)),
            "stages": [
                {"stage": s.stage, "served_by": s.served_by, "latency_ms": s.latency_ms}
                for s in result.stages
            ],
            "validation": validation.model_dump(mode="json") if validation is not None else None,
            "reliability": ctx.reliability,
            # A cut answer is degraded: not cached, so the next request for it may get it whole.
            "degraded": result.degraded or ctx.reliability != "high" or cut,
            "cached": False,
            "cached_at": None,
            "cache_age_seconds": None,
        }

    async def _without_generator(self, ctx: BriefContext, e: NoModeAvailable) -> dict[str, Any]:
        """Serve a request while the generator is unavailable: fallback, or emergency when all are down."""
        # Emergency is every model *down*, not switched off: a system mode that switched the other
        # roles off because the generator failed must not turn a generator outage into "all down"
        # (that would serve the generic popular brief instead of one built from the customer's text).
        emergency = all(not self.role_healthy(r) for r in self.backends)
        if emergency:
            return await self._serve_fallback(ctx, "emergency", e.selection.reason, self._emergency_chain)
        return await self._serve_fallback(ctx, "fallback", e.selection.reason, self._generate_chain)

    async def _serve_fallback(
        self, ctx: BriefContext, served: str, reason: str, chain: FallbackChain[CreativeBrief]
    ) -> dict[str, Any]:
        """Serve ``ctx`` from ``chain`` alone (no pipeline stages) as mode ``served``, for ``reason``."""
        emergency = served == "emergency"
        self.stats.downshifts[(ctx.requested_mode, served)] += 1
        started = self._clock.now()
        try:
            # Traced as the one stage it is (generate), served by the chain's first strategy that can.
            with telemetry.span(
                "stage generate",
                attributes={
                    "brownout.stage": "generate",
                    "brownout.role": "qwen",
                    "brownout.chain": chain.name,
                },
            ) as span:
                result: FallbackResult[CreativeBrief] = await chain.run(ctx)
                if span is not None:
                    span.set_attribute("brownout.served_by", result.served_by)
        except AllFallbacksFailed as err:
            raise ServiceUnavailable(
                "Service temporarily unavailable: the models are down and nothing is cached. "
                "Please try again later.",
                retry_after=300.0 if emergency else err.retry_after,
                policy=served,
            ) from err
        brief = result.value
        validation = rule_based_validation(brief)
        warnings = [f"Downshifted from {ctx.requested_mode} to {served}: {reason}", *result.warnings]
        self.stats.served[served] += 1
        return {
            "brief": brief.model_dump(mode="json"),
            "requested_mode": ctx.requested_mode,
            "served_mode": served,
            "downshifted": True,
            "reason": reason,
            "impact": mode_impact(ctx.requested_mode, served),
            "warnings": list(dict.fromkeys(warnings + validation.warnings)),
            "stages": [
                {
                    "stage": "generate",
                    "served_by": result.served_by,
                    "latency_ms": _ms(self._clock.now() - started),
                }
            ],
            "validation": validation.model_dump(mode="json"),
            "reliability": "low" if result.served_by in ("rules", "popular") else "medium",
            "degraded": True,
            "cached": False,
            "cached_at": None,
            "cache_age_seconds": None,
            **({"freshness": ctx.freshness} if ctx.freshness is not None else {}),
        }

    # ------------------------------------------------------------------ stages (model-backed)

    def _ask(
        self,
        role: str,
        ctx: BriefContext | None = None,
        *,
        timeout: float | None = None,
        temperature: float | None = None,
        salvage: Callable[[str], str | None] | None = None,
    ) -> Callable[[list[Message], int, dict[str, Any] | None], Awaitable[str]]:
        backend = self.backends[role]
        section = self.config.models.roles[role]
        plan = ctx.budget if ctx is not None else None

        async def ask(
            messages: list[Message], max_tokens: int, response_format: dict[str, Any] | None
        ) -> str:
            self.stats.requests[role] += 1
            temp = section.temperature if temperature is None else temperature
            limit = self.generation_limit
            if limit is not None:
                max_tokens, temp = min(max_tokens, limit[0]), min(temp, limit[1])
            asked = self._clock.now()
            queue_timeout: float | None = None
            finish_by = plan.finish_by if plan is not None else None
            if finish_by is not None:
                # Wait for a slot only while this call can still finish by the request's target, and
                # end it there: an answer late for its target is cut (kept as far as it was written,
                # see _salvage_brief) rather than served late.
                queue_timeout = max(0.0, finish_by - asked - self._planned(role))
            try:
                result = await backend.chat(
                    messages,
                    max_tokens=max_tokens,
                    temperature=temp,
                    response_format=response_format,
                    timeout=timeout or section.timeout,
                    queue_timeout=queue_timeout,
                    salvage=salvage,
                    finish_by=finish_by,
                )
            except Overloaded as e:
                # Refused for load, or slow under load: the model is busy, not failing.
                if plan is not None:
                    plan.overloaded.add(role)
                    if e.reason != "slow":
                        # Refused before it was sent: all of it was waiting. A slow call's time was
                        # mostly the model's, and reaches the dimmer as service time (latency).
                        plan.queued += self._clock.now() - asked
                raise
            except BaseException:
                self.stats.failures[role] += 1
                raise
            if plan is not None:
                # What the call spent before it was sent: its wait for a slot of the server.
                plan.queued += max(0.0, self._clock.now() - asked - float(result.latency))
                if result.finish_reason == CUT_SHORT:
                    plan.cut.add(role)
                    if float(result.latency) < (timeout or section.timeout):
                        plan.cut_at_target.add(role)
            content: str = result.content
            return content

        return ask

    async def _generate(self, ctx: BriefContext) -> CreativeBrief:
        section = self.config.models.roles["qwen"]
        result = await self.guard_brief.run(
            self._ask("qwen", ctx, salvage=self._salvage_brief),
            generator_messages(ctx.text, ctx.requested_mode, constrained=self.constrained.get("qwen", True)),
            max_tokens=section.max_tokens,
            constrained=self.constrained.get("qwen", True),
        )
        brief: CreativeBrief = result.value.to_domain()
        if "qwen" in ctx.budget.cut:
            brief = brief.model_copy(update={"description": _end_cut_description(brief.description)})
        return brief

    def _salvage_brief(self, written: str) -> str | None:
        """What to keep of a generator answer cut short at its time limit on a busy server, or at its
        request's target.

        The brief's fields come in the schema's order with the free-text description last, so a long
        answer is usually cut inside its description: every field the brief needs is settled. Such an
        answer is kept -- its JSON closed where it stopped -- rather than thrown away for a similar
        brief or the rules after the model spent its whole time limit on it, when it still makes a
        valid brief whose description keeps at least a few words. The answer says ``dimmed:
        ["description_tail"]``, its description ends with an ellipsis, and it is not cached.
        """
        kept = self.guard_brief.complete_cut(written)
        if kept is None or len(kept[1].description.split()) < _MIN_CUT_WORDS:
            return None
        return kept[0]

    async def _generate_reduced(self, ctx: BriefContext) -> CreativeBrief:
        # The generator's second chance: max_tokens 256, a longer timeout, temperature 0.5. A fixed
        # recipe would raise 10 s to 30 s; keep that ratio to the configured timeout rather than a fixed
        # 30 s, which would let a hung generator hold a request 30x longer than the operator allowed a call.
        if any("qwen" in roles for roles in self.switched_off.values()):
            raise Decline("the generator is switched off")
        if "qwen" in ctx.budget.overloaded:
            # The generator is busy, not failing: another, longer call would only add to its load.
            raise Decline("the generator is busy (load)")
        section = self.config.models.roles["qwen"]
        result = await self.guard_brief.run(
            self._ask("qwen", ctx, timeout=3 * section.timeout, temperature=0.5),
            generator_messages(
                ctx.text, ctx.requested_mode, reduced=True, constrained=self.constrained.get("qwen", True)
            ),
            max_tokens=256,
            constrained=self.constrained.get("qwen", True),
        )
        brief: CreativeBrief = result.value.to_domain()
        return brief

    async def _validate(self, ctx: BriefContext) -> ValidationReport:
        brief: CreativeBrief = ctx.values["generate"]
        result = await self.guard_verdict.run(
            self._ask("mistral", ctx),
            validator_messages(brief, constrained=self.constrained.get("mistral", True)),
            max_tokens=256,
            constrained=self.constrained.get("mistral", True),
        )
        report: ValidationReport = result.value.to_report()
        # The report keeps the model's verdict as given (a rejection stays "valid": false with its
        # errors); _run turns it into the answer's warnings and reliability.
        return report.model_copy(
            update={
                "errors": list(dict.fromkeys(report.errors)),
                "warnings": list(dict.fromkeys(report.warnings)),
            }
        )

    async def _hint(self, ctx: BriefContext) -> list[str]:
        brief: CreativeBrief = ctx.values["generate"]
        result = await self.guard_hints.run(
            self._ask("llama", ctx),
            hinter_messages(brief, constrained=self.constrained.get("llama", True)),
            max_tokens=256,
            constrained=self.constrained.get("llama", True),
        )
        return list(result.value.hints)

    # ------------------------------------------------------------------ fallbacks

    def _search_similar(self, ctx: BriefContext) -> tuple[CreativeBrief, float] | None:
        """The similar earlier brief for the request's text and its score, searched once per request
        (the dimmer's check and the fallback chain that serves it ask the same question)."""
        if not ctx.similar_searched:
            ctx.similar = self.similar.search(ctx.text)
            ctx.similar_searched = True
        return ctx.similar

    async def _similar_brief(self, ctx: BriefContext) -> Degraded[CreativeBrief]:
        found = self._search_similar(ctx)
        if found is None:
            raise Decline("no similar earlier request")
        brief, score = found
        return Degraded(brief, (f"Served the brief of a similar earlier request (similarity {score:.2f})",))

    async def _rules_brief(self, ctx: BriefContext) -> Degraded[CreativeBrief]:
        ctx.reliability = "low"
        # Say why: a generator that was only busy did not fail, and a user reading "model failure"
        # under load would look for a fault that is not there.
        why = (
            "the generator being busy"
            if ROLE_OF_STAGE["generate"] in ctx.budget.overloaded
            else "model failure"
        )
        return Degraded(
            rule_based_brief(ctx.text, ctx.requested_mode),
            (f"Generated from fallback due to {why} (rule-based, reliability low)",),
        )

    async def _exact_brief(self, ctx: BriefContext) -> Degraded[CreativeBrief]:
        cached = self.cache.peek(self.cache_key(ctx.text, ctx.requested_mode))
        if cached is not None:
            return Degraded(
                CreativeBrief.model_validate(cached["brief"]), ("Served from cache (models unavailable)",)
            )
        found = self._search_similar(ctx)
        if found is not None and found[1] >= 0.999:
            return Degraded(found[0], ("Served from cache (models unavailable)",))
        raise Decline("not cached")

    def read_stored_answers(self, tiers: Sequence[Tier[dict[str, Any]]]) -> None:
        """Let emergency mode answer from earlier full answers to the same request.

        ``tiers`` read a response by cache key -- typically Redis (real-time), then the database
        (stale); the reader adds the last value held in process (very stale). When all miss, the
        popular-brief template answers (low confidence). Each answer is labelled with its source,
        freshness and fallback reason.
        """
        self._stored = TieredReader(
            "briefs.stored", tiers, default=None, clock=self._clock, events=self._events
        )

    async def _stored_brief(self, ctx: BriefContext) -> Degraded[CreativeBrief]:
        reader = self._stored
        if reader is None:
            raise Decline("no stored answers configured")
        try:
            got = await reader.read(self.cache_key(ctx.text, ctx.requested_mode))
        except AllFallbacksFailed as e:
            raise Decline(f"not stored: {e}") from e
        ctx.freshness = {
            "source": got.source,
            "freshness": got.freshness,
            "fallback_reason": got.fallback_reason,
            "confidence": got.confidence,
        }
        return Degraded(
            CreativeBrief.model_validate(got.value["brief"]),
            (f"Served the last full answer from {got.source} ({got.freshness}; models unavailable)",),
        )

    async def _popular_brief(self, ctx: BriefContext) -> Degraded[CreativeBrief]:
        if self._stored is not None and ctx.freshness is None:
            ctx.freshness = {
                "source": "default",
                "freshness": "default",
                "fallback_reason": "no stored answer to this request in any tier",
                "confidence": "low",
            }
        return Degraded(
            popular_brief(ctx.requested_mode), ("Using popular brief template (models unavailable)",)
        )

    async def _validate_rules(self, ctx: BriefContext) -> Degraded[ValidationReport]:
        report = rule_based_validation(ctx.values["generate"])
        return Degraded(
            report, ("Validated with rule-based fallback (Mistral unavailable)", *report.warnings)
        )

    async def _template_hints(self, ctx: BriefContext) -> Degraded[list[str]]:
        brief: CreativeBrief = ctx.values["generate"]
        return Degraded(template_hints(brief.style), ("Template hints used (Llama unavailable)",))

    # ------------------------------------------------------------------ lifecycle

    @property
    def started(self) -> bool:
        """True from :meth:`start` to :meth:`aclose`: the server answers briefs only then (before, it
        says it is starting up)."""
        return self._started

    def start(self) -> None:
        """Start background work (the cache sweeper)."""
        self.cache.start()
        self._started = True

    async def aclose(self) -> None:
        """Stop background work."""
        self._started = False
        await self.cache.aclose()


def _end_cut_description(text: str) -> str:
    """A description the time limit cut off: ended at its last whole word, with an ellipsis (one that
    stopped after a full sentence is left as it is)."""
    text = text.rstrip()
    if text.endswith((".", "!", "?", "…")):
        return text
    space = text.rfind(" ")
    if space > 0:
        text = text[:space].rstrip(" ,;:-(")  # the last word may be half-written
    return text if text.endswith((".", "!", "?")) else text + "…"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
