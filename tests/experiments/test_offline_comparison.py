"""The A/B offline comparison as a worker task: the results endpoint asks for it (a message on the queue, a
`queued` row) without loading or running any model, the task (run here in Celery's eager mode on the tiny
model, the worker's own code path) stores it, and the endpoint reads the stored result back. Items that a
compared profile's subject holds are never called held-out."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import redis
import torch
from api_helpers import fixture_items, mark_ready, request_profile
from runtime import redis_db_url
from sqlalchemy import select

import steer_core.models
from service.queue import OFFLINE_TASK, create_celery, queue_depths
from service.store import db
from steer_core.calibration import IDENTITY, Calibration, blend_per_question, sample_alignment
from steer_core.data import make_item
from steer_core.evaluation import baseline_alignments, paired_difference
from steer_core.methods import intervention
from steer_core.metrics import summarize
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, read_answers
from steer_core.question_lean import QuestionLean
from steer_core.steering import compose
from worker import lifecycle

pytestmark = pytest.mark.service

MODEL = "tiny-test-model"  # a name no loader knows: loading it anywhere would fail the test


@pytest.fixture
def offline_settings(settings, redis_url, tiny_lm, monkeypatch):
    s = replace(settings, model=MODEL, redis_url=redis_db_url(redis_url, 8))
    client = redis.Redis.from_url(s.redis_url)
    client.flushdb()
    monkeypatch.setitem(lifecycle._models, MODEL, tiny_lm)  # the worker process's model: the tiny one

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(steer_core.models, "load_model", no_loading)
    yield s
    client.flushdb()
    client.close()


@pytest.fixture
def api(offline_settings):
    from service import create_app

    app = create_app({"SETTINGS": offline_settings, "TESTING": True})
    return app.test_client()


def put_group(api, auth, gid: str, items: list[dict]) -> None:
    assert api.put(f"/v1/groups/{gid}", json={"members": []}, headers=auth).status_code in (200, 201)
    r = api.post(f"/v1/groups/{gid}/opinions", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.json


def ready_profile(api, auth, settings, lm, gid: str, seed: int, calibration: Calibration = IDENTITY,
                  question_lean: QuestionLean | None = None) -> tuple[str, Profile]:
    layer = lm.num_layers // 2
    vector = 4.0 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))
    profile = Profile(method="diffmean", model_name=MODEL, model_fingerprint=lm.fingerprint, layer=layer,
                      positions="prompt", strength=1.0, tensors={"vector": vector}, calibration=calibration,
                      question_lean=question_lean)
    r = request_profile(api, auth, gid, params={"layer": layer, "strength": 1.0})
    assert r.status_code == 202, r.json
    mark_ready(settings, r.json["id"], profile.to_bytes())
    return r.json["id"], Profile.from_bytes(profile.to_bytes())  # as stored (a question lean's numbers in float32)


def experiment(api, auth, a: str, b: str | None, scope: str) -> dict:
    variants = [{"name": "control", "profiles": []}, {"name": "a", "profiles": [{"id": a}]}]
    if b is not None:
        variants.append({"name": "b", "profiles": [{"id": b, "weight": 0.5}, {"id": a, "weight": 0.5}]})
    r = api.post("/v1/experiments", json={"name": "offline", "reward": "thumbs", "control": "control",
                                          "scope": {"group": scope}, "variants": variants}, headers=auth)
    assert r.status_code == 201, r.json
    return r.json


def comparison_rows(settings) -> list[tuple[str, str]]:
    with db.session_scope(settings) as session:
        rows = session.scalars(select(db.OfflineComparisonRow).order_by(db.OfflineComparisonRow.created_at))
        return [(r.id, r.status) for r in rows]


def run_task(settings, comparison_id: str) -> dict:
    app = create_celery(settings)
    app.loader.import_default_modules()  # what a worker does at start: registers the tasks
    result = app.tasks[OFFLINE_TASK].apply(args=[comparison_id])
    assert result.successful(), result.traceback
    return result.get()


def test_results_ask_a_worker_and_read_the_stored_comparison_back(api, auth, offline_settings, tiny_lm):
    settings = offline_settings
    scope_items = fixture_items("opinions_group_urban.jsonl", 12)
    put_group(api, auth, "scope", scope_items)
    put_group(api, auth, "fit-a", scope_items[:4])  # profiles fitted on the first six questions only
    put_group(api, auth, "fit-b", scope_items[2:6])
    a, profile_a = ready_profile(api, auth, settings, tiny_lm, "fit-a", 0, Calibration(2.0, 0.3))
    # b reads each question's lean off its prompt (a question lean at block 1, below its steering).
    items = [make_item(it["question"], it["options"], target=it["target"]) for it in scope_items]
    seen = read_answers(tiny_lm, items, state_layers=[1]).states[1]
    weight = 0.3 * np.random.default_rng(2).normal(size=tiny_lm.hidden_size)
    b, profile_b = ready_profile(api, auth, settings, tiny_lm, "fit-b", 1, Calibration(0.7, -0.2),
                                 QuestionLean(1, seen.mean(0), seen.std(0) + 1e-6, weight, 0.5))
    exp = experiment(api, auth, a, b, "scope")
    url = f"/v1/experiments/{exp['id']}/results"
    builds = queue_depths(settings)["cpu"]  # the two build messages of the profiles

    first = api.get(url, headers=auth)
    assert first.status_code == 200, first.json
    offline = first.json["offline"]
    assert (offline["available"], offline["status"], offline["items"]) == (False, "queued", 6)
    assert all(v["offline"] is None for v in first.json["variants"])
    rows = comparison_rows(settings)
    assert [status for _, status in rows] == ["queued"]
    assert queue_depths(settings)["cpu"] == builds + 1  # one message, on the real broker
    # Asking again while it waits sends nothing more.
    assert api.get(url, headers=auth).json["offline"]["status"] == "queued"
    assert queue_depths(settings)["cpu"] == builds + 1 and len(comparison_rows(settings)) == 1

    assert run_task(settings, rows[0][0]) == {"comparison_id": rows[0][0], "status": "ready"}
    assert run_task(settings, rows[0][0])["skipped"] is True  # a second delivery does nothing

    done = api.get(url, headers=auth).json
    offline = done["offline"]
    assert offline["available"] and offline["status"] == "ready" and offline["evaluation"] == "held-out"
    assert offline["items"] == 6
    # The held-out items: the scope's questions in neither profile's sample; scored as the serving
    # engine composes the blends, each blend's calibration pooled by weight (as /v1/score does).
    held_out = [make_item(it["question"], it["options"], target=it["target"], ordinal=it.get("ordinal"))
                for it in scope_items[6:]]
    iv_a, iv_b = intervention(profile_a, tiny_lm), intervention(profile_b, tiny_lm)
    unsteered = answer_distributions(tiny_lm, held_out)
    blend = read_answers(tiny_lm, held_out, compose([(iv_b, 0.5), (iv_a, 0.5)]), [1])
    leans = profile_b.question_lean.leans(blend.states[1])
    assert leans.std() > 0.05  # each question its own lean
    pooled = blend_per_question([(profile_b.calibration, 0.5), (profile_a.calibration, 0.5)],
                                [[float(lean), None] for lean in leans])
    readings = {"control": unsteered,
                "a": profile_a.calibration.apply_all(
                    held_out, answer_distributions(tiny_lm, held_out, compose([(iv_a, 1.0)]))),
                "b": [c.apply(p, it.ordinal) for c, p, it in zip(pooled, blend.distributions, held_out, strict=True)]}
    baselines = baseline_alignments(held_out, unsteered)
    by_name = {v["name"]: v["offline"] for v in done["variants"]}
    for name, dists in readings.items():
        metrics = summarize(held_out, dists)
        assert by_name[name]["alignment"] == pytest.approx(metrics["alignment"], abs=1e-9)
        assert by_name[name]["kl"] == pytest.approx(metrics["kl"], abs=1e-9)
        for baseline in ("unsteered", "uniform", "calibrated"):
            gain = paired_difference(sample_alignment(held_out, dists), baselines[baseline])
            assert by_name[name][f"gain_vs_{baseline}"]["mean"] == pytest.approx(gain.mean, abs=1e-9)
            assert by_name[name][f"gain_vs_{baseline}"]["standard_error"] == pytest.approx(gain.standard_error,
                                                                                           abs=1e-9)
    assert by_name["control"]["gain_vs_unsteered"]["mean"] == 0
    assert by_name["a"]["alignment"] != by_name["control"]["alignment"]
    assert queue_depths(settings)["cpu"] == builds + 1  # reading the stored result sends nothing

    # New opinions of the scope are new inputs: a new comparison is asked for.
    extra = {"id": "extra", "question": "Is this a new question?", "options": ["Yes", "No"], "target": [0.5, 0.5]}
    assert api.post("/v1/groups/scope/opinions", json={"items": [extra]}, headers=auth).status_code == 201
    again = api.get(url, headers=auth).json["offline"]
    assert (again["status"], again["items"]) == ("queued", 7)
    assert queue_depths(settings)["cpu"] == builds + 2 and len(comparison_rows(settings)) == 2


def test_items_a_compared_profile_was_fitted_on_are_scored_as_in_sample(api, auth, offline_settings, tiny_lm):
    settings = offline_settings
    items = fixture_items("opinions_group_urban.jsonl", 8)
    put_group(api, auth, "scope", items)
    a, _ = ready_profile(api, auth, settings, tiny_lm, "scope", 0)  # fitted on every scope item
    exp = experiment(api, auth, a, None, "scope")
    url = f"/v1/experiments/{exp['id']}/results"
    assert api.get(url, headers=auth).json["offline"]["status"] == "queued"
    run_task(settings, comparison_rows(settings)[0][0])
    offline = api.get(url, headers=auth).json["offline"]
    assert offline["available"] and (offline["evaluation"], offline["items"]) == ("in-sample", 8)
    assert "flatter" in offline["detail"]


def test_a_comparison_whose_inputs_changed_fails_with_the_reason(api, auth, offline_settings, tiny_lm):
    settings = offline_settings
    items = fixture_items("opinions_group_urban.jsonl", 8)
    put_group(api, auth, "scope", items)
    put_group(api, auth, "fit", items[:3])
    a, _ = ready_profile(api, auth, settings, tiny_lm, "fit", 0)
    exp = experiment(api, auth, a, None, "scope")
    url = f"/v1/experiments/{exp['id']}/results"
    api.get(url, headers=auth)
    extra = {"id": "extra", "question": "Is this a new question?", "options": ["Yes", "No"], "target": [0.5, 0.5]}
    assert api.post("/v1/groups/scope/opinions", json={"items": [extra]}, headers=auth).status_code == 201
    out = run_task(settings, comparison_rows(settings)[0][0])
    assert out["status"] == "failed" and "changed" in out["error"]
    with db.session_scope(settings) as session:
        row = session.get(db.OfflineComparisonRow, comparison_rows(settings)[0][0])
        assert row.status == "failed" and row.result is None


def test_without_a_scope_nothing_is_queued(api, auth, offline_settings):
    settings = offline_settings
    put_group(api, auth, "g", fixture_items("opinions_group_urban.jsonl", 4))
    r = api.post("/v1/experiments", json={"name": "x", "reward": "thumbs", "control": "c",
                                          "variants": [{"name": "c", "profiles": []}, {"name": "d", "profiles": []}]},
                 headers=auth)
    assert r.status_code == 201, r.json
    offline = api.get(f"/v1/experiments/{r.json['id']}/results", headers=auth).json["offline"]
    assert (offline["available"], offline["status"]) == (False, "none")
    assert comparison_rows(settings) == [] and queue_depths(settings)["cpu"] == 0
