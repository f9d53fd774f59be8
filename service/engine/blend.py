"""How a blend of profiles calibrates its answer distributions: one function for `/v1/score` and the
offline comparison (`worker.tasks`), so both apply a blend's calibrations the same way. Torch-free.

Each profile carries an output calibration (`steer_core.calibration`); a blend pools them with its
weights (`blend_calibration`). A profile with a question lean reads each question's own lean off its
prompt; that lean replaces the profile's recorded one in the blend, question by question
(`blend_per_question`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from steer_core.data import OpinionItem

if TYPE_CHECKING:
    from steer_core.calibration import Calibration


@dataclass(frozen=True)
class CalibratedBlend:
    """Answer distributions after the blend's calibration, and which calibration each item got."""

    distributions: list[np.ndarray]
    calibrations: list[Calibration]  # per item
    calibration: Calibration  # the blend's pooled calibration (its profiles' recorded leans)
    per_question: bool  # a question lean set some item's lean


def calibrate_blend(items: Sequence[OpinionItem], distributions: Sequence[np.ndarray],
                    leans: Sequence[Sequence[float | None]],
                    parts: Sequence[tuple[Calibration, float]]) -> CalibratedBlend:
    """`distributions` (one per item, read under the blend) mapped by the blend's calibration.

    `parts` are the blend's profiles' calibrations with their weights (none: the identity); `leans[i][k]` is
    the lean part k's question lean read off item i's prompt (None: part k's own lean applies).
    """
    from steer_core.calibration import blend_calibration, blend_per_question  # scipy: imported when first used

    calibration = blend_calibration(parts)
    per_question = any(lean is not None for row in leans for lean in row) and bool(parts)
    calibrations = blend_per_question(parts, leans) if per_question else [calibration] * len(items)
    return CalibratedBlend(
        distributions=[c.apply(p, item.ordinal) for c, p, item in zip(calibrations, distributions, items,
                                                                       strict=True)],
        calibrations=calibrations, calibration=calibration, per_question=per_question)
