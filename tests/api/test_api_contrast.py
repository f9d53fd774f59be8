"""The contrast of a profile over HTTP: the subjects it is told apart from are checked, stored with the
request (the tenant's other groups on the same questions by default), and read by the build."""

from __future__ import annotations

import torch
from api_helpers import fixture_items, make_group, request_profile
from sqlalchemy import func, select

from service.queue import BUILD_TASK, create_celery
from service.store import db
from service.store.artifacts import ArtifactStore
from steer_core import diffmean
from steer_core.data import items_from_json, with_contrast
from steer_core.option_orders import in_both_orders
from steer_core.profile import Profile

N = 6


def count_profiles(settings) -> int:
    with db.session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(db.ProfileRow)))


def make_groups(client, auth) -> None:
    """urban and rural answer the same N questions; 'elsewhere' answers other questions."""
    make_group(client, auth, "urban", N)
    assert client.put("/v1/groups/rural", json={}, headers=auth).status_code in (200, 201)
    r = client.post("/v1/groups/rural/opinions", json={"items": fixture_items("opinions_group_rural.jsonl", N)},
                    headers=auth)
    assert r.status_code == 201, r.json
    assert client.put("/v1/groups/elsewhere", json={}, headers=auth).status_code in (200, 201)
    rural = fixture_items("opinions_group_rural.jsonl", N)
    other = [{**it, "question": it["question"] + " (elsewhere)"} for it in rural]
    assert client.post("/v1/groups/elsewhere/opinions", json={"items": other}, headers=auth).status_code == 201


BAD_CONTRASTS = [
    ([{"kind": "group", "id": "nobody"}], 404, "contrast[0].id", "not found"),
    ([{"kind": "group", "id": "rural"}, {"kind": "group", "id": "urban"}], 422, "contrast[1]", "its own contrast"),
    ([{"kind": "group", "id": "elsewhere"}], 422, "contrast[0].id", "none of the subject's questions"),
]


def test_bad_contrasts_name_the_field_and_store_nothing(client, auth, settings):
    make_groups(client, auth)
    for contrast, status, field, message in BAD_CONTRASTS:
        r = request_profile(client, auth, contrast=contrast)
        assert r.status_code == status, r.json
        assert r.json["error"]["field"] == field and message in r.json["error"]["message"], r.json
    r = request_profile(client, auth, contrast=[{"kind": "crowd", "id": "rural"}])
    assert r.status_code == 422 and r.json["error"]["field"].startswith("contrast"), r.json
    r = request_profile(client, auth, contrast={"kind": "group", "id": "rural"})
    assert r.status_code == 422 and r.json["error"]["field"] == "contrast", r.json
    assert count_profiles(settings) == 0


def test_contrast_is_stored_with_the_request_and_defaults_to_the_other_groups(client, auth, settings):
    make_groups(client, auth)
    default = request_profile(client, auth)
    assert default.status_code == 202, default.json
    # 'elsewhere' shares no question with urban, so only rural is told apart from.
    assert default.json["params"]["contrast"] == [{"kind": "group", "id": "rural"}]
    explicit = request_profile(client, auth, contrast=[{"kind": "group", "id": "rural"}] * 2)
    assert explicit.status_code == 200 and explicit.json["id"] == default.json["id"]  # the same profile
    none = request_profile(client, auth, contrast=[])
    assert none.status_code == 202 and "contrast" not in none.json["params"]
    assert none.json["id"] != default.json["id"]
    # The contrast's answers are part of the sample: when rural's answers change, it is a new profile.
    changed = fixture_items("opinions_group_rural.jsonl", 1)
    changed[0]["target"] = [0.25, 0.25, 0.25, 0.25]
    assert client.post("/v1/groups/rural/opinions", json={"items": changed}, headers=auth).status_code == 201
    again = request_profile(client, auth)
    assert again.status_code == 202 and again.json["id"] != default.json["id"]
    assert again.json["version"] == 3
    got = client.get(f"/v1/profiles/{default.json['id']}", headers=auth).json
    assert got["params"]["contrast"] == [{"kind": "group", "id": "rural"}]


def test_the_build_reads_the_contrast(client, auth, task_settings, tiny_lm):
    make_groups(client, auth)
    params = {"layer": 1, "strength": 1.0}
    with_default = request_profile(client, auth, params=params).json["id"]
    without = request_profile(client, auth, params=params, contrast=[]).json["id"]
    vectors = {}
    for pid in (with_default, without):
        result = create_celery(task_settings).tasks[BUILD_TASK].apply(args=[pid])
        assert result.successful() and result.get()["status"] == "ready", result.get()
        row = client.get(f"/v1/profiles/{pid}", headers=auth).json
        assert "contrast" not in row["chosen"]["params"]  # a request field, not a method parameter
        data = ArtifactStore(task_settings.artifact_dir).get(row["artifact"]["sha256"])
        vectors[pid] = Profile.from_bytes(data).tensors["vector"]
    urban = items_from_json(fixture_items("opinions_group_urban.jsonl", N))
    rural = items_from_json(fixture_items("opinions_group_rural.jsonl", N))
    # Builds fit on every item in both option orders (the default).
    contrasted = in_both_orders(with_contrast(urban, [rural]))
    expected = diffmean.fit(tiny_lm, contrasted, [1], {}, "prompt")[1].tensors["vector"]
    plain = diffmean.fit(tiny_lm, in_both_orders(urban), [1], {}, "prompt")[1].tensors["vector"]
    torch.testing.assert_close(vectors[with_default], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vectors[without], plain, rtol=1e-4, atol=1e-5)
    assert (expected - plain).norm() > 0.1 * plain.norm()
