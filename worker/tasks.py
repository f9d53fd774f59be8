"""Celery tasks. Thin: claim the profile row, build with steer_core, store the artifact, report.

`pluristeer.build_profile(profile_id)`: the message carries only the id. Transient faults (database,
Redis, disk) retry with exponential backoff; bad input (`SteerError`) fails the profile with its message;
a soft time limit fails it with the limit named. The model is loaded once per worker process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError

from service.artifacts import ArtifactStore, ProfileCache
from service.settings import Settings
from steer_core.errors import SteerError
from worker import build_state
from worker.app import BUILD_TASK, QUEUE_ALIVE_KEY, QUEUE_ALIVE_TTL_S, worker_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 5
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 300.0
# Failures worth another try: the database, Redis or the disk was briefly unavailable.
TRANSIENT = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError, OSError)

_model_lock = threading.Lock()
_models: dict[str, Any] = {}


def get_model(name: str) -> Any:
    """The process's model (loaded on first use, then reused by every build of this process)."""
    with _model_lock:
        lm = _models.get(name)
        if lm is None:
            from steer_core.models import load_model

            log.info("loading model %s", name)
            lm = _models[name] = load_model(name)
        return lm


def loaded_models() -> list[str]:
    with _model_lock:
        return list(_models)


def backoff(retries: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** retries))


def _settings_of(task: Any) -> Settings:
    settings = getattr(task.app, "settings", None)
    return settings if isinstance(settings, Settings) else worker_settings()


@contextmanager
def _heartbeat(settings: Settings, profile_id: str) -> Iterator[None]:
    """Refresh the row's heartbeat while the build runs, so the sweeper never takes a live build."""
    stop = threading.Event()
    interval = max(0.5, min(30.0, settings.build_stale_after / 4))

    def beat() -> None:
        while not stop.wait(interval):
            try:
                build_state.heartbeat(settings, profile_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next interval
                log.warning("heartbeat of %s failed: %s", profile_id, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{profile_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@shared_task(bind=True, name=BUILD_TASK, max_retries=MAX_RETRIES)
def build_profile(self: Any, profile_id: str) -> dict[str, Any]:
    """Build the profile `profile_id`; returns its final status."""
    from steer_core.build import build_profile as build
    from steer_core.data import sample_hash

    settings = _settings_of(self)
    host = self.request.hostname or socket.gethostname()
    label = build_state.worker_label(host, os.getpid(), self.request.id)
    claimed = build_state.claim(settings, profile_id, self.request.id, label)
    if isinstance(claimed, str):
        if claimed == "missing" and self.request.retries < 3:
            # The API commits the row before it enqueues; a short wait covers a replica lag or a race.
            raise self.retry(countdown=2)
        log.info("build of %s skipped: %s", profile_id, claimed)
        return {"profile_id": profile_id, "status": claimed, "skipped": True}

    def progress(done: int, total: int, stage: str) -> None:
        build_state.report_progress(settings, profile_id, done, total, stage)
        try:
            self.update_state(state="PROGRESS", meta={"profile_id": profile_id, "done": done, "total": total,
                                                      "stage": stage})
        except Exception as exc:  # noqa: BLE001 - progress in the result backend is a nicety
            log.debug("update_state failed: %s", exc)

    try:
        if claimed.model != settings.model:
            raise SteerError(f"this deployment's workers serve model {settings.model!r}, "
                             f"not {claimed.model!r}", "model")
        if sample_hash(claimed.items) != claimed.sample_hash:
            raise SteerError("the subject's opinions (or its contrast subjects') changed after this profile was "
                             "requested; request the profile again to build it from the current sample", "sample")
        with _heartbeat(settings, profile_id):
            progress(0, 0, "loading model")
            lm = get_model(settings.model)
            profile = build(lm, claimed.items, claimed.method, claimed.params, progress=progress)
            data = profile.to_bytes()
            store = ArtifactStore(settings.artifact_dir)
            sha, size = store.put(data)
        _warm_cache(settings, store, sha, data)
        chosen = {"layer": profile.layer, "strength": profile.strength, "positions": profile.positions,
                  "params": profile.params}
        if not build_state.finish(settings, claimed, sha, size, profile.metrics, chosen):
            # Deleted while it was building: keep no orphan file.
            if build_state.artifact_unreferenced(settings, sha):
                store.delete(sha)
            return {"profile_id": profile_id, "status": "deleted"}
        log.info("profile %s ready: %s (%d bytes)", profile_id, sha, size)
        return {"profile_id": profile_id, "status": "ready", "artifact_sha256": sha, "artifact_size": size}
    except SoftTimeLimitExceeded:
        message = f"the build ran past the time limit (BUILD_TIME_LIMIT={settings.build_time_limit} s)"
        build_state.fail(settings, profile_id, claimed.attempt, message)
        return {"profile_id": profile_id, "status": "failed", "error": message}
    except SteerError as exc:
        build_state.fail(settings, profile_id, claimed.attempt, str(exc))
        return {"profile_id": profile_id, "status": "failed", "error": str(exc)}
    except TRANSIENT as exc:
        message = f"{type(exc).__name__}: {exc}"[:1000]
        if self.request.retries >= self.max_retries:
            _fail_quietly(settings, profile_id, claimed.attempt,
                          f"gave up after {self.max_retries} retries: {message}")
            raise
        countdown = backoff(self.request.retries)
        try:
            build_state.retrying(settings, profile_id, claimed.attempt, message, countdown)
        except TRANSIENT:
            pass  # the database itself is down; the retried message still carries this task id
        log.warning("build of %s hit a transient error, retrying in %.0f s: %s",
                    profile_id, countdown, message)
        raise self.retry(exc=exc, countdown=countdown) from exc
    except Exception as exc:
        log.exception("build of %s failed", profile_id)
        message = f"internal error: {type(exc).__name__}: {exc}"[:1000]
        _fail_quietly(settings, profile_id, claimed.attempt, message)
        return {"profile_id": profile_id, "status": "failed", "error": message}


def _fail_quietly(settings: Settings, profile_id: str, attempt: int, message: str) -> None:
    try:
        build_state.fail(settings, profile_id, attempt, message)
    except Exception as exc:  # noqa: BLE001 - the sweeper will find the row if this could not be written
        log.error("could not mark %s failed: %s", profile_id, exc)


def _warm_cache(settings: Settings, store: ArtifactStore, sha: str, data: bytes) -> None:
    """Put the new artifact in Redis; the store already has it, so a Redis failure changes nothing."""
    from service.redis_server import redis_client

    try:
        cache = ProfileCache(store, redis_client(settings), lru_size=0, ttl=settings.profile_cache_ttl,
                             max_bytes=settings.profile_cache_max_bytes)
        cache.put(sha, data)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not warm the profile cache for %s: %s", sha, exc)


# ---------------------------------------------------------------------------------------------------------
# Background duties of each pool process: sweep stale builds, advertise the GPU queue, warm the model.

_background_started = threading.Event()


def start_background(settings: Settings, listening: list[str]) -> threading.Thread | None:
    """Start (once per process) the thread that sweeps at start and then every `sweep_interval`."""
    if _background_started.is_set():
        return None
    _background_started.set()
    thread = threading.Thread(target=_background_loop, args=(settings, listening), name="pluristeer-sweeper",
                              daemon=True)
    thread.start()
    return thread


def _background_loop(settings: Settings, listening: list[str]) -> None:
    from service.redis_server import redis_client
    from worker.app import gpu_available
    from worker.sweeper import sweep, sweep_interval

    advertise = "gpu" in listening and gpu_available()
    interval = sweep_interval(settings)
    stop = threading.Event()
    # Warm the model so the first build does not pay for it; a build that comes first waits on the lock.
    threading.Thread(target=_warm_model, args=(settings,), name="pluristeer-model", daemon=True).start()
    while True:
        if advertise:
            try:
                redis_client(settings).set(QUEUE_ALIVE_KEY.format(queue="gpu"), socket.gethostname(),
                                           ex=QUEUE_ALIVE_TTL_S)
            except redis.RedisError as exc:
                log.warning("could not advertise the gpu queue: %s", exc)
        try:
            sweep(settings)
        except Exception as exc:  # noqa: BLE001 - try again at the next interval
            log.warning("sweep failed: %s", exc)
        stop.wait(min(interval, QUEUE_ALIVE_TTL_S / 3) if advertise else interval)


def _warm_model(settings: Settings) -> None:
    try:
        get_model(settings.model)
    except Exception as exc:  # noqa: BLE001 - the build reports the load error to the user
        log.warning("could not preload model %s: %s", settings.model, exc)
