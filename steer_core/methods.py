"""The registry of steering methods. Each method module registers one `Method` on import."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.steering import POSITIONS, Intervention

if TYPE_CHECKING:
    from torch import Tensor

# Fit at several layers at once (one forward/backward pass serves all of them); returns one profile per
# layer with strength 1.0. Arguments: model, items, layers, validated method params, positions.
FitFn = Callable[[LanguageModel, Sequence[OpinionItem], Sequence[int], dict[str, Any], str], dict[int, Profile]]


@dataclass(frozen=True)
class Method:
    name: str
    fit: FitFn
    # The profile as something the hooks can apply, at the profile's own strength.
    intervention: Callable[[Profile, LanguageModel], Intervention]
    # Candidate strengths for the held-out search, given a profile fitted on the training split.
    strengths: Callable[[Profile, LanguageModel], list[float]]
    # Validate the method's own params (not layer/strength/positions); return them with defaults filled.
    check_params: Callable[[dict[str, Any]], dict[str, Any]]
    default_positions: str = "prompt"
    # The positions its profiles can steer (a build, a profile request or a chat override asking for others
    # is refused naming `positions`).
    positions: tuple[str, ...] = POSITIONS
    # Layers searched when the caller gives none.
    layers: Callable[[LanguageModel], list[int]] = lambda lm: default_layers(lm)
    # Built on the `gpu` queue while a GPU worker listens: methods that train or follow gradients. DiffMean
    # (one forward pass per item) stays on the CPU queue and leaves the GPU to them.
    prefers_gpu: bool = False
    # The displacement at the profile's strength when it is one vector for every input and position (what
    # a llama.cpp control vector can carry); None, or returning None, where it depends on the input.
    constant_vector: Callable[[Profile], Tensor | None] | None = None
    # The method's own hyperparameter settings the held-out search compares beside layers and strengths:
    # checked params -> one full params dict per setting (default: the params alone).
    grid: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda params: [params]
    # Fit every setting of `grid`, one {layer: profile} per setting; None: one `fit` per setting. For a
    # method whose settings share work (LoRA's training lengths are checkpoints of one run).
    fit_grid: Callable[[LanguageModel, Sequence[OpinionItem], Sequence[int], list[dict[str, Any]], str],
                       list[dict[int, Profile]]] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SteerError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}", "method") from None


def default_layers(lm: LanguageModel) -> list[int]:
    """A few middle layers: where steering usually works best for small and large models alike."""
    n = lm.num_layers
    return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in (0.35, 0.5, 0.65)})


def intervention(profile: Profile, lm: LanguageModel) -> Intervention:
    """The profile, checked against `lm`, as an intervention at its own strength."""
    profile.check_model(lm)
    return get_method(profile.method).intervention(profile, lm)


def check_positions(positions: Any, method: Method | None = None, field: str = "positions") -> str:
    """`positions` checked: one of `POSITIONS`, and one `method`'s profiles can steer when given; errors name
    `field`."""
    if positions not in POSITIONS:
        raise SteerError(f"must be one of {', '.join(POSITIONS)}", field)
    if method is not None and positions not in method.positions:
        raise SteerError(f"{method.name} profiles steer {' or '.join(method.positions)} positions only, not "
                         f"{positions!r}", field)
    return positions


def fit_settings(method: Method, lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int],
                 settings: list[dict[str, Any]], positions: str) -> list[dict[int, Profile]]:
    """{layer: profile} for each of `settings` (the method's `grid`), each profile at strength 1.0."""
    if method.fit_grid is not None:
        return method.fit_grid(lm, items, layers, settings, positions)
    return [method.fit(lm, items, layers, params, positions) for params in settings]


def no_params(params: dict[str, Any]) -> dict[str, Any]:
    if params:
        raise SteerError(f"unknown parameter {next(iter(params))!r}", f"params.{next(iter(params))}")
    return {}


# The built-in methods register themselves on import. Importing them here means every user of the registry
# sees all of them, whichever steer_core module it imported first.
from steer_core import cold_fd, cold_kernel, diffmean, lora, odesteer  # noqa: E402, F401, I001
