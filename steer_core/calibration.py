"""Output calibration: a temperature and a lean along the ordinal scale, `p_i ∝ p_i^(1/T) exp(b z_i)`.

`z` is each option's ordinal position scaled to [-1, 1]. Small instruct models are over-confident on
opinion questions, so this two-parameter map alone raises alignment for any group; a profile carries
its own (fitted out of fold on its sample) and steering is judged by what it adds on top.

Fits minimize the targets' cross-entropy (a proper scoring rule, convex in 1/T and b). Whether the lean
is worth fitting is decided by out-of-fold alignment, the metric every build selects on; alignment here is
computed for a whole sample at once (a padded array, W1 from cumulative sums on the sorted ordinal
positions), the same number `metrics.ordinal_alignment` gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from steer_core.data import Distribution, OpinionItem
from steer_core.errors import SteerError

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 50.0
MAX_LEAN = 5.0
_FLOOR = 1e-12


def ordinal_z(ordinal: Sequence[float]) -> np.ndarray:
    """Ordinal positions scaled to [-1, 1] (all zeros when every option sits at one position)."""
    o = np.asarray(ordinal, dtype=float)
    span = o.max() - o.min()
    return np.zeros_like(o) if span <= 0 else 2.0 * (o - o.min()) / span - 1.0


@dataclass(frozen=True)
class Calibration:
    """`p_i ∝ p_i^(1/temperature) exp(lean z_i)`; the identity is temperature 1, lean 0."""

    temperature: float = 1.0
    lean: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SteerError("must be a finite number > 0", "calibration.temperature")
        if not math.isfinite(self.lean):
            raise SteerError("must be a finite number", "calibration.lean")

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.lean == 0.0

    def apply(self, p: Distribution, ordinal: Sequence[float]) -> np.ndarray:
        if self.is_identity:
            return np.asarray(p, dtype=float)
        logits = np.log(np.maximum(np.asarray(p, dtype=float), _FLOOR)) / self.temperature
        logits = logits + self.lean * ordinal_z(ordinal)
        e = np.exp(logits - logits.max())
        return e / e.sum()

    def apply_all(self, items: Sequence[OpinionItem], dists: Sequence[Distribution]) -> list[np.ndarray]:
        return [self.apply(p, it.ordinal) for it, p in zip(items, dists, strict=True)]

    def to_json(self) -> dict[str, float]:
        return {"temperature": self.temperature, "lean": self.lean}

    @classmethod
    def from_json(cls, obj: Any, field: str = "calibration") -> Calibration:
        """Validate a JSON object (`{"temperature", "lean"?}`) into a calibration; errors name the field."""
        if not isinstance(obj, dict):
            raise SteerError("must be an object with 'temperature' and 'lean'", field)
        unknown = set(obj) - {"temperature", "lean"}
        if unknown:
            raise SteerError(f"unknown key {sorted(unknown)[0]!r}", f"{field}.{sorted(unknown)[0]}")
        values = {}
        for key, default in (("temperature", 1.0), ("lean", 0.0)):
            v = obj.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise SteerError("must be a number", f"{field}.{key}")
            values[key] = float(v)
        try:
            return cls(**values)
        except SteerError as exc:
            leaf = exc.field.split(".")[-1] if exc.field else None
            raise SteerError(exc.message, f"{field}.{leaf}" if leaf else field) from None


IDENTITY = Calibration()


def recorded_calibration(metrics: Any) -> Calibration:
    """The calibration a build recorded in a profile's metrics (`metrics["calibration"]`); the identity for
    a profile built without one (fixed layer and strength)."""
    recorded = metrics.get("calibration") if isinstance(metrics, dict) else None
    if recorded is None:
        return IDENTITY
    return Calibration.from_json({k: recorded[k] for k in ("temperature", "lean") if k in recorded})


class _Sample:
    """A sample's distributions and targets as padded arrays, for fast repeated alignment."""

    def __init__(self, items: Sequence[OpinionItem], dists: Sequence[Distribution]) -> None:
        if len(items) != len(dists) or not items:
            raise ValueError("need one distribution per item, and at least one item")
        k = max(len(it.options) for it in items)
        n = len(items)
        self.log_p = np.full((n, k), -np.inf)
        self.z = np.zeros((n, k))
        self.q_sorted = np.zeros((n, k))
        self.order = np.zeros((n, k), dtype=int)
        self.gaps = np.zeros((n, k - 1))  # normalized by each item's span
        self.flat = np.zeros(n, dtype=bool)  # every option at one position: alignment is 1 - TV
        self.q = np.zeros((n, k))
        for r, (it, p) in enumerate(zip(items, dists, strict=True)):
            m = len(it.options)
            o = np.asarray(it.ordinal, dtype=float)
            span = o.max() - o.min()
            self.log_p[r, :m] = np.log(np.maximum(np.asarray(p, dtype=float), _FLOOR))
            self.z[r, :m] = ordinal_z(it.ordinal)
            order = np.argsort(o, kind="stable")
            self.order[r] = np.concatenate([order, np.arange(m, k)])
            self.q[r, :m] = it.target
            self.q_sorted[r] = self.q[r, self.order[r]]
            if span > 0:
                self.gaps[r, :m - 1] = np.diff(o[order]) / span
            else:
                self.flat[r] = True

    def calibrated(self, log_t: float, lean: float) -> np.ndarray:
        logits = self.log_p / math.exp(log_t) + lean * self.z
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def alignment(self, p: np.ndarray) -> np.ndarray:
        p_sorted = np.take_along_axis(p, self.order, axis=1)
        cdf_gap = np.abs(np.cumsum(p_sorted - self.q_sorted, axis=1)[:, :-1])
        out = 1.0 - (cdf_gap * self.gaps).sum(axis=1)
        if self.flat.any():
            out[self.flat] = 1.0 - 0.5 * np.abs(p[self.flat] - self.q[self.flat]).sum(axis=1)
        return out


def sample_alignment(items: Sequence[OpinionItem], dists: Sequence[Distribution]) -> np.ndarray:
    """Per-item alignment (1 - W1 / span), computed for the whole sample at once."""
    s = _Sample(items, dists)
    return s.alignment(np.exp(s.log_p))


def fit_calibration(items: Sequence[OpinionItem], dists: Sequence[Distribution], lean: bool = True) -> Calibration:
    """The temperature (and lean, when `lean`) that minimize the mean cross-entropy of the targets under the
    calibrated `dists`. The logits `log(p) / T + b z` are linear in (1/T, b), so the loss is convex: one
    optimum, found the same way whatever scale the readings come in (a reading flattened by T0 gets T / T0)."""
    s = _Sample(items, dists)
    log_p = np.where(np.isfinite(s.log_p), s.log_p, 0.0)
    valid = np.isfinite(s.log_p)
    weight = 1.0 / len(items)

    def loss(x: np.ndarray) -> tuple[float, np.ndarray]:
        inv_t, b = float(x[0]), float(x[1]) if lean else 0.0
        logits = np.where(valid, inv_t * log_p + b * s.z, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        probs = np.exp(logits - lse[:, None])
        ce = float((s.q * (lse[:, None] - np.where(valid, logits, 0.0))).sum() * weight)
        grad_t = float(((probs - s.q) * log_p).sum() * weight)
        grad_b = float(((probs - s.q) * s.z).sum() * weight)
        return ce, np.array([grad_t, grad_b] if lean else [grad_t])

    bounds = [(1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE)] + ([(-MAX_LEAN, MAX_LEAN)] if lean else [])
    x0 = np.array([1.0, 0.0] if lean else [1.0])
    result = minimize(loss, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-12, "gtol": 1e-9})
    inv_t = float(np.clip(result.x[0], *bounds[0]))
    b = float(np.clip(result.x[1], -MAX_LEAN, MAX_LEAN)) if lean else 0.0
    return Calibration(temperature=round(1.0 / inv_t, 6), lean=round(b, 6))


def calibrate_out_of_fold(items: Sequence[OpinionItem], dists: Sequence[Distribution],
                          folds: Sequence[Sequence[int]], lean: bool = True) -> list[np.ndarray]:
    """Each fold's distributions calibrated by a fit on the other folds: no item's own target tunes its map."""
    out: list[np.ndarray | None] = [None] * len(items)
    for fold in folds:
        held = set(fold)
        rest = [i for i in range(len(items)) if i not in held]
        cal = fit_calibration([items[i] for i in rest], [dists[i] for i in rest], lean)
        for i in fold:
            out[i] = cal.apply(dists[i], items[i].ordinal)
    if any(p is None for p in out):
        raise ValueError("the folds must cover every item")
    return [p for p in out if p is not None]


def choose_calibration(items: Sequence[OpinionItem], dists: Sequence[Distribution],
                       folds: Sequence[Sequence[int]]) -> tuple[Calibration, list[np.ndarray], bool]:
    """Temperature alone, or temperature and lean, whichever aligns better out of fold. Returns the choice
    fitted on every item (what ships), the out-of-fold calibrated distributions (what judges it) and
    whether the lean is fitted."""
    by_lean = {lean: calibrate_out_of_fold(items, dists, folds, lean) for lean in (False, True)}
    scores = {lean: float(sample_alignment(items, d).mean()) for lean, d in by_lean.items()}
    lean = scores[True] > scores[False]
    return fit_calibration(items, dists, lean), by_lean[lean], lean


def blend_calibration(parts: Sequence[tuple[Calibration, float]]) -> Calibration:
    """The calibration of a blend of profiles: 1/T and the lean averaged with the blend's |weights| (the
    maps are log-linear, so this pools them on the same scale the steering blends on); identity for none."""
    total = sum(abs(w) for _, w in parts)
    if total == 0:
        return IDENTITY
    inv_t = sum(abs(w) / c.temperature for c, w in parts) / total
    lean = sum(abs(w) * c.lean for c, w in parts) / total
    return Calibration(temperature=1.0 / inv_t, lean=lean)


def blend_per_question(parts: Sequence[tuple[Calibration, float]],
                       leans: Sequence[Sequence[float | None]]) -> list[Calibration]:
    """Each question's calibration of a blend whose profiles may read their lean off the question (a question
    lean, `steer_core.question_lean`): `leans[q][k]` replaces part k's lean for question q (None: its own)."""
    return [blend_calibration([(c if lean is None else Calibration(c.temperature, lean), w)
                               for (c, w), lean in zip(parts, row, strict=True)]) for row in leans]
