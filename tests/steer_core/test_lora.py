"""LoRA profiles on tiny random models: real peft adapters, per-row serving, export to peft's own loader."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from support import FIXTURES, make_tiny, residual_after

from steer_core import build_profile, load_items
from steer_core import lora as lo
from steer_core.errors import SteerError
from steer_core.export import cold_fd_as_lora, peft_archive, peft_files
from steer_core.losses import item_losses
from steer_core.methods import intervention
from steer_core.models import model_layout, read_model_layout
from steer_core.option_orders import in_both_orders
from steer_core.profile import Profile
from steer_core.prompts import (
    answer_distributions,
    answer_distributions_under,
    encode,
    encode_items,
    last_logits_only,
    reuse_block_inputs,
)
from steer_core.steering import ConstantShift, apply, compose

ITEMS = load_items(FIXTURES / "opinions_group_rural.jsonl")
PROMPTS = ["The weather today is", "A much longer prompt that needs no padding at all, it says", "Hi",
           "Tell me about trains"]


def _fit(lm, items=ITEMS[:6], layer=1, **params):
    checked = lo.check_params({"steps": 3, "lr": 0.01, **params})
    return lo.fit(lm, items, [layer], checked, "all")[layer]


@pytest.fixture(scope="module")
def adapters(tiny_lm):
    """Two different adapters on the tiny llama (blocks 1..3 and 0..3)."""
    return _fit(tiny_lm, ITEMS[:6], layer=1), _fit(tiny_lm, ITEMS[6:12], layer=0, rank=2)


def _logits(lm, batch, rows=None):
    with torch.no_grad():
        if rows is None:
            return lm.model(**batch).logits
        with apply(lm, rows):
            return lm.model(**batch).logits


def test_training_leaves_the_model_as_it_was(tiny_lm):
    batch = encode(tiny_lm, PROMPTS)
    before = _logits(tiny_lm, batch)
    modules = {name: type(m) for name, m in tiny_lm.model.named_modules()}
    flags = [p.requires_grad for p in tiny_lm.model.parameters()]
    _fit(tiny_lm)
    assert {name: type(m) for name, m in tiny_lm.model.named_modules()} == modules
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == flags
    assert torch.equal(_logits(tiny_lm, batch), before)


def test_adapter_is_peft_shaped_seeded_and_lowers_the_loss(tiny_lm, adapters):
    profile = adapters[0]
    config = profile.params["adapter_config"]
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1, 2, 3]
    keys = sorted(profile.tensors)
    assert len(keys) == 2 * 2 * 3  # (A, B) x (q, v) x blocks 1..3
    a = profile.tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = profile.tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and b.abs().sum() > 0
    assert profile.params["train_loss"] < profile.params["train_loss_start"]
    again = _fit(tiny_lm, ITEMS[:6], layer=1)
    assert all(torch.equal(again.tensors[k], profile.tensors[k]) for k in keys)


def test_first_training_loss_is_the_unsteered_models_loss(tiny_lm):
    """Training runs the blocks above the adapter from cached inputs: its step-0 loss (B = 0) must be the
    full model's."""
    items = ITEMS[:6]
    batch = encode_items(tiny_lm, items)
    with torch.no_grad():
        logits = tiny_lm.model(**batch, **last_logits_only(tiny_lm)).logits[:, -1, :]
    expected = float(item_losses(tiny_lm, logits, items).mean())
    _, _, losses = lo.train_adapter(tiny_lm, items, 2, lo.check_params({"steps": 1}))
    assert losses[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_served_adapter_equals_peft_loading_the_exported_folder(family, tmp_path):
    lm = make_tiny(family)
    profile = _fit(lm, layer=1)
    profile.strength = 1.5
    for name, data in peft_files(profile).items():
        (tmp_path / name).write_bytes(data)
    batch = encode(lm, PROMPTS)
    served = _logits(lm, batch, [[intervention(profile, lm)]] * len(PROMPTS))
    assert not torch.allclose(served, _logits(lm, batch), atol=1e-4)
    base = make_tiny(family)  # peft wraps the modules of the model it loads into
    peft_model = PeftModel.from_pretrained(base.model, str(tmp_path)).eval()
    with torch.no_grad():
        reference = peft_model(**batch).logits
    torch.testing.assert_close(served, reference, atol=2e-5, rtol=1e-4)


def test_every_row_of_a_mixed_batch_equals_the_row_alone(tiny_lm, adapters):
    a, b = (intervention(p, tiny_lm) for p in adapters)
    shift = ConstantShift(2, "prompt", torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(1)))
    rows = [[a], [b], None, [shift], compose([(a, 0.5), (b, -1.0), (shift, 1.0)])]
    prompts = PROMPTS + ["One more prompt"]
    batch = encode(tiny_lm, prompts[:len(rows)])
    mixed = _logits(tiny_lm, batch, rows)
    for i, row in enumerate(rows):
        alone = encode(tiny_lm, [prompts[i]])
        own = _logits(tiny_lm, alone, [row])[0]
        width = int(alone["attention_mask"].sum())
        torch.testing.assert_close(mixed[i, -width:], own[-width:], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(mixed[0, -1], mixed[1, -1], atol=1e-3)


@dataclass(frozen=True, eq=False)
class _LastPositionEcho:
    """Adds half of the call's last position to every prompt position: not position-local."""

    layer: int
    positions: str = "prompt"
    position_local: ClassVar[bool] = False

    def displacement(self, hidden, ctx, rows):
        return 0.5 * hidden[:, -1:, :]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_reading_items_under_several_steerings_from_a_shared_prefix_equals_reading_each(family):
    """`answer_distributions_under` runs the blocks below the lowest steered one once for all position-local
    steerings (adapters, constant shifts, blends); every item under every steering reads as
    `answer_distributions` reads it alone (mixed prompt lengths, in batches smaller than the items)."""
    lm = make_tiny(family)
    items = ITEMS[:5]
    a, b = (intervention(_fit(lm, ITEMS[6:12], layer=layer), lm) for layer in (2, 1))
    shift = ConstantShift(1, "prompt", torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2)))
    steerings = [[a], None, [b], compose([(a, 0.5), (b, -1.0)]), [shift], [a, shift]]
    read = answer_distributions_under(lm, items, steerings, batch_size=3)  # all six stacked in one run
    one_by_one = answer_distributions_under(lm, items, steerings, batch_size=3, rows_per_call=1)
    for steering, dists, alone in zip(steerings, read, one_by_one, strict=True):
        np.testing.assert_allclose(np.concatenate(dists), np.concatenate(alone), atol=2e-5)
        for item, d in zip(items, dists, strict=True):
            np.testing.assert_allclose(d, answer_distributions(lm, [item], steering)[0], atol=2e-5)
    assert not np.allclose(read[0][0], read[1][0], atol=1e-3)
    assert not np.allclose(read[4][0], read[1][0], atol=1e-3)
    # A steering that is not position-local reads the plain way, every row under its own steering.
    echo = [_LastPositionEcho(2)]
    mixed = answer_distributions_under(lm, items, [[a], echo])
    for k, steering in enumerate([[a], echo]):
        np.testing.assert_allclose(mixed[k][3], answer_distributions(lm, [items[3]], steering)[0], atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_a_build_runs_the_blocks_below_its_adapter_once_per_prompt(family):
    """Within `reuse_block_inputs`, what the first adapted block is called with is computed once per prompt:
    a fold's training run on a subset of the items and the reading of its held-out items take it from the
    full run (the lower blocks do not run again), and train and read as they would without it."""
    lm = make_tiny(family)
    items, layer = ITEMS[:7], 2
    params = lo.resolved(lo.check_params({"steps": 3, "lr": 0.01}))
    subset, held_out = items[:2] + items[3:], [items[2]]
    adapter = intervention(_fit(lm, subset, layer=layer), lm)
    shift = ConstantShift(1, "prompt", torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(3)))
    alone_states, _, alone_losses = lo.train_checkpoints(lm, subset, layer, params, [3])
    # One option order: the full run below trains on the items as given, so only those prompts are kept.
    alone_read = answer_distributions_under(lm, held_out, [[adapter], None, [shift]], orders=1)

    calls = []
    hook = lm.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with reuse_block_inputs():
            lo.train_checkpoints(lm, items, layer, params, [3])  # the full run: every prompt once
            ran = len(calls)
            states, _, losses = lo.train_checkpoints(lm, subset, layer, params, [3])
            read = answer_distributions_under(lm, held_out, [[adapter], None], orders=1)
            assert ran > 0 and len(calls) == ran
            below = answer_distributions_under(lm, held_out, [[shift]], orders=1)
            assert len(calls) > ran  # a steering below the kept block runs the lower blocks again
    finally:
        hook.remove()
    np.testing.assert_allclose(losses, alone_losses, rtol=1e-4)
    for key, tensor in alone_states[3].items():
        torch.testing.assert_close(states[3][key], tensor, atol=1e-5, rtol=1e-4)
    for mine, theirs in zip([*read, *below], alone_read, strict=True):
        np.testing.assert_allclose(mine[0], theirs[0], atol=2e-5)


def test_blend_weight_scales_the_adapters_delta(tiny_lm, adapters):
    batch = encode(tiny_lm, PROMPTS)
    a = intervention(adapters[0], tiny_lm)
    half = adapters[0]
    half_profile = Profile(**{**half.metadata(), "tensors": half.tensors, "strength": 0.5})
    blended = _logits(tiny_lm, batch, compose([(a, 0.5)]))
    torch.testing.assert_close(blended, _logits(tiny_lm, batch, [intervention(half_profile, tiny_lm)]),
                               atol=1e-5, rtol=1e-5)
    zero = _logits(tiny_lm, batch, compose([(a, 0.0)]))
    torch.testing.assert_close(zero, _logits(tiny_lm, batch), atol=1e-6, rtol=0)


def test_generation_with_an_adapter_matches_peft(tmp_path):
    lm = make_tiny("llama")
    profile = _fit(lm, layer=0)
    for name, data in peft_files(profile).items():
        (tmp_path / name).write_bytes(data)
    batch = encode(lm, PROMPTS[:2])
    with torch.no_grad(), apply(lm, [intervention(profile, lm)]):
        ours = lm.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    peft_model = PeftModel.from_pretrained(make_tiny("llama").model, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_build_chooses_a_strength_by_cross_validation(tiny_lm):
    profile = build_profile(tiny_lm, ITEMS[:8], "lora", {"steps": 2, "layer": 2, "rank": 2, "lr": 0.01})
    assert profile.method == "lora" and profile.positions == "all" and profile.layer == 2
    assert profile.metrics["evaluation"] == "cross-validated"
    assert [s["strength"] for s in profile.metrics["search"]] == lo.STRENGTHS  # rank, steps, lr fixed: no grid
    assert profile.strength in [0.0, *lo.STRENGTHS]
    again = Profile.from_bytes(profile.to_bytes())
    assert again.params["adapter_config"] == profile.params["adapter_config"]


def test_a_build_adapts_the_top_quarter_of_the_blocks(tiny_lm):
    profile = build_profile(tiny_lm, ITEMS[:8], "lora", {"steps": 2, "rank": 2, "lr": 0.01})
    top = tiny_lm.num_layers - max(1, tiny_lm.num_layers // 4)
    assert profile.layer == lo.first_block(tiny_lm) == top
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in profile.tensors} == set(range(top, tiny_lm.num_layers))


def test_build_searches_rank_steps_and_lr_out_of_fold(tiny_lm, monkeypatch):
    """What the params leave open is searched; the shipped adapter is the chosen setting trained on every
    item (its steps a checkpoint of the longer run: the same tensors as a run of that many steps)."""
    monkeypatch.setattr(lo, "STEPS", (1, 3))
    monkeypatch.setattr(lo, "LRS", (0.01, 0.03))
    profile = build_profile(tiny_lm, ITEMS[:8], "lora", {"layer": 2, "rank": 2})
    search = profile.metrics["search"]
    settings = {(s["lr"], s["steps"]) for s in search}
    assert settings == {(lr, n) for lr in (0.01, 0.03) for n in (1, 3)} and "rank" not in search[0]
    assert len(search) == len(settings) * len(lo.STRENGTHS)
    # Only candidates that do not make what chat gets worse may ship; the best of those is the choice.
    eligible = [s for s in search if s["generation_gain"] >= 0]
    choice = profile.metrics["choice"]
    if eligible:
        best = max(eligible, key=lambda s: s["alignment"])
        assert (choice["lr"], choice["steps"]) == (best["lr"], best["steps"])
        assert profile.strength == (best["strength"] if profile.metrics["steering_shipped"] else 0.0)
    else:
        assert profile.strength == 0.0 and not profile.metrics["steering_shipped"]
    assert (profile.params["lr"], profile.params["steps"], profile.params["rank"]) == (choice["lr"], choice["steps"], 2)
    # The build fits on every item in both option orders (its default `orders = 2`).
    alone = lo.fit(tiny_lm, in_both_orders(ITEMS[:8]), [2],
                   lo.check_params({"rank": 2, "lr": choice["lr"], "steps": choice["steps"]}), "all")[2]
    assert alone.tensors.keys() == profile.tensors.keys()
    assert all(torch.equal(alone.tensors[k], profile.tensors[k]) for k in alone.tensors)


def test_the_grid_covers_what_the_params_leave_open():
    open_ = lo.grid(lo.check_params({}))
    assert len(open_) == len(lo.RANKS) * len(lo.STEPS) * len(lo.LRS)
    assert {(g["rank"], g["alpha"]) for g in open_} == {(r, 2.0 * r) for r in lo.RANKS}
    fixed = lo.grid(lo.check_params({"rank": 3, "alpha": 5, "lr": 0.1}))
    assert [(g["rank"], g["alpha"], g["lr"]) for g in fixed] == [(3, 5.0, 0.1)] * len(lo.STEPS)


@pytest.mark.parametrize("params, field", [
    ({"rank": 0}, "params.rank"), ({"rank": lo.MAX_RANK + 1}, "params.rank"), ({"alpha": -1}, "params.alpha"),
    ({"steps": 0}, "params.steps"), ({"lr": 0}, "params.lr"), ({"loss": "mse"}, "params.loss"),
    ({"target_modules": "q_proj"}, "params.target_modules"), ({"dropout": 0.1}, "params.dropout"),
    ({"target_modules": ["nothing_like_this"]}, "params.target_modules"), ({"positions": "prompt"}, "positions"),
    ({"positions": "last"}, "positions"), ({"rank": True}, "params.rank"), ({"lr": float("nan")}, "params.lr"),
])
def test_bad_params_name_the_field(tiny_lm, params, field):
    with pytest.raises(SteerError) as err:
        build_profile(tiny_lm, ITEMS[:6], "lora", {"layer": 1, "strength": 1.0, **params})
    assert err.value.field.endswith(field)


def test_peft_archive_round_trips(tiny_lm, adapters):
    data = peft_archive(adapters[0])
    assert data == peft_archive(adapters[0])  # same profile, same bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = sorted(tar.getnames())
        files = {n: tar.extractfile(n).read() for n in names}
    assert names == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert files["adapter/adapter_model.safetensors"] == peft_files(adapters[0])["adapter_model.safetensors"]


def test_cold_fd_profile_exports_as_the_update_it_steps_along(tmp_path):
    lm = make_tiny("llama")
    cold = build_profile(lm, ITEMS[:6], "cold_fd", {"layer": 1, "strength": 0.05, "rank": 4})
    adapter = cold_fd_as_lora(cold)
    config = adapter.params["adapter_config"]
    assert config["layers_to_transform"] == [0, 1] and "down_proj" in config["target_modules"]
    for name, data in peft_files(adapter).items():
        (tmp_path / name).write_bytes(data)
    batch = encode(lm, PROMPTS)
    served = _logits(lm, batch, [[intervention(adapter, lm)]] * len(PROMPTS))
    peft_model = PeftModel.from_pretrained(make_tiny("llama").model, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(served, peft_model(**batch).logits, atol=2e-5, rtol=1e-4)


def test_exported_update_moves_layer_L_by_the_profiles_displacement_to_first_order(tiny_lm):
    """Without the parts LoRA cannot carry (embedding rows, norm gains), the adapter's change of Z_L is the
    profile's displacement ``s J(x) d`` up to second-order terms."""
    cold = build_profile(tiny_lm, ITEMS[:6], "cold_fd", {"layer": 1, "strength": 1e-3, "rank": 4, "mode": "jvp"})
    cold.tensors = {k: (torch.zeros_like(v) if k == "embedding:rows" else v) for k, v in cold.tensors.items()
                    if not k.startswith("param:")}
    batch = encode(tiny_lm, PROMPTS)
    base = residual_after(tiny_lm, batch, 1)
    displaced = residual_after(tiny_lm, batch, 1, [[intervention(cold, tiny_lm)]] * len(PROMPTS)) - base
    moved = residual_after(tiny_lm, batch, 1, [[intervention(cold_fd_as_lora(cold), tiny_lm)]] * len(PROMPTS)) - base
    real = batch["attention_mask"].bool()
    assert displaced[real].norm() > 0
    torch.testing.assert_close(moved[real], displaced[real], rtol=0, atol=0.02 * float(displaced[real].abs().max()))


def _peft_files(profile):
    files = peft_files(profile)
    return json.loads(files["adapter_config.json"]), files["adapter_model.safetensors"]


def test_import_takes_an_exported_adapter_back(tiny_lm, adapters):
    config, weights = _peft_files(adapters[0])
    imported = lo.imported_profile(config, weights, model_layout(tiny_lm))
    assert imported.layer == 1 and imported.method == "lora" and imported.params["imported"]
    batch = encode(tiny_lm, PROMPTS)
    torch.testing.assert_close(_logits(tiny_lm, batch, [intervention(imported, tiny_lm)]),
                               _logits(tiny_lm, batch, [intervention(adapters[0], tiny_lm)]), atol=1e-6, rtol=0)


def _rejected(lm, config, weights, **caps):
    with pytest.raises(SteerError) as err:
        lo.imported_profile(config, weights, model_layout(lm), **caps)
    return err.value.field


def test_import_refuses_pickles_wrong_shapes_other_models_and_big_ranks(tiny_lm, adapters):
    config, weights = _peft_files(adapters[0])
    buffer = io.BytesIO()
    torch.save(st_load(weights), buffer)  # what a .bin adapter is: a zip of pickles
    assert _rejected(tiny_lm, config, buffer.getvalue()) == "adapter_model"
    assert _rejected(tiny_lm, config, pickle.dumps({"a": 1})) == "adapter_model"
    assert _rejected(tiny_lm, config, b"not a file") == "adapter_model"
    tensors = st_load(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    assert _rejected(tiny_lm, config, st_save({**tensors, key: tensors[key][:, :10].contiguous()})) == "adapter_model"
    assert _rejected(tiny_lm, config, st_save({"lm_head.weight": torch.zeros(2, 2)})) == "adapter_model"
    assert _rejected(tiny_lm, {**config, "base_model_name_or_path": "meta-llama/Llama-3-8B"}, weights) \
        == "adapter_config.base_model_name_or_path"
    assert _rejected(tiny_lm, {**config, "r": 128}, weights) == "adapter_config.r"
    assert _rejected(tiny_lm, config, weights, max_rank=2) == "adapter_config.r"
    assert _rejected(tiny_lm, {**config, "use_dora": True}, weights) == "adapter_config.use_dora"
    assert _rejected(tiny_lm, {**config, "peft_type": "IA3"}, weights) == "adapter_config.peft_type"
    assert _rejected(tiny_lm, config, weights, max_bytes=100) == "adapter_model"
    # Another architecture's adapter: same names, other shapes.
    other = make_tiny("qwen2")
    other.model.model.layers[1].self_attn.q_proj = torch.nn.Linear(64, 32)
    assert _rejected(other, {**config, "base_model_name_or_path": other.name}, weights) == "adapter_model"


@pytest.mark.model
def test_the_layout_read_from_the_config_is_the_loaded_models(default_lm):
    """An import checks adapters against the layout read from the model's config and a corner of its
    embedding, without loading the model: it must be the loaded model's own."""
    read = read_model_layout(default_lm.name)
    assert read == model_layout(default_lm)
    assert read.fingerprint == default_lm.fingerprint and len(read.linear) == 7 * default_lm.num_layers
