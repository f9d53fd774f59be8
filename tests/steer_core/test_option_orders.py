"""Option order: the debiased read, builds that cannot ship a letter, and the plain-words verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_core import METHODS, build_profile
from steer_core.calibration import Calibration, sample_alignment
from steer_core.data import make_item, reverse_options
from steer_core.evaluation import uniform_distributions
from steer_core.methods import Method, no_params, register
from steer_core.option_orders import average_orders, in_both_orders, split_orders
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, answer_distributions_under, option_token_ids, read_answers
from steer_core.steering import ConstantShift
from steer_core.verdict import NEAR_UNIFORM_TV, distance_from_uniform, judge

QUESTIONS = [make_item(f"Which of these would person {i} pick?", ["Rain", "Sun", "Snow", "Fog"][: 2 + i % 3], answer=0)
             for i in range(7)]


def test_the_debiased_read_is_the_mean_of_the_two_single_order_reads(tiny_lm):
    given = answer_distributions(tiny_lm, QUESTIONS, orders=1)
    reversed_ = answer_distributions(tiny_lm, [reverse_options(it) for it in QUESTIONS], orders=1)
    debiased = read_answers(tiny_lm, QUESTIONS, state_layers=[1])
    for a, b, d in zip(given, reversed_, debiased.distributions, strict=True):
        np.testing.assert_allclose(d, 0.5 * (a + b[::-1]), atol=1e-6)
    assert not all(np.allclose(a, b[::-1], atol=1e-3) for a, b in zip(given, reversed_, strict=True))  # it mattered
    states = [read_answers(tiny_lm, asked, state_layers=[1], orders=1).states[1]
              for asked in (QUESTIONS, [reverse_options(it) for it in QUESTIONS])]
    np.testing.assert_allclose(debiased.states[1], 0.5 * (states[0] + states[1]), atol=1e-5)
    for kept, b in zip(debiased.by_order[1], reversed_, strict=True):  # each order's own read, mapped back
        np.testing.assert_allclose(kept, b[::-1], atol=1e-6)


def test_a_debiased_read_does_not_depend_on_the_order_the_options_came_in(tiny_lm):
    flipped = [reverse_options(it) for it in QUESTIONS]
    shift = [ConstantShift(layer=1, positions="prompt", vector=torch.randn(tiny_lm.hidden_size) * 3)]
    under = answer_distributions_under(tiny_lm, flipped, [None, shift])
    for steering, shared in zip((None, shift), under, strict=True):
        a = answer_distributions(tiny_lm, QUESTIONS, steering)
        b = answer_distributions(tiny_lm, flipped, steering)
        for p, q in zip(a, b, strict=True):
            np.testing.assert_allclose(p, q[::-1], atol=1e-6)
        np.testing.assert_allclose(np.concatenate(shared), np.concatenate(b), atol=2e-5)


def test_split_and_average_orders_map_the_reversed_read_back():
    items = [make_item("Q?", ["a", "b", "c"], answer=0)]
    both = in_both_orders(items)
    assert list(both[1].options) == ["c", "b", "a"]
    by_order = split_orders([np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])], 1)
    assert by_order[1][0].tolist() == [0.2, 0.3, 0.5]
    assert average_orders(by_order)[0].tolist() == pytest.approx([0.45, 0.25, 0.3])
    with pytest.raises(ValueError, match="3 reads for 1 items"):
        split_orders([np.ones(3)] * 3, 1)


# Facts the default model knows, the true answer always listed first: in the survey's order "answer A" is right
# every time, though the letter says nothing about the content. Both options share one ordinal position, so
# no calibration lean can stand in for the letter.
FACTS = [("Is fire hot?", "Yes", "No"), ("Is ice cold?", "Yes", "No"), ("Do fish live in water?", "Yes", "No"),
         ("Is the sky green?", "No", "Yes"), ("Can a dog fly by itself?", "No", "Yes"),
         ("Is the sun a star?", "Yes", "No"), ("Do cows eat grass?", "Yes", "No"), ("Is snow hot?", "No", "Yes"),
         ("Is a cat a plant?", "No", "Yes"), ("Is water wet?", "Yes", "No"), ("Is a week seven days?", "Yes", "No"),
         ("Is a stone alive?", "No", "Yes")]
LETTER_ITEMS = [make_item(q, [right, wrong], target=[1.0, 0.0], ordinal=[1, 1]) for q, right, wrong in FACTS]


def _letter_a_fit(lm, items, layers, params, positions):
    """Whatever the sample: the unembedding row of the letter A at the last block, a push toward 'answer A'."""
    row = lm.model.get_output_embeddings().weight[option_token_ids(lm.tokenizer, 2)[0]].detach().float()
    return {L: Profile(method="stub_letter", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=L,
                       positions=positions, strength=1.0, tensors={"vector": row / row.norm()})
            for L in layers}


def _build_letter_stub(lm, orders: int) -> Profile:
    last = lm.num_layers - 1
    register(Method(name="stub_letter", fit=_letter_a_fit, check_params=no_params,
                    intervention=lambda p, lm: ConstantShift(layer=p.layer, positions=p.positions,
                                                             vector=p.strength * p.tensors["vector"]),
                    strengths=lambda p, lm: [20.0, 60.0], layers=lambda lm: [last], default_positions="last"))
    try:
        return build_profile(lm, LETTER_ITEMS, "stub_letter", {"orders": orders})
    finally:
        METHODS.pop("stub_letter")


def test_a_steering_whose_signal_lives_only_in_the_letter_ships_strength_0(default_lm):
    debiased = _build_letter_stub(default_lm, orders=2)
    m = debiased.metrics
    assert debiased.strength == 0 and not m["steering_shipped"] and m["orders"] == 2
    assert m["verdict"]["serves"] in ("calibrated model", "unsteered model") and not m["verdict"]["improved"]
    assert m["generation"] == {**m["generation"], "steering": False}
    assert m["generation"]["gain_vs_unsteered"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # Read in the survey's order only, the same stub looks like a gain and ships: the test above could fail.
    survey_only = _build_letter_stub(default_lm, orders=1)
    assert survey_only.strength > 0 and survey_only.metrics["steering_shipped"]
    assert survey_only.metrics["generation"]["gain_vs_unsteered"]["mean"] > 0


def test_the_near_uniform_flag_on_a_hand_made_profile():
    """A profile calibrated to temperature 50 over an over-confident model: every answer about 1/n."""
    items = [make_item(f"Question {i}?", ["Agree", "Unsure", "Disagree"], target=[0.6, 0.3, 0.1]) for i in range(6)]
    confident = [np.roll([0.9, 0.07, 0.03], i) for i in range(6)]
    flat = Calibration(temperature=50.0).apply_all(items, confident)
    assert distance_from_uniform(flat) < NEAR_UNIFORM_TV < distance_from_uniform(confident)
    uniform = sample_alignment(items, uniform_distributions(items))
    verdict = judge(sample_alignment(items, flat), sample_alignment(items, confident), uniform, flat,
                    "calibrated model")
    assert verdict.near_uniform and not verdict.improved
    assert "answers near uniform" in verdict.summary and "serves the calibrated unsteered model" in verdict.summary
    sharp = judge(sample_alignment(items, confident), uniform, uniform, confident, "steering")
    assert not sharp.near_uniform and "near uniform" not in sharp.summary


def test_improved_means_above_both_baselines_by_more_than_one_standard_error():
    answers = [np.array([0.9, 0.1])] * 4
    calibrated = np.array([0.5, 0.5, 0.5, 0.5])
    assert judge(calibrated + [0.2, 0.25, 0.3, 0.2], calibrated, calibrated - 0.1, answers, "steering").improved
    # Above calibrated, but not above uniform by a standard error.
    assert not judge(calibrated + 0.2, calibrated, calibrated + [0.1, 0.3, 0.1, 0.3], answers, "steering").improved
    # A noisy gain within its standard error.
    assert not judge(calibrated + [0.3, -0.3, 0.31, -0.29], calibrated, calibrated - 1, answers, "steering").improved
