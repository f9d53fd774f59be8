"""DiffMean on the tiny model (shapes, math) and on the real default model (behaviour)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from support import FIXTURES, steering_alone

from steer_core import build_profile, diffmean, intervention, load_items, summarize
from steer_core.activations import answer_activations, reuse_answer_activations
from steer_core.build import FOLDS, MIN_GAIN, MIN_HELDOUT, MIN_TRAIN, fold_indices
from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.prompts import answer_distributions

ITEMS = [make_item(f"Question number {i}?", ["Yes", "No", "Maybe"], answer=i % 3) for i in range(8)]


def test_vector_is_chosen_minus_other_answers(tiny_lm):
    acts = answer_activations(tiny_lm, ITEMS, [1])
    z = acts.by_layer[1]
    expected = torch.stack([z[n, it.answer] - (z[n].sum(0) - z[n, it.answer]) / 2 for n, it in enumerate(ITEMS)])
    profile = diffmean.fit(tiny_lm, ITEMS, [1], {}, "prompt")[1]
    torch.testing.assert_close(profile.tensors["vector"], expected.mean(0))


def test_with_a_contrast_the_vector_weighs_each_option_by_the_group_minus_the_others(tiny_lm):
    """Item 0: q = (0.7, 0.3), c = (0.4, 0.6); item 1: the group answers as the others do. Weights q - c
    over the mean total variation (0.15): item 0 gives 2 (z_A - z_B), item 1 nothing; the mean over
    the two items is z_A - z_B of item 0."""
    items = [replace(make_item("Q0?", ["Yes", "No"], target=[0.7, 0.3]), contrast=(0.4, 0.6)),
             replace(make_item("Q1?", ["Yes", "No"], target=[0.5, 0.5]), contrast=(0.5, 0.5))]
    z = answer_activations(tiny_lm, items, [1]).by_layer[1]
    profile = diffmean.fit(tiny_lm, items, [1], {}, "prompt")[1]
    torch.testing.assert_close(profile.tensors["vector"], z[0, 0] - z[0, 1], rtol=1e-5, atol=1e-5)


def test_fitting_also_in_reversed_order_leaves_nothing_for_a_letter_to_carry(tiny_lm):
    """Options with the same text differ only by their letter: fitted on each item in one order the vector
    is 'A rather than B'; fitted in both orders it is zero. (Reversal swaps the first and last letters; with
    more than two options the middle ones keep their letters.)"""
    items = [make_item(f"Pick one {i}?", ["this one", "this one"], answer=0) for i in range(6)]
    once = build_profile(tiny_lm, items, "diffmean", {"layer": 1, "strength": 1.0, "orders": 1})
    both = build_profile(tiny_lm, items, "diffmean", {"layer": 1, "strength": 1.0})  # both orders: the default
    assert once.tensors["vector"].norm() > 0.1 * answer_activations(tiny_lm, items[:1], [1]).by_layer[1].norm()
    assert both.tensors["vector"].norm() < 1e-4 * once.tensors["vector"].norm()
    assert both.metrics["orders"] == 2 and once.metrics["orders"] == 1
    with pytest.raises(SteerError) as info:
        build_profile(tiny_lm, items, "diffmean", {"orders": 3})
    assert info.value.field == "params.orders"


def test_a_build_scope_reads_each_answer_text_once(tiny_lm):
    calls = []
    handle = tiny_lm.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with reuse_answer_activations():
            full = answer_activations(tiny_lm, ITEMS, [1, 2])
            reads = len(calls)
            part = answer_activations(tiny_lm, ITEMS[2:6], [2, 1])  # a fold's subset, layers in any order
            assert len(calls) == reads
            wider = answer_activations(tiny_lm, ITEMS[6:] + [make_item("New?", ["Yes", "No"], answer=0)], [1])
            assert len(calls) == reads + 1  # only the new item's texts are read
        answer_activations(tiny_lm, ITEMS[:1], [1])
        assert len(calls) == reads + 2  # outside the scope nothing is remembered
    finally:
        handle.remove()
    for layer in (1, 2):
        torch.testing.assert_close(part.by_layer[layer], full.by_layer[layer][2:6])
    torch.testing.assert_close(wider.by_layer[1][:2], full.by_layer[1][6:])
    assert part.valid.equal(full.valid[2:6]) and part.target.equal(full.target[2:6])


def test_build_records_its_choice_and_scores(tiny_lm):
    profile = build_profile(tiny_lm, ITEMS, "diffmean")
    m = profile.metrics
    assert m["evaluation"] == "cross-validated" and m["items"] == len(ITEMS) and m["folds"] >= 2
    assert {"layer", "strength", "alignment"} <= set(m["search"][0])
    assert profile.layer == m["choice"]["layer"]
    gain = m["gain"]
    assert gain["alignment"] == pytest.approx(m["best_candidate"]["alignment"] - m["unsteered"]["alignment"])
    over = m["gain_vs_calibrated"]
    assert over["alignment"] == pytest.approx(m["best_candidate"]["alignment"] - m["calibrated"]["alignment"])
    # Steering ships when the best candidate beats the calibrated model and leaves what chat gets no worse.
    chosen = min(m["search"], key=lambda row: abs(row["alignment"] - m["best_candidate"]["alignment"]))
    assert m["steering_shipped"] == (over["alignment"] > MIN_GAIN and chosen["generation_gain"] >= 0)
    assert gain["standard_error"] >= 0
    if not m["steering_shipped"]:
        assert profile.strength == 0 and "no setting beat" in m["note"]
        assert m["steered"] == m["calibrated"]
    else:
        assert profile.strength > 0 and m["steered"] == m["best_candidate"]


def test_bad_build_input_names_the_field(tiny_lm):
    with pytest.raises(SteerError, match="too few") as info:
        build_profile(tiny_lm, ITEMS[:3], "diffmean")
    assert info.value.field == "items"
    with pytest.raises(SteerError) as info:
        build_profile(tiny_lm, ITEMS, "diffmean", {"layer": 99})
    assert info.value.field == "params.layer"
    with pytest.raises(SteerError) as info:
        build_profile(tiny_lm, ITEMS, "no-such-method")
    assert info.value.field == "method"
    with pytest.raises(SteerError) as info:
        build_profile(tiny_lm, ITEMS, "diffmean", {"alpha": 2})
    assert info.value.field == "params.alpha"
    with pytest.raises(SteerError):
        build_profile(tiny_lm, [], "diffmean")


@pytest.mark.model
def test_diffmean_raises_persona_matching_on_other_statements(default_lm):
    """20 statements an environmentalist rejects build the profile; 50 other such statements judge it.

    (The default 135M model answers "Yes" to nearly every statement, whatever its content, so the
    persona's rejections are where it has room to move. A constant lean towards "No" matches them all,
    so the build ships its calibration alone; the steering is judged by itself, `steering_alone`.)"""
    path = FIXTURES / "persona_environmentalist_rejects.jsonl"
    statements = load_items(path)
    train, judge = statements[:20], statements[20:70]
    assert len(judge) == 50
    # Built and read in the statements' own order (`orders: 1`): what the method's steering can do at all (the
    # order-robust default has tests of its own, tests/steer_core/test_option_orders.py).
    profile = build_profile(default_lm, train, "diffmean", {"orders": 1})
    assert profile.strength == 0 and profile.metrics["calibrated"]["matching_rate"] > 0.9, profile.metrics
    profile = steering_alone(profile)
    assert profile.strength > 0, profile.metrics
    before = summarize(judge, answer_distributions(default_lm, judge, orders=1))
    after = summarize(judge, answer_distributions(default_lm, judge, [intervention(profile, default_lm)], orders=1))
    assert after["matching_rate"] > before["matching_rate"]
    assert after["alignment"] > before["alignment"]


@pytest.mark.parametrize("n", [4, 5, 7, 20, 41])
def test_folds_partition_the_sample_and_leave_enough_on_each_side(n):
    folds = fold_indices(n, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(n))
    assert 2 <= len(folds) <= FOLDS
    assert all(len(fold) >= MIN_HELDOUT and n - len(fold) >= MIN_TRAIN for fold in folds)
    assert fold_indices(n, seed=3) == folds and (n < 7 or fold_indices(n, seed=4) != folds)
    with pytest.raises(SteerError, match="too few"):
        fold_indices(MIN_HELDOUT + MIN_TRAIN - 1)
