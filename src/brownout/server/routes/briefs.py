"""``POST /v1/briefs``: a creative brief, stored before it is answered.

``{"text": ..., "mode": "fast" | "balanced" | "creative"}`` -> a brief with requested/served mode,
downshift reason and impact, warnings and what served each stage. A repeat of a request whose answer
is cached is answered before it reaches this route (the edge cache, :mod:`brownout.server.edge`); the
route keeps that cache in step. 422 for invalid input, 503 with ``Retry-After`` when the service
cannot answer or the brief cannot be stored.

A valid request is admitted (or refused for load) as soon as its body is read, in front of the
framework (:class:`EarlyAdmission`): under overload most requests are refused, and a refusal made
there costs the server about 40 % less CPU than one made in the route -- CPU taken from the cores the
local models run on, and what a burst of refusals waits behind.
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.types import Message, Scope, Send

from brownout import telemetry
from brownout.briefs.answer import BriefAnswer
from brownout.briefs.service import BriefService, BriefTicket
from brownout.errors import Overloaded, ServiceUnavailable
from brownout.server.edge import EdgeCache
from brownout.server.errors import ApiError, check_json_content_type, error_response
from brownout.server.records import BriefRecords
from brownout.server.routes import running

__all__ = ["BriefRequest", "EarlyAdmission", "install"]


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


_TICKET = "brief_ticket"
"""Where :class:`EarlyAdmission` leaves a request's admission for the route (the ASGI scope's state)."""


class EarlyAdmission:
    """The admission of ``POST /v1/briefs`` as soon as the request's body is read, before the
    framework routes it: a request the service refuses for load is answered here; one it admits
    goes on to the route with its ticket, and is not admitted twice.

    Only a request the route would take is admitted or refused here: with ``Content-Type:
    application/json``, a body :class:`BriefRequest` accepts (pydantic's JSON parser takes no body
    the route's strict one refuses), and a text the service accepts. Anything else goes on to the
    route, which answers it in its one error shape: bad input is always reported before load.
    """

    def __init__(self, service: BriefService) -> None:
        self.service = service

    async def __call__(self, scope: Scope, body: bytes, send: Send) -> bool:
        """Admit the request of ``scope`` whose body is ``body``; True when it was answered here."""
        service = self.service
        if not service.started:
            return False
        content_type = None
        for name, value in scope.get("headers", ()):
            if name == b"content-type":
                content_type = value.decode("latin-1")
                break
        if check_json_content_type(content_type) is not None:
            return False
        try:
            request = BriefRequest.model_validate_json(body)
        except ValidationError:
            return False
        try:
            ticket = await service.admit(request.text, request.mode)
        except ValueError:
            return False
        except ServiceUnavailable as e:
            refusal = _unavailable(
                e, overloaded=isinstance(e.__cause__, Overloaded), queue_size=service.admission.queue_size
            )
            await refusal(scope, _no_body, send)
            return True
        scope.setdefault("state", {})[_TICKET] = ticket
        return False


async def _no_body() -> Message:
    # A refusal reads nothing more: the body was read whole before it was made.
    return {"type": "http.disconnect"}


def install(
    router: APIRouter, *, service: BriefService, records: BriefRecords, edge: EdgeCache | None
) -> EarlyAdmission:
    """Add ``POST /v1/briefs`` to ``router``: answered by ``service``, stored in ``records`` before it
    is acknowledged, and remembered by ``edge`` (when the cache is on) for repeats. Returns its
    :class:`EarlyAdmission`, for the ASGI guard that reads the request's body."""

    @router.post("/v1/briefs")
    async def create_brief(body: BriefRequest, request: Request) -> Response:
        svc = running(service)
        try:
            ticket: BriefTicket | None = getattr(request.state, _TICKET, None)
            if ticket is None or ticket.mode != body.mode or ticket.text != body.text.strip():
                ticket = await svc.admit(body.text, body.mode)
            response = await svc.answer(ticket)
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

    return EarlyAdmission(service)
