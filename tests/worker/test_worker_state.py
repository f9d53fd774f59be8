"""Build bookkeeping without a worker process: claiming a build, redelivery, the sweeper, queue routing.

Runs on SQLite and PostgreSQL (the `database_url` param of conftest.py) with a real Redis as broker.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
import redis
from api_helpers import requested_group_profile
from runtime import redis_db_url

from service import builds
from service.builds import MAX_LOST_ATTEMPTS, RESEND_QUEUED_AFTER_S, Claim, sweep
from service.queue import QUEUE_ALIVE_KEY, choose_queue, queue_depths
from service.store import db
from steer_core.data import make_item, sample_hash


@pytest.fixture
def state_settings(settings, redis_url):
    """The test's database, with its own Redis database as broker (emptied before and after)."""
    s = replace(settings, redis_url=redis_db_url(redis_url, 6), build_stale_after=60)
    client = redis.Redis.from_url(s.redis_url)
    client.flushdb()
    yield s
    client.flushdb()
    client.close()


def new_profile(settings, params=None) -> str:
    items = [make_item(f"Question {i}?", ["Yes", "No"], target=[0.3 + 0.05 * i, 0.7 - 0.05 * i], id=f"q{i}")
             for i in range(6)]
    pid, created = requested_group_profile(settings, "tenant-w", "g1", items, params or {"layer": 1, "strength": 1.0})
    assert created
    return pid


def sent_at(settings, profile_id):
    with db.session_scope(settings) as session:
        return db.profile_by_id(session, profile_id).sent_at


def row_of(settings, profile_id):
    with db.session_scope(settings) as session:
        row = db.profile_by_id(session, profile_id)
        attempts = [(a.attempt, a.status) for a in row.attempts] if row else []
        return row, attempts


def test_one_claim_at_a_time_and_redelivery_takes_over(state_settings):
    pid = new_profile(state_settings)
    first = builds.claim(state_settings, pid, "task-1", builds.worker_label("h", 1, "task-1"))
    assert isinstance(first, Claim) and first.attempt == 1 and len(first.items) == 6
    assert first.sample_hash == sample_hash(first.items)
    row, attempts = row_of(state_settings, pid)
    assert row.status == "building" and attempts == [(1, "running")]
    # Another message for the same profile (a duplicate send) while the build is alive: refused.
    assert builds.claim(state_settings, pid, "task-2", builds.worker_label("h", 2, "task-2")) == "busy"
    # The same message again means its worker died (acks late): the redelivery takes over.
    again = builds.claim(state_settings, pid, "task-1", builds.worker_label("h", 3, "task-1"))
    assert isinstance(again, Claim) and again.attempt == 2
    assert row_of(state_settings, pid)[1] == [(1, "lost"), (2, "running")]


def test_a_stale_build_can_be_claimed_by_another_message(state_settings):
    pid = new_profile(state_settings)
    assert isinstance(builds.claim(state_settings, pid, "a", "h pid 1 task a"), Claim)
    later = db.utcnow() + timedelta(seconds=state_settings.build_stale_after + 1)
    taken = builds.claim(state_settings, pid, "b", "h pid 2 task b", now=later)
    assert isinstance(taken, Claim) and taken.attempt == 2


def test_progress_finish_and_final_states(state_settings):
    pid = new_profile(state_settings)
    claim = builds.claim(state_settings, pid, "t", "h pid 1 task t")
    before = row_of(state_settings, pid)[0].updated_at
    builds.report_progress(state_settings, pid, 2, 5, "search layer 1")
    row = row_of(state_settings, pid)[0]
    assert row.progress == {"done": 2, "total": 5, "stage": "search layer 1"} and row.updated_at >= before
    assert builds.finish(state_settings, claim, "ab" * 32, 123, {"improved": True}, {"layer": 1}) is True
    row, attempts = row_of(state_settings, pid)
    assert (row.status, row.artifact_sha256, row.artifact_size) == ("ready", "ab" * 32, 123)
    assert row.progress == {"done": 5, "total": 5, "stage": "done"} and row.chosen == {"layer": 1}
    assert attempts == [(1, "succeeded")] and row.finished_at is not None
    assert builds.claim(state_settings, pid, "t2", "h pid 1 task t2") == "ready"
    assert builds.claim(state_settings, "no-such-id", "t3", "x") == "missing"


def test_fail_records_the_reason_and_a_deleted_row_is_reported(state_settings):
    pid = new_profile(state_settings)
    claim = builds.claim(state_settings, pid, "t", "h pid 1 task t")
    builds.fail(state_settings, pid, claim.attempt, "params.layer: out of range")
    row, attempts = row_of(state_settings, pid)
    assert (row.status, row.error) == ("failed", "params.layer: out of range")
    assert attempts == [(1, "failed")]
    assert builds.claim(state_settings, pid, "t2", "x") == "failed"
    with db.session_scope(state_settings) as session:
        session.delete(db.profile_by_id(session, pid))
    assert builds.finish(state_settings, claim, "cd" * 32, 1, {}, {}) is False


def test_sweeper_requeues_a_stale_build_once_and_sends_it(state_settings):
    pid = new_profile(state_settings)
    builds.claim(state_settings, pid, "t", "h pid 1 task t")
    assert sweep(state_settings).requeued == []  # alive: nothing to do
    later = db.utcnow() + timedelta(seconds=state_settings.build_stale_after + 1)
    report = sweep(state_settings, now=later)
    assert report.requeued == [pid] and not report.send_errors
    row, attempts = row_of(state_settings, pid)
    assert row.status == "queued" and attempts == [(1, "lost")]
    assert queue_depths(state_settings)["cpu"] == 1  # the build message, on the real broker
    assert sweep(state_settings, now=later).requeued == []  # taken once: the second sweep finds it fresh
    # The re-sent build is claimed normally as attempt 2.
    assert builds.claim(state_settings, pid, "t-new", "h pid 2 task t-new").attempt == 2


def test_sweeper_fails_a_build_lost_too_often(state_settings):
    pid = new_profile(state_settings)
    now = db.utcnow()
    for k in range(MAX_LOST_ATTEMPTS):
        at = now + timedelta(seconds=k * 2 * (state_settings.build_stale_after + 1))
        assert isinstance(builds.claim(state_settings, pid, f"t{k}", f"h pid 1 task t{k}", now=at), Claim)
        report = sweep(state_settings, now=at + timedelta(seconds=state_settings.build_stale_after + 1))
    assert report.failed == [pid]
    row, attempts = row_of(state_settings, pid)
    assert row.status == "failed" and f"interrupted {MAX_LOST_ATTEMPTS} times" in row.error
    assert [s for _, s in attempts] == ["lost"] * MAX_LOST_ATTEMPTS


def test_sweeper_resends_a_queued_build_whose_message_was_lost(state_settings):
    pid = new_profile(state_settings)
    assert queue_depths(state_settings)["cpu"] == 0  # created without a message (as if Redis lost it)
    later = db.utcnow() + timedelta(seconds=state_settings.build_stale_after + 1)
    report = sweep(state_settings, now=later)
    assert report.resent == [pid] and queue_depths(state_settings)["cpu"] == 1
    assert row_of(state_settings, pid)[0].status == "queued"


def test_training_methods_go_to_the_gpu_queue_only_while_a_gpu_worker_listens(state_settings):
    trained = ("cold_fd", "cold_kernel", "odesteer", "lora")
    client = redis.Redis.from_url(state_settings.redis_url)
    try:
        assert [choose_queue(m, state_settings) for m in (*trained, "diffmean")] == ["cpu"] * 5  # no GPU worker
        client.set(QUEUE_ALIVE_KEY.format(queue="gpu"), "host", ex=5)
        assert [choose_queue(m, state_settings) for m in trained] == ["gpu"] * 4
        assert choose_queue("diffmean", state_settings) == "cpu"  # one forward pass per item: leaves the GPU
    finally:
        client.delete(QUEUE_ALIVE_KEY.format(queue="gpu"))
        client.close()


def test_sweeper_resends_a_lost_queued_message_within_a_minute_and_leaves_a_waiting_one(state_settings):
    from service.builds import sweep_interval

    lost = new_profile(state_settings)
    items = [make_item(f"Tea {i}?", ["Yes", "No"], target=[0.4, 0.6], id=f"t{i}") for i in range(6)]
    waiting, _ = requested_group_profile(state_settings, "tenant-w2", "g2", items, {"layer": 2, "strength": 1.0})
    builds.send(state_settings, waiting, "diffmean")
    assert sent_at(state_settings, waiting) is not None and sent_at(state_settings, lost) is None
    assert RESEND_QUEUED_AFTER_S + sweep_interval(replace(state_settings, build_stale_after=1800)) <= 60
    soon = db.utcnow() + timedelta(seconds=RESEND_QUEUED_AFTER_S + 1)
    report = sweep(state_settings, now=soon)
    assert report.resent == [lost]  # the waiting one keeps its single message
    assert queue_depths(state_settings)["cpu"] == 2 and sent_at(state_settings, lost) is not None
    assert sweep(state_settings, now=soon + timedelta(seconds=RESEND_QUEUED_AFTER_S + 1)).resent == []


def test_sweeper_resends_a_message_the_broker_lost_or_no_worker_took_for_too_long(state_settings):
    from service.queue import visibility_timeout

    pid = new_profile(state_settings)
    builds.send(state_settings, pid, "diffmean")
    soon = db.utcnow() + timedelta(seconds=RESEND_QUEUED_AFTER_S + 1)
    assert sweep(state_settings, now=soon).resent == []  # its message waits in the broker
    client = redis.Redis.from_url(state_settings.redis_url)
    client.flushdb()  # Redis restarted empty: the message was sent before the broker's data began
    client.close()
    assert sweep(state_settings, now=soon).resent == [pid] and queue_depths(state_settings)["cpu"] == 1
    # A message no worker took within the broker's visibility timeout counts as lost too (a duplicate is
    # harmless: the first one to be claimed builds, the other finds the row taken or ready).
    later = db.utcnow() + timedelta(seconds=visibility_timeout(state_settings) + 1)
    assert sweep(state_settings, now=later).resent == [pid] and queue_depths(state_settings)["cpu"] == 2


def test_asking_again_for_a_stuck_queued_profile_sends_it_again(state_settings):
    from api_helpers import make_group, request_profile

    from service import create_app
    from service.auth import create_key
    from service.redis import client_for

    client = create_app({"SETTINGS": state_settings, "TESTING": True}).test_client()
    with db.session_scope(state_settings) as session:
        auth = {"Authorization": f"Bearer {create_key(session, 'tenant-q')}"}
    make_group(client, auth, "g", 6)
    first = request_profile(client, auth, "g")
    assert first.status_code == 202 and queue_depths(state_settings)["cpu"] == 1
    assert request_profile(client, auth, "g").json["id"] == first.json["id"]
    assert queue_depths(state_settings)["cpu"] == 1  # its message is waiting: not sent twice
    client_for(state_settings.redis_url).flushdb()  # the message is lost; the row still says queued
    again = request_profile(client, auth, "g")
    assert again.json["id"] == first.json["id"] and again.json["status"] == "queued"
    assert queue_depths(state_settings)["cpu"] == 1  # sent again
