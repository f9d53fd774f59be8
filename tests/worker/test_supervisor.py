"""`pluristeer up`'s supervisor: a dead child is restarted after a backoff that grows while it keeps dying,
and /readyz reports where each child stands. The run under a real `up` is in test_stack.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

import pytest

from service import create_app
from service.cli.stack import RESTART_BACKOFF_S, STABLE_AFTER_S, Supervisor, start_child, stop_child

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_a_dead_child_is_restarted_with_backoff_and_reported(tmp_path, settings):
    status = tmp_path / "up-status.json"
    child = start_child("build worker", [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ))
    client = create_app({"SETTINGS": dataclasses.replace(settings, stack_status_file=str(status)),
                         "TESTING": True}).test_client()
    try:
        supervisor = Supervisor([child], status)
        assert client.get("/readyz").json["checks"]["stack"] == {"ok": True, "detail": "build worker running"}
        first_pid = child.process.pid
        now = 1000.0
        for attempt, delay in enumerate(RESTART_BACKOFF_S[:3]):
            pid = child.process.pid
            os.kill(pid, signal.SIGKILL)
            child.process.wait(timeout=10)
            supervisor.check(now)  # noticed: waits `delay` before restarting
            check = client.get("/readyz").json["checks"]["stack"]
            assert not check["ok"] and "build worker restarting" in check["detail"]
            supervisor.check(now + delay - 0.1)
            assert not child.alive()
            supervisor.check(now + delay)
            assert child.alive() and child.process.pid != pid
            now += delay + 1
            saved = json.loads(status.read_text())["children"]["build worker"]
            assert saved["state"] == "running" and saved["restarts"] == attempt + 1 and saved["last_exit"] == -9
        check = client.get("/readyz").json["checks"]["stack"]
        assert check["ok"] and "restarted 3x, last exit -9" in check["detail"]
        assert child.process.pid != first_pid
        # Once it has run a minute, the next death waits the first backoff again.
        supervisor.check(now + STABLE_AFTER_S)
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.wait(timeout=10)
        later = now + STABLE_AFTER_S + 1
        supervisor.check(later)
        supervisor.check(later + RESTART_BACKOFF_S[0])
        assert child.alive()
    finally:
        stop_child(child)
