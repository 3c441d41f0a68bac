"""Configuration errors are reported whole: every bad key at once, and a database URL the store cannot
open named as ``database.url`` at start-up instead of a traceback from the database library."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from brownout.cli import app
from brownout.config import load_config
from brownout.errors import ConfigError


def test_every_bad_key_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n  port: 70000\n  colour: blue\n"
        "circuit_breaker:\n  failure_threshold: 1.5\n"
        "cache:\n  max_size: -1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"BROWNOUT__QUEUE__MAX_CONCURRENT": "0"})
    text = str(caught.value)
    for key in (
        "server.port",
        "server.colour",
        "circuit_breaker.failure_threshold",
        "cache.max_size",
        "queue.max_concurrent",
    ):
        assert f"{key}: " in text, text
    assert "more)" not in text
    assert caught.value.key == "server.port"
    assert len(text.splitlines()) == 5


def test_one_bad_key_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"BROWNOUT__SERVER__PORT": "-1"})
    assert caught.value.key == "server.port"
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("foo://x", "unknown database driver 'foo'"),
        ("mysql+aiomysql://u@h/db", "mysql databases are not supported"),
        ("postgresql://u@h/db", "blocking driver"),
        ("brownout.db", "is not a database URL"),
    ],
)
def test_a_database_url_the_store_cannot_open_names_database_url(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"BROWNOUT__DATABASE__URL": url})
    assert caught.value.key == "database.url"
    assert says in str(caught.value)
    assert "sqlite+aiosqlite:///" in str(caught.value)  # what to write instead


def test_failover_urls_are_checked_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            environ={
                "BROWNOUT__DATABASE__URL": "postgresql+asyncpg://u@h/db",
                "BROWNOUT__DATABASE__FAILOVER_URLS": "['postgresql+asyncpg://u@h2/db', 'foo://x']",
            },
        )
    assert caught.value.key == "database.failover_urls"
    assert "[1]: unknown database driver 'foo'" in str(caught.value)


def test_supported_urls_pass() -> None:
    for url in ("sqlite+aiosqlite:///b.db", "postgresql+asyncpg://u@h1:5432,h2:5433/db"):
        assert load_config(None, environ={"BROWNOUT__DATABASE__URL": url}).database.url == url


def test_serve_with_an_unknown_driver_says_one_line_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("database:\n  url: foo://x\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "invalid configuration: database.url: unknown database driver 'foo'; use "
        "sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user@host:5432/db"
    ]
    assert "Traceback" not in result.output
