"""One error shape for every refusal of the brief API and the gateway.

Every 4xx and 5xx answer of ``brownout serve`` -- the brief API, the recovery API, the live view and
the OpenAI-compatible gateway -- is JSON of one shape, OpenAI's::

    {"error": {"message": "text: Input should be a valid string", "type": "invalid_request_error",
               "code": "validation_failed", "param": "text",
               "errors": [{"loc": ["body", "text"], "msg": "Input should be a valid string",
                           "type": "string_type"}]}}

``message`` always says what went wrong in words; ``code`` is a short stable name for programs (or
null); ``param`` is the bad field's dotted path inside the body (or the query/header parameter's
name), else null. Fields that only some answers carry are documented on :class:`ErrorBody` and sit
*inside* ``error``: ``retry_after`` (whole seconds; on every 429 and 503, next to the ``Retry-After``
header), ``queue_size`` and ``suggestion`` (when the service sheds load), ``errors`` (one item per bad
field of a request that failed validation), ``limit_bytes`` (413). A health probe that answers 503
keeps its status fields next to ``error``.

``type`` is one of:

* ``invalid_request_error`` -- the request is wrong (400 malformed body, 405, 413, 415, 422);
* ``authentication_error`` -- no valid bearer token (401);
* ``permission_error`` -- the operation is switched off here (403);
* ``not_found_error`` -- no such path, model or model group (404);
* ``rate_limit_error`` -- shed at capacity: try again after ``retry_after`` (429, and the brief API's
  503 when its queue is full);
* ``service_unavailable`` -- nothing can answer right now: try again after ``retry_after`` (503);
* ``server_error`` -- a bug on our side (500); the traceback goes to the log, never to the client.

:class:`ErrorResponse` is the one definition; :func:`error_content`, :func:`error_bytes`,
:func:`error_response` and :func:`send_error` are the only ways answers of this shape are made, and
:func:`install_error_handlers` routes FastAPI's and Starlette's own errors (validation, 404, 405,
``HTTPException``, anything unexpected) through them. :func:`parse_json_body` reads a JSON request body
the strict way both APIs share: UTF-8 only, no NaN or Infinity, no lone surrogates, bounded nesting --
each refused with a message that says what was wrong and where.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

__all__ = [
    "ApiError",
    "ErrorBody",
    "ErrorResponse",
    "ErrorType",
    "FieldError",
    "check_json_content_type",
    "error_bytes",
    "error_content",
    "error_response",
    "install_error_handlers",
    "openapi_error_responses",
    "parse_json_body",
    "send_error",
]

_log = logging.getLogger("brownout.errors")

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "service_unavailable",
    "server_error",
]

_TYPE_BY_STATUS: Final[dict[int, ErrorType]] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_CODE_BY_STATUS: Final[dict[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}
DEFAULT_RETRY_AFTER: Final = 5
"""Seconds told to wait on a 429/503 whose producer did not say (``Retry-After`` and ``retry_after``)."""


class FieldError(BaseModel):
    """One bad field of a request that failed validation."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int] = Field(description='where: the source ("body", "query", ...) then the path')
    msg: str = Field(description="what is wrong with it")
    type: str = Field(description="a short name of the rule it broke, e.g. missing, string_type")


class ErrorBody(BaseModel):
    """The ``error`` object of every 4xx/5xx answer (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, description="what went wrong, in words")
    type: ErrorType = Field(description="the kind of error: one of a small fixed vocabulary")
    code: str | None = Field(description="a short stable name of this error for programs, or null")
    param: str | None = Field(description="the bad field's dotted path (or parameter name), or null")
    retry_after: int | None = Field(
        default=None, description="on 429 and 503: whole seconds to wait before trying again"
    )
    queue_size: int | None = Field(default=None, description="on overload: requests waiting now")
    suggestion: str | None = Field(default=None, description="on overload: what to do instead")
    errors: list[FieldError] | None = Field(
        default=None, description="on validation errors: every bad field, first one named in param"
    )
    limit_bytes: int | None = Field(default=None, description="on 413: the largest body accepted")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {...}}``. Health probes answering 503 add their status fields."""

    model_config = ConfigDict(extra="allow")

    error: ErrorBody


_OPTIONAL: Final = ("retry_after", "queue_size", "suggestion", "errors", "limit_bytes")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _clean(text: str, limit: int = 2000) -> str:
    """``text`` safe to encode as UTF-8 (lone surrogates become U+FFFD) and at most ``limit`` chars."""
    if _SURROGATE.search(text) is not None:
        text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def error_content(
    status: int,
    message: str,
    *,
    type: ErrorType | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
    queue_size: int | None = None,
    suggestion: str | None = None,
    errors: Sequence[FieldError] | None = None,
    limit_bytes: int | None = None,
) -> dict[str, Any]:
    """The JSON content of an error answer with HTTP ``status``, validated by :class:`ErrorResponse`.

    ``type`` and ``code`` default from the status; a 429 or 503 always carries ``retry_after`` (whole
    seconds, at least 1; :data:`DEFAULT_RETRY_AFTER` when not given). Text is made safe to encode.
    """
    if retry_after is None and status in (429, 503):
        retry_after = DEFAULT_RETRY_AFTER
    body = ErrorBody(
        message=_clean(message) or f"HTTP {status}",
        type=type
        or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        code=code if code is not None else _CODE_BY_STATUS.get(status),
        param=None if param is None else _clean(param, 200),
        retry_after=None if retry_after is None else max(1, math.ceil(retry_after)),
        queue_size=queue_size,
        suggestion=suggestion,
        errors=list(errors) if errors is not None else None,
        limit_bytes=limit_bytes,
    )
    content = body.model_dump(mode="json")
    for key in _OPTIONAL:
        if content[key] is None:
            del content[key]
    return {"error": content}


def _encode(content: Any) -> bytes:
    # Like Starlette's JSONResponse (compact, UTF-8); the content was cleaned, so this cannot fail.
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def error_bytes(status: int, message: str, **fields: Any) -> bytes:
    """:func:`error_content` serialised: for the raw ASGI paths (the gateway, the body-size guard)."""
    return _encode(error_content(status, message, **fields))


def _headers_for(content: Mapping[str, Any], headers: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    retry = content["error"].get("retry_after")
    if retry is not None and not any(k.lower() == "retry-after" for k in out):
        out["Retry-After"] = str(retry)
    return out


def error_response(
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Response:
    """An error answer (``Retry-After`` set from ``retry_after``); ``extra`` adds top-level fields
    (a health probe's status next to ``error``)."""
    content = error_content(status, message, **fields)
    if extra:
        content = {**extra, **content}
    return Response(
        _encode(content),
        status_code=status,
        headers=_headers_for(content, headers),
        media_type="application/json",
    )


async def send_error(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Send an error answer made by :func:`error_bytes` on a raw ASGI ``send``."""
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


class ApiError(StarletteHTTPException):
    """An HTTP error with the fields of :class:`ErrorBody`: raise it from a handler or dependency."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(status, message, headers=dict(headers) if headers else None)
        self.fields = fields


# ---------------------------------------------------------------------------------------------- bodies

_JSON_MEDIA: Final = re.compile(r"^\s*application/([a-z0-9.+-]*\+)?json\s*(;|$)", re.IGNORECASE)
MAX_DEPTH: Final = 64
"""The deepest nesting of arrays and objects a JSON body may have."""


class _NonFinite:
    """What the strict decoder makes of ``NaN``, ``Infinity``, ``-Infinity`` and of a number too
    large for a float, such as ``1e400`` (refused afterwards)."""

    __slots__ = ("token",)
    made = 0
    """How many were ever made: a body made none when the count did not move while it was parsed
    (parsing does not await, so no other body can be parsed in between on this thread; another
    thread can only make the count move, which costs a needless look, never a missed NaN)."""

    def __init__(self, token: str) -> None:
        self.token = token
        _NonFinite.made += 1


def _parse_float(token: str) -> float | _NonFinite:
    # 1e400 is valid JSON, but Python reads it as infinity: refused like Infinity itself.
    value = float(token)
    return value if math.isfinite(value) else _NonFinite(token)


_DECODER: Final = json.JSONDecoder(parse_constant=_NonFinite, parse_float=_parse_float)
_CONSTANTS: Final = frozenset({"NaN", "Infinity", "-Infinity"})


def check_json_content_type(content_type: str | bytes | None) -> ApiError | None:
    """None when ``content_type`` is JSON (``application/json`` or ``application/*+json``), else the 415."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    if content_type and _JSON_MEDIA.match(content_type):
        return None
    said = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return ApiError(
        415,
        f"the request has {said}: send the body as JSON with Content-Type: application/json",
        code="unsupported_media_type",
    )


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _find_bad_value(root: Any) -> tuple[list[str | int], str, str] | None:
    """The path, message and rule of the first NaN/Infinity or lone surrogate in parsed JSON."""
    stack: list[tuple[Any, list[str | int]]] = [(root, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _NonFinite):
            if value.token in _CONSTANTS:
                return path, f"{value.token} is not a JSON number: send a finite number", "non_finite_number"
            return (
                path,
                f"the number {value.token[:40]} is too large (it would be infinity): send a finite number",
                "non_finite_number",
            )
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found is not None:
                char = f"\\u{ord(found.group()):04x}"
                return (
                    path,
                    f"the string has a lone UTF-16 surrogate ({char}) at character {found.start()}: "
                    "strings must be valid Unicode",
                    "lone_surrogate",
                )
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if _SURROGATE.search(key) is not None:
                    return (
                        path,
                        "an object key has a lone UTF-16 surrogate: keys must be valid Unicode",
                        "lone_surrogate",
                    )
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in reversed(list(enumerate(value))))
    return None


_STRINGS: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS: Final = re.compile(r"[^\[\]{}]+")


def _too_deep(text: str, limit: int) -> bool:
    """True when ``text`` nests arrays/objects deeper than ``limit``. Cheap: only a body with more
    than ``limit`` openers is looked at, and then only its brackets outside strings."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for ch in _NOT_BRACKETS.sub("", _STRINGS.sub("", text)):
        if ch in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_json_body(raw: bytes, where: str = "body", max_depth: int | None = MAX_DEPTH) -> Any:
    """Parse a JSON request body, refusing with an :class:`ApiError` that says what was wrong.

    400 ``invalid_encoding`` for bytes that are not UTF-8 (with the byte offset), 400 ``invalid_json``
    with the parser's line and column, 400 ``too_deep`` past ``max_depth`` levels (None: only what
    the parser itself cannot take -- the gateway's long conversations skip the count), 400
    ``invalid_number`` for NaN/Infinity or a number too large for a float (``1e400``) and
    ``invalid_unicode`` for a lone surrogate escape -- these two name the field (``param`` and
    ``errors``) -- and 400 ``invalid_number`` for an integer of more digits than Python converts
    (4,300 by default). A UTF-8 byte-order mark is allowed.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(
            400,
            f"the request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} "
            f"({e.reason}); send JSON encoded as UTF-8",
            code="invalid_encoding",
        ) from None
    if max_depth is not None and _too_deep(text, max_depth):
        raise ApiError(
            400, f"the JSON body nests arrays/objects deeper than {max_depth} levels", code="too_deep"
        )
    made = _NonFinite.made
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})",
            code="invalid_json",
        ) from None
    except RecursionError:  # deeper than the interpreter's own limit: never a 500
        raise ApiError(400, "the JSON body nests too deeply", code="too_deep") from None
    except ValueError:
        # Not a JSONDecodeError: an integer past Python's limit on converting digits (4,300 by
        # default), e.g. 100,000 nines. It was a 500; no client means such a number.
        raise ApiError(
            400,
            f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits: "
            "send numbers a program can hold",
            code="invalid_number",
        ) from None
    # Looked for only when the body may hold one: a NaN was made, or a \uD800-\uDFFF escape is there.
    if _NonFinite.made != made or ("\\u" in text and ("\\ud" in text or "\\uD" in text)):
        bad = _find_bad_value(value)
        if bad is not None:
            path, msg, rule = bad
            loc: list[str | int] = [where, *path]
            raise ApiError(
                400,
                f"{_dotted(path) or where}: {msg}",
                code="invalid_number" if rule == "non_finite_number" else "invalid_unicode",
                param=_dotted(path) or None,
                errors=[FieldError(loc=loc, msg=msg, type=rule)],
            )
    return value


# ---------------------------------------------------------------------------------------------- handlers

_SOURCES: Final = frozenset({"body", "query", "path", "header", "cookie"})


def _field_errors(raw: Sequence[Any]) -> list[FieldError]:
    """Pydantic's errors without their ``input`` (it may be anything, even unencodable) or ``ctx``."""
    out: list[FieldError] = []
    for item in raw:
        loc = [p if isinstance(p, int) else _clean(str(p), 200) for p in item.get("loc", ())]
        out.append(
            FieldError(loc=loc, msg=_clean(str(item.get("msg", "invalid"))), type=str(item.get("type", "")))
        )
    return out


def _param(loc: Sequence[str | int]) -> str | None:
    path = list(loc[1:]) if loc and loc[0] in _SOURCES and len(loc) > 1 else list(loc)
    return _dotted(path) or None


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _field_errors(exc.errors())
    if not errors:
        return error_response(422, "the request is not valid", code="validation_failed")
    first = errors[0]
    param = _param(first.loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(
        422,
        f"{param or _dotted(first.loc)}: {first.msg}{more}",
        code="validation_failed",
        param=param,
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    fields: dict[str, Any] = dict(getattr(exc, "fields", {}))
    if status in (429, 503) and "retry_after" not in fields:
        given = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
        if given is not None and given.isdigit():
            fields["retry_after"] = int(given)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif status == 405 and message == "Method Not Allowed":
        allowed = headers.get("allow") or headers.get("Allow")
        message = f"{request.url.path} does not take {request.method}" + (
            f" (allowed: {allowed})" if allowed else ""
        )
    return error_response(status, message, headers=headers, **fields)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log only: a client learns that it was our fault, not our internals.
    _log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error (logged on the server)", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer FastAPI's and Starlette's errors (validation, 404, 405, ``HTTPException``, any other
    exception) in the one shape."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)


def openapi_error_responses() -> dict[int | str, dict[str, Any]]:
    """``responses=`` for FastAPI: every 4xx and 5xx documented as :class:`ErrorResponse`."""
    return {
        "4XX": {"model": ErrorResponse, "description": "The request was refused; `error` says why."},
        "5XX": {
            "model": ErrorResponse,
            "description": "The service cannot answer now (`retry_after` on 503) or failed (500).",
        },
    }
