"""A model endpoint's breaker in the configuration's words (brownout.llm.breaker_settings): the
defaults, the limits, and the one translation to the toolkit's BreakerConfig."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from brownout.llm.breaker_settings import BreakerSettings
from brownout.policies.breaker import BreakerConfig


def test_each_yaml_key_sets_the_policy_field_it_names() -> None:
    settings = BreakerSettings(
        failure_threshold=0.25,
        success_threshold=2,
        timeout=7.5,
        half_open_requests=4,
        minimum_calls=3,
        window_size=9,
    )
    policy = settings.policy()
    assert isinstance(policy, BreakerConfig)
    assert (
        policy.failure_rate_threshold,
        policy.success_threshold,
        policy.open_wait,
        policy.half_open_max_calls,
        policy.minimum_calls,
        policy.window_size,
    ) == (0.25, 2, 7.5, 4, 3, 9)


def test_the_defaults_open_at_half_failures_over_twenty_calls() -> None:
    policy = BreakerSettings().policy()
    assert (policy.failure_rate_threshold, policy.window_size, policy.minimum_calls) == (0.5, 20, 5)
    assert (policy.open_wait, policy.half_open_max_calls, policy.success_threshold) == (60.0, 3, 5)
    # What the YAML cannot say keeps the policy's own default.
    assert policy.window_type == BreakerConfig().window_type


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"failure_threshold": 0.0}, "failure_threshold"),
        ({"failure_threshold": 1.5}, "failure_threshold"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"half_open_requests": 0}, "half_open_requests"),
        ({"speed": 3}, "speed"),
    ],
)
def test_a_bad_value_is_refused_under_the_yaml_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BreakerSettings.model_validate(values)
    assert [e["loc"] for e in caught.value.errors()] == [(key,)]


def test_a_window_smaller_than_its_minimum_is_refused_at_load() -> None:
    with pytest.raises(ValidationError, match=r"minimum_calls \(30\) cannot exceed window_size \(20\)"):
        BreakerSettings(minimum_calls=30)


def test_an_override_comes_back_in_the_policys_keys() -> None:
    base = BreakerSettings()
    assert base.override("models.qwen", {"timeout": 5.0, "failure_threshold": 0.9}) == {
        "open_wait": 5.0,
        "failure_rate_threshold": 0.9,
    }
    assert base.override("models.qwen", {}) == {}


def test_an_override_names_where_and_the_key_it_got_wrong() -> None:
    base = BreakerSettings()
    with pytest.raises(ValueError, match=r"^models\.qwen: unknown key\(s\) \['speed'\]; allowed \["):
        base.override("models.qwen", {"speed": 1, "timeout": 2.0})
    with pytest.raises(ValueError, match=r"^models\.qwen\.failure_threshold: Input should be"):
        base.override("models.qwen", {"failure_threshold": 2.0})


def test_an_override_is_checked_against_the_settings_it_changes() -> None:
    # A minimum above this section's window is wrong here, though fine for a bigger window.
    small = BreakerSettings(window_size=10, minimum_calls=5)
    too_many = r"^models\.llama: minimum_calls \(12\) cannot exceed window_size \(10\)"
    with pytest.raises(ValueError, match=too_many):
        small.override("models.llama", {"minimum_calls": 12})
    wide = BreakerSettings(window_size=50)
    assert wide.override("models.llama", {"minimum_calls": 12}) == {"minimum_calls": 12}
