"""Grading the gateway scenarios (brownout.chaos.failover.grading) on hand-made exchanges: what the
caller saw decides pass, partial, safe or fail."""

from __future__ import annotations

import pytest

from brownout.chaos.failover.grading import GRADES, Exchange, grade

FULL = "w01 w02 w03 w04"
BUDGET = 100.0


def answered(text: str = FULL, seconds: float = 1.0) -> Exchange:
    return Exchange(text=text, seconds=seconds, finish_reason="stop")


def failed(error: str = "APIError: the stream broke", seconds: float = 1.0, **kw: object) -> Exchange:
    return Exchange(text="w01", seconds=seconds, error=error, clean_error=True, **kw)  # type: ignore[arg-type]


def test_the_complete_answer_within_the_budget_passes() -> None:
    assert grade([answered()], FULL, BUDGET) == grade([answered(seconds=99.9)], FULL, BUDGET)
    assert grade([answered()], FULL, BUDGET).grade == "pass"


@pytest.mark.parametrize(
    ("text", "why"),
    [("w01 w02", "truncated answer reported as success"), ("", "empty answer"), ("w09", "wrong answer")],
)
def test_a_short_or_wrong_text_reported_as_success_fails(text: str, why: str) -> None:
    verdict = grade([answered(text)], FULL, BUDGET)
    assert verdict.grade == "fail"
    assert why in verdict.reason


def test_a_complete_answer_over_the_budget_or_with_a_missed_criterion_is_partial() -> None:
    late = grade([answered(seconds=120.0)], FULL, BUDGET)
    assert late.grade == "partial"
    assert "120.0 s" in late.reason
    wrong_server = grade([answered()], FULL, BUDGET, ["served by the backup"])
    assert wrong_server.grade == "partial"
    assert wrong_server.reason == "served by the backup"


def test_a_clean_error_within_the_budget_is_safe_whatever_the_side_criteria() -> None:
    verdict = grade([failed()], FULL, BUDGET, ["the backup was called"])
    assert verdict.grade == "safe"
    assert "the stream broke" in verdict.reason
    assert "backup" not in verdict.reason  # a side criterion says nothing when the answer is missing


def test_a_parse_crash_a_hang_or_a_foreign_exception_fails() -> None:
    parse = Exchange(text="w01", error="JSONDecodeError: Unterminated string", parse_error=True)
    assert grade([parse], FULL, BUDGET).grade == "fail"
    hang = failed("APITimeoutError: Request timed out.", seconds=105.0, timed_out=True)
    assert grade([hang], FULL, BUDGET).grade == "fail"
    assert "budget" in grade([hang], FULL, BUDGET).reason
    late_error = failed(seconds=101.0)
    assert grade([late_error], FULL, BUDGET).grade == "fail"
    foreign = Exchange(error="RuntimeError: boom")
    assert grade([foreign], FULL, BUDGET).grade == "fail"


def test_a_refusal_scenario_wants_the_reason_as_a_clean_400() -> None:
    reason = "content management policy"
    right = failed(
        "BadRequestError: filtered due to the prompt triggering content management policy", status=400
    )
    assert grade([right], FULL, BUDGET, refusal=reason).grade == "pass"
    assert grade([right], FULL, BUDGET, ["the backup was called"], refusal=reason).grade == "partial"
    no_reason = failed("InternalServerError: no endpoint could answer", status=503)
    assert grade([no_reason], FULL, BUDGET, refusal=reason).grade == "safe"
    answered_anyway = grade([answered()], FULL, BUDGET, refusal=reason)
    assert answered_anyway.grade == "partial"
    assert "refused" in answered_anyway.reason


def test_several_requests_take_the_worst_grade_and_count_alike_failures_once() -> None:
    all_good = grade([answered(), answered(), answered()], FULL, BUDGET)
    assert all_good.grade == "pass"
    assert "3 of 3" in all_good.reason
    some_errors = grade([answered(), failed(), failed()], FULL, BUDGET, ["primary never back"])
    assert some_errors.grade == "safe"
    assert some_errors.reason.startswith("2 of 3 requests safe: a clean error")
    healed_late = grade([answered(), answered()], FULL, BUDGET, ["primary back after 9 s"])
    assert healed_late.grade == "partial"
    assert grade([answered(), answered("w01")], FULL, BUDGET).grade == "fail"
    assert grade([], FULL, BUDGET).grade == "fail"


def test_grades_are_ordered_best_first_and_an_exchange_reports_itself() -> None:
    assert GRADES == ("pass", "partial", "safe", "fail")
    ex = Exchange(
        text=" ".join(f"w{i:02d}" for i in range(80)),
        seconds=1.23456,
        models=["backup-x"],
        headers={"x-brownout-served-by": "backup-x/backup", "x-brownout-fallbacks": "chat-x>backup-x"},
    )
    row = ex.to_json()
    assert row["answered"] is True
    assert row["seconds"] == 1.235
    assert row["text_chars"] == len(ex.text)
    assert row["text_ends"].startswith("w00 w01")
    assert row["text_ends"].endswith("w78 w79")
    assert row["served_by"] == "backup-x/backup"
    assert row["fallbacks"] == "chat-x>backup-x"
