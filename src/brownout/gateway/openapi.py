"""The gateway's routes in the server's OpenAPI document.

``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health/gateway`` are plain ASGI endpoints
(see :mod:`brownout.gateway.routes`: no validation model, no re-encoding on the hot path), so FastAPI
does not know them. :func:`gateway_openapi` adds them to a generated document: their request and answer
schemas (the part of OpenAI's chat API the gateway reads or guarantees; everything else passes through
to the upstream, so the schemas allow more fields) and the one error shape of
:mod:`brownout.server.errors` on every error status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from brownout.server.errors import ErrorResponse

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "GatewayHealth",
    "ModelList",
    "gateway_openapi",
]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, user, assistant or tool")
    content: str | list[dict[str, Any]] | None = Field(default=None, description="text, or content parts")


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's chat API). The gateway reads ``model`` and
    ``stream``; every other field is passed to the upstream as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="a model group of this gateway (GET /v1/models)")
    messages: list[ChatMessage] = Field(description="the conversation so far")
    stream: bool | None = Field(default=None, description="true: answer as Server-Sent Events")
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "json_schema", ...}: the JSON guard checks answers against it'
    )


class ChatChoice(BaseModel):
    """One answer of a chat completion."""

    model_config = ConfigDict(extra="allow")

    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A whole chat answer, as the upstream sent it (OpenAI's ``chat.completion`` object)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None


class ModelCard(BaseModel):
    """One model group, listed as OpenAI lists a model."""

    id: str = Field(description="the group's name: the model to ask for")
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """The answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class GatewayHealth(BaseModel):
    """The answer of ``GET /health/gateway``: every group's endpoints, breakers, load and latency."""

    model_config = ConfigDict(extra="allow")

    status: Literal["healthy", "degraded", "unhealthy", "disabled"]
    groups: dict[str, dict[str, Any]] = Field(description="per group: available, fallbacks, load, endpoints")


_REF = "#/components/schemas/{model}"
_HEADERS_SERVED = {
    "x-brownout-served-by": {"description": "group/endpoint that answered", "schema": {"type": "string"}},
    "x-brownout-fallbacks": {
        "description": "the groups tried, '>'-separated; only when a fallback group served",
        "schema": {"type": "string"},
    },
    "x-brownout-attempts": {"description": "upstream calls made", "schema": {"type": "integer"}},
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "one Server-Sent Event of the stream",
    "properties": {
        "data": {
            "type": "string",
            "description": "a chat.completion.chunk as JSON, then [DONE]; or an error in the one shape",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _json("ErrorResponse")}
    if retry:
        answer["headers"] = _RETRY_AFTER
    return answer


def _generic() -> dict[str, Any]:
    """Any other 4xx (e.g. 405 for a wrong method) and 5xx: the same shape."""
    return {"4XX": _error("The request was refused"), "5XX": _error("The gateway failed")}


def gateway_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the gateway's paths and their schemas to the OpenAPI document ``schema`` (changed in place,
    and returned)."""
    _, defs = models_json_schema(
        [
            (m, "validation" if m is ChatCompletionRequest else "serialization")
            for m in (ChatCompletionRequest, ChatCompletion, ModelList, GatewayHealth, ErrorResponse)
        ],
        ref_template=_REF,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)
    tags = ["gateway"]
    schema.setdefault("paths", {}).update(
        {
            "/v1/chat/completions": {
                "post": {
                    "tags": tags,
                    "summary": "Chat completion (OpenAI-compatible)",
                    "description": "Served by the model group named in `model`, falling back to its "
                    "configured fallbacks. With `stream: true` the answer is Server-Sent Events "
                    "(`data: {chunk}` ... `data: [DONE]`); a stream broken mid-way is continued on "
                    "another endpoint, and only when nothing can continue it ends with an `error` event.",
                    "operationId": "chat_completions",
                    "parameters": [
                        {
                            "name": "x-brownout-budget",
                            "in": "header",
                            "required": False,
                            "description": "seconds this request may take in all (waits, attempts, "
                            "retries, fallbacks); default: the group's `budget`",
                            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                        }
                    ],
                    "requestBody": {"required": True, "content": _json("ChatCompletionRequest")},
                    "responses": {
                        "200": {
                            "description": "The upstream's answer",
                            "headers": _HEADERS_SERVED,
                            "content": {
                                **_json("ChatCompletion"),
                                # With stream: true, one schema per event (tools check each).
                                "text/event-stream": {"schema": _SSE_EVENT},
                            },
                        },
                        "400": _error("Not UTF-8, not JSON, not an object, NaN/Infinity, no `model`"),
                        "404": _error("No such model group (`model_not_found`)"),
                        "413": _error("Body over gateway.max_body_bytes"),
                        "415": _error("Not sent as Content-Type: application/json"),
                        "429": _error("The group is at capacity (`overloaded`)", retry=True),
                        "503": _error("No endpoint of the group or its fallbacks answered", retry=True),
                        "504": _error("The request's budget ran out first (`budget_exhausted`)", retry=True),
                        **_generic(),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "tags": tags,
                    "summary": "The model groups (OpenAI-compatible)",
                    "operationId": "list_models",
                    "responses": {
                        "200": {"description": "The model groups", "content": _json("ModelList")},
                        **_generic(),
                    },
                }
            },
            "/health/gateway": {
                "get": {
                    "tags": tags,
                    "summary": "The gateway's groups, endpoints and breakers",
                    "operationId": "gateway_health",
                    "responses": {
                        "200": {"description": "Some group can answer", "content": _json("GatewayHealth")},
                        "503": _error(
                            "No group can answer: the error shape, with the groups' state next to it",
                            retry=True,
                        ),
                        **_generic(),
                    },
                }
            },
        }
    )
    return schema
