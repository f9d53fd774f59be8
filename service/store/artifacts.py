"""The artifact store and the profile cache, shared by the API and the worker.

`ArtifactStore` is the durable copy: a directory of files named by the sha256 of their bytes, written
atomically, checked against that sha256 on every read. `ProfileCache` puts an in-process LRU and Redis
in front of it. Redis is only a cache: down, flushed or holding a bad copy, the store still answers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from cachetools import LRUCache

from service.redis import DOWN_BACKOFF_S, note_redis_error, redis_client, redis_down

if TYPE_CHECKING:
    from service.settings import Settings
    from steer_core.profile import Profile

log = logging.getLogger(__name__)

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
REDIS_PREFIX = "pluristeer:artifact:"


class ArtifactError(Exception):
    """An artifact that cannot be served. `sha256` names it."""

    def __init__(self, message: str, sha256: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


class ArtifactMissing(ArtifactError):
    """No artifact with that sha256 is in the store."""


class ArtifactCorrupted(ArtifactError):
    """The stored bytes no longer hash to their name: never applied, reported unavailable."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha(sha: str) -> str:
    """A sha256 hex digest, lower case; anything else (a path, a prefix) is refused."""
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise ArtifactMissing(f"not a sha256 hex digest: {sha!r}", str(sha))
    return sha


class ArtifactStore:
    """Content-addressed files under `root`: `root/ab/abcdef...` for sha256 `abcdef...`.

    `on_broken(sha, reason)` is told of every read that finds a file missing or corrupted (the API marks
    the profiles that name it failed)."""

    def __init__(self, root: str | Path, on_broken: Callable[[str, str], None] | None = None) -> None:
        self.root = Path(root)
        self.on_broken = on_broken

    def path(self, sha: str) -> Path:
        sha = check_sha(sha)
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> tuple[str, int]:
        """Store `data`; return (sha256 hex, size). Idempotent; a reader never sees a partial file."""
        sha = sha256_hex(data)
        path = self.path(sha)
        if path.exists():
            try:
                if sha256_hex(path.read_bytes()) == sha:
                    return sha, len(data)
            except OSError:
                pass  # unreadable: rewrite it below
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sha[:12]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha, len(data)

    def get(self, sha: str) -> bytes:
        """The bytes stored under `sha`, verified; `ArtifactMissing` or `ArtifactCorrupted` otherwise."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._broken(ArtifactMissing(f"artifact {sha} is not in the store", sha)) from None
        except OSError as exc:
            raise self._broken(ArtifactCorrupted(f"artifact {sha} cannot be read: {exc.strerror}", sha)) from None
        actual = sha256_hex(data)
        if actual != sha:
            raise self._broken(ArtifactCorrupted(f"artifact {sha} is corrupted: its bytes hash to {actual}", sha))
        return data

    def _broken(self, error: ArtifactError) -> ArtifactError:
        if self.on_broken is not None:
            self.on_broken(error.sha256, str(error))
        return error

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def delete(self, sha: str) -> bool:
        """Remove the file; True if there was one."""
        path = self.path(sha)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        try:
            path.parent.rmdir()
        except OSError:
            pass  # other artifacts share the directory
        return True


class ProfileCache:
    """Profiles by artifact sha256: in-process LRU, then Redis, then the store.

    Every byte read from Redis or the store is checked against its sha256 before it is parsed. Redis
    errors count as misses. Returned profiles are shared between callers: treat them as read-only.
    """

    def __init__(self, store: ArtifactStore, redis_client: redis.Redis | None, lru_size: int = 64,
                 ttl: int = 3600, max_bytes: int = 64 << 20, redis_url: str | None = None) -> None:
        self.store = store
        self.redis = redis_client
        # The URL the process marks this Redis down under (service.redis.redis_down), shared with
        # the queue, the rate limits and readiness: a down Redis costs one timeout, not one per read.
        self.redis_url = redis_url
        self.lru_size = max(0, int(lru_size))
        self.ttl = max(1, int(ttl))
        self.max_bytes = int(max_bytes)
        # cachetools' LRU is not thread-safe: every access holds `_lock`. An LRU of size 0 is never written.
        self._lru: LRUCache[str, Profile] = LRUCache(maxsize=max(1, self.lru_size))
        self._lock = threading.Lock()
        self.lru_hits = 0
        self.redis_hits = 0
        self.misses = 0  # served from the store
        self.redis_errors = 0
        self.corrupted = 0

    def stats(self) -> dict[str, int]:
        """Counters for /metrics (`misses` are reads that went to the store)."""
        with self._lock:
            return {"lru_hits": self.lru_hits, "redis_hits": self.redis_hits, "misses": self.misses,
                    "redis_errors": self.redis_errors, "corrupted": self.corrupted,
                    "lru_size": len(self._lru)}

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _remember(self, sha: str, profile: Profile) -> None:
        if self.lru_size == 0:
            return
        with self._lock:
            self._lru[sha] = profile

    def _usable_redis(self) -> redis.Redis | None:
        """The Redis client, or None when there is none or it is marked down after a failure."""
        return None if redis_down(self.redis_url) else self.redis

    def _redis_failed(self, what: str, exc: Exception) -> None:
        self._count("redis_errors")
        note_redis_error(self.redis_url)
        log.warning("profile cache: Redis %s failed (not used for %.0f s; the store answers): %s",
                    what, DOWN_BACKOFF_S, exc)

    def _redis_get(self, sha: str) -> bytes | None:
        client = self._usable_redis()
        if client is None:
            return None
        try:
            data = client.get(REDIS_PREFIX + sha)
        except redis.RedisError as exc:
            self._redis_failed("read", exc)
            return None
        if not isinstance(data, bytes):  # a miss (None); the client does not decode responses
            return None
        if sha256_hex(data) != sha:
            # A bad cached copy is dropped, never parsed; the store decides.
            self._count("corrupted")
            self._redis_delete(sha)
            return None
        return data

    def _redis_put(self, sha: str, data: bytes) -> bool:
        client = self._usable_redis()
        if client is None or len(data) > self.max_bytes:
            return False
        try:
            client.set(REDIS_PREFIX + sha, data, ex=self.ttl)
            return True
        except redis.RedisError as exc:
            self._redis_failed("write", exc)
            return False

    def _redis_delete(self, sha: str, force: bool = False) -> None:
        # `forget` tries even while backing off: a deleted profile's copy should not outlive it.
        client = self.redis if force else self._usable_redis()
        if client is None:
            return
        try:
            client.delete(REDIS_PREFIX + sha)
        except redis.RedisError as exc:
            self._redis_failed("delete", exc)

    def load(self, sha: str) -> Profile:
        """The profile stored under `sha`; raises `ArtifactMissing` / `ArtifactCorrupted` from the store."""
        sha = check_sha(sha)
        with self._lock:
            profile = self._lru.get(sha)  # a hit becomes the most recently used
            if profile is not None:
                self.lru_hits += 1
                return profile
        data = self._redis_get(sha)
        if data is not None:
            self._count("redis_hits")
        else:
            self._count("misses")
            try:
                data = self.store.get(sha)
            except ArtifactCorrupted:
                self._count("corrupted")
                raise
            self._redis_put(sha, data)
        from steer_core.profile import Profile  # torch: here, so the routes that only store files stay torch-free

        profile = Profile.from_bytes(data, source=f"artifact {sha}")
        self._remember(sha, profile)
        return profile

    def put(self, sha: str, data: bytes) -> bool:
        """Warm Redis with `data` (checked against `sha`); True if Redis took it."""
        sha = check_sha(sha)
        if sha256_hex(data) != sha:
            raise ArtifactCorrupted(f"refusing to cache bytes that do not hash to {sha}", sha)
        return self._redis_put(sha, data)

    def forget(self, sha: str) -> None:
        """Drop `sha` from this process's LRU and from Redis (other processes' LRUs age out)."""
        sha = check_sha(sha)
        with self._lock:
            self._lru.pop(sha, None)
        self._redis_delete(sha, force=True)


def profile_cache(settings: Settings, store: ArtifactStore | None = None, lru_size: int | None = None) -> ProfileCache:
    """The profile cache of `settings`: its Redis (the process's shared client, marked down under its URL),
    TTL and size limit, in front of `store` (default: a plain store of the settings' `artifact_dir`), with an
    LRU of `lru_size` profiles (default: `profile_lru_size`; 0 for a process that reads each profile once)."""
    return ProfileCache(ArtifactStore(settings.artifact_dir) if store is None else store, redis_client(settings),
                        lru_size=settings.profile_lru_size if lru_size is None else lru_size,
                        ttl=settings.profile_cache_ttl, max_bytes=settings.profile_cache_max_bytes,
                        redis_url=settings.redis_url)
