"""No import cycle among the modules of the server and the gateway.

Every module under ``brownout/server/`` and ``brownout/gateway/`` is parsed, and every import it may
make counts, wherever the statement is: at the top, inside a function, under ``if TYPE_CHECKING:``,
or as a dotted module name handed to ``importlib`` (the same reading as :mod:`test_layers`). An
import of ``a.b.c`` counts as an import of that module only (Python runs the packages ``a`` and
``a.b`` first, but a package that does not import ``c`` back makes no cycle). A cycle is reported
with its path, e.g. ``runtime -> live -> runtime``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_layers import PACKAGE, imported_modules

CHECKED = ("server", "gateway")
"""The packages whose modules must import each other without a cycle."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: tuple[str, ...] = CHECKED) -> dict[str, set[str]]:
    """Each module of ``packages`` -> the modules of ``packages`` it may import."""
    sources = {
        _module_name(path): path for package in packages for path in sorted((PACKAGE / package).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        found = imported_modules(path.read_text(), name, is_package=path.name == "__init__.py")
        graph[name] = {m for m in found if m in sources and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the path of modules (first and last the same), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_the_server_and_the_gateway_import_without_a_cycle() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    short = [m.removeprefix("brownout.") for m in cycle or []]
    assert cycle is None, "import cycle: " + " -> ".join(short)


def test_every_module_is_read() -> None:
    graph = import_graph()
    assert "brownout.server.app" in graph
    assert "brownout.server.routes.briefs" in graph
    assert "brownout.gateway.router" in graph
    # The composition root imports its parts; the parts do not import it.
    assert "brownout.server.operations" in graph["brownout.server.runtime"]
    assert "brownout.server.live" in graph["brownout.server.runtime"]
    assert not any(
        "brownout.server.runtime" in graph[m] for m in ("brownout.server.operations", "brownout.server.live")
    )


@pytest.mark.parametrize(
    "where",
    [
        "from brownout.server.b import B",
        "if TYPE_CHECKING:\n    from brownout.server.b import B",
        "def f() -> None:\n    from brownout.server import b",
        "import importlib\nM = importlib.import_module('brownout.server.b')",
        "from . import b",
    ],
)
def test_a_cycle_is_found_wherever_its_import_is(where: str) -> None:
    a = imported_modules(where, "brownout.server.a")
    b = imported_modules("from brownout.server.a import A", "brownout.server.b")
    modules = {"brownout.server.a", "brownout.server.b"}
    graph = {"brownout.server.a": a & modules, "brownout.server.b": b & modules}
    assert find_cycle(graph) == ["brownout.server.a", "brownout.server.b", "brownout.server.a"]
    assert find_cycle({"brownout.server.a": a & modules, "brownout.server.b": set()}) is None
