"""A real API process (`pluristeer serve`: gunicorn, the default model) whose engine-bound request slots are
all taken: chats past MAX_BATCH_SIZE get 503 with Retry-After at once instead of taking a request thread to
wait in, so the threads left over (FREE_REQUEST_THREADS) answer /healthz and /readyz within a second."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from runtime import stop_server

from service.auth import create_key
from service.redis import free_port
from service.settings import FREE_REQUEST_THREADS, Settings
from service.store import db

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.service, pytest.mark.model]
BATCH = 2  # MAX_BATCH_SIZE: the engine-bound request slots of the process
EXTRA = 3 * (BATCH + FREE_REQUEST_THREADS)  # more chats at once than the process has request threads
# Long enough that the holders are still generating when the extra chats and the health checks are answered.
LONG = {"messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        "max_tokens": 512, "temperature": 0}


@pytest.fixture
def api_server(tmp_path, default_model_path, sqlite_template, redis_url) -> Iterator[tuple[str, str]]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_model_path.parent, target_is_directory=True)
    shutil.copy(sqlite_template, home / "pluristeer.db")
    database_url = f"sqlite:///{home / 'pluristeer.db'}"
    with db.session_scope(Settings.from_env(home=home, database_url=database_url)) as session:
        key = create_key(session, "load")
    env = {k: v for k, v in os.environ.items() if k != "ARTIFACT_DIR"}
    env.update(PLURISTEER_HOME=str(home), DATABASE_URL=database_url, REDIS_URL=redis_url,
               MAX_BATCH_SIZE=str(BATCH), RATE_LIMIT_PER_MINUTE="0", TOKENS_PER_MINUTE="0")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while request(url, "GET", "/healthz")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        # The process loads the model at start-up (test_cold_start.py); /readyz says when it can serve.
        while request(url, "GET", "/readyz")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline + 120, "the model did not load"
            time.sleep(0.2)
        assert request(url, "POST", "/v1/chat/completions", key, {**LONG, "max_tokens": 1}, timeout=120)[0] == 200
        yield url, key
    finally:
        stop_server(proc)


def request(url: str, method: str, path: str, key: str | None = None, body: dict | None = None,
            timeout: float = 30.0) -> tuple[int, dict[str, str], float]:
    """(status, headers, seconds taken)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps({"model": "smollm2-135m-instruct", **body}).encode()
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers, method=method),
                                    timeout=timeout) as response:
            response.read()
            return response.status, dict(response.headers), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, dict(exc.headers), time.monotonic() - started
    except OSError:  # refused while starting, or timed out
        return 0, {}, time.monotonic() - started


def open_stream(url: str, key: str) -> socket.socket:
    """A streamed chat whose first event has arrived (its row is generating); the rest is left unread."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "smollm2-135m-instruct", **LONG, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def unread(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return data


def test_health_answers_while_every_generation_slot_is_taken(api_server):
    url, key = api_server
    holders = [open_stream(url, key) for _ in range(BATCH)]
    try:
        with ThreadPoolExecutor(EXTRA) as pool:
            chats = [pool.submit(request, url, "POST", "/v1/chat/completions", key, LONG) for _ in range(EXTRA)]
            time.sleep(0.2)  # the chats are in: without the admission limit they hold every request thread
            health = [request(url, "GET", "/healthz", timeout=10) for _ in range(5)]
            ready = request(url, "GET", "/readyz", timeout=10)
            refused = [chat.result(timeout=60) for chat in chats]
        assert all(status == 200 and took < 1.0 for status, _, took in health), health
        assert ready[0] == 200 and ready[2] < 1.0, ready
        assert all(status == 503 and int(headers["Retry-After"]) >= 1 for status, headers, _ in refused), refused
        # The holders were generating all along: none has finished yet.
        assert not any(b"[DONE]" in unread(sock) for sock in holders), "the engine was not held busy throughout"
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert f"pluristeer_generation_refused_total {float(EXTRA)}" in metrics
    finally:
        for sock in holders:
            sock.close()  # the clients go away: their rows are cancelled and their slots freed
    deadline = time.monotonic() + 60
    while (status := request(url, "POST", "/v1/chat/completions", key, {**LONG, "max_tokens": 1})[0]) == 503:
        assert time.monotonic() < deadline, "the slots were not freed"
        time.sleep(0.5)
    assert status == 200
