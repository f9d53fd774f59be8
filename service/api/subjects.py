"""Helpers shared by the user, group, opinion, profile and population routes: path ids, subject lookup, the
model a build is for."""

from __future__ import annotations

import re
from typing import Literal, overload

from sqlalchemy.orm import Session

from service.api.errors import ApiError, not_found
from service.protocol import ID_PATTERN, ID_RULE
from service.settings import Settings, allowed_models
from service.store import db

_ID = re.compile(ID_PATTERN)


def build_model(requested: str | None, settings: Settings) -> str:
    """The model a build or population is for: the one asked for, if this deployment serves it, else the
    deployment's default; 422 naming `model` otherwise."""
    model = requested or settings.model
    if model not in allowed_models(settings):
        raise ApiError(422, "validation_error", f"model {model!r} is not served here; choose one of "
                       f"{', '.join(allowed_models(settings))}", "model")
    return model


def check_id(value: str, field: str) -> str:
    if not _ID.fullmatch(value):
        raise ApiError(422, "validation_error", ID_RULE, field)
    return value


@overload
def find_subject(session: Session, tenant_id: int, kind: Literal["user"], external_id: str,
                 field: str) -> db.User: ...
@overload
def find_subject(session: Session, tenant_id: int, kind: Literal["group"], external_id: str,
                 field: str) -> db.Group: ...
@overload
def find_subject(session: Session, tenant_id: int, kind: str, external_id: str,
                 field: str) -> db.User | db.Group: ...
def find_subject(session: Session, tenant_id: int, kind: str, external_id: str,
                 field: str) -> db.User | db.Group:
    """The tenant's user or group, or 404 naming `field` (another tenant's subject is just not found)."""
    check_id(external_id, field)
    subject = db.get_subject(session, tenant_id, kind, external_id)
    if subject is None:
        raise not_found(f"{kind} {external_id!r}", field)
    return subject
