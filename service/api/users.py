"""Users: `PUT /v1/users/{uid}` creates or updates one, `GET` reads it back."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import func, select

from service import context
from service.api.errors import not_found
from service.api.openapi import api_route
from service.api.subjects import check_id, find_subject
from service.auth import tenant_id
from service.protocol import UserOut, UserPut
from service.store import db

bp = Blueprint("users", __name__)


def user_out(session: db.Session, user: db.User) -> UserOut:
    groups = [g.gid for g in db.user_groups(session, user.tenant_id, user.id)]
    n = session.scalar(select(func.count()).select_from(db.OpinionRow)
                       .where(db.OpinionRow.user_id == user.id))
    return UserOut(uid=user.uid, attributes=user.attributes, default_profile_id=user.default_profile_id,
                   groups=groups, opinions=int(n or 0), created_at=user.created_at,
                   updated_at=user.updated_at)


@api_route(bp, "/v1/users/<uid>", "PUT", summary="create or update a user", body=UserPut,
           responses={200: UserOut, 201: UserOut}, errors=(404,))
def put_user(uid: str, body: UserPut) -> tuple[UserOut, int]:
    tenant = tenant_id()
    check_id(uid, "uid")
    session = context.session()
    wanted = body.default_profile_id
    if wanted is not None and db.get_profile(session, tenant, wanted) is None:
        raise not_found(f"profile {wanted!r}", "default_profile_id")
    user = db.get_user(session, tenant, uid)
    created = user is None
    if user is None:
        user = db.User(tenant_id=tenant, uid=uid)
        session.add(user)
    user.attributes = body.attributes
    user.default_profile_id = body.default_profile_id
    user.updated_at = db.utcnow()
    if created:
        user.created_at = user.updated_at
    session.flush()
    return user_out(session, user), 201 if created else 200


@api_route(bp, "/v1/users/<uid>", "GET", summary="a user", responses={200: UserOut}, errors=(404,))
def get_user(uid: str) -> UserOut:
    session = context.session()
    user = find_subject(session, tenant_id(), "user", uid, "uid")
    return user_out(session, user)
