"""Loading the model at start-up (`EngineClient.start_loading`, what `service.wsgi` calls) in one process:
while the load runs, chat requests are refused at once with Retry-After, `/readyz` says "loading" and
`/healthz` answers; a failed load is reported and tried again, not on a request's thread. The real server
started cold is in test_cold_start.py."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine import client as engine_client_module
from service.engine.client import LOADING_RETRY_AFTER_S, EngineUnavailable, engine_client
from steer_core.errors import ModelLoadError

pytestmark = [pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]
CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


class FakeEngine:
    running = True

    def stop(self, timeout: float = 30.0) -> bool:
        self.running = False
        return True


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_while_the_model_loads_chats_get_503_at_once_and_readyz_says_loading(app, client, auth, monkeypatch):
    release = threading.Event()
    loads = []

    def slow_engine():
        loads.append(threading.current_thread().name)
        release.wait(30)
        return FakeEngine()

    engines = engine_client(app)
    monkeypatch.setattr(engines, "_new_engine", slow_engine)
    assert engines.start_loading() and not engines.start_loading()  # one load at a time
    wait_for(lambda: loads)
    try:
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 503 and r.headers["Retry-After"] == str(LOADING_RETRY_AFTER_S), r.json
        assert "still loading" in r.json["error"]["message"]
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json["status"] == "loading", ready.json
        assert ready.json["checks"]["model"]["detail"].startswith("loading: ")
    finally:
        release.set()
    wait_for(lambda: engines.engine is not None)
    assert loads == ["engine-loader"]  # on its own thread, never a request's
    assert engines.probe() == {"loaded": True, "loading": None, "error": None}
    assert client.get("/readyz").json["checks"]["model"] == {"ok": True, "detail": "loaded in this process"}


def test_a_failed_load_is_reported_and_tried_again_in_the_background(app, client, auth, monkeypatch):
    attempts = []

    def failing_engine():
        attempts.append(time.monotonic())
        raise ModelLoadError("no such model", "model")

    engines = engine_client(app)
    monkeypatch.setattr(engines, "_new_engine", failing_engine)
    engines.start_loading()
    wait_for(lambda: engines.error is not None and engines.loading_for() is None)
    r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert r.status_code == 503 and "no such model" in r.json["error"]["message"]
    ready = client.get("/readyz")
    assert ready.json["status"] == "not_ready" and "no such model" in ready.json["checks"]["model"]["detail"]
    assert len(attempts) == 1  # not again at once: at most every LOAD_RETRY_S
    monkeypatch.setattr(engine_client_module, "LOAD_RETRY_S", 0.0)
    with pytest.raises(EngineUnavailable):
        engines.get()  # starts another attempt in the background and refuses meanwhile
    wait_for(lambda: len(attempts) == 2)


def test_a_stop_during_the_load_drops_what_it_loads(app, monkeypatch):
    release = threading.Event()
    made: list[FakeEngine] = []

    def slow_engine():
        release.wait(30)
        made.append(FakeEngine())
        return made[-1]

    engines = engine_client(app)
    monkeypatch.setattr(engines, "_new_engine", slow_engine)
    engines.start_loading()
    assert engines.stop()
    release.set()
    wait_for(lambda: made and engines.loading_for() is None)
    assert engines.engine is None and not made[0].running
