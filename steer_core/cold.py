"""What COLD-Steer's two methods share: gradients of a loss over opinion items.

One batched forward and backward per chunk of items gives, at once,
- per item, the gradient with respect to the activation ``Z_L`` at the answer position (the last prompt
  position) for every requested layer: COLD-Kernel's ``g_i``;
- the mean gradient over ``theta_<=L`` (the input embedding rows the sample touches and every parameter
  of blocks ``0..L``): COLD-FD's ``g``. Parameters above ``L`` are never differentiated.

The embedding gradient is taken through block 0's input, so it is the input-side gradient only (with
tied input and output embeddings the output side is a parameter above ``L`` for this purpose) and is
exactly row-sparse: only the token rows the sample uses.

The loss is read at the answer position (the last prompt position, with left padding the last column),
so one batched forward and backward serves a chunk of items whatever their lengths.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.losses import item_losses
from steer_core.models import LanguageModel
from steer_core.prompts import encode_items

GRADIENT_BATCH = 8


@dataclass
class SampleGradients:
    """Gradients of a sample's loss (see the module docstring). Everything is fp32 on the CPU."""

    n_items: int
    mean_loss: float
    activations: dict[int, Tensor] = field(default_factory=dict)  # L -> (N, D) Z_L at the answer position
    activation_grads: dict[int, Tensor] = field(default_factory=dict)  # L -> (N, D) dL_i / dZ_L
    param_grads: dict[str, Tensor] = field(default_factory=dict)  # path in the model -> mean gradient
    embedding_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (R,) token ids
    embedding_grads: Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (R, D) mean weight-row gradient

    def check_finite(self) -> None:
        """Raise a `SteerError` when any gradient has NaN or inf values (never build a NaN profile)."""
        named = [("loss", torch.tensor(self.mean_loss)), ("embedding", self.embedding_grads),
                 *((f"activations at layer {k}", v) for k, v in self.activation_grads.items()),
                 *self.param_grads.items()]
        for name, t in named:
            if not torch.isfinite(t).all():
                raise SteerError(f"the sample's loss gradient has NaN or inf values ({name}); the model or "
                                 "the sample is numerically broken, so no profile was built", "items")


def block_parameters(lm: LanguageModel, upto: int) -> dict[str, nn.Parameter]:
    """Parameters of blocks ``0..upto`` keyed by their path in the model."""
    out: dict[str, nn.Parameter] = {}
    for j in range(upto + 1):
        for name, p in lm.blocks[j].named_parameters():
            out[f"{lm.block_path}.{j}.{name}"] = p
    return out


def block_of(lm: LanguageModel, path: str) -> int | None:
    """The block index a module or parameter path lies in, or None."""
    prefix = lm.block_path + "."
    if not path.startswith(prefix):
        return None
    head = path[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def embedding_scale(lm: LanguageModel) -> float:
    """The factor between an embedding weight row and what the embedding module outputs for that token
    (1 for most models; sqrt(hidden) for Gemma's scaled embedding)."""
    ids = torch.tensor([0, 1], device=lm.device)
    with torch.no_grad():
        out = lm.model.get_input_embeddings()(ids).float()
        rows = lm.embedding_weight[ids].float()
    scale = float((out * rows).sum() / (rows * rows).sum().clamp(min=1e-30))
    if not torch.allclose(out, scale * rows, rtol=1e-3, atol=1e-6):
        raise SteerError("the model's input embedding is not a scaled row lookup; COLD-FD cannot perturb it",
                         "model")
    return scale


def _keeps_one_logit(model: nn.Module) -> dict[str, Any]:
    # Only the answer position's logits are needed; computing all of them would dominate the backward.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class _GradientHooks:
    """Make block 0's input a leaf (so every activation after it is differentiable even when no parameter
    requires grad) and keep the outputs of the requested blocks."""

    def __init__(self, lm: LanguageModel, layers: Sequence[int]) -> None:
        self.leaf: Tensor | None = None
        self.outputs: dict[int, Tensor] = {}
        self.handles = [lm.blocks[0].register_forward_pre_hook(self._leaf, with_kwargs=True)]
        for layer in layers:
            self.handles.append(lm.blocks[layer].register_forward_hook(self._keep(layer)))

    def _leaf(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            self.leaf = args[0].detach().requires_grad_(True)
            return (self.leaf, *args[1:]), kwargs
        self.leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": self.leaf}

    def _keep(self, layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sample_gradients(lm: LanguageModel, items: Sequence[OpinionItem], loss: str = "ce",
                     act_layers: Sequence[int] = (), param_layer: int | None = None,
                     batch_size: int = GRADIENT_BATCH) -> SampleGradients:
    """Gradients of the per-item `loss` of `items` (see `SampleGradients`), batched.

    `act_layers`: layers whose answer-position activations and per-item activation gradients are kept.
    `param_layer`: when given, the mean gradient over ``theta_<=param_layer`` is computed too.
    """
    if not items:
        raise SteerError("the sample is empty", "items")
    for layer in act_layers:
        lm.check_layer(layer)
    theta = block_parameters(lm, lm.check_layer(param_layer)) if param_layer is not None else {}
    wanted = {id(p) for p in theta.values()}
    all_params = list(lm.model.parameters())
    saved = [p.requires_grad for p in all_params]
    n = len(items)
    acts: dict[int, list[Tensor]] = {layer: [] for layer in act_layers}
    act_grads: dict[int, list[Tensor]] = {layer: [] for layer in act_layers}
    sums = {name: torch.zeros_like(p, dtype=torch.float32, device="cpu") for name, p in theta.items()}
    emb_ids: list[Tensor] = []
    emb_grads: list[Tensor] = []
    total_loss = 0.0
    extra = _keeps_one_logit(lm.model)
    try:
        # Only theta_<=L may require grad: the backward then does no work for parameters above L.
        for p in all_params:
            p.requires_grad_(id(p) in wanted)
        for start in range(0, n, batch_size):
            chunk = items[start:start + batch_size]
            batch = encode_items(lm, chunk)
            hooks = _GradientHooks(lm, act_layers)
            try:
                with torch.enable_grad():
                    logits = lm.model(**batch, use_cache=False, **extra).logits[:, -1, :]
                    losses = item_losses(lm, logits, chunk, loss)
                    assert hooks.leaf is not None
                    inputs = [hooks.leaf, *(hooks.outputs[layer] for layer in act_layers), *theta.values()]
                    grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
            finally:
                hooks.remove()
            total_loss += float(losses.detach().sum())
            leaf_grad = grads[0]
            real = batch["attention_mask"].bool()
            if leaf_grad is not None:
                emb_ids.append(batch["input_ids"][real].cpu())
                emb_grads.append(leaf_grad[real].float().cpu())
            for i, layer in enumerate(act_layers):
                acts[layer].append(hooks.outputs[layer][:, -1, :].detach().float().cpu())
                g = grads[1 + i]
                act_grads[layer].append(g[:, -1, :].float().cpu() if g is not None
                                        else torch.zeros(len(chunk), lm.hidden_size))
            for name, g in zip(theta, grads[1 + len(act_layers):], strict=True):
                if g is not None:
                    sums[name] += g.float().cpu()
    finally:
        for p, flag in zip(all_params, saved, strict=True):
            p.requires_grad_(flag)
    out = SampleGradients(n_items=n, mean_loss=total_loss / n,
                          activations={k: torch.cat(v) for k, v in acts.items()},
                          activation_grads={k: torch.cat(v) for k, v in act_grads.items()},
                          param_grads={k: v / n for k, v in sums.items()})
    if param_layer is not None and emb_ids:
        ids = torch.cat(emb_ids)
        index, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.zeros(len(index), lm.hidden_size).index_add_(0, inverse, torch.cat(emb_grads))
        # d(emb row) = scale * d(block-0 input) for a scaled lookup.
        out.embedding_index, out.embedding_grads = index, rows * (embedding_scale(lm) / n)
    return out
