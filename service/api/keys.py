"""A tenant's own API keys: `POST /v1/keys` (the key is shown once; 409 `too_many_keys` when the tenant already
holds `MAX_KEYS_PER_TENANT` unrevoked keys), `GET /v1/keys`, `DELETE /v1/keys/{prefix}` (revoked at once: the
next request with it gets 401)."""

from __future__ import annotations

from flask import Blueprint, g

from service import context
from service.api.errors import ApiError, not_found
from service.api.openapi import api_route
from service.auth import TooManyKeys, add_key, revoke_prefix, tenant_id, tenant_keys
from service.protocol import KeyCreate, KeyCreated, KeyList, KeyOut
from service.store import db

bp = Blueprint("keys", __name__)


def key_out(row: db.ApiKey) -> KeyOut:
    return KeyOut(prefix=row.prefix, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at,
                  current=row.id == g.get("api_key_id"))


@api_route(bp, "/v1/keys", "POST", summary="create a key for this tenant (shown once; at most MAX_KEYS_PER_TENANT "
           "unrevoked)", body=KeyCreate, responses={201: KeyCreated}, errors=(409,))
def create(body: KeyCreate) -> tuple[KeyCreated, int]:
    try:
        key, row = add_key(context.session(), tenant_id(), body.name, cap=context.settings().max_keys_per_tenant)
    except TooManyKeys as exc:
        raise ApiError(409, "too_many_keys", str(exc), "keys") from None
    return KeyCreated(key=key, **key_out(row).model_dump()), 201


@api_route(bp, "/v1/keys", "GET", summary="this tenant's keys by prefix (no secrets)", responses={200: KeyList})
def list_keys() -> KeyList:
    return KeyList(keys=[key_out(row) for row in tenant_keys(context.session(), tenant_id())])


@api_route(bp, "/v1/keys/<prefix>", "DELETE", summary="revoke one of this tenant's keys",
           responses={200: KeyOut}, errors=(404,))
def revoke(prefix: str) -> KeyOut:
    row = revoke_prefix(context.session(), prefix, tenant_id())
    if row is None:
        raise not_found(f"key {prefix!r}", "prefix")
    return key_out(row)
