"""The import graph: no module imports a sibling stage, and no circle of imports (run: pytest tests/test_layering.py).

Imports are read from the source with `ast`, every one of them: at module level, under TYPE_CHECKING and inside
functions (deploykit imports heavy libraries lazily, but a lazy circle is still a circle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "deploykit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The deploykit modules `path` imports (a name imported from a package counts as its submodule if one exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # Not part of the package's import graph: files copied into servers' folders and run there.
    files = {m: p for m, p in files.items() if m not in ("deploykit.package.triton_python_model", "deploykit.package.torchserve_handler")}
    modules = set(files)
    return {m: _imports(p, modules) - {m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_a_stage():
    graph = import_graph()
    stages = {m for m in graph if m.startswith("deploykit.stages.")}
    offenders = {m: sorted(graph[m] & stages) for m in graph if graph[m] & stages}
    assert offenders == {}, f"stages are leaves: only the entry points load them, not {offenders}"


def test_no_import_circle():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how a package exposes them, not a circle in the design.
    for m in graph:
        graph[m] = {n for n in graph[m] if not (n.startswith(m + ".") or (m.startswith(n + ".") and _is_package(n)))}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _is_package(module: str) -> bool:
    return (REPO / Path(*module.split(".")) / "__init__.py").is_file()


def test_the_graph_sees_real_imports():
    graph = import_graph()  # so that the tests above cannot pass on an empty graph
    assert "deploykit.artifacts" in graph["deploykit.pipeline.engine"]
    assert "deploykit.pipeline.context" in graph["deploykit.stages.export"]
    assert len(graph) > 60
