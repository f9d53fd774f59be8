"""Populations end to end: the HTTP app, a real Celery worker process and the real default model. A tenant's
groups become a population; a user with a few answers gets an ordinary profile fitted against it, which is
listed, scored, blended into chat and put in an experiment; the questions to ask next come from it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from api_helpers import sign_in
from markupsafe import escape
from support import FIXTURES
from worker_helpers import FIXED, new_auth, request_build, stack_client, wait_profile

from service.api import chat
from service.store import db
from service.store.artifacts import ArtifactStore
from steer_core.data import load_jsonl
from steer_core.population import Population

pytestmark = [pytest.mark.service, pytest.mark.model]

SHARED = 12  # shared questions: enough for a population (10), few enough for a quick build


def _items(name: str) -> list[dict[str, Any]]:
    return [it.to_json() for it in load_jsonl(FIXTURES / f"opinions_group_{name}.jsonl")[:SHARED]]


def _mixed(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A third group halfway between two: the same questions, the mean of their answers."""
    return [{**x, "target": [round((p + q) / 2, 6) for p, q in zip(x["target"], y["target"], strict=True)]}
            for x, y in zip(a, b, strict=True)]


def _put_group(client, auth, gid: str, items: list[dict[str, Any]]) -> None:  # noqa: ANN001
    assert client.put(f"/v1/groups/{gid}", json={"members": []}, headers=auth).status_code in (200, 201)
    r = client.post(f"/v1/groups/{gid}/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.json


def _wait_population(client, auth, pid: str, worker, timeout: float = 480.0) -> dict[str, Any]:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/populations/{pid}", headers=auth)
        assert r.status_code == 200, r.json
        if r.json["status"] in ("ready", "failed"):
            return r.json
        assert worker.alive(), worker.log_text()[-3000:]
        assert time.monotonic() < deadline, f"population still {r.json['status']}: {r.json}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def towns(worker_settings, celery_worker):
    """A tenant with three groups over the same 12 questions and a ready population of them (one build for
    the module's tests)."""
    running_worker = celery_worker.ensure_running()
    app, client = stack_client(worker_settings)
    auth = new_auth(worker_settings)
    rural, urban = _items("rural"), _items("urban")
    for gid, items in (("rural", rural), ("urban", urban), ("suburban", _mixed(rural, urban))):
        _put_group(client, auth, gid, items)
    r = client.post("/v1/populations", json={"name": "towns"}, headers=auth)
    assert r.status_code == 202, r.json
    assert r.headers["Location"].endswith(r.json["id"])
    assert {s["id"] for s in r.json["subjects"]} == {"rural", "urban", "suburban"}  # default: every group
    population = _wait_population(client, auth, r.json["id"], running_worker)
    yield app, client, auth, population
    chat.stop_engine(app)


def test_a_population_is_learned_and_suggests_questions(towns, worker_settings):
    _, client, auth, population = towns
    assert population["status"] == "ready", population
    assert population["questions"] == SHARED
    assert population["progress"]["done"] == population["progress"]["total"] > 0
    report = population["report"]
    assert sorted(report["question_order"]) == list(range(SHARED))
    assert report["strength"] == 0 or report["strength"] in [float(s) for s in report["chat_gain_by_strength"]]
    # The artifact is a population of the three groups (safetensors, read back without pickle).
    stored = Population.from_bytes(ArtifactStore(worker_settings.artifact_dir).get(population["artifact"]["sha256"]))
    assert set(stored.groups) == {"group:rural", "group:urban", "group:suburban"}
    assert stored.vectors is not None and stored.vectors.shape == (3, 576)

    r = client.get(f"/v1/populations/{population['id']}/questions?k=3", headers=auth)
    assert r.status_code == 200, r.json
    ids = [q["id"] for q in r.json["questions"]]
    order = [_items("rural")[i]["id"] for i in report["question_order"]]
    assert ids == order[:3]  # most informative first, as the build ranked them
    # A user who answered the first suggestion is not asked it again.
    first = next(it for it in _items("rural") if it["id"] == ids[0])
    assert client.put("/v1/users/asked", json={}, headers=auth).status_code in (200, 201)
    answer = {k: first[k] for k in ("id", "question", "options")} | {"answer": 0}
    assert client.post("/v1/users/asked/opinions", json={"items": [answer]}, headers=auth).status_code == 201
    r = client.get(f"/v1/populations/{population['id']}/questions?k=3&subject_kind=user&subject_id=asked",
                   headers=auth)
    assert [q["id"] for q in r.json["questions"]] == order[1:4]

    # Asking again on unchanged answers does nothing; the list shows it.
    again = client.post(f"/v1/populations/{population['id']}/rebuild", headers=auth)
    assert again.status_code == 200 and again.json["status"] == "ready"
    listed = client.get("/v1/populations", headers=auth).json["populations"]
    assert [p["id"] for p in listed] == [population["id"]]

    # The console shows it, its chosen strength and the questions to ask first.
    sign_in(client, auth["Authorization"].removeprefix("Bearer "))
    page = client.get("/console/populations")
    assert page.status_code == 200 and "towns" in page.text
    page = client.get(f"/console/populations/{population['id']}")
    assert page.status_code == 200, page.text
    first_question = next(it for it in _items("rural") if it["id"] == order[0])["question"]
    assert str(escape(first_question)) in page.text and 'id="strengths"' in page.text


def test_a_user_fitted_against_a_population_is_an_ordinary_profile(towns, running_worker):
    _, client, auth, population = towns
    # One person, eight one-hot answers (the rural group's most likely option), none of them shared questions
    # held out: what a new user gives after the suggested questions.
    rural = load_jsonl(FIXTURES / "opinions_group_rural.jsonl")
    answers = [{"id": it.id, "question": it.question, "options": list(it.options), "ordinal": list(it.ordinal),
                "answer": int(np.argmax(it.target))} for it in rural[SHARED:SHARED + 8]]
    assert client.put("/v1/users/newcomer", json={}, headers=auth).status_code in (200, 201)
    assert client.post("/v1/users/newcomer/opinions", json={"items": answers}, headers=auth).status_code == 201
    body = {"subject": {"kind": "user", "id": "newcomer"}, "method": "population",
            "params": {"population": population["id"]}}
    r = client.post("/v1/profiles", json=body, headers=auth)
    assert r.status_code == 202, r.json
    assert r.json["params"]["population"] == population["id"]
    start = time.monotonic()
    profile = wait_profile(client, auth, r.json["id"], worker=running_worker)
    assert profile["status"] == "ready", profile
    assert time.monotonic() - start < 120  # a fit, not a build (the 5 s target is measured in bench/)
    fitted = profile["metrics"]["population"]
    assert set(fitted["weights"]) == {"group:rural", "group:urban", "group:suburban"}
    assert sum(fitted["weights"].values()) == pytest.approx(1.0)
    # It steers at the population's strength, unless that moved its own answers away from it (then 0).
    shipped = profile["metrics"]["steering_shipped"]
    assert profile["chosen"]["strength"] == (population["report"]["strength"] if shipped else 0)
    if shipped:
        assert profile["metrics"]["generation"]["gain_vs_unsteered"]["mean"] >= 0

    # Listed as a chat model, scored with its calibration, blended into chat, put in an experiment.
    models = client.get("/v1/models", headers=auth).json["data"]
    assert any(m["id"].endswith(profile["id"]) for m in models)
    other = request_build(client, auth, "rural", FIXED)
    other = wait_profile(client, auth, other["id"], worker=running_worker)
    assert other["status"] == "ready", other
    question = {k: rural[0].to_json()[k] for k in ("question", "options")}
    steered = client.post("/v1/score", json={"questions": [question],
                                             "steering": {"profiles": [{"id": profile["id"], "weight": 1.0}]}},
                          headers=auth)
    plain = client.post("/v1/score", json={"questions": [question]}, headers=auth)
    assert steered.status_code == plain.status_code == 200, steered.json
    assert steered.json["scores"][0]["probs"] != plain.json["scores"][0]["probs"]  # its calibration and lean
    blend = {"profiles": [{"id": profile["id"], "weight": 0.5}, {"id": other["id"], "weight": 0.5}]}
    r = client.post("/v1/chat/completions", json={"model": population["model"], "max_tokens": 4, "steering": blend,
                                                  "messages": [{"role": "user", "content": "Buses or cars?"}]},
                    headers=auth)
    assert r.status_code == 200, r.json
    r = client.post("/v1/experiments", json={
        "name": "population vs plain", "reward": "thumbs", "control": "plain",
        "variants": [{"name": "plain", "weight": 1},
                     {"name": "fitted", "weight": 1, "profiles": [{"id": profile["id"], "weight": 1.0}]}]},
        headers=auth)
    assert r.status_code == 201, r.json


def test_bad_population_requests_name_the_field(towns, worker_settings):
    _, client, auth, population = towns
    # A subject that shares no question with the others.
    _put_group(client, auth, "elsewhere", [{"id": "x1", "question": "Tea or coffee?", "options": ["Tea", "Coffee"],
                                            "target": [0.5, 0.5]}])
    r = client.post("/v1/populations", json={"name": "mixed", "subjects": [
        {"kind": "group", "id": "rural"}, {"kind": "group", "id": "elsewhere"}]}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "subjects[1]", r.json
    r = client.post("/v1/populations", json={"name": "solo", "subjects": [{"kind": "group", "id": "rural"}]},
                    headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "subjects", r.json
    r = client.post("/v1/populations", json={"name": "ghosts", "subjects": [
        {"kind": "group", "id": "rural"}, {"kind": "group", "id": "nobody"}]}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "subjects[1]", r.json
    r = client.post("/v1/populations", json={"name": "towns"}, headers=auth)
    assert r.status_code == 409 and r.json["error"]["field"] == "name", r.json
    assert client.get("/v1/populations/nope", headers=auth).status_code == 404
    # Another tenant sees none of it.
    stranger = new_auth(worker_settings)
    assert client.get(f"/v1/populations/{population['id']}", headers=stranger).status_code == 404

    # A profile against a population that is unknown, or still building.
    body = {"subject": {"kind": "group", "id": "rural"}, "method": "population", "params": {"population": "nope"}}
    r = client.post("/v1/profiles", json=body, headers=auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "params.population", r.json
    with db.session_scope(worker_settings) as session:  # a population a worker is still building
        row = db.PopulationRow(
            tenant_id=_tenant_of(session, population["id"]), name="towns-2", model=population["model"],
            subjects=population["subjects"], sample_hash="0" * 64, status="building")
        session.add(row)
        session.flush()
        building = row.id
    body["params"] = {"population": building}
    r = client.post("/v1/profiles", json=body, headers=auth)
    assert r.status_code == 409 and r.json["error"]["field"] == "params.population", r.json
    body["params"] = {"population": population["id"], "strength": 2}
    r = client.post("/v1/profiles", json=body, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "params.strength", r.json
    body["params"] = {"population": population["id"]}
    r = client.post("/v1/profiles", json={**body, "contrast": [{"kind": "group", "id": "urban"}]}, headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "contrast", r.json


def _tenant_of(session, population_id: str) -> int:  # noqa: ANN001
    return session.get(db.PopulationRow, population_id).tenant_id
