"""COLD-Kernel on the tiny model: per-item activation gradients, both DPO branches, the two kernels."""

from __future__ import annotations

import pytest
import torch
from support import residual_after

from steer_core import ConstantShift, Profile, build_profile, compose, intervention
from steer_core import cold_kernel as ck
from steer_core.cold import sample_gradients
from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.losses import completion_log_probs, dpo_loss, dpo_pair_weights, item_losses, targets
from steer_core.prompts import LETTERS, encode_items, format_prompt

ITEMS = [make_item(f"Do you enjoy {w}?", ["Yes", "Somewhat", "No"], answer=i % 3)
         for i, w in enumerate(["cats", "long walks in the rain", "tea", "very loud music at night", "art"])]
ITEMS += [make_item("How often do you cook?", ["Daily", "Weekly", "Never"], target=[0.6, 0.3, 0.1]),
          make_item("Is the city safe?", ["Yes", "No"], answer=1)]
PROMPTS = [make_item("Is winter your favourite season?", ["Yes", "No"], answer=0),
           make_item("How much do you trust the news?", ["A lot", "Some", "Not at all"], answer=2)]


def answer_gradient(lm, item, layer, loss):
    """dL/dZ_L at the answer position for one item run alone (no batch, no padding)."""
    kept = []
    handle = lm.blocks[layer].register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        batch = encode_items(lm, [item])
        logits = lm.model(**batch, use_cache=False).logits[:, -1, :]
        (g,) = torch.autograd.grad(item_losses(lm, logits, [item], loss).sum(), kept[0])
    finally:
        handle.remove()
    return g[0, -1]


@pytest.mark.parametrize("loss", ["ce", "dpo", "sft"])
def test_batched_answer_gradients_equal_one_item_at_a_time(tiny_lm, loss):
    grads = sample_gradients(tiny_lm, ITEMS, loss, act_layers=[1, 3])
    for layer in (1, 3):
        for i, item in enumerate(ITEMS):
            alone = answer_gradient(tiny_lm, item, layer, loss)
            torch.testing.assert_close(grads.activation_grads[layer][i], alone, rtol=1e-3,
                                       atol=1e-3 * alone.abs().max().item())


def test_dpo_gradient_counts_both_branches(tiny_lm):
    """Scoring chosen and rejected completions as separate sequences, the answer-position gradient of the
    DPO loss is the sum over every branch, not the rejected one's alone."""
    item, layer = ITEMS[1], 2
    prompt = format_prompt(tiny_lm.tokenizer, item)
    kept = []

    def keep(module, args, out):
        out.retain_grad()
        kept.append(out)

    handle = tiny_lm.blocks[layer].register_forward_hook(keep)
    try:
        lp = completion_log_probs(tiny_lm, [prompt] * 3, list(LETTERS[:3]))
    finally:
        handle.remove()
    weights = dpo_pair_weights(targets([item]))[0]
    loss = sum(weights[k, j] * dpo_loss(lp[k], lp[j]) for k in range(3) for j in range(3) if weights[k, j] > 0)
    loss.backward()
    branches = kept[0].grad[:, -2]  # each branch's last prompt position
    ours = sample_gradients(tiny_lm, [item], "dpo", act_layers=[layer]).activation_grads[layer][0]
    torch.testing.assert_close(ours, branches.sum(0), rtol=1e-4, atol=1e-7)
    rejected_only = branches[[j for j in range(3) if j != item.answer]].sum(0)
    assert not torch.allclose(ours, rejected_only, rtol=1e-2)


def observed_shift(lm, steering, layer=2):
    """What steering adds after block `layer`, the unsteered stream there, and the mask of real positions."""
    batch = encode_items(lm, PROMPTS)
    base = residual_after(lm, batch, layer)
    return residual_after(lm, batch, layer, steering) - base, base, batch["attention_mask"].bool()


def test_unit_kernel_is_minus_the_mean_gradient_in_activation_units(tiny_lm):
    profile = ck.fit(tiny_lm, ITEMS, [2], ck.check_params({}), "prompt")[2]
    grads = sample_gradients(tiny_lm, ITEMS, act_layers=[2])
    torch.testing.assert_close(profile.tensors["vector"], -grads.activation_grads[2].mean(0))
    profile.strength = 1.0
    iv = intervention(profile, tiny_lm)
    assert isinstance(iv, ConstantShift)
    typical = grads.activations[2].norm(dim=-1).median()
    assert iv.vector.norm().item() == pytest.approx(typical.item(), rel=1e-5)


def test_linear_kernel_weighs_each_gradient_by_similarity(tiny_lm):
    profile = ck.fit(tiny_lm, ITEMS, [2], ck.check_params({"kernel": "linear"}), "prompt")[2]
    profile.strength = 0.5
    shift, z, mask = observed_shift(tiny_lm, [intervention(profile, tiny_lm)])
    grads = sample_gradients(tiny_lm, ITEMS, act_layers=[2])
    coef = 0.5 * profile.params["unit_scale"] / len(ITEMS)
    expected = -coef * (z[:, -1] @ grads.activations[2].T) @ grads.activation_grads[2]  # (prompts, D)
    for p in range(len(PROMPTS)):
        torch.testing.assert_close(shift[p][mask[p]], expected[p].expand(int(mask[p].sum()), -1),
                                   rtol=1e-4, atol=1e-5)


def test_blends_add(tiny_lm):
    a = ck.fit(tiny_lm, ITEMS, [2], ck.check_params({"kernel": "linear"}), "prompt")[2]
    b = ck.fit(tiny_lm, ITEMS[::-1][:4], [2], ck.check_params({"kernel": "linear"}), "prompt")[2]
    a.strength = b.strength = 0.3
    ia, ib = intervention(a, tiny_lm), intervention(b, tiny_lm)
    da, _, mask = observed_shift(tiny_lm, [ia])
    db, _, _ = observed_shift(tiny_lm, [ib])
    row = compose([(ia, 0.5), (ib, 2.0)])
    assert len(row) == 1
    mixed, _, _ = observed_shift(tiny_lm, row)
    torch.testing.assert_close(mixed[mask], (0.5 * da + 2.0 * db)[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["unit", "linear"])
def test_build_and_round_trip(tiny_lm, tmp_path, kernel):
    profile = build_profile(tiny_lm, ITEMS + PROMPTS, "cold_kernel", {"kernel": kernel, "loss": "dpo"})
    assert profile.params["kernel"] == kernel and profile.params["loss"] == "dpo"
    assert profile.strength in [0.0, *ck.STRENGTHS]
    profile.strength = profile.strength or 0.2
    loaded = Profile.load(profile.save(tmp_path / "k.safetensors"), tiny_lm)
    before, _, mask = observed_shift(tiny_lm, [intervention(profile, tiny_lm)], layer=profile.layer)
    after, _, _ = observed_shift(tiny_lm, [intervention(loaded, tiny_lm)], layer=profile.layer)
    torch.testing.assert_close(after[mask], before[mask])
    assert before[mask].abs().max() > 0


def test_bad_params_name_the_field(tiny_lm):
    for params, field in [({"kernel": "rbf"}, "params.kernel"), ({"loss": "hinge"}, "params.loss"),
                          ({"eta": 1}, "params.eta")]:
        with pytest.raises(SteerError) as info:
            build_profile(tiny_lm, ITEMS, "cold_kernel", params)
        assert info.value.field == field
