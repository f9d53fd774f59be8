"""Bearer keys (hashed at rest, revocable, created by the CLI, at most MAX_KEYS_PER_TENANT a tenant), rate limits
per key and per tenant in Redis, and the client's address and scheme behind trusted proxies (TRUSTED_PROXIES)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib

import pytest
from sqlalchemy import select

from service import create_app
from service.api.ratelimit import hit
from service.auth import create_key_cli, revoke_key
from service.store import db


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer wrong-key"])
def test_requests_without_a_valid_key_are_401(client, tenant_key, header):
    headers = {} if header is None else {"Authorization": header}
    r = client.get("/v1/profiles", headers=headers)
    assert r.status_code == 401
    assert r.json["error"]["type"] == "unauthorized" and r.json["error"]["field"] == "Authorization"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_keys_are_stored_hashed_and_can_be_revoked(client, settings, tenant_key, auth):
    with db.session_scope(settings) as session:
        rows = session.scalars(select(db.ApiKey)).all()
        assert len(rows) == 1
        stored = [str(getattr(rows[0], c.key)) for c in db.ApiKey.__table__.columns]
        assert not any(tenant_key in value for value in stored)
        assert rows[0].key_sha256 == hashlib.sha256(tenant_key.encode()).hexdigest()
        assert tenant_key.startswith(rows[0].prefix) and len(rows[0].prefix) < len(tenant_key) // 2
    assert client.get("/v1/profiles", headers=auth).status_code == 200
    with db.session_scope(settings) as session:
        assert revoke_key(session, tenant_key)
    r = client.get("/v1/profiles", headers=auth)
    assert r.status_code == 401 and "revoked" in r.json["error"]["message"]


def test_keys_create_cli_prints_a_working_key(client, settings, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert create_key_cli(argparse.Namespace(tenant="acme")) == 0
    key = capsys.readouterr().out.strip()
    headers = {"Authorization": f"Bearer {key}"}
    assert client.put("/v1/users/x", json={}, headers=headers).status_code == 201
    assert create_key_cli(argparse.Namespace(tenant="acme")) == 0  # a second key, same tenant
    second = capsys.readouterr().out.strip()
    assert second != key
    assert client.get("/v1/users/x", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert create_key_cli(argparse.Namespace(tenant="  ")) == 2


def test_keys_create_cli_refuses_an_unmigrated_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    assert create_key_cli(argparse.Namespace(tenant="acme")) == 1
    assert "db upgrade" in capsys.readouterr().err


def test_rate_limit_window_counts_per_key(redis_url):
    import uuid

    from service.redis import client_for

    client = client_for(redis_url)
    key_a, key_b = uuid.uuid4().hex, uuid.uuid4().hex
    now = 1_000_000 * 60 + 15.0  # 15 s into a window
    results = [hit(client, key_a, 3, now) for _ in range(4)]
    assert [allowed for allowed, _, _ in results] == [True, True, True, False]
    assert [remaining for _, remaining, _ in results] == [2, 1, 0, 0]
    assert results[-1][2] == 45  # seconds until the window ends
    assert hit(client, key_b, 3, now)[0]  # another key has its own budget
    assert hit(client, key_a, 3, now + 45)[0]  # the next window starts afresh


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_over_the_limit_is_429_with_retry_after(settings, tenant_key, other_tenant_key):
    limit = 3
    app = create_app({"SETTINGS": dataclasses.replace(settings, rate_limit_per_minute=limit), "TESTING": True})
    client = app.test_client()
    headers = {"Authorization": f"Bearer {tenant_key}"}
    statuses = []
    # A window boundary may fall inside the loop: then at most 2 * limit requests pass.
    for _ in range(2 * limit + 1):
        r = client.get("/v1/profiles", headers=headers)
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429 and statuses.count(200) >= limit
    assert r.json["error"]["type"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert client.get("/v1/profiles", headers={"Authorization": f"Bearer {other_tenant_key}"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # unauthenticated routes are not limited
    text = client.get("/metrics").data.decode()
    assert 'pluristeer_rate_limit_decisions_total{outcome="limited"}' in text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_down_still_serves_and_readyz_says_so(settings, tenant_key):
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    client = create_app({"SETTINGS": down, "TESTING": True}).test_client()
    headers = {"Authorization": f"Bearer {tenant_key}"}
    assert client.put("/v1/users/u", json={}, headers=headers).status_code == 201
    assert client.get("/v1/users/u", headers=headers).status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and not r.json["checks"]["redis"]["ok"] and r.json["checks"]["database"]["ok"]
    text = client.get("/metrics").data.decode()
    assert 'pluristeer_dependency_up{dependency="redis"} 0.0' in text


def test_a_tenant_creates_lists_and_revokes_its_own_keys(client, auth, other_auth):
    r = client.post("/v1/keys", json={"name": "ci"}, headers=auth)
    assert r.status_code == 201
    created = r.json
    assert created["key"].startswith(created["prefix"]) and created["name"] == "ci" and not created["current"]
    ci = {"Authorization": f"Bearer {created['key']}"}
    assert client.put("/v1/users/x", json={}, headers=ci).status_code == 201  # same tenant as `auth`
    assert client.get("/v1/users/x", headers=auth).status_code == 200

    listed = client.get("/v1/keys", headers=ci).json["keys"]
    assert len(listed) == 2 and all("key" not in k for k in listed)
    assert [k["current"] for k in listed] == [False, True] and listed[1]["prefix"] == created["prefix"]
    assert len(client.get("/v1/keys", headers=other_auth).json["keys"]) == 1  # only its own

    # Another tenant cannot see or revoke it; a malformed prefix cannot exist.
    assert client.delete(f"/v1/keys/{created['prefix']}", headers=other_auth).status_code == 404
    assert client.delete("/v1/keys/nope", headers=auth).status_code == 404
    r = client.delete(f"/v1/keys/{created['prefix']}", headers=auth)
    assert r.status_code == 200 and r.json["revoked_at"] is not None
    r = client.get("/v1/users/x", headers=ci)
    assert r.status_code == 401 and "revoked" in r.json["error"]["message"]
    assert client.get("/v1/users/x", headers=auth).status_code == 200
    assert client.post("/v1/keys", json={"name": "  "}, headers=auth).status_code == 422


def test_keys_list_and_revoke_cli(client, settings, monkeypatch, capsys):
    from service.cli.main import main

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["keys", "create", "--tenant", "acme", "--name", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["keys", "list", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert key[:12] in out and "laptop" in out and key not in out
    headers = {"Authorization": f"Bearer {key}"}
    assert client.put("/v1/users/x", json={}, headers=headers).status_code == 201
    assert main(["keys", "revoke", key[:12]]) == 0
    assert client.get("/v1/users/x", headers=headers).status_code == 401
    assert main(["keys", "revoke", "psk_missing0"]) == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_tenant_holds_at_most_max_keys_per_tenant_unrevoked_keys(settings, tenant_key, other_tenant_key, monkeypatch,
                                                                   capsys):
    app = create_app({"SETTINGS": dataclasses.replace(settings, max_keys_per_tenant=3), "TESTING": True})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {tenant_key}"}
    made = [client.post("/v1/keys", json={"name": f"k{i}"}, headers=auth) for i in range(2)]
    assert [r.status_code for r in made] == [201, 201]  # with `tenant_key`: 3, the cap
    r = client.post("/v1/keys", json={"name": "one too many"}, headers=auth)
    assert r.status_code == 409, r.json
    error = r.json["error"]
    assert error["type"] == "too_many_keys" and error["field"] == "keys"
    assert "3 unrevoked keys" in error["message"] and "MAX_KEYS_PER_TENANT=3" in error["message"]
    assert len(client.get("/v1/keys", headers=auth).json["keys"]) == 3
    # Another tenant has its own cap; a revoked key frees its place.
    assert client.post("/v1/keys", json={"name": "b"}, headers={"Authorization": f"Bearer {other_tenant_key}"}) \
        .status_code == 201
    assert client.delete(f"/v1/keys/{made[0].json['prefix']}", headers=auth).status_code == 200
    assert client.post("/v1/keys", json={"name": "again"}, headers=auth).status_code == 201
    assert client.post("/v1/keys", json={"name": "over"}, headers=auth).status_code == 409
    # The operator's command line is not capped.
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert create_key_cli(argparse.Namespace(tenant="tenant-a")) == 0
    assert capsys.readouterr().out.strip().startswith("psk_")
    # The route documents the 409.
    assert "409" in client.get("/openapi.json").json["paths"]["/v1/keys"]["post"]["responses"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_tenant_limit_counts_all_its_keys_together(settings, tenant_key, other_tenant_key):
    """More keys do not multiply a tenant's rate: TENANT_RATE_LIMIT_PER_MINUTE holds across its keys."""
    from service.auth import add_key

    limit = 4
    app = create_app({"SETTINGS": dataclasses.replace(settings, rate_limit_per_minute=100,
                                                      tenant_rate_limit_per_minute=limit), "TESTING": True})
    client = app.test_client()
    with db.session_scope(settings) as session:
        tenant = session.scalar(select(db.ApiKey.tenant_id).where(db.ApiKey.key_sha256 == db.hash_key(tenant_key)))
        keys = [tenant_key] + [add_key(session, tenant, f"extra {i}")[0] for i in range(3)]
    statuses = []
    # Round-robin over four keys, each far under its own limit (100). A window boundary may fall inside the loop:
    # then at most 2 * limit pass.
    for i in range(2 * limit + 1):
        r = client.get("/v1/profiles", headers={"Authorization": f"Bearer {keys[i % len(keys)]}"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429 and limit <= statuses.count(200) <= 2 * limit, statuses
    error = r.json["error"]
    assert error["type"] == "rate_limited" and "tenant" in error["message"] and error["field"] == "Authorization"
    assert "TENANT_RATE_LIMIT_PER_MINUTE" in error["message"] and 1 <= int(r.headers["Retry-After"]) <= 60
    assert client.get("/v1/profiles", headers={"Authorization": f"Bearer {other_tenant_key}"}).status_code == 200
    assert 'pluristeer_rate_limit_decisions_total{outcome="tenant_limited"}' in client.get("/metrics").data.decode()
    # Unset: three keys' worth, and none when the per-key limit is off too; 0: no tenant limit.
    assert dataclasses.replace(settings, rate_limit_per_minute=600).tenant_rate_limit() == 1800
    assert dataclasses.replace(settings, rate_limit_per_minute=0).tenant_rate_limit() == 0
    unlimited = create_app({"SETTINGS": dataclasses.replace(settings, rate_limit_per_minute=100,
                                                            tenant_rate_limit_per_minute=0), "TESTING": True})
    assert unlimited.test_client().get("/v1/profiles", headers={"Authorization": f"Bearer {keys[0]}"}) \
        .status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("trusted", "behind_front", "address", "secure"), [
    (0, False, "10.0.0.2", False),  # no proxy trusted: a client's forwarding headers are ignored
    (1, False, "203.0.113.7", True),  # TLS termination in front: its X-Forwarded-For entry and -Proto
    (0, True, "203.0.113.7", False),  # `up`/`serve`'s front appended its peer's address
    (1, True, "198.51.100.1", True),  # TLS termination, then the front: one hop more
])
def test_trusted_proxies_give_the_client_address_and_the_secure_flag(settings, trusted, behind_front, address,
                                                                     secure):
    from flask import request

    app = create_app({"SETTINGS": dataclasses.replace(settings, trusted_proxies=trusted, behind_front=behind_front),
                      "TESTING": True})

    @app.get("/test-whoami")
    def whoami() -> dict:
        return {"address": request.remote_addr, "scheme": request.scheme}

    client = app.test_client()
    headers = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7", "X-Forwarded-Proto": "https"}
    peer = {"REMOTE_ADDR": "10.0.0.2"}
    seen = client.get("/test-whoami", headers=headers, environ_base=peer).json
    assert seen == {"address": address, "scheme": "https" if secure else "http"}
    # The console's cookies are Secure exactly when the request came over TLS.
    login = client.get("/console/login", headers=headers, environ_base=peer)
    cookie = login.headers["Set-Cookie"]
    assert ("; Secure" in cookie) is secure, cookie
