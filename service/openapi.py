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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from pydantic import BaseModel, ValidationError

from service import context
from service.errors import ApiError, validation_error
from service.protocol import ErrorResponse

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


def api_route(bp: Blueprint, rule: str, method: str, *, summary: str, body: type[BaseModel] | None = None,
              query: type[BaseModel] | None = None,
              responses: dict[int, type[BaseModel] | str | None] | None = None, auth: bool = True,
              errors: tuple[int, ...] = (), tag: str | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Register `view` on `bp` at `rule` for `method`; see the module docstring.

    `responses` maps status codes to a response model, a media type string (binary or streamed bodies)
    or None (no body). The view receives `body=` and `query=` keyword arguments when those are given.
    """
    spec = RouteSpec(rule=rule, methods=[method.upper()], summary=summary, tag=tag or bp.name, body=body,
                     query=query, responses=dict(responses or {200: None}), auth=auth, errors=errors)

    def decorate(view: Callable[..., Any]) -> Any:
        @wraps(view)
        def endpoint(**path_args: Any) -> Response:
            if auth:
                from service.auth import authenticate

                authenticate()
            kwargs = dict(path_args)
            if body is not None:
                kwargs["body"] = parse_body(body)
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


def parse_body(model: type[BaseModel]) -> BaseModel:
    """The request's JSON body validated by `model`: 400 if it is not JSON, 422 naming the field if
    invalid."""
    raw = request.get_data(cache=True)  # werkzeug enforces MAX_CONTENT_LENGTH here (413)
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object", "body")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        message = f"the body is not valid JSON: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else \
            "the body is not UTF-8 JSON"
        raise ApiError(400, "invalid_json", message, "body") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object", "body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise ApiError(422, "validation_error", "give this query parameter once", key)
        args[key] = values[0]
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise validation_error(exc) from None


def to_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    status, headers = 200, {}
    if isinstance(result, tuple):
        result, status, *rest = result
        headers = rest[0] if rest else {}
    if result is None:
        response = current_app.response_class(status=status)
    else:
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        response = current_app.response_class(json.dumps(payload, separators=(",", ":")), status=status,
                                              mimetype="application/json")
    for name, value in headers.items():
        response.headers[name] = value
    return response


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
PAGE_BLUEPRINTS = frozenset({"console"})


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


def openapi_document(app: Flask) -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, dict[str, Any]] = {}
    for path, method, spec in route_specs(app):
        if spec is None:
            raise RuntimeError(f"{method} {path} is not declared with service.openapi.api_route")
        op: dict[str, Any] = {"summary": spec.summary, "tags": [spec.tag],
                              "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_')}"
                              .replace("{", "").replace("}", "").replace("-", "_").replace(".", "_")}
        params = [{"name": m.group("name"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for m in _CONVERTER.finditer(_rule_of(app, path, method))]
        if spec.query is not None:
            qschema = spec.query.model_json_schema()
            required = set(qschema.get("required", []))
            for name, prop in qschema.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                               **({"description": prop["description"]} if "description" in prop else {})})
        if params:
            op["parameters"] = params
        if spec.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(spec.body, "validation")}}}
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
