"""The database layer's own guarantees, on SQLite and PostgreSQL: idempotent profile requests under a
real race (`service.builds.request`), tenant-scoped lookups, timestamps in UTC."""

from __future__ import annotations

import threading

from service import builds
from service.store import db


def _tenant_and_user(settings) -> tuple[int, int]:
    with db.session_scope(settings) as session:
        tenant = db.get_or_create_tenant(session, "t")
        user = db.User(tenant_id=tenant.id, uid="u")
        session.add(user)
        session.flush()
        return tenant.id, user.id


def test_concurrent_identical_requests_make_one_profile(settings):
    tenant_id, user_id = _tenant_and_user(settings)
    args = (tenant_id, "user", user_id, "diffmean", "m", {"layer": 1}, "sample")
    factory = db.session_factory(settings)
    first = factory()
    row, created = builds.request(first, *args)  # inserted, not committed yet
    assert created
    result: dict = {}

    def second_request() -> None:
        with db.session_scope(settings) as session:
            other, made = builds.request(session, *args)
            result["id"], result["created"] = other.id, made

    thread = threading.Thread(target=second_request)
    thread.start()
    thread.join(0.5)
    # It cannot finish yet: the first insert holds the unique key (PostgreSQL) or the write lock (SQLite).
    assert thread.is_alive()
    first.commit()
    thread.join(30)
    first.close()
    assert not thread.is_alive()
    assert result == {"id": row.id, "created": False}
    with db.session_scope(settings) as session:
        assert len(db.list_profiles(session, tenant_id)) == 1


def test_lookups_are_scoped_by_tenant(settings):
    tenant_id, user_id = _tenant_and_user(settings)
    with db.session_scope(settings) as session:
        other = db.get_or_create_tenant(session, "other").id
        row, _ = builds.request(session, tenant_id, "user", user_id, "diffmean", "m", {}, "s")
        pid = row.id
    with db.session_scope(settings) as session:
        assert db.get_profile(session, tenant_id, pid) is not None
        assert db.get_profile(session, other, pid) is None
        assert db.get_user(session, other, "u") is None
        assert db.list_profiles(session, other) == []
        assert db.subject_by_id(session, other, "user", user_id) is None


def test_timestamps_come_back_in_utc(settings):
    tenant_id, user_id = _tenant_and_user(settings)
    with db.session_scope(settings) as session:
        row, _ = builds.request(session, tenant_id, "user", user_id, "diffmean", "m", {}, "s")
        pid, created = row.id, row.created_at
    with db.session_scope(settings) as session:
        again = db.get_profile(session, tenant_id, pid)
        assert again.created_at.utcoffset().total_seconds() == 0
        assert again.created_at == created
