"""The database side of one build: claim the row, report progress, and record how it ended.

A build message is delivered at least once (acks late, redelivery, the sweeper's re-sends), so the same
profile can reach two workers. `claim` lets exactly one of them run it: it moves the row to `building`
and inserts the next `BuildAttempt` number in one transaction, and the unique (profile, attempt) pair
makes a concurrent second claim fail. A row already `building` is taken over only by a redelivery of
the same task (its previous worker died) or once its heartbeat is older than `build_stale_after`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.settings import Settings
from service.store.db import (
    BuildAttempt,
    ProfileRow,
    profile_by_id,
    profile_items,
    profiles_sharing_artifact,
    session_factory,
    session_scope,
    utcnow,
)
from steer_core.data import OpinionItem

log = logging.getLogger(__name__)

# A profile whose builds were lost this many times (worker killed, machine gone) is failed, not retried.
MAX_LOST_ATTEMPTS = 3


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run a claimed build (plain values: no session outlives `claim`)."""

    profile_id: str
    attempt: int
    method: str
    model: str
    params: dict[str, Any]
    sample_hash: str
    items: list[OpinionItem]


def worker_label(hostname: str, pid: int, task_id: str | None) -> str:
    """`BuildAttempt.worker`: who ran the attempt, and which task message (to recognise a redelivery)."""
    return f"{hostname} pid {pid} task {task_id or '-'}"[:200]


def _task_of(label: str | None) -> str | None:
    if not label or " task " not in label:
        return None
    return label.rsplit(" task ", 1)[1]


def lost_attempts(row: ProfileRow) -> int:
    return sum(1 for a in row.attempts if a.status == "lost")


def claim(settings: Settings, profile_id: str, task_id: str | None, label: str,
          now: datetime | None = None) -> Claim | str:
    """Take the build of `profile_id`, or say why not: `missing`, `ready`, `failed` or `busy`."""
    now = now or utcnow()
    stale_before = now - timedelta(seconds=settings.build_stale_after)
    session = session_factory(settings)()
    try:
        row = profile_by_id(session, profile_id)
        if row is None:
            return "missing"
        if row.status in ("ready", "failed"):
            return row.status
        attempts = list(row.attempts)
        last = attempts[-1] if attempts else None
        running = last is not None and last.status == "running"
        if row.status == "building":
            redelivered = running and task_id is not None and _task_of(last.worker) == task_id
            if not redelivered and row.updated_at >= stale_before:
                return "busy"
        if running:
            last.status, last.finished_at = "lost", now
            last.error = "the worker stopped during this attempt"
        lost = lost_attempts(row)
        if lost >= MAX_LOST_ATTEMPTS:
            _set_failed(row, f"the build was interrupted {lost} times (worker lost); giving up", now)
            session.commit()
            return "failed"
        taken = session.execute(
            update(ProfileRow).where(ProfileRow.id == profile_id, ProfileRow.status == row.status)
            .values(status="building", started_at=now, finished_at=None, error=None, updated_at=now,
                    progress={"done": 0, "total": 0, "stage": "starting"})
            .execution_options(synchronize_session=False))
        if taken.rowcount != 1:
            session.rollback()
            return "busy"
        number = max((a.attempt for a in attempts), default=0) + 1
        session.add(BuildAttempt(profile_id=profile_id, attempt=number, worker=label, status="running",
                                 started_at=now))
        try:
            session.flush()
        except IntegrityError:
            session.rollback()  # another worker inserted this attempt number first
            return "busy"
        items = profile_items(session, row)  # carrying the contrast subjects' answers, if any
        params = {k: v for k, v in (row.params or {}).items() if k != "contrast"}
        result = Claim(profile_id=profile_id, attempt=number, method=row.method, model=row.model,
                       params=params, sample_hash=row.sample_hash, items=items)
        session.commit()
        return result
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def report_progress(settings: Settings, profile_id: str, done: int, total: int, stage: str) -> None:
    """Write `progress` (and refresh the heartbeat) while the row is `building`."""
    with session_scope(settings) as session:
        session.execute(
            update(ProfileRow).where(ProfileRow.id == profile_id, ProfileRow.status == "building")
            .values(progress={"done": int(done), "total": int(total), "stage": stage}, updated_at=utcnow())
            .execution_options(synchronize_session=False))


def heartbeat(settings: Settings, profile_id: str) -> None:
    """Tell the sweeper this build is alive."""
    with session_scope(settings) as session:
        session.execute(
            update(ProfileRow).where(ProfileRow.id == profile_id, ProfileRow.status == "building")
            .values(updated_at=utcnow()).execution_options(synchronize_session=False))


def _attempt(session: Any, profile_id: str, number: int) -> BuildAttempt | None:
    return session.scalar(select(BuildAttempt).where(BuildAttempt.profile_id == profile_id,
                                                     BuildAttempt.attempt == number))


def _set_failed(row: ProfileRow, message: str, now: datetime) -> None:
    row.status, row.error, row.finished_at, row.updated_at = "failed", message, now, now
    progress = dict(row.progress or {})
    progress["stage"] = "failed"
    row.progress = progress


def finish(settings: Settings, claim: Claim, sha256: str, size: int, metrics: dict[str, Any],
           chosen: dict[str, Any]) -> bool:
    """Mark the profile `ready` with its artifact; False if the row was deleted during the build."""
    now = utcnow()
    with session_scope(settings) as session:
        row = profile_by_id(session, claim.profile_id)
        attempt = _attempt(session, claim.profile_id, claim.attempt)
        if attempt is not None:
            attempt.status, attempt.finished_at, attempt.error = "succeeded", now, None
        if row is None:
            return False
        total = int((row.progress or {}).get("total") or 1)
        row.status, row.error = "ready", None
        row.artifact_sha256, row.artifact_size = sha256, size
        row.metrics, row.chosen = metrics, chosen
        row.progress = {"done": total, "total": total, "stage": "done"}
        row.finished_at = row.updated_at = now
        return True


def fail(settings: Settings, profile_id: str, attempt: int | None, message: str) -> None:
    """Mark the profile `failed` with `message` (what the user sees) and close the attempt."""
    now = utcnow()
    with session_scope(settings) as session:
        if attempt is not None:
            record = _attempt(session, profile_id, attempt)
            if record is not None:
                record.status, record.error, record.finished_at = "failed", message, now
        row = profile_by_id(session, profile_id)
        if row is not None and row.status != "ready":
            _set_failed(row, message, now)


def retrying(settings: Settings, profile_id: str, attempt: int, message: str) -> None:
    """Put the row back to `queued` while a transient error waits out Celery's backoff."""
    now = utcnow()
    with session_scope(settings) as session:
        record = _attempt(session, profile_id, attempt)
        if record is not None:
            record.status, record.error, record.finished_at = "retrying", message, now
        row = profile_by_id(session, profile_id)
        if row is not None and row.status == "building":
            row.status, row.updated_at = "queued", now
            row.progress = {"done": 0, "total": 0, "stage": f"retrying after a transient error: {message}"[:500]}


def artifact_unreferenced(settings: Settings, sha256: str) -> bool:
    with session_scope(settings) as session:
        return profiles_sharing_artifact(session, sha256) == 0
