"""The service's layers, read from its source with `ast` (test_layout.py's reading of imports):
a request goes route -> story flow -> model replicas -> store and never back, so neither the flow
nor the model replicas, nor anything they import, know the edge or an HTTP framework. (No
import cycles and no long files: test_layout.py, for the whole project.)"""

from __future__ import annotations

import ast

import pytest
from test_layout import imported_modules, project_modules

HTTP_FRAMEWORKS = {"fastapi", "starlette"}


def _third_party(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _reached_from(layer: str) -> dict[str, set[str]]:
    """Every project module a module of `layer` imports, directly or not, with what each of
    them imports from outside the project."""
    modules = project_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    reached: set[str] = set()
    todo = [name for name in graph if name == layer or name.startswith(layer + ".")]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    return {name: _third_party(modules[name]) for name in reached}


@pytest.mark.parametrize("layer", ["deployments.flow", "deployments.replicas"])
def test_no_edge_and_no_http_framework_below_the_edge(layer: str) -> None:
    reached = _reached_from(layer)
    assert not [name for name in reached if name.startswith("deployments.edge")], sorted(reached)
    users = sorted(name for name, names in reached.items() if names & HTTP_FRAMEWORKS)
    assert not users, f"{layer} reaches an HTTP framework through {users}"


def test_the_edge_is_what_imports_fastapi() -> None:
    """The check above would pass vacuously if it read imports wrongly: the edge does use it."""
    assert any(names & HTTP_FRAMEWORKS for names in _reached_from("deployments.edge").values())
