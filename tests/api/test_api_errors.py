"""Bad input becomes one JSON error shape with the right status and the field named; nothing is stored."""

from __future__ import annotations

import dataclasses

import pytest
from api_helpers import fixture_items

from service import create_app

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def error(r) -> dict:
    assert r.is_json, r.data[:200]
    assert set(r.json) == {"error"} and set(r.json["error"]) == {"type", "message", "field"}
    return r.json["error"]


def test_malformed_json_is_400(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    for raw in (b"{not json", b"\xff\xfe", b""):
        r = client.post("/v1/users/alice/opinions", data=raw, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400
        e = error(r)
        assert e["type"] == "invalid_json" and e["field"] == "body"


def test_wrong_shapes_and_types_are_422_naming_the_field(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    cases = [
        ([1, 2], "body"),
        ({"attributes": "tall"}, "attributes"),
        ({"attributes": {}, "nickname": "al"}, "nickname"),
    ]
    for body, field in cases:
        e = error(client.put("/v1/users/alice", json=body, headers=auth))
        assert e["field"] == field and e["type"] == "validation_error", (body, e)
    item = fixture_items("user_answers.jsonl", 1)[0]
    cases = [
        ({"items": []}, "items"),
        ({"items": [{**item, "colour": "red"}]}, "items[0].colour"),
        ({"items": [item, {**item, "id": "x", "options": "A or B"}]}, "items[1].options"),
        ({"items": [{**item, "answer": True}]}, "items[0].answer"),
        ({"items": [{k: v for k, v in item.items() if k != "question"}]}, "items[0].question"),
    ]
    for body, field in cases:
        r = client.post("/v1/users/alice/opinions", json=body, headers=auth)
        assert r.status_code == 422 and error(r)["field"] == field, (body, r.json)
    assert client.get("/v1/users/alice", headers=auth).json["opinions"] == 0


def test_oversized_body_is_413_and_nothing_is_stored(settings, tenant_key):
    app = create_app({"SETTINGS": dataclasses.replace(settings, max_body_bytes=4096), "TESTING": True})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {tenant_key}"}
    client.put("/v1/users/alice", json={}, headers=auth)
    items = fixture_items("user_answers.jsonl")
    big = {"items": items * 4}
    r = client.post("/v1/users/alice/opinions", json=big, headers=auth)
    assert r.status_code == 413
    e = error(r)
    assert e["type"] == "payload_too_large" and "4096" in e["message"]
    assert client.get("/v1/users/alice", headers=auth).json["opinions"] == 0
    assert client.post("/v1/users/alice/opinions", json={"items": items[:2]}, headers=auth).status_code == 201


def test_unknown_route_and_wrong_method_are_json(client, auth):
    r = client.get("/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and error(r)["type"] == "not_found"
    r = client.patch("/v1/users/alice", json={}, headers=auth)
    assert r.status_code == 405 and error(r)["type"] == "method_not_allowed"
    assert "PUT" in r.headers["Allow"]
    r = client.get("/v1/profiles/not-a-profile", headers=auth)
    assert r.status_code == 404 and error(r)["field"] == "id"


def test_unexpected_errors_are_500_without_internals(settings):
    app = create_app({"SETTINGS": settings, "TESTING": True})

    def explode():
        raise RuntimeError("secret internal detail")

    app.add_url_rule("/explode", view_func=explode)
    r = app.test_client().get("/explode")
    assert r.status_code == 500
    e = error(r)
    assert e["type"] == "internal_error" and "secret" not in e["message"]
