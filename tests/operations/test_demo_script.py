"""`make demo`'s script run as a script runs it (non-interactive bash, no terminal): it tells a short
story, keeps the stack's log in a file, and ends by itself with everything it started stopped. It runs in
a fresh home of its own, which it keeps and names at the end, and leaves the user's home as it was (the
model aside, which it shares).

A non-interactive bash starts `pluristeer up &` with SIGINT ignored, so a stop that only SIGINT carries
never arrives; this test runs that real path (`--no-builds` only skips the minutes-long profile builds
between start and stop)."""

from __future__ import annotations

import json
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
    home = tmp_path / "home"  # the user's own home: only the model is used from it
    home.mkdir()
    (home / "models").symlink_to(default_model_path.parent, target_is_directory=True)
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DEMO_HOME", "DEMO_LOG")}
    # The user's own stack settings must not reach the demo's stack.
    env.update({"PLURISTEER_HOME": str(home), "PORT": str(port), "TMPDIR": str(temp),
                "BIN": str(Path(sys.executable).parent), "DATABASE_URL": f"sqlite:///{home / 'mine.db'}"})
    proc = subprocess.Popen(["bash", "scripts/demo.sh", "--no-builds"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo script did not end by itself:\n{out[-3000:]}")
    finally:
        demo_homes = list(temp.glob("pluristeer-demo.*"))
        left = [p for h in [home, *demo_homes] for p in processes_of(h)]
        for p in left:
            p.kill()
    assert proc.returncode == 0, out[-3000:]
    assert left == [], [p.cmdline() for p in left]  # `up` stopped the API, the worker and Redis

    # Its own home, fresh, kept after the stack stopped and named; the user's home is as it was.
    assert len(demo_homes) == 1, demo_homes
    demo_home = demo_homes[0]
    assert sorted(p.name for p in home.iterdir()) == ["models"]
    assert (demo_home / "pluristeer.db").exists() and (demo_home / "up.json").exists()
    assert (demo_home / "models").resolve() == default_model_path.parent.resolve()  # the model is shared
    log = demo_home / "stack.log"

    lines = out.splitlines()
    assert lines[0].startswith("stack: starting") and str(log) in out and f"its home: {demo_home}" in out, out
    assert f"kept:  {demo_home}" in out and f"PLURISTEER_HOME={demo_home}" in out, out
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


def test_the_ab_results_are_saved_in_files_that_outlive_the_stack(tmp_path, monkeypatch):
    """`pluristeer demo` keeps the A/B plot and results in its home's `demo/` (`save_results`), not only as a
    URL of a server that is about to stop."""
    from service.cli.demo import results_dir
    from service.cli.demo_ab import Client, save_results

    class Server(Client):
        def raw(self, method, path, body=None, ok=(200, 201, 202)):
            assert (method, path) == ("GET", "/v1/experiments/exp1/results.png")
            return b"\x89PNG fake"

    plot = save_results(Server("http://127.0.0.1:1", "k"), "exp1", {"winner": "urban"}, tmp_path / "demo")
    assert plot == tmp_path / "demo" / "ab-exp1.png" and plot.read_bytes() == b"\x89PNG fake"
    assert json.loads((tmp_path / "demo" / "ab-exp1.json").read_text()) == {"winner": "urban"}
    monkeypatch.setenv("PLURISTEER_HOME", str(tmp_path))  # what scripts/demo.sh exports: the demo's home
    assert results_dir() == tmp_path / "demo"
