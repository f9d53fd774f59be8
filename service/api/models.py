"""OpenAI's model list: `GET /v1/models` and `GET /v1/models/{id}`.

The base model and each of the tenant's ready profiles for it, as `<base>:<profile id>` (the name a chat
request's `model` accepts), so an OpenAI-compatible client or UI can pick a profile from a list. Each
profile's entry carries its subject, method, version and verdict (what it does, said plainly) under `steering`.
"""

from __future__ import annotations

from flask import Blueprint

from service import context
from service.api.errors import ApiError
from service.api.openapi import api_route
from service.api.profiles import profile_views
from service.auth import tenant_id
from service.protocol import ModelList, ModelOut, ModelSteering
from service.store import db

bp = Blueprint("models", __name__)

# The newest ready profiles listed (OpenAI's list has no pages); GET /v1/profiles pages through all.
MAX_LISTED_PROFILES = 500
OWNER = "pluristeer"


def _entries(rows: list[db.ProfileRow], base: str) -> list[ModelOut]:
    return [ModelOut(id=f"{base}:{p.id}", created=int(p.created_at.timestamp()), owned_by=OWNER,
                     steering=ModelSteering(profile=p.id, subject=p.subject, method=p.method, version=p.version,
                                            verdict=p.verdict))
            for p in profile_views(context.session(), rows)]


@api_route(bp, "/v1/models", "GET", summary="the base model and the tenant's ready profiles, OpenAI's shape",
           responses={200: ModelList})
def list_models() -> ModelList:
    base = context.settings().model
    rows = [r for r in db.list_profiles(context.session(), tenant_id(), status="ready", limit=MAX_LISTED_PROFILES)
            if r.model == base]
    return ModelList(data=[ModelOut(id=base, created=0, owned_by=OWNER), *_entries(rows, base)])


@api_route(bp, "/v1/models/<path:model_id>", "GET", summary="one model: the base or `<base>:<profile id>`",
           responses={200: ModelOut})
def get_model(model_id: str) -> ModelOut:
    base = context.settings().model
    if model_id == base:
        return ModelOut(id=base, created=0, owned_by=OWNER)
    profile_id = model_id.removeprefix(f"{base}:")
    row = None
    if profile_id != model_id:
        row = db.get_profile(context.session(), tenant_id(), profile_id)
    if row is None or row.status != "ready" or row.model != base:
        raise ApiError(404, "not_found", f"no model {model_id!r} here: the base model is {base!r}, a ready "
                       f"profile is '{base}:<profile id>'", "model")
    return _entries([row], base)[0]
