"""The JSON hard guard: get a schema-valid JSON answer out of a model, or fail clearly.

Seed 004's guard re-parsed the *same* output on each "retry", so a bad answer stayed bad however many
times it was looked at. This guard asks the model again, and tells it what was wrong::

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
   stops. Each re-ask may use
   ``extra_tokens`` more tokens (capped at ``max_tokens_cap``), because a common failure is an answer
   cut off by ``max_tokens``.
5. After ``1 + max_retries`` failed attempts, raise :class:`~brownout.errors.GuardFailed` carrying the
   problem of every attempt. Serving a fallback (cache, rules, a template) is the caller's fallback
   chain's job; ``fallback_enabled`` is the switch it reads.

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
from typing import Any, Final, Generic, TypeVar

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

__all__ = ["Ask", "GuardConfig", "GuardResult", "GuardStats", "JSONGuard", "reask_wait"]

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
    """Config of a :class:`JSONGuard`; names and defaults follow seed 004's ``json_guard`` section."""

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


@dataclass(frozen=True, slots=True)
class GuardStats:
    """Counters of a :class:`JSONGuard` since it was made (the seed's ``llm_json_*`` metrics).

    ``parse_failures`` counts answers that were not JSON even after repair, ``validation_failures``
    answers that were JSON but broke the schema, ``repairs`` answers json_repair turned into JSON,
    ``retries`` re-asks, ``successes`` and ``failures`` runs that returned and raised GuardFailed.
    ``retry_counts`` maps re-asks per finished run to how many runs needed that many (a histogram).
    """

    parse_failures: int
    validation_failures: int
    repairs: int
    retries: int
    successes: int
    failures: int
    retry_counts: dict[int, int]


class _Bad:
    """Why one answer was rejected: ``summary`` for errors and events, ``problem`` for the model."""

    __slots__ = ("problem", "summary")

    def __init__(self, summary: str, problem: str) -> None:
        self.summary = summary
        self.problem = problem


class JSONGuard(Generic[M]):
    """Asks a model until it answers JSON that validates as ``model``; see the module docstring."""

    __slots__ = (
        "_clock",
        "_events",
        "_random",
        "_response_format",
        "_schema",
        "config",
        "failures",
        "model",
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
        model: type[M],
        config: GuardConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus = DEFAULT_BUS,
        rng: random.Random | None = None,
    ) -> None:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError("model", f"must be a pydantic BaseModel subclass, got {model!r}")
        self.name = name
        """Names this guard in errors and events."""
        self.model = model
        """The pydantic model every accepted answer validates as."""
        self.config = config if config is not None else GuardConfig()
        """The validated config."""
        if self.config.repair and self.config.enabled and _repair_loads is None:  # pragma: no cover
            raise ConfigError("repair", "needs the json-repair package (pip install 'brownout[server]')")
        self._clock = clock
        self._events = events
        self._random: Callable[[], float] = rng.random if rng is not None else random.random
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
        self.parse_failures = 0
        """Answers that were not JSON even after repair."""
        self.validation_failures = 0
        """Answers that were JSON but did not validate."""
        self.repairs = 0
        """Answers that json_repair turned into JSON."""
        self.retries = 0
        """Re-asks made."""
        self.successes = 0
        """Runs that returned a validated value."""
        self.failures = 0
        """Runs that raised GuardFailed."""
        self.retry_counts: Counter[int] = Counter()
        """Re-asks per finished run -> number of runs (a histogram of the seed's llm_json_retry_count)."""

    def response_format(self) -> dict[str, Any]:
        """The OpenAI-style ``response_format`` asking for JSON that matches ``model``'s schema.

        A fresh copy each call, so a caller may change it without affecting the guard.
        """
        return copy.deepcopy(self._response_format)

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
        enabled = cfg.enabled
        repair = cfg.repair and enabled
        text = await ask(messages, max_tokens, response_format)
        # The fast path: a good first answer costs one json.loads and one validation.
        try:
            value = self.model.model_validate(json.loads(text))
        except (ValueError, RecursionError):  # JSONDecodeError and ValidationError are ValueErrors
            pass
        else:
            self.successes += 1
            self.retry_counts[0] += 1
            return GuardResult(value, 1, False, response_format is not None, ())
        attempts = 1
        max_attempts = 1 + cfg.max_retries if enabled else 1
        errors: list[str] = []
        while True:
            value_or_bad, repaired = self._check(text, repair)
            if not isinstance(value_or_bad, _Bad):
                self.successes += 1
                self.retry_counts[attempts - 1] += 1
                return GuardResult(
                    value_or_bad, attempts, repaired, response_format is not None, tuple(errors)
                )
            bad = value_or_bad
            errors.append(f"attempt {attempts}: {bad.summary}")
            if attempts >= max_attempts:
                raise self._give_up(errors, attempts, "attempts exhausted", bad)
            delay = self._backoff(attempts)
            left = remaining()
            # Waiting until (or past) the deadline cannot help: the re-ask would have no time to answer.
            if left is not None and delay >= left:
                raise self._give_up(errors, attempts, "deadline", bad)
            attempts += 1
            self.retries += 1
            if self._events.active:
                self._events.emit(GuardRetried(self.name, self._clock.now(), attempts, bad.summary))
            await self._clock.sleep(delay)
            retry_messages = [
                *messages,
                {"role": "assistant", "content": text[:_MAX_ECHO]},
                {"role": "user", "content": bad.problem},
            ]
            tokens = max(max_tokens, min(cfg.max_tokens_cap, max_tokens + cfg.extra_tokens * (attempts - 1)))
            text = await ask(retry_messages, tokens, response_format)

    def _check(self, text: str, repair: bool) -> tuple[M | _Bad, bool]:
        """Parse (and repair) and validate one answer: the value and whether it was repaired, or why not."""
        repaired = False
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            obj = _repair(text) if repair else None
            if obj is None:
                self.parse_failures += 1
                return self._not_json(text, exc), False
            self.repairs += 1
            repaired = True
        try:
            return self.model.model_validate(obj), repaired
        except ValidationError as exc:
            self.validation_failures += 1
            return self._invalid(text, exc), repaired

    def _not_json(self, text: str, exc: BaseException) -> _Bad:
        detail = _clip(str(exc) or type(exc).__name__, _MAX_LINE)
        keys = _top_level_keys(self._schema)
        shape = f"a JSON object with the keys {keys}" if keys else "a JSON value matching the schema"
        if _looks_truncated(text):
            return _Bad(
                f"truncated JSON: {detail}",
                f"Your previous answer was cut off before the JSON was complete ({detail}). "
                f"Reply with only {shape}, complete and with short string values, and no other text.",
            )
        return _Bad(
            f"not JSON: {detail}",
            f"Your previous answer is not valid JSON ({detail}). Reply with only {shape}, and no other text.",
        )

    def _invalid(self, text: str, exc: ValidationError) -> _Bad:
        lines = [_describe_error(self._schema, err) for err in exc.errors()[:_MAX_ERRORS]]
        more = exc.error_count() - len(lines)
        if more > 0:
            lines.append(f"... and {more} more problem(s)")
        parts = [
            "Your previous answer does not match the required schema:",
            _clip("\n".join(f"- {line}" for line in lines), _MAX_PROBLEM),
        ]
        if _looks_truncated(text):
            parts.append("It was also cut off before the JSON was complete; keep string values short.")
        parts.append("Reply with only the corrected JSON object, and no other text.")
        return _Bad("schema: " + _clip("; ".join(lines), _MAX_PROBLEM), "\n".join(parts))

    def _backoff(self, retry: int) -> float:
        """The wait before re-ask number ``retry`` (1-based): capped exponential plus random jitter."""
        cfg = self.config
        return reask_wait(cfg, retry) + cfg.jitter * self._random()

    def _give_up(self, errors: Sequence[str], attempts: int, reason: str, bad: _Bad) -> GuardFailed:
        self.failures += 1
        self.retry_counts[attempts - 1] += 1
        exc = GuardFailed(self.name, errors, attempts=attempts)
        exc.add_note(f"brownout JSON guard {self.name!r} stopped: {reason}")
        if self._events.active:
            self._events.emit(GuardGaveUp(self.name, self._clock.now(), attempts, bad.summary))
        return exc

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
