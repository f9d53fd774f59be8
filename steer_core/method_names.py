"""The built-in steering methods' names, and the positions each one's profiles can steer, without importing the
methods (they import torch): for the service's request checks and pages, which stay torch-free.
`steer_core.methods` is the registry itself; `tests/test_import_seams.py` checks that the two agree.
"""

from __future__ import annotations

from typing import Any

from steer_core.errors import SteerError
from steer_core.method_spec import POSITIONS

# Each built-in method -> the positions its profiles can steer (`Method.positions`).
METHOD_POSITIONS: dict[str, tuple[str, ...]] = {
    "cold_fd": ("prompt",),
    "cold_kernel": POSITIONS,
    "diffmean": POSITIONS,
    "lora": ("all",),
    "odesteer": POSITIONS,
}
METHOD_NAMES: tuple[str, ...] = tuple(sorted(METHOD_POSITIONS))
# Not a steering method: a profile request with this method is fitted against a population
# (`steer_core.population_build.fit_subject_profile`); its profile steers as a DiffMean one does.
POPULATION_METHOD = "population"


def check_method_positions(positions: Any, method: str, field: str = "positions") -> str:
    """`positions` checked as `steer_core.method_spec.check_positions` checks it for `method`'s profiles (one
    of `POSITIONS`, and one they can steer; profiles fitted against a population steer as DiffMean ones do);
    errors name `field`."""
    allowed = METHOD_POSITIONS.get("diffmean" if method == POPULATION_METHOD else method)
    if allowed is None:
        raise SteerError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}", "method")
    if positions not in POSITIONS:
        raise SteerError(f"must be one of {', '.join(POSITIONS)}", field)
    if positions not in allowed:
        raise SteerError(f"{method} profiles steer {' or '.join(allowed)} positions only, not {positions!r}", field)
    return positions
