"""The evaluation module: hand-worked metrics, the cross table from readings, and on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from support import FIXTURES

from steer_core.calibration import IDENTITY, Calibration
from steer_core.data import load_items, make_item
from steer_core.evaluation import (
    BOTH,
    ORIGINAL,
    REVERSED,
    estimate,
    evaluate,
    evaluate_readings,
    expected_ordinal,
    format_cross_table,
    paired_difference,
    read_orders,
    reverse_options,
    specificity,
    steerability_contrast,
)
from steer_core.methods import get_method, intervention
from steer_core.metrics import ordinal_alignment
from steer_core.prompts import answer_distributions


def test_estimates_and_paired_differences():
    e = estimate([1.0, 2.0, 3.0])
    assert (e.mean, e.standard_error) == pytest.approx((2.0, 1 / math.sqrt(3)))
    d = paired_difference([0.5, 0.7], [0.4, 0.4])  # differences 0.1, 0.3: sd 0.1414, se 0.1
    assert (d.mean, d.standard_error) == pytest.approx((0.2, 0.1))
    assert math.isnan(estimate([1.0]).standard_error)
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1, 2], [1, 2, 3])


def test_reversed_options_keep_meaning():
    item = make_item("Q", ["a", "b", "c"], target=[0.6, 0.3, 0.1])
    rev = reverse_options(item)
    assert rev.options == ("c", "b", "a") and rev.ordinal == (3.0, 2.0, 1.0)
    assert rev.target == pytest.approx((0.1, 0.3, 0.6))
    p = [0.2, 0.5, 0.3]
    assert ordinal_alignment(p[::-1], rev.target, rev.ordinal) == pytest.approx(ordinal_alignment(p, item.target,
                                                                                                  item.ordinal))
    assert expected_ordinal([0.5, 0.5], [1, 3]) == 2.0


def test_specificity_by_hand():
    # own gains 0.1, 0.3; the other groups' mean gains 0.05, 0.15: differences 0.05, 0.15.
    s = specificity([0.1, 0.3], [[0.1, 0.1], [0.0, 0.2]])
    assert (s.mean, s.standard_error) == pytest.approx((0.1, 0.05))


def _two_option(question: str, first: float):
    return make_item(question, ["yes", "no"], target=[first, 1 - first])


def test_steerability_contrast_by_hand():
    a = [_two_option("q1", 1.0), _two_option("q2", 0.0), _two_option("q3", 0.5)]  # E = 1, 2, 1.5
    b = [_two_option("q1", 0.0), _two_option("q2", 0.0), _two_option("q3", 0.5)]  # E = 2, 2, 1.5
    # The groups differ by -1, 0, 0; profiles whose answers differ by -0.5, 0, 0 follow them exactly.
    follow_a = [[0.8, 0.2], [0.5, 0.5], [0.5, 0.5]]
    follow_b = [[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]]
    assert steerability_contrast(a, b, follow_a, follow_b) == pytest.approx(1.0)
    assert steerability_contrast(a, b, follow_b, follow_a) == pytest.approx(-1.0)
    assert math.isnan(steerability_contrast(a, b, follow_a, follow_a))  # the same answers: no contrast


def _hand_groups():
    # Two options on a 1..2 scale: alignment = 1 - |p_yes - q_yes|.
    lib = [_two_option(f"q{i}", q) for i, q in enumerate([0.9, 0.8, 0.7])]
    con = [_two_option(f"q{i}", q) for i, q in enumerate([0.1, 0.2, 0.3])]
    return {"lib": lib, "con": con}


def _readings(first_yes, reversed_yes):
    return {ORIGINAL: [np.array([p, 1 - p]) for p in first_yes],
            REVERSED: [np.array([p, 1 - p]) for p in reversed_yes]}


def test_gains_over_each_baseline_are_paired_over_questions():
    # An over-confident unsteered model ([0.9, 0.1] everywhere) and a profile that flattens it part way.
    items = [_two_option(f"q{i}", q) for i, q in enumerate([0.6, 0.8, 0.5])]
    unsteered = {ORIGINAL: [np.array([0.9, 0.1])] * 3}
    report = evaluate_readings({"g": items}, unsteered, {"p": {ORIGINAL: [np.array([0.7, 0.3])] * 3}},
                               calibrations={"g": IDENTITY})
    cell = report["cells"][ORIGINAL]["p"]["g"]
    # alignment 1 - |p_yes - q_yes|: profile 0.9, 0.9, 0.8; unsteered 0.7, 0.9, 0.6; uniform 0.9, 0.7, 1.0
    assert cell["gain_vs_unsteered"]["mean"] == pytest.approx(0.4 / 3)
    assert cell["gain_vs_uniform"]["mean"] == pytest.approx(0.0)
    assert cell["gain_vs_uniform"]["standard_error"] == pytest.approx(0.2 / 3 ** 0.5)  # gains 0, +0.2, -0.2
    assert report["cells"][ORIGINAL]["uniform"]["g"]["gain_vs_uniform"]["mean"] == 0


def test_cross_table_by_hand():
    groups = _hand_groups()
    unsteered = _readings([0.5] * 3, [0.5] * 3)
    # "letter" puts 0.8 on the first letter in both orders: "yes" in survey order, "no" reversed.
    profiles = {"letter": _readings([0.8] * 3, [0.2] * 3), "con_profile": _readings([0.2, 0.4, 0.5], [0.2, 0.4, 0.5])}
    report = evaluate_readings(groups, unsteered, profiles, own={"letter": "lib", "con_profile": "con"},
                               calibrations={"lib": IDENTITY, "con": IDENTITY})
    assert report["orders"] == [ORIGINAL, REVERSED, BOTH] and report["questions"] == 3
    cell = report["cells"][ORIGINAL]["letter"]["lib"]
    assert cell["alignment"]["mean"] == pytest.approx((0.9 + 1.0 + 0.9) / 3)
    # gains for lib 0.3, 0.3, 0.1 (sd 0.1155, se 0.0667)
    assert cell["gain_vs_unsteered"]["mean"] == pytest.approx(0.7 / 3)
    assert cell["gain_vs_unsteered"]["standard_error"] == pytest.approx(0.2 / 3)
    # calibrated with the identity is the unsteered model
    assert cell["gain_vs_calibrated"] == cell["gain_vs_unsteered"]
    # gains for con -0.3 each: specificity per question 0.6, 0.6, 0.4
    spec = report["specificity"][ORIGINAL]["letter"]
    assert (spec["mean"], spec["standard_error"]) == pytest.approx((1.6 / 3, 0.2 / 3))
    # Reversed, the letter profile moves answers away from its group: the order robustness check sees it.
    assert report["cells"][REVERSED]["letter"]["lib"]["gain_vs_unsteered"]["mean"] == pytest.approx(-0.3)
    assert report["cells"][BOTH]["letter"]["lib"]["gain_vs_unsteered"]["mean"] == pytest.approx(-0.1 / 3)
    assert report["specificity"][REVERSED]["letter"]["mean"] == pytest.approx(-1.6 / 3)
    # contrast: answers differ by -0.6, -0.4, -0.3 (E = 2 - p_yes), groups by -0.8, -0.6, -0.4
    (contrast,) = report["steerability_contrast"]
    assert contrast["profiles"] == ["letter", "con_profile"]
    assert contrast["r"][ORIGINAL] == pytest.approx(0.06 / math.sqrt(0.14 / 3 * 0.08), abs=1e-6)
    assert report["cells"][ORIGINAL]["uniform"]["con"]["alignment"]["mean"] == pytest.approx(0.7)
    assert "specificity of letter" in format_cross_table(report, ORIGINAL)


def test_the_cross_table_names_every_row_whole():
    """Profiles of one method for two groups differ only at the end of their names: each row shows its own."""
    names = ["diffmean+contrast+orders@lib", "diffmean+contrast+orders@con"]
    profiles = {name: _readings([0.6] * 3, [0.4] * 3) for name in names}
    report = evaluate_readings(_hand_groups(), _readings([0.5] * 3, [0.5] * 3), profiles,
                               calibrations={"lib": IDENTITY, "con": IDENTITY})
    rows = [line.split()[0] for line in format_cross_table(report, BOTH).splitlines()[2:]]
    assert rows == ["unsteered", "uniform", "calibrated", *names]


def test_cross_table_fits_the_calibrated_baseline_out_of_fold():
    rng = np.random.default_rng(0)
    groups = {g: [make_item(f"q{i}", ["a", "b", "c"], target=list(rng.dirichlet(np.ones(3) * 2))) for i in range(9)]
              for g in ("x", "y")}
    confident = [np.array([0.96, 0.03, 0.01])] * 9
    report = evaluate_readings(groups, {ORIGINAL: confident}, {}, seed=0)
    for g in groups:
        gain = report["cells"][ORIGINAL]["calibrated"][g]["gain_vs_unsteered"]
        assert gain["mean"] > 2 * gain["standard_error"] > 0  # flattening an over-confident model helps
    with pytest.raises(ValueError, match="same questions"):
        evaluate_readings({"x": groups["x"], "y": groups["y"][:-1]}, {ORIGINAL: confident}, {})


def test_cross_table_on_a_tiny_model(tiny_lm):
    urban = load_items(FIXTURES / "opinions_group_urban.jsonl")
    rural = load_items(FIXTURES / "opinions_group_rural.jsonl")
    assert [it.question for it in urban] == [it.question for it in rural]
    profiles = {name: get_method("diffmean").fit(tiny_lm, items[:6], [1], {}, "prompt")[1]
                for name, items in (("urban", urban), ("rural", rural))}
    profiles["rural"].strength = 4.0
    profiles["rural"].calibration = Calibration(2.0, 0.5)
    judged = {"urban": urban[12:20], "rural": rural[12:20]}
    report = evaluate(tiny_lm, judged, profiles, own={"urban": "urban", "rural": "rural"})
    assert set(report["cells"]) == {ORIGINAL, REVERSED, BOTH}
    assert set(report["cells"][BOTH]) == {"unsteered", "uniform", "calibrated", "urban", "rural"}
    assert set(report["specificity"][ORIGINAL]) == {"urban", "rural"}
    assert report["profiles"]["rural"]["calibration"] == {"temperature": 2.0, "lean": 0.5}
    # The readings: reversed questions read back in survey order, the profile's calibration applied.
    questions = judged["urban"]
    readings = read_orders(tiny_lm, questions, profiles["rural"])
    steer = [intervention(profiles["rural"], tiny_lm)]
    raw = answer_distributions(tiny_lm, [reverse_options(questions[0])], steer)[0][::-1]
    assert readings[REVERSED][0] == pytest.approx(Calibration(2.0, 0.5).apply(raw, questions[0].ordinal), abs=1e-6)
    raw = answer_distributions(tiny_lm, questions[:1], steer)[0]
    assert readings[ORIGINAL][0] == pytest.approx(Calibration(2.0, 0.5).apply(raw, questions[0].ordinal), abs=1e-6)
    cell = report["cells"][ORIGINAL]["rural"]["rural"]
    assert cell["alignment"]["mean"] == pytest.approx(
        np.mean([ordinal_alignment(p, it.target, it.ordinal) for it, p in zip(judged["rural"], readings[ORIGINAL],
                                                                               strict=True)]), abs=1e-6)
