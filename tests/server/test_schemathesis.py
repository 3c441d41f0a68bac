"""Schemathesis over the app's own OpenAPI spec: no server error, one error shape, no hang.

The app runs on a real uvicorn on 127.0.0.1 with the project's own HTTP protocol and connection limits
(:mod:`support.fuzz`: in a thread, since schemathesis's pytest integration is synchronous), each model
role and a gateway model group (``chat``) on a healthy :class:`~brownout.chaos.fakellm.FakeLLM`, so
nothing heavy runs: no local model, no real upstream.

Every operation of the spec (the gateway's too: they are in the document) goes through schemathesis'
three phases, derandomized so a run is repeatable:

* **examples** -- the examples of the spec; this test adds the names a fuzzer cannot guess (the
  gateway's model group, the recovery actions and failure types) so requests reach the upstream and
  the recovery manager instead of stopping at a 404 or 422;
* **coverage** -- boundary and negative values of every parameter and body field, every missing
  required part, and the methods an operation does not take;
* **fuzzing** -- up to ``MAX_EXAMPLES`` generated requests (valid and invalid bodies, parameters and
  headers).

Admin operations get the admin token, except in the coverage phase's cases about the
``Authorization`` header itself (a missing or wrong token: 401), so both the refusals and the recovery
API behind them are fuzzed; with external model
endpoints the recovery actions only act inside the process (caches, breakers, switches), and
``recovery.admin_timeout`` is short so a longer run answers 202 in time.

Checked on every answer: no 5xx except a 503 that says when to retry (``Retry-After`` and
``retry_after``), or the gateway's 504 ``budget_exhausted`` for a request that asked for a budget too
short to be served; every 4xx/5xx is the one error shape
(:class:`~brownout.server.errors.ErrorResponse`); status code, content type and body conform to the
spec; and no request takes longer than ``BOUND`` seconds -- a generous bound on behaviour (a hang or
a wait on something that never comes), not a performance figure.
Left out: ``GET /api/v1/events`` (an endless stream; ``tests/server/test_live.py`` covers it).
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    CheckContext,
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from brownout.config import ROLES
from brownout.events import EventBus
from brownout.recovery import actions
from brownout.recovery.classify import FailureType
from brownout.server.app import create_app
from brownout.server.runtime import Runtime
from support.fuzz import ADMIN_TOKEN, BOUND, GROUP, assert_error_shape, overrides, running_app
from support.stack import make_config

# Per operation, for the fuzzing phase (examples and coverage run whole); =500 digs deeper by hand.
MAX_EXAMPLES = int(os.environ.get("BROWNOUT_SCHEMATHESIS_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with FakeLLM roles and gateway group, served by uvicorn in a thread; yields its base URL."""
    with running_app(tmp_path_factory.mktemp("schemathesis")) as running:
        yield running.url


def _spec() -> dict[str, Any]:
    """The app's OpenAPI spec, built without starting anything (placeholder upstreams)."""
    config = make_config(
        dict.fromkeys(ROLES, "http://127.0.0.1:9"), Path("unused.db"), overrides("http://127.0.0.1:9")
    )
    return create_app(config, Runtime(config, events=EventBus())).openapi()


_ACTIONS = [
    actions.CLEAR_CACHE,
    actions.RESET_BREAKERS,
    actions.CHECK_HEALTH,
    actions.RESTART_MODEL_SERVER,
    actions.RETRY_MODEL_LOAD,
    actions.REDUCE_GENERATION_PARAMS,
    actions.CPU_OFFLOAD,
    actions.FALLBACK_TO_RULES,
]


def _with_examples(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with examples of the names a generator cannot guess: the gateway's model group, the
    recovery actions and failure types, and the model roles as targets."""
    out = copy.deepcopy(spec)
    schemas = out["components"]["schemas"]
    schemas["ChatCompletionRequest"]["properties"]["model"]["examples"] = [GROUP]
    # Whole bodies: the action and the failure type exclude each other.
    schemas["TriggerRequest"]["examples"] = [
        *({"action": name} for name in _ACTIONS),
        *({"action": actions.RESET_BREAKERS, "target": role} for role in ROLES),
        *({"failure_type": kind.value, "target": "all"} for kind in FailureType),
    ]
    return out


# Loaded at import: schemathesis's lazy fixture loader does not run on pytest 9 (it sets a private
# attribute pytest no longer has). The spec the running app serves is the same; a test checks it.
schema = schemathesis.openapi.from_dict(_with_examples(_spec())).exclude(path="/api/v1/events")


def no_server_error_and_one_error_shape(
    ctx: CheckContext, response: Any, case: schemathesis.Case
) -> bool | None:
    """No 5xx but a 503 (or a spent budget's 504) that says when to retry; every 4xx/5xx in the one
    error shape."""
    what = f"{case.method} {case.formatted_path}"
    assert_error_shape(response.status_code, response.headers, response.content, what)
    return None


SEEN: Counter[tuple[str, str, str, int]] = Counter()
"""Answers by (method, path, phase, status), for the test that the fuzzing reached what it should."""

CHECKS = [
    no_server_error_and_one_error_shape,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _with_admin_token(case: schemathesis.Case) -> None:
    """Admin operations get the admin token, except in the coverage phase's cases about the
    ``Authorization`` header itself: those test the refusal of a missing or wrong one (401)."""
    if not case.path.startswith("/api/v1/recovery/") or case.method.upper() != "POST":
        return
    data = case.meta.phase.data if case.meta is not None else None
    if getattr(data, "parameter", None) == "authorization":
        return
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    case.headers = headers


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_with_a_server_error_or_hangs(case: schemathesis.Case, app_url: str) -> None:
    _with_admin_token(case)
    started = time.monotonic()
    # requests' timeout bounds the wait for each read; the total is checked after.
    response = case.call(base_url=app_url, timeout=BOUND)
    took = time.monotonic() - started
    assert took < BOUND, f"{case.method} {case.path} took {took:.1f} s (bound {BOUND:g} s)"
    phase = case.meta.phase.name.value if case.meta is not None else "explicit"
    SEEN[(case.method.upper(), case.path, phase, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_spec_covers_the_operations_routes(app_url: str) -> None:
    import httpx

    spec = httpx.get(f"{app_url}/openapi.json", timeout=30).json()
    assert spec == _spec()  # the spec fuzzed is the one served
    paths = set(spec["paths"])
    for path in (
        "/v1/briefs",
        "/health",
        "/health/llm",
        "/api/v1/status",
        "/api/v1/config/summary",
        "/api/v1/selftest/cache",
        "/api/v1/events",
        "/dashboard",
        "/api/v1/recovery/trigger",
        "/v1/chat/completions",
        "/v1/models",
        "/health/gateway",
    ):
        assert path in paths, path


def test_the_fuzzing_reached_the_recovery_api_the_upstream_and_every_phase() -> None:
    """Not only refusals: admin calls acted, chats reached the upstream, each phase ran everywhere."""
    if not SEEN:
        pytest.skip("runs after the fuzzing test in the same session")
    ok: Counter[tuple[str, str]] = Counter()
    for (method, path, _, status), n in SEEN.items():
        if status < 300:
            ok[(method, path)] += n
    refused = {(m, p, s) for (m, p, _, s) in SEEN}
    assert ok[("POST", "/v1/chat/completions")] > 0
    assert ok[("POST", "/api/v1/recovery/trigger")] > 0
    assert ok[("POST", "/api/v1/recovery/reset")] > 0
    assert ok[("POST", "/v1/briefs")] > 0
    assert ("POST", "/api/v1/recovery/trigger", 401) in refused  # a wrong token is still refused
    operations = {(m, p) for (m, p, _, _) in SEEN if (m, p) in ok}
    for phase in ("coverage", "fuzzing"):
        ran = {(m, p) for (m, p, ph, _) in SEEN if ph == phase}
        assert operations <= ran, (phase, operations - ran)
    # The examples added to the spec were sent, and acted: actions ran, the upstream answered.
    for path in ("/api/v1/recovery/trigger", "/v1/chat/completions"):
        assert any((m, p, ph) == ("POST", path, "examples") and s < 300 for (m, p, ph, s) in SEEN), path


def test_the_spec_documents_what_the_server_sends() -> None:
    """Found by the conformance checks: /metrics was documented as JSON, and the chat stream's events
    as bare strings (a tool checks each event, an object with ``data``)."""
    spec = _spec()
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    event = chat["text/event-stream"]["schema"]
    assert event["type"] == "object"
    assert event["required"] == ["data"]
