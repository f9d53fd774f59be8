"""Losses over opinion items on the tiny model: values against hand computations, batching, gradients."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.losses import (
    check_loss,
    completion_log_probs,
    contrast_loss,
    dpo_loss,
    dpo_pair_weights,
    item_losses,
    letter_log_probs,
    soft_cross_entropy,
)
from steer_core.prompts import LETTERS, encode_items, format_prompt, option_log_probs, option_token_ids

ITEMS = [
    make_item("Is tea better than coffee?", ["Yes", "No"], answer=1),
    make_item("How often do you read?", ["Daily", "Weekly", "Monthly", "Never"], target=[0.1, 0.5, 0.3, 0.1]),
    make_item("Do you like rain?", ["Yes", "Somewhat", "No"], answer=0),
]


def last_logits(lm, items):
    batch = encode_items(lm, items)
    return lm.model(**batch, use_cache=False).logits[:, -1, :]


def test_soft_cross_entropy_is_nll_for_one_hot_and_weighted_for_groups(tiny_lm):
    with torch.no_grad():
        logits = last_logits(tiny_lm, ITEMS)
    lp = option_log_probs(tiny_lm, logits, ITEMS)
    losses = item_losses(tiny_lm, logits, ITEMS, "ce")
    assert torch.isfinite(losses).all()  # -inf letters past an item's options add nothing
    assert losses[0].item() == pytest.approx(-lp[0, 1].item(), rel=1e-6)
    expected = -sum(q * lp[1, k].item() for k, q in enumerate(ITEMS[1].target))
    assert losses[1].item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(torch.tensor([[0.0, float("-inf")]]), torch.tensor([[1.0, 0.0]])).item() == 0.0


def test_dpo_pairs_weigh_each_preferred_option_against_the_others(tiny_lm):
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.3, 0.2]])
    w = dpo_pair_weights(q)
    # One person: the answer against each other option, equally.
    assert w[0, 1, 0] == pytest.approx(0.5) and w[0, 1, 2] == pytest.approx(0.5) and w[0].sum() == pytest.approx(1)
    # A group: (k, j) weighted by q_k - q_j where positive.
    assert w[1, 0, 1] / w[1, 1, 2] == pytest.approx(0.2 / 0.1, rel=1e-5)
    assert w[1, 2, 0] == 0 and w[1].sum() == pytest.approx(1)
    assert dpo_loss(torch.tensor(-1.0), torch.tensor(-3.0)).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-0.1 * 2.0))))

    with torch.no_grad():
        logits = last_logits(tiny_lm, ITEMS)
    lp = letter_log_probs(tiny_lm, logits, ITEMS)
    losses = item_losses(tiny_lm, logits, ITEMS, "dpo")
    l0 = dpo_loss(lp[0, 1], lp[0, 0]).item()  # "No" chosen over "Yes"
    assert losses[0].item() == pytest.approx(l0, rel=1e-6)
    l2 = 0.5 * (dpo_loss(lp[2, 0], lp[2, 1]) + dpo_loss(lp[2, 0], lp[2, 2])).item()
    assert losses[2].item() == pytest.approx(l2, rel=1e-6)


def test_sft_and_dpo_read_the_same_log_probs_as_one_token_completions(tiny_lm):
    """The fast path (letter logits at the answer position) equals scoring prompt + letter as text."""
    prompts = [format_prompt(tiny_lm.tokenizer, it) for it in ITEMS]
    with torch.no_grad():
        fast = letter_log_probs(tiny_lm, last_logits(tiny_lm, ITEMS), ITEMS)
        for k in range(2):
            slow = completion_log_probs(tiny_lm, prompts, [LETTERS[k]] * len(ITEMS))
            torch.testing.assert_close(fast[:, k], slow, rtol=1e-4, atol=1e-4)
        sft = item_losses(tiny_lm, last_logits(tiny_lm, ITEMS), ITEMS, "sft")
    assert sft[0].item() == pytest.approx(-fast[0, 1].item(), rel=1e-6)


def test_completion_log_probs_are_mean_token_log_probs(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt, completion = "The weather today is", " cold and very windy"
    with torch.no_grad():
        batched = completion_log_probs(tiny_lm, [prompt, "Hi"], [completion, " there"])
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        lp = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = torch.stack([lp[len(p_ids) - 1 + i, c] for i, c in enumerate(c_ids)]).mean()
    assert len(c_ids) > 1
    assert batched[0].item() == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(SteerError) as info:
        completion_log_probs(tiny_lm, ["a"], [""])
    assert info.value.field == "completions[0]"


def test_losses_are_differentiable_and_batched(tiny_lm):
    items = [replace(it, contrast=tuple(1 / len(it.options) for _ in it.options)) for it in ITEMS]
    for loss in ("ce", "dpo", "sft", "contrast"):
        logits = last_logits(tiny_lm, items).detach().requires_grad_(True)
        batched = item_losses(tiny_lm, logits, items, loss)
        one = torch.stack([item_losses(tiny_lm, logits[i:i + 1], [it], loss)[0] for i, it in enumerate(items)])
        torch.testing.assert_close(batched, one)
        (g,) = torch.autograd.grad(batched.sum(), logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_contrast_loss_hand_worked():
    """p = (3/4, 1/4); the group answers A, the others B: delta = log 3, loss = log(1 + 3^-beta)."""
    log_p = torch.log(torch.tensor([[0.75, 0.25, 0.0]]))  # a third letter past the item's options: -inf
    q, c = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert contrast_loss(log_p, q, c).item() == pytest.approx(math.log(1 + 3 ** -0.1), rel=1e-6)
    # Where the group answers as the others do there is nothing to prefer: log 2, whatever p is.
    same = torch.tensor([[0.6, 0.4, 0.0]])
    assert contrast_loss(log_p, same, same).item() == pytest.approx(math.log(2), rel=1e-6)
    # q = (0.5, 0.5), c = (0.25, 0.75): delta = 0.25 log(3/4) - 0.25 log(1/4) = 0.25 log 3.
    q2, c2 = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.25, 0.75, 0.0]])
    assert contrast_loss(log_p, q2, c2, beta=1.0).item() == pytest.approx(math.log(1 + 3 ** -0.25), rel=1e-6)


def test_contrast_loss_gradient_points_from_the_others_to_the_group(tiny_lm):
    """At the letter logits the gradient is -beta sigmoid(-beta delta) (q - c): no part of it flattens or
    sharpens the answer the way any group would gain from."""
    items = [replace(it, contrast=tuple(reversed(it.target))) for it in ITEMS]
    logits = last_logits(tiny_lm, items).detach().requires_grad_(True)
    losses = item_losses(tiny_lm, logits, items, "contrast")
    (g,) = torch.autograd.grad(losses.sum(), logits)
    lp = option_log_probs(tiny_lm, logits.detach(), items)
    for n, it in enumerate(items):
        diff = torch.tensor(it.target) - torch.tensor(it.contrast)
        delta = (diff * lp[n, :len(diff)]).sum()
        expected = -0.1 * torch.sigmoid(-0.1 * delta) * diff
        ids = option_token_ids(tiny_lm.tokenizer, len(diff))
        torch.testing.assert_close(g[n, ids], expected, rtol=1e-4, atol=1e-7)
        assert g[n].abs().sum() == pytest.approx(g[n, ids].abs().sum().item(), rel=1e-5)  # letters only
    with pytest.raises(SteerError) as info:
        item_losses(tiny_lm, logits, ITEMS, "contrast")
    assert info.value.field == "contrast" and "3 of 3 items" in info.value.message


def test_unknown_loss_is_rejected():
    with pytest.raises(SteerError) as info:
        check_loss("hinge")
    assert info.value.field == "params.loss"
