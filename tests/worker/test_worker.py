"""End to end through the HTTP app and a real Celery worker process (real model, Redis, SQLite)."""

from __future__ import annotations

import hashlib

import pytest
from worker_helpers import (
    FIXED,
    SMALL_ITEMS,
    attempts,
    get_profile,
    make_group,
    new_auth,
    request_build,
    stack_client,
    wait_profile,
)

from service.redis import client_for
from service.store.artifacts import ArtifactStore, ProfileCache
from steer_core.profile import Profile

pytestmark = [pytest.mark.service, pytest.mark.model]


def test_build_through_the_worker_and_read_it_back(worker_settings, running_worker):
    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "commuters", SMALL_ITEMS[:4])
    # Layer and strength fixed: no search, so the build is quick (the search itself is steer_core's,
    # tested there; the held-out path through a worker runs in `pluristeer demo`).
    created = request_build(client, auth, "commuters", FIXED)
    assert created["status"] in ("queued", "building", "ready")
    again = request_build(client, auth, "commuters", FIXED)
    assert again["id"] == created["id"]  # the same request is one profile, one build

    profile = wait_profile(client, auth, created["id"], worker=running_worker)
    assert profile["status"] == "ready", profile
    assert profile["error"] is None
    assert profile["progress"]["done"] == profile["progress"]["total"] > 0
    metrics, chosen = profile["metrics"], profile["chosen"]
    assert metrics["evaluation"] == "in-sample"
    for side in ("unsteered", "steered"):
        assert 0.0 <= metrics[side]["alignment"] <= 1.0
    assert metrics["steered"] != metrics["unsteered"]  # the vector moved the answers
    assert chosen == {"layer": FIXED["layer"], "strength": FIXED["strength"], "positions": "prompt", "params": {}}
    assert attempts(worker_settings, created["id"]) == [(1, "succeeded")]

    # The artifact: downloadable, content-addressed, and a profile of the model the worker serves.
    r = client.get(f"/v1/profiles/{created['id']}/artifact", headers=auth)
    assert r.status_code == 200
    sha = profile["artifact"]["sha256"]
    assert hashlib.sha256(r.data).hexdigest() == sha and len(r.data) == profile["artifact"]["size"]
    stored = Profile.from_bytes(r.data)
    assert (stored.method, stored.layer, stored.strength) == ("diffmean", FIXED["layer"], FIXED["strength"])
    assert stored.tensors["vector"].shape == (576,)
    # The worker warmed Redis: a fresh cache is served without touching the store.
    store = ArtifactStore(worker_settings.artifact_dir)
    cache = ProfileCache(store, client_for(worker_settings.redis_url))
    assert cache.load(sha).tensors["vector"].equal(stored.tensors["vector"])
    assert cache.stats()["redis_hits"] == 1 and cache.stats()["misses"] == 0


def test_a_build_the_method_rejects_fails_with_its_reason(worker_settings, running_worker):
    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "g-bad-layer", SMALL_ITEMS[:3])
    created = request_build(client, auth, "g-bad-layer", {"layer": 99, "strength": 1.0})
    profile = wait_profile(client, auth, created["id"], worker=running_worker)
    assert profile["status"] == "failed"
    assert "params.layer" in profile["error"] and "99" in profile["error"]
    assert profile["artifact"] is None
    assert attempts(worker_settings, created["id"]) == [(1, "failed")]
    # Asking again retries a failed profile (same row, a new attempt), and fails the same way.
    retried = request_build(client, auth, "g-bad-layer", {"layer": 99, "strength": 1.0})
    assert retried["id"] == created["id"]
    profile = wait_profile(client, auth, created["id"], worker=running_worker)
    assert profile["status"] == "failed"
    assert attempts(worker_settings, created["id"]) == [(1, "failed"), (2, "failed")]


def test_opinions_changed_after_the_request_fail_the_build_instead_of_mislabelling_it(
        worker_settings, running_worker):
    # The profile row records the sample it was asked for; the worker refuses to build from another one.
    from service import builds
    from service.store import db

    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "g-moving", SMALL_ITEMS[:3])
    with db.session_scope(worker_settings) as session:
        tenant = db.tenant_for_key(session, auth["Authorization"].split()[1])
        group = db.get_group(session, tenant.id, "g-moving")
        row, _ = builds.request(session, tenant.id, "group", group.id, "diffmean", worker_settings.model,
                                {"layer": 15, "strength": 1.0}, "0" * 64)
        pid = row.id
    builds.send(worker_settings, pid, "diffmean")
    profile = wait_profile(client, auth, pid, worker=running_worker)
    assert profile["status"] == "failed" and "changed" in profile["error"]
    assert get_profile(client, auth, pid)["artifact"] is None
