"""The module graph of gateway/, drivers/ and rules/ has no cycle (issue 13, item 2).

Every import counts, wherever it is written: at module level, under ``if TYPE_CHECKING:`` and inside a function (a
lazy import, there to keep a small site's memory down). A type-only or lazy cycle still ties two modules together:
neither can be read, tested or replaced without the other. The cycles this test was written against were broken by
moving the shared type to the module that owns it (``gateway/config/site_types.py``) or by depending on a protocol
(``gateway.status.ServedGateway``, ``gateway.incentives.config.CheckedSite``), and none of the lazy imports forms
one, so none is exempt.

Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so an import also reaches the ``__init__`` of each
package above the module named, except the importer's own packages (they are already running when it is imported).
rules/ is in the graph too: a cycle through it is a cycle between gateway/ modules all the same.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "drivers", "rules")

#: how an import is written, for the message
Kind = str


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, kind: Kind = "module level") -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
    """Every import statement below ``node`` with how it is reached: "module level", "TYPE_CHECKING" or "in a
    function" (a class body runs at import, so it counts as module level)."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, kind
        return
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        kind = "in a function"
    elif isinstance(node, ast.If) and _is_type_checking(node.test) and kind == "module level":
        for statement in node.body:
            yield from _imports(statement, "TYPE_CHECKING")
        for statement in node.orelse:
            yield from _imports(statement, kind)
        return
    for child in ast.iter_child_nodes(node):
        yield from _imports(child, kind)


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: Mapping[str, Path]
) -> set[str]:
    """The graph's modules an import statement runs."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in modules else base)  # `from pkg import module` runs pkg.module
    own_packages = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if is_package:
        own_packages.add(importer)
    found: set[str] = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in modules and module not in own_packages and module != importer:
                found.add(module)
    return found


def import_graph(modules: Mapping[str, Path]) -> dict[str, dict[str, tuple[Kind, int]]]:
    """module -> imported module -> (how, line) of its first import statement."""
    graph: dict[str, dict[str, tuple[Kind, int]]] = {}
    for name, path in modules.items():
        edges: dict[str, tuple[Kind, int]] = {}
        for node, kind in _imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, name, is_package=path.name == "__init__.py", modules=modules):
                edges.setdefault(target, (kind, node.lineno))
        graph[name] = edges
    return graph


def tangles(graph: Mapping[str, Mapping[str, object]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return groups


def find_cycles(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) per group of modules that import each other."""
    return [_cycle_in(group, graph) for group in tangles(graph)]


def _cycle_in(group: set[str], graph: Mapping[str, Mapping[str, object]]) -> list[str]:
    """A shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for module in frontier:
            for target in sorted(graph[module]):
                if target == start:
                    return [*paths[module], start]
                if target in group and target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in {sorted(group)}")  # a strongly connected group always has one


def _describe(cycle: list[str], graph: Mapping[str, Mapping[str, tuple[Kind, int]]]) -> str:
    steps = []
    for importer, imported in itertools.pairwise(cycle):
        kind, line = graph[importer][imported]
        steps.append(f"  {importer} imports {imported} ({kind}, line {line})")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_the_module_graph_has_no_cycle() -> None:
    graph = import_graph(_modules())
    assert len(graph) > 100, "the walk found the packages"
    groups = tangles(graph)
    assert not groups, "import cycles:\n" + "\n".join(
        f"{_describe(_cycle_in(group, graph), graph)}\n  (the modules tied together: {', '.join(sorted(group))})"
        for group in groups
    )


def _write(root: Path, files: Mapping[str, str]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = list(Path(relative).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
                "pkg/b.py": "from pkg import a\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
            id="type-only",
        ),
        pytest.param(
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "def f():\n    from .b import g\n    return g\n",
                "pkg/b.py": "import pkg.a\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
            id="lazy, relative",
        ),
        pytest.param(
            {
                "pkg/__init__.py": "from pkg.a import x\n",
                "pkg/a.py": "x = 1\n",
                "other/__init__.py": "",
                "other/b.py": "import pkg.a\n",
                "pkg/c.py": "from other import b\n",
            },
            None,
            id="a package's own __init__ is no cycle",
        ),
        pytest.param(
            {
                "pkg/__init__.py": "from pkg.c import x\n",
                "pkg/c.py": "from other.b import y\nx = 1\n",
                "other/__init__.py": "",
                "other/b.py": "import pkg.d\ny = 2\n",
                "pkg/d.py": "",
            },
            ["other.b", "pkg", "pkg.c", "other.b"],
            id="through a package's __init__",
        ),
    ],
)
def test_cycles_are_found_and_named(tmp_path: Path, files: dict[str, str], expected: list[str] | None) -> None:
    graph = import_graph(_write(tmp_path, files))
    cycles = find_cycles(graph)
    assert cycles == ([expected] if expected is not None else [])
    if expected is not None:
        assert _describe(cycles[0], graph).startswith(" -> ".join(expected))
