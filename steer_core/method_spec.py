"""What a steering method is (`Method`) and the checks of the params every build takes (layer, strength,
positions, orders), in one place for the library's builds and the service's requests.

Torch-free: the method modules build their `Method` here without importing the registry
(`steer_core.methods`, which imports them), and the service checks a build request by the same rules
`build_profile` applies without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from steer_core.errors import SteerError

if TYPE_CHECKING:
    from torch import Tensor

    from steer_core.data import OpinionItem
    from steer_core.models import LanguageModel
    from steer_core.profile import Profile
    from steer_core.steering import Intervention

POSITIONS: tuple[str, ...] = ("prompt", "last", "all")
ORDERS = (1, 2)  # fit and read each item in its own option order only, or also reversed (read: averaged)
DEFAULT_ORDERS = 2

# Fit at several layers at once (one forward/backward pass serves all of them); returns one profile per
# layer with strength 1.0. Arguments: model, items, layers, validated method params, positions.
# (A string: the types are imported for type checking only.)
FitFn: TypeAlias = ("Callable[[LanguageModel, Sequence[OpinionItem], Sequence[int], dict[str, Any], str], "
                    "dict[int, Profile]]")


def default_layers(lm: LanguageModel) -> list[int]:
    """A few middle layers: where steering usually works best for small and large models alike."""
    n = lm.num_layers
    return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in (0.35, 0.5, 0.65)})


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
    layers: Callable[[LanguageModel], list[int]] = default_layers
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


class MethodRules(Protocol):
    """What a build's params are checked by (`check_build_params`): a `Method`, or a built-in method's
    torch-free entry (`steer_core.method_names.MethodEntry`, what the service checks requests by)."""

    @property
    def name(self) -> str: ...

    @property
    def positions(self) -> tuple[str, ...]: ...

    @property
    def check_params(self) -> Callable[[dict[str, Any]], dict[str, Any]]: ...


def no_params(params: dict[str, Any]) -> dict[str, Any]:
    """`check_params` of a method without params of its own."""
    if params:
        raise SteerError(f"unknown parameter {next(iter(params))!r}", f"params.{next(iter(params))}")
    return {}


def check_positions(positions: Any, method: MethodRules | None = None, field: str = "positions") -> str:
    """`positions` checked: one of `POSITIONS`, and one `method`'s profiles can steer when given; errors name
    `field`."""
    if method is None:
        return check_steerable(positions, "", POSITIONS, field)
    return check_steerable(positions, method.name, method.positions, field)


def check_steerable(positions: Any, method: str, steerable: Sequence[str], field: str = "positions") -> str:
    """`positions` checked: one of `POSITIONS`, and one of `steerable`, the positions the profiles of the
    method named `method` can steer (for a caller that knows them without the method itself); errors name
    `field`."""
    if positions not in POSITIONS:
        raise SteerError(f"must be one of {', '.join(POSITIONS)}", field)
    if positions not in steerable:
        raise SteerError(f"{method} profiles steer {' or '.join(steerable)} positions only, not {positions!r}",
                         field)
    return positions


def check_orders(orders: Any) -> int:
    if isinstance(orders, bool) or orders not in ORDERS:
        raise SteerError(f"must be one of {', '.join(map(str, ORDERS))} (2: also fit on each item with its "
                         "options reversed, and judge on both orders' reads averaged)", "params.orders")
    return int(orders)


def check_layer_index(layer: Any, field: str = "params.layer") -> int:
    """A layer index whatever the model (a model's own range: `LanguageModel.check_layer`)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SteerError("must be a layer index (an integer >= 0)", field)
    return layer


def check_strength(strength: Any, field: str = "params.strength") -> float:
    """A strength: a finite number >= 0, returned as given (an integer stays one)."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength) \
            or strength < 0:
        raise SteerError("must be a finite number >= 0", field)
    return strength


def check_build_params(method: MethodRules, params: Mapping[str, Any],
                       check_layer: Callable[[Any, str], int] = check_layer_index) -> dict[str, Any]:
    """A build's params checked: `layer`, `strength`, `orders` and `positions` (the params every method
    takes, kept only where given: an absent layer or strength is searched) and the method's own params
    (`method.check_params`, with its defaults filled in, so `{}` and the defaults spelled out are the same
    build). `check_layer` checks a layer (default: any index; a build passes its model's range check).
    Errors name `params.<name>`. The service checks a request by the same function, given the method's
    torch-free entry (`steer_core.method_names.check_method_build_params`)."""
    params = dict(params)
    fixed: dict[str, Any] = {}
    if "layer" in params:
        fixed["layer"] = check_layer(params.pop("layer"), "params.layer")
    if "strength" in params:
        fixed["strength"] = check_strength(params.pop("strength"))
    if "orders" in params:
        fixed["orders"] = check_orders(params.pop("orders"))
    if "positions" in params:
        fixed["positions"] = check_positions(params.pop("positions"), method, "params.positions")
    try:
        own = method.check_params(params)
    except SteerError as exc:
        field = exc.field or "params"
        raise SteerError(exc.message, field if field.startswith("params") else f"params.{field}") from None
    return {**own, **fixed}
