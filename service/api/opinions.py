"""Opinion items of a user or a group: `POST .../opinions` (a batch, all or nothing), `GET` to read back."""

from __future__ import annotations

from flask import Blueprint

from service import context, db
from service.api.subjects import find_subject
from service.auth import tenant_id
from service.errors import ApiError
from service.openapi import api_route
from service.protocol import OpinionOut, OpinionsOut, OpinionsPost, OpinionsQuery, OpinionsStored, SubjectRef
from steer_core.data import make_item, sample_hash

bp = Blueprint("opinions", __name__)

_RULES = {"user": ("/v1/users/<uid>/opinions", "uid"), "group": ("/v1/groups/<gid>/opinions", "gid")}


def post_opinions(kind: str, external_id: str, body: OpinionsPost) -> tuple[OpinionsStored, int]:
    tenant = tenant_id()
    session = context.session()
    subject = find_subject(session, tenant, kind, external_id, _RULES[kind][1])
    # Validate the whole batch before writing anything: one bad item rejects the batch.
    items, seen = [], {}
    for i, raw in enumerate(body.items):
        item = make_item(raw.question, raw.options, target=raw.target, answer=raw.answer, ordinal=raw.ordinal,
                         id=raw.id, field=f"items[{i}]")
        key = db.item_key(item)
        if key in seen:
            field = f"items[{i}].id" if item.id is not None else f"items[{i}].question"
            raise ApiError(422, "validation_error", f"the same item as items[{seen[key]}] (id {key!r})",
                           field)
        seen[key] = i
        items.append(item)
    db.put_opinions(session, tenant, subject, items)
    total = len(db.own_opinions(session, tenant, kind, subject.id))
    sample = db.subject_items(session, tenant, kind, subject.id)
    return OpinionsStored(stored=len(items), total=total, sample_hash=sample_hash(sample)), 201


def get_opinions(kind: str, external_id: str, query: OpinionsQuery) -> OpinionsOut:
    tenant = tenant_id()
    session = context.session()
    subject = find_subject(session, tenant, kind, external_id, _RULES[kind][1])
    sample = db.subject_items(session, tenant, kind, subject.id)
    shown = sample if query.view == "sample" else [r.to_item() for r in db.own_opinions(session, tenant, kind,
                                                                                           subject.id)]
    return OpinionsOut(subject=SubjectRef(kind=kind, id=external_id), view=query.view,
                       sample_hash=sample_hash(sample), items=[OpinionOut.of(it) for it in shown])


@api_route(bp, "/v1/users/<uid>/opinions", "POST", summary="store a user's answers (all or nothing)",
           body=OpinionsPost, responses={201: OpinionsStored}, errors=(404,), tag="users")
def post_user_opinions(uid: str, body: OpinionsPost) -> tuple[OpinionsStored, int]:
    return post_opinions("user", uid, body)


@api_route(bp, "/v1/groups/<gid>/opinions", "POST",
           summary="store a group's answer distributions (all or nothing)",
           body=OpinionsPost, responses={201: OpinionsStored}, errors=(404,), tag="groups")
def post_group_opinions(gid: str, body: OpinionsPost) -> tuple[OpinionsStored, int]:
    return post_opinions("group", gid, body)


@api_route(bp, "/v1/users/<uid>/opinions", "GET", summary="a user's stored answers", query=OpinionsQuery,
           responses={200: OpinionsOut}, errors=(404,), tag="users")
def get_user_opinions(uid: str, query: OpinionsQuery) -> OpinionsOut:
    return get_opinions("user", uid, query)


@api_route(bp, "/v1/groups/<gid>/opinions", "GET", summary="a group's items, own or as built (with members')",
           query=OpinionsQuery, responses={200: OpinionsOut}, errors=(404,), tag="groups")
def get_group_opinions(gid: str, query: OpinionsQuery) -> OpinionsOut:
    return get_opinions("group", gid, query)
