"""Experiments (A/B tests between blends of profiles).

- `POST /v1/experiments` (201), `GET /v1/experiments` (a page), `GET /v1/experiments/{id}`,
  `PATCH /v1/experiments/{id}` (traffic weights, end time; assigned users keep their variant)
- `POST /v1/experiments/{id}/pause`, `.../resume`, `.../stop` (stop is final)
- `POST /v1/experiments/{id}/assign` (the variant of a user, for clients that steer by themselves)
- `POST /v1/experiments/{id}/feedback` (201 new, 200 replaced: one reward per response id)
- `GET /v1/experiments/{id}/results` (statistics and the stored offline comparison), `GET .../results.png`

Chat requests take part with `steering: {"experiment": id}` and a `user` (see `service.api.chat`).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, url_for

from service import context
from service.api.openapi import api_route
from service.auth import tenant_id
from service.experiments import experiments as ex
from service.experiments import offline_comparison as offline
from service.protocol import (
    AssignIn,
    AssignmentOut,
    ExperimentCreate,
    ExperimentList,
    ExperimentListQuery,
    ExperimentOut,
    ExperimentPatch,
    ExperimentResults,
    FeedbackIn,
    FeedbackOut,
    ResultsQuery,
)

log = logging.getLogger(__name__)

bp = Blueprint("experiments", __name__)



def _get(experiment_id: str) -> Any:
    return ex.require_experiment(context.session(), tenant_id(), experiment_id)


@api_route(bp, "/v1/experiments", "POST", summary="create an A/B experiment between blends of ready profiles",
           body=ExperimentCreate, responses={201: ExperimentOut}, errors=(404, 409))
def create_experiment(body: ExperimentCreate) -> tuple[ExperimentOut, int, dict[str, str]]:
    settings = context.settings()
    session = context.session()
    exp = ex.create_experiment(session, tenant_id(), body, model=settings.model,
                               max_profiles=settings.max_profiles_per_request)
    location = url_for("experiments.get_experiment", experiment_id=exp.id)
    return ex.experiment_view(session, exp), 201, {"Location": location}


@api_route(bp, "/v1/experiments", "GET", summary="the tenant's experiments, newest first",
           query=ExperimentListQuery, responses={200: ExperimentList}, errors=(404,))
def list_experiments(query: ExperimentListQuery) -> ExperimentList:
    session = context.session()
    rows = ex.list_experiments(session, tenant_id(), query.limit + 1, query.after)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return ExperimentList(experiments=[ex.experiment_view(session, e) for e in rows],
                          next_after=rows[-1].id if more else None)


@api_route(bp, "/v1/experiments/<experiment_id>", "GET", summary="an experiment: variants, weights, state",
           responses={200: ExperimentOut}, errors=(404,))
def get_experiment(experiment_id: str) -> ExperimentOut:
    return ex.experiment_view(context.session(), _get(experiment_id))


@api_route(bp, "/v1/experiments/<experiment_id>", "PATCH", summary="change traffic weights or the end time "
           "(users already assigned keep their variant)", body=ExperimentPatch, responses={200: ExperimentOut},
           errors=(404, 409))
def patch_experiment(experiment_id: str, body: ExperimentPatch) -> ExperimentOut:
    exp = _get(experiment_id)
    ex.update_experiment(exp, body.weights, body.ends_at)
    return ex.experiment_view(context.session(), exp)


def _transition(experiment_id: str, action: str) -> ExperimentOut:
    exp = _get(experiment_id)
    ex.transition(exp, action)
    return ex.experiment_view(context.session(), exp)


@api_route(bp, "/v1/experiments/<experiment_id>/pause", "POST", summary="pause: every request gets the "
           "control and nothing is recorded until resumed", responses={200: ExperimentOut}, errors=(404, 409))
def pause_experiment(experiment_id: str) -> ExperimentOut:
    return _transition(experiment_id, "pause")


@api_route(bp, "/v1/experiments/<experiment_id>/resume", "POST", summary="resume a paused experiment",
           responses={200: ExperimentOut}, errors=(404, 409))
def resume_experiment(experiment_id: str) -> ExperimentOut:
    return _transition(experiment_id, "resume")


@api_route(bp, "/v1/experiments/<experiment_id>/stop", "POST", summary="stop for good: the control is served, "
           "feedback on earlier responses is still taken", responses={200: ExperimentOut}, errors=(404,))
def stop_experiment(experiment_id: str) -> ExperimentOut:
    return _transition(experiment_id, "stop")


@api_route(bp, "/v1/experiments/<experiment_id>/assign", "POST", summary="the variant of a user (stored at the "
           "first assignment while the experiment runs)", body=AssignIn, responses={200: AssignmentOut},
           errors=(404,))
def assign_user(experiment_id: str, body: AssignIn) -> AssignmentOut:
    exp = _get(experiment_id)
    variant, live = ex.assign(context.session(), exp, body.user)
    return AssignmentOut(experiment_id=exp.id, user=body.user, variant=variant.name,
                         profiles=ex.profile_refs(variant), live=live)


@api_route(bp, "/v1/experiments/<experiment_id>/feedback", "POST", summary="the reward of one response "
           "(201; posting again for the same response replaces it: 200)", body=FeedbackIn,
           responses={201: FeedbackOut, 200: FeedbackOut}, errors=(404,))
def post_feedback(experiment_id: str, body: FeedbackIn) -> tuple[FeedbackOut, int]:
    exp = _get(experiment_id)
    session = context.session()
    row, exposure, created = ex.record_feedback(session, exp, body)
    session.flush()
    variant = next(v.name for v in exp.variants if v.id == row.variant_id)
    return FeedbackOut(experiment_id=exp.id, response_id=exposure.response_id, variant=variant, user=exposure.uid,
                       kind=row.kind, reward=row.reward, created=created, created_at=row.created_at,
                       updated_at=row.updated_at), 201 if created else 200


@api_route(bp, "/v1/experiments/<experiment_id>/results", "GET", summary="per variant: exposures, feedback, mean "
           "reward with a 95% interval, difference to the control with a p-value; the offline comparison on the "
           "scope's opinion items (computed by a worker, read back once stored)", query=ResultsQuery,
           responses={200: ExperimentResults}, errors=(404,))
def get_results(experiment_id: str, query: ResultsQuery) -> ExperimentResults:
    exp = _get(experiment_id)
    session = context.session()
    comparison = offline_result(exp) if query.offline else offline.unavailable("not requested (offline=false)")
    return ex.experiment_results(session, exp, comparison)


@api_route(bp, "/v1/experiments/<experiment_id>/results.png", "GET", summary="a plot of each variant's mean "
           "reward with its 95% interval", responses={200: "image/png"}, errors=(404,))
def get_results_png(experiment_id: str) -> Response:
    png = ex.results_png(context.session(), _get(experiment_id))
    response = current_app.response_class(png, mimetype="image/png")
    response.headers["Cache-Control"] = "no-store"  # results change with every feedback
    return response


# ------------------------------------------------------------------------------------ offline comparison

def offline_result(exp: Any) -> offline.OfflineResult:
    """The stored offline comparison of `exp`'s variants, asked of a worker when there is none for the current
    inputs. Never loads or runs a model here."""
    settings = context.settings()
    session = context.session()
    found = offline.inputs(session, exp, settings.model)
    if isinstance(found, str):
        return offline.unavailable(found)
    row, send = offline.request(session, exp, found.sha256, settings.build_stale_after)
    if send:
        session.commit()  # the worker must see the row before the message arrives
        from service.queue import enqueue_offline_comparison

        try:
            enqueue_offline_comparison(row.id, settings)
        except Exception as exc:  # the row stays queued: a later results request sends it again
            log.warning("offline comparison %s queued but not sent: %s", row.id, exc)
    return offline.view(row, len(found.items))
