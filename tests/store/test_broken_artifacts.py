"""An artifact that is corrupted or missing on disk fails its profiles with the reason, /readyz reports it
(without gating readiness), and asking for the same profile again rebuilds it in place: same id, the next
version. The rebuild through a real worker is in test_faults.py."""

from __future__ import annotations

from api_helpers import make_group, mark_ready, request_profile

from service.store.artifacts import ArtifactStore


def test_a_corrupted_artifact_fails_its_profile_and_asking_again_rebuilds_it_in_place(client, auth, settings):
    make_group(client, auth, "urban", 6)
    first = request_profile(client, auth, "urban")
    pid = first.json["id"]
    sha = mark_ready(settings, pid)
    ready = client.get("/readyz").json
    assert ready["checks"]["artifacts"]["ok"]

    path = ArtifactStore(settings.artifact_dir).path(sha)
    damaged = bytearray(path.read_bytes())
    damaged[-2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    r = client.get(f"/v1/profiles/{pid}/artifact", headers=auth)
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_unavailable"

    profile = client.get(f"/v1/profiles/{pid}", headers=auth).json
    assert profile["status"] == "failed" and "corrupted" in profile["error"] and sha in profile["error"]
    r = client.get("/readyz")
    artifacts = r.json["checks"]["artifacts"]
    assert not artifacts["ok"] and artifacts["detail"].startswith("1 profile")
    assert r.json["status"] == ("ready" if all(c["ok"] for k, c in r.json["checks"].items() if k != "artifacts")
                                else "not_ready")

    again = request_profile(client, auth, "urban")
    assert again.status_code == 202
    assert again.json["id"] == pid and again.json["status"] == "queued" and again.json["error"] is None
    assert again.json["version"] == first.json["version"] + 1
    assert client.get("/readyz").json["checks"]["artifacts"]["ok"]


def test_a_missing_artifact_fails_its_profile(client, auth, settings):
    make_group(client, auth, "urban", 6)
    pid = request_profile(client, auth, "urban").json["id"]
    sha = mark_ready(settings, pid)
    ArtifactStore(settings.artifact_dir).delete(sha)
    assert client.get(f"/v1/profiles/{pid}/artifact", headers=auth).status_code == 409
    profile = client.get(f"/v1/profiles/{pid}", headers=auth).json
    assert profile["status"] == "failed" and "not in the store" in profile["error"]
