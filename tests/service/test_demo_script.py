"""`make demo`'s script run as a script runs it (non-interactive bash, no terminal): it tells a short
story, keeps the stack's log in a file, and ends by itself with everything it started stopped.

A non-interactive bash starts `pluristeer up &` with SIGINT ignored, so a stop that only SIGINT carries
never arrives; this test runs that real path (`--no-builds` only skips the minutes-long profile builds
between start and stop)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from service.redis import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.service]


def processes_of(home: Path) -> list[psutil.Process]:
    """Live processes whose environment points at this test's PLURISTEER_HOME."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PLURISTEER_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_demo_script_tells_its_story_and_exits_by_itself(tmp_path, default_model_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_model_path.parent, target_is_directory=True)
    log = tmp_path / "stack.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "ARTIFACT_DIR")}
    env.update({"PLURISTEER_HOME": str(home), "PORT": str(port), "DEMO_LOG": str(log),
                "BIN": str(Path(sys.executable).parent)})
    proc = subprocess.Popen(["bash", "scripts/demo.sh", "--no-builds"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo script did not end by itself:\n{out[-3000:]}")
    finally:
        left = processes_of(home)
        for p in left:
            p.kill()
    assert proc.returncode == 0, out[-3000:]
    assert left == [], [p.cmdline() for p in left]  # `up` stopped the API, the worker and Redis

    lines = out.splitlines()
    assert lines[0].startswith("stack: starting") and str(log) in out, out
    assert "[1/2] a group and its opinions" in out and "[2/2] one question" in out, out
    assert "unsteered:" in out and "demo finished in" in lines[-1] and "stopping the stack" in out, out
    assert len(lines) < 20, out  # a story, not a log: the stack's output is in the file
    assert "HTTP/1.1" not in out, out  # no access-log lines

    stack_log = log.read_text()
    assert "pluristeer is up" in stack_log, stack_log[-2000:]
    assert "HTTP/1.1" not in stack_log, stack_log[-2000:]  # `up` keeps no access log unless asked (--access-log)
    assert "stopping" in stack_log, stack_log[-2000:]  # `up` took the stop and shut its children down
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
