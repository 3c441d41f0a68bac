"""A local model server replaced by a healthy new process gives its roles back at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brownout.chaos.fakellm import FakeLLM
from brownout.events import ModelServerRestarted
from brownout.policies.breaker import BreakerState
from tests.support.stack import serve
from tests.support.wait import until


class Replaced:
    """Stands in for the shared local model server of two roles (the fakes answer for it)."""

    role = "models"
    state = "running"
    pid = None
    restarts = 1
    model_path = Path("model.gguf")

    def status(self) -> dict[str, Any]:
        return {"role": self.role, "state": self.state, "pid": None}

    async def stop(self) -> None:
        return None


async def test_a_replaced_server_closes_its_roles_breakers_and_probes_them_at_once(
    fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    async with serve(fakes, tmp_path) as stack:
        server = Replaced()
        stack.runtime.local.update({"qwen": server, "mistral": server})  # type: ignore[dict-item]
        svc = stack.service
        # The old process died under load: the generator's breaker opened, the validator's last
        # probe failed; the hinter (on its own endpoint) was not touched.
        stack.breaker("qwen").open_for(60.0, "connection refused")
        stack.breaker("llama").open_for(60.0, "its own failures")
        stack.breaker("mistral").force_open()  # an operator's choice stays
        svc.record_health("mistral", [])
        assert not svc.role_healthy("qwen")
        assert not svc.role_healthy("mistral")
        probes = {role: fake.chat_requests for role, fake in fakes.items()}
        stack.bus.emit(ModelServerRestarted("models", 0.0, pid=4242, reason="exited", restarts=1))
        await until(lambda: stack.breaker("qwen").state is BreakerState.CLOSED, "qwen's breaker closed")
        await until(lambda: fakes["mistral"].chat_requests > probes["mistral"], "the validator probed again")
        await until(lambda: svc.role_healthy("qwen"), "the generator healthy again")
        assert fakes["qwen"].chat_requests > probes["qwen"]
        assert stack.breaker("mistral").state is BreakerState.FORCED_OPEN
        assert stack.breaker("llama").state is BreakerState.OPEN  # another server: not its business
        assert fakes["llama"].chat_requests == probes["llama"]
        # Another server's replacement changes nothing here.
        stack.breaker("qwen").open_for(60.0, "again")
        stack.bus.emit(ModelServerRestarted("elsewhere", 0.0, pid=1, reason="exited", restarts=1))
        await stack.runtime.ops.after_replacement([])
        assert stack.breaker("qwen").state is BreakerState.OPEN
