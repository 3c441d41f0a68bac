"""The answer to a brief request, as a typed dict: what :meth:`BriefService.create_brief` returns.

It stays a plain dict at run time (it is sent as JSON, cached, spooled and shared through Redis as it
is); the types only tell the route and the records which keys every answer has and which some have.
"""

# No ``from __future__ import annotations`` here: with it, Python 3.11 cannot see ``NotRequired`` at
# run time, and the answer's ``__required_keys__`` (which the tests check answers against) would be wrong.
from typing import Any, NotRequired, TypedDict

__all__ = ["BriefAnswer", "StageRecord"]


class StageRecord(TypedDict):
    """What served one stage of an answer, and how long it took."""

    stage: str
    """``generate``, ``validate``, ``hint`` -- or ``cache`` for an answer served from the cache."""
    served_by: str
    """``model:<role>``, or the fallback that served it (``rules``, ``cache``, ``template``, ...)."""
    latency_ms: float


class BriefAnswer(TypedDict):
    """The answer to one brief request (the body of a 200 from ``POST /v1/briefs``).

    The keys below without ``NotRequired`` are in every answer; the others only in some (see each).
    """

    request_id: str
    """A new id for every answer, a cache hit included."""
    latency_ms: float
    """How long this request took in the service, in milliseconds."""
    brief: dict[str, Any]
    """The brief (:class:`~brownout.briefs.schema.CreativeBrief` as JSON)."""
    requested_mode: str
    served_mode: str
    """The mode it was served in: a requested mode, or ``fallback`` / ``emergency``."""
    downshifted: bool
    reason: str | None
    """Why it was downshifted or dimmed (``"load"`` when the dimmer left something out); None: it was not."""
    impact: dict[str, Any]
    """What a downshift costs the customer (empty when not downshifted)."""
    warnings: list[str]
    stages: list[StageRecord]
    validation: dict[str, Any] | None
    """The validation report as JSON (None when the mode has no validation)."""
    reliability: str
    """``high``, ``medium`` or ``low``."""
    degraded: bool
    """Anything less than a full-quality answer (such an answer is never cached)."""
    cached: bool
    """Served from the exact-answer cache."""
    cached_at: str | None
    """When a cached answer was made (ISO 8601 UTC); None for a fresh one."""
    cache_age_seconds: float | None
    """How old a cached answer is; None for a fresh one (or a cached one that does not say)."""
    cached_stages: NotRequired[list[StageRecord]]
    """Only in a cache hit: the stages of the answer when it was made."""
    dimmed: NotRequired[list[str]]
    """Only when the load left something out: ``description_tail``, ``creative_hints``,
    ``validation``, ``generation``."""
    freshness: NotRequired[dict[str, Any]]
    """Only in an emergency answer from stored answers: its source, freshness, fallback reason."""
