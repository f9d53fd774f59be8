"""Alignment metrics between model answer distributions and targets (OpinionsQA and persona style)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import wasserstein_distance

from steer_core.data import Distribution, OpinionItem

KL_SMOOTHING = 1e-4


def ordinal_alignment(p: Distribution, q: Distribution, ordinal: Sequence[float]) -> float:
    """OpinionsQA representativeness: 1 - W1(p, q) / (max(ordinal) - min(ordinal))."""
    span = max(ordinal) - min(ordinal)
    if span <= 0:
        return 1.0 - total_variation(p, q)
    return 1.0 - wasserstein_distance(ordinal, ordinal, np.asarray(p) + 1e-12, np.asarray(q) + 1e-12) / span


def total_variation(p: Distribution, q: Distribution) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def smoothed_kl(q: Distribution, p: Distribution, eps: float = KL_SMOOTHING) -> float:
    """KL(target q || model p), both smoothed with `eps` and renormalized so one-hot targets stay finite."""
    qa = np.asarray(q, dtype=float) + eps
    pa = np.asarray(p, dtype=float) + eps
    qa, pa = qa / qa.sum(), pa / pa.sum()
    return float(np.sum(qa * np.log(qa / pa)))


def matches(p: Distribution, item: OpinionItem) -> bool:
    """Behaviour matching: the target's answer is more likely than every other option."""
    pa = np.asarray(p)
    others = np.delete(pa, item.answer)
    return bool(pa[item.answer] > others.max())


METRIC_NAMES = ("alignment", "total_variation", "kl", "accuracy", "log_likelihood", "matching_rate")


def item_metrics(items: Sequence[OpinionItem], dists: Sequence[Distribution]) -> dict[str, np.ndarray]:
    """Every metric of every item: alignment, total variation, KL, accuracy, answer log-likelihood and
    behaviour-matching rate (the last three read each target's argmax as the answer)."""
    if len(items) != len(dists) or not items:
        raise ValueError("need one distribution per item, and at least one item")
    rows = []
    for it, p in zip(items, dists, strict=True):
        pa = np.asarray(p, dtype=float)
        rows.append((
            ordinal_alignment(pa, it.target, it.ordinal),
            total_variation(pa, it.target),
            smoothed_kl(it.target, pa),
            float(np.argmax(pa) == it.answer),
            float(np.log(max(pa[it.answer], 1e-12))),
            float(matches(pa, it)),
        ))
    columns = np.asarray(rows).T
    return {name: columns[i] for i, name in enumerate(METRIC_NAMES)}


def mean_metrics(per_item: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_item.items()}


def summarize(items: Sequence[OpinionItem], dists: Sequence[Distribution]) -> dict[str, float]:
    """Mean of every metric (`item_metrics`) over a sample."""
    return mean_metrics(item_metrics(items, dists))
