"""The Prometheus alert rules (``deploy/prometheus``), checked and unit-tested with promtool.

promtool comes from Debian's ``prometheus`` package. Like the Redis and PostgreSQL tests' servers, a
missing promtool is installed once with ``scripts/promtool install`` (CI starts from a clean machine);
the tests are never skipped for it. That every metric the rules query is one ``/metrics`` exports is
checked against a running app in ``tests/server/test_metrics.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import ROOT

PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"
INSTALL = ROOT / "scripts" / "promtool"

# Seeds 000 and 004: alert -> (threshold in its expression, for, severity).
SEED_ALERTS = {
    "ModelDown": ("== 0", "1m", "high"),
    "QueueOverload": ("> 100", "5m", "medium"),
    "HighErrorRate": ("> 0.1", "5m", "high"),
    "HighCacheMissRate": ("> 0.8", "10m", "low"),
    "HighJSONFallbackRate": ("> 0.01", "5m", "warning"),
    "QwenCircuitBreakerOpen": ("== 1", "1m", "critical"),
    "LowCacheHitRate": ("< 0.7", "10m", "warning"),
    "LLMModelUnhealthy": ("== 0", "5m", "critical"),
}

_install_lock = threading.Lock()


def find_promtool() -> str | None:
    """promtool as scripts/promtool looks it up: BROWNOUT_PROMTOOL, PATH, /usr/bin, .venv/bin."""
    override = os.environ.get("BROWNOUT_PROMTOOL")
    if override and os.access(override, os.X_OK):
        return override
    found = shutil.which("promtool")
    if found:
        return found
    for candidate in (Path("/usr/bin/promtool"), ROOT / ".venv" / "bin" / "promtool"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool binary, installed with scripts/promtool install if missing (never skipped)."""
    with _install_lock:
        path = find_promtool()
        if path is None:
            print(f"brownout: promtool not found; running {INSTALL} install", file=sys.stderr)
            result = subprocess.run([str(INSTALL), "install"], check=False)
            path = find_promtool()
            if result.returncode != 0 or path is None:
                pytest.fail(f"promtool is missing and {INSTALL} install failed (exit {result.returncode})")
    return path


def run(promtool: str, *args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_loads_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n"
        "      - alert: Broken\n        expr: rate(http_errors_total[5m] > 1\n"
    )
    result = run(promtool, "check", "rules", str(broken))
    assert result.returncode != 0


def test_rules_keep_the_seeds_alerts_thresholds_and_durations() -> None:
    found = rules()
    for name, (threshold, duration, severity) in SEED_ALERTS.items():
        rule = found[name]
        assert threshold in rule["expr"], (name, rule["expr"])
        assert rule["for"] == duration, name
        assert rule["labels"]["severity"] == severity, name
    for name, rule in found.items():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
    spool = found["SpoolBacklog"]
    assert spool["expr"].rstrip().endswith("> 100")  # seed 000: more than 100 pending writes
    assert "for" not in spool  # at once, as the seed alerts
    assert spool["labels"]["severity"] == "critical"


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    fired: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = set(rules())
    assert names - fired == set(), "never seen firing"
    assert names - silent == set(), "never seen silent"


def _mutations() -> list[tuple[str, str, str]]:
    """(alert, text in its expression, replacement): each must make a unit test fail."""
    return [
        ("ModelDown", "min without (pid)", "max without (pid)"),
        ("QueueOverload", "> 100", "> 200"),
        ("QueueOverload", "sum without (pid) (queue_size)", "queue_size"),
        ("HighErrorRate", '{status=~"5.."}', ""),
        ("HighErrorRate", "> 0.1", "> 0.25"),
        ("HighCacheMissRate", "> 0.8", "> 0.95"),
        (
            "HighJSONFallbackRate",
            "sum without (model) (rate(llm_requests_total[5m]))",
            "rate(llm_requests_total[5m])",
        ),
        ("HighJSONFallbackRate", "> 0.01", "> 0.05"),
        ("QwenCircuitBreakerOpen", "== 1", ">= 1"),
        ("LowCacheHitRate", "< 0.7", "< 0.5"),
        ("LLMModelUnhealthy", "== 0", "== 1"),
        ("SpoolBacklog", "> 100", ">= 100"),
        ("SpoolDeadLetters", "> 0", "> 5"),
        ("SpoolEntriesLost", "> 0", "> 30"),
        ("SpoolEntriesLost", "sum without (pid) (spool_lost_entries)", "sum(spool_lost_entries)"),
    ]


@pytest.mark.parametrize(
    ("alert", "old", "new"), _mutations(), ids=lambda v: re.sub(r"\W+", "_", str(v))[:24]
)
def test_unit_tests_catch_a_changed_rule(
    promtool: str, tmp_path: Path, alert: str, old: str, new: str
) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert old in rule["expr"], (alert, rule["expr"])
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    assert run(promtool, "check", "rules", ALERTS.name, cwd=tmp_path).returncode == 0  # still valid
    result = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert result.returncode != 0, f"changing {old!r} to {new!r} in {alert} went unnoticed"
    assert f"alertname: {alert}" in result.stdout + result.stderr
