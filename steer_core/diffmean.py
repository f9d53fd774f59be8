"""DiffMean (CAA): the mean activation of chosen answers minus that of the other answers.

For a distribution target q over K options the chosen side weighs option k by q_k and the other side
by (1 - q_k) / (K - 1); for one person's answer that is the answer against the mean of the others.

When the items carry a `contrast` (the pooled answers of the groups to be told apart from), option k
weighs q_k - c_k instead: the options the group picks more often than the others against those it picks
less often, each item weighted by how far the group is from the others there (weights divided by the
mean total variation, so strengths mean the same as without a contrast). What every group would say
cancels, so the vector carries the group's own opinions rather than the model's over-confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from steer_core.activations import answer_activations
from steer_core.data import OpinionItem
from steer_core.losses import contrasts
from steer_core.method_names import METHOD_TABLE
from steer_core.method_spec import Method
from steer_core.models import LanguageModel
from steer_core.profile import Profile
from steer_core.steering import ConstantShift

STRENGTHS = [0.25, 0.5, 1.0, 2.0, 4.0]


def fit(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int], params: dict[str, Any],
        positions: str) -> dict[int, Profile]:
    acts = answer_activations(lm, items, layers)
    if any(it.contrast is not None for it in items):
        weight = acts.target - contrasts(items)
        spread = 0.5 * weight.abs().sum(dim=1).mean().clamp(min=1e-12)
        chosen, others = weight.clamp(min=0) / spread, (-weight).clamp(min=0) / spread
    else:
        counts = acts.valid.sum(dim=1, keepdim=True).float()
        chosen = acts.target
        others = (1.0 - acts.target) * acts.valid / (counts - 1.0)
    out = {}
    for layer in layers:
        z = acts.by_layer[layer]  # (N, K, D)
        pos = (chosen.unsqueeze(-1) * z).sum(dim=1).mean(dim=0)
        neg = (others.unsqueeze(-1) * z).sum(dim=1).mean(dim=0)
        out[layer] = Profile(method="diffmean", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=layer,
                             positions=positions, strength=1.0, tensors={"vector": pos - neg}, params={})
    return out


def constant_vector(profile: Profile) -> Tensor:
    return profile.strength * profile.tensors["vector"].float()


def intervention(profile: Profile, lm: LanguageModel) -> ConstantShift:
    return ConstantShift(layer=profile.layer, positions=profile.positions, vector=constant_vector(profile))


METHOD = Method(**METHOD_TABLE["diffmean"].fields(), fit=fit, intervention=intervention,
                strengths=lambda profile, lm: list(STRENGTHS), constant_vector=constant_vector)
