"""The registry of steering methods: the built-in methods' `Method`s, by name.

Each method module defines its `METHOD` (a `steer_core.method_spec.Method`) and imports nothing from here;
the table below imports them, so every user of the registry sees all of them, whichever steer_core module
it imported first. `register` adds another (tests add stubs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steer_core import cold_fd, cold_kernel, diffmean, lora, odesteer
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.method_spec import FitFn, Method, check_positions, default_layers, no_params
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.steering import Intervention

# Names importable from here as before the split: the registry's users need not know where each is defined.
__all__ = ["METHODS", "FitFn", "Method", "check_positions", "default_layers", "fit_settings", "get_method",
           "intervention", "no_params", "register"]

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (cold_fd, cold_kernel, diffmean, lora, odesteer)}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SteerError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}", "method") from None


def intervention(profile: Profile, lm: LanguageModel) -> Intervention:
    """The profile, checked against `lm`, as an intervention at its own strength."""
    profile.check_model(lm)
    return get_method(profile.method).intervention(profile, lm)


def fit_settings(method: Method, lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int],
                 settings: list[dict[str, Any]], positions: str) -> list[dict[int, Profile]]:
    """{layer: profile} for each of `settings` (the method's `grid`), each profile at strength 1.0."""
    if method.fit_grid is not None:
        return method.fit_grid(lm, items, layers, settings, positions)
    return [method.fit(lm, items, layers, params, positions) for params in settings]
