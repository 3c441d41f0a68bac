"""The gateway's routes in the server's OpenAPI document (brownout.gateway.openapi): its paths, their
schemas, and the one error shape on every error status."""

from __future__ import annotations

from typing import Any

from brownout.gateway.openapi import (
    ChatCompletion,
    ChatCompletionRequest,
    GatewayHealth,
    ModelList,
    gateway_openapi,
)

PATHS = {"/v1/chat/completions": "post", "/v1/models": "get", "/health/gateway": "get"}


def operation(schema: dict[str, Any], path: str) -> dict[str, Any]:
    op: dict[str, Any] = schema["paths"][path][PATHS[path]]
    return op


def test_the_gateway_paths_are_added_to_a_document() -> None:
    schema: dict[str, Any] = {"openapi": "3.1.0", "paths": {"/v1/briefs": {"post": {}}}}
    assert gateway_openapi(schema) is schema  # changed in place
    assert set(schema["paths"]) == {"/v1/briefs", *PATHS}
    for path in PATHS:
        op = operation(schema, path)
        assert op["tags"] == ["gateway"]
        assert {"4XX", "5XX"} <= set(op["responses"])
    assert [operation(schema, p)["operationId"] for p in PATHS] == [
        "chat_completions",
        "list_models",
        "gateway_health",
    ]


def test_every_schema_referenced_is_in_the_components() -> None:
    schema = gateway_openapi({})
    components = schema["components"]["schemas"]
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema["paths"])
    walk(components)
    assert {"ChatCompletionRequest", "ChatCompletion", "ModelList", "GatewayHealth", "ErrorResponse"} <= set(
        refs
    )
    assert set(refs) <= set(components)


def test_a_component_already_there_is_kept() -> None:
    ours = {"title": "ErrorResponse", "description": "the server's own"}
    schema = gateway_openapi({"components": {"schemas": {"ErrorResponse": ours}}})
    assert schema["components"]["schemas"]["ErrorResponse"] is ours


def test_errors_that_can_pass_say_when_to_retry() -> None:
    schema = gateway_openapi({})
    chat = operation(schema, "/v1/chat/completions")["responses"]
    for status in ("429", "503"):
        assert "Retry-After" in chat[status]["headers"], status
    for status in ("400", "404", "413", "415"):
        assert "headers" not in chat[status], status
        assert chat[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    # A streamed answer is documented event by event, beside the whole JSON answer.
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "x-brownout-served-by" in chat["200"]["headers"]
    assert "Retry-After" in operation(schema, "/health/gateway")["responses"]["503"]["headers"]


def test_the_models_pass_on_the_fields_they_do_not_read() -> None:
    # The gateway reads model and stream; everything else is the upstream's business.
    request = ChatCompletionRequest.model_validate(
        {"model": "chat", "messages": [{"role": "user", "content": "hi", "name": "ann"}], "temperature": 0.2}
    )
    dumped = request.model_dump(exclude_none=True)
    assert dumped["temperature"] == 0.2
    assert dumped["messages"][0]["name"] == "ann"
    answer = ChatCompletion.model_validate(
        {
            "id": "c1",
            "created": 1,
            "model": "chat",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "system_fingerprint": "fp",
        }
    )
    assert answer.object == "chat.completion"
    assert answer.model_dump()["system_fingerprint"] == "fp"
    models = ModelList.model_validate({"data": [{"id": "chat", "created": 0, "owned_by": "brownout"}]})
    assert (models.object, models.data[0].object) == ("list", "model")
    assert GatewayHealth.model_validate({"status": "disabled", "groups": {}}).status == "disabled"
