"""The build's selection: steering ships only for what the calibrated unsteered model cannot do."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from steer_core import METHODS, build_profile
from steer_core.build import select_setting
from steer_core.calibration import Calibration, choose_calibration, sample_alignment
from steer_core.data import make_item
from steer_core.folds import fold_indices
from steer_core.methods import Method, no_params, register
from steer_core.profile import Profile
from steer_core.prompts import option_token_ids
from steer_core.steering import ConstantShift


def _sample(n: int = 12):
    rng = np.random.default_rng(0)
    items = [make_item(f"q{i}", ["a", "b", "c", "d"], target=list(rng.dirichlet(np.ones(4) * 2))) for i in range(n)]
    unsteered = [rng.dirichlet(np.ones(4) * 0.3) for _ in items]  # confident and often wrong
    return items, unsteered


def test_selection_picks_the_setting_that_knows_the_targets():
    items, unsteered = _sample()
    rng = np.random.default_rng(1)
    candidates = {
        (1, 0.5): [np.asarray(it.target) for it in items],  # the known best: every target exactly
        (1, 1.0): Calibration(4.0).apply_all(items, unsteered),  # flattening only
        (2, 0.5): [rng.dirichlet(np.ones(4)) for _ in items],
    }
    chosen = select_setting(items, unsteered, candidates, fold_indices(len(items)))
    assert chosen.best == (1, 0.5) and chosen.improved
    assert chosen.search[(1, 0.5)] == pytest.approx(1.0, abs=1e-3)
    assert chosen.calibration.temperature == pytest.approx(1.0, abs=0.05)
    assert chosen.best_items["alignment"].mean() > chosen.baselines["calibrated"]["alignment"].mean()
    assert chosen.shipped_items is chosen.best_items  # what the build's `steered` and `per_item` record
    assert set(chosen.baselines) == {"unsteered", "uniform", "calibrated"}


def test_selection_ships_strength_zero_when_only_calibration_helps():
    items, _ = _sample()
    rng = np.random.default_rng(2)
    # An over-confident model that knows the opinions: T = 3 of a noisy target.
    unsteered = [Calibration(1 / 3).apply(np.asarray(it.target) * rng.uniform(0.8, 1.2, 4), it.ordinal)
                 for it in items]
    folds = fold_indices(len(items))
    wrong = [np.roll(np.asarray(it.target), 2) for it in items]
    candidates = {(1, 1.0): Calibration(3.0).apply_all(items, unsteered), (1, 2.0): wrong,
                  (2, 1.0): list(unsteered)}
    chosen = select_setting(items, unsteered, candidates, folds)
    assert not chosen.improved
    # Flattening a candidate buys nothing its calibration does not: the flat candidate scores the baseline.
    assert chosen.search[(1, 1.0)] == pytest.approx(chosen.baselines["calibrated"]["alignment"].mean(), abs=2e-3)
    assert chosen.search[(2, 1.0)] == pytest.approx(chosen.baselines["calibrated"]["alignment"].mean())
    shipped, calibrated, _ = choose_calibration(items, unsteered, folds)
    assert chosen.calibration == shipped  # what ships is the unsteered model's own calibration
    assert chosen.shipped_items is chosen.baselines["calibrated"]
    assert sample_alignment(items, calibrated).mean() > sample_alignment(items, unsteered).mean()


def _contrasted_sample(n: int = 12):
    """Items whose contrast (the other group) prefers the opposite end of each scale, and an unsteered model
    that is confident and wrong for both groups."""
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        own = rng.dirichlet(np.ones(4) * 2)
        own = np.sort(own)[::-1] if i % 2 else np.sort(own)  # the group leans to one end ...
        items.append(replace(make_item(f"q{i}", ["a", "b", "c", "d"], target=list(own)),
                             contrast=tuple(float(x) for x in own[::-1])))  # ... the others to the other
    unsteered = [rng.dirichlet(np.ones(4) * 0.3) for _ in items]
    return items, unsteered


def test_with_a_contrast_selection_picks_what_tells_the_group_apart_not_flattening():
    items, unsteered = _contrasted_sample()
    flat = [np.full(4, 0.25) for _ in items]  # flattening: raises the alignment of both groups alike
    toward = [0.6 * np.asarray(it.target) + 0.4 * np.full(4, 0.25) for it in items]  # toward the group
    away = [np.asarray(it.contrast) for it in items]  # toward the others: specific, but a loss to the group
    chosen = select_setting(items, unsteered, {"flat": flat, "toward": toward, "away": away},
                            fold_indices(len(items)))
    assert chosen.by_specificity and chosen.best == "toward" and chosen.improved
    assert chosen.search["toward"] > 0.05
    assert abs(chosen.search["flat"]) < abs(chosen.search["toward"]) / 4  # flattening scores about 0
    assert chosen.search["away"] < 0


def test_with_a_contrast_flattening_alone_ships_strength_zero():
    items, unsteered = _contrasted_sample()
    candidates = {"flat": [np.full(4, 0.25) for _ in items], "unsteered": list(unsteered)}
    chosen = select_setting(items, unsteered, candidates, fold_indices(len(items)))
    assert chosen.by_specificity and not chosen.improved
    # Without the contrast the same flat candidate is judged on its alignment alone.
    plain = [replace(it, contrast=None) for it in items]
    assert not select_setting(plain, unsteered, candidates, fold_indices(len(items))).by_specificity


def _build_with_stub(lm, items, name, fit, strengths, layers, **method_fields) -> Profile:
    """`build_profile` with a stub method registered for the call: `fit` gives constant vectors, searched
    over `strengths` at `layers`."""
    register(Method(name=name, fit=fit, check_params=no_params,
                    intervention=lambda p, lm: ConstantShift(layer=p.layer, positions=p.positions,
                                                             vector=p.strength * p.tensors["vector"]),
                    strengths=lambda p, lm: list(strengths), layers=lambda lm: list(layers), **method_fields))
    try:
        return build_profile(lm, items, name)
    finally:
        METHODS.pop(name)


def _zero_fit(lm, items, layers, params, positions):
    return {L: Profile(method="stub_zero", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=L,
                       positions=positions, strength=1.0, tensors={"vector": torch.zeros(lm.hidden_size)})
            for L in layers}


def test_a_build_whose_steering_does_nothing_ships_its_calibration_alone(tiny_lm):
    items = [make_item(f"Question number {i}?", ["Yes", "No", "Maybe"], target=[0.5, 0.3, 0.2]) for i in range(8)]
    profile = _build_with_stub(tiny_lm, items, "stub_zero", _zero_fit, strengths=[1.0, 2.0], layers=[1, 2])
    m = profile.metrics
    assert profile.strength == 0 and not m["steering_shipped"] and not m["improved"] and "calibrated" in m["note"]
    assert m["steered"] == m["calibrated"]
    assert [r["steered"] for r in m["per_item"]["items"]] == [r["calibrated"] for r in m["per_item"]["items"]]
    assert m["gain_vs_calibrated"]["alignment"] == pytest.approx(0.0, abs=1e-6)  # batching noise only
    assert m["calibration"]["temperature"] == profile.calibration.temperature
    assert {"unsteered", "uniform", "calibrated"} <= set(m)
    assert Profile.from_bytes(profile.to_bytes()).calibration == profile.calibration


def _toward_middle_fit(lm, items, layers, params, positions):
    """At the last block only: the unembedding row of the letter of the middle option, which pushes every
    answer toward that option; at the other layers nothing."""
    letter = option_token_ids(lm.tokenizer, 3)[1]
    toward = lm.model.get_output_embeddings().weight[letter].detach().float()
    last = lm.num_layers - 1
    return {L: Profile(method="stub_middle", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=L,
                       positions=positions, strength=1.0,
                       tensors={"vector": toward if L == last else torch.zeros(lm.hidden_size)})
            for L in layers}


def test_a_build_finds_the_known_best_setting_of_a_stub_method(tiny_lm):
    """Every target puts its mass on the middle option, which no calibration (temperature, lean toward an end
    of the scale) can favour; only the last block's vector moves answers there: the build must pick that
    layer, and ship it as a gain over the calibrated model."""
    last = tiny_lm.num_layers - 1
    items = [make_item(f"Question number {i}?", ["Yes", "No", "Maybe"], target=[0.05, 0.9, 0.05])
             for i in range(8)]
    profile = _build_with_stub(tiny_lm, items, "stub_middle", _toward_middle_fit, strengths=[4.0, 16.0],
                               layers=[1, last], default_positions="last")
    m = profile.metrics
    assert m["choice"]["layer"] == last and profile.layer == last
    assert m["steering_shipped"] and profile.strength in (4.0, 16.0)
    assert m["gain_vs_calibrated"]["alignment"] > 0
    assert max(m["search"], key=lambda s: s["alignment"])["layer"] == last
