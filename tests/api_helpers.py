"""Small helpers shared by the API and console tests (not fixtures)."""

from __future__ import annotations

import json
import re
from typing import Any

from support import FIXTURES


def fixture_items(name: str, n: int | None = None) -> list[dict[str, Any]]:
    lines = (FIXTURES / name).read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return items[:n] if n is not None else items


def make_group(client, auth, gid: str = "urban", n: int = 10, members: list[str] | None = None) -> None:
    """A group with `n` of the urban fixture's distributions."""
    for uid in members or []:
        assert client.put(f"/v1/users/{uid}", json={}, headers=auth).status_code in (200, 201)
    r = client.put(f"/v1/groups/{gid}", json={"members": members or []}, headers=auth)
    assert r.status_code in (200, 201), r.json
    r = client.post(f"/v1/groups/{gid}/opinions", json={"items": fixture_items("opinions_group_urban.jsonl", n)},
                    headers=auth)
    assert r.status_code == 201, r.json


def request_profile(client, auth, gid: str = "urban", method: str = "diffmean", **extra: Any):
    body = {"subject": {"kind": "group", "id": gid}, "method": method, **extra}
    return client.post("/v1/profiles", json=body, headers=auth)


def profile_bytes(seed: float = 1.0) -> bytes:
    """A real (tiny) profile file, as a worker would store it."""
    import torch

    from steer_core.profile import Profile

    profile = Profile(method="diffmean", model_name="smollm2-135m-instruct", model_fingerprint="test",
                      layer=3, positions="prompt", strength=2.0, tensors={"vector": torch.full((8,), seed)})
    return profile.to_bytes()


def mark_ready(settings, profile_id: str, data: bytes | None = None) -> str:
    """Do what a worker does when a build finishes: store the artifact and mark the row ready."""
    from service.store import db
    from service.store.artifacts import ArtifactStore

    sha, size = ArtifactStore(settings.artifact_dir).put(data if data is not None else profile_bytes())
    with db.session_scope(settings) as session:
        row = db.profile_by_id(session, profile_id)
        row.status, row.artifact_sha256, row.artifact_size = "ready", sha, size
        row.chosen = {"layer": 3, "strength": 2.0, "positions": "prompt"}
        row.metrics = {"unsteered": {"alignment": 0.7}, "steered": {"alignment": 0.8}}
        row.progress = {"done": 5, "total": 5, "stage": "done"}
        row.finished_at = db.utcnow()
    return sha


def mark_failed(settings, profile_id: str, error: str = "boom") -> None:
    from service.store import db

    with db.session_scope(settings) as session:
        row = db.profile_by_id(session, profile_id)
        row.status, row.error = "failed", error


def requested_group_profile(settings, tenant: str, gid: str, items, params: dict[str, Any]) -> tuple[str, bool]:
    """A group holding `items` and a DiffMean profile requested for it, through the database layer (what
    `PUT /v1/groups` + `POST .../opinions` + `POST /v1/profiles` store); (profile id, created)."""
    from service import builds
    from service.store import db
    from steer_core.data import sample_hash

    with db.session_scope(settings) as session:
        tenant_row = db.get_or_create_tenant(session, tenant)
        group = db.Group(tenant_id=tenant_row.id, gid=gid, attributes={})
        session.add(group)
        session.flush()
        db.put_opinions(session, tenant_row.id, group, items)
        row, created = builds.request(session, tenant_row.id, "group", group.id, "diffmean", settings.model,
                                      params, sample_hash(db.subject_items(session, tenant_row.id, "group",
                                                                           group.id)))
        return row.id, created


# The console's sign-in through Flask's client.

def login_token(client) -> str:
    page = client.get("/console/login")
    assert page.status_code == 200
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def sign_in(client, key: str) -> str:
    """Sign in with `key`; the session's CSRF token."""
    r = client.post("/console/login", data={"api_key": key, "csrf_token": login_token(client)})
    assert r.status_code == 302, r.text
    return csrf_of(client)


def csrf_of(client) -> str:
    page = client.get("/console/profiles")
    assert page.status_code == 200, page.text
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
