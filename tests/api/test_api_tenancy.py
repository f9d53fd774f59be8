"""Tenant isolation: a key of tenant B never sees, changes or uses tenant A's users, groups, opinions or
profiles. Every route of these blueprints with an id in its path must have a case here (checked against
the url map)."""

from __future__ import annotations

from api_helpers import fixture_items, make_group, mark_ready, request_profile

# (method, url rule) -> how tenant B's request on tenant A's resource must be answered.
CASES = {
    ("GET", "/v1/users/<uid>"): ("/v1/users/alice", None, 404),
    ("PUT", "/v1/users/<uid>"): ("/v1/users/alice", {"attributes": {"owner": "b"}}, 201),  # B's own alice
    ("GET", "/v1/users/<uid>/opinions"): ("/v1/users/carol/opinions", None, 404),
    ("POST", "/v1/users/<uid>/opinions"): ("/v1/users/carol/opinions", "answers", 404),
    ("GET", "/v1/groups/<gid>"): ("/v1/groups/urban", None, 404),
    ("PUT", "/v1/groups/<gid>"): ("/v1/groups/urban", {"members": []}, 201),  # B's own group
    ("GET", "/v1/groups/<gid>/opinions"): ("/v1/groups/urban/opinions", None, 404),
    ("POST", "/v1/groups/<gid>/opinions"): ("/v1/groups/urban/opinions", "answers", 404),
    ("GET", "/v1/profiles/<profile_id>"): ("/v1/profiles/{pid}", None, 404),
    ("DELETE", "/v1/profiles/<profile_id>"): ("/v1/profiles/{pid}", None, 404),
    ("GET", "/v1/profiles/<profile_id>/artifact"): ("/v1/profiles/{pid}/artifact", None, 404),
}


# The blueprints these tests cover; chat and experiments test their own isolation.
BLUEPRINTS = ("users", "groups", "opinions", "profiles")


def test_every_route_with_an_id_has_a_tenancy_case(app):
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules()
              if rule.endpoint.split(".")[0] in BLUEPRINTS and "<" in rule.rule
              for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    missing = sorted(routes - set(CASES))
    assert not missing, f"add tenant-isolation cases for {missing}"


def test_other_tenant_gets_404_and_changes_nothing(client, auth, other_auth, settings):
    make_group(client, auth, members=["alice"])
    client.put("/v1/users/carol", json={"attributes": {"owner": "a"}}, headers=auth)
    answers = fixture_items("user_answers.jsonl")
    client.post("/v1/users/carol/opinions", json={"items": answers}, headers=auth)
    pid = request_profile(client, auth).json["id"]
    mark_ready(settings, pid)
    snapshot = {
        "carol": client.get("/v1/users/carol", headers=auth).json,
        "alice": client.get("/v1/users/alice", headers=auth).json,
        "urban": client.get("/v1/groups/urban", headers=auth).json,
        "opinions": client.get("/v1/groups/urban/opinions", headers=auth).json,
        "profile": client.get(f"/v1/profiles/{pid}", headers=auth).json,
    }

    # The 404s first: B's PUTs create B's own alice and urban, which B may then read.
    for (method, _rule), (path, body, status) in sorted(CASES.items(), key=lambda kv: kv[1][2] != 404):
        json_body = {"items": answers[:2]} if body == "answers" else body
        r = client.open(path.format(pid=pid), method=method, json=json_body, headers=other_auth)
        assert r.status_code == status, (method, path, r.json)
        if status == 404:
            assert r.json["error"]["type"] == "not_found"

    # Tenant B's PUTs made B's own alice and urban; A's are as they were.
    assert client.get("/v1/users/alice", headers=other_auth).json["attributes"] == {"owner": "b"}
    assert client.get("/v1/users/alice", headers=auth).json == snapshot["alice"]
    assert client.get("/v1/users/carol", headers=auth).json == snapshot["carol"]
    assert client.get("/v1/groups/urban", headers=auth).json == snapshot["urban"]
    assert client.get("/v1/groups/urban/opinions", headers=auth).json == snapshot["opinions"]
    assert client.get(f"/v1/profiles/{pid}", headers=auth).json == snapshot["profile"]
    assert client.get(f"/v1/profiles/{pid}/artifact", headers=auth).status_code == 200


def test_other_tenant_cannot_list_build_from_or_reference_a_profile(client, auth, other_auth, settings):
    make_group(client, auth, members=["alice"])
    pid = request_profile(client, auth).json["id"]
    assert client.get("/v1/profiles", headers=other_auth).json["profiles"] == []
    assert [p["id"] for p in client.get("/v1/profiles", headers=auth).json["profiles"]] == [pid]
    r = client.get(f"/v1/profiles?after={pid}", headers=other_auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "after"
    r = client.get("/v1/profiles?subject_kind=group&subject_id=urban", headers=other_auth)
    assert r.json["profiles"] == []

    # A's group as the subject of B's build: not found, nothing created.
    r = request_profile(client, other_auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "subject.id"
    # A's profile as B's user's default, A's user as a member of B's group: refused.
    r = client.put("/v1/users/bob", json={"default_profile_id": pid}, headers=other_auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "default_profile_id"
    r = client.put("/v1/groups/mine", json={"members": ["alice"]}, headers=other_auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "members[0]"
    assert client.get("/v1/profiles", headers=other_auth).json["profiles"] == []


def test_same_names_in_two_tenants_are_separate(client, auth, other_auth):
    make_group(client, auth, n=5, members=["alice"])
    make_group(client, other_auth, n=7, members=["alice"])
    a = client.get("/v1/groups/urban/opinions", headers=auth).json
    b = client.get("/v1/groups/urban/opinions", headers=other_auth).json
    assert len(a["items"]) == 5 and len(b["items"]) == 7
    pa, pb = request_profile(client, auth).json, request_profile(client, other_auth).json
    assert pa["id"] != pb["id"]
    assert client.get(f"/v1/profiles/{pb['id']}", headers=auth).status_code == 404
