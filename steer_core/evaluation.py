"""An evaluation that flattening and letter position cannot game.

Several profiles are judged against several groups' targets on the same questions (the cross table),
beside three baselines: `unsteered`, `uniform` (1/n per option) and `calibrated` (the unsteered model
through a temperature and an ordinal lean, fitted for each group out of fold: `steer_core.calibration`).
Each question is also presented with its options in reverse order (letters re-assigned, target permuted
with them); read one order at a time, a profile that learned "answer A" gains in one order and loses in
the other. `evaluate` reads as the service does, debiased (both orders read and averaged, so the two
presentations get the same answers); `debiased=False` shows each order on its own. Every gain is a
paired difference over questions with its standard error, over each baseline (`gain_vs_uniform` says
directly whether a profile does more than flattening would).

Pluralism:
- specificity: a profile's gain for its own group minus its mean gain for the other groups, per question,
  so a profile that moves every group's alignment alike (flattening) scores about 0;
- steerability contrast: over questions, the correlation between two profiles' difference in expected
  ordinal answer and their two groups' difference in expected ordinal answer.

The pure functions take answer distributions (`evaluate_readings`); `evaluate` reads them from a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from steer_core.calibration import IDENTITY, Calibration, calibrate_out_of_fold, sample_alignment
from steer_core.data import Distribution, OpinionItem, reverse_options
from steer_core.folds import fold_indices

if TYPE_CHECKING:
    from steer_core.models import LanguageModel
    from steer_core.profile import Profile

ORIGINAL, REVERSED, BOTH = "original", "reversed", "both orders"
ORDERS = (ORIGINAL, REVERSED)
BASELINES = ("unsteered", "uniform", "calibrated")

Readings = Mapping[str, Sequence[np.ndarray]]  # order -> one distribution per question, in survey option order


@dataclass(frozen=True)
class Estimate:
    """A mean over questions with its standard error."""

    mean: float
    standard_error: float

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "standard_error": self.standard_error}

    def __str__(self) -> str:
        return f"{self.mean:+.4f} ± {self.standard_error:.4f}"


def estimate(values: Sequence[float] | np.ndarray) -> Estimate:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); nan for one value)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("no values to estimate from")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return Estimate(float(v.mean()), se)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> Estimate:
    """Mean of a - b over the same questions, with the paired standard error."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same questions: {a.shape} vs {b.shape}")
    return estimate(a - b)


def uniform_distributions(items: Sequence[OpinionItem]) -> list[np.ndarray]:
    return [np.full(len(it.options), 1.0 / len(it.options)) for it in items]


def expected_ordinal(p: Distribution, ordinal: Sequence[float]) -> float:
    return float(np.dot(np.asarray(p, dtype=float), np.asarray(ordinal, dtype=float)))


def specificity(own_gain: Sequence[float] | np.ndarray,
                other_gains: Sequence[Sequence[float] | np.ndarray]) -> Estimate:
    """Per question, the gain for the profile's own group minus its mean gain for the other groups."""
    if not other_gains:
        raise ValueError("specificity needs at least one other group")
    others = np.mean(np.asarray(other_gains, dtype=float), axis=0)
    return estimate(np.asarray(own_gain, dtype=float) - others)


def steerability_contrast(items_a: Sequence[OpinionItem], items_b: Sequence[OpinionItem],
                          dists_a: Sequence[Distribution], dists_b: Sequence[Distribution]) -> float:
    """Pearson r over questions between E_a[ordinal] - E_b[ordinal] under the two profiles' answers and the
    same difference under the two groups' targets (nan when either difference is constant)."""
    if not (len(items_a) == len(items_b) == len(dists_a) == len(dists_b)):
        raise ValueError("the two groups and profiles need the same questions")
    moved = [expected_ordinal(pa, ia.ordinal) - expected_ordinal(pb, ib.ordinal)
             for ia, ib, pa, pb in zip(items_a, items_b, dists_a, dists_b, strict=True)]
    wanted = [expected_ordinal(ia.target, ia.ordinal) - expected_ordinal(ib.target, ib.ordinal)
              for ia, ib in zip(items_a, items_b, strict=True)]
    if len(moved) < 2 or np.std(moved) == 0 or np.std(wanted) == 0:
        return math.nan
    return float(np.corrcoef(moved, wanted)[0, 1])


def baseline_alignments(items: Sequence[OpinionItem], unsteered: Sequence[np.ndarray],
                        calibration: Calibration | None = None,
                        folds: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Per-question alignment of the three baselines: `unsteered`, `uniform` and `calibrated` (`calibration`
    applied when given, else one fitted on these questions out of `folds`, by default 3 seeded folds)."""
    if calibration is not None:
        calibrated = calibration.apply_all(items, unsteered)
    else:
        calibrated = calibrate_out_of_fold(items, unsteered, folds if folds is not None else fold_indices(len(items)))
    return {"unsteered": sample_alignment(items, unsteered),
            "uniform": sample_alignment(items, uniform_distributions(items)),
            "calibrated": sample_alignment(items, calibrated)}


def _check_same_questions(groups: Mapping[str, Sequence[OpinionItem]]) -> int:
    if not groups:
        raise ValueError("need at least one group")
    first = next(iter(groups.values()))
    for name, items in groups.items():
        if len(items) != len(first) or any(a.question != b.question or a.options != b.options
                                           for a, b in zip(items, first, strict=True)):
            raise ValueError(f"group {name!r} does not answer the same questions in the same order")
    if not first:
        raise ValueError("need at least one question")
    return len(first)


def evaluate_readings(groups: Mapping[str, Sequence[OpinionItem]], unsteered: Readings,
                      profiles: Mapping[str, Readings], own: Mapping[str, str | None] | None = None,
                      calibrations: Mapping[str, Calibration] | None = None, seed: int = 0) -> dict[str, Any]:
    """The cross table from answer distributions (JSON-able).

    `groups`: each group's items on the same questions (only targets differ). `unsteered` and each profile's
    readings: order -> distributions in survey option order (a reversed reading mapped back), the profile's
    own calibration already applied. `own`: the group each profile was built for (specificity, contrast).
    `calibrations`: the `calibrated` baseline's map per group; a group without one gets a fit on these
    questions out of fold (3 folds, `seed`), so no question's target tunes its own baseline.
    """
    n = _check_same_questions(groups)
    own = dict(own or {})
    orders = list(unsteered)
    for name, readings in profiles.items():
        if name in BASELINES:
            raise ValueError(f"{name!r} is a baseline's name; name the profile otherwise")
        if list(readings) != orders:
            raise ValueError(f"profile {name!r} was read in orders {list(readings)}, the baseline in {orders}")
        if own.get(name) is not None and own[name] not in groups:
            raise ValueError(f"profile {name!r} is for group {own[name]!r}, which is not judged")
    folds = fold_indices(n, seed=seed) if calibrations is None or set(groups) - set(calibrations) else None
    # alignment[order][row][group]: one value per question
    alignment: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for order in orders:
        table: dict[str, dict[str, np.ndarray]] = {name: {} for name in BASELINES}
        for g, items in groups.items():
            given = calibrations.get(g) if calibrations is not None else None
            for name, values in baseline_alignments(items, list(unsteered[order]), given, folds).items():
                table[name][g] = values
        for name, readings in profiles.items():
            table[name] = {g: sample_alignment(items, readings[order]) for g, items in groups.items()}
        alignment[order] = table
    if len(orders) > 1:
        alignment[BOTH] = {row: {g: np.mean([alignment[o][row][g] for o in orders], axis=0) for g in groups}
                           for row in alignment[orders[0]]}

    cells: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    for order, table in alignment.items():
        cells[order] = {row: {g: {"alignment": estimate(v).to_json(),
                                  "gain_vs_unsteered": paired_difference(v, table["unsteered"][g]).to_json(),
                                  "gain_vs_uniform": paired_difference(v, table["uniform"][g]).to_json(),
                                  "gain_vs_calibrated": paired_difference(v, table["calibrated"][g]).to_json()}
                              for g, v in by_group.items()}
                        for row, by_group in table.items()}
        spec[order] = {}
        for name in profiles:
            own_group = own.get(name)
            if own_group is None or len(groups) < 2:
                continue
            gains = {h: table[name][h] - table["unsteered"][h] for h in groups}
            spec[order][name] = specificity(gains[own_group], [gains[h] for h in groups if h != own_group]).to_json()
    contrast = []
    named = [(name, group) for name in profiles if (group := own.get(name)) is not None]
    for i, (a, ga) in enumerate(named):
        for b, gb in named[i + 1:]:
            if ga == gb:
                continue
            r = {order: steerability_contrast(groups[ga], groups[gb], profiles[a][order], profiles[b][order])
                 for order in orders}
            contrast.append({"profiles": [a, b], "groups": [ga, gb], "r": r})
    return {"questions": n, "groups": list(groups), "orders": list(alignment), "baselines": list(BASELINES),
            "profiles": {name: {"own_group": own.get(name)} for name in profiles},
            "cells": cells, "specificity": spec, "steerability_contrast": contrast}


# ------------------------------------------------------------------------------------- reading a model


def read_orders(lm: LanguageModel, items: Sequence[OpinionItem], profile: Profile | None = None,
                orders: Sequence[str] = ORDERS, debiased: bool = True) -> dict[str, list[np.ndarray]]:
    """Answer distributions of `items` in each order, mapped back to survey option order, under `profile`
    (None: unsteered) with the profile's own calibration applied.

    `debiased` (the default, as the service's readers serve): each question is read in both option orders and
    the two averaged (`steer_core.prompts`), so every order asked gets that same reading; False: each order is
    read on its own (what a single-order reader, and chat, sees)."""
    from steer_core.methods import intervention
    from steer_core.prompts import read_answers

    unknown = set(orders) - set(ORDERS)
    if unknown:
        raise ValueError(f"unknown order {sorted(unknown)[0]!r}; choose from {ORDERS}")
    steering = [intervention(profile, lm)] if profile is not None and profile.strength != 0 else None
    lean = profile.question_lean if profile is not None else None
    layers = [lean.layer] if lean is not None else []
    n = len(items)
    if debiased:
        read = read_answers(lm, items, steering, layers, orders=2)
        calibrations = profile.calibrations(items, read.states) if profile is not None else [IDENTITY] * n
        debiased_reads = [c.apply(p, it.ordinal) for c, p, it in zip(calibrations, read.distributions, items,
                                                                     strict=True)]
        return {order: debiased_reads for order in orders}
    asked = [it if order == ORIGINAL else reverse_options(it) for order in orders for it in items]
    # One call: batches fill up across orders. A question lean reads each order's own prompt.
    read = read_answers(lm, asked, steering, layers, orders=1)
    calibrations = profile.calibrations(asked, read.states) if profile is not None else [IDENTITY] * len(asked)
    out: dict[str, list[np.ndarray]] = {}
    for k, order in enumerate(orders):
        part = slice(k * n, (k + 1) * n)
        reads = read.distributions[part]
        chunk = reads if order == ORIGINAL else [p[::-1].copy() for p in reads]
        out[order] = [c.apply(p, it.ordinal) for c, p, it in zip(calibrations[part], chunk, items, strict=True)]
    return out


def evaluate(lm: LanguageModel, groups: Mapping[str, Sequence[OpinionItem]], profiles: Mapping[str, Profile],
             own: Mapping[str, str | None] | None = None, calibrations: Mapping[str, Calibration] | None = None,
             orders: Sequence[str] = ORDERS, seed: int = 0, debiased: bool = True) -> dict[str, Any]:
    """Read the model unsteered and under each profile (its calibration applied) in every order (`read_orders`:
    debiased by default), then `evaluate_readings`. Profiles are checked against `lm`."""
    _check_same_questions(groups)
    questions = list(next(iter(groups.values())))
    unsteered = read_orders(lm, questions, None, orders, debiased)
    readings = {name: read_orders(lm, questions, p, orders, debiased) for name, p in profiles.items()}
    report = evaluate_readings(groups, unsteered, readings, own, calibrations, seed)
    report["debiased"] = debiased
    for name, p in profiles.items():
        report["profiles"][name].update({"method": p.method, "layer": p.layer, "strength": p.strength,
                                         "calibration": p.calibration.to_json(),
                                         "question_lean": p.question_lean.to_json() if p.question_lean else None})
    return report


def format_cross_table(report: dict[str, Any], order: str | None = None) -> str:
    """The cross table as text: rows are baselines and profiles, columns the groups; each cell the mean
    alignment and its gain over `calibrated` with the paired standard error."""
    order = order or report["orders"][-1]
    cells = report["cells"][order]
    groups = report["groups"]
    width = 30
    names = max(16, *(len(row) + 1 for row in cells))  # whole names: profiles often differ only at the end
    lines = [f"{report['questions']} questions, {order}: alignment (gain vs calibrated ± paired SE)",
             f"{'':<{names}}" + "".join(f"{g[:width - 2]:>{width}}" for g in groups)]
    for row, by_group in cells.items():
        text = []
        for g in groups:
            c = by_group[g]
            gain = c["gain_vs_calibrated"]
            text.append(f"{c['alignment']['mean']:.4f} ({gain['mean']:+.4f} ± {gain['standard_error']:.4f})")
        lines.append(f"{row:<{names}}" + "".join(f"{t:>{width}}" for t in text))
    for name, s in report["specificity"].get(order, {}).items():
        lines.append(f"specificity of {name} (own group {report['profiles'][name]['own_group']}): "
                     f"{s['mean']:+.4f} ± {s['standard_error']:.4f}")
    for c in report["steerability_contrast"]:
        # r is read per option order; for the table of both orders, both are shown.
        shown = [order] if order in c["r"] else [o for o in ORDERS if o in c["r"]]
        r = " / ".join(f"{c['r'][o]:+.3f} ({o})" for o in shown)
        lines.append(f"steerability contrast {c['profiles'][0]} vs {c['profiles'][1]}: r = {r}")
    return "\n".join(lines)
