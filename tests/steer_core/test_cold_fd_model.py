"""COLD-FD on the real default model: behaviour, not just shapes."""

from __future__ import annotations

import pytest
from support import FIXTURES, steering_alone

from steer_core import build_profile, intervention, load_items, summarize
from steer_core.cold_fd import candidate_layers
from steer_core.prompts import answer_distributions


@pytest.mark.model
def test_cold_fd_raises_persona_matching_on_other_statements(default_lm):
    """20 statements an environmentalist rejects build the profile (layer fixed to COLD-FD's first
    candidate, strength chosen on held-out statements of the sample); 40 other such statements judge it.

    (The default 135M model answers "Yes" to nearly every statement, whatever its content, so the
    persona's rejections are where it has room to move.)"""
    statements = load_items(FIXTURES / "persona_environmentalist_rejects.jsonl")
    train, judge = statements[:20], statements[20:60]
    # Built and read in the statements' own order (`orders: 1`): what the method's steering can do at all, at half
    # the reads of the order-robust default (tests/steer_core/test_option_orders.py covers that one).
    profile = build_profile(default_lm, train, "cold_fd", {"layer": candidate_layers(default_lm)[0], "orders": 1})
    assert profile.strength == 0, profile.metrics  # its calibration alone says "No" to every statement
    profile = steering_alone(profile)  # the steering by itself
    assert profile.strength > 0, profile.metrics
    assert profile.params["compression"]["fidelity"] > 0.95
    before = summarize(judge, answer_distributions(default_lm, judge, orders=1))
    after = summarize(judge, answer_distributions(default_lm, judge, [intervention(profile, default_lm)], orders=1))
    assert after["matching_rate"] > before["matching_rate"]
