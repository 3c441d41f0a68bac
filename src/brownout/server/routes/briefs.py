"""``POST /v1/briefs``: a creative brief, stored before it is answered.

``{"text": ..., "mode": "fast" | "balanced" | "creative"}`` -> a brief with requested/served mode,
downshift reason and impact, warnings and what served each stage. A repeat of a request whose answer
is cached is answered before it reaches this route (the edge cache, :mod:`brownout.server.edge`); the
route keeps that cache in step. 422 for invalid input, 503 with ``Retry-After`` when the service
cannot answer or the brief cannot be stored.
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request

from brownout import telemetry
from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefService
from brownout.errors import Overloaded, ServiceUnavailable
from brownout.server.edge import EdgeCache
from brownout.server.errors import ApiError, error_response
from brownout.server.records import BriefRecords
from brownout.server.routes import running

__all__ = ["BriefRequest", "install"]


_SURROGATE = re.compile("[\ud800-\udfff]")


class BriefRequest(BaseModel):
    """The body of ``POST /v1/briefs``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="the customer's free text", min_length=1)
    mode: Literal["fast", "balanced", "creative"] = Field(default="balanced", description="the mode wanted")

    @field_validator("text")
    @classmethod
    def _storable(cls, value: str) -> str:
        # What is acknowledged must be storable, on every database we support. PostgreSQL's text
        # cannot hold NUL, nor can UTF-8 hold a lone surrogate: such a brief used to be answered 200
        # and then refused by the database, blocking the spool behind it. Refused here instead
        # (rather than stored escaped): neither character means anything in a customer's wish, and
        # an escaped copy would no longer be the text that was sent.
        nul = value.find("\x00")
        if nul >= 0:
            raise ValueError(
                f"the text has a NUL character (U+0000) at character {nul}; remove it -- it cannot be stored"
            )
        lone = _SURROGATE.search(value)
        if lone is not None:
            raise ValueError(
                f"the text has a lone UTF-16 surrogate (U+{ord(lone.group()):04X}) at character "
                f"{lone.start()}; send valid Unicode"
            )
        return value


def _unavailable(
    e: ServiceUnavailable, *, overloaded: bool = False, queue_size: int | None = None
) -> Response:
    if overloaded:
        # Shed at capacity: the same kind as the gateway's 429, and what to do instead.
        return error_response(
            503,
            str(e),
            type="rate_limit_error",
            code="overloaded",
            retry_after=e.retry_after,
            queue_size=queue_size,
            suggestion="Retry after the given time, or use mode=fast for a quicker answer",
        )
    return error_response(503, str(e), code="unavailable", retry_after=e.retry_after)


def _trace(response: BriefAnswer, service: BriefService) -> None:
    """How the brief was served, on the request's span (the caller reads the same in the answer)."""
    current = trace.get_current_span()
    current.set_attributes(
        {
            "brownout.requested_mode": response["requested_mode"],
            "brownout.served_mode": response["served_mode"],
            "brownout.downshifted": response["downshifted"],
            "brownout.reason": response["reason"] or "",
            "brownout.degraded": response["degraded"],
            "brownout.cached": response["cached"],
            "brownout.dimmed": tuple(response.get("dimmed") or ()),
            "brownout.dimmer.level": service.dimmer.level,
        }
    )


def install(
    router: APIRouter, *, service: BriefService, records: BriefRecords, edge: EdgeCache | None
) -> None:
    """Add ``POST /v1/briefs`` to ``router``: answered by ``service``, stored in ``records`` before it
    is acknowledged, and remembered by ``edge`` (when the cache is on) for repeats."""

    @router.post("/v1/briefs")
    async def create_brief(body: BriefRequest, request: Request) -> Response:
        svc = running(service)
        try:
            response = await svc.create_brief(body.text, body.mode)
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_value", param="text") from e
        except ServiceUnavailable as e:
            overloaded = isinstance(e.__cause__, Overloaded)
            return _unavailable(e, overloaded=overloaded, queue_size=svc.admission.queue_size)
        if telemetry.SWITCH.tracer is not None:
            _trace(response, svc)
        if not response["cached"]:
            try:
                await records.record(body.text, response)
            except ServiceUnavailable as e:
                return _unavailable(e)
        raw = getattr(request.state, "raw_body", None)
        if edge is not None and raw is not None and not response["degraded"]:
            edge.remember(raw, svc.cache_key(body.text.strip(), body.mode))
        return JSONResponse(response)
