"""Users, groups and opinion items over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from api_helpers import fixture_items

from service.store import db

ANSWERS = fixture_items("user_answers.jsonl")
URBAN = fixture_items("opinions_group_urban.jsonl")


def test_put_and_get_user(client, auth):
    r = client.put("/v1/users/alice", json={"attributes": {"city": "Lyon"}}, headers=auth)
    assert r.status_code == 201
    assert r.json["uid"] == "alice" and r.json["attributes"] == {"city": "Lyon"} and r.json["opinions"] == 0
    r = client.put("/v1/users/alice", json={"attributes": {"city": "Nantes"}}, headers=auth)
    assert r.status_code == 200 and r.json["attributes"] == {"city": "Nantes"}
    assert r.json["created_at"] < r.json["updated_at"]
    got = client.get("/v1/users/alice", headers=auth)
    assert got.status_code == 200 and got.json["attributes"] == {"city": "Nantes"}
    assert client.get("/v1/users/bob", headers=auth).status_code == 404


def test_bad_ids_are_rejected(client, auth):
    r = client.put("/v1/users/-x", json={}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "uid"
    r = client.put("/v1/groups/" + "g" * 201, json={}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "gid"


def test_group_members_must_exist_and_nothing_is_stored(client, auth, settings):
    client.put("/v1/users/alice", json={}, headers=auth)
    r = client.put("/v1/groups/g", json={"members": ["alice", "ghost"]}, headers=auth)
    assert r.status_code == 404
    assert r.json["error"]["field"] == "members[1]"
    assert client.get("/v1/groups/g", headers=auth).status_code == 404
    client.put("/v1/users/bob", json={}, headers=auth)
    r = client.put("/v1/groups/g", json={"members": ["bob", "alice", "bob"]}, headers=auth)
    assert r.status_code == 201 and r.json["members"] == ["alice", "bob"]
    r = client.put("/v1/groups/g", json={"members": ["bob"]}, headers=auth)  # replaces the list
    assert r.status_code == 200 and r.json["members"] == ["bob"]
    assert client.get("/v1/users/bob", headers=auth).json["groups"] == ["g"]
    assert client.get("/v1/users/alice", headers=auth).json["groups"] == []


def test_user_opinions_round_trip(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    r = client.post("/v1/users/alice/opinions", json={"items": ANSWERS}, headers=auth)
    assert r.status_code == 201
    assert r.json["stored"] == len(ANSWERS) and r.json["total"] == len(ANSWERS)
    got = client.get("/v1/users/alice/opinions", headers=auth).json
    assert [it["id"] for it in got["items"]] == [a["id"] for a in ANSWERS]
    first = got["items"][0]
    # "answer": "A few times a week" became a one-hot target on that option.
    assert first["target"][ANSWERS[0]["options"].index(ANSWERS[0]["answer"])] == 1.0
    assert sum(first["target"]) == 1.0
    assert got["sample_hash"] == r.json["sample_hash"]


def test_one_bad_item_rejects_the_whole_batch(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    items = [dict(a) for a in ANSWERS[:4]]
    items[2] = {**items[2], "answer": "not an option"}
    r = client.post("/v1/users/alice/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 422
    assert r.json["error"]["field"] == "items[2].answer"
    assert client.get("/v1/users/alice/opinions", headers=auth).json["items"] == []
    items[2] = {"question": "q?", "options": ["a", "b"], "target": [0.5, 0.6]}
    r = client.post("/v1/users/alice/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "items[2].target"
    items[2] = {"question": "q?", "options": ["a", "b"], "target": ["0.5", 0.5]}  # a string is not a number
    r = client.post("/v1/users/alice/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"].startswith("items[2].target")
    assert client.get("/v1/users/alice", headers=auth).json["opinions"] == 0


def test_duplicate_item_in_one_batch_is_rejected(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    r = client.post("/v1/users/alice/opinions", json={"items": [ANSWERS[0], ANSWERS[1], ANSWERS[0]]},
                    headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "items[2].id"


def test_posting_an_item_again_replaces_it_and_changes_the_sample(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    first = client.post("/v1/users/alice/opinions", json={"items": ANSWERS[:3]}, headers=auth).json
    changed = {**ANSWERS[1], "answer": 3}
    second = client.post("/v1/users/alice/opinions", json={"items": [changed]}, headers=auth).json
    assert second["total"] == 3 and second["stored"] == 1
    assert second["sample_hash"] != first["sample_hash"]
    items = client.get("/v1/users/alice/opinions", headers=auth).json["items"]
    assert [it["id"] for it in items] == [a["id"] for a in ANSWERS[:3]]  # order kept
    assert items[1]["target"] == [0.0, 0.0, 0.0, 1.0]


def test_items_without_id_get_a_stable_one(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    item = {k: v for k, v in ANSWERS[0].items() if k != "id"}
    client.post("/v1/users/alice/opinions", json={"items": [item]}, headers=auth)
    r = client.post("/v1/users/alice/opinions", json={"items": [{**item, "answer": 0}]}, headers=auth)
    assert r.json["total"] == 1  # same question and options: the same item, replaced


def test_group_sample_aggregates_members_answers(client, auth, settings):
    q = {"question": "Pineapple on pizza?", "options": ["Yes", "Maybe", "No"], "ordinal": [1, 2, 3]}
    answers = {"u1": 0, "u2": 0, "u3": 2, "u4": 1}
    for uid, answer in answers.items():
        client.put(f"/v1/users/{uid}", json={}, headers=auth)
        client.post(f"/v1/users/{uid}/opinions", json={"items": [{**q, "id": "pizza", "answer": answer}]},
                    headers=auth)
    client.put("/v1/users/outsider", json={}, headers=auth)
    client.post("/v1/users/outsider/opinions", json={"items": [{**q, "id": "pizza", "answer": 2}]}, headers=auth)
    client.put("/v1/groups/g", json={"members": list(answers)}, headers=auth)
    own = URBAN[:2]
    client.post("/v1/groups/g/opinions", json={"items": own}, headers=auth)

    r = client.get("/v1/groups/g/opinions?view=sample", headers=auth).json
    assert [it["id"] for it in r["items"]] == [own[0]["id"], own[1]["id"], "pizza"]
    pooled = r["items"][2]["target"]
    assert pooled == pytest.approx([0.5, 0.25, 0.25])  # u1,u2: Yes; u4: Maybe; u3: No; outsider not counted
    assert [it["id"] for it in client.get("/v1/groups/g/opinions", headers=auth).json["items"]] == \
        [own[0]["id"], own[1]["id"]]

    # The group's own item for the same question takes precedence over its members' answers.
    client.post("/v1/groups/g/opinions", json={"items": [{**q, "id": "pizza", "target": [0.1, 0.1, 0.8]}]},
                headers=auth)
    r = client.get("/v1/groups/g/opinions?view=sample", headers=auth).json
    assert len(r["items"]) == 3 and r["items"][2]["target"] == pytest.approx([0.1, 0.1, 0.8])

    with db.session_scope(settings) as session:
        group = db.get_group(session, 1, "g")
        assert [it.id for it in db.subject_items(session, group.tenant_id, "group", group.id)] == \
            [own[0]["id"], own[1]["id"], "pizza"]


def test_bad_query_parameter(client, auth):
    client.put("/v1/users/alice", json={}, headers=auth)
    r = client.get("/v1/users/alice/opinions?view=everything", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "view"
    r = client.get("/v1/users/alice/opinions?colour=red", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "colour"


def test_opinions_of_unknown_subject_404(client, auth):
    r = client.post("/v1/users/nobody/opinions", json={"items": ANSWERS[:1]}, headers=auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "uid"
    r = client.get("/v1/groups/nobody/opinions", headers=auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "gid"
