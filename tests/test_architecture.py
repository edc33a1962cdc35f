"""The package's plan: no import circle between its modules.

The graph is read from the source with ``ast``, not by importing anything. An edge A -> B is
any ``import``/``from ... import`` in module A that names module B, at module level or inside a
function or class body alike: an import deferred into a function still ties A to B (A cannot be
understood or moved without B), it only hides the circle until that function runs.
``from breakhis import storage`` is an edge to ``breakhis.storage`` (a submodule),
``from breakhis.train.job import X`` an edge to ``breakhis.train.job``.

Imports under ``if TYPE_CHECKING:`` are never executed, so the runtime graph leaves them out;
a second test counts them too, because a type named in a signature is a dependency a reader
follows all the same (the circles issue 25 found, train <-> train_result <-> tracking and
ingest <-> tiles, ran only through such imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "breakhis"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_checking: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth; those under ``if TYPE_CHECKING:`` only
    when ``type_checking``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path = PACKAGE, *, type_checking: bool = False) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (see the module docstring)."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), filename=str(path)), type_checking):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for target in targets:
                # import a.b.c names a.b.c; the nearest stored module is the edge.
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_module_and_function_level_imports_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import X\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import Y\n"
    )
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == set()
    assert find_cycle(graph) is None
    assert find_cycle(import_graph(pkg, type_checking=True)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-annotations"])
def test_the_package_has_no_import_circle(type_checking):
    graph = import_graph(type_checking=type_checking)
    assert len(graph) > 40 and graph["breakhis.cli"], "the graph should see the whole package"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# The stages as floors (docs/architecture.md): an import between two folders of the package
# points down a floor; the shared leaves (top-level modules below) may be imported by any floor.
FLOORS = {
    "data": 0,
    "synth": 0,
    "stats": 0,
    "dev": 0,
    "model": 1,
    "score": 2,
    "train": 2,
    "evaluate": 3,
    "tune": 3,
    "protocol": 4,
    "cli": 6,
    "demo": 5,
    "benchmarks": 5,
}
LEAVES = {"names", "subtypes", "storage", "faults", "options", "raysession", "ray_internals"}


def _stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import between two folders that does not point down a floor, as 'a -> b'."""
    bad = []
    for source, targets in sorted(graph.items()):
        here = _stage(source)
        for target in sorted(targets):
            there = _stage(target)
            if there in ("", here) or there in LEAVES:
                continue
            if here in LEAVES or FLOORS[there] >= FLOORS[here]:
                bad.append(f"{source} -> {target}")
    return bad


def test_every_stage_has_a_floor_and_the_leaves_are_modules():
    stages = {_stage(m) for m in import_graph()} - {""}
    assert stages == set(FLOORS) | LEAVES, "a new folder or top-level module needs a floor"
    for leaf in LEAVES:
        assert (PACKAGE / f"{leaf}.py").is_file()


def test_floor_check_names_an_import_that_points_up():
    graph = {"breakhis.model.networks": {"breakhis.train.config"}, "breakhis.train.job": set()}
    assert floor_violations(graph) == ["breakhis.model.networks -> breakhis.train.config"]
    graph = {"breakhis.storage": {"breakhis.data.catalog"}, "breakhis.data.catalog": set()}
    assert floor_violations(graph) == ["breakhis.storage -> breakhis.data.catalog"]


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-annotations"])
def test_imports_between_stages_point_down_a_floor(type_checking):
    assert floor_violations(import_graph(type_checking=type_checking)) == []


MAX_FUNCTION_LINES = 80
"""A function a reader holds in one screen (issue 25 split the six that had grown past it)."""


def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method of ``package`` longer than ``limit`` lines (its decorators
    left out, its docstring counted), as 'module.qualified_name (N lines)'."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, prefix: str, path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > limit:
                            found.append(f"{module_name(path, package)}.{name} ({lines} lines)")
                    visit(child, f"{name}.")

        visit(tree, "")
    return found


def test_long_functions_are_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"        x{i} = {i}" for i in range(5))
    (pkg / "a.py").write_text(f"class C:\n    def f(self):\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions(pkg, limit=5) == ["pkg.a.C.f (6 lines)"]
    assert long_functions(pkg, limit=6) == []


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []
