"""Opinion items of a user or a group: `POST .../opinions` (a batch, all or nothing), `GET` to read back.

A POST carries JSON `{"items": [...]}`, or a file as the body: CSV (`text/csv`), JSONL
(`application/x-ndjson`) or Parquet (`application/vnd.apache.parquet`), streamed to a temporary file (at
most MAX_UPLOAD_BYTES) and read a row at a time by `steer_core.tables.read_table` through the query's column
mapping (`?question_column=prompt&target_column=dist`), held while it reads to MAX_ITEMS_PER_REQUEST rows and
MAX_UPLOAD_EXPANDED_BYTES once decompressed or decoded. CSV and JSONL may come gzip-compressed, declared
with `Content-Encoding: gzip`; compression that is not declared is refused. Either way the whole batch is
validated, by the same rules (`steer_core.items.make_item`), before anything is written.
"""

from __future__ import annotations

from flask import Blueprint, request

from service import context
from service.api.errors import ApiError
from service.api.openapi import api_route, receive_upload
from service.api.subjects import find_subject
from service.auth import tenant_id
from service.protocol import (
    MAX_ITEMS_PER_REQUEST,
    OpinionOut,
    OpinionsOut,
    OpinionsPost,
    OpinionsQuery,
    OpinionsStored,
    OpinionsUploadQuery,
    SubjectRef,
)
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


# Content-Encoding values read (CSV and JSONL only: Parquet compresses itself), as steer_core.tables names them.
ENCODINGS = {"gzip": "gzip", "x-gzip": "gzip"}
_DECLARE_GZIP = "send it with Content-Encoding: gzip (the one compression accepted, for CSV and JSONL), or uncompressed"


def upload_compression(fmt: str) -> str | None:
    """The compression the request's Content-Encoding declares (None: identity); 415 for any other."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in ENCODINGS or fmt == "parquet":
        accepted = "no Content-Encoding: a Parquet file carries its own compression" if fmt == "parquet" else \
            "Content-Encoding: gzip, or none"
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not accepted for this "
                       f"upload; send {accepted}", "Content-Encoding")
    return ENCODINGS[encoding]


def uploaded_items(query: OpinionsUploadQuery) -> list[OpinionItem]:
    """The uploaded table's rows as items (errors name `upload[row].<column>`), read as it streams from the
    temporary file and held to the upload limits; the file is deleted after."""
    from steer_core.tables import Columns, ReadLimits, TooLarge, query_parameter, read_table, sniff

    settings = context.settings()
    fmt = UPLOADS[request.mimetype]
    compression = upload_compression(fmt)
    path = receive_upload(settings.max_upload_bytes, suffix=f".{fmt}")
    try:
        kind = sniff(path)
        if compression is None and kind not in (None, "parquet"):
            raise ApiError(422, "validation_error", f"the upload is {kind}-compressed, and its Content-Encoding does "
                           f"not say so: {_DECLARE_GZIP}", "body")
        if fmt != "parquet" and kind == "parquet":
            raise ApiError(422, "validation_error", f"the upload is a Parquet file, sent as {request.mimetype}: send "
                           "it as application/vnd.apache.parquet", "body")
        if fmt == "parquet" and kind != "parquet":
            raise ApiError(422, "validation_error", "the upload is not a Parquet file (it does not start and end "
                           f"with PAR1), sent as {request.mimetype}", "body")
        columns = Columns(**{field: getattr(query, f"{field}_column") for field in
                             ("question", "options", "target", "answer", "ordinal", "id")})
        limits = ReadLimits(rows=MAX_ITEMS_PER_REQUEST, expanded_bytes=settings.max_upload_expanded_bytes)
        try:
            return read_table(path, fmt, columns, compression=compression, limits=limits, name="upload",
                              mapped_by=query_parameter, declare=_DECLARE_GZIP)
        except TooLarge as exc:
            if exc.what == "rows":
                raise ApiError(422, "validation_error", f"at most {MAX_ITEMS_PER_REQUEST} items a request: the "
                               f"upload {exc.message}", "body") from None
            raise ApiError(413, "payload_too_large", f"the upload {exc.message} (MAX_UPLOAD_EXPANDED_BYTES)",
                           "body") from None
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
           uploads=tuple(UPLOADS), responses={201: OpinionsStored}, errors=(404, 413, 415), tag="users")
def post_user_opinions(uid: str, body: OpinionsPost | None, query: OpinionsUploadQuery) -> tuple[OpinionsStored, int]:
    return post_opinions("user", uid, body, query)


@api_route(bp, "/v1/groups/<gid>/opinions", "POST",
           summary="store a group's answer distributions (all or nothing; JSON or an uploaded CSV, JSONL or "
                   "Parquet file)", body=OpinionsPost, query=OpinionsUploadQuery, uploads=tuple(UPLOADS),
           responses={201: OpinionsStored}, errors=(404, 413, 415), tag="groups")
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
