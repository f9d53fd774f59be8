"""Celery tasks. Thin: claim the row, run steer_core through the service's functions, store, report.

`pluristeer.build_profile(profile_id)` and `pluristeer.offline_comparison(comparison_id)`: each message
carries only an id. Transient faults (database, Redis, disk) are retried by Celery with exponential
backoff and jitter; bad input (`SteerError`) fails the row with its message; a soft time limit fails it
with the limit named. The model is the process's own (`worker.lifecycle.get_model`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError

from service import builds, populations
from service.experiments import offline_comparison as offline
from service.queue import BUILD_TASK, OFFLINE_TASK, POPULATION_TASK
from service.settings import Settings
from service.store import db
from service.store.artifacts import ArtifactError, ArtifactStore, profile_cache
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.method_names import POPULATION_METHOD
from worker.lifecycle import get_model, heartbeat, worker_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 5
BACKOFF_BASE_S = 5
BACKOFF_MAX_S = 300
# Failures worth another try: the database, Redis or the disk was briefly unavailable.
TRANSIENT = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError, OSError)
RETRY_OPTIONS: dict[str, Any] = {"autoretry_for": TRANSIENT, "max_retries": MAX_RETRIES,
                                 "retry_backoff": BACKOFF_BASE_S, "retry_backoff_max": BACKOFF_MAX_S,
                                 "retry_jitter": True}


def _settings_of(task: Any) -> Settings:
    settings = getattr(task.app, "settings", None)
    return settings if isinstance(settings, Settings) else worker_settings()


@shared_task(bind=True, name=BUILD_TASK, **RETRY_OPTIONS)
def build_profile(self: Any, profile_id: str) -> dict[str, Any]:
    """Build the profile `profile_id`; returns its final status."""
    from steer_core.data import sample_hash

    settings = _settings_of(self)
    host = self.request.hostname or socket.gethostname()
    label = builds.worker_label(host, os.getpid(), self.request.id)
    claimed = builds.claim(settings, profile_id, self.request.id, label)
    if isinstance(claimed, str):
        if claimed == "missing" and self.request.retries < 3:
            # The API commits the row before it enqueues; a short wait covers a replica lag or a race.
            raise self.retry(countdown=2)
        log.info("build of %s skipped: %s", profile_id, claimed)
        return {"profile_id": profile_id, "status": claimed, "skipped": True}

    def progress(done: int, total: int, stage: str) -> None:
        builds.report_progress(settings, profile_id, done, total, stage)
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
        with heartbeat(settings, profile_id):
            progress(0, 0, "loading model")
            lm = get_model(settings.model)
            profile = _build(settings, lm, claimed, progress)
            data = profile.to_bytes()
            store = ArtifactStore(settings.artifact_dir)
            sha, size = store.put(data)
        _warm_cache(settings, store, sha, data)
        chosen = {"layer": profile.layer, "strength": profile.strength, "positions": profile.positions,
                  "params": profile.params}
        if not builds.finish(settings, claimed, sha, size, profile.metrics, chosen):
            # Deleted while it was building: keep no orphan file.
            if builds.artifact_unreferenced(settings, sha):
                store.delete(sha)
            return {"profile_id": profile_id, "status": "deleted"}
        log.info("profile %s ready: %s (%d bytes)", profile_id, sha, size)
        return {"profile_id": profile_id, "status": "ready", "artifact_sha256": sha, "artifact_size": size}
    except SoftTimeLimitExceeded:
        message = f"the build ran past the time limit (BUILD_TIME_LIMIT={settings.build_time_limit} s)"
        builds.fail(settings, profile_id, claimed.attempt, message)
        return {"profile_id": profile_id, "status": "failed", "error": message}
    except SteerError as exc:
        builds.fail(settings, profile_id, claimed.attempt, str(exc))
        return {"profile_id": profile_id, "status": "failed", "error": str(exc)}
    except TRANSIENT as exc:
        message = f"{type(exc).__name__}: {exc}"[:1000]
        if self.request.retries >= self.max_retries:
            _fail_quietly(settings, profile_id, claimed.attempt,
                          f"gave up after {self.max_retries} retries: {message}")
            raise
        try:
            builds.retrying(settings, profile_id, claimed.attempt, message)
        except TRANSIENT:
            pass  # the database itself is down; the retried message still carries this task id
        log.warning("build of %s hit a transient error, retrying: %s", profile_id, message)
        raise  # Celery's autoretry sends it again after its backoff
    except Exception as exc:
        log.exception("build of %s failed", profile_id)
        message = f"internal error: {type(exc).__name__}: {exc}"[:1000]
        _fail_quietly(settings, profile_id, claimed.attempt, message)
        return {"profile_id": profile_id, "status": "failed", "error": message}


def _build(settings: Settings, lm: Any, claimed: builds.Claim, progress: Any) -> Any:
    """A subject's profile: fitted against a population (`method` "population"), or built by its method."""
    from steer_core.build import build_profile
    from steer_core.population_build import fit_subject_profile

    if claimed.method == POPULATION_METHOD:
        progress(0, 1, "fit against the population")
        population = populations.load(settings, claimed.params["population_sha256"])
        profile = fit_subject_profile(lm, population, claimed.items)
        profile.params = {"population": claimed.params["population"]}
        progress(1, 1, "done")
        return profile
    return build_profile(lm, claimed.items, claimed.method, claimed.params, progress=progress)


def _fail_quietly(settings: Settings, profile_id: str, attempt: int, message: str) -> None:
    try:
        builds.fail(settings, profile_id, attempt, message)
    except Exception as exc:  # noqa: BLE001 - the sweeper will find the row if this could not be written
        log.error("could not mark %s failed: %s", profile_id, exc)


def _warm_cache(settings: Settings, store: ArtifactStore, sha: str, data: bytes) -> None:
    """Put the new artifact in Redis; the store already has it, so a Redis failure changes nothing."""
    try:
        profile_cache(settings, store, lru_size=0).put(sha, data)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not warm the profile cache for %s: %s", sha, exc)


@shared_task(bind=True, name=OFFLINE_TASK, **RETRY_OPTIONS)
def offline_comparison(self: Any, comparison_id: str) -> dict[str, Any]:
    """Score each variant of an experiment on its scope's opinion items and store the result."""
    settings = _settings_of(self)
    with db.session_scope(settings) as session:
        claimed = offline.claim(session, comparison_id, settings.build_stale_after)
        if isinstance(claimed, str):
            log.info("offline comparison %s skipped: %s", comparison_id, claimed)
            return {"comparison_id": comparison_id, "status": claimed, "skipped": True}
    try:
        with db.session_scope(settings) as session:
            row = offline.comparison_by_id(session, comparison_id)
            assert row is not None  # claimed above; rows go only with their experiment
            lm = get_model(settings.model)
            result = offline.compute(session, row, settings.model, _blend_scorer(settings, lm))
            offline.store(session, row, result)
        return {"comparison_id": comparison_id, "status": "ready"}
    except TRANSIENT as exc:
        if self.request.retries >= self.max_retries:
            _fail_comparison(settings, comparison_id, f"gave up after {self.max_retries} retries: "
                                                      f"{type(exc).__name__}: {exc}")
        else:
            _requeue_comparison(settings, comparison_id)
        raise  # Celery's autoretry sends it again after its backoff
    except SoftTimeLimitExceeded:
        message = f"the comparison ran past the time limit (BUILD_TIME_LIMIT={settings.build_time_limit} s)"
    except (SteerError, ArtifactError, ValueError) as exc:
        message = str(exc)
    except Exception as exc:
        log.exception("offline comparison %s failed", comparison_id)
        message = f"internal error: {type(exc).__name__}: {exc}"
    _fail_comparison(settings, comparison_id, message)
    return {"comparison_id": comparison_id, "status": "failed", "error": message}


def _fail_comparison(settings: Settings, comparison_id: str, message: str) -> None:
    try:
        with db.session_scope(settings) as session:
            row = offline.comparison_by_id(session, comparison_id)
            if row is not None:
                offline.store(session, row, None, message)
    except Exception as exc:  # noqa: BLE001 - a stale `running` row is asked for again by the next request
        log.error("could not mark offline comparison %s failed: %s", comparison_id, exc)


def _requeue_comparison(settings: Settings, comparison_id: str) -> None:
    """Hand the row back (`queued`) so the retried message can claim it again."""
    try:
        with db.session_scope(settings) as session:
            row = offline.comparison_by_id(session, comparison_id)
            if row is not None and row.status == "running":
                row.status, row.updated_at = "queued", db.utcnow()
    except Exception as exc:  # noqa: BLE001 - left `running`, it goes stale and the next request re-sends it
        log.warning("could not hand back offline comparison %s: %s", comparison_id, exc)


def _blend_scorer(settings: Settings, lm: Any) -> offline.Scorer:
    """Answer distributions under a blend of ready profiles: artifacts through the profile cache (every read
    checks the sha256), interventions composed as the serving engine composes them, the profiles' output
    calibrations pooled and applied by the function /v1/score applies them with (`calibrate_blend`)."""
    from service.engine.blend import calibrate_blend
    from steer_core.methods import intervention
    from steer_core.prompts import read_answers
    from steer_core.steering import compose

    cache = profile_cache(settings, lru_size=0)

    def score(items: Sequence[OpinionItem], blend: Sequence[tuple[db.ProfileRow, float]]) -> list[np.ndarray]:
        weighted, calibrations, probes = [], [], []
        for row, weight in blend:
            assert row.artifact_sha256 is not None  # `offline.inputs` takes ready profiles only
            profile = cache.load(row.artifact_sha256)
            weighted.append((intervention(profile, lm), weight))
            calibrations.append((profile.calibration, weight))
            probes.append(profile.question_lean)
        read = read_answers(lm, items, compose(weighted) if weighted else None,
                            sorted({p.layer for p in probes if p is not None}))
        # As /v1/score reads a blend: a question lean's lean replaces its profile's, question by question.
        per_profile = [None if p is None else p.leans(read.states[p.layer]) for p in probes]
        leans = [[None if values is None else float(values[i]) for values in per_profile] for i in range(len(items))]
        return calibrate_blend(items, read.distributions, leans, calibrations).distributions

    return score


@shared_task(bind=True, name=POPULATION_TASK, **RETRY_OPTIONS)
def build_population(self: Any, population_id: str) -> dict[str, Any]:
    """Learn the population `population_id` from its subjects' shared answers and store it. Its own time limit
    (`POPULATION_TIME_LIMIT`): it reads every shared question of every subject."""
    from steer_core.population_build import learn_population

    settings = _settings_of(self)
    claimed = populations.claim(settings, population_id)
    if isinstance(claimed, str):
        log.info("population %s skipped: %s", population_id, claimed)
        return {"population_id": population_id, "status": claimed, "skipped": True}

    def progress(done: int, total: int, stage: str) -> None:
        populations.report_progress(settings, population_id, done, total, stage)

    try:
        if claimed.model != settings.model:
            raise SteerError(f"this deployment's workers serve model {settings.model!r}, not {claimed.model!r}",
                             "model")
        with heartbeat(settings, population_id, populations.heartbeat):
            progress(0, 0, "loading model")
            lm = get_model(settings.model)
            population, report = learn_population(lm, claimed.sample.items, progress=progress)
            store = ArtifactStore(settings.artifact_dir)
            sha, size = store.put(population.to_bytes())
        report["groups"] = list(claimed.sample.items)
        if not populations.finish(settings, claimed, sha, size, report):
            with db.session_scope(settings) as session:
                if populations.artifact_unreferenced(session, sha):
                    store.delete(sha)
            return {"population_id": population_id, "status": "superseded"}
        log.info("population %s ready: %s (%d bytes)", population_id, sha, size)
        return {"population_id": population_id, "status": "ready", "artifact_sha256": sha}
    except SoftTimeLimitExceeded:
        message = f"the build ran past the time limit (POPULATION_TIME_LIMIT={settings.population_time_limit} s)"
    except SteerError as exc:
        message = str(exc)
    except TRANSIENT as exc:
        if self.request.retries >= self.max_retries:
            populations.fail(settings, population_id, f"gave up after {self.max_retries} retries: {exc}")
        else:
            populations.requeue(settings, population_id)  # so the retried message can claim it again
        raise
    except Exception as exc:
        log.exception("population %s failed", population_id)
        message = f"internal error: {type(exc).__name__}: {exc}"[:1000]
    populations.fail(settings, population_id, message)
    return {"population_id": population_id, "status": "failed", "error": message}
