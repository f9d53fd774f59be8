"""Output calibration: hand-worked maps, the fast alignment, fits that recover a known map, out of fold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from steer_core.calibration import (
    IDENTITY,
    Calibration,
    blend_calibration,
    calibrate_out_of_fold,
    choose_calibration,
    fit_calibration,
    ordinal_z,
    sample_alignment,
)
from steer_core.data import make_item
from steer_core.errors import ProfileError, SteerError
from steer_core.folds import fold_indices
from steer_core.metrics import ordinal_alignment
from steer_core.profile import Profile


def test_ordinal_z_and_hand_worked_maps():
    assert ordinal_z([1, 2, 3]).tolist() == [-1.0, 0.0, 1.0]
    assert ordinal_z([3, 1]).tolist() == [1.0, -1.0]
    assert ordinal_z([5, 5]).tolist() == [0.0, 0.0]
    # T = 2 takes square roots: [0.8, 0.2] -> [sqrt .8, sqrt .2] / sum = [2/3, 1/3].
    assert Calibration(2.0).apply([0.8, 0.2], [1, 2]) == pytest.approx([2 / 3, 1 / 3])
    # A lean of ln 2 multiplies the top of the scale by 2 and the bottom by 1/2: [0.8, 0.2] -> [0.5, 0.5].
    assert Calibration(1.0, float(np.log(2))).apply([0.8, 0.2], [1, 2]) == pytest.approx([0.5, 0.5])
    assert IDENTITY.apply([0.8, 0.2], [1, 2]).tolist() == [0.8, 0.2]


def _random_sample(rng, n, truth: Calibration):
    """Items whose targets are exactly `truth` applied to the model's distributions."""
    items, dists = [], []
    for i in range(n):
        k = int(rng.integers(2, 6))
        p = rng.dirichlet(np.full(k, 0.5))
        ordinal = [float(x) for x in rng.permutation(k) + 1] if i % 3 == 0 else None
        options = [f"option {j}" for j in range(k)]
        probe = make_item("q", options, answer=0, ordinal=ordinal)
        items.append(make_item(f"question {i}", options, target=list(truth.apply(p, probe.ordinal)), ordinal=ordinal))
        dists.append(p)
    return items, dists


def test_sample_alignment_equals_the_metric():
    rng = np.random.default_rng(1)
    items, dists = _random_sample(rng, 15, Calibration(0.7, -0.3))
    items.append(make_item("tie", ["a", "b", "c"], target=[0.2, 0.3, 0.5], ordinal=[2, 2, 2]))
    dists.append(np.array([0.6, 0.3, 0.1]))
    expected = [ordinal_alignment(p, it.target, it.ordinal) for it, p in zip(items, dists, strict=True)]
    assert sample_alignment(items, dists) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("truth", [Calibration(2.5, 0.0), Calibration(0.5, 0.0), Calibration(3.0, 0.8)])
def test_fit_recovers_a_known_calibration(truth):
    items, dists = _random_sample(np.random.default_rng(0), 20, truth)
    fitted = fit_calibration(items, dists, lean=truth.lean != 0)
    assert fitted.temperature == pytest.approx(truth.temperature, rel=0.02)
    assert fitted.lean == pytest.approx(truth.lean, abs=0.02)
    assert sample_alignment(items, fitted.apply_all(items, dists)).mean() == pytest.approx(1.0, abs=1e-3)


def test_out_of_fold_never_reads_an_items_own_target():
    rng = np.random.default_rng(2)
    exact, dists = _random_sample(rng, 12, Calibration(2.0, 0.5))
    # Noisy targets: no single map fits every item, so each item's target moves the fit that reads it.
    items = [make_item(it.question, list(it.options), target=list(0.5 * np.asarray(it.target) + 0.5 * rng.dirichlet(
        np.ones(len(it.options)))), ordinal=list(it.ordinal)) for it in exact]
    folds = fold_indices(len(items), seed=0)
    before = calibrate_out_of_fold(items, dists, folds)
    changed = list(items)
    i = folds[0][0]
    changed[i] = make_item(items[i].question, list(items[i].options), answer=0, ordinal=list(items[i].ordinal))
    after = calibrate_out_of_fold(changed, dists, folds)
    assert np.allclose(after[i], before[i])  # its own calibration never saw its target
    other = folds[1][0]
    assert not np.allclose(after[other], before[other])  # the items judged by a fit that saw it moved


def test_choose_calibration_keeps_the_lean_when_it_helps():
    items, dists = _random_sample(np.random.default_rng(3), 18, Calibration(2.0, 1.2))
    chosen, out_of_fold, lean = choose_calibration(items, dists, fold_indices(len(items)))
    assert lean and chosen.lean == pytest.approx(1.2, abs=0.05)
    assert len(out_of_fold) == len(items)
    assert sample_alignment(items, out_of_fold).mean() > sample_alignment(items, dists).mean()


def test_from_json_names_the_bad_field():
    assert Calibration.from_json({"temperature": 2, "lean": -1}) == Calibration(2.0, -1.0)
    assert Calibration.from_json({"temperature": 1.5}) == Calibration(1.5, 0.0)
    for bad, field in (({"temperature": 0}, "calibration.temperature"), ({"temperature": "hot"},
                       "calibration.temperature"), ({"lean": True}, "calibration.lean"),
                       ({"temp": 1}, "calibration.temp"), ([1, 2], "calibration")):
        with pytest.raises(SteerError) as info:
            Calibration.from_json(bad)
        assert info.value.field == field


def _profile(calibration: Calibration = IDENTITY) -> Profile:
    return Profile(method="diffmean", model_name="m", model_fingerprint="f", layer=1, positions="prompt",
                   strength=0.5, tensors={"vector": torch.ones(4)}, calibration=calibration)


def test_profiles_store_their_calibration():
    loaded = Profile.from_bytes(_profile(Calibration(1.7, -0.2)).to_bytes())
    assert loaded.calibration == Calibration(1.7, -0.2)
    # A profile written without a calibration reads as the identity; a bad one is a profile error.
    meta = _profile().metadata()
    del meta["calibration"]
    old = st_save({"vector": torch.ones(4)}, metadata={"pluristeer": json.dumps(meta)})
    assert Profile.from_bytes(old).calibration == IDENTITY
    meta["calibration"] = {"temperature": -1}
    with pytest.raises(ProfileError, match="temperature"):
        Profile.from_bytes(st_save({"vector": torch.ones(4)}, metadata={"pluristeer": json.dumps(meta)}))


def test_a_blend_pools_its_profiles_calibrations():
    # 1/T = (1 * 1/2 + 3 * 1/4) / 4 = 5/16; lean = (1 * 1 + 3 * -1) / 4 = -0.5
    pooled = blend_calibration([(Calibration(2.0, 1.0), 1.0), (Calibration(4.0, -1.0), -3.0)])
    assert (pooled.temperature, pooled.lean) == pytest.approx((16 / 5, -0.5))
    assert blend_calibration([(Calibration(2.0, 0.3), 0.5)]) == Calibration(2.0, 0.3)
    assert blend_calibration([]) == IDENTITY
