"""Faults, end to end through the HTTP app and a real worker: a worker SIGKILLed mid-build, a pool process
SIGKILLed mid-build, Redis flushed or down, an artifact file corrupted on disk."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from hashlib import sha256

import pytest
from runtime import wait_for
from worker_helpers import SMALL_ITEMS, attempts, get_profile, make_group, new_auth, request_build, stack_client

from service import context
from service.api.chat import stop_engine
from service.redis import client_for, free_port
from service.store.artifacts import REDIS_PREFIX, ArtifactCorrupted

pytestmark = [pytest.mark.service, pytest.mark.model]


def building(client, auth, profile_id):  # noqa: ANN001, ANN201
    profile = get_profile(client, auth, profile_id)
    assert profile["status"] != "failed", profile
    return profile["status"] == "building" and profile


def ready(client, auth, profile_id, worker):  # noqa: ANN001, ANN201
    def check():
        profile = get_profile(client, auth, profile_id)
        assert profile["status"] != "failed", profile
        if not worker.alive():
            raise AssertionError(f"the worker died:\n{worker.log_text()[-3000:]}")
        return profile["status"] == "ready" and profile

    return check


def test_worker_killed_mid_build_finishes_after_restart(worker_settings, running_worker):
    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "g-kill", SMALL_ITEMS[:4])
    pid = request_build(client, auth, "g-kill")["id"]
    wait_for(lambda: building(client, auth, pid), 300, 0.05, "the build to start")
    running_worker.kill()  # the worker and its pool, as when the machine dies
    assert get_profile(client, auth, pid)["status"] == "building"
    assert attempts(worker_settings, pid) == [(1, "running")]

    running_worker.start()  # its sweeper finds the build's heartbeat stale and sends it again
    profile = wait_for(ready(client, auth, pid, running_worker), 300, 0.25, "the rebuilt profile")
    assert profile["artifact"]["size"] > 0
    assert attempts(worker_settings, pid) == [(1, "lost"), (2, "succeeded")]
    assert "re-queued" in running_worker.log_text() or "sweeper" in running_worker.log_text()


def test_pool_process_killed_mid_build_is_redelivered(worker_settings, running_worker):
    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "g-child", SMALL_ITEMS[:4])
    pid = request_build(client, auth, "g-child")["id"]
    wait_for(lambda: building(client, auth, pid), 300, 0.05, "the build to start")
    main_pid = running_worker.pid
    pool = running_worker.pool_pids()
    assert pool, "no pool process found"
    for child in pool:
        os.kill(child, signal.SIGKILL)
    # Acks late + reject on worker lost: the same message comes back, and a new pool process takes over.
    wait_for(ready(client, auth, pid, running_worker), 300, 0.25, "the redelivered build")
    assert running_worker.pid == main_pid and running_worker.alive()
    assert attempts(worker_settings, pid) == [(1, "lost"), (2, "succeeded")]


@pytest.fixture(scope="module")
def ready_profile(worker_settings, celery_worker):
    """One profile built by the worker, shared by the tests below (they break its copies, not its row)."""
    celery_worker.ensure_running()
    _, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    make_group(client, auth, "g-ready", SMALL_ITEMS[:3])
    pid = request_build(client, auth, "g-ready", contrast=[])["id"]  # the same request whatever groups follow
    profile = wait_for(ready(client, auth, pid, celery_worker), 300, 0.25, "the profile")
    return auth, profile


def test_redis_flushed_or_down_still_serves_profiles(worker_settings, running_worker, ready_profile):
    auth, profile = ready_profile
    sha = profile["artifact"]["sha256"]
    client_for(worker_settings.redis_url).flushdb()  # cache, broker queues and rate limits: all gone
    app, client = stack_client(worker_settings)
    r = client.get(f"/v1/profiles/{profile['id']}/artifact", headers=auth)
    assert r.status_code == 200 and r.headers["X-Artifact-SHA256"] == sha
    with app.app_context():
        cache = context.profile_cache()
        assert cache.load(sha).method == "diffmean"
        assert cache.stats()["misses"] == 1  # from the store, which put it back in Redis
    assert client_for(worker_settings.redis_url).exists(REDIS_PREFIX + sha)
    # Builds still flow after the flush: this one fails fast in the worker (no such layer).
    make_group(client, auth, "g-after-flush", SMALL_ITEMS[:2])
    pid = request_build(client, auth, "g-after-flush", {"layer": 99, "strength": 1.0})["id"]
    failed = wait_for(lambda: get_profile(client, auth, pid)["status"] == "failed", 120, 0.25,
                      "the build sent after the flush")
    assert failed

    # Redis down (nothing listens on its port): profiles still resolve from the store.
    down = replace(worker_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = stack_client(down)[0]
    with app.app_context():
        cache = context.profile_cache()
        assert cache.load(sha).layer == profile["chosen"]["layer"]
        assert cache.stats()["redis_errors"] >= 1
    r = app.test_client().get(f"/v1/profiles/{profile['id']}/artifact", headers=auth)
    assert r.status_code == 200 and r.headers["X-Artifact-SHA256"] == sha  # the rate limit lets it through


def test_a_corrupted_artifact_fails_its_profile_and_a_rebuild_in_place_repairs_it(worker_settings, running_worker,
                                                                                   ready_profile):
    auth, profile = ready_profile
    sha = profile["artifact"]["sha256"]
    app, client = stack_client(worker_settings)
    score_body = {"questions": [{"question": SMALL_ITEMS[0]["question"], "options": ["Yes", "No"]}],
                  "steering": {"profiles": [{"id": profile["id"], "weight": 1.0}]}}
    path = context.state(app).artifact_store().path(sha)
    original = path.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[-2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        client_for(worker_settings.redis_url).delete(REDIS_PREFIX + sha)  # no good copy anywhere but memory
        # Generation refuses to apply it: the request fails naming the profile, it is not run unsteered.
        r = client.post("/v1/score", json=score_body, headers=auth)
        assert r.status_code == 409, r.json
        assert r.json["error"]["type"] == "profile_unavailable" and profile["id"] in r.json["error"]["message"]
        with app.app_context(), pytest.raises(ArtifactCorrupted):
            context.profile_cache().load(sha)
        # The profile is failed with the reason, and readiness reports it.
        failed = get_profile(client, auth, profile["id"])
        assert failed["status"] == "failed" and "corrupted" in failed["error"], failed
        assert not client.get("/readyz").json["checks"]["artifacts"]["ok"]
        assert client.get(f"/v1/profiles/{profile['id']}/artifact", headers=auth).status_code == 409

        # Asking for the same profile again rebuilds it in place: same id, next version, a good file.
        again = request_build(client, auth, "g-ready", contrast=[])
        assert again["id"] == profile["id"] and again["version"] == profile["version"] + 1
        rebuilt = wait_for(ready(client, auth, profile["id"], running_worker), 300, 0.25, "the rebuilt profile")
        r = client.get(f"/v1/profiles/{profile['id']}/artifact", headers=auth)
        assert r.status_code == 200 and r.headers["X-Artifact-SHA256"] == rebuilt["artifact"]["sha256"]
        r = client.post("/v1/score", json=score_body, headers=auth)  # repaired: applied again
        assert r.status_code == 200, r.json
        assert [p["id"] for p in r.json["steering"]["profiles"]] == [profile["id"]]
        assert client.get("/readyz").json["checks"]["artifacts"]["ok"]
    finally:
        if sha256(path.read_bytes()).hexdigest() != sha:
            path.write_bytes(original)
        stop_engine(app)
