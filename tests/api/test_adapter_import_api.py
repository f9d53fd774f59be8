"""`POST /v1/profiles/import` over HTTP with adapters the old first-byte check refused (a safetensors
header length starting with 0x80) and adapters made on the hub model; pickles still refused unread; the
peft export names the hub model and carries only peft's own config keys."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import tarfile

import pytest
import torch
from api_helpers import make_group
from peft import LoraConfig
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from support import FIXTURES

from service import create_app
from service.api import chat
from steer_core import lora
from steer_core.data import load_items
from steer_core.defaults import DEFAULT_MODEL
from steer_core.export import peft_files
from steer_core.models import HUB_IDS

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
HUB_ID = HUB_IDS[DEFAULT_MODEL]
LORA_KEYS = {f.name for f in dataclasses.fields(LoraConfig)}


@pytest.fixture
def app(settings, tiny_lm):
    assert settings.model == DEFAULT_MODEL
    app = create_app({"SETTINGS": settings, "TESTING": True, "GENERATION_MODEL": tiny_lm})
    yield app
    chat.stop_engine(app)


@pytest.fixture(scope="module")
def adapter(tiny_lm):
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:6]
    return lora.fit(tiny_lm, items, [1], lora.check_params({"steps": 2, "lr": 0.05}), "all")[1]


def _body(config, weights: bytes) -> dict:
    return {"subject": {"kind": "group", "id": "urban"}, "adapter_config": config,
            "adapter_model": base64.b64encode(weights).decode()}


@sqlite_only
def test_a_hub_adapter_with_a_0x80_header_imports_and_exports_for_the_hub_model(app, auth, adapter):
    client = app.test_client()
    make_group(client, auth, "urban", n=4)
    files = peft_files(adapter)
    tensors = st_load(files["adapter_model.safetensors"])
    # The safetensors writer's own output, its header grown by metadata until its length starts with 0x80.
    weights = next(d for d in (st_save(tensors, metadata={"pad": "x" * k}) for k in range(512)) if d[0] == 0x80)
    config = {**json.loads(files["adapter_config.json"]), "base_model_name_or_path": HUB_ID,
              "x_unknown": "tenant data", "auto_map": {"AutoModel": "evil.Model"}}
    r = client.post("/v1/profiles/import", json=_body(config, weights), headers=auth)
    assert r.status_code == 201, r.json
    assert r.json["status"] == "ready" and r.json["method"] == "lora"

    r = client.get(f"/v1/profiles/{r.json['id']}/artifact?format=peft", headers=auth)
    assert r.status_code == 200, r.json
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        exported = json.loads(tar.extractfile("adapter/adapter_config.json").read())
        exported_tensors = st_load(tar.extractfile("adapter/adapter_model.safetensors").read())
    assert exported["base_model_name_or_path"] == HUB_ID
    assert set(exported) <= LORA_KEYS and {"x_unknown", "auto_map"}.isdisjoint(exported)
    assert exported_tensors.keys() == tensors.keys()
    assert all(torch.equal(exported_tensors[k], tensors[k]) for k in tensors)


@sqlite_only
def test_pickles_are_still_refused_with_the_field(app, auth, adapter):
    client = app.test_client()
    make_group(client, auth, "urban", n=4)
    files = peft_files(adapter)
    config = {**json.loads(files["adapter_config.json"]), "base_model_name_or_path": HUB_ID}
    saved = io.BytesIO()
    torch.save(st_load(files["adapter_model.safetensors"]), saved)
    for data in (saved.getvalue(), pickle.dumps(st_load(files["adapter_model.safetensors"]))):
        r = client.post("/v1/profiles/import", json=_body(config, data), headers=auth)
        assert r.status_code == 422 and r.json["error"]["field"] == "adapter_model", r.json
        assert "not a safetensors file" in r.json["error"]["message"]
    r = client.post("/v1/profiles/import", headers=auth, json=_body(
        {**config, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M"}, files["adapter_model.safetensors"]))
    assert r.status_code == 422 and r.json["error"]["field"] == "adapter_config.base_model_name_or_path", r.json
    assert client.get("/v1/profiles", headers=auth).json["profiles"] == []
