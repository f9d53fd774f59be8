"""The build task's code path in this process (Celery's eager mode), on the tiny model: what it stores
and records when the build succeeds, when the disk keeps failing (retries, then `failed`), and when the
row does not exist. The same task through a real worker process is in test_worker.py."""

from __future__ import annotations

from dataclasses import replace

import redis
from api_helpers import requested_group_profile

from service.queue import BUILD_TASK, create_celery
from service.store import db
from service.store.artifacts import REDIS_PREFIX, ArtifactStore
from steer_core.data import make_item
from worker import tasks


def queued_profile(settings) -> str:
    items = [make_item(f"Do you agree with statement {i}?", ["Yes", "No"], target=[0.8, 0.2], id=f"s{i}")
             for i in range(3)]
    return requested_group_profile(settings, "tenant-t", "g", items, {"layer": 1, "strength": 2.0})[0]


def run_task(settings, profile_id: str):  # noqa: ANN201
    return create_celery(settings).tasks[BUILD_TASK].apply(args=[profile_id])


def test_the_task_builds_stores_caches_and_records(task_settings):
    pid = queued_profile(task_settings)
    result = run_task(task_settings, pid)
    assert result.successful(), result.traceback
    out = result.get()
    assert out["status"] == "ready"
    with db.session_scope(task_settings) as session:
        row = db.profile_by_id(session, pid)
        assert (row.status, row.artifact_sha256, row.artifact_size) == ("ready", out["artifact_sha256"],
                                                                        out["artifact_size"])
        assert row.chosen["layer"] == 1 and row.chosen["strength"] == 2.0
        assert row.metrics["evaluation"] == "in-sample"
        assert row.progress["done"] == row.progress["total"] > 0
        assert [(a.attempt, a.status) for a in row.attempts] == [(1, "succeeded")]
        assert f"task {result.id}" in row.attempts[0].worker
    data = ArtifactStore(task_settings.artifact_dir).get(out["artifact_sha256"])
    assert len(data) == out["artifact_size"]
    assert redis.Redis.from_url(task_settings.redis_url).get(REDIS_PREFIX + out["artifact_sha256"]) == data
    # A second delivery of the same build does nothing.
    assert run_task(task_settings, pid).get()["skipped"] is True


def test_a_disk_that_keeps_failing_is_retried_then_failed_with_the_reason(task_settings, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    broken = replace(task_settings, artifact_dir=blocker / "artifacts")  # every write: NotADirectoryError
    pid = queued_profile(broken)
    result = run_task(broken, pid)
    assert result.failed()
    with db.session_scope(broken) as session:
        row = db.profile_by_id(session, pid)
        assert row.status == "failed"
        assert f"gave up after {tasks.MAX_RETRIES} retries" in row.error and "NotADirectoryError" in row.error
        statuses = [a.status for a in row.attempts]
    assert statuses == ["retrying"] * tasks.MAX_RETRIES + ["failed"]


def test_a_missing_row_is_retried_briefly_then_skipped(task_settings):
    out = run_task(task_settings, "00000000-0000-0000-0000-000000000000").get()
    assert out == {"profile_id": "00000000-0000-0000-0000-000000000000", "status": "missing", "skipped": True}
