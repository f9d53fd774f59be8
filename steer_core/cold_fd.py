"""COLD-FD: one SGD step on ``theta_<=L`` seen through the Jacobian, ``dZ(x) = -eta J(x) g``.

`g` is the mean gradient of the sample's loss over ``theta_<=L`` (input embedding rows and blocks
``0..L``). A profile stores the descent direction ``-g`` compressed: the embedding part row-sparse
(only the tokens the sample uses), every weight matrix as rank-`r` factors ``U V^T``, the small vectors
(norm gains, biases) dense. At request time ``J(x) (-g)`` costs one extra pass through blocks ``0..L``
with low-rank side paths ``(x V) U^T`` added to each perturbed Linear (nothing materialized):

- ``fd`` (the paper's): ``(Z_L(theta + tau d) - Z_L(theta)) / tau`` with the perturbed pass in fp32
  whatever the serving dtype; the unperturbed term is the served ``Z_L`` itself when the model runs in
  fp32 and nothing below ``L`` steered the row, otherwise a second fp32 pass;
- ``jvp``: forward-mode autodiff of the same pass (exact, no epsilon), in the served dtype. SDPA's CPU
  kernel has no forward-mode rule, so attention and Linear layers get hand-written rules for that pass.

Units: a profile's direction is calibrated at build time so that strength 1 moves ``Z_L`` by the median
activation norm at layer ``L`` (on the sample's prompts); the strength is then a fraction of the
activation norm and means the same for the train-split and the refit profile, and across models. `eps`
is in the same units: the fd step moves ``Z_L`` by about ``eps`` of its norm.

Positions: ``prompt`` only. The displacement is computed at prefill from the whole prompt; steering
``last``/``all`` would need a perturbed KV cache for every generated token, so those are rejected.

Blends: ``J(x)`` is linear, so a weighted mix of COLD-FD profiles at one layer is one perturbation (low-rank
factors concatenated, embedding rows and vectors added) and costs one extra pass. Mixes at different
layers cost one pass per layer; constant vectors and other methods add through `compose`.

Params: ``mode`` (``fd`` | ``jvp``, default fd), ``eps`` (> 0, default 1e-3 in the units above; the
paper's 1e-6 was in raw parameter units), ``rank`` (a positive integer no larger than any weight matrix
of blocks 0..L allows; null stores the uncompressed gradient), ``storage`` (dtype of the stored factors
and embedding rows, default bfloat16), ``loss`` (``ce`` | ``dpo`` | ``sft``). A profile records its rank,
its size against the uncompressed fp32 gradient, and the fidelity of its ``dZ`` in ``params.compression``.

The side paths are our own (Linear forwards patched for the extra pass only, see `cold_pass`) rather
than peft LoRA layers: peft would wrap the served model's modules in place (the engine owns that model,
and the steering hooks and other methods address its blocks), its adapters run in the module's dtype
(the fd path needs fp32 whatever the served dtype), and it has no form for the row-sparse embedding part
or the norm gains; the extra pass touches only blocks 0..L and leaves the served model unchanged.

Known limit: the extra pass gives every block the inputs block 0 received (attention mask, rotary
embeddings), which holds for the supported families but not for models whose layers use different
masks (Gemma 2/3 alternating sliding windows).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cachetools
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from steer_core.blocks import block_inputs
from steer_core.cold import sample_gradients
from steer_core.cold_pass import prepare_inputs, run_blocks, tangents
from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.lowrank import check_rank
from steer_core.method_names import METHOD_TABLE
from steer_core.method_params import (
    COLD_FD_DEFAULT_EPS,
    COLD_FD_DEFAULT_MODE,
    COLD_FD_DEFAULT_RANK,
    COLD_FD_DEFAULT_STORAGE,
    COLD_FD_MODES,
    COLD_FD_STORAGES,
    check_cold_fd_params,
)
from steer_core.method_spec import Method
from steer_core.models import LanguageModel
from steer_core.perturbation import Perturbation, nbytes, uncompressed_bytes, within_blocks
from steer_core.profile import Profile
from steer_core.prompts import encode_items
from steer_core.steering import ForwardContext

# The params' check and its defaults and choices live in the torch-free `steer_core.method_params` (the
# service checks a build request by them without importing this module); named here as before.
check_params = check_cold_fd_params
MODES = COLD_FD_MODES
DEFAULT_MODE = COLD_FD_DEFAULT_MODE
DEFAULT_EPS = COLD_FD_DEFAULT_EPS  # in units of the activation norm (see the module docstring)
DEFAULT_RANK = COLD_FD_DEFAULT_RANK
DEFAULT_STORAGE = COLD_FD_DEFAULT_STORAGE
STORAGE: dict[str, torch.dtype] = {name: getattr(torch, name) for name in COLD_FD_STORAGES}
# Held-out search grid: the displacement's median norm as a fraction of the median activation norm.
STRENGTHS = [0.025, 0.05, 0.1]
# Candidate layers, as fractions of the depth: middle-early layers steer well, and the extra pass
# through blocks 0..L costs (L+1)/n_layers of a forward.
LAYER_FRACTIONS = (0.35, 0.5)
# Prompts of the sample used to calibrate the units and measure the compression's fidelity.
CALIBRATION_PROMPTS = 4


# ---------------------------------------------------------------------------------------------- the intervention

def _steered_below(ctx: ForwardContext, layer: int, rows: Tensor) -> bool:
    steered: dict[int, Tensor] = getattr(ctx, "steered", {}) or {}
    wanted = set(rows.tolist())
    return any(other < layer and wanted & set(r.tolist()) for other, r in steered.items())


class _UnitCache:
    """The last few unit displacements ``J(x) d`` by content: (the direction's digest, the model's
    fingerprint, the pass's settings, the sha256 of the input rows). The held-out search scores one
    profile at several strengths on the same prompts; ``dZ`` is linear in the strength, so one extra pass
    serves them all. Small (it holds a few (n, T, D) tensors), so serving pays nothing."""

    size = 4

    def __init__(self) -> None:
        self.entries: cachetools.LRUCache[tuple, Tensor] = cachetools.LRUCache(self.size)
        self.lock = threading.Lock()  # a build thread and a serving thread may share the process

    def get(self, key: tuple) -> Tensor | None:
        with self.lock:
            return self.entries.get(key)

    def put(self, key: tuple, value: Tensor) -> None:
        with self.lock:
            self.entries[key] = value


_UNIT_CACHE = _UnitCache()


def _input_digest(ctx: ForwardContext, rows: Tensor) -> str | None:
    if ctx.input_ids is None:
        return None
    digest = hashlib.sha256()
    ids = ctx.input_ids[rows.to(ctx.input_ids.device)].cpu().to(torch.int64).contiguous()
    digest.update(repr(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    if ctx.attention_mask is not None:
        mask = ctx.attention_mask[rows.to(ctx.attention_mask.device)].cpu().to(torch.int64).contiguous()
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, Tensor], *extra: object) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes) and `extra` values."""
    digest = hashlib.sha256(repr(extra).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _on(pert: Perturbation, device: torch.device, dtype: torch.dtype) -> Perturbation:
    """`pert` on `device` in `dtype` (itself when it already is)."""
    rows = pert.embedding_rows
    if rows.device == device and rows.dtype == dtype:
        return pert
    return pert.map(lambda t: t.to(device=device, dtype=dtype))


@dataclass(frozen=True, eq=False)
class ColdFDShift:
    """``coef * J(x) d`` added at the prompt positions of layer `layer`.

    ``d`` is a direction in ``theta_<=L`` (a profile's calibrated unit direction, or a blend's weighted
    sum), built on the served model's device in the dtype its pass runs in; `scale` is its size in those
    units (1 for one profile, the sum of |weight x strength| for a blend), so the fd step ``eps / scale``
    moves ``Z_L`` by about `eps` of its norm. `direction`, when set, is the content digest of the stored
    direction, so unit displacements can be reused across strengths. The model is the one the steering
    hooks run (`ForwardContext.model`).
    """

    layer: int
    positions: str
    perturbation: Perturbation
    coef: float = 1.0
    scale: float = 1.0
    mode: str = DEFAULT_MODE
    eps: float = DEFAULT_EPS
    direction: str | None = None
    position_local: ClassVar[bool] = False  # re-runs blocks 0..L over the whole call

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        if self.coef == 0 or self.scale == 0:
            return torch.zeros_like(hidden)
        if ctx.past_length > 0:
            raise SteerError("COLD-FD steers prompt positions and needs the whole prompt in one forward call "
                             "(prefill in chunks is not supported)", "positions")
        if not ctx.block0_args and "hidden_states" not in ctx.block0_kwargs:
            raise RuntimeError("the steering hooks did not capture block 0's inputs")
        lm = ctx.model
        if lm is None:
            raise RuntimeError("the steering hooks did not record the model")
        key = None
        if self.direction is not None:
            inputs = _input_digest(ctx, rows)
            key = None if inputs is None else (self.direction, lm.fingerprint, self.layer, self.mode, self.eps,
                                               hidden.dtype, inputs)
        unit = _UNIT_CACHE.get(key) if key is not None else None
        if unit is None:
            unit = self._unit(lm, hidden, ctx, rows)
            if key is not None:
                _UNIT_CACHE.put(key, unit)
        return self.coef * unit

    def _unit(self, lm: LanguageModel, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        """``J(x) d`` for the batch rows `rows` (one extra pass through blocks 0..L)."""
        batch = int((ctx.block0_args[0] if ctx.block0_args else ctx.block0_kwargs["hidden_states"]).shape[0])
        select = None if len(rows) == batch and bool((rows.cpu() == torch.arange(batch)).all()) else rows
        ids = ctx.input_ids[rows.to(ctx.input_ids.device)] if ctx.input_ids is not None else None
        # The jvp runs in the served dtype; the fd difference needs fp32 (a step of eps rounds away in bf16).
        dtype = pass_dtype(lm, self.mode)
        cast = None if self.mode == "jvp" else dtype
        args = prepare_inputs(ctx.block0_args, select, batch, cast)
        kwargs = prepare_inputs(ctx.block0_kwargs, select, batch, cast)
        pert = _on(self.perturbation, hidden.device, dtype)
        if self.mode == "jvp":
            _, tan = tangents(lm, args, kwargs, ids, pert, self.layer, dtype)
            return tan[self.layer]
        tau = self.eps / self.scale
        moved = run_blocks(lm, args, kwargs, ids, pert, tau, self.layer, dtype)[self.layer]
        served_fp32 = hidden.dtype == torch.float32 and lm.dtype == torch.float32
        if served_fp32 and not _steered_below(ctx, self.layer, rows):
            base = hidden  # the served pass is this very fp32 computation
        else:
            base = run_blocks(lm, args, kwargs, ids, None, 0.0, self.layer, dtype)[self.layer]
        return (moved - base) / tau

    @classmethod
    def blend(cls, weighted: Sequence[tuple[ColdFDShift, float]]) -> ColdFDShift:
        """One shift for a weighted mix at one layer: ``J`` is linear, so the directions add (low-rank
        factors concatenate) and the mix costs one extra pass."""
        first = weighted[0][0]
        for iv, _ in weighted:
            if iv.layer != first.layer or iv.positions != first.positions:
                raise SteerError("COLD-FD profiles blend only at one layer and positions", "profiles")
        pert = Perturbation.combine([(iv.perturbation, w * iv.coef) for iv, w in weighted])
        scale = sum(abs(w * iv.coef) * iv.scale for iv, w in weighted)
        # A mix is exact with jvp; fd stays when every part asked for it.
        mode = "fd" if all(iv.mode == "fd" for iv, _ in weighted) else "jvp"
        return cls(layer=first.layer, positions=first.positions, perturbation=pert, coef=1.0,
                   scale=scale, mode=mode, eps=min(iv.eps for iv, _ in weighted))


# ---------------------------------------------------------------------------------------------- the method

def _check_fit_args(lm: LanguageModel, layers: Sequence[int], params: dict[str, Any], positions: str) -> None:
    if positions != "prompt":
        raise SteerError("cold_fd steers prompt positions only: its displacement is computed at prefill from "
                         "the whole prompt, and steering generated tokens would need a perturbed KV cache",
                         "params.positions")
    for layer in layers:
        lm.check_layer(layer, "params.layer")
    if params["rank"] is not None:
        top = max(layers)
        for path, module in lm.model.named_modules():
            if isinstance(module, nn.Linear | Conv1D) and within_blocks(lm, path, top):
                check_rank(params["rank"], tuple(module.weight.shape), path)


def _cosines(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Per-prompt cosine between two (n, T, D) displacements over the real positions."""
    m = mask.unsqueeze(-1).to(a.dtype)
    a, b = (a * m).flatten(1), (b * m).flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-30)


def _median_norm(z: Tensor, mask: Tensor) -> float:
    return float(z.float().norm(dim=-1)[mask].median())


def fit(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int], params: dict[str, Any],
        positions: str) -> dict[int, Profile]:
    """One backward for all `layers` (the loss is the same; ``g`` restricted to ``theta_<=L``), then
    compression, unit calibration and fidelity from one forward-mode pass each on the sample's prompts."""
    _check_fit_args(lm, layers, params, positions)
    top = max(layers)
    grads = sample_gradients(lm, items, params["loss"], param_layer=top)
    grads.check_finite()
    full = Perturbation.descent(lm, grads)
    storage = STORAGE[params["storage"]]
    stored = full.compress(params["rank"]).to_tensors(storage)
    compressed = Perturbation.from_tensors(stored, full.embedding_scale)

    batch = encode_items(lm, items[:CALIBRATION_PROMPTS])
    mask = batch["attention_mask"].bool()
    args, kwargs = block_inputs(lm, batch, 0)
    dtype = lm.dtype
    z, dz = tangents(lm, args, kwargs, batch["input_ids"], compressed.map(lambda t: t.to(lm.device, dtype)),
                     top, dtype, capture=layers)
    if params["rank"] is not None:
        _, dz_full = tangents(lm, args, kwargs, batch["input_ids"], full.map(lambda t: t.to(lm.device, dtype)),
                              top, dtype, capture=layers)
    else:
        dz_full = dz
    out = {}
    for layer in layers:
        moved = _median_norm(dz[layer], mask)
        if not math.isfinite(moved) or moved <= 0:
            raise SteerError(f"the sample's gradient does not move layer {layer} (zero or non-finite "
                             "displacement); no profile was built", "items")
        unit = _median_norm(z[layer], mask) / moved
        cos = _cosines(dz[layer].float(), dz_full[layer].float(), mask.to(dz[layer].device))
        tensors = {k: v for k, v in stored.items() if not k.startswith(("side:", "param:"))
                   or within_blocks(lm, k.split(":")[1], layer)}
        compression = {"rank": params["rank"], "storage": params["storage"], "bytes": nbytes(tensors),
                       "uncompressed_bytes": uncompressed_bytes(lm, layer),
                       "fidelity": float(cos.mean()), "fidelity_min": float(cos.min()),
                       "fidelity_prompts": int(mask.shape[0]), "embedding_rows": int(len(full.embedding_index))}
        out[layer] = Profile(method="cold_fd", model_name=lm.name, model_fingerprint=lm.fingerprint, layer=layer,
                             positions=positions, strength=1.0, tensors=tensors,
                             params={**params, "unit_scale": unit, "embedding_scale": full.embedding_scale,
                                     "train_loss": grads.mean_loss, "compression": compression})
    return out


def pass_dtype(lm: LanguageModel, mode: str) -> torch.dtype:
    """The dtype of the extra pass: the served one for the jvp, fp32 for fd (a step of eps rounds away in
    bf16)."""
    return lm.dtype if mode == "jvp" else torch.float32


def intervention(profile: Profile, lm: LanguageModel) -> ColdFDShift:
    """The profile as a `ColdFDShift` at its own strength, its calibrated unit direction built on the
    model's device in the dtype of its pass."""
    p = profile.params
    scales = (float(p["unit_scale"]), float(p["embedding_scale"]))
    mode = p.get("mode", DEFAULT_MODE)
    unit = Perturbation.from_tensors(profile.tensors, scales[1]).scaled(scales[0])
    return ColdFDShift(layer=profile.layer, positions=profile.positions,
                       perturbation=_on(unit, lm.device, pass_dtype(lm, mode)),
                       coef=float(profile.strength), mode=mode, eps=float(p.get("eps", DEFAULT_EPS)),
                       direction=tensors_digest(profile.tensors, scales))


def candidate_layers(lm: LanguageModel) -> list[int]:
    """Layers the held-out search tries when the caller fixes none (`LAYER_FRACTIONS` of the depth)."""
    n = lm.num_layers
    return sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in LAYER_FRACTIONS})


METHOD = Method(**METHOD_TABLE["cold_fd"].fields(), fit=fit, intervention=intervention,
                strengths=lambda profile, lm: list(STRENGTHS), layers=candidate_layers)
