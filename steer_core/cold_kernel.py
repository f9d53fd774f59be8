"""COLD-Kernel: steering from the loss gradient with respect to the activation at the answer position.

``g_i = dL_i / dZ_L(x_i)`` at the last prompt position of item ``i`` (one batched backward gives every
layer). For pairs (DPO) the gradient of both branches counts (the reference code keeps only the
rejected one: a bug not copied); with one-token letter completions both branches share that position,
so the loss's gradient there is their sum.

- ``unit`` kernel (the paper's): ``dZ = -eta mean_i g_i``, a constant vector (a `ConstantShift`);
- ``linear`` kernel: ``dZ(x) = -eta (1/N) sum_i <z(x), z_i> g_i`` with ``z`` the activation at the
  last position of the forward call (the last prompt token at prefill; each new token when ``last`` or
  ``all`` steer generated positions), one vector per row.

Units: strength 1 moves ``Z_L`` by the median answer-position activation norm of the sample (for the
linear kernel, the median over the sample's own prompts), so strengths are fractions of the activation
norm, mean the same for the train-split and refit profiles, and carry across models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from steer_core.cold import sample_gradients
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.method_names import METHOD_TABLE
from steer_core.method_params import COLD_KERNEL_KERNELS, check_cold_kernel_params
from steer_core.method_spec import Method
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.steering import ConstantShift, ForwardContext

# The params' check (``kernel``: ``unit`` | ``linear``; ``loss``: ``ce`` | ``dpo`` | ``sft``) lives in the
# torch-free `steer_core.method_params` (the service checks a build request by it); named here as before.
check_params = check_cold_kernel_params
KERNELS = COLD_KERNEL_KERNELS
STRENGTHS = [0.01, 0.02, 0.04, 0.08]


@dataclass(frozen=True, eq=False)
class KernelShift:
    """Linear-kernel COLD displacement: ``sum_i <z, anchors_i> weights_i`` with ``z`` the activation at
    the call's last position (weights carry ``-eta / N`` and any blend weight)."""

    layer: int
    positions: str
    anchors: Tensor  # (N, D)
    weights: Tensor  # (N, D)
    position_local: ClassVar[bool] = False  # reads the call's last position

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        z = hidden[:, -1, :].float()
        anchors = self.anchors.to(device=hidden.device, dtype=torch.float32)
        weights = self.weights.to(device=hidden.device, dtype=torch.float32)
        return ((z @ anchors.T) @ weights).unsqueeze(1)

    @classmethod
    def blend(cls, weighted: Sequence[tuple[KernelShift, float]]) -> KernelShift:
        first = weighted[0][0]
        return cls(layer=first.layer, positions=first.positions,
                   anchors=torch.cat([iv.anchors.float() for iv, _ in weighted]),
                   weights=torch.cat([w * iv.weights.float() for iv, w in weighted]))


def _median_norm(rows: Tensor) -> float:
    return float(rows.norm(dim=-1).median())


def fit(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int], params: dict[str, Any],
        positions: str) -> dict[int, Profile]:
    """One batched backward gives every layer's answer-position gradients; one profile per layer."""
    grads = sample_gradients(lm, items, params["loss"], act_layers=layers)
    grads.check_finite()
    n = len(items)
    out = {}
    for layer in layers:
        z, g = grads.activations[layer], grads.activation_grads[layer]
        typical = _median_norm(z)
        if params["kernel"] == "unit":
            tensors = {"vector": -g.mean(dim=0)}
            moved = float(tensors["vector"].norm())
        else:
            tensors = {"anchors": z, "grads": g}
            moved = _median_norm((z @ z.T) @ g / n)  # the displacement at the sample's own prompts
        if not moved > 0:
            raise SteerError(f"the sample's loss gradient at layer {layer} is zero; no profile was built", "items")
        out[layer] = Profile(method="cold_kernel", model_name=lm.name, model_fingerprint=lm.fingerprint,
                             layer=layer, positions=positions, strength=1.0, tensors=tensors,
                             params={**params, "unit_scale": typical / moved, "train_loss": grads.mean_loss})
    return out


def constant_vector(profile: Profile) -> Tensor | None:
    """The unit kernel's displacement at the profile's strength; None for the linear kernel."""
    if profile.params.get("kernel", "unit") != "unit":
        return None
    return profile.strength * float(profile.params["unit_scale"]) * profile.tensors["vector"].float()


def intervention(profile: Profile, lm: LanguageModel) -> ConstantShift | KernelShift:
    """The unit kernel as a constant vector, the linear kernel as a `KernelShift`, at the profile's strength."""
    vector = constant_vector(profile)
    if vector is not None:
        return ConstantShift(layer=profile.layer, positions=profile.positions, vector=vector)
    coef = profile.strength * float(profile.params["unit_scale"])
    anchors = profile.tensors["anchors"].float()
    weights = -coef / len(anchors) * profile.tensors["grads"].float()
    return KernelShift(layer=profile.layer, positions=profile.positions, anchors=anchors, weights=weights)


METHOD = Method(**METHOD_TABLE["cold_kernel"].fields(), fit=fit, intervention=intervention,
                strengths=lambda profile, lm: list(STRENGTHS), constant_vector=constant_vector)
