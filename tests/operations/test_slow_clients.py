"""Slow and stalled clients against a real `pluristeer serve` (the front, gunicorn behind it): with more clients
trickling bodies and headers than the API process has request threads, /healthz keeps answering within a second,
and every such client is cut off (408) at the documented deadline: REQUEST_BODY_TIMEOUT plus one second per
REQUEST_BODY_MIN_RATE bytes received; REQUEST_HEADER_TIMEOUT for headers.

Without the front (gunicorn's threads reading bodies themselves), 20 such clients made every /healthz poll time
out for as long as they kept trickling (issue 31)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from runtime import stop_server
from slow_clients import SlowClient, poll_health

from service.auth import create_key
from service.redis import free_port
from service.settings import FREE_REQUEST_THREADS, Settings
from service.store import db

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.service]
BATCH = 2  # MAX_BATCH_SIZE: the API process has BATCH + FREE_REQUEST_THREADS request threads
BODY_TIMEOUT, MIN_RATE, HEADER_TIMEOUT = 4.0, 1000, 4.0
SLOW_BODIES = 20
SLOW_HEADERS = 5


@pytest.fixture
def served(tmp_path, default_model_path, sqlite_template, redis_url) -> Iterator[tuple[str, int, str]]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_model_path.parent, target_is_directory=True)
    shutil.copy(sqlite_template, home / "pluristeer.db")
    database_url = f"sqlite:///{home / 'pluristeer.db'}"
    with db.session_scope(Settings.from_env(home=home, database_url=database_url)) as session:
        key = create_key(session, "slow")
    env = {k: v for k, v in os.environ.items() if k != "ARTIFACT_DIR"}
    env.update(PLURISTEER_HOME=str(home), DATABASE_URL=database_url, REDIS_URL=redis_url, MAX_BATCH_SIZE=str(BATCH),
               REQUEST_BODY_TIMEOUT=str(BODY_TIMEOUT), REQUEST_BODY_MIN_RATE=str(MIN_RATE),
               REQUEST_HEADER_TIMEOUT=str(HEADER_TIMEOUT), RATE_LIMIT_PER_MINUTE="0")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _ready(url):  # the model loaded too: nothing else busies the process during the test
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.3)
        yield url, port, key
    finally:
        stop_server(proc)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_health_answers_while_slow_clients_trickle_and_they_are_cut_off_at_the_deadline(served):
    url, port, key = served
    assert SLOW_BODIES + SLOW_HEADERS > 3 * (BATCH + FREE_REQUEST_THREADS)  # far more than the request threads
    started = time.monotonic()
    bodies = [SlowClient(port).start() for _ in range(SLOW_BODIES)]
    headers = [SlowClient(port, head=b"GET /healthz HTTP/1.1\r\n", trickle=b"X-Slow: " + b"a" * 1000).start()
               for _ in range(SLOW_HEADERS)]
    stalled = SlowClient(port, trickle=b"a" * 10, interval=0.01).start()  # 10 bytes, then nothing
    time.sleep(0.5)
    health = poll_health(url, times=8)  # all within the slow clients' deadline: they are all connected
    request = urllib.request.Request(f"{url}/v1/profiles", headers={"Authorization": f"Bearer {key}"})
    api_started = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as response:
        api = (response.status, time.monotonic() - api_started)
    assert time.monotonic() - started < BODY_TIMEOUT, "the polls ran past the slow clients' deadline"
    assert all(status == 200 and took < 1.0 for status, took in health), health
    assert api[0] == 200 and api[1] < 1.0, api

    for client in bodies + headers + [stalled]:
        client.join(timeout=30)
    # The stalled body: 408 naming what arrived, at BODY_TIMEOUT plus 10 bytes' worth (0.01 s).
    assert stalled.answer is not None and stalled.answer.startswith(b"HTTP/1.1 408 "), stalled.answer
    error = json.loads(stalled.answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "request_timeout" and "10 of 100000 bytes" in error["message"], error
    assert BODY_TIMEOUT <= stalled.cut_after < BODY_TIMEOUT + 3, stalled.cut_after
    # The trickling bodies (2 bytes a second against 1000): cut off once past BODY_TIMEOUT plus their bytes'
    # worth; the trickling headers at HEADER_TIMEOUT.
    for client in bodies + headers:
        assert client.answer is not None and client.answer.startswith(b"HTTP/1.1 408 "), client.answer
        assert client.cut_after is not None and 3.9 <= client.cut_after < BODY_TIMEOUT + 4, client.cut_after
    # None of them reached the API: nothing was logged in under /console/login.
    assert all(b"Set-Cookie" not in client.answer for client in bodies if client.answer)
    assert poll_health(url, times=1)[0][0] == 200
