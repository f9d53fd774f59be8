"""A Redis that hangs (SIGSTOP) or dies (SIGKILL) costs a request about a second at most: readiness says
so, rate limits let requests through, and a build request is stored `queued` for the sweeper to send."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from api_helpers import make_group, request_profile

from service import create_app, queue
from service import redis as service_redis
from service.auth import create_key
from service.store import db

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

# The client's timeouts are 0.5 s (connect) and 0.75 s (read); the rest is headroom for a loaded machine.
BOUND_S = 1.5
# A publish: two tries (queue.PUBLISH_RETRY_POLICY) of a 1 s read (queue.BROKER_SOCKET_TIMEOUT_S) and the
# pause between them, about 3.2 s; the rest is headroom.
PUBLISH_BOUND_S = 5.0


@pytest.fixture
def private_redis(tmp_path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test alone (the session's shared one must not be paused)."""
    port = service_redis.free_port()
    config = tmp_path / "redis.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {tmp_path}\n")
    process = subprocess.Popen([service_redis.redis_executable(), str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            service_redis.client_for(url).ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("the private redis-server did not start")
            time.sleep(0.05)
    try:
        yield url, process
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)


def timed(call):  # noqa: ANN001, ANN201
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_hung_then_killed_redis_gives_bounded_answers(settings, private_redis):
    url, process = private_redis
    settings = dataclasses.replace(settings, redis_url=url)
    client = create_app({"SETTINGS": settings, "TESTING": True}).test_client()
    with db.session_scope(settings) as session:
        auth = {"Authorization": f"Bearer {create_key(session, 'tenant-r')}"}
    for gid in ("g0", "g1", "g2"):
        make_group(client, auth, gid, 4)
    assert request_profile(client, auth, "g0").status_code == 202
    assert client.get("/readyz").json["checks"]["redis"]["ok"]

    for fault, gid in ((signal.SIGSTOP, "g1"), (signal.SIGKILL, "g2")):
        process.send_signal(fault)
        service_redis._down_until.pop(url, None)  # each fault is met afresh, as its first request would be
        r, took = timed(lambda: client.get("/readyz"))
        assert took < BOUND_S, (fault, took)
        assert r.status_code == 503 and not r.json["checks"]["redis"]["ok"]
        assert r.json["checks"]["database"]["ok"]
        service_redis._down_until.pop(url, None)
        r, took = timed(lambda: client.put("/v1/users/someone", json={}, headers=auth))  # rate limit skipped
        assert took < BOUND_S and r.status_code in (200, 201), (fault, took, r.json)
        service_redis._down_until.pop(url, None)
        r, took = timed(lambda gid=gid: request_profile(client, auth, gid))
        assert took < BOUND_S, (fault, took)
        assert r.status_code == 202 and r.json["status"] == "queued"  # stored; the sweeper sends it later
        # Meanwhile other requests skip Redis without waiting on it at all.
        path = f"/v1/profiles/{r.json['id']}"
        r, took = timed(lambda path=path: client.get(path, headers=auth))
        assert r.status_code == 200 and took < 0.5, took


def test_a_publish_to_a_redis_that_hangs_gives_up(settings, private_redis):
    """Redis hangs after `check_broker` was answered: the publish itself (kombu's socket, Celery's retry)
    gives up within PUBLISH_BOUND_S instead of holding the request's thread."""
    url, process = private_redis
    settings = dataclasses.replace(settings, redis_url=url)
    queue.send(queue.BUILD_TASK, [str(uuid.uuid4())], "cpu", settings)  # a pooled connection, as in a live API
    process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(queue.BrokerUnavailable):
        queue.send(queue.BUILD_TASK, [str(uuid.uuid4())], "cpu", settings)
    assert time.monotonic() - started < PUBLISH_BOUND_S
