"""The house's layer order, enforced from the code's own imports (ast, nothing imported).

Each top-level module or subpackage of streamsoup stands on one layer; it imports its own unit and units of
lower layers only (units of one layer know nothing of each other), never a streamsoup module from inside a
function (an import that dodges the order at load time), and no chain of imports comes back to where it began.
docs/DESIGN.md draws the same order.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamsoup"

#: bottom to top; a unit is a top-level module or subpackage of streamsoup ("" is streamsoup/__init__.py)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "errors", "faults"),
    ("units", "paths"),
    ("options", "io"),
    ("numerics",),
    ("sources", "synthetic"),
    ("planning",),
    ("tasks",),
    ("reporting",),
    ("run",),
    ("api",),
    ("cli", ""),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def is_module(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The streamsoup modules an import statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "streamsoup"]
    if node.level:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    elif node.module and node.module.split(".")[0] == "streamsoup":
        base = node.module
    else:
        return []
    found = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
    return found if len(found) == len(node.names) else [base, *found]


def read_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the streamsoup modules it imports at load time; and every import made inside a function."""
    graph: dict[str, set[str]] = {}
    inside_functions = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set()
        loaded_late = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                loaded_late.update(id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found = targets(node, module, path.name == "__init__.py")
                if id(node) in loaded_late:
                    inside_functions += [f"{module}:{node.lineno} imports {t} inside a function" for t in found]
                else:
                    graph[module].update(found)
    return graph, inside_functions


GRAPH, LATE = read_imports()


def test_every_unit_has_a_layer() -> None:
    placed = {unit_of(m) for m in GRAPH}
    assert placed - set(LAYER) == set(), "a new module or subpackage: give it a layer in LAYERS and DESIGN.md"


def test_imports_only_go_down() -> None:
    wrong = [
        f"{module} ({unit_of(module) or 'streamsoup'}) imports {target} ({unit_of(target) or 'streamsoup'})"
        for module, imported in sorted(GRAPH.items())
        for target in sorted(imported)
        if unit_of(target) != unit_of(module) and LAYER[unit_of(target)] >= LAYER[unit_of(module)]
    ]
    assert wrong == []


def test_no_imports_inside_functions() -> None:
    assert LATE == []


def test_no_circles() -> None:
    """Tarjan's strongly connected components over every module: each must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for t in GRAPH.get(m, ()):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            component = []
            while True:
                t = stack.pop()
                component.append(t)
                if t == m:
                    break
            if len(component) > 1 or m in GRAPH.get(m, ()):
                circles.append(sorted(component))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert circles == []


@pytest.mark.parametrize(
    "source, problem",
    [
        ("from ..run.driver import run_merge\n", "imports_up"),
        ("def f():\n    from ..io import writer\n", "late"),
        ("from . import b\n", "circle"),
    ],
)
def test_the_checks_see_a_wrong_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, problem: str):
    """The checks above fail on a house that breaks them (a copy of the package with one module changed)."""
    copy = tmp_path / "streamsoup"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "io" / "a.py").write_text(source)
    (copy / "io" / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", copy)
    graph, late = read_imports()
    monkeypatch.setattr(f"{__name__}.GRAPH", graph)
    monkeypatch.setattr(f"{__name__}.LATE", late)
    check = {
        "imports_up": test_imports_only_go_down,
        "late": test_no_imports_inside_functions,
        "circle": test_no_circles,
    }
    with pytest.raises(AssertionError):
        check[problem]()
