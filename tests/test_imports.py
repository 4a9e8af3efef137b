"""The import graph of src/rto: no circles, and every package imports only from packages below it.

Every `import` and `from ... import` in src/rto/**/*.py counts, wherever it is written: at module
level and inside functions (a function-level import is still a dependency; it only runs later).
Imports under `if TYPE_CHECKING:` do not count: they never run, and exist only for annotations.
Relative imports are resolved, and `from pkg import name` is an edge to `pkg.name` when `name` is
a submodule (else to `pkg`). A string literal "rto.<module>:<name>" counts as an import of that
module by the module that holds it: the stage registry (rto.commands) names each stage's config
class and run function that way and imports them when a stage runs. Only imports of rto modules
are looked at; the test imports nothing of rto, so it runs in a fraction of a second without torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import from its own package, from a package in the same layer
# (the circle check still forbids two of them importing each other) and from layers below.
# A package is `rto.<name>` (a sub-package belongs to it: rto.tasks.sentiment is rto.tasks);
# `rto` is the package's own __init__ (__version__).
LAYERS: dict[str, int] = {
    "rto": 0,
    "rto.errors": 0,
    "rto.files": 0,
    "rto.config": 1,
    "rto.data": 2,
    "rto.models": 3,
    "rto.tasks": 4,
    "rto.engine": 5,
    "rto.evaluation": 6,
    "rto.preference": 7,
    "rto.rl": 8,
    "rto.stages": 9,
    "rto.commands": 10,
    "rto.pipeline": 11,
    "rto.reference": 11,
    "rto.study": 11,
    "rto.cli": 12,
    "rto.__main__": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "rto").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


_SPEC = re.compile(r"(rto(?:\.[A-Za-z_]\w*)+):[A-Za-z_]\w*")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom | ast.Constant]:
    """Every import node and "rto.module:name" string, except in the body of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom | ast.Constant] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _SPEC.fullmatch(node.value)
        ):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)  # the else branch does run
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _existing(name: str, known: dict[str, Path]) -> str:
    """The longest prefix of `name` that is a module of rto (`rto.x.func` -> `rto.x`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported: line of the first such import}, rto modules only."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, {})
        targets: list[tuple[str, int]] = []
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant):  # "rto.module:name"
                targets.append((node.value.split(":")[0], node.lineno))
                continue
            if isinstance(node, ast.Import):
                targets += [(alias.name, node.lineno) for alias in node.names]
                continue
            if node.level:  # relative: from the importer's package, up level - 1 packages
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            for alias in node.names:
                sub = f"{pkg}.{alias.name}"
                targets.append((sub if sub in known else pkg, node.lineno))
        for target, line in targets:
            if target != "rto" and not target.startswith("rto."):
                continue
            imported = _existing(target, known)
            assert imported, f"{path}:{line} imports {target}, which is not a module of rto"
            if imported != name:
                edges[imported] = min(line, edges.get(imported, line))
    return graph


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def where(graph: dict[str, dict[str, int]], a: str, b: str) -> str:
    path = modules()[a].relative_to(SRC.parent)
    return f"{path}:{graph[a][b]}"


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle of imports as [m0, m1, ..., m0], or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, {})):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_circular_imports() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = "\n".join(f"  {a} -> {b}  ({where(graph, a, b)})" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(
            f"circular import: {' -> '.join(cycle)}\n{steps}\n"
            "Move the shared code down into a lower module (see LAYERS in tests/test_imports.py)."
        )


def test_every_package_has_a_layer() -> None:
    missing = sorted({package(m) for m in modules()} - set(LAYERS))
    assert not missing, (
        f"package(s) {', '.join(missing)} are not in LAYERS of tests/test_imports.py: add each "
        "with the number of the layer it belongs to (it may import only from its own layer and "
        "those below it; the layers above it may import it)"
    )


def test_imports_go_downward() -> None:
    graph = import_graph()
    upward = []
    for a, bs in sorted(graph.items()):
        for b in sorted(bs):
            pa, pb = package(a), package(b)
            if pa == pb:
                continue
            if pa not in LAYERS or pb not in LAYERS:
                continue  # test_every_package_has_a_layer names it
            if LAYERS[pb] > LAYERS[pa]:
                upward.append(
                    f"  {a} (layer {LAYERS[pa]}) imports {b} (layer {LAYERS[pb]})  ({where(graph, a, b)})"
                )
    assert not upward, (
        "imports that go up the layers (LAYERS in tests/test_imports.py):\n"
        + "\n".join(upward)
        + "\nMove what both need into the lower package, or pass it in from above."
    )
