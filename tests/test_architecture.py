"""The structure the code promises: no import cycles, tasks that do not know each other, apps
that never branch on the task name, and project imports at module level (or deferred with a
reason). Read from the source with ast, so it holds for every module, imported or not."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("task", "strategies", "server_app", "client_app", "bench")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages and scripts/."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "scripts").glob("*.py")):  # scripts import each other by name
        modules[path.stem] = path
    return modules


MODULES = project_modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (``a.b.c`` may be a name inside module ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(project module imported, the import node, inside a function?) of one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (target := _resolve(alias.name)):
                        found.append((target, child, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    if (target := _resolve(f"{child.module}.{alias.name}")):
                        found.append((target, child, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {name: sorted({t for t, _, _ in imports_of(path) if t != name})
         for name, path in MODULES.items()}


def test_every_project_module_imports():
    for name in MODULES:
        if name in ("bench.__main__",) or "." not in name and name not in PACKAGES:
            continue  # scripts and the bench entry point run as programs
        importlib.import_module(name)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in GRAPH:
        if node not in state:
            walk(node)


@pytest.mark.parametrize("one,other", [("task.lm", "task.image"), ("task.image", "task.lm")])
def test_no_task_imports_another(one, other):
    offenders = [(m, t) for m, ts in GRAPH.items() if m == one or m.startswith(one + ".")
                 for t in ts if t == other or t.startswith(other + ".")]
    assert not offenders


def test_only_task_modules_and_their_tests_name_a_task_module():
    """The apps and strategies reach a task through get_task (task/__init__.py), never a task
    folder directly; bench and scripts measure the text task by name, which is allowed."""
    for module in GRAPH:
        if module.split(".")[0] in ("server_app", "client_app", "strategies", "task") \
                and not module.startswith(("task.lm", "task.image")):
            reached = [t for t in GRAPH[module] if t.startswith(("task.lm", "task.image"))]
            assert not reached, (module, reached)


def test_no_branch_on_the_task_name_outside_task():
    for name, path in MODULES.items():
        if name.split(".")[0] == "task":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in [node.left, *node.comparators]
                         if isinstance(n, ast.Attribute) and n.attr == "task"
                         or isinstance(n, ast.Name) and n.id == "task"]
                assert not names, f"{path.relative_to(ROOT)}:{node.lineno} compares the task name"


def test_project_imports_inside_functions_say_why():
    """A project import inside a function only defers a heavy dependency, with a comment
    ``deferred: <reason>`` on it or on the line above its group."""
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, node, in_function in imports_of(path):
            if not in_function:
                continue
            i = node.lineno - 1
            while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
                i -= 1  # the first import of the group
            said = lines[i] + (lines[i - 1] if i else "")
            assert "deferred:" in said, f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"
