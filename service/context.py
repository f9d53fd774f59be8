"""Per-app and per-request resources: settings, the request's database session, Redis, the artifact store
and the profile cache. Routes, the chat blueprint included, get them from here, never by building their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from service.settings import Settings
from service.store import db

log = logging.getLogger(__name__)

EXTENSION = "pluristeer"


class ServiceState:
    """What one app instance shares between requests (built lazily: creating the app starts nothing)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None
        self._store: Any = None
        self._cache: Any = None
        # The generation engine registers a probe here: () -> {"loaded": bool, ...}; see `model_status`.
        self.model_probe: Callable[[], dict[str, Any]] | None = None

    def redis(self) -> redis.Redis:
        if self._redis is None:
            from service.redis import redis_client

            self._redis = redis_client(self.settings)
        return self._redis

    def artifact_store(self) -> Any:
        if self._store is None:
            from service.store.artifacts import ArtifactStore

            self._store = ArtifactStore(self.settings.artifact_dir, on_broken=self._fail_profiles_of)
        return self._store

    def _fail_profiles_of(self, sha256: str, reason: str) -> None:
        """A stored artifact broke: its profiles become `failed` with the reason (asking again rebuilds)."""
        from service.builds import fail_broken_artifact

        try:
            with db.session_scope(self.settings) as session:
                failed = fail_broken_artifact(session, sha256, reason)
            if failed:
                log.error("profiles %s failed: %s", failed, reason)
        except Exception:  # the read is refused either way; the next one tries again
            log.exception("could not mark the profiles of a broken artifact failed")

    def profile_cache(self) -> Any:
        if self._cache is None:
            from service.store.artifacts import profile_cache

            self._cache = profile_cache(self.settings, self.artifact_store())
        return self._cache

    def cache_if_started(self) -> Any:
        """The profile cache if something already used it (metrics must not start Redis)."""
        return self._cache


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions[EXTENSION] = ServiceState(settings)
    app.teardown_appcontext(_close_session)


def state(app: Flask | None = None) -> ServiceState:
    return (app or current_app).extensions[EXTENSION]


def settings() -> Settings:
    return state().settings


def session() -> Session:
    """The request's database session (one per request; the route decorator commits or rolls it back)."""
    if "db_session" not in g:
        g.db_session = db.session_factory(settings())()
    return g.db_session


def session_if_open() -> Session | None:
    return g.get("db_session")


def _close_session(exc: BaseException | None) -> None:
    s = g.pop("db_session", None)
    if s is not None:
        if exc is not None or s.in_transaction():
            s.rollback()  # anything not committed by the route is not stored
        s.close()


def redis_client() -> redis.Redis:
    return state().redis()


def artifact_store() -> Any:
    return state().artifact_store()


def profile_cache() -> Any:
    """The app's `service.store.artifacts.ProfileCache` (LRU -> Redis -> store)."""
    return state().profile_cache()
