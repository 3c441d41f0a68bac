"""The gateway's spans, used only while tracing is on (:data:`brownout.telemetry.SWITCH`).

The request's own span is the server's (:mod:`brownout.server.tracing`). Under it:

* one ``CLIENT`` span per upstream attempt (:func:`attempt`), named ``chat {model}`` with the GenAI
  attributes (``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``; from a
  whole answer also ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``/``output_tokens`` and the
  finish reasons), ``server.address``/``server.port``, and ours: the group asked for and the group
  tried (``brownout.fallback`` when it is a fallback group), the endpoint, the attempt's number, the
  endpoint's breaker state, and how it ended (``http.response.status_code``, ``error.type``). A
  stream's attempt ends with its first token;
* ``hedge`` (:func:`hedge`): the second run of a hedged request, its attempts under it;
* ``continue stream`` (:func:`continuation`): the attempts that continue a stream broken mid-answer.

The router and the stream module call these behind one check of the switch, so a gateway without
tracing never reaches this module. It imports neither of them (they import it).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Final, TypeVar

from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from brownout import telemetry

__all__ = ["attempt", "continuation", "hedge"]

R = TypeVar("R")

_PROVIDER: Final = "openai"
"""``gen_ai.provider.name``: the API the upstreams speak (see :data:`brownout.llm.client.GEN_AI_PROVIDER`)."""

_LARGEST_READ: Final = 1 << 20
"""Whole answers up to this size are read for their model and token counts; larger ones are not."""


async def attempt(
    call: Callable[[Any, Any, bytes, float], Awaitable[R]],
    asked: Any,
    group: Any,
    ep: Any,
    content: bytes,
    deadline: float,
    number: int,
) -> R:
    """``call(group, ep, content, deadline)`` -- one upstream attempt -- inside its span.

    ``asked`` is the group the request named (``group`` may be one of its fallbacks); ``number`` the
    attempt's number in the request.
    """
    model = ep.model or asked.name
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _PROVIDER,
        "gen_ai.request.model": model,
        "brownout.group": asked.name,
        "brownout.served_group": group.name,
        "brownout.fallback": group is not asked,
        "brownout.endpoint": ep.label,
        "brownout.attempt": number,
        "brownout.breaker.state": ep.breaker.state.value,
    }
    pool = ep.pool
    if pool is not None and pool.host:
        attributes["server.address"] = pool.host
        attributes["server.port"] = pool.port
    with telemetry.span(f"chat {model}", kind=telemetry.CLIENT, attributes=attributes) as span:
        try:
            result = await call(group, ep, content, deadline)
        except Exception as e:
            if span is not None:
                _failed(span, e)
            raise
        if span is not None:
            _answered(span, result)
        return result


def _failed(span: Span, error: Exception) -> None:
    # UpstreamFailed says the upstream's status and whether it timed out; a Passthrough carries the
    # upstream's answer (a 4xx passed back). Read by name: this module does not import the router.
    status = getattr(error, "status", None)
    answer = getattr(error, "answer", None)
    if answer is not None:
        status = getattr(answer, "status", None)
    if isinstance(status, int):
        span.set_attribute("http.response.status_code", status)
    if getattr(error, "timed_out", False):
        span.set_attribute("error.type", "timeout")
    elif isinstance(status, int):
        span.set_attribute("error.type", str(status))


def _answered(span: Span, result: Any) -> None:
    status = getattr(result, "status", None)
    if isinstance(status, int):
        span.set_attribute("http.response.status_code", status)
    body = getattr(result, "body", None)
    if status != 200 or not isinstance(body, bytes) or len(body) > _LARGEST_READ:
        return
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return
    if not isinstance(doc, dict):
        return
    if isinstance(model := doc.get("model"), str):
        span.set_attribute("gen_ai.response.model", model)
    usage = doc.get("usage")
    if isinstance(usage, dict):
        for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
            value = usage.get(theirs)
            if isinstance(value, int) and not isinstance(value, bool):
                span.set_attribute(f"gen_ai.usage.{ours}", value)
    choices = doc.get("choices")
    if isinstance(choices, list):
        reasons = [c["finish_reason"] for c in choices if isinstance(c, dict) and c.get("finish_reason")]
        if reasons and all(isinstance(r, str) for r in reasons):
            span.set_attribute("gen_ai.response.finish_reasons", reasons)


async def hedge(run: Callable[[Any], Awaitable[R]], trail: Any, group: Any) -> R:
    """``run(trail)``, the hedged second run of a request to ``group``, inside a ``hedge`` span."""
    with telemetry.span("hedge", attributes={"brownout.group": group.name, "brownout.hedge": True}):
        return await run(trail)


def continuation(group: Any, tokens: int, broken: list[Any]) -> AbstractContextManager[Span | None]:
    """The span of a broken stream's continuation: ``tokens`` already sent, ``broken`` endpoints."""
    return telemetry.span(
        "continue stream",
        attributes={
            "brownout.group": group.name,
            "brownout.tokens_sent": tokens,
            "brownout.broken": tuple(ep.label for ep in broken),
        },
    )
