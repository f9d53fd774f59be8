"""The route decorator every API endpoint uses, and `/openapi.json` built from what it records.

`@api_route(bp, "/v1/users/<uid>", "PUT", body=UserPut, responses={200: UserOut})` registers a Flask
route that parses and validates the JSON body (and query string) with the pydantic models, authenticates
the bearer key, applies the rate limit, runs the view in one database transaction and serializes what it
returns. The same record produces the OpenAPI document, so the document cannot drift from the url map.

A view returns a pydantic model (status 200), a `(model, status)` or `(model, status, headers)` tuple, or
a ready `flask.Response` (downloads, SSE streams).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode
from werkzeug.exceptions import RequestEntityTooLarge

from service import context
from service.api.errors import ApiError, not_found, validation_error
from service.protocol import DEPLOYMENT_KEY, ID_PATTERN, ID_RULE, PATH_PATTERNS, UUID_PATTERN, ErrorResponse
from service.settings import Settings, allowed_models

log = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)

OPENAPI_VERSION = "3.1.0"
API_TITLE = "pluristeer"
API_VERSION = "1"


@dataclass
class RouteSpec:
    rule: str
    methods: list[str]
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | str | None] = field(default_factory=dict)
    auth: bool = True
    errors: tuple[int, ...] = ()
    uploads: tuple[str, ...] = ()


def api_route(bp: Blueprint, rule: str, method: str, *, summary: str, body: type[BaseModel] | None = None,
              query: type[BaseModel] | None = None,
              responses: dict[int, type[BaseModel] | str | None] | None = None, auth: bool = True,
              errors: tuple[int, ...] = (), tag: str | None = None,
              uploads: tuple[str, ...] = (),
              max_body_bytes: Callable[[], int] | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Register `view` on `bp` at `rule` for `method`; see the module docstring.

    `responses` maps status codes to a response model, a media type string (binary or streamed bodies)
    or None (no body). The view receives `body=` and `query=` keyword arguments when those are given.
    `uploads` are media types the route also takes as a file body: a request with one of them gets
    `body=None` and reads its file with `receive_upload`. `max_body_bytes` gives the route its own body
    limit in place of `MAX_BODY_BYTES` (a route whose bodies carry files).
    """
    spec = RouteSpec(rule=rule, methods=[method.upper()], summary=summary, tag=tag or bp.name, body=body,
                     query=query, responses=dict(responses or {200: None}), auth=auth, errors=errors,
                     uploads=uploads)

    def decorate(view: Callable[..., Any]) -> Any:
        @wraps(view)
        def endpoint(**path_args: Any) -> Response:
            if auth:
                from service.auth import authenticate

                authenticate()
            check_path_args(path_args)
            if max_body_bytes is not None:
                request.max_content_length = max_body_bytes()
            kwargs = dict(path_args)
            if body is not None:
                kwargs["body"] = None if request.mimetype in uploads else parse_body(body)
            if query is not None:
                kwargs["query"] = parse_query(query)
            result = view(**kwargs)
            response = to_response(result)
            session = context.session_if_open()
            if session is not None:
                if response.status_code < 400:
                    session.commit()
                else:
                    session.rollback()
            return response

        endpoint.api_spec = spec  # type: ignore[attr-defined]
        bp.add_url_rule(rule, view_func=endpoint, methods=spec.methods)
        return endpoint

    return decorate


# Bounds every JSON body is held to before any model sees it: the databases, torch and the statistics
# all take 64-bit numbers and UTF-8 text without NUL.
MAX_JSON_DEPTH = 32
MAX_JSON_INTEGER = 2**63 - 1
MAX_JSON_NUMBER = 1e15


class _TooLarge:
    """An integer literal too large to read (kept as text so `int()` never sees 5,000 digits)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_int(text: str) -> int | _TooLarge:
    if len(text.lstrip("-")) > 19:
        return _TooLarge(text)
    value = int(text)
    return value if abs(value) <= MAX_JSON_INTEGER else _TooLarge(text)


def _parse_number(text: str) -> int | float:
    # A number with no fractional part is an integer whichever way it is written (`2.0`, `1e3`), as JSON
    # Schema's "integer" says; past MAX_JSON_INTEGER it stays a float for check_json_value to refuse.
    value = float(text)
    return int(value) if value.is_integer() and abs(value) <= MAX_JSON_INTEGER else value


def read_json(raw: bytes) -> Any:
    """`raw` parsed as JSON, then checked: nesting at most `MAX_JSON_DEPTH`, integers within 64 bits,
    other numbers finite and at most `MAX_JSON_NUMBER` in size, strings (keys too) valid UTF-8 without NUL.
    Numbers with no fractional part are read as integers. Raises `ApiError` (400 for what is not JSON, 422
    naming the field for a value out of bounds)."""
    try:
        payload = json.loads(raw, parse_int=_parse_int, parse_float=_parse_number, parse_constant=float)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        message = f"the body is not valid JSON: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else \
            "the body is not UTF-8 JSON"
        raise ApiError(400, "invalid_json", message, "body") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels",
                       "body") from None
    check_json_value(payload)
    return payload


def check_json_value(payload: Any) -> None:
    """Walk a parsed body without recursion; the first value out of bounds is a 422 naming its path."""
    stack: list[tuple[Any, str, int]] = [(payload, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels", "body")
        # Children are pushed last first, so the first bad value in document order is the one named.
        if isinstance(value, dict):
            for key, sub in reversed(value.items()):
                where = f"{path}.{key}" if path else str(key)
                _check_text(key, where)
                stack.append((sub, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((value[i], f"{path}[{i}]", depth + 1) for i in range(len(value) - 1, -1, -1))
        elif isinstance(value, str):
            _check_text(value, path or "body")
        elif isinstance(value, _TooLarge):
            raise ApiError(422, "validation_error", f"integers must lie within +-{MAX_JSON_INTEGER}",
                           path or "body")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_JSON_NUMBER):
            raise ApiError(422, "validation_error", f"numbers must be finite and at most {MAX_JSON_NUMBER:g} "
                           "in size", path or "body")


def _check_text(text: str, field: str) -> None:
    if "\x00" in text:
        raise ApiError(422, "validation_error", "text must not contain NUL characters", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "validation_error", "text must not contain lone surrogates (\\ud800-\\udfff)",
                       field) from None


def read_body() -> bytes:
    """The raw body, 413 past the request's limit (`MAX_CONTENT_LENGTH` unless the route sets its own).
    werkzeug checks a declared Content-Length, but cuts a chunked body (no Content-Length) at the limit
    without a word: read one byte past it to tell."""
    limit = request.max_content_length
    if limit is not None and request.content_length is None and "wsgi.input_terminated" in request.environ:
        raw = request.environ["wsgi.input"].read(limit + 1)
        if len(raw) > limit:
            raise RequestEntityTooLarge()
        return raw
    return request.get_data(cache=True)


def receive_upload(limit: int, suffix: str = "") -> Path:
    """The request's body streamed as it came (compressed or not) to a temporary file (the caller deletes
    it), 413 past `limit` bytes (MAX_UPLOAD_BYTES): at once for a declared Content-Length, else at the
    byte past it. What the file expands to is its reader's to bound (`steer_core.tables.read_table`)."""
    too_large = ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit} bytes "
                         "(MAX_UPLOAD_BYTES)", "body")
    if request.content_length is not None and request.content_length > limit:
        raise too_large  # before werkzeug refuses it quoting MAX_CONTENT_LENGTH, the JSON bodies' limit
    # This route's own limit, not MAX_CONTENT_LENGTH's. One byte more: werkzeug cuts a chunked body at its
    # limit without a word, and the byte past `limit` is what tells an over-limit body apart.
    request.max_content_length = limit + 1
    fd, name = tempfile.mkstemp(prefix="pluristeer-upload-", suffix=suffix)
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            while chunk := request.stream.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise too_large
                f.write(chunk)
        if size == 0:
            raise ApiError(422, "validation_error", "the uploaded file is empty", "body")
    except RequestEntityTooLarge:
        path.unlink(missing_ok=True)
        raise too_large from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def parse_body(model: type[Body]) -> Body:
    """The request's JSON body validated by `model`: 400 if it is not JSON, 422 naming the field if
    invalid."""
    raw = read_body()
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object", "body")
    payload = read_json(raw)
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object", "body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_path_args(path_args: dict[str, str]) -> None:
    """Path ids must have the shape their pattern states (`PATH_PATTERNS`): a malformed uid or gid is a
    422, a malformed profile or experiment id cannot exist (404)."""
    for name, value in path_args.items():
        pattern = PATH_PATTERNS.get(name)
        if pattern is None or re.fullmatch(pattern, value):
            continue
        if pattern == ID_PATTERN:
            raise ApiError(422, "validation_error", ID_RULE, name)
        raise not_found(f"{name.removesuffix('_id')} {value!r}", "id")


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise ApiError(422, "validation_error", "give this query parameter once", key)
        _check_text(values[0], key)
        args[key] = values[0]
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise validation_error(exc) from None


def to_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    status: int = 200
    headers: Any = {}  # what Flask takes: a dict or a list of pairs
    if isinstance(result, tuple):
        result, status, *rest = result
        headers = rest[0] if rest else {}
    if result is None:
        response = current_app.response_class(status=status)
    else:
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        response = current_app.response_class(dump_json(payload), status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name] = value
    return response


def dump_json(payload: Any) -> str:
    """`payload` as JSON. NaN and infinities are not JSON: a non-finite number that got this far is
    written as null (and logged) rather than sent as `NaN`."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError:
        log.error("non-finite number in a %s response; sent as null", request.path)
        return json.dumps(_finite_or_none(payload), separators=(",", ":"), allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- the document

_CONVERTER = re.compile(r"<(?:(?P<conv>[a-z]+):)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)>")
_STANDARD_ERRORS = {400: "malformed JSON", 401: "missing, unknown or revoked key",
                    404: "not found in this tenant",
                    409: "the resource's state does not allow this", 413: "the body is over the size limit",
                    422: "a field is missing, unknown or invalid (named in error.field)",
                    429: "rate limit reached (see Retry-After)", 503: "a dependency is unavailable"}


def openapi_path(rule: str) -> str:
    """Flask's `/v1/users/<uid>` as OpenAPI's `/v1/users/{uid}`."""
    return _CONVERTER.sub(lambda m: "{" + m.group("name") + "}", rule)


# Blueprints of HTML pages (the web console): not API operations, not in the document.
PAGE_BLUEPRINTS = frozenset({"console", "console_root"})


def is_api_rule(rule: Any) -> bool:
    """Whether a url map rule is an API operation (not a static file or a console page)."""
    return rule.endpoint != "static" and rule.endpoint.split(".")[0] not in PAGE_BLUEPRINTS


def route_specs(app: Flask) -> list[tuple[str, str, RouteSpec | None]]:
    """(path, method, spec) for every API rule of the app's url map (spec None: not declared via api_route)."""
    out = []
    for rule in app.url_map.iter_rules():
        if not is_api_rule(rule):
            continue
        view = app.view_functions[rule.endpoint]
        spec = getattr(view, "api_spec", None)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((openapi_path(rule.rule), method, spec))
    return out


_TEXT_PATTERN = "^[^\\u0000]*$"
_INTEGER_BOUNDS = {"minimum": -MAX_JSON_INTEGER, "maximum": MAX_JSON_INTEGER}
_NUMBER_BOUNDS = {"minimum": -MAX_JSON_NUMBER, "maximum": MAX_JSON_NUMBER}
JSON_VALUE = "JsonValue"
_BOUND_KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
_JSON_SCALAR: dict[str, Any] = {"anyOf": [{"type": "string", "pattern": _TEXT_PATTERN},
                                          {"type": "integer", **_INTEGER_BOUNDS},
                                          {"type": "number", **_NUMBER_BOUNDS}, {"type": "boolean"},
                                          {"type": "null"}]}
# Free-form values (attributes, params) as the document states them: scalars, or lists and objects of them
# (read_json accepts nesting up to MAX_JSON_DEPTH).
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "any JSON value within the API's bounds",
    "anyOf": [*_JSON_SCALAR["anyOf"], {"type": "array", "items": _JSON_SCALAR},
              {"type": "object", "propertyNames": {"pattern": _TEXT_PATTERN}, "additionalProperties": _JSON_SCALAR}]}


def state_json_bounds(schema: Any) -> None:
    """Write `read_json`'s bounds into a request schema (in place): text without NUL, integers within 64
    bits, other numbers within +-MAX_JSON_NUMBER, free-form values as `JsonValue`."""
    if isinstance(schema, list):
        for sub in schema:
            state_json_bounds(sub)
        return
    if not isinstance(schema, dict):
        return
    # pydantic leaves a number union's bounds as ge/le beside the union: move them into its branches.
    bounds = {_BOUND_KEYWORDS[k]: schema.pop(k) for k in list(schema) if k in _BOUND_KEYWORDS}
    for branch in schema.get("anyOf", []) if bounds else ():
        if branch.get("type") in ("integer", "number"):
            branch.update(bounds)
    kind = schema.get("type")
    if kind == "string" and "pattern" not in schema and "enum" not in schema and "const" not in schema:
        schema["pattern"] = _TEXT_PATTERN
    elif kind in ("integer", "number"):
        for key, value in (_INTEGER_BOUNDS if kind == "integer" else _NUMBER_BOUNDS).items():
            schema.setdefault(key, value)
    elif kind == "object":
        schema.setdefault("propertyNames", {"pattern": _TEXT_PATTERN})
        if schema.get("additionalProperties") is True:
            schema["additionalProperties"] = {"$ref": f"#/components/schemas/{JSON_VALUE}"}
    for key in ("properties", "$defs"):
        for sub in schema.get(key, {}).values():
            state_json_bounds(sub)
    for key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
        if key in schema:
            state_json_bounds(schema[key])


def _branches(schema: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """`schema` itself if it has type `kind`, else its anyOf branches of that type."""
    if schema.get("type") == kind:
        return [schema]
    return [b for b in schema.get("anyOf", []) if b.get("type") == kind]


def _literal(text: str) -> str:
    """`text` as a regular expression matching itself (escapes that ECMA and Python read alike)."""
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}/" else c for c in text)


def state_deployment(schema: Any, settings: Settings) -> None:
    """Write the deployment's limits (`service.protocol.deployment`) into a document (in place)."""
    if isinstance(schema, list):
        for sub in schema:
            state_deployment(sub, settings)
        return
    if not isinstance(schema, dict):
        return
    limit = schema.pop(DEPLOYMENT_KEY, None)
    if limit == "served_model":  # `base` or `base:<profile id>`; empty: the base
        for b in _branches(schema, "string"):
            b["pattern"] = f"^(?:{_literal(settings.model)}(?::{UUID_PATTERN.strip('^$')})?)?$"
    elif limit == "build_model":
        for b in _branches(schema, "string"):
            b.pop("pattern", None)
            b["enum"] = allowed_models(settings)
    elif limit == "max_new_tokens":
        for b in _branches(schema, "integer"):
            b["maximum"] = settings.max_new_tokens
    elif limit == "max_profiles":
        for b in _branches(schema, "array"):
            b["maxItems"] = settings.max_profiles_per_request
    elif limit == "max_adapter_chars":  # base64 of MAX_ADAPTER_BYTES
        for b in _branches(schema, "string"):
            b["maxLength"] = 4 * (settings.max_adapter_bytes // 3 + 1)
    elif limit is not None:
        raise ValueError(f"unknown deployment limit {limit!r}")
    for sub in schema.values():
        state_deployment(sub, settings)


def openapi_document(app: Flask) -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        defs = schema.pop("$defs", {})
        if mode == "validation":  # what read_json holds every request body to
            for sub in (schema, *defs.values()):
                state_json_bounds(sub)
            schemas.setdefault(JSON_VALUE, JSON_VALUE_SCHEMA)
        for name, sub in defs.items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, dict[str, Any]] = {}
    for path, method, spec in route_specs(app):
        if spec is None:
            raise RuntimeError(f"{method} {path} is not declared with service.api.openapi.api_route")
        op: dict[str, Any] = {"summary": spec.summary, "tags": [spec.tag],
                              "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_')}"
                              .replace("{", "").replace("}", "").replace("-", "_").replace(".", "_")}
        params = [{"name": m.group("name"), "in": "path", "required": True,
                   "schema": {"type": "string", **({"pattern": PATH_PATTERNS[m.group("name")]}
                                                   if m.group("name") in PATH_PATTERNS else {})}}
                  for m in _CONVERTER.finditer(_rule_of(app, path, method))]
        if spec.query is not None:
            qschema = spec.query.model_json_schema()
            required = set(qschema.get("required", []))
            for name, prop in qschema.get("properties", {}).items():
                state_json_bounds(prop)
                params.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                               **({"description": prop["description"]} if "description" in prop else {})})
        if params:
            op["parameters"] = params
        if spec.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(spec.body, "validation")},
                                             **{kind: {"schema": {"type": "string", "format": "binary"}}
                                                for kind in spec.uploads}}}
        responses: dict[str, Any] = {}
        for status, kind in spec.responses.items():
            entry: dict[str, Any] = {"description": _describe(status)}
            if isinstance(kind, str):
                entry["content"] = {kind: {"schema": {"type": "string"} if kind.startswith("text/")
                                           else {"type": "string", "format": "binary"}}}
            elif kind is not None:
                entry["content"] = {"application/json": {"schema": ref(kind, "serialization")}}
            responses[str(status)] = entry
        error_codes = set(spec.errors)
        if spec.body is not None:
            error_codes |= {400, 413, 422}
        if spec.query is not None:
            error_codes.add(422)
        if params and any(p["in"] == "path" for p in params):
            error_codes |= {404, 422}  # a malformed or unknown id (check_path_args, the view's lookup)
        if spec.auth:
            error_codes |= {401, 429}
        for status in sorted(error_codes):
            responses[str(status)] = {"description": _STANDARD_ERRORS.get(status, "error"),
                                      "content": {"application/json": {"schema": ref(ErrorResponse,
                                                                                     "serialization")}}}
        op["responses"] = responses
        if spec.auth:
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method.lower()] = op
    state_deployment(paths, context.state(app).settings)
    state_deployment(schemas, context.state(app).settings)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": API_TITLE, "version": API_VERSION,
                 "description": "Steering profiles for users and groups, and generation under them."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items())),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _rule_of(app: Flask, path: str, method: str) -> str:
    for rule in app.url_map.iter_rules():
        if openapi_path(rule.rule) == path and method in (rule.methods or ()):
            return rule.rule
    return path


def _describe(status: int) -> str:
    return {200: "OK", 201: "created", 202: "accepted", 204: "no content"}.get(status, str(status))


bp = Blueprint("openapi", __name__)


@api_route(bp, "/openapi.json", "GET", summary="this document", auth=False,
           responses={200: "application/json"})
def get_openapi() -> Response:
    return current_app.response_class(json.dumps(openapi_document(current_app)), mimetype="application/json")
