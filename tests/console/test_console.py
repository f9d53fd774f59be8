"""The web console through Flask's client: sign-in sessions (cookie flags, CSRF, sign-out, expiry, revoked
keys), tenant scoping of every page, and the pages calling the API's functions (uploads, builds,
deletes, experiments). The real browser runs in test_console_browser.py."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time

import numpy as np
import pytest
from api_helpers import csrf_of, fixture_items, login_token, make_group, mark_ready, request_profile, sign_in
from sqlalchemy import func, select

from service import create_app
from service.console import sessions
from service.store import db

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_sign_in_sets_a_strict_httponly_session_cookie(client, tenant_key):
    assert client.get("/console/profiles").headers["Location"].startswith("/console/login")
    r = client.post("/console/login", data={"api_key": tenant_key, "csrf_token": login_token(client),
                                             "next": "/console/experiments"})
    assert r.status_code == 302 and r.headers["Location"] == "/console/experiments"
    cookie = next(h for h in r.headers.getlist("Set-Cookie") if h.startswith(sessions.SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert tenant_key not in cookie  # the key never leaves the server again
    page = client.get("/console/profiles")
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"


def test_wrong_key_and_forged_sign_in_are_refused(client, tenant_key):
    r = client.post("/console/login", data={"api_key": "psk_wrong", "csrf_token": login_token(client)})
    assert r.status_code == 401 and "unknown or revoked" in r.text
    # A sign-in posted without the form's token (another site's form) is refused before the key is read.
    r = client.post("/console/login", data={"api_key": tenant_key, "csrf_token": "forged"})
    assert r.status_code == 403
    assert client.get_cookie(sessions.SESSION_COOKIE, path="/console") is None
    # Redirects after sign-in stay inside the console.
    r = client.post("/console/login", data={"api_key": tenant_key, "csrf_token": login_token(client),
                                             "next": "//evil.example/console"})
    assert r.headers["Location"] == "/console/profiles"


def test_posts_without_the_csrf_token_are_refused(client, auth, tenant_key, settings):
    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban", params={"layer": 3, "strength": 1.0}).json["id"]
    csrf = sign_in(client, tenant_key)
    for path in (f"/console/profiles/{profile_id}/delete", "/console/logout"):
        assert client.post(path).status_code == 403
        assert client.post(path, data={"csrf_token": "wrong"}).status_code == 403
    r = client.post("/console/playground/score", json={"questions": [{"question": "q", "options": ["a", "b"]}]})
    assert r.status_code == 403 and r.json["error"]["field"] == "csrf_token"
    assert client.get(f"/v1/profiles/{profile_id}", headers=auth).status_code == 200  # nothing was deleted
    r = client.post(f"/console/profiles/{profile_id}/delete", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 302
    assert client.get(f"/v1/profiles/{profile_id}", headers=auth).status_code == 404


def test_sign_out_and_revoked_keys_end_the_session(client, tenant_key, settings):
    csrf = sign_in(client, tenant_key)
    token = client.get_cookie(sessions.SESSION_COOKIE, path="/console").value
    assert client.post("/console/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/console/profiles").status_code == 302
    # The old cookie replayed after sign-out opens nothing: the server forgot the session.
    client.set_cookie(sessions.SESSION_COOKIE, token, path="/console")
    assert client.get("/console/profiles").status_code == 302

    # Signing in again replaces the session: the earlier cookie opens nothing.
    sign_in(client, tenant_key)
    earlier = client.get_cookie(sessions.SESSION_COOKIE, path="/console").value
    sign_in(client, tenant_key)
    current = client.get_cookie(sessions.SESSION_COOKIE, path="/console").value
    client.set_cookie(sessions.SESSION_COOKIE, earlier, path="/console")
    assert client.get("/console/profiles").status_code == 302
    client.set_cookie(sessions.SESSION_COOKIE, current, path="/console")
    assert client.get("/console/profiles").status_code == 200
    from service.auth import revoke_key

    with db.session_scope(settings) as session:
        assert revoke_key(session, tenant_key)
    assert client.get("/console/profiles").status_code == 302


def test_sessions_expire(settings, tenant_key):
    app = create_app({"SETTINGS": dataclasses.replace(settings, console_session_ttl=1), "TESTING": True})
    client = app.test_client()
    sign_in(client, tenant_key)
    time.sleep(1.6)
    r = client.get("/console/profiles")
    assert r.status_code == 302 and r.headers["Location"].startswith("/console/login")


def test_another_tenants_pages_are_not_found(client, auth, other_auth, tenant_key, other_tenant_key, settings):
    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban", params={"layer": 3, "strength": 1.0}).json["id"]
    mark_ready(settings, profile_id)
    exp = client.post("/v1/experiments", headers=auth, json={
        "name": "a/b", "variants": [{"name": "control"}, {"name": "urban", "profiles": [{"id": profile_id}]}]}).json
    sign_in(client, other_tenant_key)
    assert client.get(f"/console/profiles/statuses?ids={profile_id}").json == {}
    pages = [f"/console/profiles/{profile_id}", f"/console/profiles/{profile_id}/status",
             f"/console/profiles/{profile_id}/download", "/console/subjects/group/urban",
             f"/console/experiments/{exp['id']}", f"/console/experiments/{exp['id']}/results.png"]
    for page in pages:
        assert client.get(page).status_code == 404, page
    csrf = csrf_of(client)
    for path in (f"/console/profiles/{profile_id}/delete", f"/console/experiments/{exp['id']}/pause"):
        assert client.post(path, data={"csrf_token": csrf}).status_code == 404, path
    assert profile_id not in client.get("/console/profiles").text
    assert "urban" not in client.get("/console/subjects").text
    # The owner sees all of it.
    sign_in(client, tenant_key)
    for page in pages:
        assert client.get(page).status_code == 200, page


def test_upload_build_and_experiment_forms_use_the_api_functions(client, auth, tenant_key, settings):
    assert client.put("/v1/groups/urban", json={"members": []}, headers=auth).status_code == 201
    csrf = sign_in(client, tenant_key)
    items = fixture_items("opinions_group_urban.jsonl", 25)
    bad = "\n".join(json.dumps(it) for it in items[:3]) + '\n{"question": "q", "options": ["a"], "target": [2]}\n'
    r = client.post("/console/subjects/group/urban/opinions", data={
        "csrf_token": csrf, "items": (io.BytesIO(bad.encode()), "items.jsonl")})
    assert r.status_code == 422 and "items[3]" in r.text  # the API's validation, naming the item
    assert client.get("/v1/groups/urban", headers=auth).json["opinions"] == 0  # all or nothing
    good = "\n".join(json.dumps(it) for it in items)
    r = client.post("/console/subjects/group/urban/opinions", data={
        "csrf_token": csrf, "items": (io.BytesIO(good.encode()), "items.jsonl")})
    assert r.status_code == 302
    assert client.get("/v1/groups/urban", headers=auth).json["opinions"] == 25
    page = client.get("/console/subjects/group/urban?page=2")
    assert "page 2 of 2" in page.text and items[20]["question"] in page.text and items[0]["question"] not in page.text

    r = client.post("/console/subjects/group/urban/build", data={"csrf_token": csrf, "method": "diffmean",
                                                                  "layer": "3", "strength": "1.5"})
    assert r.status_code == 302
    profile_id = r.headers["Location"].rsplit("/", 1)[1]
    built = client.get(f"/v1/profiles/{profile_id}", headers=auth).json
    assert built["status"] == "queued" and built["params"]["layer"] == 3 and built["params"]["strength"] == 1.5
    listed = client.get("/console/profiles").text
    assert f'data-profile-id="{profile_id}"' in listed  # the list follows it until it is final
    assert client.get(f"/console/profiles/statuses?ids={profile_id},nope").json == {
        profile_id: {"status": "queued", "label": "queued", "final": False}}
    r = client.post("/console/subjects/group/urban/build", data={"csrf_token": csrf, "method": "nope"})
    assert r.status_code == 422 and "unknown method" in r.text

    mark_ready(settings, profile_id)
    page = client.get(f"/console/profiles/{profile_id}").text
    assert "Download safetensors" in page and "0.800" in page and "0.700" in page
    download = client.get(f"/console/profiles/{profile_id}/download")
    assert download.status_code == 200
    assert download.data == client.get(f"/v1/profiles/{profile_id}/artifact", headers=auth).data

    r = client.post("/console/experiments", data={
        "csrf_token": csrf, "name": "urban test", "reward": "thumbs", "scope": "urban",
        "variant_name_1": "control", "variant_profile_1": "", "variant_weight_1": "1",
        "variant_name_2": "steered", "variant_profile_2": profile_id, "variant_weight_2": "1"})
    assert r.status_code == 302, r.text
    exp_id = r.headers["Location"].rsplit("/", 1)[1]
    exp = client.get(f"/v1/experiments/{exp_id}", headers=auth).json
    assert exp["scope"] == {"group": "urban"} and [v["name"] for v in exp["variants"]] == ["control", "steered"]
    assert client.post(f"/console/experiments/{exp_id}/pause", data={"csrf_token": csrf}).status_code == 302
    assert client.get(f"/v1/experiments/{exp_id}", headers=auth).json["status"] == "paused"
    page = client.get(f"/console/experiments/{exp_id}")
    assert page.status_code == 200 and "too little feedback" in page.text
    assert client.get(f"/console/experiments/{exp_id}/results.png").data[:8] == b"\x89PNG\r\n\x1a\n"
    # Asking for the offline comparison queues it for a worker; the page follows it until it is stored.
    page = client.get(f"/console/experiments/{exp_id}?offline=1")
    assert page.status_code == 200 and "(queued)" in page.text and "data-reload" in page.text


def test_the_profile_page_shows_whatever_the_build_recorded(client, auth, tenant_key, settings):
    """Baselines and gains with standard errors, in whatever entries the build wrote; the calibration as the
    metrics record it (the page does not read the artifact)."""
    import numpy as np
    import torch

    from steer_core.calibration import Calibration
    from steer_core.profile import Profile
    from steer_core.question_lean import QuestionLean

    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban", params={"layer": 3, "strength": 1.0}).json["id"]
    profile = Profile(method="diffmean", model_name=settings.model, model_fingerprint="test", layer=3,
                      positions="prompt", strength=1.0, tensors={"vector": torch.ones(8)},
                      calibration=Calibration(temperature=1.5, lean=-0.25))
    mark_ready(settings, profile_id, profile.to_bytes())
    with db.session_scope(settings) as session:
        db.profile_by_id(session, profile_id).metrics = {
            "evaluation": "cross-validated", "folds": 3,
            "unsteered": {"alignment": 0.71, "kl": 0.4}, "steered": {"alignment": 0.78, "kl": 0.3},
            "baselines": {"uniform": {"alignment": 0.64}, "calibrated": {"alignment": 0.75}},
            "gain": {"alignment": 0.031, "standard_error": 0.012},
            "search": [{"layer": 3, "strength": 1.0, "alignment": 0.78}],
            # What the profile carries, as a build records it.
            "calibration": {"temperature": 1.5, "lean": -0.25, "lean_fitted": True}}
    leaned_id = request_profile(client, auth, "urban", params={"layer": 2, "strength": 1.0}).json["id"]
    leaned = Profile(method="diffmean", model_name=settings.model, model_fingerprint="test", layer=3,
                     positions="prompt", strength=1.0, tensors={"vector": torch.ones(8)},
                     calibration=Calibration(temperature=1.5, lean=-0.25),
                     question_lean=QuestionLean(1, np.zeros(8), np.ones(8), np.ones(8), 0.0))
    mark_ready(settings, leaned_id, leaned.to_bytes())
    with db.session_scope(settings) as session:
        db.profile_by_id(session, leaned_id).metrics = {
            "calibration": {"temperature": 1.5, "lean": -0.25, "lean_fitted": True},
            "question_lean": {"shipped": True, "layer": 1}}
    sign_in(client, tenant_key)
    page = client.get(f"/console/profiles/{profile_id}").text
    assert '<dd id="calibration">temperature 1.500, lean -0.250</dd>' in page
    leaned_page = client.get(f"/console/profiles/{leaned_id}").text
    assert '<dd id="calibration">temperature 1.500, lean read off each question (block 1)</dd>' in leaned_page
    metrics = page[page.index('id="metrics"'):]
    for text in ("cross-validated", "0.710", "0.780", "0.400", "baselines", "uniform", "0.640", "calibrated",
                 "0.750", "alignment: 0.031 ± 0.012", "search (1 settings)"):
        assert text in metrics, text


PER_ITEM = {"metric": "alignment", "total": 4, "limit": 500, "items": [
    {"index": 0, "id": "q01", "question": "Buses?", "unsteered": 0.65, "calibrated": 0.70, "steered": 0.74},
    {"index": 1, "id": "q02", "question": "Trains <b>now</b>?", "unsteered": 0.61, "calibrated": 0.80,
     "steered": 0.78},
    {"index": 2, "id": None, "question": "Parks?", "unsteered": 0.58, "calibrated": 0.60, "steered": 0.66},
    {"index": 3, "id": "q04", "question": "Shops?", "unsteered": 0.70, "calibrated": 0.75, "steered": 0.75}]}


def test_the_profile_page_plots_per_item_alignment_before_and_after(client, auth, tenant_key, settings):
    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban").json["id"]
    mark_ready(settings, profile_id)
    with db.session_scope(settings) as session:
        db.profile_by_id(session, profile_id).metrics = {
            "evaluation": "cross-validated", "unsteered": {"alignment": 0.635}, "calibrated": {"alignment": 0.7125},
            "steered": {"alignment": 0.7325}, "per_item": PER_ITEM}
    sign_in(client, tenant_key)
    page = client.get(f"/console/profiles/{profile_id}").text
    figure = page[page.index('id="per-item-plot"'):page.index("</figure>")]
    assert '<svg viewBox="0 0 720 280" role="img" aria-labelledby="per-item-title per-item-desc">' in figure
    assert "<title id=\"per-item-title\">Per-item alignment before and after steering</title>" in figure
    # Over calibrated +0.04, -0.02, +0.06, 0: mean +0.020, paired SE sqrt(0.004 / 3) / 2 = 0.018; over
    # unsteered +0.09, +0.17, +0.08, +0.05: mean +0.0975, SE sqrt(0.007875 / 3) / 2 = 0.026.
    caption = ("Mean gain of steered over calibrated: +0.020 ± 0.018 (paired standard error, 4 items, "
               "cross-validated); over unsteered: +0.098 ± 0.026.")
    assert f"<figcaption>{caption}</figcaption>" in figure and f"<desc id=\"per-item-desc\">{caption}</desc>" in figure
    assert "items (4), sorted by gain over calibrated" in figure and "alignment (cross-validated)" in figure
    marks = re.findall(r'<g class="item gain-(\w+)"><title>([^\n<]*)', figure)
    assert marks == [("down", "q02: Trains &lt;b&gt;now&lt;/b&gt;?"), ("none", "q04: Shops?"),
                     ("up", "q01: Buses?"), ("up", "#2: Parks?")]  # sorted by gain; the question escaped
    assert "unsteered 0.610, calibrated 0.800, steered 0.780 (-0.020)" in figure
    assert figure.count('class="before"') == 5 and figure.count('class="after"') == 5  # 4 items + the legend
    assert "No per-item alignment" not in page
    # The list pages do not carry the per-item rows.
    assert "Trains" not in client.get("/console/profiles").text


def test_the_profile_pages_say_what_a_profile_does(client, auth, tenant_key, settings):
    """A profile calibrated to temperature 50 that ships strength 0: its page and the list say in plain words
    that it serves the calibrated model, answers near uniform and did not improve."""
    from steer_core.calibration import Calibration, sample_alignment
    from steer_core.data import make_item
    from steer_core.evaluation import uniform_distributions
    from steer_core.verdict import judge

    items = [make_item(f"Q{i}?", ["Agree", "Unsure", "Disagree"], target=[0.6, 0.3, 0.1]) for i in range(6)]
    confident = [np.roll([0.9, 0.07, 0.03], i) for i in range(6)]
    flat = Calibration(temperature=50.0).apply_all(items, confident)
    verdict = judge(sample_alignment(items, flat), sample_alignment(items, confident),
                    sample_alignment(items, uniform_distributions(items)), flat, "calibrated model")
    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban").json["id"]
    mark_ready(settings, profile_id)
    with db.session_scope(settings) as session:
        db.profile_by_id(session, profile_id).metrics = {
            "evaluation": "cross-validated", "verdict": verdict.to_json(), "improved": verdict.improved,
            "generation": {"steering": False, "gain_vs_unsteered": {"mean": 0.0, "standard_error": 0.0}}}
    sign_in(client, tenant_key)
    page = client.get(f"/console/profiles/{profile_id}").text
    assert '<dd id="verdict-improved">no ' in page and '<dd id="verdict-serves">calibrated model</dd>' in page
    assert '<dd id="verdict-near-uniform">yes</dd>' in page
    assert "serves the calibrated unsteered model" in page and "answers near uniform" in page
    assert 'id="verdict-chat">0.000 ± 0.000 over unsteered' in page
    listing = client.get("/console/profiles").text
    assert "not improved, serves the calibrated model, answers near uniform" in listing


def test_a_profile_without_per_item_numbers_says_so(client, auth, tenant_key, settings):
    make_group(client, auth, "urban", n=6)
    profile_id = request_profile(client, auth, "urban").json["id"]
    mark_ready(settings, profile_id)  # metrics as a build before per-item numbers wrote them
    sign_in(client, tenant_key)
    page = client.get(f"/console/profiles/{profile_id}")
    assert page.status_code == 200
    assert 'id="per-item-plot-missing"' in page.text and "<svg" not in page.text
    assert "0.800" in page.text  # the summary is still shown


def test_console_pages_are_not_in_the_api_document(client):
    paths = client.get("/openapi.json").json["paths"]
    assert not [p for p in paths if p.startswith("/console")]


# ------------------------------------------------------------------- what the pages show, and what they hide

def test_the_root_leads_to_the_console_and_the_console_has_an_icon(client):
    r = client.get("/")
    assert r.status_code == 302 and r.headers["Location"] == "/console/"
    assert client.get("/console/").headers["Location"] == "/console/profiles"
    with client.get("/favicon.ico") as icon:
        assert icon.status_code == 200 and icon.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
        assert icon.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    page = client.get("/console/login").text
    assert 'rel="icon" href="/console/static/favicon.svg"' in page and 'rel="icon" href="/favicon.ico"' in page
    with client.get("/console/static/favicon.svg") as svg:
        assert svg.status_code == 200 and svg.data.startswith(b"<svg")


def test_groups_and_users_are_paged_and_searched(client, auth, tenant_key):
    for i in range(120):
        assert client.put(f"/v1/users/user-{i:03d}", json={}, headers=auth).status_code == 201
    assert client.put("/v1/users/zz_odd", json={}, headers=auth).status_code == 201
    for gid in ("rural", "urban"):
        assert client.put(f"/v1/groups/{gid}", json={"members": []}, headers=auth).status_code == 201
    client.post("/v1/users/user-007/opinions", json={"items": fixture_items("opinions_group_urban.jsonl", 3)},
                headers=auth)
    sign_in(client, tenant_key)

    def users_of(page: str) -> list[str]:
        table = page[page.index('id="users"'):page.index("</table>", page.index('id="users"'))]
        return re.findall(r">(user-\d+|zz_odd)</a>", table)

    first = client.get("/console/subjects").text
    assert users_of(first) == [f"user-{i:03d}" for i in range(50)]
    assert "Users <span class=\"muted\">(121)" in first and "page 1 of 3" in first
    assert "<td>3</td>" in first  # user-007's own items
    assert 'id="users-next" ' in first or 'id="users-next"' in first
    assert 'id="groups-pager"' not in first  # two groups: one page, no pager
    last = client.get("/console/subjects?page=3").text
    assert users_of(last) == [f"user-{i:03d}" for i in range(100, 120)] + ["zz_odd"]
    assert "page 3 of 3" in last and 'id="users-previous"' in last and 'id="users-next"' not in last
    assert users_of(client.get("/console/subjects?page=99").text)[-1] == "zz_odd"  # past the end: the last

    found = client.get("/console/subjects?q=USER-01").text  # any case, part of the id
    assert users_of(found) == [f"user-{i:03d}" for i in range(10, 20)] and "(10 matching" in found
    assert "No group id contains" in found and 'value="USER-01"' in found
    # LIKE's wildcards are taken literally.
    assert users_of(client.get("/console/subjects?q=%25").text) == []
    assert users_of(client.get("/console/subjects?q=_").text) == ["zz_odd"]
    paged = client.get("/console/subjects?q=user&page=2").text
    assert 'href="/console/subjects?q=user&amp;page=3"' in paged  # the pager keeps the search


def _experiment(client, auth, name: str, profile_id: str, scope: str | None = "urban") -> str:
    body = {"name": name, "reward": "thumbs", "control": "control",
            "variants": [{"name": "control", "weight": 1},
                         {"name": "steered", "weight": 1, "profiles": [{"id": profile_id, "weight": 1}]}]}
    if scope:
        body["scope"] = {"group": scope}
    r = client.post("/v1/experiments", json=body, headers=auth)
    assert r.status_code == 201, r.json
    return r.json["id"]


def test_the_experiment_page_shows_the_stored_offline_comparison_and_only_what_applies(client, auth, tenant_key,
                                                                                       settings):
    from service.experiments import offline_comparison

    make_group(client, auth, "urban", n=8)
    profile_id = request_profile(client, auth, "urban").json["id"]
    mark_ready(settings, profile_id)
    scoped = _experiment(client, auth, "scoped", profile_id)
    unscoped = _experiment(client, auth, "everyone", profile_id, scope=None)
    sign_in(client, tenant_key)

    page = client.get(f"/console/experiments/{scoped}").text
    assert "not asked for yet" in page and 'id="run-offline"' in page
    assert 'id="pause-button"' in page and 'id="stop-button"' in page and 'id="resume-button"' not in page

    def scorer(items, blend):  # the steered variant answers closer to the group than the unsteered model
        return [(0.9 if blend else 0.5) * np.asarray(it.target) + (0.1 if blend else 0.5) / len(it.options)
                for it in items]

    with db.session_scope(settings) as session:  # what a worker stores
        exp = session.get(db.Experiment, scoped)
        found = offline_comparison.inputs(session, exp, settings.model)
        row, _ = offline_comparison.request(session, exp, found.sha256, settings.build_stale_after)
        result = offline_comparison.score(found, scorer)
        offline_comparison.store(session, row, result)
    page = client.get(f"/console/experiments/{scoped}").text  # no ?offline=1: the stored one is shown
    assert "Offline comparison\n(ready): 8 in-sample opinion items of the scope group" in page, page
    cells = re.findall(r'<td class="offline-alignment">([^<]+)</td>', page)
    assert cells == [f"{result.scores[name].alignment:.3f}" for name in ("control", "steered")]
    assert 'id="run-offline"' not in page and "not asked for yet" not in page
    assert client.get(f"/v1/experiments/{scoped}/results", headers=auth).json["offline"]["status"] == "ready"

    page = client.get(f"/console/experiments/{unscoped}?offline=1").text  # cannot have one: nothing is asked
    assert "none for this experiment (the experiment has no scope group)" in page and 'id="run-offline"' not in page
    with db.session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(db.OfflineComparisonRow).where(
            db.OfflineComparisonRow.experiment_id == unscoped)) == 0

    assert client.post(f"/v1/experiments/{scoped}/pause", headers=auth).status_code == 200
    page = client.get(f"/console/experiments/{scoped}").text
    assert 'id="resume-button"' in page and 'id="stop-button"' in page and 'id="pause-button"' not in page
    assert client.post(f"/v1/experiments/{scoped}/stop", headers=auth).status_code == 200
    page = client.get(f"/console/experiments/{scoped}").text
    assert not re.search(r'id="(pause|resume|stop)-button"', page)


def test_the_profile_page_reads_as_words_and_its_bars_show_differences(client, auth, tenant_key, settings):
    make_group(client, auth, "urban", n=6)
    queued = request_profile(client, auth, "urban", params={"layer": 3, "strength": 1.5}).json["id"]
    ready = request_profile(client, auth, "urban").json["id"]
    mark_ready(settings, ready)
    with db.session_scope(settings) as session:
        db.profile_by_id(session, ready).metrics = {
            "evaluation": "cross-validated", "improved": True, "near_uniform": False, "note": "fine",
            "unsteered": {"alignment": 0.794}, "calibrated": {"alignment": 0.801}, "steered": {"alignment": 0.817},
            "search_space": {"layers": [2, 3], "strengths": [0.5, 1.0]}, "orders": ["survey", "reversed"]}
    sign_in(client, tenant_key)

    page = client.get(f"/console/profiles/{queued}").text
    assert '<dd id="params">layer 3, strength 1.500</dd>' in page
    assert "Download" not in page  # nothing to download before it is ready
    assert client.get(f"/console/profiles/{queued}/download").status_code == 409

    page = client.get(f"/console/profiles/{ready}").text
    assert '<dd id="params">none: the build chose everything</dd>' in page
    assert 'id="download-safetensors"' in page and 'id="download-gguf"' in page and 'id="download-peft"' not in page
    facts = page[page.index('<dl class="facts">', page.index('id="metrics"')):]
    facts = facts[:facts.index("</dl>")]
    assert "<dt>improved</dt><dd>yes</dd>" in facts and "<dt>near uniform</dt><dd>no</dd>" in facts
    assert "<dt>search space</dt><dd>layers: 2, 3; strengths: 0.500, 1.000</dd>" in facts, facts
    assert "<dd>survey, reversed</dd>" in facts
    assert not re.search(r"True|False|[\[\]{}\"]", re.sub(r"<[^>]*>", " ", facts)), facts
    widths = {name: float(w) for name, w in re.findall(
        r'<span class="bar-label">(\w+)</span>\s*<span class="bar"><span class="fill" style="width: ([\d.]+)%">',
        page)}
    # 0.794 and 0.817 on a scale from 0.78 to 0.83 (half the spread beyond each end), not from 0: the difference
    # is almost half the bar (28% against 74%), not 3 points of it.
    assert 'id="alignment-scale">alignment from 0.78 (left edge) to 0.83 (right edge)' in page
    assert widths["steered"] - widths["unsteered"] > 30 and 0 < widths["unsteered"] < widths["calibrated"], widths
