"""Fixtures for the service tests (tests/conftest.py imports them): settings on a temporary home, a fresh
database per test (SQLite, and PostgreSQL where 127.0.0.1:5432 answers), the Flask app and client, and one
API key per tenant.

Redis and the Celery worker come from `runtime.py` (its fixtures `redis_url`, `celery_worker`, imported by
tests/conftest.py beside these).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from runtime import redis_db_url

from service.store import db

# Any database on the server: tests create and drop their own databases next to it.
PG_URL = os.environ.get("PLURISTEER_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def postgres_unavailable() -> str | None:
    """Why the PostgreSQL variants cannot run here (printed with the skips), or None when a server answers."""
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL)
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=0.5):
            pass
    except OSError as exc:
        return f"PostgreSQL is not reachable at {url.host}:{url.port or 5432} ({exc})"
    try:
        engine = db.make_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {url.host}:{url.port or 5432} refused the test connection: {exc}"
    return None


def pg_database_url(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once with Alembic; each test gets a copy."""
    path = tmp_path_factory.mktemp("dbtemplate") / "template.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    db.dispose_engines(url)
    return path


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[tuple[object, str] | str]:
    """A PostgreSQL database migrated once with Alembic (or why there is none); each test gets a copy
    (`CREATE DATABASE ... TEMPLATE`, about 0.1 s)."""
    unavailable = postgres_unavailable()
    if unavailable is not None:
        yield unavailable
        return
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"pluristeer_tmpl_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_database_url(name)
        db.upgrade(url)
        db.dispose_engines(url)
        yield admin, name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def _postgres_database(postgres_template, prefix: str, from_template: bool) -> Iterator[str]:
    """A new PostgreSQL database for one test (a copy of the migrated template, or empty), dropped after."""
    if isinstance(postgres_template, str):
        pytest.skip(postgres_template)
    from sqlalchemy import text

    admin, template = postgres_template
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if from_template else "")))
    url = pg_database_url(name)
    try:
        yield url
    finally:
        db.dispose_engines(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path,
                 postgres_template) -> Iterator[str]:
    """A fresh database migrated to the newest revision, for one test: a copy of a template migrated
    once per session (a file copy for SQLite, a template database for PostgreSQL)."""
    if request.param == "sqlite":
        path = tmp_path / "pluristeer.db"
        shutil.copy(sqlite_template, path)
        url = f"sqlite:///{path}"
        yield url
        db.dispose_engines(url)
        return
    with _postgres_database(postgres_template, "pluristeer_t", from_template=True) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path, postgres_template) -> Iterator[str]:
    """A new database with no tables at all (for migration tests)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
        yield url
        db.dispose_engines(url)
        return
    with _postgres_database(postgres_template, "pluristeer_m", from_template=False) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str):
    from service.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    return Settings.from_env(home=home, database_url=database_url, redis_url=redis_url,
                             artifact_dir=home / "artifacts")


@pytest.fixture
def task_settings(settings, redis_url, tiny_lm, monkeypatch):
    """`settings` for running worker tasks in this process: Redis database 7 (flushed before and after), the
    tiny model as the worker's model, and a short staleness limit."""
    from dataclasses import replace

    import redis

    from worker import lifecycle, tasks  # noqa: F401  (tasks: registers the shared tasks with every Celery app)

    s = replace(settings, redis_url=redis_db_url(redis_url, 7), build_stale_after=60)
    client = redis.Redis.from_url(s.redis_url)
    client.flushdb()
    monkeypatch.setitem(lifecycle._models, s.model, tiny_lm)  # the process's model: the tiny one
    yield s
    client.flushdb()
    client.close()


@pytest.fixture
def app(settings):
    from service import create_app

    return create_app({"SETTINGS": settings, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


def _key(settings, tenant: str) -> str:
    from service.auth import create_key

    with db.session_scope(settings) as session:
        return create_key(session, tenant)


@pytest.fixture
def tenant_key(settings) -> str:
    return _key(settings, "tenant-a")


@pytest.fixture
def other_tenant_key(settings) -> str:
    return _key(settings, "tenant-b")


@pytest.fixture
def auth(tenant_key) -> dict[str, str]:
    """Headers of tenant A's key."""
    return {"Authorization": f"Bearer {tenant_key}"}


@pytest.fixture
def other_auth(other_tenant_key) -> dict[str, str]:
    """Headers of tenant B's key."""
    return {"Authorization": f"Bearer {other_tenant_key}"}
