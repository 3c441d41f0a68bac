"""``models.local.api_nice``: the service's threads yield the CPU to the model servers it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from brownout.config import BrownoutConfig
from brownout.errors import ConfigError
from brownout.server.priority import lower_own_priority, yield_to_models

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's"
)

# Run in a process of its own: a lowered priority cannot be raised back, and pytest's must not change.
_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys, threading
    from brownout.llm import local
    from brownout.server.priority import yield_to_models

    IDLE = [sys.executable, "-c", "import signal; signal.pause()"]  # until killed

    def nice(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    async def main():
        env = dict(os.environ)
        before = await local._Process.start(IDLE, env)
        done = yield_to_models(7, True)
        after = await local._Process.start(IDLE, env)  # as a model restarted later would be
        worker = await asyncio.to_thread(lambda: nice(threading.get_native_id()))
        print(json.dumps({
            "done": [done.threads, done.nice],
            "main": nice(threading.get_native_id()),
            "worker": worker,
            "spawner": nice(local.spawner_thread_id()),
            "before": nice(before.pid),
            "after": nice(after.pid),
            "same_session": os.getsid(after.pid) == os.getsid(0),
            "own_group": os.getpgid(after.pid) == after.pid,
        }))
        for child in (before, after):
            os.killpg(child.pid, signal.SIGKILL)
            print(json.dumps({"exit": await child.wait()}))

    asyncio.run(main())
    """
)


@linux_only
def test_the_service_runs_below_its_models_and_a_model_started_later_keeps_their_priority() -> None:
    if os.getpriority(os.PRIO_PROCESS, 0) > 12:
        pytest.skip("this test process already runs at a low priority")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    figures = json.loads(out[0])
    assert figures["done"][1] == base + 7
    assert figures["main"] == base + 7  # the event loop's thread
    assert figures["worker"] == base + 7  # a thread started afterwards inherits it
    assert figures["spawner"] == base  # the thread that starts models is left alone...
    assert figures["before"] == base  # ...so a model started before
    assert figures["after"] == base  # ...and one started after keep the original priority
    # Its own process group (killpg reaches it and what it forks) but the service's session.
    assert figures["same_session"] is True
    assert figures["own_group"] is True
    assert [json.loads(line)["exit"] for line in out[1:]] == [-9, -9]  # both reaped, status seen


def test_nothing_changes_without_local_models_or_steps() -> None:
    assert yield_to_models(10, False) is None
    assert yield_to_models(0, True) is None
    assert lower_own_priority(0) is None


def test_api_nice_is_ten_by_default_only_for_models_running_several_threads() -> None:
    local = BrownoutConfig().models.local
    assert local.api_nice is None
    # The shared server takes the cores: several threads on two, one on a single core.
    assert local.effective_api_nice(["qwen", "mistral", "llama"], cores=2) == 10
    assert local.effective_api_nice(["qwen", "mistral", "llama"], cores=1) == 0
    # A CPU budget holds the service's own work: the models need no priority over it.
    assert local.effective_api_nice(["qwen", "mistral", "llama"], cores=2, budgeted=True) == 0
    apart = BrownoutConfig.model_validate({"models": {"local": {"layout": "per_role"}}}).models.local
    assert apart.effective_api_nice(["qwen", "mistral", "llama"], cores=2) == 0  # one thread each
    two = BrownoutConfig.model_validate(
        {"models": {"local": {"layout": "per_role", "per_role": {"qwen": {"threads": 2}}}}}
    )
    assert two.models.local.effective_api_nice(["qwen", "mistral", "llama"]) == 10
    assert two.models.local.effective_api_nice(["mistral", "llama"]) == 0  # qwen not run locally
    assert two.models.local.effective_api_nice([]) == 0
    fixed = BrownoutConfig.model_validate({"models": {"local": {"threads": 2, "api_nice": 3}}})
    assert fixed.models.local.effective_api_nice(["qwen"]) == 3
    assert fixed.models.local.effective_api_nice(["qwen"], budgeted=True) == 3  # as set
    with pytest.raises((ConfigError, ValueError), match="api_nice"):
        BrownoutConfig.model_validate({"models": {"local": {"api_nice": 20}}})
