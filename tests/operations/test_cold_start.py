"""A real API process (`pluristeer serve`: gunicorn, two worker processes) started cold, on a fresh
PLURISTEER_HOME whose default model must be fetched and converted before it loads.

Each process starts loading at once, in the background: `/healthz` answers within a second throughout,
`/readyz` answers 503 "loading" (saying what the load does) until the engine can serve, chat requests
meanwhile get 503 with Retry-After at once (a burst of them holds no thread), and the model is converted
once for the home, not once per process."""

from __future__ import annotations

import json
import os
import shutil
import statistics
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
from service.settings import Settings
from service.store import db

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.service, pytest.mark.model]
CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
        "temperature": 0}
LIVENESS_S = 1.0  # what an orchestrator's liveness probe allows
READY_WITHIN_S = 600.0  # a fetch, a conversion and two loads on a busy two-core machine
BURST = 24


def request(url: str, method: str, path: str, key: str | None = None, body: dict | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], dict, float]:
    """(status, headers, JSON body, seconds taken); status 0 when nothing answered within `timeout`."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers, method=method),
                                    timeout=timeout) as response:
            raw, status, got = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw, status, got = exc.read(), exc.code, dict(exc.headers)
    except OSError:  # refused while starting, or timed out
        return 0, {}, {}, time.monotonic() - started
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {}
    return status, got, payload, time.monotonic() - started


@pytest.fixture
def cold_server(tmp_path, default_model_path, sqlite_template, redis_url) -> Iterator[tuple[str, str, Path, Path]]:
    """(url, key, home, the server's output) of `pluristeer serve --workers 2` on a home with no model."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(sqlite_template, home / "pluristeer.db")
    database_url = f"sqlite:///{home / 'pluristeer.db'}"
    with db.session_scope(Settings.from_env(home=home, database_url=database_url)) as session:
        key = create_key(session, "cold")
    env = {k: v for k, v in os.environ.items() if k != "ARTIFACT_DIR"}
    env.update(PLURISTEER_HOME=str(home), DATABASE_URL=database_url, REDIS_URL=redis_url,
               RATE_LIMIT_PER_MINUTE="0", TOKENS_PER_MINUTE="0")
    port = free_port()
    output = tmp_path / "serve.log"
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", key, home, output
    finally:
        stop_server(proc)


def test_a_cold_start_answers_health_checks_and_refuses_chats_until_the_model_is_loaded(cold_server):
    url, key, home, output = cold_server
    assert not (home / "models").exists()  # nothing to load yet: the model is fetched and converted first
    started = time.monotonic()
    while request(url, "GET", "/healthz", timeout=2)[0] != 200:
        assert time.monotonic() - started < 120, output.read_text()[-3000:]
        time.sleep(0.1)
    answering = time.monotonic() - started

    health: list[tuple[int, float]] = []
    loading: list[dict] = []  # /readyz bodies while loading
    refused: list[tuple[int, dict[str, str], dict, float]] = []
    burst: list[tuple[int, dict[str, str], dict, float]] = []
    next_chat = 0.0
    while True:
        assert time.monotonic() - started < READY_WITHIN_S, output.read_text()[-3000:]
        status, _, _, took = request(url, "GET", "/healthz", timeout=5)
        health.append((status, took))
        status, _, ready, _ = request(url, "GET", "/readyz", timeout=5)
        if status == 200:
            break
        assert status == 503 and ready.get("status") == "loading", ready
        loading.append(ready)
        if not burst:  # the burst: many clients at once, gone after 2 s
            with ThreadPoolExecutor(BURST) as pool:
                burst = list(pool.map(lambda _: request(url, "POST", "/v1/chat/completions", key, CHAT, timeout=2),
                                      range(BURST)))
        elif time.monotonic() >= next_chat:
            refused.append(request(url, "POST", "/v1/chat/completions", key, CHAT, timeout=5))
            next_chat = time.monotonic() + 2.0
        time.sleep(0.2)
    ready_after = time.monotonic() - started

    latencies = [took for _, took in health]
    print(f"\ncold start: /healthz answered {answering:.1f} s after the start; ready after {ready_after:.1f} s; "
          f"/healthz during the load: {len(health)} probes, median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms; {len(loading)} /readyz 'loading'; burst of {BURST} chats: "
          f"max {max(t for *_, t in burst) * 1000:.0f} ms")
    assert all(status == 200 for status, _ in health), health
    assert max(latencies) < LIVENESS_S, latencies
    assert loading, "the model was ready before any probe saw it loading"
    details = [r["checks"]["model"]["detail"] for r in loading]
    assert any("fetching and converting" in d for d in details), details
    assert all(r["checks"]["database"]["ok"] and r["checks"]["redis"]["ok"] for r in loading), loading
    for status, headers, body, took in burst + refused:
        assert status == 503 and int(headers["Retry-After"]) >= 1 and took < LIVENESS_S, (status, headers, body, took)
        assert "loading" in body["error"]["message"], body

    assert (home / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    log = output.read_text()
    assert log.count("converting the GGUF file") == 1, log[-3000:]  # once for the home, not once per process
    # Both processes serve once ready (each loads its own copy; /readyz answers from either).
    deadline = time.monotonic() + 120
    served = 0
    while served < 4:
        status, _, body, _ = request(url, "POST", "/v1/chat/completions", key, CHAT, timeout=60)
        if status == 503:  # the other process is still loading its copy
            assert time.monotonic() < deadline, body
            time.sleep(0.5)
            continue
        assert status == 200, body
        served += 1
