"""Wire errors. Every failure leaves the API as `{"error": {"type", "message", "field"}}`, from here only."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from steer_core.errors import SteerError

log = logging.getLogger(__name__)

# Error types by HTTP status, for werkzeug's own errors (unknown route, wrong method, body too large).
_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
               500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An error the client can act on: HTTP `status`, a short machine `type`, a message, the field at
    fault."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.headers = headers or {}


def not_found(what: str, field: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found", field)


def error_response(status: int, type: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"type": type, "message": message, "field": field}
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def field_path(loc: tuple[Any, ...] | list[Any], prefix: str | None = None) -> str:
    """A pydantic error location as `items[3].target`."""
    out = prefix or ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# Parts of a pydantic error location that name a union member or a validator, not a field.
_UNION_TAG = re.compile(r"^(int|float|str|bool|bytes|none|function-.*|constrained-.*|[a-z-]+\[.*\])$")


def validation_error(exc: ValidationError, prefix: str | None = None) -> ApiError:
    """The first pydantic error as a 422 naming its field."""
    first = exc.errors(include_url=False)[0]
    loc = [p for p in first.get("loc", ()) if not (isinstance(p, str) and _UNION_TAG.match(p))]
    field = field_path(loc, prefix) or prefix
    kind = first.get("type", "")
    message = "unknown field" if kind == "extra_forbidden" else first.get("msg", "invalid value")
    return ApiError(422, "validation_error", message, field)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.errorhandler(SteerError)
    def _steer_error(exc: SteerError) -> Response:
        # Bad content that parsed fine (a target that does not sum to 1, an unknown method): 422.
        return error_response(422, "validation_error", exc.message, exc.field)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        err = validation_error(exc)
        return error_response(err.status, err.type, err.message, err.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the request body is larger than the limit of {limit} bytes"
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        return error_response(status, _HTTP_TYPES.get(status, "error"), message,
                              "body" if status == 413 else None, headers)

    @app.errorhandler(IntegrityError)
    def _integrity(exc: IntegrityError) -> Response:
        # Two requests raced to create the same thing (a uid, an item id); the loser may simply retry.
        log.info("integrity conflict: %s", exc.orig)
        return error_response(409, "conflict", "a concurrent request changed the same resource; retry")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        from service.artifacts import ArtifactError

        if isinstance(exc, ArtifactError):
            # A missing or corrupted artifact is never applied or served: the profile is unavailable.
            return error_response(409, "profile_unavailable", f"the profile's artifact is unavailable: {exc}",
                                  "artifact")
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
