"""Profiles over HTTP: idempotent creation, validation, listing, deletion, artifact download."""

from __future__ import annotations

from api_helpers import make_group, mark_failed, mark_ready, profile_bytes, request_profile
from sqlalchemy import func, select

from service.store import db
from service.store.artifacts import ArtifactStore
from steer_core.profile import Profile


def count_profiles(settings) -> int:
    with db.session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(db.ProfileRow)))


def queued_messages(settings) -> int:
    from service.queue import queue_depths

    return sum(queue_depths(settings).values())


def test_create_is_accepted_queued_and_enqueued(client, auth, settings):
    make_group(client, auth)
    before = queued_messages(settings)
    r = request_profile(client, auth)
    assert r.status_code == 202
    body = r.json
    assert body["status"] == "queued" and body["subject"] == {"kind": "group", "id": "urban"}
    assert body["model"] == settings.model and body["version"] == 1 and body["artifact"] is None
    assert r.headers["Location"].endswith(f"/v1/profiles/{body['id']}")
    assert queued_messages(settings) == before + 1
    got = client.get(f"/v1/profiles/{body['id']}", headers=auth)
    assert got.status_code == 200 and got.json["status"] == "queued"


def test_same_request_twice_is_one_profile(client, auth, settings):
    make_group(client, auth)
    first = request_profile(client, auth, params={"layer": 3, "positions": "prompt"})
    before = queued_messages(settings)
    again = request_profile(client, auth, params={"positions": "prompt", "layer": 3})
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    assert queued_messages(settings) == before  # no second build
    assert count_profiles(settings) == 1
    other = request_profile(client, auth, params={"layer": 4})
    assert other.status_code == 202 and other.json["id"] != first.json["id"]


def test_new_opinions_make_a_new_version(client, auth):
    make_group(client, auth, n=8)
    first = request_profile(client, auth).json
    from api_helpers import fixture_items

    more = fixture_items("opinions_group_urban.jsonl")[8:12]
    client.post("/v1/groups/urban/opinions", json={"items": more}, headers=auth)
    second = request_profile(client, auth)
    assert second.status_code == 202
    assert second.json["id"] != first["id"] and second.json["version"] == 2
    assert second.json["sample_hash"] != first["sample_hash"]


def test_failed_profile_is_retried_when_asked_again(client, auth, settings):
    make_group(client, auth)
    first = request_profile(client, auth).json
    mark_failed(settings, first["id"], "out of memory")
    assert client.get(f"/v1/profiles/{first['id']}", headers=auth).json["error"] == "out of memory"
    again = request_profile(client, auth)
    assert again.status_code == 202 and again.json["id"] == first["id"]
    assert again.json["status"] == "queued" and again.json["error"] is None


BAD_REQUESTS = [
    ({"method": "no-such-method"}, 422, "method"),
    ({"model": "gpt2"}, 422, "model"),
    ({"params": {"strength": -1}}, 422, "params.strength"),
    ({"params": {"strength": "big"}}, 422, "params.strength"),
    ({"params": {"layer": 1.5}}, 422, "params.layer"),
    ({"params": {"positions": "middle"}}, 422, "params.positions"),
    ({"method": "lora", "params": {"positions": "prompt"}}, 422, "params.positions"),  # adapters: every position
    ({"method": "cold_fd", "params": {"positions": "last"}}, 422, "params.positions"),  # prompt positions only
    ({"params": {"temperature": 3}}, 422, "params.temperature"),  # diffmean has no own params
    ({"subject": {"kind": "group", "id": "nobody"}}, 404, "subject.id"),
    ({"subject": {"kind": "crowd", "id": "urban"}}, 422, "subject.kind"),
    ({"subject": {"kind": "group"}}, 422, "subject.id"),
    ({"method": 7}, 422, "method"),
    ({"extra": True}, 422, "extra"),
]


def test_bad_requests_name_the_field_and_store_nothing(client, auth, settings):
    make_group(client, auth)
    before = queued_messages(settings)
    for body, status, field in BAD_REQUESTS:
        full = {"subject": {"kind": "group", "id": "urban"}, "method": "diffmean", **body}
        r = client.post("/v1/profiles", json=full, headers=auth)
        assert (r.status_code, r.json["error"]["field"]) == (status, field), (body, r.json)
    assert count_profiles(settings) == 0
    assert queued_messages(settings) == before


def test_too_few_items_are_refused_up_front(client, auth, settings):
    make_group(client, auth, n=3)
    r = request_profile(client, auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "subject"
    # Fixing both layer and strength needs no held-out split: then three items are enough.
    r = request_profile(client, auth, params={"layer": 2, "strength": 1.0})
    assert r.status_code == 202
    client.put("/v1/groups/empty", json={}, headers=auth)
    r = request_profile(client, auth, gid="empty")
    assert r.status_code == 422 and "no opinion items" in r.json["error"]["message"]
    assert count_profiles(settings) == 1


def test_list_filters_and_pages(client, auth, settings):
    make_group(client, auth)
    client.put("/v1/users/u", json={}, headers=auth)
    from api_helpers import fixture_items

    client.post("/v1/users/u/opinions", json={"items": fixture_items("user_answers.jsonl")}, headers=auth)
    ids = [request_profile(client, auth, params={"layer": layer}).json["id"] for layer in (1, 2, 3)]
    user_profile = client.post("/v1/profiles", json={"subject": {"kind": "user", "id": "u"}, "method": "diffmean"},
                               headers=auth).json["id"]
    mark_ready(settings, ids[0])

    page = client.get("/v1/profiles?limit=3", headers=auth).json
    assert len(page["profiles"]) == 3 and page["next_after"] is not None
    rest = client.get(f"/v1/profiles?limit=3&after={page['next_after']}", headers=auth).json
    assert rest["next_after"] is None
    seen = [p["id"] for p in page["profiles"] + rest["profiles"]]
    assert sorted(seen) == sorted(ids + [user_profile]) and len(set(seen)) == 4

    ready = client.get("/v1/profiles?status=ready", headers=auth).json["profiles"]
    assert [p["id"] for p in ready] == [ids[0]]
    mine = client.get("/v1/profiles?subject_kind=user&subject_id=u", headers=auth).json["profiles"]
    assert [p["id"] for p in mine] == [user_profile]
    r = client.get("/v1/profiles?subject_id=u", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "subject_kind"
    r = client.get("/v1/profiles?limit=0", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "limit"


def test_ready_profile_shows_metrics_and_downloads(client, auth, settings):
    make_group(client, auth)
    pid = request_profile(client, auth).json["id"]
    r = client.get(f"/v1/profiles/{pid}/artifact", headers=auth)
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_not_ready"
    data = profile_bytes()
    sha = mark_ready(settings, pid, data)
    body = client.get(f"/v1/profiles/{pid}", headers=auth).json
    assert body["status"] == "ready" and body["artifact"] == {"sha256": sha, "size": len(data)}
    assert body["chosen"]["layer"] == 3 and body["metrics"]["steered"]["alignment"] == 0.8
    r = client.get(f"/v1/profiles/{pid}/artifact", headers=auth)
    assert r.status_code == 200 and r.data == data
    assert r.headers["X-Artifact-SHA256"] == sha
    assert Profile.from_bytes(r.data).layer == 3


def test_constant_vector_profiles_download_as_llama_cpp_control_vectors(client, auth, settings, tmp_path):
    import gguf
    import torch

    make_group(client, auth)
    pid = request_profile(client, auth).json["id"]
    mark_ready(settings, pid, profile_bytes(seed=3.0))  # diffmean, layer 3, strength 2, vector of 3s
    r = client.get(f"/v1/profiles/{pid}/artifact?format=gguf", headers=auth)
    assert r.status_code == 200 and r.data[:4] == b"GGUF"
    assert r.headers["Content-Disposition"].endswith('.gguf"')
    (tmp_path / "cv.gguf").write_bytes(r.data)
    tensors = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "cv.gguf").tensors}
    assert list(tensors) == ["direction.3"] and (tensors["direction.3"] == 6.0).all()
    r = client.get(f"/v1/profiles/{pid}/artifact?format=pickle", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "format"

    other = request_profile(client, auth, method="odesteer").json["id"]
    ode = Profile(method="odesteer", model_name="smollm2-135m-instruct", model_fingerprint="test", layer=3,
                  positions="last", strength=1.0, tensors={"coef": torch.zeros(4)})
    mark_ready(settings, other, ode.to_bytes())
    r = client.get(f"/v1/profiles/{other}/artifact?format=gguf", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "format"
    assert client.get(f"/v1/profiles/{other}/artifact", headers=auth).status_code == 200


def test_corrupted_artifact_is_reported_unavailable(client, auth, settings):
    make_group(client, auth)
    pid = request_profile(client, auth).json["id"]
    sha = mark_ready(settings, pid)
    path = ArtifactStore(settings.artifact_dir).path(sha)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    r = client.get(f"/v1/profiles/{pid}/artifact", headers=auth)
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_unavailable"
    # The profile is failed from then on (test_broken_artifacts.py: the reason, /readyz, the rebuild).
    r = client.get(f"/v1/profiles/{pid}/artifact", headers=auth)
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_not_ready"


def test_delete_removes_row_cache_and_unshared_file(client, auth, other_auth, settings, app, redis_url):
    import redis as redis_lib

    from service.store.artifacts import REDIS_PREFIX

    make_group(client, auth)
    make_group(client, other_auth)
    mine = request_profile(client, auth).json["id"]
    theirs = request_profile(client, other_auth).json["id"]
    data = profile_bytes(seed=5.0)
    sha = mark_ready(settings, mine, data)
    assert mark_ready(settings, theirs, data) == sha  # same bytes: one shared file
    client.put("/v1/users/alice", json={"default_profile_id": mine}, headers=auth)
    with app.app_context():
        from service import context

        context.profile_cache().load(sha)  # now in the LRU and in Redis
    cached = redis_lib.Redis.from_url(redis_url)
    assert cached.exists(REDIS_PREFIX + sha)
    store = ArtifactStore(settings.artifact_dir)

    assert client.delete(f"/v1/profiles/{mine}", headers=auth).status_code == 204
    assert client.get(f"/v1/profiles/{mine}", headers=auth).status_code == 404
    assert client.get("/v1/users/alice", headers=auth).json["default_profile_id"] is None
    assert store.exists(sha)  # tenant B's profile still uses it
    assert client.get(f"/v1/profiles/{theirs}/artifact", headers=other_auth).data == data

    assert client.delete(f"/v1/profiles/{theirs}", headers=other_auth).status_code == 204
    assert not store.exists(sha)
    assert not cached.exists(REDIS_PREFIX + sha)
    assert client.delete(f"/v1/profiles/{theirs}", headers=other_auth).status_code == 404


def test_default_profile_must_exist(client, auth):
    r = client.put("/v1/users/alice", json={"default_profile_id": "00000000-0000-0000-0000-000000000000"},
                   headers=auth)
    assert r.status_code == 404 and r.json["error"]["field"] == "default_profile_id"
    assert client.get("/v1/users/alice", headers=auth).status_code == 404


def test_the_profile_document_carries_per_item_alignment_and_the_list_leaves_it_out(client, auth, task_settings):
    from api_helpers import fixture_items

    from service.queue import BUILD_TASK, create_celery

    make_group(client, auth, n=6)
    pid = request_profile(client, auth, params={"layer": 1}).json["id"]
    result = create_celery(task_settings).tasks[BUILD_TASK].apply(args=[pid])
    assert result.successful() and result.get()["status"] == "ready", result.get()
    metrics = client.get(f"/v1/profiles/{pid}", headers=auth).json["metrics"]
    per_item = metrics["per_item"]
    assert per_item["metric"] == "alignment" and per_item["total"] == 6
    sample = fixture_items("opinions_group_urban.jsonl", 6)
    assert sorted(r["id"] for r in per_item["items"]) == sorted(it["id"] for it in sample)
    for name in ("unsteered", "calibrated", "steered"):
        mean = sum(r[name] for r in per_item["items"]) / 6
        assert abs(mean - metrics[name]["alignment"]) < 1e-6, name
    listed = client.get("/v1/profiles", headers=auth).json["profiles"]
    assert [p["id"] for p in listed] == [pid]
    assert "per_item" not in listed[0]["metrics"]
    assert listed[0]["metrics"] == {k: v for k, v in metrics.items() if k != "per_item"}
