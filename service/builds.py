"""A profile build's lifecycle, in one place: the API requests and sends builds, the worker claims, runs and
ends them, and every worker sweeps.

    request ──> queued ──send──> (message) ──claim──> building ──finish──> ready
                  ^  ^                                  │  │
                  │  └─────────── retrying ─────────────┘  └──fail──> failed ──request──> queued
                  └──── sweep: no heartbeat (the worker is gone), or the message was lost

- `request` (API): the row of a request, created `queued`, or a `failed` one reset to `queued`; the same
  request on the same sample is one row. `send` hands its message to the broker and records `sent_at`.
- `message_lost`: a `queued` row's message is gone when it was never sent, was sent before the broker's
  current data began (`service.queue.broker_since`: Redis restarted empty or was flushed), or was sent longer
  ago than the broker's visibility timeout and no worker has taken it since. Asking again for such a row
  (`resend_due`) or a sweep sends it again.
- `claim` (worker): a message is delivered at least once (acks late, redelivery, the sweeper's re-sends), so
  the same profile can reach two workers. `claim` lets exactly one of them run it: it moves the row to
  `building` and inserts the next `BuildAttempt` number in one transaction, and the unique (profile, attempt)
  pair makes a concurrent second claim fail. A row already `building` is taken over only by a redelivery of
  the same task (its previous worker died) or once its heartbeat is older than `build_stale_after`.
- `report_progress` and `heartbeat` refresh `updated_at` (the heartbeat) while the row is `building`;
  `finish` makes it `ready`, `fail` `failed`; `retrying` puts it back to `queued` while Celery's retry of a
  transient error holds the message. A ready profile whose artifact broke is failed by
  `fail_broken_artifact` (the API, on reading it); asking again rebuilds it.
- `sweep` (each worker, at start and every `sweep_interval`): a `building` row whose heartbeat is older than
  `build_stale_after` is re-queued and sent again; a `queued` row older than `RESEND_QUEUED_AFTER_S` whose
  message is lost is sent again. Rows are taken with a conditional update, so two sweepers never take the
  same row, and a duplicate message is harmless (`claim`).
- The lost-attempt rule (`_record_lost`), shared by `claim` and `sweep`: an attempt still `running` when its
  row is taken over was lost with its worker; after `MAX_LOST_ATTEMPTS` lost attempts the profile is
  `failed` instead of retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.queue import broker_since, enqueue_build, visibility_timeout
from service.redis import note_redis_error, redis_down
from service.settings import Settings
from service.store.db import (
    BROKEN_ARTIFACT,
    BuildAttempt,
    ProfileRow,
    params_hash,
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
# A queued row this old whose message is lost is sent again by the sweeper.
RESEND_QUEUED_AFTER_S = 30.0


# --- request and send (the API) ---

def request(session: Session, tenant_id: int, kind: str, subject_id: int, method: str, model: str,
            params: dict[str, Any], sample: str) -> tuple[ProfileRow, bool]:
    """The profile row for this request, creating it `queued` when new. Returns (row, needs_send).

    The same request on the same sample returns the existing row (no second build). A `failed` row is
    reset to `queued` so asking again retries it. The caller commits before it sends.
    """
    key = dict(tenant_id=tenant_id, subject_kind=kind, subject_id=subject_id, method=method, model=model,
               params_hash=params_hash(params), sample_hash=sample)
    existing = session.scalar(select(ProfileRow).filter_by(**key))
    if existing is None:
        version = _next_version(session, tenant_id, kind, subject_id, method, model)
        row = ProfileRow(params=params, status="queued", version=version,
                         progress={"done": 0, "total": 0, "stage": "queued"}, **key)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            # A concurrent request created the same row first: that one is ours too.
            existing = session.scalar(select(ProfileRow).filter_by(**key))
            if existing is None:
                raise
        else:
            return row, True
    if existing.status == "failed":
        if existing.artifact_sha256 is not None:
            # A rebuild in place (its artifact broke): same id, the next version of the subject's profile.
            existing.version = _next_version(session, tenant_id, kind, subject_id, method, model)
        existing.status, existing.error = "queued", None
        existing.progress = {"done": 0, "total": 0, "stage": "queued"}
        existing.started_at = existing.finished_at = existing.sent_at = None
        return existing, True
    return existing, False


def _next_version(session: Session, tenant_id: int, kind: str, subject_id: int, method: str, model: str) -> int:
    """`version` numbers the profiles of one (subject, method, model): 1, 2, ... as the subject's sample changes."""
    return (session.scalar(select(func.max(ProfileRow.version)).where(
        ProfileRow.tenant_id == tenant_id, ProfileRow.subject_kind == kind, ProfileRow.subject_id == subject_id,
        ProfileRow.method == method, ProfileRow.model == model)) or 0) + 1


def send(settings: Settings, profile_id: str, method: str) -> None:
    """Send the build of `profile_id` (its row committed) and record `sent_at` once the broker has it.
    Raises `BrokerUnavailable` within about a second when Redis is down or hung: the row stays queued with
    no `sent_at`, and the sweeper sends it later."""
    enqueue_build(profile_id, method, settings)
    try:
        with session_scope(settings) as session:
            # The row may be `building` already: only `sent_at` is written (and `updated_at` kept as it is).
            session.execute(update(ProfileRow).where(ProfileRow.id == profile_id)
                            .values(sent_at=utcnow(), updated_at=ProfileRow.updated_at)
                            .execution_options(synchronize_session=False))
    except Exception as exc:  # noqa: BLE001 - the message is out; unrecorded, the sweeper sends a harmless duplicate
        log.warning("the build of %s was sent but its sent_at not recorded: %s", profile_id, exc)


def message_lost(sent_at: datetime | None, since: datetime, now: datetime, settings: Settings) -> bool:
    """Whether a `queued` row's message is gone, by its `sent_at` and the broker's `broker_since`."""
    return (sent_at is None or sent_at < since
            or sent_at < now - timedelta(seconds=visibility_timeout(settings)))


def resend_due(row: ProfileRow, settings: Settings) -> bool:
    """Asked again for an existing row: True when it is `queued` and its message is lost, and then it is taken
    for this caller to send (its `updated_at` refreshed, so a sweeper leaves it alone). False when the broker
    cannot say: then nothing could be sent anyway."""
    if row.status != "queued" or redis_down(settings.redis_url):
        return False
    try:
        since = broker_since(settings)
    except Exception as exc:  # noqa: BLE001 - a down Redis: the sweeper sends it once Redis is back
        note_redis_error(settings.redis_url)
        log.warning("cannot read the broker: %s", exc)
        return False
    now = utcnow()
    if not message_lost(row.sent_at, since, now, settings):
        return False
    row.updated_at = now
    return True


# --- claim, progress and the end of a build (the worker) ---

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
        if row.status == "building":
            redelivered = (last is not None and last.status == "running" and task_id is not None
                           and _task_of(last.worker) == task_id)
            if not redelivered and row.updated_at >= stale_before:
                return "busy"
        if _record_lost(row, attempts, "the worker stopped during this attempt", now):
            session.commit()
            return "failed"
        taken = _rows_updated(session, update(ProfileRow)
                              .where(ProfileRow.id == profile_id, ProfileRow.status == row.status)
                              .values(status="building", started_at=now, finished_at=None, error=None,
                                      updated_at=now, progress={"done": 0, "total": 0, "stage": "starting"}))
        if taken != 1:
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
    """Put the row back to `queued` while a transient error waits out Celery's backoff (Celery's retry holds
    the message: `sent_at` stays)."""
    now = utcnow()
    with session_scope(settings) as session:
        record = _attempt(session, profile_id, attempt)
        if record is not None:
            record.status, record.error, record.finished_at = "retrying", message, now
        row = profile_by_id(session, profile_id)
        if row is not None and row.status == "building":
            row.status, row.updated_at = "queued", now
            row.progress = {"done": 0, "total": 0, "stage": f"retrying after a transient error: {message}"[:500]}


def fail_broken_artifact(session: Session, sha256: str, reason: str) -> list[str]:
    """Mark `failed` every ready profile whose artifact is `sha256` (it is missing or no longer hashes to
    its name); asking for the same profile again rebuilds it in place (`request`). Not scoped to one tenant:
    the file is shared by every profile that names it, and all of them are broken. Returns their ids."""
    rows = list(session.scalars(select(ProfileRow).where(ProfileRow.artifact_sha256 == sha256,
                                                         ProfileRow.status == "ready")))
    now = utcnow()
    for row in rows:
        _set_failed(row, f"{BROKEN_ARTIFACT}: {reason}; request the same profile again to rebuild it", now)
    return [row.id for row in rows]


def artifact_unreferenced(settings: Settings, sha256: str) -> bool:
    with session_scope(settings) as session:
        return profiles_sharing_artifact(session, sha256) == 0


def _rows_updated(session: Session, statement: Update) -> int:
    """Run a conditional UPDATE (the session's objects left as they are) and return how many rows it took."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)


def _attempt(session: Session, profile_id: str, number: int) -> BuildAttempt | None:
    return session.scalar(select(BuildAttempt).where(BuildAttempt.profile_id == profile_id,
                                                     BuildAttempt.attempt == number))


def _set_failed(row: ProfileRow, message: str, now: datetime) -> None:
    row.status, row.error, row.finished_at, row.updated_at = "failed", message, now, now
    progress = dict(row.progress or {})
    progress["stage"] = "failed"
    row.progress = progress


def _record_lost(row: ProfileRow, attempts: list[BuildAttempt], reason: str, now: datetime) -> bool:
    """The lost-attempt rule: an attempt still `running` when its row is taken over was lost with its worker
    (`reason`). After `MAX_LOST_ATTEMPTS` lost attempts the row is failed: returns True then."""
    for attempt in attempts:
        if attempt.status == "running":
            attempt.status, attempt.finished_at, attempt.error = "lost", now, reason
    lost = sum(1 for a in attempts if a.status == "lost")
    if lost < MAX_LOST_ATTEMPTS:
        return False
    _set_failed(row, f"the build was interrupted {lost} times (worker lost); giving up", now)
    return True


# --- the sweeper (every worker) ---

@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)  # stale `building`, sent again
    resent: list[str] = field(default_factory=list)  # stale `queued` whose message was lost, sent again
    failed: list[str] = field(default_factory=list)  # lost too many times
    send_errors: dict[str, str] = field(default_factory=dict)


def sweep_interval(settings: Settings) -> float:
    """How often a worker sweeps: often enough to notice a stale row soon after it becomes stale, and a lost
    queued message within a minute."""
    return float(max(1.0, min(RESEND_QUEUED_AFTER_S, settings.build_stale_after / 3)))


def sweep(settings: Settings, now: datetime | None = None) -> SweepReport:
    """Re-queue stale builds and re-send lost messages; return what was done."""
    now = now or utcnow()
    cutoffs = {"building": now - timedelta(seconds=settings.build_stale_after),
               "queued": now - timedelta(seconds=min(RESEND_QUEUED_AFTER_S, settings.build_stale_after))}
    report = SweepReport()
    to_send: list[tuple[str, str]] = []
    with session_scope(settings) as session:
        stale = session.execute(select(ProfileRow.id, ProfileRow.status, ProfileRow.method, ProfileRow.sent_at).where(
            ((ProfileRow.status == "building") & (ProfileRow.updated_at < cutoffs["building"]))
            | ((ProfileRow.status == "queued") & (ProfileRow.updated_at < cutoffs["queued"])))).all()
        since = _broker_since(settings) if any(s == "queued" for _, s, _, _ in stale) else None
        for profile_id, status, method, sent_at in stale:
            if status == "queued" and (since is None or not message_lost(sent_at, since, now, settings)):
                continue  # its message is waiting (or the broker cannot say: sending would fail too)
            # Conditional: only the sweeper whose update matches takes the row. Until the broker has the new
            # message, the row has none (`sent_at`).
            taken = _rows_updated(session, update(ProfileRow)
                                  .where(ProfileRow.id == profile_id, ProfileRow.status == status,
                                         ProfileRow.updated_at < cutoffs[status])
                                  .values(status="queued", updated_at=now, sent_at=None))
            if taken != 1:
                continue
            if status == "queued":
                report.resent.append(profile_id)
                to_send.append((profile_id, method))
                continue
            row = session.get(ProfileRow, profile_id)
            assert row is not None  # taken above, in this transaction
            reason = f"no heartbeat for {settings.build_stale_after} s: the worker is gone"
            if _record_lost(row, list(row.attempts), reason, now):
                report.failed.append(profile_id)
            else:
                lost = sum(1 for a in row.attempts if a.status == "lost")
                row.progress = {"done": 0, "total": 0, "stage": f"re-queued after a lost worker ({lost} lost)"}
                report.requeued.append(profile_id)
                to_send.append((profile_id, method))
    for profile_id, method in to_send:
        try:
            send(settings, profile_id, method)
        except Exception as exc:  # noqa: BLE001 - the row stays queued; the next sweep sends it again
            report.send_errors[profile_id] = f"{type(exc).__name__}: {exc}"
            log.warning("sweeper: could not send the build of %s: %s", profile_id, exc)
    if report.requeued or report.resent or report.failed:
        log.info("sweeper: re-queued %s, re-sent %s, failed %s",
                 report.requeued, report.resent, report.failed)
    return report


def _broker_since(settings: Settings) -> datetime | None:
    try:
        return broker_since(settings)
    except Exception as exc:  # noqa: BLE001 - Redis down: nothing can be sent now; the next sweep retries
        log.warning("sweeper: cannot read the broker: %s", exc)
        return None

