"""A question-conditional lean: an output calibration whose ordinal lean is read off the question.

The plain calibration (`steer_core.calibration`) leans every question's answers the same way along the
ordinal scale. Groups differ from question to question: on one question the group sits above the model,
on the next below it, and one lean (or one steering vector added to every prompt) can only follow their
average. A `QuestionLean` predicts each question's own lean from the model's reading of its prompt: a ridge
probe from the prompt's hidden state after one block (averaged over the prompt's tokens) to the lean.

A build fits it on its items: at the shipped temperature, each item's own best lean (`item_leans`: the
lean that minimizes the target's cross-entropy), then the probe from the items' states to those leans,
its block and penalty chosen by the ridge's leave-one-out error (`fit_question_lean`). It ships only when
it beats the plain calibration out of fold, and only samples of `build.MIN_LEAN_SAMPLE` items or more are
considered (`steer_core.build`). What it needs is items: `bench/group_signal.py` measured it built on 300
OpinionsQA items at +0.005 to +0.020 alignment over the calibrated model for six groups, and built on 20 or
50 items the out-of-fold choice shipped leans that lost. Output readers apply it (`/v1/score`,
`pluristeer eval`, the offline comparison); free text cannot be leaned, so chat does not.

The probe is plain numbers: a block index, the standardization (center, scale), a weight per hidden unit
and an intercept; stored in the profile's safetensors body and JSON header, never pickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.linear_model import RidgeCV
from torch import Tensor

from steer_core.calibration import MAX_LEAN, Calibration, fit_calibration, ordinal_z
from steer_core.data import Distribution, OpinionItem
from steer_core.errors import SteerError

# Ridge penalties tried (on standardized states); the leave-one-out error picks one per block.
PENALTIES = np.logspace(-1, 5, 13)
TENSOR_NAMES = ("question_lean.center", "question_lean.scale", "question_lean.weight")
MIN_LEAN_ITEMS = 3  # a probe's fit needs this many items
_FLOOR = 1e-12


@dataclass(frozen=True, eq=False)
class QuestionLean:
    """`lean = ((state - center) / scale) . weight + intercept`, clipped to the calibration's lean bounds;
    `state` is the prompt's hidden state after block `layer`, averaged over its tokens."""

    layer: int
    center: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    intercept: float

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SteerError("must be an integer >= 0", "question_lean.layer")
        if not math.isfinite(self.intercept):
            raise SteerError("must be a finite number", "question_lean.intercept")
        shape = np.shape(self.weight)
        for name in ("center", "scale", "weight"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or value.shape != shape or not np.isfinite(value).all():
                raise SteerError(f"must be a finite vector of {shape[0] if shape else '?'} numbers",
                                 f"question_lean.{name}")
        if not (np.asarray(self.scale) > 0).all():
            raise SteerError("must be > 0 everywhere", "question_lean.scale")

    @property
    def hidden_size(self) -> int:
        return int(np.shape(self.weight)[0])

    def leans(self, states: np.ndarray) -> np.ndarray:
        """The lean of each prompt, from its states after block `layer`: (prompts, hidden) -> (prompts,)."""
        z = (np.asarray(states, dtype=float) - self.center) / self.scale
        return np.clip(z @ self.weight + self.intercept, -MAX_LEAN, MAX_LEAN)

    def calibrations(self, temperature: float, states: np.ndarray) -> list[Calibration]:
        """Each prompt's output calibration: `temperature` and the lean read off its states."""
        return [Calibration(temperature, float(lean)) for lean in self.leans(states)]

    def tensors(self) -> dict[str, Tensor]:
        return {name: torch.tensor(np.asarray(value), dtype=torch.float32)
                for name, value in zip(TENSOR_NAMES, (self.center, self.scale, self.weight), strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "intercept": self.intercept}

    @classmethod
    def from_parts(cls, meta: Any, tensors: Mapping[str, Tensor]) -> QuestionLean:
        """Validate a profile's stored parts (`{"layer", "intercept"}` and the three tensors)."""
        if not isinstance(meta, dict) or set(meta) != {"layer", "intercept"}:
            raise SteerError("must be an object with exactly 'layer' and 'intercept'", "question_lean")
        if isinstance(meta["intercept"], bool) or not isinstance(meta["intercept"], int | float):
            raise SteerError("must be a number", "question_lean.intercept")
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        if missing:
            raise SteerError(f"tensor {missing[0]!r} is missing", "question_lean")
        center, scale, weight = (tensors[name].double().numpy() for name in TENSOR_NAMES)
        return cls(meta["layer"], center, scale, weight, float(meta["intercept"]))


def item_leans(items: Sequence[OpinionItem], dists: Sequence[Distribution], temperature: float) -> np.ndarray:
    """Each item's own best lean at `temperature`: the lean that minimizes its target's cross-entropy under
    its distribution calibrated (bounded by the calibration's lean bounds)."""
    out = np.zeros(len(items))
    for i, (item, p) in enumerate(zip(items, dists, strict=True)):
        z = ordinal_z(item.ordinal)
        if not z.any():
            continue  # every option at one position: a lean changes nothing; 0 is the neutral one
        log_p = np.log(np.maximum(np.asarray(p, dtype=float), _FLOOR)) / temperature
        out[i] = _best_lean(log_p, z, np.asarray(item.target, dtype=float))
    return out


def _best_lean(log_p: np.ndarray, z: np.ndarray, target: np.ndarray) -> float:
    def cross_entropy(lean: float) -> float:
        logits = log_p + lean * z
        top = logits.max()
        return float(top + np.log(np.exp(logits - top).sum()) - target @ logits)

    return float(minimize_scalar(cross_entropy, bounds=(-MAX_LEAN, MAX_LEAN), method="bounded").x)


def fit_question_lean(states: Mapping[int, np.ndarray], leans: np.ndarray) -> QuestionLean:
    """The probe from prompts' states to their `leans`, on the block (a key of `states`: block -> (prompts,
    hidden)) and penalty with the least leave-one-out error."""
    leans = np.asarray(leans, dtype=float)
    if not states or len(leans) < MIN_LEAN_ITEMS:
        raise SteerError(f"a question lean needs states of at least one block and at least {MIN_LEAN_ITEMS} items",
                         "items")
    best: tuple[float, QuestionLean] | None = None
    for layer, x in states.items():
        center, scale = x.mean(0), x.std(0) + 1e-6
        ridge = RidgeCV(alphas=PENALTIES).fit((x - center) / scale, leans)  # efficient leave-one-out
        error = -float(ridge.best_score_)  # its mean squared leave-one-out error
        if best is None or error < best[0]:
            best = (error, QuestionLean(int(layer), center, scale, ridge.coef_, float(ridge.intercept_)))
    assert best is not None
    return best[1]


def fit_for_sample(items: Sequence[OpinionItem], dists: Sequence[Distribution], states: Mapping[int, np.ndarray],
                   temperature: float) -> QuestionLean:
    """The question lean of a sample read as `dists` (states: block -> (items, hidden)), at `temperature`."""
    return fit_question_lean(states, item_leans(items, dists, temperature))


def lean_out_of_fold(items: Sequence[OpinionItem], dists: Sequence[Distribution], states: Mapping[int, np.ndarray],
                     folds: Sequence[Sequence[int]], lean: bool) -> list[np.ndarray]:
    """Each fold's distributions under a question lean built on the other folds alone: their calibration (the
    temperature, and the lean when `lean`, as `calibrate_out_of_fold` fits it), their items' own leans at that
    temperature, and the probe from their states."""
    out: list[np.ndarray | None] = [None] * len(items)
    for fold in folds:
        held = set(fold)
        rest = [i for i in range(len(items)) if i not in held]
        temperature = fit_calibration([items[i] for i in rest], [dists[i] for i in rest], lean).temperature
        probe = fit_for_sample([items[i] for i in rest], [dists[i] for i in rest],
                               {layer: x[rest] for layer, x in states.items()}, temperature)
        judged = probe.calibrations(temperature, states[probe.layer][list(fold)])
        for i, calibration in zip(fold, judged, strict=True):
            out[i] = calibration.apply(dists[i], items[i].ordinal)
    if any(p is None for p in out):
        raise ValueError("the folds must cover every item")
    return [p for p in out if p is not None]
