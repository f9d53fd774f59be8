"""The extra pass of COLD-FD: blocks ``0..L`` run again at ``theta + t d`` from block 0's inputs.

`run_blocks` takes what block 0 received in the served forward call (the steering hooks capture it),
adds the perturbation without materializing perturbed weights (each Linear's forward adds its low-rank
side path; norm gains are swapped for the call; both patches live for the pass only), calls each block's
`forward` directly (so the steering hooks do not fire inside), and never reads or writes the served KV
cache. With `t` a plain number it is the finite-difference pass (in fp32 with fp32 copies of the weights
when the model runs in lower precision); with `tangents` it is the forward-mode pass whose tangent is
``J_L(x) d`` exactly. Autograd's forward mode has no rule for SDPA's CPU kernel and is slow on dual
Linear layers and on duals mixed with plain tensors, so that pass writes out the rules for attention and
Linear layers and keeps every float it touches a dual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from transformers import Cache
from transformers.pytorch_utils import Conv1D

from steer_core.errors import SteerError
from steer_core.models import LanguageModel
from steer_core.perturbation import Perturbation, SidePath, within_blocks


def prepare_inputs(obj: Any, rows: Tensor | None, batch: int, dtype: torch.dtype | None) -> Any:
    """Block inputs for the extra pass: the wanted rows, floats in `dtype`, no KV cache (the pass must
    neither read nor write the served model's cache)."""
    if isinstance(obj, Cache):
        return None
    if isinstance(obj, Tensor):
        if rows is not None and obj.dim() >= 2 and obj.shape[0] == batch:
            obj = obj[rows.to(obj.device)]
        if dtype is not None and obj.is_floating_point():
            obj = obj.to(dtype)
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(prepare_inputs(o, rows, batch, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: (False if k == "use_cache" else prepare_inputs(v, rows, batch, dtype)) for k, v in obj.items()}
    return obj


class _BareBlock(nn.Module):
    """Calls a block's `forward` directly: the steering hooks on blocks must not fire inside the extra
    pass (they would re-enter this intervention and overwrite the captured block-0 inputs)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block.forward(*args, **kwargs)


_NO_FORWARD = object()


def _dual_linear(module: nn.Linear | Conv1D, side: SidePath | None) -> Callable[[Tensor], Any]:
    """A Linear/Conv1D forward for the forward-mode pass at ``t = 0``: one matmul for the primal and one
    for the tangent (autograd's forward mode spends three matmuls and a copy on a dual `linear`), plus
    the side path's own tangent ``side(x)``."""
    conv = isinstance(module, Conv1D)

    def forward(x: Tensor) -> Any:
        primal, tangent = fwad.unpack_dual(x)
        weight, bias = module.weight, module.bias
        if conv:
            y = primal @ weight if bias is None else torch.addmm(bias, primal.flatten(0, -2), weight).view(
                *primal.shape[:-1], -1)
            y_t = None if tangent is None else tangent @ weight
        else:
            y = F.linear(primal, weight, bias)
            y_t = None if tangent is None else F.linear(tangent, weight)
        if side is not None:
            if y_t is None or torch.is_grad_enabled():
                y_t = side(primal) if y_t is None else y_t + side(primal)
            else:  # in place, fused: these small side paths cost what their calls cost
                flat, x = y_t.view(-1, y_t.shape[-1]), primal.reshape(-1, primal.shape[-1])
                if side.U is not None and side.V is not None:
                    flat.addmm_(x @ side.V, side.U.T)
                if side.dense is not None:
                    flat.addmm_(x, side.dense.T)
                if side.bias is not None:
                    flat.add_(side.bias)
        return y if y_t is None else fwad.make_dual(y, y_t)

    return forward


class _PassPatches:
    """The perturbation ``theta + t * d`` of blocks ``0..upto`` for one pass, without materializing it:
    each perturbed Linear's forward adds ``t * side(x)``; each other module with perturbed parameters
    (norm gains) runs with ``p + t * d`` swapped in for the call. Forwards are patched on the instances
    for the pass only.

    With ``tangent=True`` (the forward-mode pass, ``t`` dual at 0 with tangent 1) every Linear of those
    blocks runs `_dual_linear` instead. Everything is undone by `remove`."""

    def __init__(self, lm: LanguageModel, pert: Perturbation, upto: int, t: Any, tangent: bool = False) -> None:
        self.t = t
        self.patched: list[tuple[nn.Module, Any]] = []
        modules = dict(lm.model.named_modules())
        try:
            if tangent:
                for path, module in modules.items():
                    if isinstance(module, nn.Linear | Conv1D) and within_blocks(lm, path, upto):
                        self._patch(module, _dual_linear(module, pert.sides.get(path)))
            for path, side in pert.sides.items():
                if not tangent and within_blocks(lm, path, upto):
                    self._patch(modules[path], self._side(modules[path], side))
            owners: dict[str, dict[str, Tensor | None]] = {}
            if tangent:
                # Every other parameter of these blocks (norm gains) becomes a dual with a zero tangent:
                # autograd's forward mode is ~10x slower on a dual times a plain tensor than on two duals.
                for path, module in modules.items():
                    if within_blocks(lm, path, upto) and not isinstance(module, nn.Linear | Conv1D):
                        for name, _ in module.named_parameters(recurse=False):
                            owners.setdefault(path, {})[name] = None
            for path, d in pert.params.items():
                if within_blocks(lm, path, upto):
                    owner, name = path.rsplit(".", 1)
                    owners.setdefault(owner, {})[name] = d
            for owner, deltas in owners.items():
                module = modules[owner]
                self._patch(module, self._moved(module, deltas, module.forward))
        except BaseException:
            self.remove()
            raise

    def _patch(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.patched.append((module, module.__dict__.get("forward", _NO_FORWARD)))
        module.forward = forward

    def _side(self, module: nn.Module, side: SidePath) -> Callable[[Tensor], Tensor]:
        """The Linear's forward plus ``t * side(x)`` (a patched forward, not a hook: these run once per
        Linear of the pass, so their per-call overhead is what they cost)."""
        if not isinstance(module, nn.Linear | Conv1D):
            raise TypeError(f"a side path perturbs a Linear or Conv1D, not a {type(module).__name__}")
        conv = isinstance(module, Conv1D)

        def forward(x: Tensor) -> Tensor:
            weight, bias = module.weight, module.bias
            flat_x = x.reshape(-1, x.shape[-1])
            if conv:
                out = flat_x @ weight if bias is None else torch.addmm(bias, flat_x, weight)
            else:
                out = F.linear(flat_x, weight, bias)
            if not isinstance(self.t, float) or torch.is_grad_enabled():
                out = out + self.t * side(flat_x)
            else:  # the fd pass without autograd: add in place, fused
                if side.U is not None and side.V is not None:
                    out.addmm_(flat_x @ side.V, side.U.T, alpha=self.t)
                if side.dense is not None:
                    out.addmm_(flat_x, side.dense.T, alpha=self.t)
                if side.bias is not None:
                    out.add_(side.bias, alpha=self.t)
            return out.view(*x.shape[:-1], out.shape[-1])

        return forward

    def _moved(self, module: nn.Module, deltas: dict[str, Tensor | None],
               forward: Callable[..., Any]) -> Callable[..., Any]:
        def moved(*args: Any, **kwargs: Any) -> Any:
            # Read the current value (it may itself be swapped in, e.g. an fp32 copy) and restore it after.
            saved = {name: module._parameters[name] for name in deltas}
            try:
                for name, d in deltas.items():
                    value = saved[name]
                    module._parameters[name] = _zero_dual(value) if d is None else value + self.t * d
                return forward(*args, **kwargs)
            finally:
                for name, value in saved.items():
                    module._parameters[name] = value

        return moved

    def remove(self) -> None:
        for module, saved in reversed(self.patched):
            if saved is _NO_FORWARD:
                del module.forward
            else:
                module.forward = saved
        self.patched.clear()


def _zero_dual(obj: Any) -> Any:
    """Floating tensors (in nested tuples, lists and dicts) as duals with a zero tangent."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point() or fwad.unpack_dual(obj).tangent is not None:
            return obj
        return fwad.make_dual(obj, torch.zeros_like(obj))
    if isinstance(obj, tuple | list):
        return type(obj)(_zero_dual(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _zero_dual(v) for k, v in obj.items()}
    return obj


def run_blocks(lm: LanguageModel, args: tuple, kwargs: dict, input_ids: Tensor | None,
               pert: Perturbation | None, t: Any, upto: int, dtype: torch.dtype,
               capture: Sequence[int] = ()) -> dict[int, Tensor]:
    """Run blocks ``0..upto`` on block-0 inputs (already row-selected) at ``theta + t * pert``, in `dtype`.

    Returns the outputs of the blocks in `capture` (and of `upto`). `t` may be a float or a forward-mode
    dual number; with ``pert=None`` it is the plain pass.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    rest = args[1:]
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    h = hidden.to(dtype)
    if pert is not None and len(pert.embedding_index):
        if input_ids is None:
            raise SteerError("COLD-FD needs the request's token ids (not input embeddings)", "input_ids")
        index = pert.embedding_index.to(h.device)  # sorted (torch.unique)
        ids = input_ids.to(h.device)
        slot = torch.searchsorted(index, ids).clamp(max=len(index) - 1)
        found = (index[slot] == ids).unsqueeze(-1).to(dtype)
        rows = pert.embedding_rows.to(dtype)[slot] * found
        h = h + t * (pert.embedding_scale * rows)
    dual = isinstance(t, Tensor) and fwad.unpack_dual(t).tangent is not None
    if dual:  # see _PassPatches: keep every float that meets the tangent a dual too
        h, rest, kwargs = _zero_dual(h), _zero_dual(rest), _zero_dual(kwargs)
    hooks = _PassPatches(lm, pert, upto, t, tangent=dual) if pert is not None else None
    cast = dtype != lm.dtype
    out: dict[int, Tensor] = {}
    try:
        for j in range(upto + 1):
            block = lm.blocks[j]
            if cast:  # fp32 copies of the block's weights for this pass only
                bare = _BareBlock(block)
                state = {f"block.{n}": p.to(dtype) for n, p in block.named_parameters()}
                state.update({f"block.{n}": b.to(dtype) for n, b in block.named_buffers() if b.is_floating_point()})
                result = torch.func.functional_call(bare, state, (h, *rest), kwargs)
            else:
                result = block.forward(h, *rest, **kwargs)
            h = result[0] if isinstance(result, tuple) else result
            if j in capture:
                out[j] = h
    finally:
        if hooks is not None:
            hooks.remove()
    out[upto] = h
    return out


_SDPA = F.scaled_dot_product_attention


def _sdpa_jvp(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """Scaled dot-product attention with its forward-mode rule written out: ``O = P V`` and
    ``dO = (P * (dS - rowsum(P * dS))) V + P dV`` with ``dS = (dQ K^T + Q dK^T) * scale``. (SDPA's CPU
    kernel has no forward-mode rule, and its math backend under forward mode costs ~10x a plain call.)"""
    if attn_mask is not None:
        attn_mask = fwad.unpack_dual(attn_mask).primal
    q, dq = fwad.unpack_dual(query)
    k, dk = fwad.unpack_dual(key)
    v, dv = fwad.unpack_dual(value)
    if dq is None and dk is None and dv is None:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)
    if dropout_p:
        raise ValueError("the forward-mode pass runs without dropout (the model must be in eval mode)")
    repeat = q.shape[-3] // k.shape[-3]
    if repeat > 1:  # grouped-query attention: query head h reads key/value head h // repeat
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        dk = None if dk is None else dk.repeat_interleave(repeat, -3)
        dv = None if dv is None else dv.repeat_interleave(repeat, -3)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows: 0, not NaN
    out = probs @ v
    d_scores = None
    if dq is not None:
        d_scores = (dq @ k.transpose(-1, -2)) * scale
    if dk is not None:
        term = (q @ dk.transpose(-1, -2)) * scale
        d_scores = term if d_scores is None else d_scores + term
    d_out = None
    if d_scores is not None:
        d_out = (probs * (d_scores - (probs * d_scores).sum(-1, keepdim=True))) @ v
    if dv is not None:
        d_out = probs @ dv if d_out is None else d_out + probs @ dv
    return fwad.make_dual(out, d_out)


class _ForwardModeAttention(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` to `_sdpa_jvp` for the forward-mode pass (thread-local)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _SDPA:
            return _sdpa_jvp(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def tangents(lm: LanguageModel, args: tuple, kwargs: dict, input_ids: Tensor | None, pert: Perturbation,
             upto: int, dtype: torch.dtype, capture: Sequence[int] = ()) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """``(Z_L, J_L(x) pert)`` for the captured layers, by forward-mode autodiff of one pass."""
    with fwad.dual_level(), _ForwardModeAttention():
        zero = torch.zeros((), dtype=dtype, device=lm.device)
        t = fwad.make_dual(zero, torch.ones_like(zero))
        duals = run_blocks(lm, args, kwargs, input_ids, pert, t, upto, dtype, capture)
        primal, tangent = {}, {}
        for layer, d in duals.items():
            p, tan = fwad.unpack_dual(d)
            primal[layer] = p.detach().clone()
            tangent[layer] = torch.zeros_like(primal[layer]) if tan is None else tan.detach().clone()
    return primal, tangent
