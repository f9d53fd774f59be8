"""Profiles carry their calibration through the API: the profile document shows it and the build's new
metrics, and /v1/score applies it (or not, when asked for raw distributions)."""

from __future__ import annotations

import numpy as np
import pytest
from api_helpers import fixture_items, make_group, mark_ready, request_profile
from support import FIXTURES

from service.api import chat
from service.store import db
from steer_core import build_profile, load_items
from steer_core.calibration import Calibration, blend_per_question
from steer_core.evaluation import read_orders
from steer_core.prompts import read_answers
from steer_core.question_lean import QuestionLean

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def served(settings, tiny_lm):
    from service import create_app

    app = create_app({"SETTINGS": settings, "TESTING": True, "GENERATION_MODEL": tiny_lm})
    yield app
    chat.stop_engine(app)


@sqlite_only
def test_score_applies_the_calibration_the_build_recorded(served, settings, auth, tiny_lm):
    client = served.test_client()
    make_group(client, auth, "urban", n=8)
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")
    built = build_profile(tiny_lm, items[:8], "diffmean", {"layer": 2})  # the searched path, as a worker runs it
    built.model_name = settings.model
    r = request_profile(client, auth, "urban", params={"layer": 2})
    assert r.status_code == 202, r.json
    pid = r.json["id"]
    mark_ready(settings, pid, built.to_bytes())
    with db.session_scope(settings) as session:
        db.profile_by_id(session, pid).metrics = built.metrics  # what the worker stores

    document = client.get(f"/v1/profiles/{pid}", headers=auth).json["metrics"]
    assert document["calibration"]["temperature"] == built.calibration.temperature
    for baseline in ("unsteered", "uniform", "calibrated"):
        assert 0 <= document[baseline]["alignment"] <= 1
    assert set(document["gain_vs_calibrated"]) == {"alignment", "standard_error"}
    # What the profile does, in plain words: on its document and on its /v1/models entry.
    verdict = client.get(f"/v1/profiles/{pid}", headers=auth).json["verdict"]
    recorded = built.metrics["verdict"]
    assert (verdict["summary"], verdict["improved"], verdict["serves"]) == (
        recorded["summary"], recorded["improved"], recorded["serves"])
    assert verdict["generation_gain"] == {
        "mean": built.metrics["generation"]["gain_vs_unsteered"]["mean"],
        "standard_error": built.metrics["generation"]["gain_vs_unsteered"]["standard_error"]}
    entry = client.get(f"/v1/models/{settings.model}:{pid}", headers=auth)
    assert entry.status_code == 200 and entry.json["steering"]["verdict"] == verdict
    assert not built.calibration.is_identity

    questions = fixture_items("opinions_group_urban.jsonl")[8:11]
    judged = items[8:11]
    steering = {"profiles": [{"id": pid}]}
    raw = client.post("/v1/score", json={"questions": questions, "steering": steering, "calibrated": False},
                      headers=auth)
    assert raw.status_code == 200 and raw.json["calibration"] is None
    plain = client.post("/v1/score", json={"questions": questions}, headers=auth)
    assert plain.json["calibration"] is None  # nothing steers, nothing calibrates
    r = client.post("/v1/score", json={"questions": questions, "steering": steering}, headers=auth)
    assert r.status_code == 200, r.json
    assert r.json["calibration"] == {**built.calibration.to_json(), "lean_per_question": False}
    for score, item, unmapped in zip(r.json["scores"], judged, raw.json["scores"], strict=True):
        expected = built.calibration.apply(unmapped["probs"], item.ordinal)
        assert score["probs"] == pytest.approx(expected.tolist(), abs=1e-6)
        assert score["probs"] != pytest.approx(unmapped["probs"], abs=1e-4)
    bad = client.post("/v1/score", json={"questions": questions, "calibrated": "yes please"}, headers=auth)
    assert bad.status_code == 422 and bad.json["error"]["field"] == "calibrated"


@sqlite_only
def test_score_reads_each_questions_lean_off_its_prompt(served, settings, auth, tiny_lm):
    """A profile with a question lean: /v1/score applies the lean its probe reads off each question's prompt
    (the same numbers as the library's reader), alone and in a blend, where it replaces that profile's lean."""
    client = served.test_client()
    make_group(client, auth, "urban", n=8)
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")
    seen = read_answers(tiny_lm, items[:8], state_layers=[1]).states[1]
    weight = np.random.default_rng(0).normal(size=tiny_lm.hidden_size) * 0.2
    lean = QuestionLean(1, seen.mean(0), seen.std(0) + 1e-6, weight, 0.3)
    leaned = build_profile(tiny_lm, items[:8], "diffmean", {"layer": 2, "strength": 0.0})
    leaned.model_name, leaned.question_lean = settings.model, lean
    leaned.calibration = Calibration(1.7, -0.4)
    plain = build_profile(tiny_lm, items[:8], "diffmean", {"layer": 2, "strength": 0.0})
    plain.model_name, plain.calibration = settings.model, Calibration(0.8, 0.6)
    ids = {}
    for name, profile, layer in (("leaned", leaned, 2), ("plain", plain, 3)):
        r = request_profile(client, auth, "urban", params={"layer": layer})  # two requests, not one twice
        assert r.status_code == 202, r.json
        ids[name] = r.json["id"]
        mark_ready(settings, ids[name], profile.to_bytes())
        with db.session_scope(settings) as session:
            db.profile_by_id(session, ids[name]).metrics = {"calibration": profile.calibration.to_json()}

    questions = fixture_items("opinions_group_urban.jsonl")[8:12]
    judged = items[8:12]
    read = read_answers(tiny_lm, judged, state_layers=[1])
    own = lean.leans(read.states[1])
    assert own.std() > 0.05  # the questions get different leans

    r = client.post("/v1/score", json={"questions": questions, "steering": {"profiles": [{"id": ids["leaned"]}]}},
                    headers=auth)
    assert r.status_code == 200, r.json
    assert r.json["calibration"] == {"temperature": 1.7, "lean": -0.4, "lean_per_question": True}
    expected = read_orders(tiny_lm, judged, leaned)["original"]
    for score, b, p in zip(r.json["scores"], own, expected, strict=True):
        assert score["lean"] == pytest.approx(float(b), abs=1e-4)
        assert score["probs"] == pytest.approx(p.tolist(), abs=1e-5)

    blend = {"profiles": [{"id": ids["leaned"], "weight": 0.5}, {"id": ids["plain"], "weight": 0.5}]}
    r = client.post("/v1/score", json={"questions": questions, "steering": blend}, headers=auth)
    assert r.status_code == 200, r.json
    calibrations = blend_per_question([(leaned.calibration, 0.5), (plain.calibration, 0.5)],
                                      [[float(b), None] for b in own])
    for score, c, p, item in zip(r.json["scores"], calibrations, read.distributions, judged, strict=True):
        assert score["lean"] == pytest.approx((float(own[judged.index(item)]) + 0.6) / 2, abs=1e-4)
        assert score["probs"] == pytest.approx(c.apply(p, item.ordinal).tolist(), abs=1e-5)

    raw = client.post("/v1/score", json={"questions": questions, "steering": blend, "calibrated": False}, headers=auth)
    assert raw.json["calibration"] is None and all(s["lean"] is None for s in raw.json["scores"])
    for score, p in zip(raw.json["scores"], read.distributions, strict=True):
        assert score["probs"] == pytest.approx(p.tolist(), abs=1e-5)
