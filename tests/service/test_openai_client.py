"""The official `openai` client against the real app over HTTP: it lists the models, picks a profile from
the list, chats with it (plain and streamed), and gets 422s that name the field for what the server does
not do. A tiny random model generates (the point is the wire protocol, not the text)."""

from __future__ import annotations

import threading

import openai
import pytest
import torch
from api_helpers import make_group, mark_failed, mark_ready, request_profile

from service.api import chat
from steer_core.profile import Profile

pytestmark = [pytest.mark.service, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


@pytest.fixture
def server(settings, tiny_lm):
    from werkzeug.serving import make_server

    from service import create_app

    app = create_app({"SETTINGS": settings, "TESTING": True, "GENERATION_MODEL": tiny_lm})
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    thread.join(10)
    chat.stop_engine(app)


def ready_profile(app, settings, auth, lm, gid: str, seed: int) -> str:
    client = app.test_client()
    make_group(client, auth, gid)
    r = request_profile(client, auth, gid)
    assert r.status_code == 202, r.json
    vector = 4.0 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))
    profile = Profile(method="diffmean", model_name=settings.model, model_fingerprint=lm.fingerprint,
                      layer=lm.num_layers // 2, positions="prompt", strength=1.0, tensors={"vector": vector})
    mark_ready(settings, r.json["id"], profile.to_bytes())
    return r.json["id"]


def test_the_openai_client_lists_models_and_chats_with_a_profile_from_the_list(
        server, settings, tenant_key, other_tenant_key, auth, tiny_lm):
    app, url = server
    pid = ready_profile(app, settings, auth, tiny_lm, "urban", seed=1)
    other_auth = {"Authorization": f"Bearer {other_tenant_key}"}
    foreign = ready_profile(app, settings, other_auth, tiny_lm, "rural", seed=2)
    make_group(app.test_client(), auth, "failing")
    failed = request_profile(app.test_client(), auth, "failing").json["id"]
    mark_failed(settings, failed)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    models = client.models.list().data
    base = settings.model
    assert [m.id for m in models] == [base, f"{base}:{pid}"]  # not the other tenant's, not a failed one
    assert foreign not in str(models) and failed not in str(models)
    picked = models[1]
    assert picked.object == "model" and picked.created > 0
    assert picked.steering == {"profile": pid, "subject": {"kind": "group", "id": "urban"}, "method": "diffmean",
                               "version": 1}
    assert client.models.retrieve(picked.id).id == picked.id
    assert client.models.retrieve(base).id == base
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(f"{base}:{foreign}")

    question = [{"role": "user", "content": "City or countryside?"}]
    steered = client.chat.completions.create(model=picked.id, messages=question, max_tokens=6, temperature=0,
                                             metadata={"trace": "abc"}, store=False)
    plain = client.chat.completions.create(model=base, messages=question, max_tokens=6, temperature=0)
    assert steered.steering["profiles"][0]["id"] == pid and steered.steering["source"] == "model"
    assert plain.steering["source"] == "none"
    assert steered.choices[0].message.content != plain.choices[0].message.content  # the profile steers

    chunks = list(client.chat.completions.create(model=picked.id, messages=question, max_tokens=6,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == steered.choices[0].message.content


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"extra_body": {"bogus": 1}}, "bogus", "unknown field"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
])
def test_what_the_server_does_not_do_is_a_422_naming_the_field(server, settings, tenant_key, extra, field, words):
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=settings.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, **extra)
    error = caught.value.body["error"] if "error" in caught.value.body else caught.value.body
    assert error["field"] == field and words in error["message"], error
