"""The offline comparison of an experiment's variants: each variant's answer distributions on opinion items
of the experiment's scope group, scored against the group's distributions.

It runs the model, so it is a worker task (`service.queue.OFFLINE_TASK`) whose result is stored in the
database (`db.OfflineComparisonRow`); `GET /v1/experiments/{id}/results` asks for it and reads it back,
and never loads or runs a model itself.

Which items: the scope group's items whose question is in no compared profile's sample. A profile's
sample is taken as its subject's current items, a superset of what it was fitted on (opinions are
added or replaced, never removed), so "held-out" is never claimed for an item a profile saw. When every
scope item is in some compared profile's sample, all of them are scored and the comparison says
"in-sample": such scores flatter the profiles that were fitted on them.

A row is keyed by `inputs_sha256`: the model, the items and each variant's blend with its profiles'
artifact digests. Asking again with the same inputs reads the same row; new opinions, a rebuilt profile
or new weights ask for a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.protocol import Gain, OfflineComparison, OfflineScores
from service.store import db
from steer_core.data import OpinionItem, sample_hash

log = logging.getLogger(__name__)

Evaluation = Literal["held-out", "in-sample"]
# (items, blend as [(profile row, weight)]) -> one answer distribution per item.
Scorer = Callable[[Sequence[OpinionItem], Sequence[tuple[db.ProfileRow, float]]], list[np.ndarray]]


@dataclass(frozen=True)
class OfflineResult:
    """The comparison's summary and each variant's scores (by name); `scores` is empty while unavailable."""

    comparison: OfflineComparison
    scores: dict[str, OfflineScores]


@dataclass(frozen=True)
class Inputs:
    """What one offline comparison scores."""

    items: list[OpinionItem]
    evaluation: Evaluation
    blends: dict[str, list[tuple[db.ProfileRow, float]]]  # variant name -> [(ready profile, weight)]
    sha256: str


def unavailable(detail: str, status: db.ComparisonStatus | Literal["none"] = "none", items: int = 0) -> OfflineResult:
    return OfflineResult(OfflineComparison(available=False, status=status, detail=detail, items=items,
                                           evaluation=None, sample_hash=None), {})


def _question(item: OpinionItem) -> tuple[str, tuple[str, ...]]:
    return item.question, tuple(item.options)


def inputs(session: Session, exp: db.Experiment, model: str) -> Inputs | str:
    """The inputs of `exp`'s offline comparison, or why there are none (a string)."""
    if exp.scope_group_id is None:
        return "the experiment has no scope group"
    scope = db.subject_items(session, exp.tenant_id, "group", exp.scope_group_id)
    if not scope:
        return "the scope group has no opinion items"
    blends: dict[str, list[tuple[db.ProfileRow, float]]] = {}
    fitted: set[tuple[str, tuple[str, ...]]] = set()
    samples: dict[tuple[str, int], list[OpinionItem]] = {}
    for variant in exp.variants:
        blend = []
        for ref in variant.profiles:
            row = db.get_profile(session, exp.tenant_id, str(ref["id"]))
            if row is None or row.status != "ready" or row.artifact_sha256 is None:
                return f"profile {ref['id']} of variant {variant.name!r} is no longer ready"
            if row.model != model:
                return f"profile {row.id} was built for model {row.model!r}; the workers serve {model!r}"
            subject = (row.subject_kind, row.subject_id)
            if subject not in samples:
                samples[subject] = db.subject_items(session, exp.tenant_id, *subject)
                fitted.update(_question(it) for it in samples[subject])
            blend.append((row, float(ref["weight"])))
        blends[variant.name] = blend
    held_out = [it for it in scope if _question(it) not in fitted]
    evaluation: Evaluation
    items, evaluation = (held_out, "held-out") if held_out else (list(scope), "in-sample")
    key = {"model": model, "items": sample_hash(items), "evaluation": evaluation,
           "variants": [[name, [[row.id, w, row.artifact_sha256] for row, w in blend]]
                        for name, blend in blends.items()]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Inputs(items, evaluation, blends, digest)


def request(session: Session, exp: db.Experiment, digest: str, stale_after: float,
            now: datetime | None = None) -> tuple[db.OfflineComparisonRow, bool]:
    """The stored comparison of these inputs, created `queued` when new. Returns (row, needs_send): a new
    row, and a queued or running one untouched for `stale_after` seconds (its message or its worker was
    lost), need a message; the caller commits, then sends."""
    now = now or db.utcnow()
    query = select(db.OfflineComparisonRow).where(db.OfflineComparisonRow.tenant_id == exp.tenant_id,
                                                  db.OfflineComparisonRow.experiment_id == exp.id,
                                                  db.OfflineComparisonRow.inputs_sha256 == digest)
    row = session.scalar(query)
    if row is None:
        row = db.OfflineComparisonRow(tenant_id=exp.tenant_id, experiment_id=exp.id, inputs_sha256=digest,
                                      status="queued")
        try:
            with session.begin_nested():
                session.add(row)
            return row, True
        except IntegrityError:  # a concurrent request created it first
            row = session.scalar(query)
            if row is None:
                raise
    if row.status in ("queued", "running") and row.updated_at < now - timedelta(seconds=stale_after):
        row.status, row.updated_at = "queued", now
        return row, True
    return row, False


def view(row: db.OfflineComparisonRow, items: int) -> OfflineResult:
    """What the results endpoint shows of a stored comparison."""
    if row.status == "ready" and row.result is not None:
        return OfflineResult(OfflineComparison.model_validate(row.result["comparison"]),
                             {name: OfflineScores.model_validate(s) for name, s in row.result["scores"].items()})
    if row.status == "failed":
        return unavailable(f"the offline comparison failed: {row.error}", "failed", items)
    return unavailable(f"the offline comparison of {items} items is {row.status} on a worker; ask again for "
                       "its result", row.status, items)


# ------------------------------------------------------------------------------------ the worker's side

def comparison_by_id(session: Session, comparison_id: str) -> db.OfflineComparisonRow | None:
    """A comparison by id without a tenant (worker tasks only: the message carries the id)."""
    return session.get(db.OfflineComparisonRow, comparison_id)


def claim(session: Session, comparison_id: str, stale_after: float) -> db.OfflineComparisonRow | str:
    """Take a queued comparison (or a running one whose worker went quiet) for this task; otherwise say
    why not: "missing", "ready", "failed" or "running"."""
    now = db.utcnow()
    taken = session.execute(
        update(db.OfflineComparisonRow)
        .where(db.OfflineComparisonRow.id == comparison_id,
               (db.OfflineComparisonRow.status == "queued")
               | ((db.OfflineComparisonRow.status == "running")
                  & (db.OfflineComparisonRow.updated_at < now - timedelta(seconds=stale_after))))
        .values(status="running", updated_at=now).execution_options(synchronize_session=False))
    row = comparison_by_id(session, comparison_id)
    if row is None:
        return "missing"
    # SQLAlchemy types an ORM UPDATE's result as Result; it is a CursorResult, which has `rowcount`.
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return row.status
    session.refresh(row)
    return row


def compute(session: Session, row: db.OfflineComparisonRow, model: str, scorer: Scorer) -> OfflineResult:
    """Score every variant of the row's experiment on the row's inputs. Raises `ValueError` when the inputs
    are no longer what the row was asked for (the next results request asks for a new row)."""
    exp = session.scalar(select(db.Experiment).where(db.Experiment.id == row.experiment_id,
                                                     db.Experiment.tenant_id == row.tenant_id))
    if exp is None:
        raise ValueError("the experiment was deleted")
    found = inputs(session, exp, model)
    if isinstance(found, str):
        raise ValueError(found)
    if found.sha256 != row.inputs_sha256:
        raise ValueError("the experiment's items or profiles changed before the comparison ran; ask for the "
                         "results again")
    return score(found, scorer)


def score(found: Inputs, scorer: Scorer) -> OfflineResult:
    """Each variant's mean alignment, total variation and KL on the inputs' items, under its blend (with its
    profiles' calibration), and its alignment gains over the unsteered, uniform and calibrated baselines."""
    from steer_core.calibration import sample_alignment
    from steer_core.evaluation import baseline_alignments, paired_difference, uniform_distributions
    from steer_core.folds import MIN_HELDOUT, MIN_TRAIN
    from steer_core.metrics import summarize

    def gain(after: np.ndarray, before: np.ndarray) -> Gain:
        d = paired_difference(after, before)
        return Gain(mean=d.mean, standard_error=None if np.isnan(d.standard_error) else d.standard_error)

    items = found.items
    unsteered = scorer(items, [])
    enough = len(items) >= MIN_HELDOUT + MIN_TRAIN  # the calibrated baseline is fitted out of fold
    if enough:
        baselines = baseline_alignments(items, unsteered)
    else:
        baselines = {"unsteered": sample_alignment(items, unsteered),
                     "uniform": sample_alignment(items, uniform_distributions(items))}
    scores: dict[str, OfflineScores] = {}
    for name, blend in found.blends.items():
        dists = scorer(items, blend) if blend else unsteered
        m, aligned = summarize(items, dists), sample_alignment(items, dists)
        scores[name] = OfflineScores(
            alignment=m["alignment"], total_variation=m["total_variation"], kl=m["kl"],
            gain_vs_unsteered=gain(aligned, baselines["unsteered"]),
            gain_vs_uniform=gain(aligned, baselines["uniform"]),
            gain_vs_calibrated=gain(aligned, baselines["calibrated"]) if enough else None)
    detail = (f"{len(found.items)} {found.evaluation} opinion items of the scope group"
              + (" (in no compared profile's sample)" if found.evaluation == "held-out" else
                 " (every scope item is in a compared profile's sample: these scores flatter those profiles)"))
    return OfflineResult(OfflineComparison(available=True, status="ready", detail=detail, items=len(found.items),
                                           evaluation=found.evaluation, sample_hash=sample_hash(found.items)),
                         scores)


def store(session: Session, row: db.OfflineComparisonRow, result: OfflineResult | None,
          error: str | None = None) -> None:
    """Record the task's outcome: the result (`ready`) or the error (`failed`)."""
    now = db.utcnow()
    if result is not None:
        row.status, row.error = "ready", None
        row.result = result_json(result)
    else:
        row.status, row.error = "failed", (error or "unknown error")[:1000]
    row.updated_at = row.finished_at = now


def result_json(result: OfflineResult) -> dict[str, Any]:
    """The stored form of a result (what `view` reads back)."""
    return {"comparison": result.comparison.model_dump(mode="json"),
            "scores": {name: s.model_dump(mode="json") for name, s in result.scores.items()}}
