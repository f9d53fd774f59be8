"""`/openapi.json` describes exactly the app's routes, and what it documents is what the app enforces."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import fixture_items, make_group, mark_ready, request_profile
from flask import request

from service import create_app
from service.api.openapi import is_api_rule, openapi_path

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def url_map_operations(app) -> set[tuple[str, str]]:
    return {(openapi_path(rule.rule), method.lower()) for rule in app.url_map.iter_rules()
            if is_api_rule(rule) for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}


def test_document_matches_the_url_map(client, app):
    doc = client.get("/openapi.json").json
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == url_map_operations(app)
    assert doc["openapi"].startswith("3.")
    op_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))


def test_every_reference_resolves(client):
    doc = client.get("/openapi.json").json
    schemas = doc["components"]["schemas"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for path, ops in doc["paths"].items():
        names = {p["name"] for op in ops.values() for p in op.get("parameters", []) if p["in"] == "path"}
        assert names == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path


def test_documented_request_bodies_are_enforced(client, auth):
    doc = client.get("/openapi.json").json
    schemas = doc["components"]["schemas"]
    checked = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert schemas[ref].get("additionalProperties") is False, ref
            url = path.replace("{uid}", "alice").replace("{gid}", "urban").replace("{profile_id}", "x")
            r = client.open(url, method=method.upper(), json={"zz_not_a_field": 1}, headers=auth)
            assert r.status_code in (404, 422), (method, path, r.status_code)
            assert str(r.status_code) in op["responses"], (method, path)
            checked += 1
    assert checked >= 5


def test_every_status_the_app_answers_is_documented(settings, tenant_key, other_tenant_key):
    app = create_app({"SETTINGS": settings, "TESTING": True})
    seen: set[tuple[str, str, int]] = set()

    @app.after_request
    def remember(response):
        if request.url_rule is not None:
            seen.add((openapi_path(request.url_rule.rule), request.method.lower(), response.status_code))
        return response

    client = app.test_client()
    auth = {"Authorization": f"Bearer {tenant_key}"}
    make_group(client, auth, members=["alice"])
    client.post("/v1/users/alice/opinions", json={"items": fixture_items("user_answers.jsonl")}, headers=auth)
    pid = request_profile(client, auth).json["id"]
    request_profile(client, auth)  # 200: the same profile
    client.get(f"/v1/profiles/{pid}/artifact", headers=auth)  # 409
    mark_ready(settings, pid)
    for url in (f"/v1/profiles/{pid}", f"/v1/profiles/{pid}/artifact", "/v1/profiles", "/v1/users/alice",
                "/v1/groups/urban", "/v1/users/alice/opinions", "/v1/groups/urban/opinions?view=sample",
                "/v1/users/nobody", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        client.get(url, headers=auth)
    client.put("/v1/users/alice", json={}, headers=auth)
    client.get("/v1/profiles", headers={"Authorization": "Bearer nope"})
    client.delete(f"/v1/profiles/{pid}", headers=auth)
    doc = client.get("/openapi.json").json
    for path, method, status in sorted(seen):
        assert str(status) in doc["paths"][path][method]["responses"], (method, path, status)
    assert len({(p, m) for p, m, _ in seen}) >= 12
