"""``brownout jobs``: submit, status, watch, list and cancel against a server on 127.0.0.1.

The server is the real app under uvicorn on fake models (:func:`support.live.live_stack`); the
command line runs in a worker thread (it speaks blocking HTTP) while the server runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from brownout.cli import app
from brownout.server.jobs_cli import read_items
from support.live import live_stack

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}


async def _run(*args: str, stdin: str | None = None) -> Result:
    return await asyncio.to_thread(CliRunner(env=WIDE).invoke, app, list(args), input=stdin)


def test_a_submission_file_is_a_json_list_or_json_lines_of_texts_or_items() -> None:
    assert read_items('["rose", {"text": "oud", "mode": "creative"}]', "fast") == [
        {"text": "rose", "mode": "fast"},
        {"text": "oud", "mode": "creative"},
    ]
    assert read_items('"rose"\n\n{"text": "oud"}\n', "balanced") == [
        {"text": "rose", "mode": "balanced"},
        {"text": "oud", "mode": "balanced"},
    ]
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_items('"rose"\nplain text\n', "fast")
    with pytest.raises(ValueError, match="item 1: expected a text"):
        read_items('["rose", 3]', "fast")
    with pytest.raises(ValueError, match="empty"):
        read_items("\n", "fast")


async def test_submit_watch_status_list_and_cancel_through_the_api(tmp_path: Path) -> None:
    async with live_stack(tmp_path, {"jobs": {"poll_interval": 0.05}}) as stack:
        texts = tmp_path / "texts.jsonl"
        texts.write_text(
            '"rose and oud for evenings"\n"fresh citrus for summer"\n{"text": "amber", "mode": "fast"}\n'
        )
        submitted = await _run("jobs", "submit", str(texts), "--url", stack.url, "--mode", "fast", "--watch")
        assert submitted.exit_code == 0, submitted.output
        job_id = submitted.stdout.splitlines()[0]
        assert "succeeded: all 3 items succeeded" in submitted.stdout
        status = await _run("jobs", "status", job_id, "--url", stack.url, "--json")
        assert json.loads(status.stdout)["progress"]["done"] == 3
        table = await _run("jobs", "status", job_id, "--url", stack.url, "--items")
        assert "model:qwen" in table.stdout
        assert "3 done, 0 failed of 3" in table.stdout
        listed = await _run("jobs", "list", "--url", stack.url, "--state", "succeeded")
        assert job_id in listed.stdout
        # From stdin, then cancelled while its slow items run.
        stack.fakes["qwen"].set("ok", delay=1.0)
        second = await _run(
            "jobs", "submit", "-", "--url", stack.url, stdin=json.dumps([f"text {i}" for i in range(6)])
        )
        second_id = second.stdout.strip()
        cancelled = await _run("jobs", "cancel", second_id, "--url", stack.url)
        assert cancelled.exit_code == 0, cancelled.output
        assert "cancelled" in cancelled.stdout
        watched = await _run("jobs", "watch", second_id, "--url", stack.url)
        assert watched.exit_code == 1
        assert "cancelled: cancelled by request" in watched.stdout
        # Refusals say what the server said.
        again = await _run("jobs", "cancel", second_id, "--url", stack.url)
        assert again.exit_code == 1
        assert "job_ended" in again.stderr
        bad = tmp_path / "bad.json"
        bad.write_text("[1]")
        refused = await _run("jobs", "submit", str(bad), "--url", stack.url)
        assert refused.exit_code == 1
        assert "expected a text" in refused.stderr
