"""The two layers: the toolkit (``pip install brownout``) and the application built on it.

The toolkit -- the package root, ``background``, ``clock``, ``errors``, ``events``, ``testing``,
``policies/`` and ``state/`` (shared state on Redis, the toolkit's optional extra) -- depends on pydantic
alone and imports nothing of the application: not at the top of a module, not inside a function, not under
``TYPE_CHECKING``. Checked twice: by running ``import brownout`` in a fresh interpreter and reading
``sys.modules``, and by reading every toolkit module's source. The ``brownout`` command's front door
is checked here too: without the server extra it says so in one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import brownout
from brownout._entry import MISSING_SERVER_EXTRA
from support import ROOT
from support.imports import PACKAGE, find_cycle, import_graph, imported_modules, module_name

TOOLKIT_MODULES = ("__init__.py", "background.py", "clock.py", "errors.py", "events.py", "testing.py")
TOOLKIT_PACKAGES = ("policies", "state")

APPLICATION = (
    "brownout.server",
    "brownout.briefs",
    "brownout.gateway",
    "brownout.llm",
    "brownout.durable",
    "brownout.health",
    "brownout.recovery",
    "brownout.cli",
    "brownout.config",
    "brownout.bench",
    "brownout.chaos",
    "brownout.checks",
    "brownout.telemetry",
)
"""Every module of the package that is not the toolkit (the console script's front door aside)."""

FRONT_DOOR = ("_entry.py", "__main__.py")

HEAVY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "typer",
    "rich",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "httpx",
    "prometheus_client",
    "redis",
    "yaml",
)
"""Libraries of the server extra that importing the toolkit must not load."""

TOOLKIT_IMPORTS = (
    "brownout",
    "brownout.background",
    "brownout.clock",
    "brownout.errors",
    "brownout.events",
    "brownout.testing",
    "brownout.state",
    "brownout.state.tiered",
    *(f"brownout.policies.{p.stem}" for p in sorted((PACKAGE / "policies").glob("*.py"))),
)


def _toolkit_files() -> list[Path]:
    files = [PACKAGE / name for name in TOOLKIT_MODULES]
    for package in TOOLKIT_PACKAGES:
        files += sorted((PACKAGE / package).rglob("*.py"))
    return files


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATION)


def _third_party(name: str) -> str | None:
    top = name.partition(".")[0]
    if top in ("brownout", "__future__") or top in sys.stdlib_module_names:
        return None
    return top


# -- the static scan ----------------------------------------------------------------------------------


def test_every_module_is_either_toolkit_or_application() -> None:
    # A new top-level module must be placed in one layer (and so in this test) before it ships.
    toolkit = {*TOOLKIT_MODULES, *TOOLKIT_PACKAGES}
    application = {app.removeprefix("brownout.") for app in APPLICATION}
    unplaced = []
    for entry in PACKAGE.iterdir():
        if entry.name in toolkit or entry.name in FRONT_DOOR or entry.name in ("py.typed", "__pycache__"):
            continue
        if entry.name.removesuffix(".py") not in application:
            unplaced.append(entry.name)
    assert unplaced == []


def test_the_coverage_check_holds_this_toolkit_to_its_share() -> None:
    # scripts/coverage-toolkit fails CI when these files fall under 95 % of lines covered.
    script = (ROOT / "scripts" / "coverage-toolkit").read_text(encoding="utf-8")
    measured = set(re.findall(r"src/brownout/([\w/.*]+)", script))
    assert measured == {*TOOLKIT_MODULES, *(f"{package}/*" for package in TOOLKIT_PACKAGES)}


def test_no_toolkit_module_imports_the_application() -> None:
    files = _toolkit_files()
    assert len(files) >= 20  # the scan really reads the toolkit (policies/ and state/ included)
    offenders = {}
    for path in files:
        names = imported_modules(
            path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py"
        )
        bad = sorted(n for n in names if _is_application(n))
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}


def test_the_toolkit_needs_pydantic_alone_and_its_shared_state_redis() -> None:
    used: dict[str, set[str]] = {}
    for path in _toolkit_files():
        names = imported_modules(path.read_text(encoding="utf-8"), module_name(path))
        for name in names:
            top = _third_party(name)
            if top is not None:
                used.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
    assert set(used) == {"pydantic", "redis"}
    assert all(p.startswith("state/") for p in used["redis"]), used["redis"]


def test_the_scan_sees_imports_wherever_they_are() -> None:
    source = """
from typing import TYPE_CHECKING
import json
if TYPE_CHECKING:
    from brownout.server.runtime import Runtime
def later():
    import brownout.cli
    from .. import config
    from ..gateway import router
try:
    from brownout import durable
except ImportError:
    pass
LAZY = {"x": "brownout.briefs.service"}
DOC = "see brownout.health for details"
"""
    names = imported_modules(source, "brownout.policies.example")
    assert {n for n in names if _is_application(n)} == {
        "brownout.server.runtime",
        "brownout.server.runtime.Runtime",  # a name, or a module: counted either way
        "brownout.cli",
        "brownout.config",
        "brownout.gateway",
        "brownout.gateway.router",
        "brownout.durable",
        "brownout.briefs.service",
    }
    assert "json" in names
    assert "brownout.health" not in names  # prose naming a module is not an import


def test_the_gateway_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph("brownout.gateway")
    graph.pop("brownout.gateway", None)
    assert "brownout.gateway.router" in graph["brownout.gateway.metrics"]  # the collector reads it
    assert find_cycle(graph) is None


def test_the_drills_import_each_other_without_a_cycle_and_never_the_command_line() -> None:
    # `brownout` mounts the drill command from the drills, so the drills must not import it back.
    graph = import_graph("brownout.chaos")
    assert "brownout.chaos.drills.scenarios" in graph["brownout.chaos.drills.catalog"]  # the scan reads it
    assert find_cycle(graph) is None
    for path in (PACKAGE / "chaos").rglob("*.py"):
        source, name = path.read_text(encoding="utf-8"), module_name(path)
        names = imported_modules(source, name, is_package=path.name == "__init__.py")
        assert not any(n == "brownout.cli" or n.startswith("brownout.cli.") for n in names), name


def test_the_benchmarks_stand_below_the_drills() -> None:
    # The overload drill uses the benchmarks' load client and figures; the benchmarks never use the drills.
    for path in (PACKAGE / "bench").rglob("*.py"):
        source, name = path.read_text(encoding="utf-8"), module_name(path)
        names = imported_modules(source, name, is_package=path.name == "__init__.py")
        assert not any(n.startswith("brownout.chaos.drills") for n in names), name


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# -- what `import brownout` loads ---------------------------------------------------------------------

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_after_importing(*modules: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout))


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(name for name in loaded if name.partition(".")[0] in HEAVY)


def test_importing_the_toolkit_loads_no_web_cli_or_database_library() -> None:
    loaded = _loaded_after_importing(*TOOLKIT_IMPORTS)
    assert {"brownout", "brownout.policies.breaker", "pydantic"} <= loaded
    assert _heavy(loaded) == []
    assert not any(_is_application(name) for name in loaded)


def test_the_probe_sees_what_the_application_loads() -> None:
    # The check above could pass by looking in the wrong place; the server's app shows it does not.
    loaded = _loaded_after_importing("brownout.server.app")
    assert {"fastapi", "starlette", "brownout.config"} <= loaded


# -- the console script without the server extra -------------------------------------------------------

_RUN_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
sys.argv = ["brownout", *sys.argv[2:]]
from brownout._entry import main
main()
"""


def _brownout_without(missing: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT, missing, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=PACKAGE.parent,
    )


@pytest.mark.parametrize("missing", ["typer", "rich"])
def test_without_the_cli_libraries_brownout_says_which_extra_and_exits_2(missing: str) -> None:
    result = _brownout_without(missing, "version")
    assert result.returncode == 2
    assert result.stderr == MISSING_SERVER_EXTRA + "\n"
    assert result.stdout == ""


def test_a_server_library_missing_when_a_command_runs_gets_the_same_line() -> None:
    # serve loads FastAPI only once the port is bound: the check must hold past the first import.
    result = _brownout_without("fastapi", "serve", "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2
    assert result.stderr == MISSING_SERVER_EXTRA + "\n"


def test_a_missing_module_outside_the_extra_is_not_blamed_on_it() -> None:
    result = _brownout_without("brownout.cli", "version")
    assert result.returncode == 1
    assert "ModuleNotFoundError" in result.stderr
    assert MISSING_SERVER_EXTRA not in result.stderr


def test_the_installed_script_and_python_m_enter_through_the_front_door() -> None:
    script = Path(sys.executable).parent / "brownout"
    for command in ([str(script)], [sys.executable, "-m", "brownout"]):
        result = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout.strip()) == (0, brownout.__version__), result.stderr
    assert "brownout._entry" in script.read_text(encoding="utf-8")
