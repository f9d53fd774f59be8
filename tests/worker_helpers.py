"""Helpers for the tests that build profiles through a real worker (not fixtures)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from service.settings import Settings
from service.store import db

# Small two-option items (written for these tests): a real-model build on them takes seconds, not minutes.
SMALL_ITEMS: list[dict[str, Any]] = [
    {"id": "w1", "question": "Do you take the train to work?", "options": ["Yes", "No"], "target": [0.7, 0.3]},
    {"id": "w2", "question": "Would you live without a car?", "options": ["Yes", "No"], "target": [0.6, 0.4]},
    {"id": "w3", "question": "Do you like busy streets?", "options": ["Yes", "No"], "target": [0.65, 0.35]},
    {"id": "w4", "question": "Is a big garden important to you?", "options": ["Yes", "No"], "target": [0.2, 0.8]},
    {"id": "w5", "question": "Do you walk to the shops?", "options": ["Yes", "No"], "target": [0.75, 0.25]},
    {"id": "w6", "question": "Do you want more bike lanes?", "options": ["Yes", "No"], "target": [0.8, 0.2]},
]
# A middle layer of the default model (30 blocks); fixing layer and strength skips the search.
FIXED = {"layer": 15, "strength": 1.0}


def stack_client(settings: Settings):  # noqa: ANN201
    from service import create_app

    app = create_app({"SETTINGS": settings, "TESTING": True})
    return app, app.test_client()


def new_auth(settings: Settings, tenant: str | None = None) -> dict[str, str]:
    from service.auth import create_key

    with db.session_scope(settings) as session:
        key = create_key(session, tenant or f"tenant-{uuid.uuid4().hex[:8]}")
    return {"Authorization": f"Bearer {key}"}


def make_group(client, auth, gid: str, items: list[dict[str, Any]] | None = None) -> None:  # noqa: ANN001
    r = client.put(f"/v1/groups/{gid}", json={"members": []}, headers=auth)
    assert r.status_code in (200, 201), r.json
    r = client.post(f"/v1/groups/{gid}/opinions", json={"items": items or SMALL_ITEMS}, headers=auth)
    assert r.status_code == 201, r.json


def request_build(client, auth, gid: str, params: dict[str, Any] | None = None,  # noqa: ANN001
                  contrast: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """POST /v1/profiles for group `gid`; `contrast` None leaves the server's default (the tenant's other
    groups on the same questions, so the same call can name another profile once more groups exist)."""
    body: dict[str, Any] = {"subject": {"kind": "group", "id": gid}, "method": "diffmean",
                            "params": FIXED if params is None else params}
    if contrast is not None:
        body["contrast"] = contrast
    r = client.post("/v1/profiles", json=body, headers=auth)
    assert r.status_code in (200, 202), r.json
    return r.json


def get_profile(client, auth, profile_id: str) -> dict[str, Any]:  # noqa: ANN001
    r = client.get(f"/v1/profiles/{profile_id}", headers=auth)
    assert r.status_code == 200, r.json
    return r.json


def wait_profile(client, auth, profile_id: str, statuses: tuple[str, ...] = ("ready", "failed"),  # noqa: ANN001
                 timeout: float = 300.0, worker: Any = None) -> dict[str, Any]:
    """Poll GET /v1/profiles/{id} until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        profile = get_profile(client, auth, profile_id)
        if profile["status"] in statuses:
            return profile
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker died:\n{worker.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            log = worker.log_text()[-3000:] if worker is not None else ""
            raise AssertionError(f"profile still {profile['status']} after {timeout:.0f} s: {profile}\n{log}")
        time.sleep(0.25)


def attempts(settings: Settings, profile_id: str) -> list[tuple[int, str]]:
    with db.session_scope(settings) as session:
        row = db.profile_by_id(session, profile_id)
        return [(a.attempt, a.status) for a in row.attempts]
