"""Guards that keep the code base reading one way: no import cycle among the project's modules,
no Ray or FastAPI in the library, no file over 300 lines, and a method core a reader can hold
in their head. Plain `ast`: the files are parsed, never imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("consistory", "deployments", "consistory_batch")
MAX_LINES = 300
METHOD_CORE = "consistory/method"
MAX_METHOD_CORE_LINES = 2000


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, wherever the import stands (top level, inside a
    function, under `if TYPE_CHECKING:`): a cycle through any of them is a cycle."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_imports_neither_ray_nor_fastapi():
    offenders = []
    for path in sorted((ROOT / "consistory").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("ray", "fastapi")]
    assert not offenders


@pytest.mark.parametrize("folder", [*PACKAGES, "tests", "bench", "deployments/edge/static/storyboard"])
def test_no_file_is_over_300_lines(folder):
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted((ROOT / folder).rglob("*"))
            if p.suffix in (".py", ".js", ".html", ".css") and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these by concern: {long}"


def test_the_method_core_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / METHOD_CORE).rglob("*.py"))
    assert lines <= MAX_METHOD_CORE_LINES, f"{METHOD_CORE} holds {lines} lines"
