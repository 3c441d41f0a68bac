"""What the drills' plays work with (brownout.chaos.drills.harness) and the drill's child processes
(brownout.chaos.drills.processes): the drill server's config, the processes' lives and their logs."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from brownout.chaos.drills.harness import (
    DrillProgress,
    DrillSettings,
    config_has,
    seconds_text,
    server_config,
)
from brownout.chaos.drills.processes import BrownoutServer, ChildProcess, DrillError, log_tail
from brownout.config import BrownoutConfig
from support.wait import until

URLS = {"qwen": "http://127.0.0.1:9001", "mistral": "http://127.0.0.1:9002", "llama": "http://127.0.0.1:9003"}


def test_the_drill_server_waits_briefly_and_talks_to_the_fakes(tmp_path: Path) -> None:
    settings = DrillSettings()
    config = server_config(settings, 8123, URLS, tmp_path)
    validated = BrownoutConfig.model_validate(config)  # a config the server accepts
    assert (validated.server.host, validated.server.port) == ("127.0.0.1", 8123)
    assert validated.models.local.enabled is False  # every role has a fake
    assert validated.models.health_interval == settings.health_interval
    assert validated.circuit_breaker.timeout == settings.breaker_timeout
    assert [str(e.url) for e in validated.models.roles["qwen"].endpoints] == ["http://127.0.0.1:9001"]
    assert validated.models.roles["qwen"].timeout == settings.role_timeout
    assert validated.database.url == f"sqlite+aiosqlite:///{tmp_path / 'briefs.db'}"
    assert validated.database.check_interval == settings.health_interval


def test_a_role_without_a_fake_runs_the_local_model_and_overrides_come_last(tmp_path: Path) -> None:
    urls = {r: u for r, u in URLS.items() if r != "llama"}
    over = {"circuit_breaker": {"minimum_calls": 3}, "cache": {"enabled": False}}
    config = server_config(DrillSettings(breaker_timeout=7.0), 8123, urls, tmp_path, over)
    assert config["models"]["local"]["enabled"] is True
    assert "endpoints" not in config["models"]["roles"]["llama"]
    # Merged key by key: the drill's own breaker wait stays beside the scenario's override.
    assert config["circuit_breaker"] == {"timeout": 7.0, "minimum_calls": 3}
    assert config["cache"] == {"enabled": False}


def test_config_has_follows_nested_sections() -> None:
    assert config_has("database", "check_interval")
    assert config_has("modes")
    assert not config_has("database", "no_such_key")
    assert not config_has("server", "port", "deeper")  # port is not a section


def test_a_duration_reads_as_seconds_or_never() -> None:
    assert seconds_text(1.234) == "1.23 s"
    assert seconds_text(None) == "never"


def test_progress_callbacks_do_nothing_by_default() -> None:
    progress = DrillProgress()
    assert progress.phase(None, "warm-up") is None  # type: ignore[arg-type]


def test_a_log_tail_is_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("\n".join(f"line {i}" for i in range(40)))
    assert log_tail(log, lines=2) == "line 38\nline 39"
    assert log_tail(tmp_path / "none.log") == ""


async def test_a_child_process_logs_freezes_thaws_and_stops(tmp_path: Path) -> None:
    script = "import signal; print('ready', flush=True); signal.pause()"  # until a signal stops it
    child = ChildProcess("sleeper", [sys.executable, "-c", script], tmp_path / "sleeper.log")
    assert child.pid is None
    with pytest.raises(DrillError, match="sleeper is not running"):
        child.signal(signal.SIGSTOP)
    await child.spawn()
    try:
        assert child.pid is not None
        await until(lambda: "ready" in log_tail(child.log), "the child's first line in its log")
        child.signal(signal.SIGSTOP)
        assert child.paused
        child.signal(signal.SIGCONT)
        assert not child.paused
        child.signal(signal.SIGSTOP)  # stopped while frozen: thawed first, then terminated
    finally:
        await child.stop(grace=5.0)
    assert child.pid is None
    assert child.proc is not None
    assert child.proc.returncode == -signal.SIGTERM
    await child.stop()  # twice is harmless


def test_a_bad_drill_config_is_reported_before_any_server_starts(tmp_path: Path) -> None:
    config = server_config(DrillSettings(), 8123, URLS, tmp_path, {"server": {"colour": "blue"}})
    with pytest.raises(ValueError, match="colour"):
        BrownoutServer(config, tmp_path)
    assert not (tmp_path / "drill.yaml").exists()
    server = BrownoutServer(server_config(DrillSettings(), 8123, URLS, tmp_path), tmp_path)
    assert server.url == "http://127.0.0.1:8123"
    assert (tmp_path / "drill.yaml").exists()
    assert server.command[-4:] == ["--config", str(tmp_path / "drill.yaml"), "--log-level", "warning"]
