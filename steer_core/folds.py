"""How a sample is split for honest judging: k folds (builds, calibration) or one held-out share."""

from __future__ import annotations

import random
from collections.abc import Sequence

from steer_core.data import OpinionItem
from steer_core.errors import SteerError

FOLDS = 3
HELDOUT_SHARE = 0.3  # `split_sample`: the held-out part other callers (the A/B offline comparison) judge on
MIN_HELDOUT = 2
MIN_TRAIN = 2


def too_few(n: int) -> SteerError:
    return SteerError(f"{n} items are too few to choose hyperparameters on held-out items: need at least "
                      f"{MIN_HELDOUT + MIN_TRAIN} ({MIN_TRAIN} to fit, {MIN_HELDOUT} to judge), or give both "
                      "'layer' and 'strength'", "items")


def split_sample(items: Sequence[OpinionItem], heldout_share: float = HELDOUT_SHARE,
                 seed: int = 0) -> tuple[list[OpinionItem], list[OpinionItem]]:
    """A seeded shuffle split into (train, held-out)."""
    n = len(items)
    n_heldout = max(MIN_HELDOUT, round(heldout_share * n))
    if n - n_heldout < MIN_TRAIN:
        raise too_few(n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [items[i] for i in train], [items[i] for i in heldout]


def fold_indices(n: int, folds: int = FOLDS, seed: int = 0) -> list[list[int]]:
    """A seeded shuffle of range(n) dealt into k folds (fewer than `folds` when each would hold fewer than
    MIN_HELDOUT items), every fold's complement at least MIN_TRAIN items."""
    if n < MIN_HELDOUT + MIN_TRAIN:
        raise too_few(n)
    k = max(2, min(folds, n // MIN_HELDOUT))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]
