"""Every module of ``brownout`` is imported by at least one test, so none is only ever reached through
the others.

A module counts as imported by a test when a file under ``tests/`` imports it (``import a.b``,
``from a.b import c``, a dotted ``"brownout.…"`` name handed to importlib or a subprocess), or imports a
name it defines through a package that re-exports it (``from brownout.chaos.servers import
RedisServer`` counts for ``brownout.chaos.servers.redis``); a package counts when one of its modules
does. A ``__main__`` module counts when a test runs its package with ``python -m``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from support import ROOT
from support.imports import PACKAGE, imported_modules, module_name

TESTS = ROOT / "tests"


def _modules() -> set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py")}


def _defined_in(module: str, name: str) -> str | None:
    """The module that defines ``name`` as ``module`` offers it (itself, a submodule, or a re-export)."""
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if inspect.ismodule(found):
        return found.__name__
    owner = getattr(found, "__module__", None)
    return owner if isinstance(owner, str) else None


def _run_with_python_m(source: str) -> set[str]:
    """The packages a test file runs as ``python -m <package>``: string constants beside a ``"-m"``."""
    strings = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    if "-m" not in strings:
        return set()
    return {s for s in strings if s == "brownout" or s.startswith("brownout.")}


def imported_by_tests(tests: Path = TESTS) -> set[str]:
    """Every module of ``brownout`` the files under ``tests`` import (module docstring)."""
    known = _modules()
    found: set[str] = set()
    for path in sorted(tests.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        names = {n for n in imported_modules(source, "tests") if n.startswith("brownout")}
        for name in names:
            if name in known:
                found.add(name)
            else:  # ``module.name``: where that name is defined
                module, _, attr = name.rpartition(".")
                owner = _defined_in(module, attr) if module in known else None
                if owner is not None:
                    found.add(owner)
        found.update(f"{package}.__main__" for package in _run_with_python_m(source))
    # A package's __init__ runs whenever one of its modules is imported.
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return found & known


def test_every_module_is_imported_by_a_test() -> None:
    untested = sorted(_modules() - imported_by_tests())
    assert untested == [], "modules no test imports (add a focused test for each): " + ", ".join(untested)


def test_the_scan_resolves_re_exports_and_python_m(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(
        "from brownout.chaos.servers import RedisServer\n"
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-m', 'brownout.chaos.drills', '--list'])\n"
    )
    found = imported_by_tests(tmp_path)
    assert "brownout.chaos.servers.redis" in found  # where RedisServer is defined
    assert {"brownout.chaos.servers", "brownout.chaos", "brownout"} <= found  # the packages above it
    assert "brownout.chaos.drills.__main__" in found
    assert "brownout.chaos.servers.postgres" not in found
    assert "brownout.__main__" not in found  # "brownout" alone is not a python -m here
