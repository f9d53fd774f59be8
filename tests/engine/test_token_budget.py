"""A chat request that gives no `max_tokens` gets the deployment's small default, and each tenant's prompt
plus requested tokens per minute are bounded beside its request rate limit (429 with Retry-After)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from service import create_app
from service.api.chat import stop_engine
from service.auth import create_key
from service.store import db

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def chat(client, headers, **extra):  # noqa: ANN001, ANN201
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hello."}],
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_default_max_tokens_and_the_per_tenant_token_budget(settings, default_model_path):
    budget = 120
    app = create_app({"SETTINGS": dataclasses.replace(settings, default_max_tokens=3, tokens_per_minute=budget),
                      "TESTING": True})
    client = app.test_client()
    with db.session_scope(settings) as session:
        a = {"Authorization": f"Bearer {create_key(session, 'tenant-a')}"}
        a2 = {"Authorization": f"Bearer {create_key(session, 'tenant-a')}"}  # the same tenant's second key
        b = {"Authorization": f"Bearer {create_key(session, 'tenant-b')}"}
    try:
        assert chat(client, b, max_tokens=1).status_code == 200  # loads the model before anything is timed
        if time.time() % 60 > 45:  # the budget's window is the clock's minute: start the checks inside one
            time.sleep(60.5 - time.time() % 60)
        r = chat(client, a)
        assert r.status_code == 200, r.json
        assert r.json["usage"]["completion_tokens"] <= 3  # the default, not MAX_NEW_TOKENS
        used = r.json["usage"]["prompt_tokens"] + 3
        r = chat(client, a2, max_tokens=budget - used - r.json["usage"]["prompt_tokens"] + 1)
        assert r.status_code == 429, r.json
        assert r.json["error"]["type"] == "token_budget" and r.json["error"]["field"] == "max_tokens"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert chat(client, a2, max_tokens=1).status_code == 200  # a refused request was not counted
        assert chat(client, b, max_tokens=3).status_code == 200  # another tenant has its own budget
    finally:
        stop_engine(app)
