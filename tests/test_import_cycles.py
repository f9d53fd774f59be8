"""No import cycles in `steer_core`, `service` or `worker`: a module never imports, directly or through
others, a module that imports it. Checked on the source with `ast`: every import statement counts, at
module level and inside functions alike (an import that only runs on some code path still ties the two
modules together). Imports under `if TYPE_CHECKING:` are left out: they never run, and a type named in an
annotation may point back at a module that uses it.

`from package import name` counts as an import of `package.name` when that is a module, else of
`package`; importing a submodule is not counted as importing its parent packages (their `__init__` would
otherwise tie every module of a package to every other)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("steer_core", "service", "worker")


def find_modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of `PACKAGES`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of `tree` that can run (none under `if TYPE_CHECKING:`)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules `module` imports -> the line of the first statement that does."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: dict[str, int] = {}
    for node in import_statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [known(alias.name) for alias in node.names]
        else:
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module or ""
            targets = [known(f"{base}.{alias.name}") for alias in node.names]
        for target in targets:
            if target is not None and target != module:
                out.setdefault(target, node.lineno)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    modules = find_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def tied_groups(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others (the strongly connected
    components of more than one module, by Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each group of `tied_groups`, as [a, b, ..., a]."""
    return [_cycle_in(graph, group) for group in tied_groups(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first, within the component)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return "\n  ".join(steps)


def test_the_packages_have_no_import_cycle():
    graph = import_graph()
    assert "steer_core.methods" in graph and "service.api.openapi" in graph and "worker.tasks" in graph
    groups = tied_groups(graph)
    assert not groups, "import cycles:\n" + "\n".join(
        f"- {describe(graph, _cycle_in(graph, group))}\n  (tied together: {', '.join(sorted(group))})"
        for group in groups)


def test_a_cycle_is_found_and_printed():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7, "d": 1}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert describe(graph, ["a", "b", "c", "a"]) == "a (line 3) -> b\n  b (line 5) -> c\n  c (line 7) -> a"


def test_function_level_imports_count_and_type_checking_ones_do_not():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
                     "def f():\n    import z\n")
    assert [alias.name for node in import_statements(tree) for alias in node.names
            if isinstance(node, ast.Import)] == ["y", "z"]
