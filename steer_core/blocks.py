"""Run a model's decoder from a middle block: what block `L` is called with, and the logits from there.

Where everything below block `L` is the same for several runs (LoRA training, whose adapter starts at `L`;
reading one set of items under several steerings that start at `L`), the lower blocks run once and each
run starts at `L`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from steer_core.errors import SteerError
from steer_core.models import LanguageModel


class _Captured(Exception):
    pass


@torch.no_grad()
def block_inputs(lm: LanguageModel, batch: Any, layer: int) -> tuple[tuple, dict]:
    """What block `layer` is called with for `batch` (the model stops there): its positional args and its
    keyword args (hidden states, attention mask, position embeddings; no KV cache)."""
    box: dict[str, Any] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        box["args"], box["kwargs"] = args, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        raise _Captured

    handle = lm.blocks[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        lm.model(**batch, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["args"], box["kwargs"]


def map_rows(value: Any, batch: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """`value` (a block's inputs) with `fn` applied to every tensor of two or more dimensions that has `batch`
    rows (hidden states, masks, per-row position embeddings); the rest (position embeddings shared by the
    rows, 1-D position vectors, flags) stays as it is."""
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(map_rows(v, batch, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_rows(v, batch, fn) for k, v in value.items()}
    return value


def final_norm(lm: LanguageModel) -> nn.Module:
    """The norm between the last block and the LM head: the child of the blocks' parent whose class is a
    norm (`model.norm`, `transformer.ln_f`, `gpt_neox.final_layer_norm`)."""
    parent = lm.model.get_submodule(lm.block_path.rpartition(".")[0])
    norms = [m for name, m in parent.named_children() if "norm" in type(m).__name__.lower()]
    if len(norms) != 1:
        raise SteerError(f"cannot find the final norm of {type(lm.model).__name__}", "model")
    return norms[0]


def last_logits_from(lm: LanguageModel, layer: int, args: tuple, kwargs: dict) -> Tensor:
    """(B, vocab) logits at the last position, running blocks ``layer..n-1`` from block `layer`'s inputs."""
    hidden, rest = args[0] if args else kwargs["hidden_states"], args[1:]
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for block in lm.blocks[layer:]:
        out = block(hidden, *rest, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return lm.model.get_output_embeddings()(final_norm(lm)(hidden[:, -1:, :]))[:, -1, :]
