"""Profiles carry their calibration through the API: the profile document shows it and the build's new
metrics, and /v1/score applies it (or not, when asked for raw distributions)."""

from __future__ import annotations

import pytest
from api_helpers import fixture_items, make_group, mark_ready, request_profile
from support import FIXTURES

from service.api import chat
from service.store import db
from steer_core import build_profile, load_items

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
    assert r.json["calibration"] == built.calibration.to_json()
    for score, item, unmapped in zip(r.json["scores"], judged, raw.json["scores"], strict=True):
        expected = built.calibration.apply(unmapped["probs"], item.ordinal)
        assert score["probs"] == pytest.approx(expected.tolist(), abs=1e-6)
        assert score["probs"] != pytest.approx(unmapped["probs"], abs=1e-4)
    bad = client.post("/v1/score", json={"questions": questions, "calibrated": "yes please"}, headers=auth)
    assert bad.status_code == 422 and bad.json["error"]["field"] == "calibrated"
