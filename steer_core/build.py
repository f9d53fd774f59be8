"""`build_profile`: the one entry point that turns a sample into a profile, for every method.

Every build chooses its own hyperparameters: it splits the sample, fits each candidate layer on the
training part, scores a small grid of strengths on the held-out part, keeps the best, refits on the
whole sample, and records what it chose and the held-out scores before and after. If no setting beats
the unsteered model on held-out items, the profile says so and its strength is 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from steer_core.data import OpinionItem, sample_hash
from steer_core.errors import SteerError
from steer_core.methods import check_positions, get_method
from steer_core.metrics import summarize
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions

# progress(done, total, stage)
Progress = Callable[[int, int, str], None]

HELDOUT_SHARE = 0.3
MIN_HELDOUT = 2
MIN_TRAIN = 2
SELECTION_METRIC = "alignment"
# A setting must beat unsteered by more than this much mean alignment to ship.
MIN_GAIN = 1e-4


def split_sample(items: Sequence[OpinionItem], heldout_share: float = HELDOUT_SHARE,
                 seed: int = 0) -> tuple[list[OpinionItem], list[OpinionItem]]:
    """A seeded shuffle split into (train, held-out)."""
    n = len(items)
    n_heldout = max(MIN_HELDOUT, round(heldout_share * n))
    if n - n_heldout < MIN_TRAIN:
        raise SteerError(f"{n} items are too few to choose hyperparameters on held-out items: need at least "
                         f"{MIN_HELDOUT + MIN_TRAIN} ({MIN_TRAIN} to fit, {MIN_HELDOUT} to judge), or give both "
                         "'layer' and 'strength'", "items")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [items[i] for i in train], [items[i] for i in heldout]


def score(lm: LanguageModel, items: Sequence[OpinionItem], profile: Profile | None) -> dict[str, float]:
    """Mean metrics of `items` under `profile` (None: unsteered)."""
    steering = None
    if profile is not None and profile.strength != 0:
        steering = [get_method(profile.method).intervention(profile, lm)]
    return summarize(items, answer_distributions(lm, items, steering))


def build_profile(lm: LanguageModel, items: Sequence[OpinionItem], method: str,
                  params: dict[str, Any] | None = None, progress: Progress | None = None,
                  seed: int = 0) -> Profile:
    """Build a profile of `method` from `items`.

    `params` may fix `layer`, `strength` and `positions`, plus the method's own parameters. With both
    `layer` and `strength` given nothing is searched and the scores reported are in-sample.
    """
    spec = get_method(method)
    if not items:
        raise SteerError("the sample is empty", "items")
    params = dict(params or {})
    layer = params.pop("layer", None)
    strength = params.pop("strength", None)
    positions = check_positions(params.pop("positions", spec.default_positions))
    own = spec.check_params(params)
    if layer is not None:
        lm.check_layer(layer, "params.layer")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int | float)
                                 or not math.isfinite(strength) or strength < 0):
        raise SteerError("must be a finite number >= 0", "params.strength")
    report = progress or (lambda done, total, stage: None)

    if layer is not None and strength is not None:
        report(0, 3, "fit")
        profile = spec.fit(lm, items, [layer], own, positions)[layer]
        profile.strength = float(strength)
        report(1, 3, "score")
        before, after = score(lm, items, None), score(lm, items, profile)
        report(3, 3, "done")
        profile.metrics = {"evaluation": "in-sample", "unsteered": before, "steered": after,
                           "search": None, "improved": after[SELECTION_METRIC] > before[SELECTION_METRIC]}
        profile.sample_hash = sample_hash(items)
        return profile

    train, heldout = split_sample(items, seed=seed)
    layers = [layer] if layer is not None else spec.layers(lm)
    report(0, 1, "fit")
    fitted = spec.fit(lm, train, layers, own, positions)
    grids = {L: ([float(strength)] if strength is not None else spec.strengths(fitted[L], lm)) for L in layers}
    total = 2 + sum(len(g) for g in grids.values()) + 1
    done = 1
    report(done, total, "score unsteered")
    before = score(lm, heldout, None)
    done += 1
    search: list[dict[str, Any]] = []
    best: tuple[float, int, float, dict[str, float]] | None = None
    for L in layers:
        for s in grids[L]:
            fitted[L].strength = s
            after = score(lm, heldout, fitted[L])
            search.append({"layer": L, "strength": s, SELECTION_METRIC: after[SELECTION_METRIC]})
            if best is None or after[SELECTION_METRIC] > best[0]:
                best = (after[SELECTION_METRIC], L, s, after)
            done += 1
            report(done, total, f"search layer {L} strength {s:g}")
    assert best is not None
    _, best_layer, best_strength, best_after = best
    improved = best_after[SELECTION_METRIC] > before[SELECTION_METRIC] + MIN_GAIN
    report(done, total, "refit")
    profile = spec.fit(lm, items, [best_layer], own, positions)[best_layer]
    profile.strength = best_strength if improved else 0.0
    profile.sample_hash = sample_hash(items)
    profile.metrics = {
        "evaluation": "held-out",
        "train_items": len(train), "heldout_items": len(heldout),
        "unsteered": before, "steered": best_after if improved else before,
        "best_candidate": best_after,
        "improved": improved,
        "choice": {"layer": best_layer, "strength": profile.strength, "metric": SELECTION_METRIC},
        "search": search,
        "note": None if improved else "no setting beat the unsteered model on held-out items; strength set to 0",
    }
    report(total, total, "done")
    return profile
