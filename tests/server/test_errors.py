"""One error shape for both APIs, strict JSON bodies, the gateway in /openapi.json, /docs offline.

The catalogue sends bad requests of every kind to the brief API and the gateway of one app running on
uvicorn on 127.0.0.1 (model roles and the gateway's upstream are :class:`FakeLLM` servers) and checks
every answer with the one schema, :class:`~brownout.server.errors.ErrorResponse`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout.chaos.fakellm import FakeLLM
from brownout.server.errors import (
    MAX_DEPTH,
    ApiError,
    ErrorResponse,
    error_bytes,
    parse_json_body,
)
from support.live import LiveStack, live_stack
from support.wait import until

TOKEN = "catalogue-token"
JSON = {"content-type": "application/json"}
AUTH = {**JSON, "authorization": f"Bearer {TOKEN}"}


def check_error(response: httpx.Response) -> dict[str, Any]:
    """Assert that ``response`` is an error answer of the one shape; returns its ``error`` object."""
    assert 400 <= response.status_code < 600, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    parsed = ErrorResponse.model_validate_json(response.content)
    error = parsed.error
    assert error.message.strip()
    if response.status_code in (429, 503):
        assert error.retry_after is not None, response.text
        assert int(response.headers["retry-after"]) == error.retry_after
    if error.errors:
        assert error.param is not None
    body: dict[str, Any] = response.json()["error"]
    return body


@asynccontextmanager
async def app_with_gateway(
    tmp_path: Path, overrides: dict[str, Any] | None = None
) -> AsyncIterator[LiveStack]:
    upstream = FakeLLM(model="chat")
    await upstream.start()
    try:
        over = {"gateway": {"groups": {"chat": {"endpoints": [{"url": upstream.url}]}}}, **(overrides or {})}
        async with live_stack(tmp_path, over, admin_token=TOKEN) as stack:
            yield stack
    finally:
        await upstream.stop()


# (name, method, path, body, headers, expected status, expected code or None)
CATALOGUE: list[tuple[str, str, str, bytes | None, dict[str, str], int, str | None]] = [
    ("unknown path", "GET", "/v1/nothing-here", None, {}, 404, "not_found"),
    ("wrong method", "DELETE", "/v1/briefs", None, {}, 405, "method_not_allowed"),
    ("no content type", "POST", "/v1/briefs", b'{"text": "a rose"}', {}, 415, "unsupported_media_type"),
    (
        "wrong content type",
        "POST",
        "/v1/briefs",
        b"text=a+rose",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    ("not UTF-8", "POST", "/v1/briefs", b'{"text": "caf\xe9"}', JSON, 400, "invalid_encoding"),
    ("malformed JSON", "POST", "/v1/briefs", b'{"text": "a rose",}', JSON, 400, "invalid_json"),
    ("NaN", "POST", "/v1/briefs", b'{"text": NaN}', JSON, 400, "invalid_number"),
    ("Infinity", "POST", "/v1/briefs", b'{"text": "a rose", "mode": Infinity}', JSON, 400, "invalid_number"),
    ("-Infinity", "POST", "/v1/briefs", b'{"text": -Infinity}', JSON, 400, "invalid_number"),
    ("lone surrogate", "POST", "/v1/briefs", b'{"text": "\\ud800"}', JSON, 400, "invalid_unicode"),
    (
        "too deep",
        "POST",
        "/v1/briefs",
        b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        JSON,
        400,
        "too_deep",
    ),
    (
        "too large",
        "POST",
        "/v1/briefs",
        b'{"text": "' + b"r" * 20_000 + b'"}',
        JSON,
        413,
        "request_too_large",
    ),
    ("empty body", "POST", "/v1/briefs", b"", JSON, 422, "validation_failed"),
    ("missing field", "POST", "/v1/briefs", b'{"mode": "fast"}', JSON, 422, "validation_failed"),
    ("wrong type", "POST", "/v1/briefs", b'{"text": 42}', JSON, 422, "validation_failed"),
    (
        "bad mode",
        "POST",
        "/v1/briefs",
        b'{"text": "a rose", "mode": "turbo"}',
        JSON,
        422,
        "validation_failed",
    ),
    ("text too long", "POST", "/v1/briefs", b'{"text": "' + b"r" * 2001 + b'"}', JSON, 422, "invalid_value"),
    ("bad query", "GET", "/health/llm?model=gpt", None, {}, 422, "validation_failed"),
    ("unknown model role", "GET", "/health/models/gpt", None, {}, 404, "model_not_found"),
    ("admin without token", "POST", "/api/v1/recovery/reset", None, {}, 401, "missing_token"),
    (
        "admin with a wrong token",
        "POST",
        "/api/v1/recovery/reset",
        None,
        {"authorization": "Bearer wrong"},
        401,
        "invalid_token",
    ),
    ("trigger NaN", "POST", "/api/v1/recovery/trigger", b'{"action": NaN}', AUTH, 400, "invalid_number"),
    (
        "trigger lone surrogate",
        "POST",
        "/api/v1/recovery/trigger",
        b'{"action": "reset_breakers", "target": "\\udfff"}',
        AUTH,
        400,
        "invalid_unicode",
    ),
    (
        "trigger unknown action",
        "POST",
        "/api/v1/recovery/trigger",
        b'{"action": "reboot"}',
        AUTH,
        422,
        "invalid_value",
    ),
    ("trigger neither", "POST", "/api/v1/recovery/trigger", b"{}", AUTH, 422, "validation_failed"),
    ("docs asset unknown", "GET", "/docs/static/nothing.js", None, {}, 404, "not_found"),
    # The gateway.
    (
        "gateway unknown model",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-17", "messages": []}',
        JSON,
        404,
        "model_not_found",
    ),
    ("gateway no model", "POST", "/v1/chat/completions", b'{"messages": []}', JSON, 400, "missing_model"),
    ("gateway not an object", "POST", "/v1/chat/completions", b"[1, 2]", JSON, 400, None),
    (
        "gateway malformed JSON",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat"',
        JSON,
        400,
        "invalid_json",
    ),
    (
        "gateway no content type",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat"}',
        {},
        415,
        "unsupported_media_type",
    ),
    (
        "gateway not UTF-8",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat\xff"}',
        JSON,
        400,
        "invalid_encoding",
    ),
    (
        "gateway NaN",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat", "temperature": NaN}',
        JSON,
        400,
        "invalid_number",
    ),
    (
        "gateway lone surrogate",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        JSON,
        400,
        "invalid_unicode",
    ),
    (
        "gateway too deep",
        "POST",
        "/v1/chat/completions",
        b"[" * 100_000 + b"]" * 100_000,
        JSON,
        400,
        "too_deep",
    ),
    (
        "gateway bad stream flag",
        "POST",
        "/v1/chat/completions",
        b'{"model": "chat", "stream": "yes"}',
        JSON,
        400,
        "invalid_value",
    ),
    ("gateway wrong method", "GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed"),
]


async def test_every_bad_request_gets_the_one_error_shape_and_never_a_500(tmp_path: Path) -> None:
    async with app_with_gateway(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        before = {role: fake.chat_requests for role, fake in stack.fakes.items()}
        seen: dict[str, tuple[int, dict[str, Any]]] = {}
        for name, method, path, body, headers, status, code in CATALOGUE:
            response = await http.request(method, path, content=body, headers=headers)
            assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
            error = check_error(response)
            if code is not None:
                assert error["code"] == code, f"{name}: {error}"
            seen[name] = (response.status_code, error)
        # Nothing that was refused reached a model.
        assert {role: fake.chat_requests for role, fake in stack.fakes.items()} == before

    # The answers say what was wrong, and where.
    assert "byte 0xe9 at offset 13" in seen["not UTF-8"][1]["message"]
    assert "line 1 column 19" in seen["malformed JSON"][1]["message"]
    assert "Content-Type: application/json" in seen["no content type"][1]["message"]
    assert "application/x-www-form-urlencoded" in seen["wrong content type"][1]["message"]
    for name, field in (
        ("NaN", "text"),
        ("Infinity", "mode"),
        ("-Infinity", "text"),
        ("lone surrogate", "text"),
    ):
        error = seen[name][1]
        assert error["param"] == field, name
        assert error["errors"][0]["loc"] == ["body", field], name
    assert seen["trigger lone surrogate"][1]["param"] == "target"
    assert seen["gateway lone surrogate"][1]["param"] == "messages.0.content"
    assert seen["gateway NaN"][1]["param"] == "temperature"
    assert seen["bad mode"][1]["errors"][0]["loc"] == ["body", "mode"]
    assert seen["bad query"][1]["param"] == "model"
    assert seen["too large"][1]["limit_bytes"] == 16_384
    assert seen["admin without token"][1]["type"] == "authentication_error"
    assert seen["unknown path"][1]["type"] == "not_found_error"
    assert "allowed: POST" in seen["wrong method"][1]["message"]


async def test_refused_callers_are_told_later_and_later_times_and_health_shows_how_far(
    tmp_path: Path,
) -> None:
    # One pipeline of 0.6 s and a 1 s target: a request finding it busy cannot start in time. Each
    # refused one gets its own place in the line of returns (queue.retry_pacing, on by default).
    overrides = {
        "queue": {"max_concurrent": 1},
        "dimmer": {"targets": {"fast": 1.0, "balanced": 1.0, "creative": 1.0}},
    }
    async with (
        app_with_gateway(tmp_path, overrides) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):

        def brief(name: str) -> Any:
            return http.post("/v1/briefs", json={"text": f"a rose perfume, {name}", "mode": "fast"})

        stack.runtime.service.dimmer.force(0.0)
        stack.fakes["qwen"].set("slow", delay=0.6)
        assert (await brief("measured")).status_code == 200
        busy = asyncio.create_task(brief("busy"))
        await until(lambda: stack.runtime.service.admission.in_flight == 1, "the only pipeline taken")
        told: list[int] = []
        for i in range(12):
            answer = await brief(f"request {i}")
            assert answer.status_code == 503
            assert check_error(answer)["retry_after"] == int(answer.headers["retry-after"])
            told.append(int(answer.headers["retry-after"]))
        health = (await http.get("/health")).json()
        metrics = (await http.get("/metrics")).text
        assert not busy.done()  # every refusal came while the one pipeline ran
        assert told == sorted(told)
        assert told[-1] > told[0]  # twelve places, 0.15 s apart: not all back in the same second
        assert 1.0 < health["retry_line_seconds"] <= told[-1]
        assert "brownout_retry_line_seconds " in metrics
        assert (await busy).status_code == 200


async def test_overload_and_unhealthy_answers_carry_retry_after(tmp_path: Path) -> None:
    overrides = {"queue": {"max_size": 1, "max_concurrent": 1}}
    async with (
        app_with_gateway(tmp_path, overrides) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        stack.fakes["qwen"].set("slow", delay=0.5)
        answers = await asyncio.gather(
            *(
                http.post("/v1/briefs", json={"text": f"a rose perfume, request {i}", "mode": "fast"})
                for i in range(6)
            )
        )
        shed = [a for a in answers if a.status_code == 503]
        assert len(shed) == 4, [a.status_code for a in answers]
        for answer in shed:
            error = check_error(answer)
            assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
            assert error["queue_size"] == 1
            assert error["suggestion"]

        stack.fakes["qwen"].set("error")
        probe = await http.get("/health/llm", params={"model": "qwen"})
        assert probe.status_code == 503
        error = check_error(probe)
        assert error["code"] == "model_unhealthy"
        assert probe.json()["status"] == "unhealthy"  # the probe's own fields stay next to error
        assert check_error(await http.get("/health/models/qwen"))["code"] == "model_unhealthy"


async def test_an_unexpected_error_is_a_500_in_the_shape_and_logged_not_leaked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with live_stack(tmp_path) as stack:

        @stack.app.get("/test-only/boom")
        async def boom() -> None:
            raise RuntimeError("secret internals at /srv/brownout")

        caplog.set_level(logging.ERROR, logger="brownout.errors")
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            response = await http.get("/test-only/boom")
        assert response.status_code == 500
        error = check_error(response)
        assert (error["type"], error["code"]) == ("server_error", "internal_error")
        assert "secret" not in response.text
        assert "Traceback" not in response.text
    logged = [r for r in caplog.records if r.name == "brownout.errors"]
    assert logged
    assert logged[0].exc_info is not None
    assert "secret internals" in str(logged[0].exc_info[1])


# ---------------------------------------------------------------------------------------------- schema


async def test_openapi_documents_the_gateway_and_the_error_shape(tmp_path: Path) -> None:
    async with app_with_gateway(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        spec = (await http.get("/openapi.json")).json()
        models = await http.get("/v1/models")  # still served by the gateway's own route
        assert models.json()["data"][0]["id"] == "chat"
    paths = spec["paths"]
    schemas = spec["components"]["schemas"]
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest"
    )
    assert {"model", "messages"} <= set(schemas["ChatCompletionRequest"]["required"])
    assert set(chat["responses"]) >= {"200", "400", "404", "413", "415", "429", "503"}
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    assert paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/ModelList")
    assert "503" in paths["/health/gateway"]["get"]["responses"]
    # Every error status of every operation is the one shape; FastAPI's own is gone.
    assert "HTTPValidationError" not in schemas
    refs = 0
    for path, item in paths.items():
        for method, operation in item.items():
            errors = {k: v for k, v in operation["responses"].items() if k[0] in "45"}
            assert errors, f"{method} {path} documents no error answer"
            for status, answer in errors.items():
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorResponse", (path, method, status)
                refs += 1
    assert refs >= 2 * len(paths)
    # Every reference resolves.
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec))):
        assert ref in schemas, ref
    error_body = schemas["ErrorBody"]
    assert {"message", "type", "code", "param"} <= set(error_body["properties"])
    assert {"retry_after", "queue_size", "suggestion", "errors"} <= set(error_body["properties"])


# ---------------------------------------------------------------------------------------------- /docs


async def test_docs_load_every_asset_from_this_server(tmp_path: Path) -> None:
    async with live_stack(tmp_path) as stack, httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        assert not re.search(r"""(src|href|url)\s*[=:]\s*["']?(https?:)?//""", html), html
        assets = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
        assert sorted(assets) == [
            "/docs/static/favicon-32x32.png",
            "/docs/static/swagger-ui-bundle.js",
            "/docs/static/swagger-ui.css",
        ]
        kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
        for asset in assets:
            answer = await http.get(asset)
            assert answer.status_code == 200, asset
            assert answer.headers["content-type"].startswith(kinds[Path(asset).suffix]), asset
            assert len(answer.content) > 500, asset
        assert b"SwaggerUIBundle" in (await http.get("/docs/static/swagger-ui-bundle.js")).content
        assert "url: '/openapi.json'" in html
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/redoc")).status_code == 404


# ---------------------------------------------------------------------------------------------- units

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_json_values)
@settings(max_examples=200)
def test_valid_json_parses_to_what_was_sent(value: Any) -> None:
    assert parse_json_body(json.dumps(value).encode()) == value
    assert parse_json_body(json.dumps(value, ensure_ascii=False).encode()) == value


_BODY_CODES = {"invalid_encoding", "invalid_json", "too_deep", "invalid_number", "invalid_unicode"}


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_any_bytes_parse_or_are_refused_with_a_400(raw: bytes) -> None:
    refused: ApiError | None = None
    try:
        parse_json_body(raw)
    except ApiError as e:
        refused = e
    if refused is not None:
        assert refused.status_code == 400
        assert refused.fields["code"] in _BODY_CODES


@given(st.integers(min_value=1, max_value=3 * MAX_DEPTH))
def test_nesting_is_refused_past_the_limit(depth: int) -> None:
    raw = ("[" * depth + "]" * depth).encode()
    if depth <= MAX_DEPTH:
        assert parse_json_body(raw) is not None
    else:
        with pytest.raises(ApiError) as refused:
            parse_json_body(raw)
        assert refused.value.fields["code"] == "too_deep"


@given(
    st.integers(min_value=400, max_value=599),
    st.text(min_size=0, max_size=50),
    st.none() | st.floats(min_value=0, max_value=1e6),
)
def test_every_error_made_is_the_one_shape(status: int, message: str, retry_after: float | None) -> None:
    raw = error_bytes(status, message, retry_after=retry_after)
    error = ErrorResponse.model_validate_json(raw).error
    assert error.message
    if status in (429, 503):
        assert error.retry_after is not None
        assert error.retry_after >= 1


async def test_the_brief_cli_says_what_the_server_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from brownout.cli import app

    async with live_stack(tmp_path) as stack:
        # The CLI is synchronous: it runs in a thread while this loop serves the app.
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["brief", "a rose perfume", "--mode", "turbo", "--url", stack.url]
        )
    assert result.exit_code == 1
    assert "HTTP 422 invalid_request_error: mode: Input should be" in result.stderr
    assert json.loads(result.stdout)["error"]["param"] == "mode"
