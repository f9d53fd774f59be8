"""What a profile does, said plainly.

A build's numbers can flatter: a small instruct model is over-confident on opinion questions, so a profile
that only flattens its answers (a calibration to a high temperature, or steering that scrambles them)
"raises alignment" for every group. A verdict therefore names what the profile serves and compares it with
the two baselines that flattening alone reaches:

- `improved`: what ships beats both the calibrated unsteered model and uniform answers (1/n per option) by
  more than one paired standard error each, out of fold;
- `serves`: "steering" (a steering acts on generation), "calibrated model" (strength 0: the unsteered model
  with its output calibration, which acts on option distributions only) or "unsteered model";
- `near_uniform`: the answers it gives sit within NEAR_UNIFORM_TV mean total variation of 1/n per option;
- `summary`: one sentence with the numbers, for the API document, `/v1/models`, the CLI and the console.

`generation_gain` is what chat gets: the steering alone (no calibration, no question lean: those act on
option distributions, which free text never has), read one option order at a time as a chat prompt is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from steer_core.calibration import sample_alignment
from steer_core.data import Distribution, OpinionItem
from steer_core.evaluation import Estimate, paired_difference

# Mean total variation from 1/n per option under which a profile's answers count as "near uniform" (a
# calibration to temperature 50 on the default model sits at about 0.01; the unsteered model at about 0.4).
NEAR_UNIFORM_TV = 0.05
Serves = Literal["steering", "calibrated model", "unsteered model"]
ORDER_NAMES = ("original", "reversed")


def distance_from_uniform(dists: Sequence[Distribution]) -> float:
    """Mean total variation between each distribution and 1/n over its options."""
    if not dists:
        raise ValueError("need at least one distribution")
    return float(np.mean([0.5 * np.abs(np.asarray(p, dtype=float) - 1.0 / len(p)).sum() for p in dists]))


def above(gain: Estimate) -> bool:
    """A gain larger than its standard error (a single item has none: never)."""
    return bool(np.isfinite(gain.standard_error) and gain.mean > gain.standard_error)


@dataclass(frozen=True)
class Verdict:
    improved: bool
    serves: Serves
    near_uniform: bool
    summary: str
    gain_vs_calibrated: Estimate
    gain_vs_uniform: Estimate
    distance_from_uniform: float

    def to_json(self) -> dict[str, Any]:
        return {"improved": self.improved, "serves": self.serves, "near_uniform": self.near_uniform,
                "summary": self.summary, "gain_vs_calibrated": self.gain_vs_calibrated.to_json(),
                "gain_vs_uniform": self.gain_vs_uniform.to_json(),
                "distance_from_uniform": round(self.distance_from_uniform, 6)}


def judge(shipped: Sequence[float] | np.ndarray, calibrated: Sequence[float] | np.ndarray,
          uniform: Sequence[float] | np.ndarray, answers: Sequence[Distribution], serves: Serves) -> Verdict:
    """The verdict on a profile from per-item alignments (out of fold) of what it ships and of the two
    baselines, and the answers it ships (to tell whether they are near uniform)."""
    over_calibrated = paired_difference(shipped, calibrated)
    over_uniform = paired_difference(shipped, uniform)
    distance = distance_from_uniform(answers)
    near_uniform = distance < NEAR_UNIFORM_TV
    improved = above(over_calibrated) and above(over_uniform)
    parts = [{"steering": "serves its steering (with its output calibration)",
              "calibrated model": "serves the calibrated unsteered model (no steering beat it on held-out items)",
              "unsteered model": "serves the unsteered model"}[serves]]
    if near_uniform:
        parts.append(f"answers near uniform (mean total variation from 1/n: {distance:.3f})")
    parts.append(f"{'improved' if improved else 'not improved'}: {over_calibrated} over calibrated, "
                 f"{over_uniform} over uniform (out of fold; improved means both above one standard error)")
    return Verdict(improved, serves, near_uniform, "; ".join(parts), over_calibrated, over_uniform, distance)


def generation_gain(items: Sequence[OpinionItem], steered_by_order: Sequence[Sequence[Distribution]],
                    unsteered_by_order: Sequence[Sequence[Distribution]],
                    contrast: Sequence[OpinionItem] | None = None) -> dict[str, Any]:
    """What chat gets: the steering's own gain in alignment over the unsteered model, both read one option
    order at a time (lists of per-order reads mapped back to the items' order), each item's gain averaged over
    the orders; per order too, and the specificity (own gain minus the contrast's) when items carry one."""
    def per_item(sample: Sequence[OpinionItem], reads: Sequence[Sequence[Distribution]]) -> list[np.ndarray]:
        return [sample_alignment(sample, r) for r in reads]

    own = per_item(items, steered_by_order)
    base = per_item(items, unsteered_by_order)
    out: dict[str, Any] = {
        "gain_vs_unsteered": paired_difference(np.mean(own, axis=0), np.mean(base, axis=0)).to_json(),
        "by_order": {ORDER_NAMES[k]: paired_difference(a, b).to_json() for k, (a, b) in enumerate(zip(own, base,
                                                                                                       strict=True))},
        "specificity": None,
    }
    if contrast is not None:
        own_gain = np.mean(own, axis=0) - np.mean(base, axis=0)
        other_gain = np.mean(per_item(contrast, steered_by_order), axis=0) - np.mean(
            per_item(contrast, unsteered_by_order), axis=0)
        out["specificity"] = paired_difference(own_gain, other_gain).to_json()
    return out
