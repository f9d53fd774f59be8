"""The built-in steering methods as the torch-free side knows them, without importing the methods (they
import torch): each one's name, the positions its profiles can steer, its params check and whether its
builds prefer the GPU queue. For the service's request checks, queue choice and pages, which stay torch-free.
`steer_core.methods` is the registry itself; each method module builds its `Method` from its entry here
(`MethodEntry.fields`: name, positions, params check, GPU preference), and `tests/test_import_seams.py`
checks that the table and the registry agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from steer_core.errors import SteerError
from steer_core.method_params import (
    check_cold_fd_params,
    check_cold_kernel_params,
    check_lora_params,
    check_odesteer_params,
)
from steer_core.method_spec import POSITIONS, check_build_params, check_layer_index, check_steerable, no_params


@dataclass(frozen=True)
class MethodEntry:
    """A built-in method's `Method` fields that need no torch (same names, same values)."""

    name: str
    positions: tuple[str, ...]
    check_params: Callable[[dict[str, Any]], dict[str, Any]]
    prefers_gpu: bool = False

    def fields(self) -> dict[str, Any]:
        """These fields as `steer_core.method_spec.Method` keywords: a method module builds its `Method` from
        its entry, so each of these facts is written once."""
        return {"name": self.name, "positions": self.positions, "check_params": self.check_params,
                "prefers_gpu": self.prefers_gpu}


METHOD_TABLE: dict[str, MethodEntry] = {entry.name: entry for entry in (
    MethodEntry("cold_fd", ("prompt",), check_cold_fd_params, prefers_gpu=True),
    MethodEntry("cold_kernel", POSITIONS, check_cold_kernel_params, prefers_gpu=True),
    MethodEntry("diffmean", POSITIONS, no_params),
    MethodEntry("lora", ("all",), check_lora_params, prefers_gpu=True),
    MethodEntry("odesteer", POSITIONS, check_odesteer_params, prefers_gpu=True),
)}
# Each built-in method -> the positions its profiles can steer (`Method.positions`).
METHOD_POSITIONS: dict[str, tuple[str, ...]] = {name: entry.positions for name, entry in METHOD_TABLE.items()}
METHOD_NAMES: tuple[str, ...] = tuple(sorted(METHOD_TABLE))
# Not a steering method: a profile request with this method is fitted against a population
# (`steer_core.population_build.fit_subject_profile`); its profile steers as a DiffMean one does.
POPULATION_METHOD = "population"


def method_entry(method: str) -> MethodEntry:
    """The built-in method named `method`; an unknown name is refused as `steer_core.methods.get_method`
    refuses it (naming `method`)."""
    try:
        return METHOD_TABLE[method]
    except KeyError:
        raise SteerError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}", "method") from None


def check_method_positions(positions: Any, method: str, field: str = "positions") -> str:
    """`positions` checked as `steer_core.method_spec.check_positions` checks it for `method`'s profiles (one
    of `POSITIONS`, and one they can steer; profiles fitted against a population steer as DiffMean ones do);
    errors name `field`."""
    allowed = method_entry("diffmean" if method == POPULATION_METHOD else method).positions
    return check_steerable(positions, method, allowed, field)


def check_method_build_params(method: str, params: Mapping[str, Any],
                              check_layer: Callable[[Any, str], int] = check_layer_index) -> dict[str, Any]:
    """A build request's params checked for the built-in method named `method`, as
    `steer_core.method_spec.check_build_params(get_method(method), params)` checks them (the same function,
    given the method's entry here): layer, strength, orders and positions where given, and the method's own
    params with its defaults filled in. Errors name `params.<name>` (`method` for an unknown method)."""
    return check_build_params(method_entry(method), params, check_layer)
