"""The 16 provider-fault scenarios of the gateway (the public fail-over catalogue), as data and plays.

Each scenario is a model group ``chat-<name>`` whose one endpoint (``primary``) is a
:class:`~brownout.chaos.failover.upstream.FaultUpstream` with the scenario's fault, falling back to
``backup-<name>``, a group whose one endpoint (``backup``) is a separate, healthy upstream -- unless
the scenario says otherwise. Everything else is brownout's default gateway settings. A play sends its
request(s) through the official ``openai`` client (streaming, ``max_retries=0`` so the SDK never
retries behind the gateway's back), records what the caller saw (:class:`~.grading.Exchange`), and
names the side criteria missed; :func:`~.grading.grade` gives the verdict.

=========================  ====================================================================
scenario                   the primary's fault; a pass needs, besides the complete answer
=========================  ====================================================================
rate-limit-retry-after     429 + ``Retry-After: 2`` once: served by the primary, retried >= 2 s
                           later, the backup never called
rate-limit-no-hint         429 without ``Retry-After``, always
server-error               500, always
unavailable                503 + ``Retry-After: 30`` (longer than worth waiting)
connection-reset           TCP reset after the request
silent-provider            accepts, never sends a byte (within the budget)
slow-first-token           the head at once, the first event after 30 s (within the budget)
stream-cut                 40 words, then the connection closes: the text stitched exactly
stream-stall               30 words, then silence with the connection open
stream-malformed           25 words, then an event that is not JSON: no parse error in the client
no-done                    the whole answer, no ``[DONE]``: the stream ends normally, backup unused
context-length             400 ``context_length_exceeded`` (4,096 declared; the backup 32,768):
                           served by the backup
content-filter             400 ``content_filter``: a clean 400 with the reason, the primary called
                           once, the backup never
prefill-rejected           60 words then a cut, and the backup refuses prefill: the caller never
                           sees that 400
flapping-primary           500 for 3 s, then healthy; requests for 15 s: every one complete, the
                           primary serving again within 5 s of healing
accounting                 500; the backup serves: model, usage, headers and metrics name it
=========================  ====================================================================
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from brownout.chaos.failover.grading import Exchange, Verdict, grade
from brownout.chaos.failover.upstream import ANSWER_WORDS, Fault, FaultUpstream, full_answer
from brownout.clock import Clock

if TYPE_CHECKING:
    import httpx
    from openai import AsyncOpenAI

__all__ = [
    "BUDGET",
    "CATALOGUE",
    "GatewayScenario",
    "Stage",
    "ask",
    "find",
]

BUDGET: Final = 100.0
"""Seconds a scenario's request may take, retries and fallbacks included (the catalogue's budget)."""

CONTENT_FILTER_REASON: Final = (
    "The response was filtered due to the prompt triggering content management policy."
)

_HEALTHY: Final = Fault()
_FLAP_SECONDS: Final = 3.0
_FLAP_RUN: Final = 15.0
_FLAP_PAUSE: Final = 0.25
_BACK_WITHIN: Final = 5.0


@dataclass(slots=True)
class Stage:
    """What a play works with: its scenario, its upstreams, the client, the gateway's HTTP."""

    scenario: GatewayScenario
    primary: FaultUpstream
    backup: FaultUpstream
    client: AsyncOpenAI
    http: httpx.AsyncClient
    """Plain HTTP to the gateway (``/metrics``)."""
    clock: Clock
    budget: float = BUDGET
    control: FaultUpstream | None = None
    """A healthy upstream of the scenario's control group, when it has one."""
    notes: list[str] = field(default_factory=list)
    """What the runner wants said about this scenario (e.g. a config key the gateway refused)."""

    def prompt(self, i: int = 0) -> str:
        """The user message of the scenario's ``i``-th request (each request its own answer)."""
        return f"Scenario {self.scenario.name}, request {i + 1}: answer in numbered words."


Play = Callable[[Stage], Awaitable[tuple[list[Exchange], list[str], str]]]
"""A play: makes the scenario's requests; returns their exchanges, the side criteria missed and the
complete answer."""


@dataclass(frozen=True, slots=True)
class GatewayScenario:
    """One provider-fault scenario (module docstring)."""

    name: str
    """The scenario's name in the catalogue (``brownout drill gateway-<name>``)."""
    title: str
    primary: Fault
    """The primary upstream's fault."""
    passes_when: str
    """What a pass needs besides the complete answer within the budget (the scorecard's words)."""
    play: Play
    backup: Fault = _HEALTHY
    backup_rejects_prefill: bool = False
    primary_context: int | None = None
    """``context_window`` declared for the primary group."""
    backup_context: int | None = None
    """``context_window`` declared for the backup group."""
    control: bool = False
    """The scenario also has a healthy control group ``control-<name>`` (no fallbacks)."""
    refusal: str | None = None
    """For a refusal that must reach the caller as a clean error: the reason it must carry."""

    @property
    def drill_name(self) -> str:
        """The scenario's name among the drills: ``gateway-<name>``."""
        return f"gateway-{self.name}"

    @property
    def group(self) -> str:
        """The group the client asks for."""
        return f"chat-{self.name}"

    @property
    def backup_group(self) -> str:
        """The fallback group."""
        return f"backup-{self.name}"

    @property
    def control_group(self) -> str:
        """The healthy control group (when :attr:`control`)."""
        return f"control-{self.name}"


# ---------------------------------------------------------------------- the client's side


async def ask(stage: Stage, model: str, prompt: str, *, include_usage: bool = False) -> tuple[Exchange, str]:
    """One streamed chat request through the gateway, as the caller saw it, and the complete answer.

    Bounded by the budget and a margin whatever the client's own timeouts do (they bound each read,
    so a trickle never trips them).
    """
    import openai

    messages: list[Any] = [{"role": "user", "content": prompt}]
    ex = Exchange()
    clock = stage.clock
    start = ex.started = clock.now()

    async def run() -> None:
        extra: dict[str, Any] = {}
        if include_usage:
            extra["stream_options"] = {"include_usage": True}
        raw = await stage.client.chat.completions.with_raw_response.create(
            model=model, messages=messages, stream=True, **extra
        )
        ex.headers = {k.lower(): v for k, v in raw.headers.items()}
        stream = raw.parse()
        async for chunk in stream:
            if chunk.model and chunk.model not in ex.models:
                ex.models.append(chunk.model)
            if chunk.usage is not None:
                ex.usage = chunk.usage.model_dump(exclude_none=True)
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    ex.text += choice.delta.content
                if choice.finish_reason:
                    ex.finish_reason = choice.finish_reason

    try:
        async with asyncio.timeout(stage.budget + 10.0):
            await run()
    except TimeoutError:
        ex.error = f"TimeoutError: no end of the stream within {stage.budget + 10.0:g} s"
        ex.timed_out = True
    except openai.APIResponseValidationError as e:
        ex.error, ex.parse_error = f"{type(e).__name__}: {e}", True
    except openai.APIError as e:
        ex.error, ex.clean_error = f"{type(e).__name__}: {e}", True
        ex.timed_out = isinstance(e, openai.APITimeoutError)
        if isinstance(e, openai.APIStatusError):
            ex.status = e.status_code
            ex.headers = {k.lower(): v for k, v in e.response.headers.items()}
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        # What the SDK raises when an event's data is not JSON (or not a chunk).
        ex.error, ex.parse_error = f"{type(e).__name__}: {e}", True
    except Exception as e:
        ex.error = f"{type(e).__name__}: {e}"
    ex.seconds = clock.now() - start
    return ex, full_answer(messages)


def _served_by(ex: Exchange, up: FaultUpstream) -> bool:
    return ex.models == [up.model]


def _who(ex: Exchange, stage: Stage) -> str:
    if not ex.models:
        return "nobody"
    names = {stage.primary.model: "the primary", stage.backup.model: "the backup"}
    return " then ".join(names.get(m, m) for m in ex.models)


# ---------------------------------------------------------------------- plays


async def _one(stage: Stage) -> tuple[list[Exchange], list[str], str]:
    ex, expected = await ask(stage, stage.scenario.group, stage.prompt())
    return [ex], [], expected


def _simple(misses: Callable[[Stage, Exchange], list[str]] | None = None) -> Play:
    """The play of a one-request scenario, with its side criteria (``misses``)."""

    async def play(stage: Stage) -> tuple[list[Exchange], list[str], str]:
        exchanges, missed, expected = await _one(stage)
        if misses is not None:
            missed.extend(misses(stage, exchanges[0]))
        return exchanges, missed, expected

    return play


def _retry_after_misses(stage: Stage, ex: Exchange) -> list[str]:
    out = []
    calls = stage.primary.calls
    if ex.answered and not _served_by(ex, stage.primary):
        out.append(f"served by {_who(ex, stage)}, not the primary after its Retry-After")
    if len(calls) >= 2:
        gap = calls[1].at - calls[0].at
        if gap < 2.0:
            out.append(f"the primary was retried after {gap:.2f} s, before its Retry-After of 2 s")
    else:
        out.append(f"the primary was called {len(calls)} time(s), never retried after its Retry-After")
    if stage.backup.calls:
        out.append(f"the backup was called {len(stage.backup.calls)} time(s)")
    return out


def _no_done_misses(stage: Stage, ex: Exchange) -> list[str]:
    out = []
    if stage.backup.calls:
        out.append(f"the backup was called {len(stage.backup.calls)} time(s) for a complete answer")
    if ex.answered and ex.finish_reason != "stop":
        out.append(f"the stream's finish_reason was {ex.finish_reason!r}, not 'stop'")
    return out


def _context_misses(stage: Stage, ex: Exchange) -> list[str]:
    if ex.answered and not _served_by(ex, stage.backup):
        return [f"served by {_who(ex, stage)}, not the larger-context backup"]
    return []


def _refusal_misses(stage: Stage, ex: Exchange) -> list[str]:
    out = []
    if len(stage.primary.calls) != 1:
        out.append(f"the primary was called {len(stage.primary.calls)} times, not once")
    if stage.backup.calls:
        out.append(f"the backup was called {len(stage.backup.calls)} time(s) after a content refusal")
    return out


async def _flapping(stage: Stage) -> tuple[list[Exchange], list[str], str]:
    """Sequential requests for 15 s while the primary fails its first 3 s."""
    clock = stage.clock
    exchanges: list[Exchange] = []
    expected: list[str] = []
    end = clock.now() + _FLAP_RUN
    while clock.now() < end:
        ex, full = await ask(stage, stage.scenario.group, stage.prompt(0))
        exchanges.append(ex)
        expected.append(full)
        await clock.sleep(_FLAP_PAUSE)
    misses = []
    healed = stage.primary.healed_at
    back = next(
        (
            ex
            for ex in exchanges
            if healed is not None and ex.started >= healed and _served_by(ex, stage.primary)
        ),
        None,
    )
    if healed is None:
        misses.append("the primary was never called")
    elif back is None:
        after = sum(1 for ex in exchanges if ex.started >= healed)
        misses.append(
            f"the healed primary served none of the {after} requests after it healed "
            f"({_FLAP_RUN - _FLAP_SECONDS:.0f} s)"
        )
    elif back.started - healed > _BACK_WITHIN:
        misses.append(
            f"the healed primary served again only {back.started - healed:.1f} s after healing "
            f"(goal {_BACK_WITHIN:g} s)"
        )
    return exchanges, misses, expected[0]


async def _accounting(stage: Stage) -> tuple[list[Exchange], list[str], str]:
    """The backup serves after the primary's 500: model, usage, headers and metrics must say so."""
    s = stage.scenario
    ex, expected = await ask(stage, s.group, stage.prompt(), include_usage=True)
    misses = []
    if ex.answered:
        if not _served_by(ex, stage.backup):
            misses.append(f"the chunks named {ex.models}, not the backup's model {stage.backup.model!r}")
        if ex.usage is None:
            misses.append("no usage although include_usage was asked")
        elif ex.usage.get("completion_tokens") != ANSWER_WORDS:
            misses.append(
                f"usage says {ex.usage.get('completion_tokens')} completion tokens; the backup sent "
                f"{ANSWER_WORDS}"
            )
    served_by = ex.headers.get("x-brownout-served-by")
    if served_by != f"{s.backup_group}/backup":
        misses.append(f"x-brownout-served-by is {served_by!r}, not '{s.backup_group}/backup'")
    path = ex.headers.get("x-brownout-fallbacks") or ""
    if s.group not in path or s.backup_group not in path:
        misses.append(f"x-brownout-fallbacks is {path!r}, not the path {s.group} > {s.backup_group}")
    failures = await _metric(
        stage, "gateway_upstream_failures_total", {"group": s.group, "endpoint": "primary"}
    )
    attempts = len(stage.primary.calls)
    if failures is None:
        misses.append("/metrics has no gateway_upstream_failures_total for the primary")
    elif failures != attempts:
        misses.append(f"/metrics counts {failures:g} failed primary attempt(s) of {attempts}")
    control, control_expected = await ask(stage, s.control_group, stage.prompt(1))
    if not (control.answered and control.text == control_expected):
        misses.append(f"the control request to a healthy group failed: {control.error}")
    elif "x-brownout-fallbacks" in control.headers:
        misses.append(
            "a request served by its own healthy group carries x-brownout-fallbacks: "
            f"{control.headers['x-brownout-fallbacks']!r}"
        )
    return [ex], misses, expected


async def _metric(stage: Stage, name: str, labels: dict[str, str]) -> float | None:
    """The value of the sample ``name`` with ``labels`` in the gateway's ``/metrics``, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await stage.http.get("/metrics")
    if response.status_code != 200:
        return None
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def run_play(stage: Stage) -> tuple[Verdict, list[Exchange]]:
    """Run ``stage``'s scenario and grade it."""
    s = stage.scenario
    exchanges, misses, expected = await s.play(stage)
    verdict = grade(exchanges, expected, stage.budget, misses, refusal=s.refusal)
    if stage.notes:
        verdict = Verdict(verdict.grade, f"{verdict.reason} ({'; '.join(stage.notes)})")
    return verdict, exchanges


# ---------------------------------------------------------------------- the catalogue

CATALOGUE: tuple[GatewayScenario, ...] = (
    GatewayScenario(
        "rate-limit-retry-after",
        "429 with Retry-After: 2, once",
        Fault(
            "status",
            status=429,
            error_type="rate_limit_error",
            code="rate_limit_exceeded",
            message="Rate limit reached; try again in 2s.",
            retry_after="2",
            times=1,
        ),
        "served by the primary, retried >= 2 s later on it; backup not called",
        _simple(_retry_after_misses),
    ),
    GatewayScenario(
        "rate-limit-no-hint",
        "429 without Retry-After, always",
        Fault(
            "status",
            status=429,
            error_type="rate_limit_error",
            code="rate_limit_exceeded",
            message="Rate limit reached.",
        ),
        "the complete answer (from the backup)",
        _simple(),
    ),
    GatewayScenario(
        "server-error",
        "500, always",
        Fault("status", status=500),
        "the complete answer (from the backup)",
        _simple(),
    ),
    GatewayScenario(
        "unavailable",
        "503 with Retry-After: 30 (longer than worth waiting)",
        Fault(
            "status",
            status=503,
            error_type="service_unavailable",
            retry_after="30",
            message="The engine is currently overloaded, please try again later.",
        ),
        "the complete answer (from the backup)",
        _simple(),
    ),
    GatewayScenario(
        "connection-reset",
        "TCP reset after reading the request",
        Fault("reset"),
        "the complete answer",
        _simple(),
    ),
    GatewayScenario(
        "silent-provider",
        "accepts the connection, never sends a byte",
        Fault("silent"),
        "the complete answer within the budget",
        _simple(),
    ),
    GatewayScenario(
        "slow-first-token",
        "response head at once, first event after 30 s",
        Fault("slow_first", first_delay=30.0),
        "the complete answer within the budget (whoever serves)",
        _simple(),
    ),
    GatewayScenario(
        "stream-cut",
        "40 words, then the connection closes",
        Fault("cut", words=40),
        "the text equals the full answer exactly (stitched from a continuation)",
        _simple(),
    ),
    GatewayScenario(
        "stream-stall",
        "30 words, then silence with the connection open",
        Fault("stall", words=30),
        "the complete answer",
        _simple(),
    ),
    GatewayScenario(
        "stream-malformed",
        "25 words, then an event that is not JSON",
        Fault("malformed", words=25),
        "no parse error in the client, the complete answer",
        _simple(),
    ),
    GatewayScenario(
        "no-done",
        "the whole answer, no data: [DONE]",
        Fault("no_done"),
        "the stream ends normally; backup not called",
        _simple(_no_done_misses),
    ),
    GatewayScenario(
        "context-length",
        "400 context_length_exceeded (4,096 declared; backup 32,768)",
        Fault(
            "status",
            status=400,
            error_type="invalid_request_error",
            code="context_length_exceeded",
            message="This model's maximum context length is 4096 tokens. However, your messages "
            "resulted in 5200 tokens. Please reduce the length of the messages.",
        ),
        "the complete answer from the larger-context backup",
        _simple(_context_misses),
        primary_context=4096,
        backup_context=32768,
    ),
    GatewayScenario(
        "content-filter",
        "400 content_filter (a content-policy refusal)",
        Fault(
            "status",
            status=400,
            error_type="invalid_request_error",
            code="content_filter",
            message=CONTENT_FILTER_REASON,
        ),
        "a clean 400 with the provider's reason; primary called once, backup never",
        _simple(_refusal_misses),
        refusal="content management policy",
    ),
    GatewayScenario(
        "prefill-rejected",
        "60 words then a cut; the backup refuses assistant prefill",
        Fault("cut", words=60),
        "the complete answer; the caller never sees the prefill refusal",
        _simple(),
        backup_rejects_prefill=True,
    ),
    GatewayScenario(
        "flapping-primary",
        "500 for 3 s, then healthy; requests for 15 s",
        Fault("status", status=500, for_seconds=_FLAP_SECONDS),
        "every request complete; the primary serves again within 5 s of healing",
        _flapping,
    ),
    GatewayScenario(
        "accounting",
        "500; the backup serves",
        Fault("status", status=500),
        "model, usage, x-brownout-served-by and -fallbacks name the backup; /metrics counts the "
        "primary's failure; no x-brownout-fallbacks on a healthy group's answer",
        _accounting,
        control=True,
    ),
)
"""The 16 scenarios, in the catalogue's order."""


def find(names: Sequence[str]) -> list[GatewayScenario]:
    """The scenarios named (``gateway`` or ``gateway-all`` for every one; ``gateway-<name>`` or the
    bare name for one), in catalogue order. Raises KeyError naming the unknown ones."""
    every = {s.name: s for s in CATALOGUE}
    wanted: set[str] = set()
    unknown = []
    for n in names:
        if n in ("gateway", "gateway-all"):
            wanted.update(every)
            continue
        bare = n.removeprefix("gateway-")
        if bare in every:
            wanted.add(bare)
        else:
            unknown.append(n)
    if unknown:
        known = ", ".join(s.drill_name for s in CATALOGUE)
        raise KeyError(f"unknown gateway scenario(s) {', '.join(unknown)}; known: gateway, {known}")
    return [s for s in CATALOGUE if s.name in wanted]
