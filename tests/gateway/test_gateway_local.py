"""The gateway's ``local`` group: the embedded model offered out of the box, and how configuration
changes it. (The official OpenAI client against it: ``tests/llm/test_model_smoke.py``, ``-m model``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from brownout.config import BrownoutConfig, load_config
from brownout.errors import ConfigError
from brownout.server.runtime import Runtime
from support import ROOT

ONE = {"endpoints": [{"url": "http://10.0.0.5:8000"}]}


def config(tmp_path: Path, **sections: Any) -> BrownoutConfig:
    data = {
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")},
        **sections,
    }
    return BrownoutConfig.model_validate(data)


def models_listed(runtime: Runtime) -> list[str]:
    return [m["id"] for m in json.loads(runtime.gateway.models_body)["data"]]


def test_by_default_the_generators_embedded_model_is_the_group_local(tmp_path: Path) -> None:
    runtime = Runtime(config(tmp_path))
    assert models_listed(runtime) == ["local"]
    group = runtime.gateway.groups["local"]
    (endpoint,) = group.endpoints
    # The generator's local server will be started on exactly this port (Runtime.start).
    assert endpoint.config.url == f"http://127.0.0.1:{runtime._local_ports['qwen']}"
    assert endpoint.config.model == "qwen"
    assert endpoint.config.label == "local"
    # Fit for a 135M model on a CPU: a long wait for bytes, few at once, no repeat on the one replica.
    assert group.config.timeout == 120.0
    assert group.config.max_attempts == 1
    assert group.config.admission.max_concurrent == 2


def test_configured_groups_are_added_to_local_and_may_fall_back_to_it(tmp_path: Path) -> None:
    runtime = Runtime(config(tmp_path, gateway={"groups": {"chat": {**ONE, "fallbacks": ["local"]}}}))
    assert models_listed(runtime) == ["chat", "local"]
    assert [g.name for g in runtime.gateway.groups["chat"].chain] == ["chat", "local"]


def test_a_configured_group_named_local_replaces_it(tmp_path: Path) -> None:
    runtime = Runtime(config(tmp_path, gateway={"groups": {"local": ONE}}))
    assert models_listed(runtime) == ["local"]
    assert runtime.gateway.groups["local"].endpoints[0].config.url == "http://10.0.0.5:8000"
    assert runtime._local_ports == {}  # the generator's server keeps a port of its own choosing


def test_local_can_be_renamed_or_turned_off(tmp_path: Path) -> None:
    assert models_listed(Runtime(config(tmp_path, gateway={"local": {"name": "smollm"}}))) == ["smollm"]
    assert models_listed(Runtime(config(tmp_path, gateway={"local": {"enabled": False}}))) == []
    with pytest.raises(ConfigError, match=r"gateway\.local\.name"):
        load_config(None, environ={"BROWNOUT__GATEWAY__LOCAL__NAME": "two words"})


def test_no_local_group_while_the_generator_runs_elsewhere(tmp_path: Path) -> None:
    qwen = {"endpoints": [{"url": "http://10.0.0.9:8000"}]}
    elsewhere = {"roles": {"qwen": qwen, "mistral": {}, "llama": {}}}
    runtime = Runtime(config(tmp_path, models=elsewhere))
    assert models_listed(runtime) == []
    with pytest.raises(ValueError, match=r"gateway\.groups\.chat\.fallbacks: 'local' is the embedded"):
        config(tmp_path, models=elsewhere, gateway={"groups": {"chat": {**ONE, "fallbacks": ["local"]}}})


def test_the_documented_example_offers_local() -> None:
    example = ROOT / "deploy" / "brownout.example.yaml"
    loaded = load_config(example, environ={})
    assert loaded.gateway.local.enabled
    assert loaded.gateway_local_role == "qwen"
