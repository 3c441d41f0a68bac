"""The pre-promotion checklist against a running server (``brownout check --url URL``).

A canary is safe to promote when all four guards hold:

1. **JSON hard guard** -- enabled, at least 3 retries, fallback on (``GET /api/v1/config/summary``);
2. **circuit breakers** -- enabled, and every breaker closed now (``GET /api/v1/status``);
3. **cache LRU + TTL** -- enabled, and expiry and regeneration verified (``GET /api/v1/selftest/cache``:
   a cache of the same class and settings as the live one, walked through a TTL expiry test on a
   manual clock, so nothing waits out the 600 s TTL);
4. **LLM health** -- every model passes a live test inference (``GET /health/llm?model=all``).

and one more, for the data the service promised to keep:

5. **durable writes** -- no acknowledged brief or event was lost from a damaged spool or outbox file
   (``GET /health``: ``spool.lost``, ``events.lost``; such a loss is found when the server starts and
   stays reported until an operator clears it).

Every check reads only; none changes the server's state. A server that cannot be reached, or an
answer that is not what the check expects, fails the check with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["CHECKS", "CheckResult", "fetch_json", "run_checks"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One checklist item: its ``name``, whether it passed, and a one-line ``detail``."""

    name: str
    ok: bool
    detail: str


class _Unexpected(Exception):
    """The server answered, but not with what the check needs."""


def fetch_json(http: httpx.Client, path: str, *, ok_statuses: tuple[int, ...] = (200,)) -> Any:
    """GET ``path`` and return its JSON body; raises with a readable reason otherwise."""
    response = http.get(path)
    if response.status_code not in ok_statuses:
        raise _Unexpected(f"GET {path}: HTTP {response.status_code} {response.text[:200]}")
    try:
        return response.json()
    except ValueError as e:
        raise _Unexpected(f"GET {path}: not JSON") from e


def _json_guard(http: httpx.Client) -> CheckResult:
    guard = fetch_json(http, "/api/v1/config/summary")["json_guard"]
    problems = []
    if not guard.get("enabled"):
        problems.append("disabled")
    if int(guard.get("max_retries", 0)) < 3:
        problems.append(f"max_retries {guard.get('max_retries')} < 3")
    if not guard.get("fallback_enabled"):
        problems.append("fallback disabled")
    if problems:
        return CheckResult("JSON hard guard", False, "; ".join(problems))
    return CheckResult(
        "JSON hard guard",
        True,
        f"enabled, {guard['max_retries']} retries, backoff {guard.get('backoff_base')} s, fallback on",
    )


def _breakers(http: httpx.Client) -> CheckResult:
    summary = fetch_json(http, "/api/v1/config/summary")["circuit_breaker"]
    if not summary.get("enabled"):
        return CheckResult("circuit breakers", False, "disabled (circuit_breaker.enabled: false)")
    breakers: dict[str, str] = fetch_json(http, "/api/v1/status").get("breakers") or {}
    if not breakers:
        return CheckResult("circuit breakers", False, "the server reports no breakers")
    not_closed = {name: state for name, state in breakers.items() if state != "closed"}
    if not_closed:
        listed = ", ".join(f"{n}={s}" for n, s in sorted(not_closed.items()))
        return CheckResult("circuit breakers", False, f"not closed: {listed}")
    return CheckResult(
        "circuit breakers", True, f"all {len(breakers)} closed ({', '.join(sorted(breakers))})"
    )


def _cache(http: httpx.Client) -> CheckResult:
    result = fetch_json(http, "/api/v1/selftest/cache")
    steps = result.get("steps") or []
    failed = [f"{s['name']} ({s['detail']})" for s in steps if not s.get("ok")]
    if not result.get("ok") or failed or not steps:
        return CheckResult("cache LRU+TTL", False, "failed: " + ("; ".join(failed) or "no steps reported"))
    return CheckResult(
        "cache LRU+TTL",
        True,
        f"ttl {result['ttl_seconds']:g} s, {result['max_size']} entries: "
        f"expiry and regeneration verified ({len(steps)} steps)",
    )


def _health(http: httpx.Client) -> CheckResult:
    body = fetch_json(http, "/health/llm", ok_statuses=(200, 503))
    if not isinstance(body, dict) or "models" not in body:
        raise _Unexpected(f"GET /health/llm: unexpected answer {str(body)[:200]}")
    models: dict[str, Any] = body["models"]
    bad = {m: r for m, r in models.items() if r.get("status") != "healthy"}
    if bad or body.get("status") != "healthy":
        listed = ", ".join(f"{m} ({r.get('reason', r.get('status'))})" for m, r in sorted(bad.items()))
        return CheckResult("LLM health", False, f"unhealthy: {listed or body.get('status')}")
    latency = ", ".join(f"{m} {r.get('latency_ms')} ms" for m, r in models.items())
    return CheckResult("LLM health", True, f"all {len(models)} healthy ({latency})")


_LOST_NAMED = 10
"""Lost ids a check result names (the count says how many in all)."""


def _durable(http: httpx.Client) -> CheckResult:
    body = fetch_json(http, "/health", ok_statuses=(200, 503))
    problems = []
    for section, what in (("spool", "briefs"), ("events", "events")):
        lost = (body.get(section) or {}).get("lost")
        if lost is None:
            continue  # not configured (events without Redis)
        count = int(lost["count"])
        if count:
            ids = ", ".join(lost["ids"][:_LOST_NAMED]) + (", ..." if count > _LOST_NAMED else "")
            files = ", ".join(lost.get("files") or [])
            problems.append(f"{count} acknowledged {what} lost from {files}: {ids}")
    if problems:
        return CheckResult("durable writes", False, "; ".join(problems) + " (GET /health lists them)")
    return CheckResult("durable writes", True, "no acknowledged write lost from the spool or the outbox")


CHECKS: tuple[tuple[str, Callable[[httpx.Client], CheckResult]], ...] = (
    ("JSON hard guard", _json_guard),
    ("circuit breakers", _breakers),
    ("cache LRU+TTL", _cache),
    ("LLM health", _health),
    ("durable writes", _durable),
)
"""The checklist: the four pre-promotion guards in their usual order, then durable writes: (name, check)."""


def run_checks(
    url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` against the server at ``url``; one result per check."""
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout, transport=transport) as http:
        for name, check in CHECKS:
            try:
                results.append(check(http))
            except httpx.HTTPError as e:
                results.append(CheckResult(name, False, f"cannot reach {url}: {type(e).__name__}: {e}"))
            except (_Unexpected, KeyError, TypeError, ValueError) as e:
                results.append(CheckResult(name, False, f"unexpected answer: {e}"))
    return results
