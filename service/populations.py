"""A population's life in the service: the API requests it, a worker learns it, subject profiles use it.

    request ──> queued ──send──> claim ──> building ──finish──> ready ──rebuild (new answers)──> queued
                  ^                           └──fail──> failed ──rebuild──┘
                  └── rebuild of a `building` row whose heartbeat is older than `build_stale_after`

- `shared_sample` gathers the subjects' answers to the questions all of them answered (the same text and
  options, `steer_core.data.question_key`), in one order for all; a subject that shares none is refused,
  naming it. What a population learns from is that sample: its hash names the population's build, so a
  rebuild on unchanged answers is a no-op.
- `request` creates the row `queued`; `rebuild` puts a ready, failed or lost row back to `queued` when the
  answers changed (or it failed, or its worker is gone); `send` hands the task to the broker.
- `claim` (worker): moves `queued` (or a stale `building`) to `building` in one conditional update, so two
  deliveries of one message never both run; `report_progress` refreshes the heartbeat; `finish` and `fail`
  end it. A worker that dies leaves the row `building`; a rebuild request takes it over once its heartbeat is
  stale (there is no sweeper for populations: a population is built on request, rarely).
- `load` reads the population a subject's profile was requested against (the worker).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.queue import enqueue_population
from service.settings import Settings
from service.store import db
from service.store.artifacts import ArtifactStore
from steer_core.data import OpinionItem, question_key, sample_hash, shared_questions
from steer_core.errors import SteerError

if TYPE_CHECKING:
    from steer_core.population import Population

log = logging.getLogger(__name__)

# Fewer shared questions than this teach a population nothing a subject's own calibration does not.
MIN_SHARED_QUESTIONS = 10
MIN_SUBJECTS = 2  # steer_core.population.MIN_GROUPS (that module imports torch; the API must not)
MAX_SUBJECTS = 200


class NameTaken(Exception):
    """The tenant already has a population of this name."""


@dataclass(frozen=True)
class Sample:
    """The subjects' answers to their shared questions: `items[name][i]` is question `questions[i]`."""

    items: dict[str, list[OpinionItem]]
    questions: list[str]  # item ids (the first subject's) in the order of `items`

    @property
    def hash(self) -> str:
        payload = json.dumps({name: sample_hash(items) for name, items in self.items.items()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def subject_label(subject: dict[str, str]) -> str:
    return f"{subject['kind']}:{subject['id']}"


def shared_sample(session: Session, tenant_id: int, subjects: list[dict[str, str]]) -> Sample:
    """Each subject's items on the questions every subject answered, in the first subject's order. Raises a
    `SteerError` naming `subjects[i]` for a subject that is missing, answered nothing, or shares too little."""
    if len(subjects) < MIN_SUBJECTS:
        raise SteerError(f"a population needs at least {MIN_SUBJECTS} subjects, got {len(subjects)}", "subjects")
    if len(subjects) > MAX_SUBJECTS:
        raise SteerError(f"at most {MAX_SUBJECTS} subjects", "subjects")
    per_subject: dict[str, list[OpinionItem]] = {}
    for i, subject in enumerate(subjects):
        label = subject_label(subject)
        if label in per_subject:
            raise SteerError(f"{label} is listed twice", f"subjects[{i}]")
        row = db.get_subject(session, tenant_id, subject["kind"], subject["id"])
        if row is None:
            raise SteerError(f"{subject['kind']} {subject['id']!r} not found", f"subjects[{i}]")
        per_subject[label] = db.subject_items(session, tenant_id, subject["kind"], row.id)
        if not per_subject[label]:
            raise SteerError(f"{label} has no opinions; POST some first", f"subjects[{i}]")
    index = {label: i for i, label in enumerate(per_subject)}
    try:
        aligned = shared_questions(per_subject)
    except SteerError as exc:
        raise SteerError(exc.message, f"subjects[{index[str(exc.field)]}]") from None
    first = list(aligned.values())[0]
    if len(first) < MIN_SHARED_QUESTIONS:
        # Name the subject that shares the fewest questions with the first one: the likeliest culprit.
        keys = {question_key(it) for it in per_subject[subject_label(subjects[0])]}
        overlap = {label: sum(question_key(it) in keys for it in items) for label, items in per_subject.items()}
        worst = min(list(per_subject)[1:], key=lambda label: overlap[label])
        raise SteerError(f"the subjects share {len(first)} questions (same text and options); a population "
                         f"needs at least {MIN_SHARED_QUESTIONS}; {worst} shares {overlap[worst]} with "
                         f"{subject_label(subjects[0])}", f"subjects[{index[worst]}]")
    return Sample(items=aligned, questions=[str(it.id or i) for i, it in enumerate(first)])


def request(session: Session, tenant_id: int, name: str, subjects: list[dict[str, str]],
            model: str) -> db.PopulationRow:
    """A new `queued` population (the caller commits, then `send`s). Raises `SteerError` on bad subjects and
    `NameTaken` when the tenant already has a population of this name."""
    if session.scalar(select(db.PopulationRow).where(db.PopulationRow.tenant_id == tenant_id,
                                                        db.PopulationRow.name == name)) is not None:
        raise NameTaken(name)
    sample = shared_sample(session, tenant_id, subjects)
    row = db.PopulationRow(tenant_id=tenant_id, name=name, model=model, subjects=subjects, sample_hash=sample.hash,
                           status="queued", progress={"done": 0, "total": 0, "stage": "queued"})
    session.add(row)
    session.flush()
    return row


def rebuild(session: Session, row: db.PopulationRow, settings: Settings, now: datetime | None = None) -> bool:
    """Put `row` back to `queued` when there is something to do: its subjects' answers changed, it failed, or
    its build was lost (queued, or building with a stale heartbeat). Returns whether it needs a send."""
    now = now or db.utcnow()
    sample = shared_sample(session, row.tenant_id, row.subjects)
    stale = row.updated_at < now - timedelta(seconds=settings.build_stale_after)
    if row.status == "building" and not stale:
        return False
    if row.status == "ready" and sample.hash == row.sample_hash:
        return False
    row.sample_hash = sample.hash
    row.status, row.error, row.started_at, row.finished_at = "queued", None, None, None
    row.progress = {"done": 0, "total": 0, "stage": "queued"}
    return True


def send(settings: Settings, population_id: str) -> None:
    """Send the build of `population_id` (its row committed). Raises `BrokerUnavailable`: the row stays
    `queued` and a rebuild request sends it again."""
    enqueue_population(population_id, settings)


@dataclass(frozen=True)
class Claim:
    population_id: str
    model: str
    sample_hash: str
    sample: Sample


def claim(settings: Settings, population_id: str, now: datetime | None = None) -> Claim | str:
    """Take the build of `population_id`, or say why not: `missing`, `ready`, `failed` or `busy`."""
    now = now or db.utcnow()
    with db.session_scope(settings) as session:
        row = session.get(db.PopulationRow, population_id)
        if row is None:
            return "missing"
        if row.status in ("ready", "failed"):
            return row.status
        stale = row.updated_at < now - timedelta(seconds=settings.build_stale_after)
        if row.status == "building" and not stale:
            return "busy"
        taken = session.execute(
            update(db.PopulationRow).where(db.PopulationRow.id == population_id,
                                           db.PopulationRow.status == row.status,
                                           db.PopulationRow.updated_at == row.updated_at)
            .values(status="building", started_at=now, updated_at=now, error=None,
                    progress={"done": 0, "total": 0, "stage": "starting"})
            .execution_options(synchronize_session=False))
        if getattr(taken, "rowcount", 0) != 1:
            return "busy"
        sample = shared_sample(session, row.tenant_id, row.subjects)
        return Claim(population_id=population_id, model=row.model, sample_hash=row.sample_hash, sample=sample)


def report_progress(settings: Settings, population_id: str, done: int, total: int, stage: str) -> None:
    """Write `progress` (and refresh the heartbeat) while the row is `building`."""
    with db.session_scope(settings) as session:
        session.execute(update(db.PopulationRow)
                        .where(db.PopulationRow.id == population_id, db.PopulationRow.status == "building")
                        .values(progress={"done": int(done), "total": int(total), "stage": stage},
                                updated_at=db.utcnow())
                        .execution_options(synchronize_session=False))


def heartbeat(settings: Settings, population_id: str) -> None:
    with db.session_scope(settings) as session:
        session.execute(update(db.PopulationRow)
                        .where(db.PopulationRow.id == population_id, db.PopulationRow.status == "building")
                        .values(updated_at=db.utcnow()).execution_options(synchronize_session=False))


def finish(settings: Settings, claimed: Claim, sha256: str, size: int, report: dict[str, Any]) -> bool:
    """Mark the population `ready` with its artifact; False when the row was deleted or its answers changed
    (and so re-queued) while it was building."""
    now = db.utcnow()
    with db.session_scope(settings) as session:
        row = session.get(db.PopulationRow, claimed.population_id)
        if row is None or row.status != "building" or row.sample_hash != claimed.sample_hash:
            return False
        row.status, row.error, row.finished_at = "ready", None, now
        row.artifact_sha256, row.artifact_size = sha256, size
        row.report, row.questions = report, claimed.sample.questions
        total = int((row.progress or {}).get("total") or 1)
        row.progress = {"done": total, "total": total, "stage": "done"}
        return True


def requeue(settings: Settings, population_id: str) -> None:
    """Hand a `building` row back to `queued` (a transient error: Celery retries the message)."""
    try:
        with db.session_scope(settings) as session:
            session.execute(update(db.PopulationRow)
                            .where(db.PopulationRow.id == population_id, db.PopulationRow.status == "building")
                            .values(status="queued", updated_at=db.utcnow())
                            .execution_options(synchronize_session=False))
    except Exception as exc:  # noqa: BLE001 - left `building`, its heartbeat goes stale and a rebuild takes it
        log.warning("could not hand back population %s: %s", population_id, exc)


def fail(settings: Settings, population_id: str, message: str) -> None:
    with db.session_scope(settings) as session:
        row = session.get(db.PopulationRow, population_id)
        if row is not None and row.status in ("queued", "building"):
            row.status, row.error, row.finished_at = "failed", message[:2000], db.utcnow()


def load(settings: Settings, sha256: str) -> Population:
    """The population a subject's profile was requested against, by the artifact `sha256` the API recorded
    in the request's params after checking the tenant's row (so a rebuild since then does not change what the
    request meant). Raises `SteerError` naming `params.population` when the artifact is gone."""
    from steer_core.population import Population

    store = ArtifactStore(settings.artifact_dir)
    if not store.exists(sha256):
        raise SteerError("the population this profile was requested against is gone (deleted, or rebuilt and "
                         "its earlier version removed); request the profile again", "params.population")
    return Population.from_bytes(store.get(sha256), source="params.population")


def artifact_unreferenced(session: Session, sha256: str) -> bool:
    """No population row names this artifact any more (it may be deleted from the store)."""
    return session.scalar(select(func.count()).select_from(db.PopulationRow)
                          .where(db.PopulationRow.artifact_sha256 == sha256)) == 0
