"""`pluristeer up`: one command starts Redis, the database, a worker and the API behind the front; Ctrl-C stops
them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from slow_clients import SlowClient, poll_health

from service.redis import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.service]


def http_get(url: str, key: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_up_runs_the_stack_and_sigint_stops_everything(tmp_path, default_model_path):
    home = tmp_path / "home"
    home.mkdir()
    # The stack's files go under this home; the model comes from the existing cache, not a download.
    (home / "models").symlink_to(default_model_path.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "ARTIFACT_DIR")}
    env["PLURISTEER_HOME"] = str(home)
    env["REQUEST_BODY_TIMEOUT"] = "2"  # the front's deadline for a body, checked below
    port = free_port()
    # Started with SIGINT ignored, as a non-interactive shell starts `up &`: `up` still honours it.
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not any("pluristeer is up" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        saved = json.loads((home / "up.json").read_text())
        assert saved["url"] == url and any(saved["key"] in line for line in lines)  # printed once, kept
        assert (home / "pluristeer.db").exists()  # embedded default: SQLite under the home

        assert http_get(f"{url}/healthz")[0] == 200
        # The API loads the model in the background from its start: /readyz says "loading" until it serves.
        deadline = time.monotonic() + 120
        while (got := http_get(f"{url}/readyz"))[1].get("status") == "loading" and time.monotonic() < deadline:
            time.sleep(0.3)
        status, ready = got
        assert status == 200, ready
        assert http_get(f"{url}/v1/profiles", saved["key"]) == (200, {"profiles": [], "next_after": None})
        assert http_get(f"{url}/v1/profiles", "psk_wrong")[0] == 401

        # Slow clients, more than the API's request threads (MAX_BATCH_SIZE + FREE_REQUEST_THREADS = 20), trickle
        # bodies: /healthz answers meanwhile, and each is cut off (408) at its deadline, about 2 s.
        slow = [SlowClient(port).start() for _ in range(25)]
        time.sleep(0.3)
        health = poll_health(url, times=4)
        assert all(status == 200 and took < 1.0 for status, took in health), health
        for client in slow:
            client.join(timeout=30)
            assert client.answer is not None and client.answer.startswith(b"HTTP/1.1 408 "), client.answer
            assert client.cut_after is not None and 1.9 <= client.cut_after < 6, client.cut_after

        # A second `up` on the same port refuses at once instead of reporting someone else's server.
        second = subprocess.run([sys.executable, "-m", "service.cli", "up", "--port", str(port)], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "--port" in second.stderr, second.stderr

        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "redis-server" in names and "gunicorn" in names and "worker" in names, names

        # Supervision: a worker or Redis killed with SIGKILL is started again, /readyz says so, and the API
        # keeps answering meanwhile.
        direct = psutil.Process(proc.pid).children()
        for name, match in (("build worker", "service.cli worker"), ("redis", "redis-server")):
            victim = next(p for p in direct if match in " ".join(p.cmdline()))
            victim.kill()
            victim.wait(timeout=30)
            assert http_get(f"{url}/v1/profiles", saved["key"])[0] == 200

            def restarted(name=name):
                check = http_get(f"{url}/readyz")[1]["checks"]
                return check["stack"]["ok"] and check["redis"]["ok"] and f"{name} running (restarted 1x" in \
                    check["stack"]["detail"]

            deadline = time.monotonic() + 60
            while not restarted():
                assert time.monotonic() < deadline, http_get(f"{url}/readyz")
                time.sleep(0.5)
            direct = psutil.Process(proc.pid).children()
            assert any(match in " ".join(p.cmdline()) for p in direct) and proc.poll() is None
        assert any("restarting it in" in line for line in lines)
        started = psutil.Process(proc.pid).children(recursive=True)

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=90) == 0, "".join(lines)[-3000:]
        reader.join(timeout=10)
        # No access log unless asked (`up --access-log`): the requests above left no line each.
        assert not any("HTTP/1.1" in line for line in lines), "".join(lines)[-3000:]
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        reader.join(timeout=10)
        proc.stdout.close()
        for p in started:
            if p.is_running():
                p.kill()


def test_the_access_log_is_off_in_up_unless_asked_and_on_in_serve(tmp_path, monkeypatch):
    """What `up` and `serve` start gunicorn with, from their own command lines (nothing is started)."""
    import service.cli.redis_server as redis_server
    import service.store.db as db
    from service.cli import stack
    from service.cli.main import build_parser

    monkeypatch.setenv("PLURISTEER_HOME", str(tmp_path))
    started: dict[str, list[str]] = {}

    class Exited:
        class process:
            @staticmethod
            def wait() -> int:
                return 0

    def start_child(name, command, env):
        started[name] = command
        return Exited()

    def stop_once_started(url, children):
        raise stack._Stop("SIGINT")  # as Ctrl-C would: `up` stops before it serves

    monkeypatch.setattr(stack, "start_child", start_child)
    monkeypatch.setattr(stack, "stop_child", lambda child: None)
    monkeypatch.setattr(stack, "start_front", lambda settings, host, port: (None, "/tmp/pluristeer-x/api.sock"))
    monkeypatch.setattr(stack, "stop_front", lambda front, upstream: None)
    monkeypatch.setattr(stack, "port_free", lambda host, port: True)
    monkeypatch.setattr(stack, "first_key", lambda settings: ("psk_test", False))
    monkeypatch.setattr(stack, "wait_healthy", stop_once_started)
    monkeypatch.setattr(redis_server, "ensure_redis", lambda url: "redis://127.0.0.1:1/0")
    monkeypatch.setattr(redis_server, "stop_embedded_redis", lambda: None)
    monkeypatch.setattr(db, "upgrade", lambda url: None)

    def api_command(argv: list[str]) -> list[str]:
        started.clear()
        args = build_parser().parse_args(argv)
        assert args.func(args) == 0
        return started["API"]

    assert "--access-logfile" not in api_command(["up"])
    assert "--access-logfile" in api_command(["up", "--access-log"])
    assert "--access-logfile" in api_command(["serve"])  # production serving (and the compose file's API) keeps it
    # Both hand gunicorn only what the front read whole, on a Unix socket of the front's.
    for argv in (["up"], ["serve"]):
        command = api_command(argv)
        assert command[command.index("--bind") + 1] == "unix:/tmp/pluristeer-x/api.sock"
