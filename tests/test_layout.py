"""The package's form: packages by concern with no import circles, no reaching into another
module's private names, short functions, and docs/ARCHITECTURE.md naming every module.

The import graph is read from the source (ast), so it counts every import of a dltrain
module: at module level or inside a function, under TYPE_CHECKING or not. A deferred import
cannot hide a circle from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dltrain"
MAX_TOP_MODULES = 12
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imports_of(path: Path) -> set[str]:
    """The dltrain modules a file imports (`from pkg import mod` counts as pkg.mod)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            found.update(submodules or {node.module} & set(MODULES))
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_is_part_of_an_import_circle():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    assert circles(graph) == []


def test_packages_import_one_way():
    # a looser rule on top: config/, data/, training/… as wholes import in one direction too
    # (the top-level modules count as packages of their own)
    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph.setdefault(package(name), set()).update(
            package(other) for other in imports_of(path) if package(other) != package(name)
        )
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    # planted: a → b → c → a, and d alone importing a
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(edges) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_name():
    reached = [
        f"{module_name(path)} takes {node.module}.{alias.name}"
        for path in MODULES.values()
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dltrain")
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert reached == []


def test_the_top_of_the_package_stays_a_short_list():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def function_lines(function: ast.FunctionDef, path: Path) -> int:
    """A function's length, def to end. A command's counts from its body: its signature is
    the command's options and its docstring its --help."""
    if path.parent.name == "commands":
        body = function.body[1:] if ast.get_docstring(function) else function.body
        return function.end_lineno - body[0].lineno + 1
    return function.end_lineno - function.lineno + 1


def test_every_function_fits_on_a_screen():
    long = [
        f"{module_name(path)}.{node.name}: {function_lines(node, path)} lines"
        for path in MODULES.values()
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and function_lines(node, path) > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_architecture_names_every_module():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(PACKAGE))
        for path in MODULES.values()
        if path.name != "__init__.py" and f"`{path.relative_to(PACKAGE)}`" not in text
    ]
    assert missing == []


@pytest.mark.parametrize("name", ["MODELS", "DATASETS", "LOSSES", "OPTIMIZERS", "SCHEDULERS"])
def test_the_registries_public_path_is_the_one_dltrain_fills(name):
    import dltrain.config.registry as registries
    import dltrain.registry as public

    assert getattr(public, name) is getattr(registries, name)
