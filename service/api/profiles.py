"""Profiles: `POST /v1/profiles` (202, idempotent), `GET` one or a page, `DELETE`, `GET .../artifact`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, url_for
from sqlalchemy import func, select

from service import context
from service.api.errors import ApiError, not_found
from service.api.openapi import api_route
from service.api.populations import population_params
from service.api.subjects import build_model, find_subject
from service.auth import tenant_id
from service.engine.client import EngineUnavailable, engine_client
from service.protocol import (
    ArtifactQuery,
    ArtifactRef,
    Estimate,
    ProfileCreate,
    ProfileImport,
    ProfileList,
    ProfileListQuery,
    ProfileOut,
    ProfileVerdict,
    Progress,
    SubjectRef,
)
from service.store import db
from steer_core.data import OpinionItem, question_key
from steer_core.errors import SteerError
from steer_core.folds import split_sample  # torch-free (steer_core.build re-exports it)
from steer_core.method_names import POPULATION_METHOD, check_method_build_params

log = logging.getLogger(__name__)

bp = Blueprint("profiles", __name__)

SEARCHED = ("layer", "strength")  # fixed by the caller, or chosen on held-out items


def check_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The request's params, validated the way `steer_core.build_profile` will read them, with the
    method's defaults filled in (so `{}` and the defaults spelled out are the same profile); a layer is
    checked against the model when the build runs. Torch-free: the built-in methods' table
    (`steer_core.method_names`) holds the very checks their `Method`s apply."""
    return check_method_build_params(method, params)


def resolve_contrast(session: db.Session, tenant: int, body: ProfileCreate, subject_id: int,
                     items: list[OpinionItem]) -> list[dict[str, str]]:
    """The request's contrast subjects as stored (`{"kind", "id"}`, sorted, each once), checked: they exist,
    are not the subject, and answered at least one of its questions. Omitted: the other groups that did."""
    if body.contrast is None:
        if body.subject.kind != "group":
            return []
        return [{"kind": "group", "id": gid} for gid in
                db.groups_sharing_questions(session, tenant, items, exclude=subject_id)]
    wanted = {question_key(it) for it in items}
    refs: dict[tuple[str, str], dict[str, str]] = {}
    for i, ref in enumerate(body.contrast):
        field = f"contrast[{i}]"
        if (ref.kind, ref.id) == (body.subject.kind, body.subject.id):
            raise ApiError(422, "validation_error", "a subject cannot be its own contrast", field)
        other = db.get_subject(session, tenant, ref.kind, ref.id)
        if other is None:
            raise not_found(f"{ref.kind} {ref.id!r}", f"{field}.id")
        if not any(question_key(it) in wanted for it in db.subject_items(session, tenant, ref.kind, other.id)):
            raise ApiError(422, "validation_error", f"{ref.kind} {ref.id!r} answered none of the subject's "
                           "questions (same text and options): there is nothing to tell apart", f"{field}.id")
        refs[(ref.kind, ref.id)] = {"kind": ref.kind, "id": ref.id}
    return [refs[key] for key in sorted(refs)]


def _progress(stored: dict[str, Any] | None) -> Progress | None:
    """A build's progress as the worker stored it (done, total, stage)."""
    if stored is None:
        return None
    return Progress(done=int(stored.get("done", 0)), total=int(stored.get("total", 0)),
                    stage=str(stored.get("stage", "")))


def profile_verdict(metrics: dict[str, Any] | None) -> ProfileVerdict | None:
    """The verdict a build recorded (`metrics["verdict"]`), with what chat gets; none for rows without one."""
    recorded = (metrics or {}).get("verdict")
    if not isinstance(recorded, dict):
        return None
    generation = (metrics or {}).get("generation") or {}
    return ProfileVerdict(
        summary=recorded["summary"], improved=recorded["improved"], serves=recorded["serves"],
        near_uniform=recorded["near_uniform"], gain_vs_calibrated=Estimate(**recorded["gain_vs_calibrated"]),
        gain_vs_uniform=Estimate(**recorded["gain_vs_uniform"]),
        generation_gain=Estimate(**generation["gain_vs_unsteered"]) if "gain_vs_unsteered" in generation else None)


def profile_views(session: db.Session, rows: list[db.ProfileRow], per_item: bool = True) -> list[ProfileOut]:
    """Rows as responses, with subject names and attempt counts fetched in two queries, not 2N. Lists pass
    `per_item=False`: a page of profiles without each build's per-item alignment (up to
    `steer_core.build.PER_ITEM_LIMIT` rows each), which the single-profile document carries."""
    if not rows:
        return []
    tenant = rows[0].tenant_id
    names: dict[tuple[str, int], str] = {}
    for kind, model, column in (("user", db.User, db.User.uid), ("group", db.Group, db.Group.gid)):
        ids = {r.subject_id for r in rows if r.subject_kind == kind}
        if ids:
            for sid, name in session.execute(select(model.id, column).where(model.tenant_id == tenant,
                                                                           model.id.in_(ids))):
                names[(kind, sid)] = name
    attempts = dict(session.execute(
        select(db.BuildAttempt.profile_id, func.count())
        .where(db.BuildAttempt.profile_id.in_([r.id for r in rows]))
        .group_by(db.BuildAttempt.profile_id)).all())
    out = []
    for r in rows:
        artifact = None
        if r.artifact_sha256:
            artifact = ArtifactRef(sha256=r.artifact_sha256, size=r.artifact_size or 0)
        subject = SubjectRef(kind=r.subject_kind, id=names.get((r.subject_kind, r.subject_id), ""))
        metrics = r.metrics
        if metrics and not per_item:
            metrics = {k: v for k, v in metrics.items() if k != "per_item"}
        out.append(ProfileOut(
            id=r.id, subject=subject, method=r.method, model=r.model, params=r.params, status=r.status,
            progress=_progress(r.progress), error=r.error, chosen=r.chosen, metrics=metrics,
            verdict=profile_verdict(r.metrics), artifact=artifact,
            sample_hash=r.sample_hash, version=r.version, attempts=int(attempts.get(r.id, 0)),
            created_at=r.created_at, updated_at=r.updated_at,
            started_at=r.started_at, finished_at=r.finished_at))
    return out


def _get(profile_id: str) -> db.ProfileRow:
    row = db.get_profile(context.session(), tenant_id(), profile_id)
    if row is None:
        raise not_found(f"profile {profile_id!r}", "id")
    return row


def request_build(body: ProfileCreate) -> tuple[ProfileOut, int, dict[str, str]]:
    """Request the build of `body` for the request's tenant (the API's POST and the console's form)."""
    tenant = tenant_id()
    settings = context.settings()
    session = context.session()
    model = build_model(body.model, settings)
    if body.method == POPULATION_METHOD:
        params = population_params(session, tenant, model, body)
    else:
        params = check_params(body.method, body.params)
    subject = find_subject(session, tenant, body.subject.kind, body.subject.id, "subject.id")
    own = db.subject_items(session, tenant, body.subject.kind, subject.id)
    if not own:
        raise ApiError(422, "validation_error", f"{body.subject.kind} {body.subject.id!r} has no opinion "
                       "items; POST them to .../opinions first", "subject")
    contrast = [] if body.method == POPULATION_METHOD else resolve_contrast(session, tenant, body, subject.id, own)
    if contrast:
        params["contrast"] = contrast
    items = db.profile_sample(session, tenant, body.subject.kind, subject.id, contrast)
    if body.method != POPULATION_METHOD and not all(k in params for k in SEARCHED):
        try:
            split_sample(items)  # the same rule the build applies, refused now instead of failing later
        except SteerError as exc:
            raise ApiError(422, "validation_error", exc.message, "subject") from None
    from service import builds
    from steer_core.data import sample_hash

    row, enqueue = builds.request(session, tenant, body.subject.kind, subject.id, body.method, model,
                                  params, sample_hash(items))
    resend = not enqueue and builds.resend_due(row, settings)  # asking again re-sends a lost message
    session.commit()  # the worker must see the row before the message arrives
    if enqueue or resend:
        try:
            builds.send(settings, row.id, row.method)
        except Exception as exc:
            # The row stays `queued`; the worker's sweeper re-sends lost queued builds.
            log.warning("profile %s queued but not sent: %s", row.id, exc)
    view = profile_views(session, [row])[0]
    location = url_for("profiles.get_profile", profile_id=row.id)
    return view, 202 if enqueue else 200, {"Location": location}


@api_route(bp, "/v1/profiles", "POST", summary="build a profile (202; the same request on the same sample is "
           "one profile)", body=ProfileCreate, responses={202: ProfileOut, 200: ProfileOut}, errors=(404,))
def create_profile(body: ProfileCreate) -> tuple[ProfileOut, int, dict[str, str]]:
    return request_build(body)


@api_route(bp, "/v1/profiles/<profile_id>", "GET", summary="a profile: status, progress, chosen "
           "hyperparameters, held-out metrics", responses={200: ProfileOut}, errors=(404,))
def get_profile(profile_id: str) -> ProfileOut:
    return profile_views(context.session(), [_get(profile_id)])[0]


@api_route(bp, "/v1/profiles", "GET", summary="the tenant's profiles, newest first (metrics without "
           "`per_item`: GET one profile for it)", query=ProfileListQuery,
           responses={200: ProfileList}, errors=(404,))
def list_profiles(query: ProfileListQuery) -> ProfileList:
    tenant = tenant_id()
    session = context.session()
    subject_id = None
    if query.subject_id is not None:
        if query.subject_kind is None:
            raise ApiError(422, "validation_error", "give subject_kind with subject_id", "subject_kind")
        subject = db.get_subject(session, tenant, query.subject_kind, query.subject_id)
        if subject is None:
            return ProfileList(profiles=[], next_after=None)
        subject_id = subject.id
    if query.after is not None and db.get_profile(session, tenant, query.after) is None:
        raise not_found(f"profile {query.after!r}", "after")
    rows = db.list_profiles(session, tenant, kind=query.subject_kind, subject_id=subject_id,
                            status=query.status, method=query.method, limit=query.limit + 1,
                            after=query.after)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return ProfileList(profiles=profile_views(session, rows, per_item=False), next_after=rows[-1].id if more else None)


def remove_profile(profile_id: str) -> None:
    """Delete the tenant's profile, its cache entries and its artifact when no other profile shares it."""
    session = context.session()
    row = _get(profile_id)
    sha = row.artifact_sha256
    session.delete(row)
    session.commit()  # the row goes first: a file without a row is garbage, a row without a file is an error
    if sha is not None and db.profiles_sharing_artifact(session, sha) == 0:
        try:
            context.profile_cache().forget(sha)
        except Exception as exc:  # Redis down: its copy expires by TTL
            log.warning("profile %s deleted; cache entry not dropped: %s", profile_id, exc)
        context.artifact_store().delete(sha)


@api_route(bp, "/v1/profiles/<profile_id>", "DELETE", summary="delete a profile, its cache entries and (when "
           "no other profile shares it) its artifact", responses={204: None}, errors=(404,))
def delete_profile(profile_id: str) -> tuple[None, int]:
    remove_profile(profile_id)
    return None, 204


def artifact_download(profile_id: str, fmt: str) -> Response:
    """The tenant's ready profile as a download in `fmt` (`safetensors` or `gguf`)."""
    row = _get(profile_id)
    if row.status != "ready" or row.artifact_sha256 is None:
        raise ApiError(409, "profile_not_ready", f"profile {profile_id} is {row.status}; its artifact "
                       "exists once it is ready", "id")
    data = context.artifact_store().get(row.artifact_sha256)  # verifies the sha256; errors -> 409 unavailable
    etag = row.artifact_sha256
    filename, mimetype = f"{row.id}.{fmt}", "application/octet-stream"
    if fmt in ("gguf", "peft"):
        # Converted on the engine's side (`service.engine.tools`); a profile without that form: SteerError
        # (field "format") -> 422.
        data = engine_client().export_artifact(data, fmt)
        etag += f"-{fmt}"
    if fmt == "peft":
        filename, mimetype = f"{row.id}.peft.tar.gz", "application/gzip"
    response = current_app.response_class(data, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["ETag"] = f'"{etag}"'
    response.headers["X-Artifact-SHA256"] = row.artifact_sha256
    return response


@api_route(bp, "/v1/profiles/<profile_id>/artifact", "GET", summary="download the profile: safetensors; with "
           "format=gguf a llama.cpp control vector (constant-vector profiles; llama.cpp adds it at every position); "
           "with format=peft a peft LoRA adapter folder as .tar.gz (lora profiles, and cold_fd profiles as the "
           "low-rank update they step along)",
           query=ArtifactQuery, responses={200: "application/octet-stream"}, errors=(404, 409, 422))
def get_artifact(profile_id: str, query: ArtifactQuery) -> Response:
    return artifact_download(profile_id, query.format)


def import_body_limit(max_adapter_bytes: int) -> int:
    """The import route's body limit: the largest adapter in base64 (4 bytes per 3) plus room for the JSON
    around it (subject, adapter_config)."""
    return 4 * (max_adapter_bytes // 3 + 1) + (1 << 20)


@api_route(bp, "/v1/profiles/import", "POST", summary="import a peft LoRA adapter for the served base model as a "
           "ready lora profile of a user or group (safetensors only; shapes, base model, rank and size checked)",
           body=ProfileImport, responses={201: ProfileOut, 200: ProfileOut}, errors=(404, 413, 422),
           max_body_bytes=lambda: import_body_limit(context.settings().max_adapter_bytes))
def import_profile(body: ProfileImport) -> tuple[ProfileOut, int, dict[str, str]]:
    import base64
    import binascii
    import hashlib
    import json

    tenant = tenant_id()
    settings = context.settings()
    session = context.session()
    subject = find_subject(session, tenant, body.subject.kind, body.subject.id, "subject.id")
    if len(body.adapter_model) > 4 * (settings.max_adapter_bytes // 3 + 1):
        raise ApiError(422, "validation_error", f"the adapter is larger than {settings.max_adapter_bytes} bytes",
                       "adapter_model")
    try:
        weights = base64.b64decode(body.adapter_model, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "validation_error", "must be base64", "adapter_model") from None
    try:
        # Checked against the served model's layout (plain data: no model loaded, no engine started) and made
        # a profile's artifact on the engine's side (`service.engine.tools`); SteerError naming the field -> 422.
        imported = engine_client().import_adapter(body.adapter_config, weights, max_rank=settings.max_adapter_rank,
                                                  max_bytes=settings.max_adapter_bytes)
    except EngineUnavailable as exc:  # the served model's layout cannot be read
        raise ApiError(503, "unavailable", str(exc), exc.field) from None
    # The same upload again is the same profile (the stored artifact carries a creation time, the upload not).
    upload = hashlib.sha256(json.dumps(body.adapter_config, sort_keys=True).encode() + weights).hexdigest()
    from service import builds

    row, new = builds.request(session, tenant, body.subject.kind, subject.id, "lora", settings.model,
                              {"imported": True, "upload": upload}, upload)
    if new or row.status != "ready":
        sha, size = context.artifact_store().put(imported.artifact)
        row.status, row.artifact_sha256, row.artifact_size = "ready", sha, size
        row.chosen = dict(imported.chosen)  # layer, strength, positions, rank
        row.metrics = {"evaluation": "imported", "note": "an imported adapter: no held-out scores"}
        row.progress = {"done": 1, "total": 1, "stage": "imported"}
        row.finished_at = db.utcnow()
    session.flush()
    view = profile_views(session, [row])[0]
    return view, 201 if new else 200, {"Location": url_for("profiles.get_profile", profile_id=row.id)}
