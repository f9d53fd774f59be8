"""The sweeper: no profile stays `building` or `queued` forever.

A build's heartbeat (`updated_at`, refreshed while it runs) older than `build_stale_after` means its
worker is gone (SIGKILL, lost machine): the row goes back to `queued` and its build is sent again, or,
after `MAX_LOST_ATTEMPTS` lost attempts, it is `failed` with that reason. A `queued` row older than
`RESEND_QUEUED_AFTER_S` whose message is not in the broker (Redis flushed or restarted, an enqueue while
it was down) is sent again: with a sweep at least every `RESEND_QUEUED_AFTER_S`, within a minute. Every
worker sweeps once when it starts and then every few seconds; rows are taken with a conditional update,
so two sweepers never re-queue the same row twice, and a duplicate message is harmless (see `claim`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update

from service.queue import RESEND_QUEUED_AFTER_S
from service.settings import Settings
from service.store.db import BuildAttempt, ProfileRow, session_scope, utcnow
from worker.build_state import MAX_LOST_ATTEMPTS

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str, Settings], None]
PendingBuilds = Callable[[Settings], set[str]]


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)  # stale `building`, sent again
    resent: list[str] = field(default_factory=list)  # stale `queued`, sent again
    failed: list[str] = field(default_factory=list)  # lost too many times
    send_errors: dict[str, str] = field(default_factory=dict)


def sweep_interval(settings: Settings) -> float:
    """How often a worker sweeps: often enough to notice a stale row soon after it becomes stale, and a lost
    queued message within a minute."""
    return float(max(1.0, min(RESEND_QUEUED_AFTER_S, settings.build_stale_after / 3)))


def sweep(settings: Settings, now: datetime | None = None, enqueue: Enqueue | None = None,
          pending: PendingBuilds | None = None) -> SweepReport:
    """Re-queue stale builds and re-send lost messages; return what was done."""
    if enqueue is None:
        from service.queue import enqueue_build as enqueue
    if pending is None:
        from service.queue import pending_builds as pending
    now = now or utcnow()
    cutoffs = {"building": now - timedelta(seconds=settings.build_stale_after),
               "queued": now - timedelta(seconds=min(RESEND_QUEUED_AFTER_S, settings.build_stale_after))}
    report = SweepReport()
    to_send: list[tuple[str, str]] = []
    with session_scope(settings) as session:
        stale = session.execute(select(ProfileRow.id, ProfileRow.status, ProfileRow.method).where(
            ((ProfileRow.status == "building") & (ProfileRow.updated_at < cutoffs["building"]))
            | ((ProfileRow.status == "queued") & (ProfileRow.updated_at < cutoffs["queued"])))).all()
        in_broker = _in_broker(settings, pending) if any(s == "queued" for _, s, _ in stale) else set()
        for profile_id, status, method in stale:
            if status == "queued" and (in_broker is None or profile_id in in_broker):
                continue  # its message is waiting (or the broker cannot say: sending would fail too)
            # Conditional: only the sweeper whose update matches takes the row.
            taken = session.execute(
                update(ProfileRow).where(ProfileRow.id == profile_id, ProfileRow.status == status,
                                         ProfileRow.updated_at < cutoffs[status])
                .values(status="queued", updated_at=now).execution_options(synchronize_session=False))
            if taken.rowcount != 1:
                continue
            if status == "queued":
                report.resent.append(profile_id)
                to_send.append((profile_id, method))
                continue
            attempts = list(session.scalars(
                select(BuildAttempt).where(BuildAttempt.profile_id == profile_id)))
            for attempt in attempts:
                if attempt.status == "running":
                    attempt.status, attempt.finished_at = "lost", now
                    attempt.error = f"no heartbeat for {settings.build_stale_after} s: the worker is gone"
            lost = sum(1 for a in attempts if a.status == "lost")
            row = session.get(ProfileRow, profile_id)
            if lost >= MAX_LOST_ATTEMPTS:
                row.status, row.finished_at = "failed", now
                row.error = f"the build was interrupted {lost} times (worker lost); giving up"
                row.progress = {**(row.progress or {}), "stage": "failed"}
                report.failed.append(profile_id)
            else:
                row.progress = {"done": 0, "total": 0,
                                "stage": f"re-queued after a lost worker ({lost} lost)"}
                report.requeued.append(profile_id)
                to_send.append((profile_id, method))
    for profile_id, method in to_send:
        try:
            enqueue(profile_id, method, settings)
        except Exception as exc:  # noqa: BLE001 - the row stays queued; the next sweep sends it again
            report.send_errors[profile_id] = f"{type(exc).__name__}: {exc}"
            log.warning("sweeper: could not send the build of %s: %s", profile_id, exc)
    if report.requeued or report.resent or report.failed:
        log.info("sweeper: re-queued %s, re-sent %s, failed %s",
                 report.requeued, report.resent, report.failed)
    return report


def _in_broker(settings: Settings, pending: PendingBuilds) -> set[str] | None:
    try:
        return pending(settings)
    except Exception as exc:  # noqa: BLE001 - Redis down: nothing can be sent now; the next sweep retries
        log.warning("sweeper: cannot read the broker's queues: %s", exc)
        return None
