"""`/v1/chat/completions` and `/v1/score` through the HTTP app on a tiny random model: the official `openai`
client against a live server (sync and streaming), blends, per-user defaults, refusals, tenant isolation,
bad input, and a client that disconnects mid-stream."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import torch
from api_helpers import fixture_items, make_group, mark_ready, request_profile
from support import FIXTURES, Gate

from service.api import chat
from service.engine.engine import EngineStopped, PlannedProfile, SamplingParams, SteeringPlan
from service.store import db
from steer_core.data import load_items
from steer_core.option_orders import average_orders, in_both_orders, split_orders
from steer_core.profile import Profile

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
LAYER = 2
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
UNKNOWN = "00000000-0000-4000-8000-000000000000"  # a profile id no tenant has


def _vector(lm, seed: int) -> torch.Tensor:
    return 4.0 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))


def _profile_bytes(settings, lm, seed: int, fingerprint: str | None = None) -> bytes:
    return Profile(method="diffmean", model_name=settings.model, model_fingerprint=fingerprint or lm.fingerprint,
                   layer=LAYER, positions="prompt", strength=1.0, tensors={"vector": _vector(lm, seed)}).to_bytes()


def _ready(client, auth, settings, lm, seed: int, gid: str = "urban") -> str:
    """A ready DiffMean profile of group `gid` whose vector is `_vector(lm, seed)` (as a worker would leave
    it: a row built through the API, an artifact in the store)."""
    r = request_profile(client, auth, gid, params={"layer": LAYER, "strength": float(seed)})
    assert r.status_code == 202, r.json
    mark_ready(settings, r.json["id"], _profile_bytes(settings, lm, seed))
    return r.json["id"]


def _direct(app, settings, blend, messages=HELLO, max_tokens: int = 8) -> str:
    """What the engine generates for `messages` under `blend` [(profile id, weight)], greedy, given the
    plan directly."""
    eng = chat.engine(app)
    with db.session_scope(settings) as session:
        digests = [db.profile_by_id(session, pid).artifact_sha256 for pid, _ in blend]
    plan = SteeringPlan(tuple(PlannedProfile(d, w) for d, (_, w) in zip(digests, blend, strict=True)))
    return eng.generate(eng.tokenize_chat(messages), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                        plan, timeout=120).text


def _chat(client, auth, settings, max_tokens: int = 8, **extra):
    body = {"model": settings.model, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers=auth)


@pytest.fixture
def chat_settings(settings):
    return dataclasses.replace(settings, max_new_tokens=400, max_profiles_per_request=3, batch_wait_ms=10)


def _make_app(chat_settings, lm):
    from service import create_app

    return create_app({"SETTINGS": chat_settings, "TESTING": True, "GENERATION_MODEL": lm})


@pytest.fixture
def chat_app(chat_settings, tiny_lm):
    app = _make_app(chat_settings, tiny_lm)
    yield app
    chat.stop_engine(app)


@pytest.fixture
def chat_client(chat_app):
    return chat_app.test_client()


@pytest.fixture
def group(chat_client, auth):
    make_group(chat_client, auth, "urban", n=6)
    return "urban"


def _serve(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def live_server(chat_app):
    server, thread, url = _serve(chat_app)
    yield url
    server.shutdown()
    thread.join(10)


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@sqlite_only
def test_the_openai_client_works_unchanged_sync_and_streaming(live_server, chat_app, chat_client, auth, tenant_key,
                                                               chat_settings, tiny_lm, group):
    from openai import OpenAI

    pid = _ready(chat_client, auth, chat_settings, tiny_lm, 1)
    api = OpenAI(base_url=f"{live_server}/v1", api_key=tenant_key, max_retries=0)
    steering = {"steering": {"profiles": [{"id": pid, "weight": 1.0}]}}
    resp = api.chat.completions.create(model=chat_settings.model, messages=HELLO, max_tokens=8, temperature=0,
                                       extra_body=steering)
    text = resp.choices[0].message.content
    assert text == _direct(chat_app, chat_settings, [(pid, 1.0)])
    assert text != _direct(chat_app, chat_settings, []), "the profile should change the greedy text"
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
    applied = resp.model_extra["steering"]
    assert applied["source"] == "request" and [p["id"] for p in applied["profiles"]] == [pid]

    stream = api.chat.completions.create(model=chat_settings.model, messages=HELLO, max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True}, extra_body=steering)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    shorthand = api.chat.completions.create(model=f"{chat_settings.model}:{pid}", messages=HELLO, max_tokens=8,
                                            temperature=0)
    assert shorthand.choices[0].message.content == text
    assert shorthand.model_extra["steering"]["source"] == "model"


@sqlite_only
def test_the_response_names_the_model_as_the_client_asked_for_it(chat_client, auth, chat_settings, tiny_lm, group):
    """`model` is echoed as sent, `<base>:<profile id>` included, in a plain response and in every chunk of a
    stream."""
    pid = _ready(chat_client, auth, chat_settings, tiny_lm, 1)
    for model in (chat_settings.model, f"{chat_settings.model}:{pid}"):
        plain = _chat(chat_client, auth, chat_settings, model=model)
        assert plain.status_code == 200 and plain.json["model"] == model, plain.json
        stream = _chat(chat_client, auth, chat_settings, model=model, stream=True)
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.get_data(as_text=True).splitlines()
                  if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        assert chunks and events[-1] == "[DONE]" and {c["model"] for c in chunks} == {model}, chunks


@sqlite_only
def test_zero_weight_blend_equals_unsteered(chat_app, chat_client, auth, chat_settings, tiny_lm, group):
    a, b = _ready(chat_client, auth, chat_settings, tiny_lm, 1), _ready(chat_client, auth, chat_settings, tiny_lm, 2)
    plain = _chat(chat_client, auth, chat_settings, max_tokens=12)
    zero = _chat(chat_client, auth, chat_settings, max_tokens=12,
                 steering={"profiles": [{"id": a, "weight": 0}, {"id": b, "weight": 0.0}]})
    half = _chat(chat_client, auth, chat_settings, max_tokens=12,
                 steering={"profiles": [{"id": a, "weight": 0.5}, {"id": b, "weight": -0.25}]})
    assert plain.status_code == zero.status_code == half.status_code == 200
    assert zero.json["choices"][0]["message"]["content"] == plain.json["choices"][0]["message"]["content"]
    assert half.json["choices"][0]["message"]["content"] == \
        _direct(chat_app, chat_settings, [(a, 0.5), (b, -0.25)], max_tokens=12)
    assert plain.json["steering"]["source"] == "none" and zero.json["steering"]["source"] == "request"


@sqlite_only
def test_concurrent_requests_with_different_profiles_get_their_own_tokens(chat_settings, tiny_lm, auth,
                                                                         tenant_key):
    from openai import OpenAI

    # A long batching window so that the two requests surely share a batch.
    app = _make_app(dataclasses.replace(chat_settings, batch_wait_ms=1500), tiny_lm)
    server, thread, url = _serve(app)
    try:
        client = app.test_client()
        make_group(client, auth, "urban", n=6)
        pids = [_ready(client, auth, chat_settings, tiny_lm, seed) for seed in (1, 2)]
        api = OpenAI(base_url=f"{url}/v1", api_key=tenant_key, max_retries=0)

        def ask(pid: str) -> str:
            resp = api.chat.completions.create(model=f"{chat_settings.model}:{pid}", messages=HELLO, max_tokens=10,
                                               temperature=0)
            return resp.choices[0].message.content

        alone = [ask(pid) for pid in pids]
        assert alone[0] != alone[1]
        assert chat.engine(app).stats.largest_batch == 1
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda p=pid: together.__setitem__(p, ask(p))) for pid in pids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [together[pid] for pid in pids] == alone
        assert chat.engine(app).stats.largest_batch == 2
    finally:
        server.shutdown()
        thread.join(10)
        chat.stop_engine(app)


def test_profiles_of_another_tenant_are_not_found(chat_client, auth, other_auth, chat_settings, tiny_lm, group):
    pid = _ready(chat_client, auth, chat_settings, tiny_lm, 1)
    assert chat_client.put("/v1/users/u1", json={"default_profile_id": pid}, headers=auth).status_code == 201
    mine = _chat(chat_client, auth, chat_settings, user="u1")
    assert mine.status_code == 200 and mine.json["steering"]["source"] == "user"

    theirs = _chat(chat_client, other_auth, chat_settings, steering={"profiles": [{"id": pid}]})
    assert theirs.status_code == 404 and theirs.json["error"]["field"] == "steering.profiles[0].id"
    shorthand = _chat(chat_client, other_auth, chat_settings, model=f"{chat_settings.model}:{pid}")
    assert shorthand.status_code == 404 and shorthand.json["error"]["field"] == "model"
    # tenant B's user u1 is not tenant A's: no default profile leaks across
    same_uid = _chat(chat_client, other_auth, chat_settings, user="u1")
    assert same_uid.status_code == 200 and same_uid.json["steering"]["source"] == "none"
    assert same_uid.json["choices"][0]["message"]["content"] == \
        _chat(chat_client, auth, chat_settings).json["choices"][0]["message"]["content"]
    score = chat_client.post("/v1/score", json={"questions": fixture_items("opinions_group_urban.jsonl", 1),
                                               "steering": {"profiles": [{"id": pid}]}}, headers=other_auth)
    assert score.status_code == 404 and score.json["error"]["field"] == "steering.profiles[0].id"


@sqlite_only
def test_profiles_that_cannot_steer_are_refused(chat_client, auth, chat_settings, tiny_lm, group):
    queued = request_profile(chat_client, auth, "urban", params={"layer": LAYER, "strength": 9.0}).json["id"]
    r = _chat(chat_client, auth, chat_settings, steering={"profiles": [{"id": queued}]})
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_not_ready"
    assert r.json["error"]["field"] == "steering.profiles[0].id"

    other_model = _ready(chat_client, auth, chat_settings, tiny_lm, 3)
    with db.session_scope(chat_settings) as session:
        db.profile_by_id(session, other_model).model = "some-other-model"
    r = _chat(chat_client, auth, chat_settings, steering={"profiles": [{"id": UNKNOWN}, {"id": other_model}]})
    assert r.status_code == 404 and r.json["error"]["field"] == "steering.profiles[0].id"
    r = _chat(chat_client, auth, chat_settings, steering={"profiles": [{"id": other_model}]})
    assert r.status_code == 422 and r.json["error"]["type"] == "profile_model_mismatch"

    wrong_weights = request_profile(chat_client, auth, "urban", params={"layer": LAYER, "strength": 7.0}).json["id"]
    mark_ready(chat_settings, wrong_weights, _profile_bytes(chat_settings, tiny_lm, 7, fingerprint="0" * 16))
    r = _chat(chat_client, auth, chat_settings, steering={"profiles": [{"id": wrong_weights}]})
    assert r.status_code == 422 and "fingerprint" in r.json["error"]["message"]

    corrupt = request_profile(chat_client, auth, "urban", params={"layer": LAYER, "strength": 8.0}).json["id"]
    sha = mark_ready(chat_settings, corrupt, _profile_bytes(chat_settings, tiny_lm, 8))
    from service.store.artifacts import ArtifactStore

    path = ArtifactStore(chat_settings.artifact_dir).path(sha)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    r = _chat(chat_client, auth, chat_settings, steering={"profiles": [{"id": corrupt}]})
    assert r.status_code == 409 and r.json["error"]["type"] == "profile_unavailable"
    assert chat.engine(chat_client.application).stats.finished == 0, "nothing refused may reach the engine"


@sqlite_only
@pytest.mark.parametrize(("change", "status", "field"), [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 422, "messages[0].content"),
    ({"max_tokens": 401}, 422, "max_tokens"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"temperature": 3}, 422, "temperature"),
    ({"n": 9}, 422, "n"),
    ({"top_logprobs": 2}, 422, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "gpt-4"}, 422, "model"),
    ({"logit_bias": {"42": -100}}, 422, "logit_bias"),
    ({"steering": {"profiles": [{"id": UNKNOWN}] * 4}}, 422, "steering.profiles"),
    ({"steering": {"profiles": [{"id": "a"}]}}, 422, "steering.profiles[0].id"),
    ({"steering": {"profiles": [{"id": UNKNOWN, "weight": "1"}]}}, 422, "steering.profiles[0].weight"),
    ({"steering": {"positions": "middle"}}, 422, "steering.positions"),
    ({"steering": {"groups_weight": 0.5}, "model": "M:p"}, 422, "steering.groups_weight"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 422, "messages"),
])
def test_bad_chat_requests_name_the_field(chat_client, auth, chat_settings, change, status, field):
    body = {"model": chat_settings.model, "messages": HELLO, "max_tokens": 4, **change}
    if body["model"] == "M:p":
        body["model"] = f"{chat_settings.model}:p"
    r = chat_client.post("/v1/chat/completions", json=body, headers=auth)
    assert r.status_code == status, r.json
    assert r.json["error"]["field"] == field


@sqlite_only
def test_non_finite_weights_are_refused(chat_client, auth, chat_settings):
    for raw in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps({"model": chat_settings.model, "messages": HELLO,
                           "steering": {"profiles": [{"id": "p", "weight": "WEIGHT"}]}}).replace('"WEIGHT"', raw)
        r = chat_client.post("/v1/chat/completions", data=body, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json["error"]["field"] == "steering.profiles[0].weight", raw


@sqlite_only
def test_a_client_that_disconnects_mid_stream_frees_its_slot(live_server, chat_app, chat_settings, tenant_key):
    url = urlparse(live_server)
    body = json.dumps({"model": chat_settings.model, "messages": HELLO, "max_tokens": 400, "temperature": 0,
                       "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {tenant_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall(head + body)
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and some text: the row is generating
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    eng = chat.engine(chat_app)
    _wait(lambda: eng.stats.active_rows == 1)
    sock.close()  # the client goes away mid-stream
    _wait(lambda: eng.stats.active_rows == 0)
    assert eng.stats.cancelled == 1 and eng.stats.tokens < 400


@sqlite_only
def test_a_users_default_profile_and_their_groups_profiles(chat_app, chat_client, auth, chat_settings, tiny_lm, group):
    make_group(chat_client, auth, "rural", n=3, members=["u1"])
    rural = _ready(chat_client, auth, chat_settings, tiny_lm, 2, gid="rural")
    mine = _ready(chat_client, auth, chat_settings, tiny_lm, 1)
    assert chat_client.put("/v1/users/u1", json={"default_profile_id": mine}, headers=auth).status_code == 200

    default = _chat(chat_client, auth, chat_settings, user="u1")
    assert default.json["steering"]["source"] == "user"
    assert [p["id"] for p in default.json["steering"]["profiles"]] == [mine]
    assert default.json["choices"][0]["message"]["content"] == _direct(chat_app, chat_settings, [(mine, 1.0)])

    blended = _chat(chat_client, auth, chat_settings, user="u1", steering={"groups_weight": 0.5})
    assert [(p["id"], p["weight"]) for p in blended.json["steering"]["profiles"]] == [(mine, 1.0), (rural, 0.5)]
    assert blended.json["choices"][0]["message"]["content"] == \
        _direct(chat_app, chat_settings, [(mine, 1.0), (rural, 0.5)])

    explicit = _chat(chat_client, auth, chat_settings, user="u1", steering={"profiles": []})
    assert explicit.json["steering"]["source"] == "request" and explicit.json["steering"]["profiles"] == []
    unknown = _chat(chat_client, auth, chat_settings, user="nobody", steering={"groups_weight": 0.5})
    assert unknown.status_code == 404 and unknown.json["error"]["field"] == "user"


@sqlite_only
def test_score_reads_the_answer_distributions_under_steering(chat_app, chat_client, auth, chat_settings, tiny_lm,
                                                            group):
    pid = _ready(chat_client, auth, chat_settings, tiny_lm, 1)
    questions = fixture_items("opinions_group_urban.jsonl", 3)
    r = chat_client.post("/v1/score", json={"questions": questions, "steering": {"profiles": [{"id": pid}]}},
                         headers=auth)
    assert r.status_code == 200, r.json
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:3]
    with db.session_scope(chat_settings) as session:
        digest = db.profile_by_id(session, pid).artifact_sha256
    # Debiased by default: the mean of the engine's reads of each question as given and with its options
    # reversed (mapped back); `orders: 1` is the engine's read as given.
    plan = SteeringPlan((PlannedProfile(digest),))
    reads = chat.engine(chat_app).score(in_both_orders(items), plan, timeout=60).distributions
    want = average_orders(split_orders(reads, len(items)))
    got = [s["probs"] for s in r.json["scores"]]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w.tolist(), abs=1e-6)
    one = chat_client.post("/v1/score", json={"questions": questions, "steering": {"profiles": [{"id": pid}]},
                                              "orders": 1}, headers=auth)
    assert one.status_code == 200, one.json
    for g, w in zip([s["probs"] for s in one.json["scores"]], reads[:len(items)], strict=True):
        assert g == pytest.approx(w.tolist(), abs=1e-6)
    single = [x for score in one.json["scores"] for x in score["probs"]]
    assert single != pytest.approx([x for probs in got for x in probs], abs=1e-4)  # the letters mattered
    assert r.json["metrics"] is not None and 0 <= r.json["metrics"]["alignment"] <= 1
    plain = chat_client.post("/v1/score", json={"questions": [{"question": q["question"], "options": q["options"]}
                                                              for q in questions]}, headers=auth)
    assert plain.status_code == 200 and plain.json["metrics"] is None
    flat = [x for s in got for x in s]
    assert [x for s in plain.json["scores"] for x in s["probs"]] != pytest.approx(flat, abs=1e-6)

    bad = chat_client.post("/v1/score", json={"questions": [{"question": "Q?", "options": ["only"]}]}, headers=auth)
    assert bad.status_code == 422 and bad.json["error"]["field"] == "questions[0].options"
    empty = chat_client.post("/v1/score", json={"questions": []}, headers=auth)
    assert empty.status_code == 422 and empty.json["error"]["field"] == "questions"


@sqlite_only
def test_score_gives_the_same_answers_whatever_the_order_of_the_options(chat_client, auth, chat_settings, tiny_lm,
                                                                      group):
    """A question and the same question with its options reversed: the same distribution up to the permutation,
    unsteered, steered and blended (the debiased read); read in one order only, they differ."""
    first, second = _ready(chat_client, auth, chat_settings, tiny_lm, 1), _ready(chat_client, auth, chat_settings,
                                                                                  tiny_lm, 2)
    questions = fixture_items("opinions_group_urban.jsonl", 4)
    flipped = [{**q, "options": q["options"][::-1], "target": q["target"][::-1],
                **({"ordinal": q["ordinal"][::-1]} if "ordinal" in q else {})} for q in questions]
    steerings = [None, {"profiles": [{"id": first}]},
                 {"profiles": [{"id": first, "weight": 0.7}, {"id": second, "weight": 0.3}]}]
    for steering in steerings:
        reads = {}
        for name, asked in (("given", questions), ("flipped", flipped)):
            for orders in (1, 2):
                r = chat_client.post("/v1/score", json={"questions": asked, "steering": steering, "orders": orders},
                                     headers=auth)
                assert r.status_code == 200, r.json
                reads[name, orders] = [s["probs"] for s in r.json["scores"]]
        for p, q in zip(reads["given", 2], reads["flipped", 2], strict=True):
            assert p == pytest.approx(q[::-1], abs=1e-6), steering
        assert any(p != pytest.approx(q[::-1], abs=1e-3) for p, q in zip(reads["given", 1], reads["flipped", 1],
                                                                          strict=True)), steering
    bad = chat_client.post("/v1/score", json={"questions": questions, "orders": 3}, headers=auth)
    assert bad.status_code == 422 and bad.json["error"]["field"] == "orders"


@sqlite_only
def test_readiness_and_metrics_report_the_engine(chat_client, auth, chat_settings):
    before = chat_client.get("/readyz").json["checks"]["model"]["detail"]
    assert before != "loaded in this process"
    assert _chat(chat_client, auth, chat_settings, max_tokens=3).status_code == 200
    assert chat_client.get("/readyz").json["checks"]["model"]["detail"] == "loaded in this process"
    metrics = chat_client.get("/metrics").get_data(as_text=True)
    assert "pluristeer_generation_tokens_total 3.0" in metrics


@sqlite_only
def test_a_client_that_gives_up_on_a_plain_request_cancels_its_row(live_server, chat_app, chat_settings, tenant_key):
    import http.client

    eng = chat.engine(chat_app)
    # 20 ms per model call: the 400 tokens would take 8 s; the client gives up after 1 s.
    slow = eng.lm.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    try:
        body = json.dumps({"model": chat_settings.model, "messages": HELLO, "max_tokens": 400, "temperature": 0})
        url = urlparse(live_server)
        client = http.client.HTTPConnection(url.hostname, url.port, timeout=1.0)
        client.request("POST", "/v1/chat/completions", body=body,
                       headers={"Authorization": f"Bearer {tenant_key}", "Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            client.getresponse()
        client.close()  # the client gives up
        # The engine counts the cancel, then frees the row at its next step: wait for both.
        _wait(lambda: eng.stats.cancelled == 1 and eng.stats.active_rows == 0, timeout=5.0)
        assert eng.stats.tokens < 200
    finally:
        slow.remove()
    metrics = chat_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'pluristeer_generation_requests_total{outcome="cancelled"} 1.0' in metrics


@sqlite_only
def test_a_full_queue_answers_503_with_retry_after(chat_app, chat_client, auth, chat_settings, tiny_lm):
    eng = chat.engine(chat_app)
    gate = Gate(tiny_lm)
    try:
        prompt = eng.tokenize_chat(HELLO)
        sampling = SamplingParams(max_tokens=2, temperature=0.0)
        handles = [eng.submit(prompt, sampling)]
        assert gate.entered.wait(30)
        handles += [eng.submit(prompt, sampling) for _ in range(eng.max_queue)]
        r = _chat(chat_client, auth, chat_settings)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json["error"]["type"] == "unavailable"
    finally:
        gate.open()
    assert all(h.result(60).completion_tokens == 2 for h in handles)
    assert _chat(chat_client, auth, chat_settings).status_code == 200


@sqlite_only
def test_an_engine_that_cannot_stop_leaves_the_slot_dead(chat_app, chat_client, auth, chat_settings, tiny_lm):
    eng = chat.engine(chat_app)
    gate = Gate(tiny_lm)
    try:
        handle = eng.submit(eng.tokenize_chat(HELLO), SamplingParams(max_tokens=50, temperature=0.0,
                                                                     ignore_eos=True))
        assert gate.entered.wait(30)
        assert chat.stop_engine(chat_app, timeout=0.1) is False
        r = _chat(chat_client, auth, chat_settings)
        assert r.status_code == 503 and "could not be stopped" in r.json["error"]["message"]
        assert "could not be stopped" in chat_client.get("/readyz").json["checks"]["model"]["detail"]
    finally:
        gate.open()
    with pytest.raises(EngineStopped):
        handle.result(30)
    assert _chat(chat_client, auth, chat_settings).status_code == 503, "no second engine on the same model"
