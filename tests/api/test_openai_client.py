"""The official `openai` client against the real app over HTTP: it lists the models, picks a profile from
the list, chats with it (plain and streamed, with log-probabilities, several choices), and gets 422s that
name the field for what the server does not do. A tiny random model generates (the point is the wire
protocol, not the text)."""

from __future__ import annotations

import math
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
    # No verdict: this profile's row was made ready by hand, without a build's metrics.
    assert picked.steering == {"profile": pid, "subject": {"kind": "group", "id": "urban"}, "method": "diffmean",
                               "version": 1, "verdict": None}
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


def test_the_readmes_way_of_picking_a_profile_picks_it_by_subject(server, settings, tenant_key, auth, tiny_lm):
    """The README's example: the list is newest first, so a profile is picked by its subject, and the reply's
    `model` is the `<base>:<profile id>` that was sent."""
    app, url = server
    urban = ready_profile(app, settings, auth, tiny_lm, "urban", seed=1)
    rural = ready_profile(app, settings, auth, tiny_lm, "rural", seed=2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    models = client.models.list().data
    base = settings.model
    assert [m.id for m in models] == [base, f"{base}:{rural}", f"{base}:{urban}"]  # newest first
    # As the README picks it:
    picked = next(m.id for m in models if getattr(m, "steering", None)
                  and m.steering["subject"] == {"kind": "group", "id": "urban"})
    assert picked == f"{base}:{urban}"
    reply = client.chat.completions.create(model=picked, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.model == picked and reply.steering["profiles"][0]["id"] == urban


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"extra_body": {"bogus": 1}}, "bogus", "unknown field"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
])
def test_what_the_server_does_not_do_is_a_422_naming_the_field(server, settings, tenant_key, extra, field, words):
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=settings.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, **extra)
    error = caught.value.body["error"] if "error" in caught.value.body else caught.value.body
    assert error["field"] == field and words in error["message"], error


def test_log_probabilities_of_a_listed_profile_plain_and_streamed(server, settings, tenant_key, auth, tiny_lm):
    app, url = server
    pid = ready_profile(app, settings, auth, tiny_lm, "urban", seed=1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    picked = next(m.id for m in client.models.list().data if m.id == f"{settings.model}:{pid}")
    ask = {"messages": [{"role": "user", "content": "City or countryside?"}], "max_tokens": 8, "temperature": 0,
           "logprobs": True, "top_logprobs": 3}

    steered = client.chat.completions.create(model=picked, **ask)
    choice = steered.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == steered.usage.completion_tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == choice.message.content
    for t in tokens:
        assert math.isfinite(t.logprob) and t.logprob <= 0 and len(t.top_logprobs) == 3
        assert all(math.isfinite(a.logprob) and t.logprob >= a.logprob for a in t.top_logprobs)  # greedy
        assert t.top_logprobs[0].logprob == t.logprob

    plain = client.chat.completions.create(model=settings.model, **ask)
    assert plain.choices[0].logprobs.content[0].top_logprobs != tokens[0].top_logprobs  # the steered model's

    chunks = list(client.chat.completions.create(model=picked, stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content] \
        == tokens

    without = client.chat.completions.create(model=picked, **{**ask, "logprobs": False, "top_logprobs": None})
    assert without.choices[0].logprobs is None and without.choices[0].message.content == choice.message.content


def test_n_seeded_choices_are_independent_and_reproducible(server, settings, tenant_key):
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)
    ask = {"model": settings.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
           "temperature": 1.0, "seed": 11, "n": 3, "logprobs": True}
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]  # deterministic per choice
    assert len(set(texts)) == 3  # each choice its own sample
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    assert all(c.logprobs.content[0].top_logprobs == [] for c in first.choices)  # top_logprobs defaults to 0

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    streamed = ["", "", ""]
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    assert chunks[-1].usage == first.usage
