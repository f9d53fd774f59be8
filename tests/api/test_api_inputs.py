"""Inputs that once answered 500 (or were silently cut or accepted) answer a 4xx naming the field, on SQLite
and PostgreSQL: huge integers, deep nesting, out-of-range seeds and weights, huge feedback values, lone
surrogates and NUL in text, ids longer than the databases store, a trailing newline in a path id, chunked
bodies over the limit. No response carries NaN."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import uuid

import pytest
from api_helpers import fixture_items, make_group
from runtime import REPO, stack_settings

from service.api.openapi import MAX_JSON_DEPTH, dump_json


def error(r) -> dict:
    assert r.is_json, r.data[:200]
    return r.json["error"]


def post_raw(client, path: str, raw: str | bytes, auth: dict[str, str]):
    return client.post(path, data=raw, headers={**auth, "Content-Type": "application/json"})


def chat_body(**extra) -> dict:
    return {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            **extra}


def test_a_5000_digit_integer_is_422(client, auth):
    r = client.put("/v1/users/alice", data='{"attributes": {"n": ' + "7" * 5000 + "}}",
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422 and error(r)["field"] == "attributes.n"
    r = client.put("/v1/users/alice", json={"attributes": {"n": 2**64}}, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "attributes.n"
    assert client.get("/v1/users/alice", headers=auth).status_code == 404


def test_deep_nesting_is_400(client, auth):
    for depth in (50_000, MAX_JSON_DEPTH + 2):
        raw = '{"attributes": {"a": ' + "[" * depth + "]" * depth + "}}"
        r = client.put("/v1/users/alice", data=raw, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400 and error(r)["type"] == "invalid_json", depth
    shallow = '{"attributes": {"a": ' + "[" * 8 + "]" * 8 + "}}"
    r = client.put("/v1/users/alice", data=shallow, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 201


def test_non_finite_and_huge_numbers_are_422(client, auth):
    for raw, field in (('{"attributes": {"x": NaN}}', "attributes.x"),
                       ('{"attributes": {"x": -Infinity}}', "attributes.x"),
                       ('{"attributes": {"x": 1e400}}', "attributes.x"),
                       ('{"attributes": {"x": [1, 1e308]}}', "attributes.x[1]")):
        r = client.put("/v1/users/alice", data=raw, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 422 and error(r)["field"] == field, raw


def test_seed_out_of_range_is_422(client, auth):
    r = client.post("/v1/chat/completions", json=chat_body(seed=2**70), headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "seed"
    r = client.post("/v1/chat/completions", json=chat_body(seed=2**63), headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "seed"


def test_experiment_weights_and_feedback_values_are_bounded(client, auth, settings):
    body = {"name": "x", "variants": [{"name": "a", "weight": 1e308}, {"name": "b", "weight": 1e308}]}
    r = client.post("/v1/experiments", json=body, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "variants[0].weight"
    experiment = str(uuid.uuid4())
    for value in (1e300, -1e300):
        r = client.post(f"/v1/experiments/{experiment}/feedback", json={"response_id": "r", "value": value},
                        headers=auth)
        assert r.status_code == 422 and error(r)["field"] == "value"
    r = client.post("/v1/chat/completions",
                    json=chat_body(steering={"profiles": [{"id": str(uuid.uuid4()), "weight": 1e9}]}), headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "steering.profiles[0].weight"


def test_score_ordinals_that_would_give_nan_are_422(client, auth):
    q = {"question": "q?", "options": ["a", "b"], "ordinal": [-1.7e308, 1.7e308], "target": [0.5, 0.5]}
    r = client.post("/v1/score", json={"questions": [q]}, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "questions[0].ordinal[0]"


def test_lone_surrogates_and_nul_in_text_are_422(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    item = fixture_items("user_answers.jsonl", 1)[0]
    for bad in ("\\ud800", "a\\u0000b"):
        raw = json.dumps({"items": [item]}).replace('"question": "', '"question": "' + bad, 1)
        r = post_raw(client, "/v1/users/alice/opinions", raw, auth)
        assert r.status_code == 422 and error(r)["field"] == "items[0].question", (bad, r.json)
        raw = json.dumps(chat_body()).replace('"content": "hi"', f'"content": "hi{bad}"')
        r = post_raw(client, "/v1/chat/completions", raw, auth)
        assert r.status_code == 422 and error(r)["field"] == "messages[0].content", (bad, r.json)
        raw = '{"attributes": {"k' + bad + '": 1}}'
        r = client.put("/v1/users/bob", data=raw, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 422, (bad, r.json)
    assert client.get("/v1/users/alice", headers=auth).json["opinions"] == 0
    assert client.get("/v1/profiles?after=%00", headers=auth).status_code == 422
    assert client.get("/v1/profiles/%00", headers=auth).status_code == 404


def test_ids_longer_than_the_databases_store_are_422(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    item = {**fixture_items("user_answers.jsonl", 1)[0], "id": "x" * 201}
    r = client.post("/v1/users/alice/opinions", json={"items": [item]}, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "items[0].id"
    r = client.post("/v1/users/alice/opinions", json={"items": [{**item, "id": "x" * 200}]}, headers=auth)
    assert r.status_code == 201
    r = client.post("/v1/chat/completions", json=chat_body(user="u" * 201), headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "user"


def test_a_path_id_with_a_trailing_newline_is_422(client, auth):
    r = client.put("/v1/users/a%0A", json={}, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "uid"
    r = client.put("/v1/groups/g%0A", json={"members": []}, headers=auth)
    assert r.status_code == 422 and error(r)["field"] == "gid"
    make_group(client, auth, "urban", 2)  # a well-formed id still works


def test_a_non_finite_number_is_never_written_as_nan(app):
    with app.test_request_context("/v1/score"):
        text = dump_json({"probs": [0.5, float("nan")], "x": {"y": float("inf")}})
    assert json.loads(text) == {"probs": [0.5, None], "x": {"y": None}}


def test_a_chunked_body_over_the_limit_is_413_under_gunicorn(tmp_path, redis_url):
    """gunicorn hands werkzeug a chunked body as a terminated stream, which werkzeug cuts at the limit."""
    from service.auth import create_key
    from service.cli.stack import child_env, gunicorn_command
    from service.store import db

    settings = stack_settings(tmp_path / "stack", redis_url, max_body_bytes=4096, max_upload_bytes=4096)
    with db.session_scope(settings) as session:
        key = create_key(session, "t")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**child_env(settings, redis_url), "MAX_BODY_BYTES": "4096", "MAX_UPLOAD_BYTES": "4096",
           "PYTHONPATH": str(REPO)}
    command = gunicorn_command("127.0.0.1", port, 1)
    command[command.index("--threads") + 1] = "2"
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("gunicorn did not start")
                time.sleep(0.2)
            finally:
                conn.close()

        def chunked(method: str, path: str, body: bytes, content_type: str = "application/json") -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, body=iter([body[i:i + 1000] for i in range(0, len(body), 1000)]),
                             headers={"Authorization": f"Bearer {key}", "Content-Type": content_type,
                                      "Transfer-Encoding": "chunked"}, encode_chunked=True)
                return conn.getresponse().status
            finally:
                conn.close()

        big = json.dumps({"attributes": {"bio": "x" * 8000}}).encode()
        assert chunked("PUT", "/v1/users/big", big) == 413
        assert chunked("PUT", "/v1/users/small", json.dumps({"attributes": {"bio": "x" * 100}}).encode()) == 201
        # An uploaded table has its own limit, held the same way.
        rows = "".join(f'Question {i}?,"[""Yes"", ""No""]",Yes\n' for i in range(200))
        table = ("question,options,answer\n" + rows).encode()
        assert len(table) > 4096
        assert chunked("POST", "/v1/users/small/opinions", table, "text/csv") == 413
        assert chunked("POST", "/v1/users/small/opinions", table[:table.index(b"Question 20?")], "text/csv") == 201
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/v1/users/big", headers={"Authorization": f"Bearer {key}"})
            assert conn.getresponse().status == 404
        finally:
            conn.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
