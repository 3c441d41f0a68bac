"""No import cycle among the modules of the server and the gateway.

Every module under ``brownout/server/`` and ``brownout/gateway/`` is parsed, and every import it may
make counts, wherever the statement is: at the top, inside a function, under ``if TYPE_CHECKING:``,
or as a dotted module name handed to ``importlib`` (:func:`support.imports.imported_modules`, the
same reading as the layers' check). An import of ``a.b.c`` counts as an import of that module only
(Python runs the packages ``a`` and ``a.b`` first, but a package that does not import ``c`` back
makes no cycle). A cycle is reported
with its path, e.g. ``runtime -> live -> runtime``.
"""

from __future__ import annotations

import pytest

from support.imports import find_cycle, import_graph, imported_modules

CHECKED = ("brownout.server", "brownout.gateway")
"""The packages whose modules must import each other without a cycle."""


def test_the_server_and_the_gateway_import_without_a_cycle() -> None:
    graph = import_graph(*CHECKED)
    cycle = find_cycle(graph)
    short = [m.removeprefix("brownout.") for m in cycle or []]
    assert cycle is None, "import cycle: " + " -> ".join(short)


def test_every_module_is_read() -> None:
    graph = import_graph(*CHECKED)
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
