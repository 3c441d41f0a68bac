"""Reading which modules a module of ``brownout`` imports, and finding import cycles among them.

The import-graph checks (the two layers, no cycle among the server's, the gateway's or the drills'
modules) read the source, not ``sys.modules``: an import inside a function or under
``if TYPE_CHECKING:`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import brownout

__all__ = ["PACKAGE", "find_cycle", "import_graph", "imported_modules", "module_name"]

PACKAGE = Path(brownout.__file__).resolve().parent
"""The directory of the ``brownout`` package under test."""


def module_name(path: Path) -> str:
    """The dotted name of the module at ``path`` (a file under :data:`PACKAGE`)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_DOTTED = re.compile(r"brownout(\.\w+)+")


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the text of ``module``) may import, wherever the import statement is.

    Walks the whole tree, so imports inside functions, ``try`` blocks and ``if TYPE_CHECKING:`` count.
    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a module); relative imports are resolved.
    A string that is a dotted ``brownout.…`` name counts too: that is how lazy imports name their
    module (``importlib.import_module("brownout.state.redis")``).
    """
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            found.add(node.value)
    return found


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Each module of ``packages`` (dotted names, ``"brownout.gateway"``) -> the modules of ``packages``
    it may import (any import statement, as :func:`imported_modules` reads them)."""
    sources = {
        module_name(path): path
        for package in packages
        for path in sorted((PACKAGE.parent / package.replace(".", "/")).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        source = path.read_text(encoding="utf-8")
        found = imported_modules(source, name, is_package=path.name == "__init__.py")
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
