"""ODESteer on the real default model: a built profile changes behaviour on statements it never saw."""

from __future__ import annotations

import pytest
from support import FIXTURES, steering_alone

from steer_core import build_profile, get_method, intervention, load_items, summarize
from steer_core.prompts import answer_distributions


@pytest.mark.model
def test_odesteer_raises_persona_matching_on_other_statements(default_lm):
    """20 statements an environmentalist rejects build the profile; 40 other such statements judge it.

    The 135M model answers "Yes" to nearly every statement, so the persona's rejections are where it has
    room to move. The build chooses T on its own held-out part; the layer is fixed to the middle of the
    method's default layers to keep this test short (the tiny-model tests cover the layer search)."""
    statements = load_items(FIXTURES / "persona_environmentalist_rejects.jsonl")
    train, judge = statements[:20], statements[20:60]
    layer = get_method("odesteer").layers(default_lm)[1]
    profile = build_profile(default_lm, train, "odesteer", {"layer": layer})
    assert profile.strength == 0, profile.metrics  # its calibration alone says "No" to every statement
    profile = steering_alone(profile)  # the steering by itself
    assert profile.strength > 0, profile.metrics
    before = summarize(judge, answer_distributions(default_lm, judge))
    after = summarize(judge, answer_distributions(default_lm, judge, [intervention(profile, default_lm)]))
    assert after["matching_rate"] > before["matching_rate"]
    assert after["log_likelihood"] > before["log_likelihood"]
