"""Wire errors. Every failure leaves the API as `{"error": {"type", "message", "field"}}`, from here only:
`api_error` is the one map from an exception to its wire error, used by the app's error handlers and by
event streams (whose headers are already sent when a failure comes)."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, current_app, has_app_context, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from service.experiments.errors import ExperimentError, ExperimentStopped, Invalid, NotFound, ProfileNotReady
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

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "field": self.field}


# The experiments' domain errors (`service.experiments.errors`) as HTTP: status and wire type.
_EXPERIMENT_ERRORS: dict[type[ExperimentError], tuple[int, str]] = {
    NotFound: (404, "not_found"), Invalid: (422, "validation_error"),
    ProfileNotReady: (409, "profile_not_ready"), ExperimentStopped: (409, "experiment_stopped"),
}


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


def api_error(exc: BaseException) -> ApiError:
    """The wire error of any exception (an unexpected one is logged and becomes a bare 500)."""
    from service.engine.client import (
        MODEL_MISMATCH,
        UNAVAILABLE,
        DeadlineExceeded,
        EngineBusy,
        EngineStopped,
        GenerationFailed,
        SteeringRejected,
    )
    from service.store.artifacts import ArtifactError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SteerError):
        # Bad content that parsed fine (a target that does not sum to 1, an unknown method): 422.
        return ApiError(422, "validation_error", exc.message, exc.field)
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, ExperimentError):
        status, kind = _EXPERIMENT_ERRORS.get(type(exc), (422, "validation_error"))
        return ApiError(status, kind, exc.message, exc.field)
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH") if has_app_context() else None
            message = f"the request body is larger than the limit of {limit} bytes"
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        return ApiError(status, _HTTP_TYPES.get(status, "error"), message, "body" if status == 413 else None,
                        headers)
    if isinstance(exc, IntegrityError):
        # Two requests raced to create the same thing (a uid, an item id); the loser may simply retry.
        log.info("integrity conflict: %s", exc.orig)
        return ApiError(409, "conflict", "a concurrent request changed the same resource; retry")
    if isinstance(exc, ArtifactError):
        # A missing or corrupted artifact is never applied or served: the profile is unavailable.
        return ApiError(409, "profile_unavailable", f"the profile's artifact is unavailable: {exc}", "artifact")
    if isinstance(exc, SteeringRejected):
        if exc.reason == UNAVAILABLE:
            return ApiError(409, "profile_unavailable", str(exc), exc.field)
        if exc.reason == MODEL_MISMATCH:
            return ApiError(422, "profile_model_mismatch", str(exc), exc.field)
        return ApiError(422, "validation_error", str(exc), exc.field)
    if isinstance(exc, EngineBusy):
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(503, "deadline_exceeded", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, EngineStopped):
        return ApiError(503, "unavailable", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, GenerationFailed):
        return ApiError(500, "generation_failed", str(exc))
    if isinstance(exc, TimeoutError):
        return ApiError(503, "unavailable", str(exc) or "timed out", headers={"Retry-After": "5"})
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Exception)
    def _any_error(exc: Exception) -> Response:
        err = api_error(exc)
        return error_response(err.status, err.type, err.message, err.field, err.headers)
