"""The JSON hard guard: get a schema-valid JSON answer out of a model, or fail clearly.

One engine, two front ends. :class:`GuardEngine` is what every guarded exchange shares: reading an
answer as JSON (repairing it when allowed), validating it, and deciding whether, when and with which
conversation to ask the model again. A front end brings the schema's validator and the words of the
correction sent to the model:

* :class:`JSONGuard` (here) -- the brief pipeline's: answers validated as a pydantic model, re-asked
  up to ``max_retries`` times with backoff, :class:`~brownout.errors.GuardFailed` when none passed;
* :class:`brownout.gateway.guard.SchemaCheck` -- the gateway's: answers checked against the JSON
  schema a client sent, re-asked once, never repaired (the gateway passes answers on unchanged).

Re-parsing the *same* output on each "retry" would leave a bad answer bad however many times it was
looked at, so this guard asks the model again, and tells it what was wrong::

    guard = JSONGuard("brief", Brief)                     # Brief: a pydantic model
    result = await guard.run(client_ask, messages, max_tokens=512, constrained=endpoint.json_schema)
    brief = result.value                                   # a validated Brief

One run goes like this:

1. Ask the model, with ``response_format`` set to the model's JSON schema (``strict_schema`` and the
   caller says the backend honours it: llama.cpp turns it into a grammar).
2. Parse the answer with :func:`json.loads`; if that fails and ``repair`` is on, try ``json_repair``
   (trailing commas, single quotes, code fences, a missing closing brace). A repair that yields nothing
   (``""``, ``{}``, ``[]``: json_repair's answer to hopeless text) counts as a parse failure.
3. Validate with ``model.model_validate``. A grammar enforces the JSON *shape* but not every domain
   rule (the tiny model answers ``"intensity": 33`` for a 0..1 field), so this step fails often.
4. On a parse or validation failure, re-ask: the original messages, then the bad answer as an assistant
   message, then a user message naming the exact problem (field paths, the pydantic message, the value
   given and the allowed range or choices from the schema) and asking for corrected JSON only. Before
   re-ask ``n`` the guard waits ``min(backoff_max, backoff_base * 2**(n-1)) + uniform(0, jitter)``
   seconds on its clock (:func:`reask_wait`, which no retry count can overflow) -- unless that wait
   would reach the caller's deadline (:func:`brownout.policies.deadline.remaining`), in which case it
   stops (a wait of 0 s is no wait: the re-ask goes at once). Each re-ask may use ``extra_tokens``
   more tokens (capped at ``max_tokens_cap``), because a common failure is an answer cut off by
   ``max_tokens``.
5. After ``1 + max_retries`` failed attempts, raise :class:`~brownout.errors.GuardFailed` carrying the
   problem of every attempt. Serving a fallback (cache, rules, a template) is the caller's fallback
   chain's job; ``fallback_enabled`` is the switch it reads.

Steps 2 to 5 are the engine's (:meth:`GuardEngine.exchange`), but for what is :class:`JSONGuard`'s:
the ``response_format`` and the token growth, the words of the correction, and raising GuardFailed.

Errors raised by ``ask`` itself -- the model is down, a breaker is open, a deadline passed -- are not
guard failures: they propagate at once, unchanged, for the caller's fallback chain to handle.

Only the latest failed exchange is sent back to the model, not every earlier one: small models have
small context windows, and the latest answer is the one to correct.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from brownout.clock import SYSTEM_CLOCK, Clock
from brownout.errors import ConfigError, GuardFailed
from brownout.events import DEFAULT_BUS, EventBus, GuardGaveUp, GuardRetried
from brownout.llm.types import Message
from brownout.policies._base import PolicyConfig
from brownout.policies.deadline import remaining
from brownout.policies.retry import capped_exponential

_repair_loads: Callable[[str], Any] | None
try:  # json-repair comes with the "server" extra; the guard refuses repair=True without it.
    from json_repair import loads as _json_repair_loads

    _repair_loads = _json_repair_loads
except ImportError:  # pragma: no cover - depends on the installed extras
    _repair_loads = None

__all__ = [
    "Accepted",
    "Ask",
    "GuardConfig",
    "GuardEngine",
    "GuardResult",
    "GuardStats",
    "JSONGuard",
    "Mismatch",
    "Outcome",
    "Rejection",
    "close_cut_json",
    "reask_wait",
]

V = TypeVar("V")
A = TypeVar("A")
M = TypeVar("M", bound=BaseModel)

Ask = Callable[[list[Message], int, dict[str, Any] | None], Awaitable[str]]
"""What the guard calls to ask the model: ``(messages, max_tokens, response_format or None) -> content``.

A model client's chat method wrapped in a lambda fits. It raises for model failures (those propagate
through the guard untouched) and returns the raw text of the answer.
"""

# Bounds on what goes back to the model: its context window is small, and a re-ask prompt must not
# grow with the size of the garbage it is correcting.
_MAX_ECHO: Final = 4000  # characters of the bad answer echoed back as the assistant message
_MAX_ERRORS: Final = 5  # validation errors listed
_MAX_LINE: Final = 240  # characters per listed error
_MAX_INPUT: Final = 40  # characters of a rejected value's repr
_MAX_PROBLEM: Final = 1200  # characters of the whole problem description
_SCHEMA_NAME = re.compile(r"[^a-zA-Z0-9_-]")


class GuardConfig(PolicyConfig):
    """Config of a guard (:class:`JSONGuard`'s defaults, under the names of the ``json_guard`` section).

    ``strict_schema``, ``extra_tokens`` and ``max_tokens_cap`` are :class:`JSONGuard`'s; the rest is the
    engine's. ``fallback_enabled`` is read by the caller's fallback chain.
    """

    enabled: bool = Field(
        default=True, description="False: one attempt, no repair, no re-ask (GuardFailed on a bad answer)"
    )
    max_retries: int = Field(
        default=3, ge=0, description="re-asks after the first answer; attempts in all = 1 + max_retries"
    )
    backoff_base: float = Field(default=1.0, ge=0, description="seconds of wait before the first re-ask")
    backoff_max: float = Field(default=30.0, ge=0, description="cap on the exponential part of one wait")
    jitter: float = Field(default=0.5, ge=0, description="up to this many random seconds added to each wait")
    fallback_enabled: bool = Field(
        default=True, description="whether the caller's fallback chain may answer when the guard gives up"
    )
    strict_schema: bool = Field(
        default=True,
        description="ask for schema-constrained JSON (response_format json_schema) when supported",
    )
    extra_tokens: int = Field(default=128, ge=0, description="max_tokens added per re-ask")
    max_tokens_cap: int = Field(default=1024, ge=1, description="max_tokens never grows beyond this")
    repair: bool = Field(default=True, description="try json_repair on unparseable output before re-asking")


def reask_wait(config: GuardConfig, retry: int) -> float:
    """The wait before re-ask number ``retry`` (1-based) without its jitter, in seconds.

    ``min(backoff_max, backoff_base * 2 ** (retry - 1))``, computed by
    :func:`~brownout.policies.retry.capped_exponential` so that no retry count can overflow it. The
    guard adds ``uniform(0, jitter)`` to it; a caller budgeting time for the re-asks adds ``jitter``.
    """
    return capped_exponential(config.backoff_base, 2.0, retry - 1, config.backoff_max)


# ---------------------------------------------------------------------------------------- the engine


class Mismatch(Exception):
    """Raised by a front end's validator: the answer is JSON, but not what the schema asks for.

    ``problems`` says what is wrong, a line each, in words the model can act on.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Accepted(Generic[V]):
    """An answer that passed: its validated ``value``, and whether json_repair had to fix it first."""

    value: V
    repaired: bool


class Rejection:
    """Why one answer was rejected: not JSON (``detail`` says why) or JSON that broke the schema
    (``problems``, a line each). ``text`` is the answer itself."""

    __slots__ = ("_truncated", "detail", "problems", "text")

    def __init__(self, text: str, *, detail: str | None = None, problems: Sequence[str] = ()) -> None:
        self.text = text
        """The rejected answer, as the model sent it."""
        self.detail = detail
        """Why it could not be read as JSON (the parser's message); None when it was JSON."""
        self.problems = tuple(problems)
        """What breaks the schema, a line each (empty when it was not JSON)."""
        self._truncated: bool | None = None

    @property
    def parsed(self) -> bool:
        """True when the answer was JSON (it broke the schema), False when it could not be read."""
        return self.detail is None

    @property
    def truncated(self) -> bool:
        """True when the answer starts a JSON object or array and stops with it still open: cut off."""
        if self._truncated is None:  # a walk over the whole answer: done once, and only when asked
            self._truncated = _looks_truncated(self.text)
        return self._truncated

    @property
    def summary(self) -> str:
        """One line for errors and events: ``not JSON: ...``, ``truncated JSON: ...`` or ``schema: ...``."""
        if self.detail is not None:
            return f"{'truncated JSON' if self.truncated else 'not JSON'}: {self.detail}"
        return "schema: " + _clip("; ".join(self.problems), _MAX_PROBLEM)


@dataclass(frozen=True, slots=True)
class Outcome(Generic[A, V]):
    """How one guarded exchange ended.

    ``answer`` is the last answer the model gave and ``verdict`` the engine's judgement of it (an
    :class:`Accepted` when it passed); ``attempts`` counts answers, ``errors`` holds the problem of
    each rejected one, in order, and ``stopped`` why the engine gave up (``"attempts exhausted"`` or
    ``"deadline"``), or None when the last answer passed.
    """

    answer: A
    verdict: Accepted[V] | Rejection
    attempts: int
    errors: tuple[str, ...]
    stopped: Literal["attempts exhausted", "deadline"] | None


@dataclass(frozen=True, slots=True)
class GuardStats:
    """Counters of a guard since it was made (exported as the ``llm_json_*`` metrics).

    ``parse_failures`` counts answers that were not JSON even after repair, ``validation_failures``
    answers that were JSON but broke the schema, ``repairs`` answers json_repair turned into JSON,
    ``retries`` re-asks, ``successes`` and ``failures`` runs that ended with a valid answer and runs
    that gave up (:class:`JSONGuard` raises GuardFailed then). ``retry_counts`` maps re-asks per
    finished run to how many runs needed that many (a histogram).
    """

    parse_failures: int
    validation_failures: int
    repairs: int
    retries: int
    successes: int
    failures: int
    retry_counts: dict[int, int]


class GuardEngine(Generic[V]):
    """The guard's one engine: parse, repair, validate, and the re-ask decisions (module docstring).

    A front end subclasses it with :meth:`_validate` (the schema's check of a parsed answer) and
    :meth:`_words` (the correction the model is sent), and calls :meth:`check` on one answer or
    :meth:`exchange` for a whole exchange. ``events`` None: the engine emits no events.
    """

    __slots__ = (
        "_clock",
        "_events",
        "_random",
        "config",
        "failures",
        "name",
        "parse_failures",
        "repairs",
        "retries",
        "retry_counts",
        "successes",
        "validation_failures",
    )

    def __init__(
        self,
        name: str,
        config: GuardConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = DEFAULT_BUS,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        """Names this guard in errors and events."""
        self.config = config if config is not None else GuardConfig()
        """The validated config."""
        if self.config.repair and self.config.enabled and _repair_loads is None:  # pragma: no cover
            raise ConfigError("repair", "needs the json-repair package (pip install 'brownout[server]')")
        self._clock = clock
        self._events = events
        self._random: Callable[[], float] = rng.random if rng is not None else random.random
        self.parse_failures = 0
        """Answers that were not JSON even after repair."""
        self.validation_failures = 0
        """Answers that were JSON but did not validate."""
        self.repairs = 0
        """Answers that json_repair turned into JSON."""
        self.retries = 0
        """Re-asks made."""
        self.successes = 0
        """Runs that ended with a validated value."""
        self.failures = 0
        """Runs that gave up (GuardFailed, for :class:`JSONGuard`)."""
        self.retry_counts: Counter[int] = Counter()
        """Re-asks per finished run -> number of runs (the histogram behind llm_json_retry_count)."""

    @property
    def stats(self) -> GuardStats:
        """A snapshot of the counters."""
        return GuardStats(
            self.parse_failures,
            self.validation_failures,
            self.repairs,
            self.retries,
            self.successes,
            self.failures,
            dict(self.retry_counts),
        )

    def _validate(self, obj: Any) -> V:
        """The schema's check of a parsed answer: its value, or :class:`Mismatch` naming the problems."""
        raise NotImplementedError

    def _words(self, rejection: Rejection) -> str:
        """The user message that tells the model what was wrong with a rejected answer."""
        raise NotImplementedError

    def check(self, text: str) -> Accepted[V] | Rejection:
        """Read one answer as JSON (repairing it when the config allows) and validate it."""
        cfg = self.config
        repaired = False
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
            obj = _repair(text) if cfg.repair and cfg.enabled else None
            if obj is None:
                self.parse_failures += 1
                return Rejection(text, detail=_clip(str(exc) or type(exc).__name__, _MAX_LINE))
            self.repairs += 1
            repaired = True
        try:
            return Accepted(self._validate(obj), repaired)
        except Mismatch as exc:
            self.validation_failures += 1
            return Rejection(text, problems=exc.problems)

    def complete_cut(self, text: str) -> tuple[str, V] | None:
        """An answer cut short -- its stream given up at a time limit -- closed where it stopped
        (:func:`close_cut_json`) and validated: the closed JSON text and its value, or None when what
        was written does not make a valid answer. Never repaired further, never re-asked (the time
        is spent), and not counted in the guard's statistics (it is not the model's answer)."""
        closed = close_cut_json(text)
        if closed is None:
            return None
        try:
            return closed, self._validate(json.loads(closed))
        except (ValueError, RecursionError, Mismatch):
            return None

    def reask_messages(self, messages: Sequence[Message], rejection: Rejection) -> list[Message]:
        """The conversation of a re-ask: ``messages``, the bad answer (cut short), then what was wrong."""
        return [
            *messages,
            {"role": "assistant", "content": rejection.text[:_MAX_ECHO]},
            {"role": "user", "content": self._words(rejection)},
        ]

    async def exchange(
        self,
        ask: Callable[[list[Message], int], Awaitable[A]],
        messages: list[Message],
        judge: Callable[[A], Accepted[V] | Rejection],
        *,
        first: A | None = None,
    ) -> Outcome[A, V]:
        """Ask until ``judge`` accepts an answer or the config says stop; how it ended, never raising
        for a bad answer.

        ``ask(messages, attempt)`` asks the model (``attempt`` counts from 1) and raises for model
        failures, which propagate at once, unchanged; ``judge`` is :meth:`check` for a plain answer,
        or a front end's reading of a richer one. ``first`` is an answer already given, judged before
        anything is asked.
        """
        cfg = self.config
        max_attempts = 1 + cfg.max_retries if cfg.enabled else 1
        answer = first if first is not None else await ask(messages, 1)
        attempts = 1
        errors: list[str] = []
        events = self._events
        while True:
            verdict = judge(answer)
            if isinstance(verdict, Accepted):
                self.successes += 1
                self.retry_counts[attempts - 1] += 1
                return Outcome(answer, verdict, attempts, tuple(errors), None)
            errors.append(f"attempt {attempts}: {verdict.summary}")
            stopped: Literal["attempts exhausted", "deadline"] | None = None
            delay = 0.0
            if attempts >= max_attempts:
                stopped = "attempts exhausted"
            else:
                delay = self._backoff(attempts)
                left = remaining()
                # Waiting until (or past) the deadline cannot help: the re-ask would have no time to answer.
                if left is not None and delay >= left:
                    stopped = "deadline"
            if stopped is not None:
                self.failures += 1
                self.retry_counts[attempts - 1] += 1
                if events is not None and events.active:
                    events.emit(GuardGaveUp(self.name, self._clock.now(), attempts, verdict.summary))
                return Outcome(answer, verdict, attempts, tuple(errors), stopped)
            attempts += 1
            self.retries += 1
            if events is not None and events.active:
                events.emit(GuardRetried(self.name, self._clock.now(), attempts, verdict.summary))
            if delay > 0:  # no wait is no sleep: a clock that moves only when told would hold the re-ask
                await self._clock.sleep(delay)
            answer = await ask(self.reask_messages(messages, verdict), attempts)

    def _backoff(self, retry: int) -> float:
        """The wait before re-ask number ``retry`` (1-based): capped exponential plus random jitter."""
        cfg = self.config
        return reask_wait(cfg, retry) + cfg.jitter * self._random()


# ------------------------------------------------------------------------- the brief pipeline's front end


@dataclass(frozen=True, slots=True)
class GuardResult(Generic[M]):
    """A guarded answer: the validated ``value`` and how it was obtained.

    ``attempts`` counts model answers (1 when the first was good), ``repaired`` says json_repair fixed
    the accepted answer, ``constrained`` that the accepted answer was asked for with ``response_format``,
    and ``errors`` holds the problem of each failed attempt before it, in order.
    """

    value: M
    attempts: int
    repaired: bool
    constrained: bool
    errors: tuple[str, ...]


class JSONGuard(GuardEngine[M]):
    """Asks a model until it answers JSON that validates as ``model``; see the module docstring."""

    __slots__ = ("_response_format", "_schema", "model")

    def __init__(
        self,
        name: str,
        model: type[M],
        config: GuardConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        rng: random.Random | None = None,
    ) -> None:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError("model", f"must be a pydantic BaseModel subclass, got {model!r}")
        super().__init__(name, config, clock=clock, events=events, rng=rng)
        self.model = model
        """The pydantic model every accepted answer validates as."""
        # Building the JSON schema walks the whole model; do it once, not per run.
        self._schema: dict[str, Any] = model.model_json_schema()
        self._response_format: dict[str, Any] = {
            "type": "json_schema",
            "json_schema": {
                # OpenAI restricts the name to [a-zA-Z0-9_-]{1,64}.
                "name": _SCHEMA_NAME.sub("_", model.__name__)[:64] or "answer",
                "schema": self._schema,
                "strict": True,
            },
        }

    def response_format(self) -> dict[str, Any]:
        """The OpenAI-style ``response_format`` asking for JSON that matches ``model``'s schema.

        A fresh copy each call, so a caller may change it without affecting the guard.
        """
        return copy.deepcopy(self._response_format)

    async def run(
        self,
        ask: Ask,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        constrained: bool = True,
    ) -> GuardResult[M]:
        """Ask until the answer validates as ``model``; return it with how it was obtained.

        ``constrained`` says whether the backend honours ``response_format`` (an endpoint's
        ``json_schema`` flag). Raises :class:`~brownout.errors.GuardFailed` when no attempt produced a
        valid answer, and whatever ``ask`` raises, unchanged and at once.
        """
        if max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1, got {max_tokens!r}")
        cfg = self.config
        response_format = self._response_format if cfg.strict_schema and constrained else None

        async def asking(conversation: list[Message], attempt: int) -> str:
            # Each re-ask may use more tokens: a common failure is an answer cut off by max_tokens.
            extra = cfg.extra_tokens * (attempt - 1)
            return await ask(
                conversation, max(max_tokens, min(cfg.max_tokens_cap, max_tokens + extra)), response_format
            )

        outcome = await self.exchange(asking, messages, self.check)
        verdict = outcome.verdict
        if not isinstance(verdict, Accepted):
            exc = GuardFailed(self.name, outcome.errors, attempts=outcome.attempts)
            exc.add_note(f"brownout JSON guard {self.name!r} stopped: {outcome.stopped}")
            raise exc
        return GuardResult(
            verdict.value, outcome.attempts, verdict.repaired, response_format is not None, outcome.errors
        )

    def _validate(self, obj: Any) -> M:
        try:
            return self.model.model_validate(obj)
        except ValidationError as exc:
            lines = [_describe_error(self._schema, err) for err in exc.errors()[:_MAX_ERRORS]]
            more = exc.error_count() - len(lines)
            if more > 0:
                lines.append(f"... and {more} more problem(s)")
            raise Mismatch(lines) from None

    def _words(self, rejection: Rejection) -> str:
        if rejection.detail is not None:
            detail = rejection.detail
            keys = _top_level_keys(self._schema)
            shape = f"a JSON object with the keys {keys}" if keys else "a JSON value matching the schema"
            if rejection.truncated:
                return (
                    f"Your previous answer was cut off before the JSON was complete ({detail}). "
                    f"Reply with only {shape}, complete and with short string values, and no other text."
                )
            return (
                f"Your previous answer is not valid JSON ({detail}). "
                f"Reply with only {shape}, and no other text."
            )
        parts = [
            "Your previous answer does not match the required schema:",
            _clip("\n".join(f"- {line}" for line in rejection.problems), _MAX_PROBLEM),
        ]
        if rejection.truncated:
            parts.append("It was also cut off before the JSON was complete; keep string values short.")
        parts.append("Reply with only the corrected JSON object, and no other text.")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"JSONGuard({self.name!r}, {self.model.__name__}, max_retries={self.config.max_retries})"


MAX_REPAIR_CHARS = 16_384
"""Longest answer json_repair is asked to fix. Repair runs on the event loop and costs about 12 ms of
CPU per KB of garbage (66 KB: 0.8 s, seen in the loop-blocking drill); an answer that long is far past
any brief's ``max_tokens`` anyway, so it is re-asked instead."""


def _repair(text: str) -> Any:
    """json_repair's reading of ``text``, or None when it found nothing usable (or it is too long)."""
    if _repair_loads is None:  # pragma: no cover - depends on the installed extras
        return None
    if len(text) > MAX_REPAIR_CHARS:
        return None
    try:
        obj = _repair_loads(text)
    except Exception:  # json_repair is best effort; its failure is just "not JSON"
        return None
    # Hopeless text comes back as "" or {} (or []); a bare scalar pulled out of prose is no better.
    if isinstance(obj, dict | list) and obj:
        return obj
    return None


_WHITESPACE: Final = frozenset(" \t\r\n")
_SCALAR: Final = frozenset("+-0123456789.eEtrufalsn")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def close_cut_json(text: str) -> str | None:
    """A JSON object or array cut short (a stream given up on mid-answer), closed where it stopped.

    What was written is kept up to its last complete value; a string *value* it stopped inside ends
    there (less a half-written escape); a key, a number or a literal it stopped inside is dropped
    with what leads to it; then every bracket still open is closed. The result is always valid JSON:
    ``{"a": 1, "b": "hal`` gives ``{"a": 1, "b": "hal"}``, ``{"a": 1, "b`` gives ``{"a": 1}``. A
    complete document comes back as it was (whatever follows it dropped); None when ``text`` does
    not start with an object or array, or is not JSON before the point where it stops.
    """
    n = len(text)
    i = 0
    while i < n and text[i] in _WHITESPACE:
        i += 1
    if i >= n or text[i] not in "{[":
        return None
    stack: list[str] = []
    # The longest prefix known to close, and the brackets open at its end.
    good_end, good_stack = -1, ""
    state = "value"  # value | key | colon | after (a complete value inside a container)
    opened = False  # just after an opening bracket: a closing one may follow at once
    while i < n:  # ``break``: it stops here; ``return None``: it is malformed here
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
            continue
        end = -1  # set when a value ends at ``end``
        if state == "after":
            if ch == ",":
                state, opened = ("key" if stack[-1] == "{" else "value"), False
                i += 1
                continue
            if ch != ("}" if stack[-1] == "{" else "]"):
                return None
            stack.pop()
            end = i + 1
        elif state == "colon":
            if ch != ":":
                return None
            state = "value"
            i += 1
            continue
        elif opened and ch == ("}" if stack[-1] == "{" else "]"):
            stack.pop()  # an empty container
            end = i + 1
        elif ch in "{[" and state == "value":
            stack.append(ch)
            i += 1
            good_end, good_stack = i, "".join(stack)
            state, opened = ("key" if ch == "{" else "value"), True
            continue
        elif ch == '"':
            stop, complete = _string_end(text, i + 1)
            if not complete:
                if state == "key":
                    break
                # Stopped inside a string value: end it where it stopped.
                return text[:stop] + '"' + _closers("".join(stack))
            if state == "key":
                state, opened = "colon", False
                i = stop
                continue
            end = stop
        elif state == "value" and ch in _SCALAR:
            j = i
            while j < n and text[j] in _SCALAR:
                j += 1
            if j >= n:
                break  # stopped inside a number or literal: it may be longer than it looks
            try:
                json.loads(text[i:j])
            except ValueError:
                return None
            end = j
        else:
            return None
        # A value (or a container) ended at ``end``.
        if not stack:
            return text[:end]
        good_end, good_stack = end, "".join(stack)
        state, opened = "after", False
        i = end
    return _closed(text, good_end, good_stack)


def _closed(text: str, end: int, stack: str) -> str | None:
    return None if end < 0 else text[:end] + _closers(stack)


def _closers(stack: str) -> str:
    return "".join("}" if b == "{" else "]" for b in reversed(stack))


def _string_end(text: str, start: int) -> tuple[int, bool]:
    """Read a JSON string's body from ``start``: (index after its closing quote, True), or -- when
    the text stops inside it -- (where a cut may end it: before any half-written escape, False)."""
    n = len(text)
    j = start
    while j < n:
        ch = text[j]
        if ch == '"':
            return j + 1, True
        if ch != "\\":
            j += 1
            continue
        if j + 1 >= n:
            return j, False
        if text[j + 1] != "u":
            j += 2
            continue
        if j + 6 > n or not all(c in _HEX for c in text[j + 2 : j + 6]):
            return j, False
        code = int(text[j + 2 : j + 6], 16)
        if 0xD800 <= code < 0xDC00:
            # A high surrogate means nothing without the low one after it: cut before the pair.
            if j + 12 > n or text[j + 6 : j + 8] != "\\u" or not all(c in _HEX for c in text[j + 8 : j + 12]):
                return j, False
            j += 12
            continue
        j += 6
    return j, False


def _looks_truncated(text: str) -> bool:
    """True when ``text`` starts a JSON object or array and ends with a bracket or string still open."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return False
    depth = 0
    in_string = escaped = False
    for ch in stripped:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_string or depth > 0


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _top_level_keys(schema: dict[str, Any]) -> str:
    props = _resolve(schema, schema).get("properties")
    if not isinstance(props, dict) or not props:
        return ""
    return _clip(", ".join(json.dumps(k) for k in props), _MAX_LINE)


def _describe_error(schema: dict[str, Any], err: Any) -> str:
    """One pydantic error as ``path: message (got value); allowed: constraints``."""
    loc: tuple[int | str, ...] = tuple(err.get("loc", ()))
    path = _format_loc(loc)
    line = f"{path}: {err.get('msg', 'invalid')}"
    if err.get("type") != "missing" and "input" in err:
        line += f" (got {_clip(repr(err['input']), _MAX_INPUT)})"
    node = _field_schema(schema, loc)
    allowed = _allowed(node) if node is not None else ""
    if allowed:
        line += f"; allowed: {allowed}"
    return _clip(line, _MAX_LINE)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "(the whole answer)"
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _resolve(root: dict[str, Any], node: Any) -> dict[str, Any]:
    """Follow ``$ref`` s into ``$defs`` and unwrap ``Optional`` (anyOf with one non-null branch)."""
    for _ in range(32):  # bounded: a self-referencing schema must not loop forever
        if not isinstance(node, dict):
            return {}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node = root.get("$defs", {}).get(ref[len("#/$defs/") :], {})
            continue
        branches = node.get("anyOf") or node.get("oneOf")
        if isinstance(branches, list) and "type" not in node:
            useful = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            if len(useful) == 1:
                node = useful[0]
                continue
        return node
    return {}  # pragma: no cover - only a pathological schema gets here


def _field_schema(root: dict[str, Any], loc: tuple[int | str, ...]) -> dict[str, Any] | None:
    """The JSON schema of the value at ``loc``, or None when the path cannot be followed."""
    node = _resolve(root, root)
    for part in loc:
        if isinstance(part, str):
            props = node.get("properties")
            if not isinstance(props, dict) or part not in props:
                return None
            node = _resolve(root, props[part])
        else:
            prefix = node.get("prefixItems")
            if isinstance(prefix, list) and 0 <= part < len(prefix):
                node = _resolve(root, prefix[part])
            elif isinstance(node.get("items"), dict):
                node = _resolve(root, node["items"])
            else:
                return None
    return node


def _num(value: Any) -> str:
    return json.dumps(value)


def _allowed(node: dict[str, Any]) -> str:
    """The constraints of a schema node in words: type, range, choices, lengths."""
    if "enum" in node and isinstance(node["enum"], list):
        choices = ", ".join(json.dumps(v) for v in node["enum"][:12])
        return _clip(f"one of {choices}", _MAX_LINE // 2)
    if "const" in node:
        return f"exactly {json.dumps(node['const'])}"
    kind = node.get("type")
    words = [kind] if isinstance(kind, str) else []
    lo, hi = node.get("minimum"), node.get("maximum")
    xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if lo is not None and hi is not None:
        words.append(f"from {_num(lo)} to {_num(hi)}")
    else:
        bounds = [
            f"{op} {_num(v)}" for op, v in ((">=", lo), (">", xlo), ("<=", hi), ("<", xhi)) if v is not None
        ]
        if bounds:
            words.append(" and ".join(bounds))
    for low_key, high_key, unit in (
        ("minLength", "maxLength", "characters"),
        ("minItems", "maxItems", "items"),
    ):
        low, high = node.get(low_key), node.get(high_key)
        if low is not None and high is not None:
            words.append(f"of {low} to {high} {unit}")
        elif low is not None:
            words.append(f"of at least {low} {unit}")
        elif high is not None:
            words.append(f"of at most {high} {unit}")
    if isinstance(node.get("pattern"), str):
        words.append(f"matching {node['pattern']}")
    if kind == "object" and isinstance(node.get("required"), list) and node["required"]:
        words.append("with keys " + ", ".join(json.dumps(k) for k in node["required"]))
    return _clip(" ".join(words), _MAX_LINE // 2)
