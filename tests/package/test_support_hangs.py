"""The test suite's hang report: what each asyncio task awaits, down to the await that never returns."""

from __future__ import annotations

import asyncio

import pytest

from support.hangs import HangReporter
from support.wait import settle


async def test_the_report_names_the_innermost_await_of_every_task(capsys: pytest.CaptureFixture[str]) -> None:
    never = asyncio.Event()

    async def deepest() -> None:
        await never.wait()

    async def middle() -> None:
        await deepest()

    stuck = asyncio.create_task(middle(), name="the stuck one")
    await settle()
    reporter = HangReporter("tests/x.py::test_stuck", 120.0)
    # What the timer does when it fires, run on another thread as the timer would run it.
    await asyncio.to_thread(reporter._fire)
    await settle()
    report = capsys.readouterr().err
    stuck.cancel()

    assert "tests/x.py::test_stuck is about to time out" in report
    section = report.split("name='the stuck one'", 1)[1]
    lines = [line.strip() for line in section.splitlines()[1:4]]
    assert lines[0].endswith("in middle")
    assert lines[1].endswith("in deepest")
    assert lines[2].endswith("in wait")
    assert "asyncio" in lines[2]


def test_a_reporter_disarmed_in_time_reports_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = HangReporter("tests/x.py::test_quick", 120.0)
    reporter.start()
    reporter.cancel()
    reporter._fire()  # no event loop runs on this thread: nothing to report, and no error
    assert capsys.readouterr().err == ""
