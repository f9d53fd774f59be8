"""Opinion items of a user or a group: `POST .../opinions` (a batch, all or nothing), `GET` to read back.

A POST carries JSON `{"items": [...]}`, or a file as the body: CSV (`text/csv`), JSONL
(`application/x-ndjson`) or Parquet (`application/vnd.apache.parquet`), streamed to a temporary file and
read with `datasets` through the query's column mapping (`?question_column=prompt&target_column=dist`).
Either way the whole batch is validated before anything is written (up to MAX_ITEMS_PER_REQUEST items).
"""

from __future__ import annotations

from flask import Blueprint, request

from service import context
from service.api.errors import ApiError
from service.api.openapi import api_route, receive_upload
from service.api.protocol import (
    MAX_ITEMS_PER_REQUEST,
    OpinionOut,
    OpinionsOut,
    OpinionsPost,
    OpinionsQuery,
    OpinionsStored,
    OpinionsUploadQuery,
    SubjectRef,
)
from service.api.subjects import find_subject
from service.auth import tenant_id
from service.store import db
from steer_core.data import OpinionItem, make_item, sample_hash

bp = Blueprint("opinions", __name__)

_RULES = {"user": ("/v1/users/<uid>/opinions", "uid"), "group": ("/v1/groups/<gid>/opinions", "gid")}


# Uploaded file media types -> the table format `steer_core.tables` reads.
UPLOADS = {"text/csv": "csv", "application/x-ndjson": "jsonl", "application/jsonl": "jsonl",
           "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet"}


def post_opinions(kind: str, external_id: str, body: OpinionsPost | None,
                  query: OpinionsUploadQuery | None = None) -> tuple[OpinionsStored, int]:
    tenant = tenant_id()
    session = context.session()
    subject = find_subject(session, tenant, kind, external_id, _RULES[kind][1])
    # Validate the whole batch before writing anything: one bad item rejects the batch.
    if body is None:
        items, at = uploaded_items(query or OpinionsUploadQuery()), "upload"
    else:
        items, at = [make_item(raw.question, raw.options, target=raw.target, answer=raw.answer, ordinal=raw.ordinal,
                               id=raw.id, field=f"items[{i}]") for i, raw in enumerate(body.items)], "items"
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        key = db.item_key(item)
        if key in seen:
            field = f"{at}[{i}].id" if item.id is not None else f"{at}[{i}].question"
            raise ApiError(422, "validation_error", f"the same item as {at}[{seen[key]}] (id {key!r})", field)
        seen[key] = i
    db.put_opinions(session, tenant, subject, items)
    total = len(db.own_opinions(session, tenant, kind, subject.id))
    sample = db.subject_items(session, tenant, kind, subject.id)
    return OpinionsStored(stored=len(items), total=total, sample_hash=sample_hash(sample)), 201


def uploaded_items(query: OpinionsUploadQuery) -> list[OpinionItem]:
    """The uploaded table's rows as items (errors name `upload[row].<column>`); the file is deleted after."""
    from steer_core.tables import Columns, items_from_rows, open_table, query_parameter

    fmt = UPLOADS[request.mimetype]
    path = receive_upload(context.settings().max_upload_bytes, suffix=f".{fmt}")
    try:
        table = open_table(path, fmt)
        if table.num_rows > MAX_ITEMS_PER_REQUEST:
            raise ApiError(422, "validation_error", f"at most {MAX_ITEMS_PER_REQUEST} items a request, the upload "
                           f"has {table.num_rows}", "body")
        columns = Columns(**{field: getattr(query, f"{field}_column") for field in
                             ("question", "options", "target", "answer", "ordinal", "id")})
        return items_from_rows(table, columns, table.column_names, "upload", mapped_by=query_parameter)
    finally:
        path.unlink(missing_ok=True)


def get_opinions(kind: db.SubjectKind, external_id: str, query: OpinionsQuery) -> OpinionsOut:
    tenant = tenant_id()
    session = context.session()
    subject = find_subject(session, tenant, kind, external_id, _RULES[kind][1])
    sample = db.subject_items(session, tenant, kind, subject.id)
    shown = sample if query.view == "sample" else [r.to_item() for r in db.own_opinions(session, tenant, kind,
                                                                                           subject.id)]
    return OpinionsOut(subject=SubjectRef(kind=kind, id=external_id), view=query.view,
                       sample_hash=sample_hash(sample), items=[OpinionOut.of(it) for it in shown])


@api_route(bp, "/v1/users/<uid>/opinions", "POST", summary="store a user's answers (all or nothing; JSON or "
           "an uploaded CSV, JSONL or Parquet file)", body=OpinionsPost, query=OpinionsUploadQuery,
           uploads=tuple(UPLOADS), responses={201: OpinionsStored}, errors=(404, 413), tag="users")
def post_user_opinions(uid: str, body: OpinionsPost | None, query: OpinionsUploadQuery) -> tuple[OpinionsStored, int]:
    return post_opinions("user", uid, body, query)


@api_route(bp, "/v1/groups/<gid>/opinions", "POST",
           summary="store a group's answer distributions (all or nothing; JSON or an uploaded CSV, JSONL or "
                   "Parquet file)", body=OpinionsPost, query=OpinionsUploadQuery, uploads=tuple(UPLOADS),
           responses={201: OpinionsStored}, errors=(404, 413), tag="groups")
def post_group_opinions(gid: str, body: OpinionsPost | None, query: OpinionsUploadQuery) -> tuple[OpinionsStored, int]:
    return post_opinions("group", gid, body, query)


@api_route(bp, "/v1/users/<uid>/opinions", "GET", summary="a user's stored answers", query=OpinionsQuery,
           responses={200: OpinionsOut}, errors=(404,), tag="users")
def get_user_opinions(uid: str, query: OpinionsQuery) -> OpinionsOut:
    return get_opinions("user", uid, query)


@api_route(bp, "/v1/groups/<gid>/opinions", "GET", summary="a group's items, own or as built (with members')",
           query=OpinionsQuery, responses={200: OpinionsOut}, errors=(404,), tag="groups")
def get_group_opinions(gid: str, query: OpinionsQuery) -> OpinionsOut:
    return get_opinions("group", gid, query)
