"""Alignment metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from steer_core.data import make_item
from steer_core.metrics import matches, ordinal_alignment, smoothed_kl, summarize, total_variation


def test_ordinal_alignment_is_one_minus_normalized_w1():
    # All mass moved from position 1 to position 3 on a 1..3 scale: W1 = 2, span = 2.
    assert ordinal_alignment([0, 0, 1], [1, 0, 0], [1, 2, 3]) == pytest.approx(0.0, abs=1e-9)
    # Half the mass moves by one step: W1 = 0.5, span 2.
    assert ordinal_alignment([0.5, 0.5, 0], [1, 0, 0], [1, 2, 3]) == pytest.approx(0.75)
    # Ordinal positions need not be in option order.
    assert ordinal_alignment([0, 1, 0], [0, 0, 1], [1, 3, 2]) == pytest.approx(0.5)
    assert ordinal_alignment([0.2, 0.8], [0.2, 0.8], [1, 2]) == pytest.approx(1.0)


def test_total_variation_and_kl():
    assert total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert smoothed_kl([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert smoothed_kl([0.5, 0.5], [0.25, 0.75], eps=0) == pytest.approx(
        0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert math.isfinite(smoothed_kl([1.0, 0.0], [0.0, 1.0]))


def test_summary_of_a_persona_sample():
    items = [make_item("Q", ["Yes", "No"], answer=0), make_item("Q", ["Yes", "No"], answer=1)]
    dists = [[0.9, 0.1], [0.6, 0.4]]
    s = summarize(items, dists)
    assert s["matching_rate"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["log_likelihood"] == pytest.approx((math.log(0.9) + math.log(0.4)) / 2)
    assert matches([0.9, 0.1], items[0]) and not matches([0.6, 0.4], items[1])
