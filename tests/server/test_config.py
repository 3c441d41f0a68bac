"""The server configuration: defaults from the seeds, YAML, environment overrides, errors naming keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from brownout.config import BrownoutConfig, RoleSection, load_config
from brownout.errors import ConfigError
from brownout.policies.breaker import BreakerConfig
from support import ROOT


def test_defaults_are_the_seeds_numbers() -> None:
    c = load_config(None, environ={})
    assert (c.json_guard.max_retries, c.json_guard.backoff_base, c.json_guard.jitter) == (3, 1.0, 0.5)
    cb = c.circuit_breaker
    assert (cb.failure_threshold, cb.success_threshold, cb.timeout, cb.half_open_requests) == (0.5, 5, 60, 3)
    assert (c.cache.max_size, c.cache.ttl_seconds, c.cache.cleanup_interval) == (1000, 600, 60)
    assert (c.queue.max_size, c.queue.retry_after) == (500, 30)
    assert c.models.roles["mistral"].timeout == 5
    group = cb.group()
    assert group.for_name("qwen").failure_rate_threshold == 0.4
    assert group.for_name("mistral").failure_rate_threshold == 0.5
    assert group.for_name("llama").open_wait == 60
    assert group.for_name("llama").half_open_max_calls == 3


def test_the_generator_override_is_the_servers_own_default() -> None:
    # The toolkit's breaker groups have no override; the server's config brings the generator's.
    group = load_config(None, environ={}).circuit_breaker.group()
    assert group.overrides == {"qwen": {"failure_rate_threshold": 0.4}}
    assert group.for_name("qwen") == group.defaults.model_copy(update={"failure_rate_threshold": 0.4})
    # A models map in the YAML replaces the default one: qwen then gets the shared defaults.
    other = BrownoutConfig.model_validate({"circuit_breaker": {"models": {"mistral": {"timeout": 9}}}})
    assert other.circuit_breaker.group().for_name("qwen").failure_rate_threshold == 0.5


def test_the_documented_example_is_exactly_the_defaults() -> None:
    assert load_config(ROOT / "deploy" / "brownout.example.yaml", environ={}) == BrownoutConfig()


def test_yaml_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9001\ncircuit_breaker:\n  timeout: 30\n")
    env = {
        "BROWNOUT__SERVER__PORT": "9002",
        "BROWNOUT__QUEUE__MAX_SIZE": "7",
        "BROWNOUT_ADMIN_TOKEN": "s3cret",
    }
    c = load_config(path, environ=env)
    assert c.server.port == 9002  # the environment wins over the file
    assert c.circuit_breaker.timeout == 30
    assert c.queue.max_size == 7
    assert c.server.admin_token is not None
    assert c.server.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(c)  # secrets never show in reprs or logs


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"BROWNOUT__SERVER__PORT": "abc"}, "server.port"),
        ({"BROWNOUT__SERVER__PORT": "70000"}, "server.port"),
        ({"BROWNOUT__CIRCUIT_BREAKER__FAILURE_THRESHOLD": "1.5"}, "circuit_breaker.failure_threshold"),
        ({"BROWNOUT__CACHE__MAX_SIZE": "0"}, "cache.max_size"),
        ({"BROWNOUT__CACHE__BOGUS": "1"}, "cache.bogus"),
        ({"BROWNOUT__JSON_GUARD__MAX_RETRIES": "-1"}, "json_guard.max_retries"),
        ({"BROWNOUT__QUEUE__RETRY_AFTER": "-5"}, "queue.retry_after"),
    ],
)
def test_invalid_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, environ=env)
    assert err.value.key == key
    assert key in str(err.value)


def test_a_bad_per_model_override_names_model_and_key() -> None:
    env = {"BROWNOUT__CIRCUIT_BREAKER__MODELS": "{qwen: {failure_threshold: 3}}"}
    with pytest.raises(ConfigError, match=r"models\.qwen\.failure_threshold"):
        load_config(None, environ=env)
    env = {"BROWNOUT__CIRCUIT_BREAKER__MODELS": "{qwen: {speed: 3}}"}
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, environ=env)


# -- the breaker keys: one vocabulary for circuit_breaker and the gateway's groups ---------------------

BREAKER_YAML = (
    "{failure_threshold: 0.25, success_threshold: 2, timeout: 7, half_open_requests: 1, "
    "minimum_calls: 4, window_size: 8}"
)


def _gateway_breaker(breaker: str) -> dict[str, str]:
    group = "{chat: {endpoints: [{url: 'http://h:1'}], breaker: " + breaker + "}}"
    return {"BROWNOUT__GATEWAY__GROUPS": group}


def test_both_breaker_sections_turn_the_same_keys_into_the_same_policy() -> None:
    env = {"BROWNOUT__CIRCUIT_BREAKER": BREAKER_YAML, **_gateway_breaker(BREAKER_YAML)}
    c = load_config(None, environ=env)
    expected = BreakerConfig(
        failure_rate_threshold=0.25,
        success_threshold=2,
        open_wait=7,
        half_open_max_calls=1,
        minimum_calls=4,
        window_size=8,
    )
    assert c.circuit_breaker.group().defaults == expected
    # The gateway's replicas keep their own growth of the open wait (short first, doubled on re-opens).
    grown = {"open_wait_multiplier": 2.0, "open_wait_max": 60.0}
    assert c.gateway.groups["chat"].breaker.policy() == expected.model_copy(update=grown)
    env = {
        "BROWNOUT__CIRCUIT_BREAKER": BREAKER_YAML,
        **_gateway_breaker(BREAKER_YAML[:-1] + ", timeout_multiplier: 1, max_timeout: 7}"),
    }
    same = load_config(None, environ=env)
    assert same.gateway.groups["chat"].breaker.policy().model_dump() == {
        **expected.model_dump(),
        "open_wait_max": 7.0,
    }


def test_the_gateway_breaker_recovers_fast_by_default() -> None:
    # A healed provider gets traffic back within seconds: a short first open wait that doubles on
    # each re-open (to a minute at most), and two good probes close it.
    policy = load_config(None, environ=_gateway_breaker("{}")).gateway.groups["chat"].breaker.policy()
    assert (policy.open_wait, policy.open_wait_multiplier, policy.open_wait_max) == (2.0, 2.0, 60.0)
    assert policy.success_threshold == 2
    # A first wait raised above the default cap is not refused: the cap gives way to it.
    raised = load_config(None, environ=_gateway_breaker("{timeout: 120}")).gateway.groups["chat"].breaker
    assert raised.policy().open_wait_max == 120.0
    with pytest.raises(ValueError, match="max_timeout"):
        load_config(None, environ=_gateway_breaker("{timeout: 120, max_timeout: 30}"))


@pytest.mark.parametrize(
    ("breaker", "key", "message"),
    [
        ("{timeout: .inf}", "timeout", "finite number"),
        ("{failure_threshold: 1.5}", "failure_threshold", "less than or equal to 1"),
        ("{window_size: 3}", "", "minimum_calls (5) cannot exceed window_size (3)"),
        ("{open_wait: 3}", "open_wait", "Extra inputs"),  # the policy's name for timeout is not a YAML key
    ],
)
def test_both_breaker_sections_refuse_a_bad_value_under_the_key_the_user_wrote(
    breaker: str, key: str, message: str
) -> None:
    for env, section in (
        ({"BROWNOUT__CIRCUIT_BREAKER": breaker}, "circuit_breaker"),
        (_gateway_breaker(breaker), "gateway.groups.chat.breaker"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(None, environ=env)
        assert err.value.key == (f"{section}.{key}" if key else section)
        assert message in str(err.value)


def test_a_per_model_override_is_checked_by_the_same_rules() -> None:
    env = {"BROWNOUT__CIRCUIT_BREAKER__MODELS": "{qwen: {window_size: 3}}"}
    with pytest.raises(ConfigError, match=r"models\.qwen: minimum_calls \(5\) cannot exceed window_size"):
        load_config(None, environ=env)
    env = {"BROWNOUT__CIRCUIT_BREAKER__MODELS": "{qwen: {timeout: .inf}}"}
    with pytest.raises(ConfigError, match=r"models\.qwen\.timeout: Input should be a finite number"):
        load_config(None, environ=env)


def test_settings_for_one_role_keep_the_others_and_its_own_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  roles:\n    mistral: {max_tokens: 64}\n")
    env = {"BROWNOUT__MODELS__ROLES__QWEN__LIMITER__MIN_LIMIT": "3"}
    roles = load_config(path, environ=env).models.roles
    assert list(roles) == ["qwen", "mistral", "llama"]
    assert roles["qwen"].limiter.min_limit == 3
    assert roles["qwen"].timeout == 10
    # The validator keeps its shorter timeout when only another of its settings is given.
    assert roles["mistral"].max_tokens == 64
    assert roles["mistral"].timeout == 5
    assert roles["llama"] == RoleSection()


def test_roles_outside_the_pipeline_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  roles:\n    gpt: {}\n")
    with pytest.raises(ConfigError, match=r"unknown role\(s\) \['gpt'\]"):
        load_config(path, environ={})


def test_without_local_models_every_role_needs_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  local: {enabled: false}\n  roles:\n"
        "    qwen: {endpoints: [{url: 'http://127.0.0.1:9'}]}\n    mistral: {}\n    llama: {}\n"
    )
    with pytest.raises(ConfigError, match="need endpoints"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [("server: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "mapping"), (None, "cannot read")],
)
def test_unreadable_files_are_config_errors(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path, environ={}) == BrownoutConfig()
