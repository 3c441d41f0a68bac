"""How a fail-over scenario is graded: what the caller got, judged against the complete answer.

A scenario's play records each request it made as an :class:`Exchange` -- the text the caller put
together from the stream, whether the stream ended normally or raised, how long it took, the models
and usage the chunks named, the response headers -- and lists the side criteria it missed (the wrong
server, a retry that came too early, accounting off, ...). :func:`grade` turns that into a
:class:`Verdict`:

=========  ===========================================================================================
``pass``   the complete answer (or, for a refusal, the provider's reason as a clean error), every side
           criterion met, within the budget
``partial`` the complete answer, but a side criterion missed (over budget, the wrong server, accounting
           off, a healed primary not back in time)
``safe``   no complete answer, but a clean error (an ``openai.APIError`` other than a parse failure, no
           truncated text reported as success) within the budget
``fail``   truncated or wrong text reported as success, a parse crash in the client, or a hang past
           the budget
=========  ===========================================================================================

A request with several exchanges (the flapping primary) takes the worst exchange's grade, and is a
``pass`` only when every exchange got the complete answer and the side criteria held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = ["GRADES", "Exchange", "Grade", "Verdict", "grade"]

Grade = Literal["pass", "partial", "safe", "fail"]
"""A scenario's grade, best first."""

GRADES: Final[tuple[Grade, ...]] = ("pass", "partial", "safe", "fail")
"""The grades, best first."""


@dataclass(slots=True)
class Exchange:
    """One request of a scenario, as the caller (the official ``openai`` client) saw it."""

    started: float = 0.0
    """When the request was sent (the play's clock)."""
    text: str = ""
    """The content the caller put together from the stream (or the whole answer's)."""
    seconds: float = 0.0
    """From the request to the end of the stream or the error."""
    error: str | None = None
    """The exception the client raised (``ClassName: message``), None when the call returned."""
    clean_error: bool = False
    """The exception was an ``openai.APIError`` that is not a parse failure (the SDK's own report)."""
    parse_error: bool = False
    """The client failed to parse what it received (e.g. ``JSONDecodeError`` on an event)."""
    timed_out: bool = False
    """The client gave up waiting (its timeout, or the scenario's bound)."""
    status: int | None = None
    """The HTTP status of an ``APIStatusError``."""
    finish_reason: str | None = None
    """The last ``finish_reason`` the stream named."""
    models: list[str] = field(default_factory=list)
    """The distinct ``model`` values the chunks named, in order of appearance."""
    usage: dict[str, Any] | None = None
    """The usage the stream reported, if any."""
    headers: dict[str, str] = field(default_factory=dict)
    """The response headers (names lower-cased)."""

    @property
    def answered(self) -> bool:
        """The call returned without an exception (the caller takes what it got as the answer)."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The exchange as JSON (the text abridged to its length and ends)."""
        text = self.text
        return {
            "seconds": round(self.seconds, 3),
            "answered": self.answered,
            "text_chars": len(text),
            "text_ends": text if len(text) <= 60 else f"{text[:25]} ... {text[-25:]}",
            "error": self.error,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "models": self.models,
            "usage": self.usage,
            "served_by": self.headers.get("x-brownout-served-by"),
            "fallbacks": self.headers.get("x-brownout-fallbacks"),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """A grade and why."""

    grade: Grade
    reason: str


def _one(ex: Exchange, expected: str, budget: float, refusal: str | None) -> tuple[Grade, str]:
    """The grade of one exchange on its own, and why."""
    if ex.parse_error:
        return "fail", f"the client could not parse the stream: {ex.error}"
    over = ex.seconds > budget
    if refusal is not None:
        if ex.answered:
            return "partial", "answered although the provider refused on its content policy"
        if over or ex.timed_out:
            return "fail", f"no answer within the {budget:g} s budget ({ex.seconds:.1f} s): {ex.error}"
        if ex.clean_error and ex.status == 400 and refusal.lower() in (ex.error or "").lower():
            return "pass", "the provider's refusal came back as a clean 400 with its reason"
        if ex.clean_error:
            return "safe", f"a clean error, without the provider's reason: {ex.error}"
        return "fail", f"not a clean error: {ex.error}"
    if ex.answered:
        if ex.text != expected:
            return "fail", _wrong_text(ex.text, expected)
        if over:
            return "partial", f"complete, but in {ex.seconds:.1f} s (budget {budget:g} s)"
        return "pass", "the complete answer"
    if over or ex.timed_out:
        return "fail", f"no answer within the {budget:g} s budget ({ex.seconds:.1f} s): {ex.error}"
    if ex.clean_error:
        return "safe", f"a clean error: {ex.error}"
    return "fail", f"not a clean error: {ex.error}"


def _wrong_text(text: str, expected: str) -> str:
    if not text:
        return "an empty answer reported as success"
    if expected.startswith(text):
        return f"a truncated answer reported as success ({len(text)} of {len(expected)} characters)"
    return f"a wrong answer reported as success ({len(text)} characters, expected {len(expected)})"


def grade(
    exchanges: Sequence[Exchange],
    expected: str,
    budget: float,
    misses: Sequence[str] = (),
    *,
    refusal: str | None = None,
) -> Verdict:
    """Grade a scenario's ``exchanges`` (module docstring).

    ``expected`` is the complete answer; ``misses`` the side criteria the play found missed;
    ``refusal``, for a scenario whose right outcome is the provider's refusal, the reason the clean
    error must carry (the exchanges are then judged on that instead of on the answer).
    """
    if not exchanges:
        return Verdict("fail", "no request was made")
    n = len(exchanges)
    judged = [_one(ex, expected, budget, refusal) for ex in exchanges]
    worst = max((g for g, _ in judged), key=GRADES.index)
    reasons: list[str] = []
    for g in GRADES[1:]:
        whys = [why for got, why in judged if got == g]
        if whys:
            # One reason per grade: a run of requests failing alike is told once, with its count.
            reasons.append(whys[0] if n == 1 else f"{len(whys)} of {n} requests {g}: {whys[0]}")
    if worst in ("pass", "partial"):
        reasons.extend(misses)
    if worst == "pass" and misses:
        worst = "partial"
    if reasons:
        return Verdict(worst, "; ".join(reasons))
    if refusal is not None:
        return Verdict("pass", judged[0][1])
    return Verdict("pass", "the complete answer" if n == 1 else f"the complete answer, {n} of {n} times")
