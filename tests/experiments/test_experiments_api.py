"""Experiments over HTTP: creation and validation, stored assignment, pause/resume/stop, scope, feedback and
results (checked against scipy), tenant isolation. Exposures are recorded with the functions the chat
endpoint calls; the full run through chat is in test_experiments_live.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from api_helpers import make_group, mark_ready, profile_bytes, request_profile
from scipy import stats
from sqlalchemy import func, select

from service.api.openapi import openapi_document, openapi_path
from service.experiments import experiments as ex
from service.experiments.errors import Invalid, NotFound
from service.experiments.stats import assign_bucket, choose_variant
from service.store import db


@pytest.fixture(autouse=True)
def every_status_is_documented(app):
    """Whatever status an experiments route answers in these tests must be in /openapi.json."""
    from flask import request

    seen: set[tuple[str, str, int]] = set()

    @app.after_request
    def remember(response):
        if request.url_rule is not None and request.url_rule.endpoint.startswith("experiments."):
            seen.add((openapi_path(request.url_rule.rule), request.method.lower(), response.status_code))
        return response

    yield
    with app.app_context():
        doc = openapi_document(app)
    for path, method, status in sorted(seen):
        assert str(status) in doc["paths"][path][method]["responses"], (method, path, status)


def count(settings, model) -> int:
    with db.session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(model)))


def ready_profile(client, auth, settings, layer: int, gid: str = "urban") -> str:
    r = request_profile(client, auth, gid=gid, params={"layer": layer, "strength": 1.0})
    assert r.status_code == 202, r.json
    mark_ready(settings, r.json["id"], profile_bytes(float(layer)))
    return r.json["id"]


@pytest.fixture
def profiles(client, auth, settings) -> list[str]:
    """Two ready profiles of group `urban` (members u1..u3), as a worker would leave them."""
    make_group(client, auth, "urban", n=6, members=["u1", "u2", "u3"])
    return [ready_profile(client, auth, settings, layer) for layer in (3, 4)]


def experiment_body(profiles: list[str], **extra) -> dict:
    body = {"name": "urban vs plain", "reward": "thumbs",
            "variants": [{"name": "plain", "weight": 1},
                         {"name": "urban", "weight": 1, "profiles": [{"id": profiles[0], "weight": 1.0}]}]}
    body.update(extra)
    return body


def create(client, auth, body) -> dict:
    r = client.post("/v1/experiments", json=body, headers=auth)
    assert r.status_code == 201, r.json
    return r.json


def test_the_readmes_experiment_request_creates_a_running_experiment(client, auth, profiles):
    """README.md shows `POST /v1/experiments` with its body: that body, with a real profile id, is accepted."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = re.search(r"/v1/experiments -d '\n(\{.*?\})'", readme, re.S)
    assert shown is not None, "README.md no longer shows an experiment request"
    exp = create(client, auth, json.loads(shown.group(1).replace("<profile id>", profiles[0])))
    assert exp["state"] == "running" and exp["control"] == "plain" and exp["reward"] == "thumbs", exp
    assert [(v["name"], [p["id"] for p in v["profiles"]]) for v in exp["variants"]] == [("plain", []),
                                                                                       ("rural", [profiles[0]])]


def expose(settings, exp_id: str, user: str, response_id: str, tenant: str = "tenant-a"):
    """What the chat endpoint does around one generation: resolve the variant, then record the exposure."""
    with db.session_scope(settings) as session:
        tenant_id = db.get_or_create_tenant(session, tenant).id
        variant, blend = ex.resolve_experiment(session, tenant_id, exp_id, user)
        ex.record_exposure(session, tenant_id, exp_id, variant, user, response_id)
    return variant, blend


def test_create_get_list(client, auth, other_auth, profiles):
    exp = create(client, auth, experiment_body(profiles, variants=[
        {"name": "plain", "weight": 1}, {"name": "urban", "weight": 3, "profiles": [{"id": profiles[0]}]},
        {"name": "blend", "weight": 0, "profiles": [{"id": profiles[0], "weight": 0.5},
                                                    {"id": profiles[1], "weight": 0.5}]}], control="urban"))
    assert exp["status"] == "running" and exp["state"] == "running" and exp["control"] == "urban"
    assert [v["share"] for v in exp["variants"]] == [0.25, 0.75, 0.0]
    assert exp["variants"][1]["profiles"] == [{"id": profiles[0], "weight": 1.0}]
    assert [v["is_control"] for v in exp["variants"]] == [False, True, False]
    got = client.get(f"/v1/experiments/{exp['id']}", headers=auth)
    assert got.status_code == 200 and got.json == exp
    assert client.get(f"/v1/experiments/{exp['id']}", headers=other_auth).status_code == 404
    second = create(client, auth, experiment_body(profiles, name="again"))
    page = client.get("/v1/experiments?limit=1", headers=auth).json
    assert [e["id"] for e in page["experiments"]] == [second["id"]] and page["next_after"] == second["id"]
    rest = client.get(f"/v1/experiments?limit=1&after={second['id']}", headers=auth).json
    assert [e["id"] for e in rest["experiments"]] == [exp["id"]] and rest["next_after"] is None
    assert client.get("/v1/experiments", headers=other_auth).json["experiments"] == []


def test_bad_input_is_rejected_and_nothing_stored(client, auth, other_auth, settings, profiles):
    # Tenant B's profile, and a profile of A still queued.
    make_group(client, other_auth, "urban", n=6)
    theirs = ready_profile(client, other_auth, settings, 3)
    queued = request_profile(client, auth, params={"layer": 5, "strength": 1.0}).json["id"]
    ok = experiment_body(profiles)
    cases = [
        ({**ok, "variants": ok["variants"][:1]}, 422, "variants"),
        ({**ok, "variants": [{**v, "weight": 0} for v in ok["variants"]]}, 422, "variants"),
        ({**ok, "variants": [ok["variants"][0], {**ok["variants"][1], "weight": -1}]}, 422, "variants[1].weight"),
        ({**ok, "variants": [ok["variants"][0], {**ok["variants"][1], "name": "plain"}]}, 422, "variants[1].name"),
        ({**ok, "control": "nope"}, 422, "control"),
        ({**ok, "variants": [ok["variants"][0], {"name": "b", "profiles": [{"id": theirs}]}]}, 404,
         "variants[1].profiles[0].id"),
        ({**ok, "variants": [ok["variants"][0], {"name": "b", "profiles": [{"id": queued}]}]}, 409,
         "variants[1].profiles[0].id"),
        ({**ok, "variants": [ok["variants"][0], {"name": "b", "profiles": [{"id": profiles[0]},
                                                                         {"id": profiles[0]}]}]}, 422,
         "variants[1].profiles[1].id"),
        ({**ok, "scope": {"group": "nowhere"}}, 404, "scope.group"),
        ({**ok, "ends_at": "2001-01-01T00:00:00Z"}, 422, "ends_at"),
        ({**ok, "ends_at": "2999-01-01T00:00:00"}, 422, "ends_at"),  # no time zone
        ({**ok, "reward": "stars"}, 422, "reward"),
        ({**ok, "colour": "red"}, 422, "colour"),
        ({**ok, "variants": [ok["variants"][0], {"name": "b", "weight": "1"}]}, 422, "variants[1].weight"),
    ]
    for body, status, field in cases:
        r = client.post("/v1/experiments", json=body, headers=auth)
        assert (r.status_code, r.json["error"]["field"]) == (status, field), (body, r.json)
    assert count(settings, db.Experiment) == 0 and count(settings, db.ExperimentVariant) == 0


def test_assignment_is_stored_and_survives_weight_changes(client, auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles))
    users = [f"user-{i}" for i in range(60)]
    first = {u: client.post(f"/v1/experiments/{exp['id']}/assign", json={"user": u}, headers=auth).json
             for u in users}
    assert all(a["live"] for a in first.values())
    assert {a["variant"] for a in first.values()} == {"plain", "urban"}
    assert all(a["profiles"] == ([] if a["variant"] == "plain" else [{"id": profiles[0], "weight": 1.0}])
               for a in first.values())
    # The stored salt and the documented hash give the same variants (stable across processes).
    with db.session_scope(settings) as session:
        salt = session.get(db.Experiment, exp["id"]).salt
    for u, a in first.items():
        assert ["plain", "urban"][choose_variant([1, 1], assign_bucket(salt, exp["id"], u))] == a["variant"]
    # All new traffic to `urban`: the assigned keep their variant, newcomers all get `urban`.
    r = client.patch(f"/v1/experiments/{exp['id']}", json={"weights": {"plain": 0}}, headers=auth)
    assert r.status_code == 200 and [v["share"] for v in r.json["variants"]] == [0.0, 1.0]
    assert sum(v["assigned"] for v in r.json["variants"]) == len(users)
    for u in users:
        again = client.post(f"/v1/experiments/{exp['id']}/assign", json={"user": u}, headers=auth).json
        assert again["variant"] == first[u]["variant"]
    newcomers = [client.post(f"/v1/experiments/{exp['id']}/assign", json={"user": f"new-{i}"}, headers=auth)
                 .json["variant"] for i in range(20)]
    assert set(newcomers) == {"urban"}
    assert count(settings, db.Assignment) == len(users) + 20
    for weights, field in (({"plain": 0, "urban": 0}, "weights"), ({"ghost": 1}, "weights.ghost"),
                           ({"urban": -2}, "weights.urban")):
        r = client.patch(f"/v1/experiments/{exp['id']}", json={"weights": weights}, headers=auth)
        assert (r.status_code, r.json["error"]["field"]) == (422, field)
    assert client.get(f"/v1/experiments/{exp['id']}", headers=auth).json["variants"][0]["weight"] == 0.0


def test_scope_admits_only_members(client, auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles, scope={"group": "urban"}))
    assert exp["scope"] == {"group": "urban"}
    assert client.post(f"/v1/experiments/{exp['id']}/assign", json={"user": "u1"}, headers=auth).status_code == 200
    client.put("/v1/users/outsider", json={}, headers=auth)
    for user in ("outsider", "nobody"):
        r = client.post(f"/v1/experiments/{exp['id']}/assign", json={"user": user}, headers=auth)
        assert (r.status_code, r.json["error"]["field"]) == (422, "user")
    with db.session_scope(settings) as session, pytest.raises(Invalid) as err:
        ex.resolve_experiment(session, session.get(db.Experiment, exp["id"]).tenant_id, exp["id"], "outsider")
    assert err.value.field == "user"
    assert count(settings, db.Assignment) == 1


def test_pause_resume_stop(client, auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles, control="urban"))
    url = f"/v1/experiments/{exp['id']}"
    paused = client.post(f"{url}/pause", headers=auth)
    assert paused.status_code == 200 and paused.json["state"] == "paused"
    assert client.post(f"{url}/pause", headers=auth).status_code == 200  # repeating changes nothing
    a = client.post(f"{url}/assign", json={"user": "someone"}, headers=auth).json
    assert a == {"experiment_id": exp["id"], "user": "someone", "variant": "urban",
                 "profiles": [{"id": profiles[0], "weight": 1.0}], "live": False}
    assert expose(settings, exp["id"], "someone", "resp-paused")[0] == "urban"
    assert count(settings, db.Assignment) == 0 and count(settings, db.Exposure) == 0
    assert client.post(f"{url}/resume", headers=auth).json["state"] == "running"
    assert client.post(f"{url}/assign", json={"user": "someone"}, headers=auth).json["live"] is True
    stopped = client.post(f"{url}/stop", headers=auth).json
    assert stopped["state"] == "stopped" and stopped["stopped_at"] is not None
    assert client.post(f"{url}/stop", headers=auth).status_code == 200
    for action in ("resume", "pause"):
        r = client.post(f"{url}/{action}", headers=auth)
        assert r.status_code == 409 and r.json["error"]["type"] == "experiment_stopped"
    assert client.patch(url, json={"weights": {"plain": 2}}, headers=auth).status_code == 409
    assert client.post(f"{url}/assign", json={"user": "late"}, headers=auth).json["live"] is False


def test_time_window(client, auth, settings, profiles):
    later = create(client, auth, experiment_body(profiles, starts_at="2999-01-01T00:00:00+00:00"))
    assert later["state"] == "scheduled"
    assert client.post(f"/v1/experiments/{later['id']}/assign", json={"user": "x"}, headers=auth).json["live"] is False
    assert count(settings, db.Assignment) == 0


def test_feedback_is_idempotent_and_scoped(client, auth, other_auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles))
    variant, _ = expose(settings, exp["id"], "alice", "chatcmpl-1")
    url = f"/v1/experiments/{exp['id']}/feedback"
    r = client.post(url, json={"response_id": "chatcmpl-1", "thumbs": "up"}, headers=auth)
    assert r.status_code == 201
    assert {k: r.json[k] for k in ("variant", "user", "kind", "reward", "created")} == \
        {"variant": variant, "user": "alice", "kind": "thumbs", "reward": 1.0, "created": True}
    again = client.post(url, json={"response_id": "chatcmpl-1", "thumbs": "up"}, headers=auth)
    assert again.status_code == 200 and again.json["created"] is False
    changed = client.post(url, json={"response_id": "chatcmpl-1", "thumbs": False}, headers=auth)
    assert changed.status_code == 200 and changed.json["reward"] == 0.0
    assert count(settings, db.Feedback) == 1
    # Tenant B's experiment and response: invisible to A, and A's invisible to B.
    make_group(client, other_auth, "urban", n=6)
    theirs = create(client, other_auth, experiment_body([ready_profile(client, other_auth, settings, 3)]))
    expose(settings, theirs["id"], "bob", "chatcmpl-b", tenant="tenant-b")
    bad = [
        (url, {"response_id": "chatcmpl-b", "thumbs": "up"}, auth, 404, "response_id"),
        (url, {"response_id": "never-served", "thumbs": "up"}, auth, 404, "response_id"),
        (url, {"response_id": "chatcmpl-1", "thumbs": "up"}, other_auth, 404, "id"),
        (f"/v1/experiments/{theirs['id']}/feedback", {"response_id": "chatcmpl-1", "thumbs": "up"}, other_auth,
         404, "response_id"),
        (url, {"response_id": "chatcmpl-1", "rating": 4}, auth, 422, "rating"),
        (url, {"response_id": "chatcmpl-1", "thumbs": "up", "value": 1.0}, auth, 422, "value"),
        (url, {"response_id": "chatcmpl-1"}, auth, 422, "thumbs"),
        (url, {"response_id": "chatcmpl-1", "thumbs": "sideways"}, auth, 422, "thumbs"),
    ]
    for target, body, headers, status, field in bad:
        r = client.post(target, json=body, headers=headers)
        assert (r.status_code, r.json["error"]["field"]) == (status, field), (body, r.json)
    assert count(settings, db.Feedback) == 1
    with db.session_scope(settings) as session:
        assert session.scalar(select(db.Feedback.reward)) == 0.0


def test_results_match_scipy(client, auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles, reward="number",
                                               variants=[{"name": "plain"}, {"name": "urban", "profiles": [
                                                   {"id": profiles[0]}]}, {"name": "quiet", "weight": 0.5}]))
    rng = np.random.default_rng(3)
    rewards: dict[str, list[float]] = {"plain": [], "urban": [], "quiet": []}
    mean = {"plain": 0.0, "urban": 0.8, "quiet": 0.0}
    for i in range(90):
        variant, _ = expose(settings, exp["id"], f"user-{i}", f"resp-{i}")
        if i % 9 == 0:
            continue  # no feedback for some exposures
        value = float(rng.normal(mean[variant], 1.0))
        rewards[variant].append(value)
        r = client.post(f"/v1/experiments/{exp['id']}/feedback", json={"response_id": f"resp-{i}", "value": value},
                        headers=auth)
        assert r.status_code == 201
    res = client.get(f"/v1/experiments/{exp['id']}/results", headers=auth).json
    assert res["offline"]["available"] is False  # no scope, no items
    by_name = {v["name"]: v for v in res["variants"]}
    for name, values in rewards.items():
        v = by_name[name]
        assert v["feedback"] == len(values) and v["assigned"] == v["exposures"]
        assert v["reward"]["mean"] == pytest.approx(np.mean(values))
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (v["reward"]["ci_low"], v["reward"]["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        if name == "plain":
            assert v["is_control"] and v["vs_control"] is None
            continue
        ref = stats.ttest_ind(values, rewards["plain"], equal_var=False)
        assert v["vs_control"]["test"] == "welch_t"
        if min(len(values), len(rewards["plain"])) < res["min_per_arm"]:  # the split is the salted hash's
            assert v["vs_control"]["p_value"] is None and v["vs_control"]["verdict"] == "not enough data"
            assert v["vs_control"]["significant"] is False
            continue
        assert v["vs_control"]["p_value"] == pytest.approx(ref.pvalue)
        assert v["vs_control"]["significant"] == (ref.pvalue < 0.05)
        lo, hi = ref.confidence_interval(0.95)
        assert (v["vs_control"]["ci_low"], v["vs_control"]["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert sum(v["exposures"] for v in res["variants"]) == 90
    # The split against the weights (1, 1, 0.5), with the sample-ratio check of the assigned users.
    names = ["plain", "urban", "quiet"]
    assigned = [by_name[name]["assigned"] for name in names]
    assert [by_name[name]["share"] for name in names] == pytest.approx([0.4, 0.4, 0.2])
    assert [by_name[name]["observed_share"] for name in names] == pytest.approx([a / 90 for a in assigned])
    srm = res["sample_ratio"]
    assert srm["p_value"] == pytest.approx(stats.chisquare(assigned, [36, 36, 18]).pvalue)
    assert srm["threshold"] == 0.001 and srm["enough_data"] and srm["mismatch"] == (srm["p_value"] < 0.001)
    expected_winner = "urban" if by_name["urban"]["vs_control"]["significant"] else None
    assert res["winner"] == expected_winner
    png = client.get(f"/v1/experiments/{exp['id']}/results.png", headers=auth)
    assert png.status_code == 200 and png.mimetype == "image/png" and png.data[:4] == b"\x89PNG"
    other = client.get(f"/v1/experiments/{exp['id']}/results.png", headers={"Authorization": "Bearer nope"})
    assert other.status_code == 401


def test_thumbs_results_use_two_proportion_test(client, auth, settings, profiles):
    exp = create(client, auth, experiment_body(profiles))
    ups: dict[str, list[int]] = {"plain": [], "urban": []}
    for i in range(40):
        variant, _ = expose(settings, exp["id"], f"user-{i}", f"resp-{i}")
        up = (i % 4 != 0) if variant == "urban" else (i % 3 == 0)
        ups[variant].append(int(up))
        client.post(f"/v1/experiments/{exp['id']}/feedback", json={"response_id": f"resp-{i}", "thumbs": up},
                    headers=auth)
    res = client.get(f"/v1/experiments/{exp['id']}/results?offline=false", headers=auth).json
    urban = next(v for v in res["variants"] if v["name"] == "urban")
    table = [[sum(ups["urban"]), len(ups["urban"]) - sum(ups["urban"])],
             [sum(ups["plain"]), len(ups["plain"]) - sum(ups["plain"])]]
    _, p, _, _ = stats.chi2_contingency(table, correction=False)
    # The exact test where some expected cell count is under 5 (the split of users is random), else the z-test.
    assert urban["vs_control"]["test"] in ("two_proportion_z", "barnard_exact")
    if urban["vs_control"]["test"] == "two_proportion_z":
        assert urban["vs_control"]["p_value"] == pytest.approx(p)
    assert urban["reward"]["successes"] == sum(ups["urban"])
    assert res["offline"]["detail"].startswith("not requested")


# (method, url rule) -> tenant B's request on tenant A's experiment (every experiments route with an id).
TENANCY_CASES = {
    ("GET", "/v1/experiments/<experiment_id>"): None,
    ("PATCH", "/v1/experiments/<experiment_id>"): {"weights": {"plain": 0}},
    ("POST", "/v1/experiments/<experiment_id>/pause"): None,
    ("POST", "/v1/experiments/<experiment_id>/resume"): None,
    ("POST", "/v1/experiments/<experiment_id>/stop"): None,
    ("POST", "/v1/experiments/<experiment_id>/assign"): {"user": "u1"},
    ("POST", "/v1/experiments/<experiment_id>/feedback"): {"response_id": "chatcmpl-a", "thumbs": "down"},
    ("GET", "/v1/experiments/<experiment_id>/results"): None,
    ("GET", "/v1/experiments/<experiment_id>/results.png"): None,
}


def test_other_tenant_gets_404_on_every_experiment_route(app, client, auth, other_auth, settings, profiles):
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules()
              if rule.endpoint.startswith("experiments.") and "<" in rule.rule
              for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    assert routes == set(TENANCY_CASES)
    exp = create(client, auth, experiment_body(profiles))
    expose(settings, exp["id"], "u1", "chatcmpl-a")
    client.post(f"/v1/experiments/{exp['id']}/feedback", json={"response_id": "chatcmpl-a", "thumbs": "up"},
                headers=auth)
    before = client.get(f"/v1/experiments/{exp['id']}/results?offline=false", headers=auth).json
    for (method, rule), body in TENANCY_CASES.items():
        r = client.open(rule.replace("<experiment_id>", exp["id"]), method=method, json=body, headers=other_auth)
        assert (r.status_code, r.json["error"]["type"]) == (404, "not_found"), (method, rule, r.json)
    assert client.get(f"/v1/experiments/{exp['id']}/results?offline=false", headers=auth).json == before
    # Nor can B use A's experiment in its own requests (what the chat endpoint calls).
    with db.session_scope(settings) as session, pytest.raises(NotFound) as err:
        ex.resolve_experiment(session, db.get_or_create_tenant(session, "tenant-b").id, exp["id"], "u1")
    assert err.value.field == "steering.experiment"
    with db.session_scope(settings) as session:
        tenant_b = db.get_or_create_tenant(session, "tenant-b").id
        assert ex.record_exposure(session, tenant_b, exp["id"], "plain", "u1", "chatcmpl-b") is None
    assert count(settings, db.Exposure) == 1


def test_concurrent_first_requests_of_one_user_store_one_assignment(app, client, auth, settings, profiles):
    import threading

    exp = create(client, auth, experiment_body(profiles))
    barrier = threading.Barrier(6)
    answers: list[str] = []

    def first_request(uid: str) -> None:
        own = app.test_client()  # one client per thread, as concurrent HTTP requests would be
        barrier.wait()
        r = own.post(f"/v1/experiments/{exp['id']}/assign", json={"user": uid}, headers=auth)
        answers.append(r.json["variant"] if r.status_code == 200 else f"error {r.status_code}: {r.json}")

    for uid in ("racer-1", "racer-2"):
        answers.clear()
        threads = [threading.Thread(target=first_request, args=(uid,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 6 and len(set(answers)) == 1 and answers[0] in ("plain", "urban"), answers
    assert count(settings, db.Assignment) == 2
