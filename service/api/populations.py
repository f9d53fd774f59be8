"""Populations: `POST /v1/populations` (202) learns what a tenant's groups share, `GET` one or all,
`POST .../rebuild`, `DELETE`, and `GET .../questions`: the questions a new subject should answer first.
A subject's profile against a ready population is an ordinary profile: `POST /v1/profiles` with method
`population` and `params.population` (`service.api.profiles`). The lifecycle is `service.populations`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, url_for
from sqlalchemy import select

from service import context, populations
from service.api.errors import ApiError, not_found
from service.api.openapi import api_route
from service.api.subjects import build_model, find_subject
from service.auth import tenant_id
from service.protocol import (
    ArtifactRef,
    PopulationCreate,
    PopulationList,
    PopulationOut,
    ProfileCreate,
    Progress,
    QuestionList,
    QuestionsQuery,
    SubjectRef,
    SuggestedQuestion,
)
from service.store import db
from steer_core.data import question_key

log = logging.getLogger(__name__)

bp = Blueprint("populations", __name__)


def population_out(row: db.PopulationRow) -> PopulationOut:
    return PopulationOut(
        id=row.id, name=row.name, model=row.model,
        subjects=[SubjectRef(kind=s["kind"], id=s["id"]) for s in row.subjects],  # type: ignore[arg-type]
        status=row.status, progress=Progress(**row.progress) if row.progress else None, error=row.error,
        questions=len(row.questions) if row.questions is not None else None, report=row.report,
        artifact=ArtifactRef(sha256=row.artifact_sha256, size=row.artifact_size or 0)
        if row.artifact_sha256 else None,
        sample_hash=row.sample_hash, created_at=row.created_at, updated_at=row.updated_at,
        started_at=row.started_at, finished_at=row.finished_at)


def find_population(population_id: str, field: str = "id") -> db.PopulationRow:
    row = db.get_population(context.session(), tenant_id(), population_id)
    if row is None:
        raise not_found(f"population {population_id!r}", field)
    return row


def population_params(session: db.Session, tenant: int, model: str, body: ProfileCreate) -> dict[str, Any]:
    """The params of a profile fitted against a population (`POST /v1/profiles`, method `population`):
    `population` checked (the tenant's, ready, of `model`), and the artifact it will be fitted against
    recorded beside it, so a rebuild of the population later makes a new request, not the same one."""
    unknown = sorted(set(body.params) - {"population"})
    if unknown:
        raise ApiError(422, "validation_error", "a profile fitted against a population takes params.population "
                       "only: its steering, strength and calibration come from the population and the fit",
                       f"params.{unknown[0]}")
    population_id = body.params.get("population")
    if not isinstance(population_id, str):
        raise ApiError(422, "validation_error", "must be the id of one of your populations", "params.population")
    if body.contrast:
        raise ApiError(422, "validation_error", "a profile fitted against a population has no contrast: the "
                       "population holds the other groups", "contrast")
    row = db.get_population(session, tenant, population_id)
    if row is None:
        raise not_found(f"population {population_id!r}", "params.population")
    if row.status != "ready" or row.artifact_sha256 is None:
        raise ApiError(409, "population_not_ready", f"population {population_id!r} is {row.status}; fit against "
                       "it once it is ready", "params.population")
    if row.model != model:
        raise ApiError(422, "validation_error", f"population {population_id!r} was learned on {row.model!r}, "
                       f"not {model!r}", "params.population")
    return {"population": population_id, "population_sha256": row.artifact_sha256}


def _send(row: db.PopulationRow) -> None:
    try:
        populations.send(context.settings(), row.id)
    except Exception as exc:  # the row stays `queued`; POST .../rebuild sends it again
        log.warning("population %s queued but not sent: %s", row.id, exc)


def request_population(body: PopulationCreate) -> PopulationOut:
    """Create the tenant's population of `body` and send its build (the API's POST and the console's form)."""
    tenant = tenant_id()
    settings = context.settings()
    session = context.session()
    model = build_model(body.model, settings)
    if body.subjects is None:
        subjects = [{"kind": "group", "id": gid} for gid in session.scalars(
            select(db.Group.gid).where(db.Group.tenant_id == tenant).order_by(db.Group.gid))]
    else:
        subjects = [{"kind": s.kind, "id": s.id} for s in body.subjects]
    try:
        row = populations.request(session, tenant, body.name, subjects, model)
    except populations.NameTaken:
        raise ApiError(409, "conflict", f"a population named {body.name!r} exists; POST .../rebuild to "
                       "learn it again", "name") from None
    session.commit()  # the worker must see the row before the message arrives
    _send(row)
    return population_out(row)


@api_route(bp, "/v1/populations", "POST", summary="learn a population from the tenant's groups (202; a worker "
           "builds it)", body=PopulationCreate, responses={202: PopulationOut}, errors=(404, 409))
def create_population(body: PopulationCreate) -> tuple[PopulationOut, int, dict[str, str]]:
    out = request_population(body)
    return out, 202, {"Location": url_for("populations.get_population", population_id=out.id)}


@api_route(bp, "/v1/populations", "GET", summary="the tenant's populations, newest first",
           responses={200: PopulationList})
def list_populations() -> PopulationList:
    return PopulationList(populations=tenant_populations())


def tenant_populations() -> list[PopulationOut]:
    rows = context.session().scalars(select(db.PopulationRow).where(db.PopulationRow.tenant_id == tenant_id())
                                     .order_by(db.PopulationRow.created_at.desc(), db.PopulationRow.id))
    return [population_out(r) for r in rows]


@api_route(bp, "/v1/populations/<population_id>", "GET", summary="a population: status, progress, what its "
           "build chose", responses={200: PopulationOut}, errors=(404,))
def get_population(population_id: str) -> PopulationOut:
    return population_out(find_population(population_id))


@api_route(bp, "/v1/populations/<population_id>/rebuild", "POST", summary="learn it again from its subjects' "
           "current answers (202; 200 when nothing changed)", responses={202: PopulationOut, 200: PopulationOut},
           errors=(404,))
def rebuild_population(population_id: str) -> tuple[PopulationOut, int]:
    row = find_population(population_id)
    session = context.session()
    queued = populations.rebuild(session, row, context.settings())
    session.commit()
    if queued:
        _send(row)
    return population_out(row), 202 if queued else 200


@api_route(bp, "/v1/populations/<population_id>", "DELETE", summary="delete a population and its artifact "
           "(profiles fitted against it stay: they carry what they use)", responses={204: None}, errors=(404,))
def delete_population(population_id: str) -> tuple[None, int]:
    row = find_population(population_id)
    session = context.session()
    sha = row.artifact_sha256
    session.delete(row)
    session.commit()  # the row goes first: a file without a row is garbage, a row without a file an error
    if sha is not None and populations.artifact_unreferenced(session, sha):
        context.artifact_store().delete(sha)  # a subject build still queued against it fails, saying so
    return None, 204


@api_route(bp, "/v1/populations/<population_id>/questions", "GET", summary="the questions a new subject should "
           "answer first (most informative first)", query=QuestionsQuery, responses={200: QuestionList},
           errors=(404, 409))
def suggest_questions(population_id: str, query: QuestionsQuery) -> QuestionList:
    if (query.subject_kind is None) != (query.subject_id is None):
        raise ApiError(422, "validation_error", "give subject_kind and subject_id together", "subject_kind")
    subject = None if query.subject_kind is None or query.subject_id is None else (query.subject_kind,
                                                                                   query.subject_id)
    return QuestionList(population=population_id, questions=next_questions(population_id, query.k, subject))


def next_questions(population_id: str, k: int, subject: tuple[str, str] | None = None) -> list[SuggestedQuestion]:
    """The `k` questions of the population a new subject should answer first, leaving out those `subject`
    (kind, id) answered: the order its build ranked them in (where its groups are predicted to disagree most)."""
    tenant = tenant_id()
    session = context.session()
    row = find_population(population_id)
    if row.status != "ready" or row.report is None or row.questions is None:
        raise ApiError(409, "population_not_ready", f"population {population_id!r} is {row.status}", "id")
    answered: set[tuple[str, tuple[str, ...]]] = set()
    if subject is not None:
        found = find_subject(session, tenant, subject[0], subject[1], "subject_id")
        answered = {question_key(it) for it in db.subject_items(session, tenant, subject[0], found.id)}
    # The questions as the population's first subject holds them (every subject answered each of them).
    first = row.subjects[0]
    holder = db.get_subject(session, tenant, first["kind"], first["id"])
    if holder is None:
        raise ApiError(409, "population_stale", f"its subject {first['kind']} {first['id']!r} was deleted; "
                       "rebuild it from its remaining subjects", "id")
    by_id = {it.id: it for it in db.subject_items(session, tenant, first["kind"], holder.id)}
    out: list[SuggestedQuestion] = []
    for index in row.report.get("question_order", []):
        item = by_id.get(row.questions[index]) if index < len(row.questions) else None
        if item is None or question_key(item) in answered:
            continue
        out.append(SuggestedQuestion(id=str(item.id), question=item.question, options=list(item.options),
                                     ordinal=list(item.ordinal)))
        if len(out) == k:
            break
    return out
