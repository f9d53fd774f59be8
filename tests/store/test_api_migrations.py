"""Alembic migrations: up to head on empty SQLite and PostgreSQL databases they produce exactly the
models' schema; down and up again works; `pluristeer db upgrade` runs them."""

from __future__ import annotations

import argparse

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.store import db


def schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    db.Base.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_the_models_and_round_trips(empty_database):
    url = empty_database
    assert not db.is_current(url)
    db.upgrade_cli(argparse.Namespace(database_url=url))
    assert db.is_current(url)
    assert schema_diff(url) == []
    assert set(db.Base.metadata.tables) <= tables(url)

    db.dispose_engines(url)
    from alembic import command

    command.downgrade(db.alembic_config(url), "base")
    assert tables(url) <= {"alembic_version"}
    db.upgrade(url)
    assert schema_diff(url) == [] and db.is_current(url)
    db.upgrade(url)  # already at head: nothing to do, no error


def test_constraints_hold_in_the_migrated_schema(empty_database):
    from sqlalchemy.exc import IntegrityError

    url = empty_database
    db.upgrade(url)
    with db.session_scope(url) as session:
        tenant = db.get_or_create_tenant(session, "t")
        user = db.User(tenant_id=tenant.id, uid="u")
        session.add(user)
        session.flush()
        tenant_id, user_id = tenant.id, user.id
    with pytest.raises(IntegrityError):  # one subject per opinion row
        with db.session_scope(url) as session:
            session.add(db.OpinionRow(tenant_id=tenant_id, subject_kind="group", user_id=user_id, item_id="q",
                                      question="q", options=["a", "b"], ordinal=[1, 2], target=[1, 0]))
    with pytest.raises(IntegrityError):  # status is one of four
        with db.session_scope(url) as session:
            session.add(db.ProfileRow(tenant_id=tenant_id, subject_kind="user", subject_id=user_id, method="m",
                                      model="x", params={}, params_hash="h", sample_hash="s", status="done"))
    with pytest.raises(IntegrityError):  # uid unique per tenant
        with db.session_scope(url) as session:
            session.add(db.User(tenant_id=tenant_id, uid="u"))
