"""ODESteer: steer along the gradient flow of a barrier fitted on sketched activations.

Fit: `Z_L` at the last token of prompt + chosen answer (positive) and prompt + each other answer
(negative), weighted by the item's target: option k is positive with weight `q_k` and negative with
weight `(1 - q_k) / (K - 1)` (one person's answer: the answer against the mean of the others). A
scikit-learn `LogisticRegression` on the normalized polynomial Count Sketch `phi` (steer_core.sketch)
gives the barrier `h(a) = w . phi(a) + b + log((1 - pi) / pi)`, `pi` the positives' weight share.

Steer: at each steered position (default: the last position of every forward call) solve
`da/dt = f(a) = grad h(a) / (|grad h(a)| + 1e-10)` from 0 to T with Euler, midpoint or RK4 and add
`a(T) - a(0)`. `T` is the profile's `strength`: a path length in activation space, so the strength grid
of the held-out search scales with the layer's mean activation norm, stored in the profile.

Blends: weighted profiles at one layer become ONE barrier `h = sum_k w_k h_k` (one flow on the combined
field; a weight of -1 flows away from the group) with path length `T = sum_k |w_k| T_k`. One profile
at weight w therefore moves `|w|` times as far, all-zero weights move nothing, and a profile whose
build shipped strength 0 adds nothing to the field either.

Speed: `grad h` of a degree-2 sketch is exactly a quadratic form `a^ A + c` in the normalized
activation (A is (D, D), built once per intervention from the hashes and `w`); each ODE step is then
one small matrix product instead of several FFTs. Degree 1 is a constant `c`; higher degrees (and very
wide models, where `A` would be large) use the FFT vector-Jacobian product of the sketch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from steer_core.activations import answer_activations
from steer_core.data import OpinionItem
from steer_core.errors import ProfileError, SteerError
from steer_core.method_names import METHOD_TABLE
from steer_core.method_params import (
    ODESTEER_DEFAULTS,
    ODESTEER_MAX_COMPONENTS,
    ODESTEER_MAX_DEGREE,
    ODESTEER_MAX_STEPS,
    ODESTEER_SOLVERS,
    check_odesteer_params,
    check_solver,
)
from steer_core.method_spec import Method
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.sketch import CountSketch, through_normalization, unit_and_norm
from steer_core.steering import ForwardContext

# The params' check (`barrier_params`; `check_solver` for the solver and its steps) with its defaults and
# limits lives in the torch-free `steer_core.method_params` (the service checks a build request by them);
# named here as before.
barrier_params = check_odesteer_params
SOLVERS = ODESTEER_SOLVERS
DEFAULTS = ODESTEER_DEFAULTS
MAX_DEGREE = ODESTEER_MAX_DEGREE
MAX_COMPONENTS = ODESTEER_MAX_COMPONENTS
MAX_STEPS = ODESTEER_MAX_STEPS
FIELD_EPS = 1e-10  # f = grad h / (|grad h| + eps): a zero gradient gives a zero field, not NaN
# The held-out search tries T = r * (mean activation norm at the layer) for r in this grid. The field is
# tangent to the sphere |a| = const (h depends on a / |a| only), so the flow turns `a` by about T / |a|
# radians: from a nudge to about 70 degrees, which SmolLM2-135M needed before a persona behaviour
# flipped (its DiffMean vectors are that order of |a| too). The reference's T = 1..5 is an absolute
# length tuned on its own models; a grid relative to |a| serves any model's scale.
RELATIVE_PATH_LENGTHS = (0.05, 0.15, 0.4, 0.8, 1.2)
# Above this width the dense (D, D) form of a degree-2 gradient (16 MB fp32 at 2048) needs more memory
# and flops per step than the FFT path (a few length-n FFTs).
QUADRATIC_MAX_DIM = 2048
_SAME_WEIGHT = 1e-6  # positive and negative weights closer than this (fp32) carry no contrast


@dataclass(frozen=True, eq=False)
class Barrier:
    """`h(a) = coef . phi(a) + intercept + prior_offset` on one sketch."""

    sketch: CountSketch
    coef: Tensor  # (n_components,) fp32
    intercept: float
    prior_offset: float  # log((1 - pi) / pi)

    def __post_init__(self) -> None:
        if self.coef.shape != (self.sketch.n_components,):
            raise SteerError(f"coef must have shape ({self.sketch.n_components},), has {tuple(self.coef.shape)}",
                             "coef")

    def value(self, a: Tensor) -> Tensor:
        """h(a) for rows a (B, D)."""
        feats = self.sketch.features(a)
        return feats @ self.coef.to(feats.device) + (self.intercept + self.prior_offset)

    def grad(self, a: Tensor) -> Tensor:
        """grad h(a) (B, D) through the sketch's FFT vector-Jacobian product."""
        return self.sketch.vjp(a, self.coef.to(a.device))

    def unit_form(self, device: torch.device) -> tuple[Tensor | None, Tensor] | None:
        """`(A, c)` with `d h / d a^ = a^ A + c` exactly (A None for degree 1), or None where the form
        does not pay off (degree > 2, very wide models). Computed on each call: a flow folds it into its
        field once, when it is built."""
        sk = self.sketch
        if sk.degree > 2 or (sk.degree == 2 and sk.dim > QUADRATIC_MAX_DIM):
            return None
        idx, sign, w = sk.index_hash.long().cpu(), sk.bit_hash.float().cpu(), self.coef.float().cpu()
        if sk.degree == 1:  # h = w . (C x): the gradient is C^T w, a constant
            lifted = sign[0] * w[idx[0]]
            return None, (sk.gamma ** 0.5 * lifted[:-1]).contiguous().to(device)
        # h = x^T M x with M[i, j] = s1_i s2_j w[(h1_i + h2_j) mod n]; grad_x = (M + M^T) x
        n = sk.n_components
        m = sign[0].unsqueeze(1) * sign[1].unsqueeze(0) * w[(idx[0].unsqueeze(1) + idx[1].unsqueeze(0)) % n]
        q = m + m.T
        # x = [sqrt(gamma) a^, sqrt(coef0)]  =>  dh/da^ = gamma Q_aa a^ + sqrt(gamma coef0) Q_a1
        return ((sk.gamma * q[:-1, :-1]).contiguous().to(device),
                ((sk.gamma * sk.coef0) ** 0.5 * q[:-1, -1]).contiguous().to(device))

    def to_tensors(self) -> dict[str, Tensor]:
        return {**self.sketch.tensors(), "coef": self.coef.float().cpu(),
                "intercept": torch.tensor(float(self.intercept)),
                "prior_offset": torch.tensor(float(self.prior_offset))}


def fit_barrier(sketch: CountSketch, positives: Tensor, negatives: Tensor, pos_weight: Tensor | None = None,
                neg_weight: Tensor | None = None) -> Barrier:
    """Logistic regression on `phi` of positive vs negative activations (rows of (N, D) tensors)."""
    if len(positives) == 0 or len(negatives) == 0:
        which = "negative" if len(positives) else "positive"
        raise SteerError(f"one class only: there are no {which} activations, so there is nothing for a "
                         "barrier to separate the chosen answers from", "items")
    pw = torch.ones(len(positives)) if pos_weight is None else pos_weight.float().cpu()
    nw = torch.ones(len(negatives)) if neg_weight is None else neg_weight.float().cpu()
    if pw.sum() <= 0 or nw.sum() <= 0:
        raise SteerError("one class only: a class has zero total weight", "items")
    pi = float(pw.sum() / (pw.sum() + nw.sum()))
    feats = sketch.features(torch.cat([positives, negatives]).to(sketch.device)).cpu().double().numpy()
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    clf = LogisticRegression(max_iter=1000)
    clf.fit(feats, labels, sample_weight=torch.cat([pw, nw]).double().numpy())
    return Barrier(sketch=sketch, coef=torch.as_tensor(clf.coef_.ravel(), dtype=torch.float32),
                   intercept=float(clf.intercept_[0]), prior_offset=math.log((1.0 - pi) / pi))


@dataclass(frozen=True, eq=False)
class BarrierField:
    """`grad h` of `h = sum_k w_k h_k`, folded into as few evaluations as possible, on one device."""

    quad: Tensor | None  # (D, D) or None
    lin: Tensor | None  # (D,) or None
    spectral: tuple[tuple[CountSketch, Tensor], ...]  # (sketch, rfft(sum of weighted coefs)) per distinct sketch

    @classmethod
    def build(cls, parts: Sequence[tuple[Barrier, float]], device: torch.device) -> BarrierField:
        quad: Tensor | None = None
        lin: Tensor | None = None
        by_sketch: list[tuple[CountSketch, Tensor]] = []
        for barrier, w in parts:
            form = barrier.unit_form(device)
            if form is not None:
                a_mat, c = form
                if a_mat is not None:
                    quad = w * a_mat if quad is None else quad + w * a_mat
                lin = w * c if lin is None else lin + w * c
                continue
            for i, (sk, coef) in enumerate(by_sketch):  # one FFT pass for all barriers on the same hashes
                if sk.same_hashes(barrier.sketch):
                    by_sketch[i] = (sk, coef + w * barrier.coef.to(device))
                    break
            else:
                by_sketch.append((barrier.sketch.to(device), w * barrier.coef.to(device)))
        spectral = tuple((sk, torch.fft.rfft(coef.float())) for sk, coef in by_sketch)
        return cls(quad=quad, lin=lin, spectral=spectral)

    def grad(self, a: Tensor) -> Tensor:
        """grad h(a) for rows a (B, D)."""
        unit, norm = unit_and_norm(a)
        if self.quad is not None:
            g = unit @ self.quad if self.lin is None else torch.addmm(self.lin, unit, self.quad)
        elif self.lin is not None:
            g = self.lin.expand_as(unit)
        else:
            g = torch.zeros_like(unit)
        for sketch, spectrum in self.spectral:
            g = g + sketch.unit_vjp_spectrum(unit, spectrum)
        return through_normalization(unit, norm, g)

    def __call__(self, a: Tensor) -> Tensor:
        """The unit vector field f(a) = grad h / (|grad h| + 1e-10)."""
        g = self.grad(a)
        return g / (g.norm(dim=-1, keepdim=True) + FIELD_EPS)


def integrate(field_fn: Callable[[Tensor], Tensor], a0: Tensor, path_length: float, solver: str = "euler",
              steps: int = 10) -> Tensor:
    """a(T) for da/dt = field_fn(a), a(0) = a0, with `steps` fixed steps of Euler, midpoint or RK4."""
    check_solver(solver, steps, path_length)
    a = a0.float()
    dt = float(path_length) / steps
    for _ in range(steps):
        if solver == "euler":
            a = a + dt * field_fn(a)
        elif solver == "midpoint":
            a = a + dt * field_fn(a + 0.5 * dt * field_fn(a))
        else:
            k1 = field_fn(a)
            k2 = field_fn(a + 0.5 * dt * k1)
            k3 = field_fn(a + 0.5 * dt * k2)
            k4 = field_fn(a + dt * k3)
            a = a + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return a


@dataclass(frozen=True, eq=False)
class BarrierFlow:
    """The ODESteer intervention: flow `path_length` along the combined barrier field at the steered
    positions. `parts` are (barrier, weight); the displacement depends on the activation itself."""

    layer: int
    positions: str
    parts: tuple[tuple[Barrier, float], ...]
    path_length: float  # T
    solver: str = "euler"
    steps: int = 10
    device: str = "cpu"
    position_local: ClassVar[bool] = True
    _field: BarrierField | None = dataclass_field(init=False, repr=False)  # built from the rest in __post_init__

    def __post_init__(self) -> None:
        check_solver(self.solver, self.steps, self.path_length, prefix="profile")
        live = tuple((b, float(w)) for b, w in self.parts if w != 0.0)
        object.__setattr__(self, "parts", live)
        field_ = BarrierField.build(live, torch.device(self.device)) if live and self.path_length > 0 else None
        object.__setattr__(self, "_field", field_)

    @property
    def field(self) -> BarrierField | None:
        return self._field

    def steer(self, a: Tensor) -> Tensor:
        """a(T) for activations a (B, D)."""
        if self.field is None:
            return a.float()
        return integrate(self.field, a, self.path_length, self.solver, self.steps)

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        if self.field is None:
            return out
        # State-dependent: solve only at the positions that are steered (the last one, by default).
        mask = ctx.position_mask(self.positions, rows).to(hidden.device)
        if not mask.any():
            return out
        a0 = hidden[mask].float()
        out[mask] = self.steer(a0) - a0
        return out

    @classmethod
    def blend(cls, weighted: Sequence[tuple[BarrierFlow, float]]) -> BarrierFlow:
        """One barrier `sum_k w_k h_k`, one flow of length `sum_k |w_k| T_k`, the finest solver of the
        members. Members with T = 0 (a build that shipped nothing) add nothing to the field."""
        first = weighted[0][0]
        parts = tuple((b, w * wb) for flow, w in weighted if flow.path_length > 0 for b, wb in flow.parts)
        path_length = sum(abs(w) * flow.path_length for flow, w in weighted)
        solver = max((flow.solver for flow, _ in weighted), key=SOLVERS.index)
        steps = max(flow.steps for flow, _ in weighted)
        return cls(layer=first.layer, positions=first.positions, parts=parts, path_length=float(path_length),
                   solver=solver, steps=steps, device=first.device)


# --- the method: fit, profile <-> intervention, strength grid, params ---

def contrast_weights(target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) positive and negative sample weights of each (item, option) activation."""
    counts = valid.sum(dim=1, keepdim=True).float()
    pos = target * valid
    neg = (1.0 - target) * valid / (counts - 1.0)
    return pos, neg


def fit(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int], params: dict[str, Any],
        positions: str) -> dict[int, Profile]:
    """One barrier per layer from the items' answer activations (one forward serves every layer)."""
    params = barrier_params(params)
    acts = answer_activations(lm, items, layers)
    pos_w, neg_w = contrast_weights(acts.target, acts.valid)
    if float((pos_w - neg_w).abs().max()) <= _SAME_WEIGHT:
        raise SteerError("one class only: every item's target is uniform over its options, so chosen and "
                         "other answers are the same sample and no barrier separates them", "items")
    sketch = CountSketch.create(lm.hidden_size, params["degree"], params["n_components"], params["gamma"],
                                params["coef0"], params["seed"])
    pos_w, neg_w = pos_w[acts.valid], neg_w[acts.valid]
    keep_pos, keep_neg = pos_w > 0, neg_w > 0
    out = {}
    for layer in layers:
        z = acts.by_layer[layer][acts.valid]  # (M, D)
        barrier = fit_barrier(sketch, z[keep_pos], z[keep_neg], pos_w[keep_pos], neg_w[keep_neg])
        norm = float(z.norm(dim=-1).mean())
        tensors = {**barrier.to_tensors(), "activation_norm": torch.tensor(norm)}
        out[layer] = Profile(method="odesteer", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=layer,
                             positions=positions, strength=1.0, tensors=tensors, params=dict(params))
    return out


_PROFILE_TENSORS = ("index_hash", "bit_hash", "coef", "intercept", "prior_offset", "activation_norm")


def barrier_from_profile(profile: Profile, device: torch.device | str = "cpu") -> Barrier:
    """The barrier stored in an ODESteer profile; a malformed profile raises `ProfileError`."""
    missing = [k for k in _PROFILE_TENSORS if k not in profile.tensors]
    if missing:
        raise ProfileError(f"ODESteer profile lacks tensor {missing[0]!r}", "profile")
    try:
        p = barrier_params({k: v for k, v in profile.params.items() if k in DEFAULTS})
        sketch = CountSketch.from_tensors(profile.tensors, p["n_components"], p["gamma"], p["coef0"], device)
        return Barrier(sketch=sketch, coef=profile.tensors["coef"].float().to(device),
                       intercept=float(profile.tensors["intercept"]),
                       prior_offset=float(profile.tensors["prior_offset"]))
    except (SteerError, RuntimeError, ValueError) as exc:  # bad params, hash or coef shapes, non-scalars
        raise ProfileError(f"not a valid ODESteer profile: {exc}", "profile") from None


def intervention(profile: Profile, lm: LanguageModel) -> BarrierFlow:
    """The profile as a flow of length T = `profile.strength`, its tensors on the model's device."""
    barrier = barrier_from_profile(profile, lm.device)
    if barrier.sketch.dim != lm.hidden_size:
        raise ProfileError(f"sketch is for width {barrier.sketch.dim}, the model has {lm.hidden_size}", "profile")
    return BarrierFlow(layer=profile.layer, positions=profile.positions, parts=((barrier, 1.0),),
                       path_length=float(profile.strength), solver=profile.params.get("solver", "euler"),
                       steps=int(profile.params.get("steps", DEFAULTS["steps"])), device=str(lm.device))


def strengths(profile: Profile, lm: LanguageModel) -> list[float]:
    """T grid for the held-out search: fractions of the layer's mean activation norm."""
    norm = float(profile.tensors["activation_norm"])
    return [float(f"{r * norm:.6g}") for r in RELATIVE_PATH_LENGTHS]  # 6 digits: readable in the metrics


METHOD = Method(**METHOD_TABLE["odesteer"].fields(), fit=fit, intervention=intervention, strengths=strengths,
                default_positions="last")
