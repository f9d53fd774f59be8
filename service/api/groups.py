"""Groups: `PUT /v1/groups/{gid}` creates or updates one with its member list, `GET` reads it back."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import delete, func, select

from service import context
from service.api.errors import ApiError
from service.api.openapi import api_route
from service.api.subjects import check_id, find_subject
from service.auth import tenant_id
from service.protocol import GroupOut, GroupPut
from service.store import db

bp = Blueprint("groups", __name__)


def group_out(session: db.Session, group: db.Group) -> GroupOut:
    members = [u.uid for u in db.group_members(session, group.tenant_id, group.id)]
    n = session.scalar(select(func.count()).select_from(db.OpinionRow)
                       .where(db.OpinionRow.group_id == group.id))
    return GroupOut(gid=group.gid, attributes=group.attributes, members=members, opinions=int(n or 0),
                    created_at=group.created_at, updated_at=group.updated_at)


@api_route(bp, "/v1/groups/<gid>", "PUT", summary="create or update a group and replace its members",
           body=GroupPut, responses={200: GroupOut, 201: GroupOut}, errors=(404,))
def put_group(gid: str, body: GroupPut) -> tuple[GroupOut, int]:
    tenant = tenant_id()
    check_id(gid, "gid")
    session = context.session()
    uids = list(dict.fromkeys(body.members))  # keep order, drop repeats
    users = {u.uid: u for u in session.scalars(
        select(db.User).where(db.User.tenant_id == tenant, db.User.uid.in_(uids)))} if uids else {}
    for i, uid in enumerate(body.members):
        if uid not in users:
            raise ApiError(404, "not_found", f"user {uid!r} not found; PUT /v1/users/{{uid}} first",
                           f"members[{i}]")
    group = db.get_group(session, tenant, gid)
    created = group is None
    if group is None:
        group = db.Group(tenant_id=tenant, gid=gid)
        session.add(group)
    group.attributes = body.attributes
    group.updated_at = db.utcnow()
    if created:
        group.created_at = group.updated_at
    session.flush()
    session.execute(delete(db.GroupMember).where(db.GroupMember.group_id == group.id))
    session.add_all([db.GroupMember(group_id=group.id, user_id=users[uid].id) for uid in uids])
    session.flush()
    return group_out(session, group), 201 if created else 200


@api_route(bp, "/v1/groups/<gid>", "GET", summary="a group and its members", responses={200: GroupOut},
           errors=(404,))
def get_group(gid: str) -> GroupOut:
    session = context.session()
    group = find_subject(session, tenant_id(), "group", gid, "gid")
    return group_out(session, group)
