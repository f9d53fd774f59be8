"""A full A/B run through a live HTTP server (a tiny random model generates: the statistics do not depend on
the text, and the real model would take minutes on a shared CPU): two ready constant-vector profiles,
an experiment scoped to a simulated population, one chat completion per member under
`steering: {"experiment": id}`, thumbs from a population that prefers one variant, and the results: the
preferred variant wins with p < 0.05, and the offline comparison (a worker task, run here eagerly) equals
what `/v1/score` reads for the same items and blends."""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from api_helpers import fixture_items, mark_ready, request_profile
from sqlalchemy import func, select

from service.api import chat
from service.cli.demo_ab import Client
from service.queue import OFFLINE_TASK, create_celery
from service.store import db
from steer_core.profile import Profile
from worker import lifecycle

pytestmark = pytest.mark.service

POPULATION = 48
BETTER, WORSE = "urban", "rural"


def thumbs_up(variant: str, nth: int) -> bool:
    """The simulated population's taste, by the variant served: 3 in 4 like `urban`, 1 in 3 `rural`.
    Deterministic per variant, so the outcome does not hinge on which users the random salt sends where."""
    return nth % 4 != 0 if variant == BETTER else nth % 3 == 0


@pytest.fixture
def live(settings, tiny_lm):
    from werkzeug.serving import make_server

    from service import create_app

    app = create_app({"SETTINGS": dataclasses.replace(settings, rate_limit_per_minute=100_000), "TESTING": True,
                      "GENERATION_MODEL": tiny_lm})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        chat.stop_engine(app)


def ready_profile(client, auth, settings, lm, gid: str, seed: int) -> str:
    """A ready constant-vector (DiffMean-format) profile of `gid` for the served model, as a worker stores
    it. The vector is random: the simulated feedback depends on the variant, not on the text."""
    layer = lm.num_layers // 2
    vector = 4.0 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))
    profile = Profile(method="diffmean", model_name=settings.model, model_fingerprint=lm.fingerprint, layer=layer,
                      positions="prompt", strength=1.0, tensors={"vector": vector})
    r = request_profile(client, auth, gid, params={"layer": layer, "strength": 1.0})
    assert r.status_code == 202, r.json
    mark_ready(settings, r.json["id"], profile.to_bytes())
    return r.json["id"]


def test_the_preferred_variant_wins_through_the_live_server(live, client, auth, tenant_key, settings, tiny_lm,
                                                            monkeypatch):
    app, url = live
    api = Client(url, tenant_key)
    monkeypatch.setitem(lifecycle._models, settings.model, tiny_lm)  # the worker process's model
    population = [f"member-{i:02d}" for i in range(POPULATION)]
    for uid in population:
        api.call("PUT", f"/v1/users/{uid}", {})
    api.call("PUT", "/v1/groups/urban", {"members": population})
    api.call("PUT", "/v1/groups/rural", {})
    for gid in ("urban", "rural"):
        api.call("POST", f"/v1/groups/{gid}/opinions", {"items": fixture_items(f"opinions_group_{gid}.jsonl", 12)})
    profiles = {gid: ready_profile(client, auth, settings, tiny_lm, gid, seed)
                for seed, gid in enumerate(("urban", "rural"))}
    exp = api.call("POST", "/v1/experiments", {
        "name": "urban vs rural", "reward": "thumbs", "control": WORSE, "scope": {"group": "urban"},
        "variants": [{"name": WORSE, "profiles": [{"id": profiles["rural"]}]},
                     {"name": BETTER, "profiles": [{"id": profiles["urban"]}]}]})

    def ask(uid: str) -> dict:
        return api.call("POST", "/v1/chat/completions", {
            "model": settings.model, "messages": [{"role": "user", "content": "Where would you like to live?"}],
            "max_tokens": 3, "temperature": 0, "user": uid, "steering": {"experiment": exp["id"]}})

    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent: the engine batches them
        responses = dict(zip(population, pool.map(ask, population), strict=True))
    served = {uid: r["steering"]["variant"] for uid, r in responses.items()}
    assert set(served.values()) == {BETTER, WORSE}
    for uid, r in responses.items():
        assert r["steering"]["source"] == "experiment" and r["steering"]["experiment"] == exp["id"]
        assert [p["id"] for p in r["steering"]["profiles"]] == [profiles[served[uid]]]
        # The stored assignment is what was served.
        assert api.call("POST", f"/v1/experiments/{exp['id']}/assign", {"user": uid})["variant"] == served[uid]

    counts = {BETTER: 0, WORSE: 0}
    for uid in population:
        variant = served[uid]
        up = thumbs_up(variant, counts[variant])
        counts[variant] += 1
        api.call("POST", f"/v1/experiments/{exp['id']}/feedback",
                 {"response_id": responses[uid]["id"], "thumbs": "up" if up else "down"})

    # A user outside the scope is refused, and nothing is stored for them.
    api.call("PUT", "/v1/users/stranger", {})
    with pytest.raises(Exception, match="422"):
        ask("stranger")
    # While paused, requests get the control and record nothing.
    api.call("POST", f"/v1/experiments/{exp['id']}/pause")
    assert ask(population[0])["steering"]["variant"] == WORSE
    api.call("POST", f"/v1/experiments/{exp['id']}/resume")
    with db.session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(db.Exposure)) == POPULATION
        assert session.scalar(select(func.count()).select_from(db.Assignment)) == POPULATION

    results = api.call("GET", f"/v1/experiments/{exp['id']}/results")
    by_name = {v["name"]: v for v in results["variants"]}
    for name in (BETTER, WORSE):
        assert by_name[name]["exposures"] == by_name[name]["feedback"] == counts[name]
    better = by_name[BETTER]
    assert better["vs_control"]["test"] == "two_proportion_z"
    assert better["vs_control"]["difference"] > 0 and better["vs_control"]["p_value"] < 0.05
    assert results["winner"] == BETTER

    # The offline comparison is a worker task: asked for by the first results request, stored by the task
    # (run here eagerly, the worker's code path), read back by the next. It is /v1/score's reading of the
    # scope's items under each blend; the `urban` profile was fitted on all of them: in-sample.
    assert results["offline"]["status"] == "queued"
    with db.session_scope(settings) as session:
        comparison_id = session.scalar(select(db.OfflineComparisonRow.id))
    worker_app = create_celery(settings)
    worker_app.loader.import_default_modules()
    assert worker_app.tasks[OFFLINE_TASK].apply(args=[comparison_id]).get()["status"] == "ready"
    results = api.call("GET", f"/v1/experiments/{exp['id']}/results")
    by_name = {v["name"]: v for v in results["variants"]}
    offline = results["offline"]
    assert offline["available"] and offline["evaluation"] == "in-sample"
    with db.session_scope(settings) as session:
        tenant = db.get_or_create_tenant(session, "tenant-a").id
        group = db.get_group(session, tenant, "urban")
        scope_items = db.subject_items(session, tenant, "group", group.id)
    assert offline["items"] == len(scope_items)
    questions = [{"question": it.question, "options": list(it.options), "ordinal": list(it.ordinal),
                  "target": list(it.target)} for it in scope_items]
    for name, gid in ((BETTER, "urban"), (WORSE, "rural")):
        scored = api.call("POST", "/v1/score", {"questions": questions,
                                                "steering": {"profiles": [{"id": profiles[gid], "weight": 1.0}]}})
        # Both read each question in both option orders, the worker and the engine in batches of their own
        # (float32 rounding of differently padded batches, about 1e-9 here).
        assert by_name[name]["offline"]["alignment"] == pytest.approx(scored["metrics"]["alignment"], abs=1e-7)
        assert by_name[name]["offline"]["kl"] == pytest.approx(scored["metrics"]["kl"], abs=1e-7)

    png = client.get(f"/v1/experiments/{exp['id']}/results.png", headers=auth)
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"

    # A streamed completion records its exposure too, and its id takes feedback.
    body = {"model": settings.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "stream": True, "user": population[0], "steering": {"experiment": exp["id"]}}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {tenant_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    first = json.loads(events[0])
    assert events[-1] == "[DONE]" and first["steering"]["variant"] == served[population[0]]
    fb = api.call("POST", f"/v1/experiments/{exp['id']}/feedback", {"response_id": first["id"], "thumbs": "up"})
    assert fb["created"] and fb["variant"] == served[population[0]] and fb["user"] == population[0]
    with db.session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(db.Exposure)) == POPULATION + 1
