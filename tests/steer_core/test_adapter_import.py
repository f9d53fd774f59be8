"""Importing a tenant's peft LoRA adapter (`steer_core.lora.imported_profile`) and exporting it back
(`steer_core.export.peft_files`): safetensors recognized by its header, not by its first byte; pickles
refused unread; the default model's hub id taken as its alias and written on export; only peft's own
`LoraConfig` keys kept."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from support import FIXTURES, make_tiny

from steer_core import lora as lo
from steer_core.data import load_items
from steer_core.defaults import DEFAULT_MODEL
from steer_core.errors import SteerError
from steer_core.export import cold_fd_as_lora, peft_files
from steer_core.methods import intervention
from steer_core.models import HUB_IDS, model_layout, read_model_layout
from steer_core.steering import apply

HUB_ID = HUB_IDS[DEFAULT_MODEL]
LORA_KEYS = {f.name for f in dataclasses.fields(LoraConfig)}


@pytest.fixture(scope="module")
def adapter(tiny_lm):
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:6]
    return lo.fit(tiny_lm, items, [1], lo.check_params({"steps": 2, "lr": 0.05}), "all")[1]


def _files(profile):
    files = peft_files(profile)
    return json.loads(files["adapter_config.json"]), files["adapter_model.safetensors"]


def _safetensors(tensors: dict[str, torch.Tensor], header_size: int) -> bytes:
    """A safetensors file written by hand: its JSON header padded with trailing spaces (as the format
    allows; the library pads to 8 bytes the same way) to exactly `header_size` bytes."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        data = tensors[name].float().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= header_size
    return struct.pack("<Q", header_size) + text + b" " * (header_size - len(text)) + b"".join(chunks)


def _rejected(config, weights, layout, **kwargs) -> SteerError:
    with pytest.raises(SteerError) as err:
        lo.imported_profile(config, weights, layout, **kwargs)
    return err.value


def test_adapters_whose_header_length_starts_with_0x80_import(tiny_lm, adapter):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 (also a pickle's
    first byte) for 8 of every 256 header sizes the library writes (multiples of 8). Every size imports."""
    config, weights = _files(adapter)
    tensors = st_load(weights)
    layout = model_layout(tiny_lm)
    start = len(json.dumps({k: None for k in tensors})) * 2 + 2048
    sizes = range(start, start + 8 * 256, 8)
    first_0x80 = [n for n in sizes if n & 0xFF == 0x80]
    assert len(first_0x80) == 8
    for size in sizes:
        data = _safetensors(tensors, size)
        assert data[0] == size & 0xFF
        loaded = st_load(data)  # the safetensors library itself reads the file
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        imported = lo.imported_profile(config, data, layout)
        assert imported.tensors.keys() == tensors.keys()
        assert all(torch.equal(imported.tensors[k], tensors[k]) for k in tensors)

    # What the safetensors writer itself produces, its header grown by metadata until it starts with 0x80.
    written = next(d for d in (st_save(tensors, metadata={"pad": "x" * k}) for k in range(512)) if d[0] == 0x80)
    imported = lo.imported_profile(config, written, layout)
    batch = tiny_lm.tokenizer(["Hello there", "Who are you?"], return_tensors="pt", padding=True)
    with torch.no_grad(), apply(tiny_lm, [[intervention(imported, tiny_lm)]] * 2):
        ours = tiny_lm.model(**batch).logits
    with torch.no_grad(), apply(tiny_lm, [[intervention(adapter, tiny_lm)]] * 2):
        reference = tiny_lm.model(**batch).logits
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


class _Sentinel:
    """Unpickling this calls `_unpickled`: the import must never do it."""

    def __reduce__(self):
        return (_unpickled, ())


UNPICKLED: list[bool] = []


def _unpickled() -> None:
    UNPICKLED.append(True)


def test_pickles_are_refused_unread_naming_the_field(tiny_lm, adapter):
    config, weights = _files(adapter)
    layout = model_layout(tiny_lm)
    saved = io.BytesIO()
    torch.save(st_load(weights), saved)  # what a .bin adapter is: a zip of pickles
    pickles = [saved.getvalue(), *(pickle.dumps(_Sentinel(), protocol=p) for p in range(2, 6)),
               pickle.dumps(st_load(weights)), pickle.dumps({"x": 1}, protocol=0)]
    for data in pickles:
        err = _rejected(config, data, layout)
        assert err.field == "adapter_model" and "not a safetensors file" in err.message, err.message
    assert UNPICKLED == []
    assert _Sentinel().__reduce__()[0] is _unpickled  # what unpickling a sentinel would call (never done here)


def _header_file(header: dict | bytes, data: bytes = b"\0" * 16) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("data, says", [
    (b"", "fewer than the 8"),
    (struct.pack("<Q", 10 ** 6) + b"{}", "header of 1000000 bytes"),
    (_header_file(b' {"a": 1}'), "does not start with '{'"),
    (_header_file(b"{not json}"), "not a JSON object"),
    (_header_file(b"[1, 2]"), "does not start with '{'"),
    (_header_file(b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                  b'"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'), "repeated"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}), "span 32 bytes"),
    (_header_file({A: {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}), "hold 32 bytes"),
    (_header_file({A: {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), "starts at byte 8"),
    (_header_file({A: {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}), "non-negative"),
    (_header_file({A: {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}), "data_offsets"),
    (_header_file({A: {"dtype": "F32", "shape": [4]}}), "exactly dtype, shape and data_offsets"),
    (_header_file({A: {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}), "floating point"),
    (_header_file({"__metadata__": {"a": 1}}, b""), "__metadata__"),
])
def test_malformed_safetensors_are_refused_naming_the_field(tiny_lm, adapter, data, says):
    config, _ = _files(adapter)
    err = _rejected(config, data, model_layout(tiny_lm))
    assert err.field == "adapter_model" and says in err.message, err.message


def test_an_adapter_made_on_the_hub_model_imports_and_keeps_only_peft_keys(tiny_lm, adapter):
    """A layout served under the default alias takes an adapter naming the alias's hub id; keys peft's
    LoraConfig does not define are dropped from the stored config and the export."""
    config, weights = _files(adapter)
    served = dataclasses.replace(model_layout(tiny_lm), name=DEFAULT_MODEL)
    tenant = {**config, "base_model_name_or_path": HUB_ID, "x_callback_url": "http://evil.example",
              "padding": "x" * 1000, "auto_map": {"AutoModel": "evil.Model"}}
    for layout, aliases in ((served, ()), (model_layout(tiny_lm), (DEFAULT_MODEL,))):
        imported = lo.imported_profile(tenant, weights, layout, aliases=aliases)
        stored = imported.params["adapter_config"]
        assert stored["base_model_name_or_path"] == HUB_ID
        assert set(stored) <= LORA_KEYS and {"x_callback_url", "padding", "auto_map"}.isdisjoint(stored)
        assert stored["target_modules"] == config["target_modules"] and stored["r"] == config["r"]
        imported.model_name = DEFAULT_MODEL  # what the API does: the profile is the served model's
        exported, _ = _files(imported)
        assert set(exported) <= LORA_KEYS and exported["base_model_name_or_path"] == HUB_ID
        assert {k: v for k, v in exported.items() if k != "base_model_name_or_path"} == \
            {k: v for k, v in config.items() if k != "base_model_name_or_path" and k in LORA_KEYS}
    # The alias itself still imports; another hub model does not, nor does the hub id where no alias is.
    assert lo.imported_profile({**config, "base_model_name_or_path": DEFAULT_MODEL}, weights, served).layer == 1
    err = _rejected({**config, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M-Instruct"}, weights, served)
    assert err.field == "adapter_config.base_model_name_or_path" and HUB_ID in err.message
    err = _rejected({**config, "base_model_name_or_path": HUB_ID}, weights, model_layout(tiny_lm))
    assert err.field == "adapter_config.base_model_name_or_path"


def test_export_names_the_hub_model_where_known_and_peft_loads_it(tiny_lm, adapter, tmp_path):
    config, _ = _files(adapter)
    assert config["base_model_name_or_path"] == tiny_lm.name  # no hub id known: the model's own name
    served = dataclasses.replace(adapter, model_name=DEFAULT_MODEL,
                                 params={**adapter.params, "adapter_config": {
                                     **adapter.params["adapter_config"], "base_model_name_or_path": DEFAULT_MODEL,
                                     "stale_tenant_key": 1}})  # a profile stored before keys were filtered
    for name, data in peft_files(served).items():
        (tmp_path / name).write_bytes(data)
    exported = json.loads((tmp_path / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == HUB_ID and "stale_tenant_key" not in exported
    # peft reads the folder as an adapter of the hub model, and loads it (onto a model of the right shapes:
    # the hub is not reachable from here).
    assert PeftConfig.from_pretrained(str(tmp_path)).base_model_name_or_path == HUB_ID
    peft_model = PeftModel.from_pretrained(make_tiny("llama").model, str(tmp_path)).eval()
    batch = tiny_lm.tokenizer(["Hello there", "Who are you?"], return_tensors="pt", padding=True)
    with torch.no_grad(), apply(tiny_lm, [[intervention(served, tiny_lm)]] * 2):
        ours = tiny_lm.model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, ours, atol=2e-5, rtol=1e-4)
    # An exported adapter comes back in as it went out.
    back = lo.imported_profile(exported, (tmp_path / "adapter_model.safetensors").read_bytes(),
                               dataclasses.replace(model_layout(tiny_lm), name=DEFAULT_MODEL))
    assert all(torch.equal(back.tensors[k], served.tensors[k] * (served.strength if "lora_B" in k else 1))
               for k in served.tensors)


def test_cold_fd_export_names_the_hub_model(tiny_lm):
    from steer_core import cold_fd

    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:4]
    cold = cold_fd.fit(tiny_lm, items, [1], cold_fd.check_params({"rank": 2}), "prompt")[1]
    cold.model_name = DEFAULT_MODEL
    config, _ = _files(cold_fd_as_lora(cold))
    assert config["base_model_name_or_path"] == HUB_ID and set(config) <= LORA_KEYS


@pytest.mark.model
def test_a_hub_adapter_imports_onto_the_real_default_models_layout(default_model_path):
    """An adapter shaped for SmolLM2-135M-Instruct, as peft writes it on the hub model (its config from
    peft's own LoraConfig), imports against the served default model's layout (read, not loaded)."""
    layout = read_model_layout(DEFAULT_MODEL)
    config = lo.config_dict(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       task_type="CAUSAL_LM", base_model_name_or_path=HUB_ID))
    torch.manual_seed(0)
    tensors = {}
    for path, (out_f, in_f) in layout.linear.items():
        if path.endswith(("q_proj", "v_proj")):
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(2, in_f)
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_f, 2)
    size = next(n for n in range(len(st_save(tensors)), 1 << 20) if n & 0xFF == 0x80)
    data = _safetensors(tensors, size)
    assert data[0] == 0x80
    imported = lo.imported_profile(config, data, layout)
    assert imported.layer == 0 and imported.model_name == DEFAULT_MODEL and len(imported.tensors) == len(tensors)
    exported, _ = _files(imported)
    assert exported["base_model_name_or_path"] == HUB_ID
