"""The gateway's 16 provider-fault scenarios (brownout.chaos.failover: scenarios, runner, console) and
``brownout drill gateway``: the catalogue as data, its config, the scorecard, and runs against a real
``brownout serve`` on 127.0.0.1."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError
from rich.console import Console
from typer.testing import CliRunner

import brownout.chaos.failover
from brownout.chaos.drills.command import drill
from brownout.chaos.drills.console import main as drill_main
from brownout.chaos.failover.console import list_rows, markdown, scorecard_table
from brownout.chaos.failover.console import main as gateway_main
from brownout.chaos.failover.grading import Exchange, Verdict
from brownout.chaos.failover.runner import (
    ScenarioScore,
    Scorecard,
    gateway_config,
    run_catalogue,
    supports_context_window,
)
from brownout.chaos.failover.scenarios import CATALOGUE, find
from brownout.gateway.config import GatewaySection

ISSUE_17 = [
    "rate-limit-retry-after",
    "rate-limit-no-hint",
    "server-error",
    "unavailable",
    "connection-reset",
    "silent-provider",
    "slow-first-token",
    "stream-cut",
    "stream-stall",
    "stream-malformed",
    "no-done",
    "context-length",
    "content-filter",
    "prefill-rejected",
    "flapping-primary",
    "accounting",
]


def test_the_catalogue_is_the_16_scenarios_in_order() -> None:
    assert brownout.chaos.failover.__all__ == []
    assert [s.name for s in CATALOGUE] == ISSUE_17
    assert [r["name"] for r in list_rows()] == [f"gateway-{n}" for n in ISSUE_17]
    assert all(s.passes_when and s.title for s in CATALOGUE)


def test_find_takes_the_family_a_drill_name_or_a_bare_name() -> None:
    assert find(["gateway"]) == list(CATALOGUE)
    assert find(["gateway-all"]) == list(CATALOGUE)
    assert [s.name for s in find(["gateway-no-done", "stream-cut"])] == ["stream-cut", "no-done"]
    with pytest.raises(KeyError, match=r"unknown gateway scenario\(s\) gateway-nope; known: gateway, "):
        find(["gateway-nope"])


def test_the_config_holds_each_scenarios_groups_on_the_defaults() -> None:
    urls = {s.name: ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3") for s in CATALOGUE}
    windows = supports_context_window()
    section = GatewaySection.model_validate(gateway_config(CATALOGUE, urls, context_window=windows))
    cut = section.groups["chat-stream-cut"]
    assert cut.fallbacks == ["backup-stream-cut"]
    assert [e.label for e in cut.endpoints] == ["primary"]
    assert [e.label for e in section.groups["backup-stream-cut"].endpoints] == ["backup"]
    assert "control-accounting" in section.groups
    # Nothing but the endpoints and fallbacks (and declared context windows) is set: the defaults rule.
    raw = gateway_config(CATALOGUE, urls, context_window=True)["groups"]
    assert {k for g in raw.values() for k in g} == {"endpoints", "fallbacks", "context_window"}
    assert raw["chat-context-length"]["context_window"] == 4096
    assert raw["backup-context-length"]["context_window"] == 32768
    if not windows:
        # Until the gateway declares context windows, a config with them is refused: the runner
        # leaves them out and says so.
        with pytest.raises(ValidationError, match="context_window"):
            GatewaySection.model_validate({"groups": raw})


def card() -> Scorecard:
    def score(name: str, grade: str, reason: str, calls: dict[str, int]) -> ScenarioScore:
        (s,) = find([name])
        return ScenarioScore(s, Verdict(grade, reason), 1.5, calls, {}, [Exchange(text="w01")])  # type: ignore[arg-type]

    return Scorecard(
        [
            score("server-error", "pass", "the complete answer", {"primary": 2, "backup": 1}),
            score("stream-cut", "safe", "a clean error: a | pipe", {"primary": 1, "backup": 0}),
            score("accounting", "partial", "headers off", {"primary": 2, "backup": 1, "control": 1}),
        ],
        12.0,
        when="2026-12-05T12:00:00+00:00",
    )


def test_the_scorecard_renders_as_json_markdown_and_a_table() -> None:
    c = card()
    assert c.summary() == {"pass": 1, "partial": 1, "safe": 1, "fail": 0}
    assert not c.all_pass
    data = c.to_json()
    assert data["summary"] == c.summary()
    assert [s["name"] for s in data["scenarios"]] == [
        "gateway-server-error",
        "gateway-stream-cut",
        "gateway-accounting",
    ]
    assert data["scenarios"][2]["calls"] == {"primary": 2, "backup": 1, "control": 1}
    assert data["peers_published"]["Portkey"]["pass"] == 11
    assert data["prior_independent_run"] == {"pass": 6, "partial": 2, "safe": 6, "fail": 2}
    md = markdown(c)
    assert "| 2 | `stream-cut` | **safe** | 1.5 | 1 / 0 | a clean error: a \\| pipe |" in md
    assert "Totals: 1 pass, 1 partial, 1 safe, 0 fail." in md
    assert "timeline" not in data["scenarios"][0]
    (flapping,) = find(["flapping-primary"])
    many = ScenarioScore(
        flapping,
        Verdict("partial", "primary late"),
        3.0,
        {"primary": 1, "backup": 1},
        {},
        [
            Exchange(started=10.0, error="APIError: no endpoint", clean_error=True),
            Exchange(started=12.5, text="w01", headers={"x-brownout-served-by": "chat-x/primary"}),
        ],
    )
    assert many.to_json()["timeline"] == [
        "  0.00 s  error: APIError: no endpoint",
        "  2.50 s  chat-x/primary",
    ]
    out = io.StringIO()
    Console(file=out, width=200).print(scorecard_table(c))
    assert "gateway-accounting" in out.getvalue()
    assert "2 / 1 / 1" in out.getvalue()


def test_the_drill_command_lists_the_gateway_family_beside_the_drills() -> None:
    app_result = CliRunner().invoke(_app(), ["--list", "--json"])
    assert app_result.exit_code == 0, app_result.output
    listed = json.loads(app_result.output)
    assert [r["name"] for r in listed["gateway_scenarios"]] == [f"gateway-{n}" for n in ISSUE_17]
    assert not any(r["name"].startswith("gateway") for r in listed["scenarios"])
    out = io.StringIO()
    assert drill_main([], list_only=True, console=Console(file=out, width=240)) == 0
    assert "gateway-prefill-rejected" in out.getvalue()


def test_unknown_or_mixed_gateway_names_are_refused_before_anything_starts() -> None:
    assert CliRunner().invoke(_app(), ["gateway-nope"]).exit_code == 2
    assert gateway_main(["gateway-nope"], console=Console(file=io.StringIO())) == 2
    assert drill_main(["gateway", "redis-down"], console=Console(file=io.StringIO())) == 2
    assert drill_main(["gateway-stream-cut"], fast=True, console=Console(file=io.StringIO())) == 2


def _app() -> object:
    import typer

    app = typer.Typer()
    app.command()(drill)
    return app


@pytest.mark.timeout(180)
async def test_every_provider_fault_is_rescued_with_the_default_gateway_settings() -> None:
    # The whole catalogue against a real `brownout serve` with the official client: the slowest
    # scenarios wait out the default first-token (15 s) and stall (10 s) limits, all at once.
    scores = []
    card = await run_catalogue(on_score=scores.append)
    assert len(scores) == len(card.scores) == 16
    assert card.summary()["pass"] == 16, json.dumps(card.to_json(), indent=2)
    by = {s.scenario.name: s for s in card.scores}
    assert by["content-filter"].calls == {"primary": 1, "backup": 0}
    assert by["server-error"].calls["backup"] == 1
    assert by["server-error"].did["primary"] == {"status": by["server-error"].calls["primary"]}
    (ex,) = by["server-error"].exchanges
    assert ex.models == ["backup-server-error"]
    assert ex.headers["x-brownout-served-by"] == "backup-server-error/backup"
    assert by["rate-limit-retry-after"].calls == {"primary": 2, "backup": 0}
    assert by["no-done"].calls["backup"] == 0
    assert card.all_pass
