"""LoRA adapters over HTTP on a tiny random model: `POST /v1/profiles/import` (checked, a profile like any
other: chat uses it) and `GET .../artifact?format=peft` (round trip)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import tarfile
import time

import pytest
import torch
from api_helpers import make_group, mark_ready, profile_bytes, request_profile
from safetensors.torch import load as st_load
from support import FIXTURES

from service import create_app
from service.api import chat
from service.engine.engine import PlannedProfile, SamplingParams, SteeringPlan
from service.store import db
from steer_core import lora
from steer_core.data import load_items
from steer_core.export import peft_files

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture
def app(settings, tiny_lm):
    app = create_app({"SETTINGS": dataclasses.replace(settings, max_adapter_rank=8), "TESTING": True,
                      "GENERATION_MODEL": tiny_lm})
    yield app
    chat.stop_engine(app)


@pytest.fixture(scope="module")
def adapter(tiny_lm):
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:6]
    checked = lora.check_params({"steps": 3, "lr": 0.05})
    profile = lora.fit(tiny_lm, items, [0], checked, "all")[0]
    profile.strength = 3.0  # a visible change of the greedy text
    return profile


def _body(config, weights: bytes, gid: str = "urban") -> dict:
    return {"subject": {"kind": "group", "id": gid}, "adapter_config": config,
            "adapter_model": base64.b64encode(weights).decode()}


def _files(profile):
    files = peft_files(profile)
    return json.loads(files["adapter_config.json"]), files["adapter_model.safetensors"]


@sqlite_only
def test_an_imported_adapter_steers_chat_and_exports_back(app, auth, tiny_lm, adapter):
    client = app.test_client()
    make_group(client, auth, "urban", n=4)
    config, weights = _files(adapter)
    r = client.post("/v1/profiles/import", json=_body(config, weights), headers=auth)
    assert r.status_code == 201, r.json
    pid = r.json["id"]
    # The import checks shapes against the served model's layout (plain data): it starts no engine.
    assert app.extensions[chat.ENGINE].probe()["loaded"] is False
    assert r.json["status"] == "ready" and r.json["method"] == "lora" and r.json["chosen"]["rank"] == 4
    time.sleep(1.1)  # a stored profile records its creation time: the same upload must still be one profile
    again = client.post("/v1/profiles/import", json=_body(config, weights), headers=auth)
    assert again.status_code == 200 and again.json["id"] == pid

    body = {"model": app.config["SETTINGS"].model, "messages": HELLO, "max_tokens": 8, "temperature": 0,
            "steering": {"profiles": [{"id": pid, "weight": 1.0}]}}
    r = client.post("/v1/chat/completions", json=body, headers=auth)
    assert r.status_code == 200, r.json
    eng = chat.engine(app)
    prompt = eng.tokenize_chat(HELLO)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    with db.session_scope(app.config["SETTINGS"]) as session:
        digest = db.profile_by_id(session, pid).artifact_sha256
    expected = eng.generate(prompt, greedy, SteeringPlan((PlannedProfile(digest),)), timeout=120).text
    assert r.json["choices"][0]["message"]["content"] == expected
    assert expected != eng.generate(prompt, greedy, None, timeout=120).text

    for positions in ("prompt", "last"):  # an adapter changes every position: no override but "all"
        refused = client.post("/v1/chat/completions", headers=auth, json={
            **body, "steering": {"profiles": [{"id": pid, "weight": 1.0}], "positions": positions}})
        assert refused.status_code == 422 and refused.json["error"]["field"] == "steering.positions", refused.json
    r = client.post("/v1/chat/completions", headers=auth,
                    json={**body, "steering": {"profiles": [{"id": pid, "weight": 1.0}], "positions": "all"}})
    assert r.status_code == 200 and r.json["choices"][0]["message"]["content"] == expected

    r = client.get(f"/v1/profiles/{pid}/artifact?format=peft", headers=auth)
    assert r.status_code == 200 and r.mimetype == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        exported = st_load(tar.extractfile("adapter/adapter_model.safetensors").read())
        exported_config = json.loads(tar.extractfile("adapter/adapter_config.json").read())
    original = st_load(weights)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert exported_config["r"] == 4 and exported_config["peft_type"] == "LORA"


@sqlite_only
def test_import_refuses_bad_adapters_with_the_field_and_writes_nothing(app, auth, tiny_lm, adapter):
    client = app.test_client()
    make_group(client, auth, "urban", n=4)
    config, weights = _files(adapter)
    pickled = io.BytesIO()
    torch.save(st_load(weights), pickled)
    cases = [
        (_body(config, pickled.getvalue()), "adapter_model"),
        (_body(config, pickle.dumps({"x": 1})), "adapter_model"),
        ({**_body(config, weights), "adapter_model": "not base64!"}, "adapter_model"),
        (_body({**config, "base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}, weights),
         "adapter_config.base_model_name_or_path"),
        (_body({**config, "r": 16}, weights), "adapter_config.r"),  # over this deployment's cap of 8
        (_body({**config, "use_dora": True}, weights), "adapter_config.use_dora"),
        (_body(config, weights, gid="nobody"), "subject.id"),
    ]
    tensors = st_load(weights)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    from safetensors.torch import save as st_save

    cases.append((_body(config, st_save({**tensors, key: torch.zeros(3, 4)})), "adapter_model"))
    for body, field in cases:
        r = client.post("/v1/profiles/import", json=body, headers=auth)
        assert r.status_code in (404, 422), (field, r.status_code, r.json)
        assert r.json["error"]["field"] == field, r.json
    assert client.get("/v1/profiles", headers=auth).json["profiles"] == []


@sqlite_only
def test_peft_export_of_a_constant_vector_profile_is_refused(app, auth, settings):
    client = app.test_client()
    make_group(client, auth, "urban", n=6)
    pid = request_profile(client, auth, "urban", params={"layer": 3, "strength": 1.0}).json["id"]
    mark_ready(settings, pid, profile_bytes())
    r = client.get(f"/v1/profiles/{pid}/artifact?format=peft", headers=auth)
    assert r.status_code == 422 and r.json["error"]["field"] == "format"


@sqlite_only
def test_import_takes_adapters_larger_than_the_general_body_limit(settings, tiny_lm, auth, adapter):
    """An adapter file is bigger than an ordinary JSON body: the import route's limit follows
    MAX_ADAPTER_BYTES, not MAX_BODY_BYTES, and past its own limit the answer is 413."""
    config, weights = _files(adapter)
    body = _body(config, weights)
    size = len(json.dumps(body))
    app = create_app({"SETTINGS": dataclasses.replace(settings, max_body_bytes=size // 2,
                                                      max_adapter_bytes=2 * len(weights)),
                      "TESTING": True, "GENERATION_MODEL": tiny_lm})
    try:
        client = app.test_client()
        make_group(client, auth, "urban", n=4)
        r = client.post("/v1/profiles/import", json=body, headers=auth)
        assert r.status_code == 201, r.json
        padded = {**body, "adapter_config": {**config, "padding": "x" * (size + (2 << 20))}}
        r = client.post("/v1/profiles/import", json=padded, headers=auth)
        assert r.status_code == 413, r.json
        # other routes keep the general limit
        r = client.put("/v1/groups/big", json={"members": ["u" * 10] * (size // 10)}, headers=auth)
        assert r.status_code == 413
    finally:
        chat.stop_engine(app)
