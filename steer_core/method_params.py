"""The built-in methods' own params checks (`Method.check_params`) and the limits and defaults they apply,
torch-free: each method module passes its check from here to its `Method`, and `steer_core.method_names`
lists the same functions for the service, which checks a build request by these rules without importing
the methods (they import torch). One definition of each rule, read by both sides.

The methods' params are described in their modules' docstrings (`steer_core.cold_fd`, `cold_kernel`,
`lora`, `odesteer`); DiffMean takes none (`steer_core.method_spec.no_params`). Each check returns the
params with the defaults filled in, and raises `SteerError` naming `params.<name>`.
"""

from __future__ import annotations

import math
from typing import Any

from steer_core.errors import SteerError

# ---------------------------------------------------------------------------------------------- shared

LOSSES: tuple[str, ...] = ("ce", "dpo", "sft", "contrast")


def check_loss(loss: object, field: str = "params.loss") -> str:
    """A loss `steer_core.losses` computes."""
    if loss not in LOSSES:
        raise SteerError(f"must be one of {', '.join(LOSSES)}", field)
    return str(loss)


def _finite_number(x: Any) -> bool:
    """A number, not a bool, neither NaN nor infinite (an integer too large for a float counts as finite)."""
    return not isinstance(x, bool) and isinstance(x, int | float) and x == x and abs(x) != math.inf


def _no_more(params: dict[str, Any]) -> None:
    """Refuse what is left of `params` once a check took what it knows."""
    if params:
        name = next(iter(params))
        raise SteerError(f"unknown parameter {name!r}", f"params.{name}")


# ---------------------------------------------------------------------------------------------- COLD-FD

COLD_FD_MODES: tuple[str, ...] = ("fd", "jvp")
COLD_FD_DEFAULT_MODE = "fd"
# The fd step, in units of the activation norm (see steer_core.cold_fd's docstring): far above fp32 rounding
# (~1e-7 relative) and small enough that the second-order error stays near 1e-3.
COLD_FD_DEFAULT_EPS = 1e-3
COLD_FD_DEFAULT_RANK = 8
# dtypes of the stored factors and embedding rows, by torch's names (`steer_core.cold_fd.STORAGE` maps them).
COLD_FD_STORAGES: tuple[str, ...] = ("bfloat16", "float16", "float32")
COLD_FD_DEFAULT_STORAGE = "bfloat16"


def check_cold_fd_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate COLD-FD's own params (see `steer_core.cold_fd`'s docstring) and fill in the defaults."""
    params = dict(params)
    out: dict[str, Any] = {}
    mode = params.pop("mode", COLD_FD_DEFAULT_MODE)
    if mode not in COLD_FD_MODES:
        raise SteerError(f"must be one of {', '.join(COLD_FD_MODES)}", "params.mode")
    out["mode"] = mode
    eps = params.pop("eps", COLD_FD_DEFAULT_EPS)
    if not _finite_number(eps) or eps <= 0:
        raise SteerError("must be a finite number > 0", "params.eps")
    out["eps"] = float(eps)
    rank = params.pop("rank", COLD_FD_DEFAULT_RANK)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SteerError("must be a positive integer (or null for an uncompressed profile)", "params.rank")
    out["rank"] = rank
    storage = params.pop("storage", COLD_FD_DEFAULT_STORAGE)
    if storage not in COLD_FD_STORAGES:
        raise SteerError(f"must be one of {', '.join(COLD_FD_STORAGES)}", "params.storage")
    out["storage"] = storage
    out["loss"] = check_loss(params.pop("loss", "ce"))
    _no_more(params)
    return out


# ---------------------------------------------------------------------------------------------- COLD-Kernel

COLD_KERNEL_KERNELS: tuple[str, ...] = ("unit", "linear")


def check_cold_kernel_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate COLD-Kernel's params: ``kernel`` (``unit`` | ``linear``) and ``loss`` (``ce`` | ``dpo`` |
    ``sft``)."""
    params = dict(params)
    kernel = params.pop("kernel", "unit")
    if kernel not in COLD_KERNEL_KERNELS:
        raise SteerError(f"must be one of {', '.join(COLD_KERNEL_KERNELS)}", "params.kernel")
    loss = check_loss(params.pop("loss", "ce"))
    _no_more(params)
    return {"kernel": kernel, "loss": loss}


# ---------------------------------------------------------------------------------------------- LoRA

LORA_MAX_RANK = 64
LORA_MAX_STEPS = 500


def check_lora_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate LoRA's own params: ``rank`` (1..LORA_MAX_RANK), ``alpha`` (> 0, default 2 * rank), ``steps``
    (1..LORA_MAX_STEPS), ``lr`` (in (0, 1]), ``loss`` (``ce`` | ``dpo`` | ``sft``, default ``ce``),
    ``target_modules`` (leaf module names, default: found from the model). ``rank``, ``steps`` and ``lr``
    left out (None) are chosen by the build's search (`steer_core.lora.grid`)."""
    params = dict(params)

    def integer(key: str, top: int) -> int | None:
        value = params.pop(key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top):
            raise SteerError(f"must be an integer in 1..{top} (or null: chosen on held-out items)", f"params.{key}")
        return value

    rank, steps = integer("rank", LORA_MAX_RANK), integer("steps", LORA_MAX_STEPS)
    alpha = params.pop("alpha", None)
    if alpha is not None and (not _finite_number(alpha) or alpha <= 0):
        raise SteerError("must be a finite number > 0 (or null: 2 * rank)", "params.alpha")
    lr = params.pop("lr", None)
    if lr is not None and (not _finite_number(lr) or not 0 < lr <= 1):
        raise SteerError("must be a number in (0, 1] (or null: chosen on held-out items)", "params.lr")
    targets = params.pop("target_modules", None)
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise SteerError("must be a non-empty list of module names (or null to find them from the model)",
                         "params.target_modules")
    out = {"rank": rank, "alpha": None if alpha is None else float(alpha), "steps": steps,
           "lr": None if lr is None else float(lr), "loss": check_loss(params.pop("loss", "ce")),
           "target_modules": targets}
    _no_more(params)
    return out


# ---------------------------------------------------------------------------------------------- ODESteer

ODESTEER_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "rk4")
ODESTEER_DEFAULTS: dict[str, Any] = {"degree": 2, "n_components": 8000, "gamma": 0.1, "coef0": 1.0, "seed": 0,
                                     "solver": "euler", "steps": 10}
ODESTEER_MAX_DEGREE = 8
ODESTEER_MAX_COMPONENTS = 1 << 20
ODESTEER_MAX_STEPS = 1000


def check_sketch_params(degree: Any, n_components: Any, gamma: Any, coef0: Any, prefix: str = "params") -> None:
    """Reject impossible polynomial Count Sketch settings (`steer_core.sketch`), naming the field
    (`params.degree`, ...)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise SteerError("must be an integer >= 1", f"{prefix}.degree")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 2:
        raise SteerError("must be an integer >= 2", f"{prefix}.n_components")
    if not _finite_number(gamma) or gamma <= 0:
        raise SteerError("must be a finite number > 0", f"{prefix}.gamma")
    if not _finite_number(coef0) or coef0 < 0:
        raise SteerError("must be a finite number >= 0", f"{prefix}.coef0")


def check_solver(solver: Any, steps: Any, path_length: Any = 0.0, prefix: str = "params") -> None:
    """Reject an unknown ODE solver, a step count outside 1..ODESTEER_MAX_STEPS and a negative T, naming the
    field."""
    if solver not in ODESTEER_SOLVERS:
        raise SteerError(f"must be one of {', '.join(ODESTEER_SOLVERS)}", f"{prefix}.solver")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= ODESTEER_MAX_STEPS:
        raise SteerError(f"must be an integer in 1..{ODESTEER_MAX_STEPS}", f"{prefix}.steps")
    if not _finite_number(path_length) or path_length < 0:
        raise SteerError("T (the strength) must be a finite number >= 0", f"{prefix}.strength")


def check_odesteer_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate ODESteer's own parameters, naming the field; fill defaults."""
    params = dict(params)
    if "T" in params:
        raise SteerError("ODESteer's T is the profile's strength: pass it as 'strength'", "params.T")
    unknown = sorted(set(params) - set(ODESTEER_DEFAULTS))
    if unknown:
        raise SteerError(f"unknown parameter {unknown[0]!r}; ODESteer takes {', '.join(ODESTEER_DEFAULTS)}",
                         f"params.{unknown[0]}")
    out = {**ODESTEER_DEFAULTS, **params}
    check_sketch_params(out["degree"], out["n_components"], out["gamma"], out["coef0"])
    if out["degree"] > ODESTEER_MAX_DEGREE:
        raise SteerError(f"must be an integer in 1..{ODESTEER_MAX_DEGREE}", "params.degree")
    if out["n_components"] > ODESTEER_MAX_COMPONENTS:
        raise SteerError(f"must be an integer in 2..{ODESTEER_MAX_COMPONENTS}", "params.n_components")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int) or out["seed"] < 0:
        raise SteerError("must be an integer >= 0", "params.seed")
    check_solver(out["solver"], out["steps"])
    out["gamma"], out["coef0"] = float(out["gamma"]), float(out["coef0"])
    return out
