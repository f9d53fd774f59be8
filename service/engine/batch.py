"""The running batch: generation rows and riding questions sharing one left-padded KV cache.

Rows join it by a prefill (`extend`, the shorter cache left-padded) or, riders, with an empty cache
(`board`); rows that finished leave it at the next step (`select`, dropping the cache columns no
remaining row uses). Engine thread only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from service.engine.types import GenerationHandle, SamplingParams, SteeringPlan, TokenLogprob
from steer_core.steering import RowSteering

if TYPE_CHECKING:
    from service.engine.scoring import Rider

_SERIALS = itertools.count()


@dataclass(eq=False)
class Row:
    """A generation request in the engine: its prompt, sampling, steering and what it has generated and sent."""

    handle: GenerationHandle
    prompt_ids: list[int]
    sampling: SamplingParams
    plan: SteeringPlan | None
    max_tokens: int
    generator: torch.Generator | None
    steering: RowSteering | None = None  # the plan, resolved on the engine thread
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for: one per generated token
    ends: list[int] = field(default_factory=list)  # where each of those tokens' text ends in the decoded text
    logprobs_sent: int = 0
    queued: bool = True  # counted in the engine's queue


@dataclass(eq=False)
class Batch:
    """The running batch: rows (generations and riding questions), their shared KV cache (left-padded),
    attention mask and next inputs."""

    rows: list[Row | Rider]
    cache: Any  # a transformers Cache
    mask: Tensor  # (B, T) 1 for real cache columns
    last: Tensor | None = None  # (B,) the token each row feeds next
    version: int = 0  # bumped whenever the rows change (the hooks re-plan)
    serial: int = field(default_factory=lambda: next(_SERIALS))

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (in order) and drop the cache columns no remaining row uses."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        self.cache.batch_select_indices(index)
        used = self.mask.bool().any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            map_cache(self.cache, lambda t: t[..., first:, :])
        self.version += 1

    def board(self, riders: list[Rider], device: torch.device) -> None:
        """Append `riders` with empty caches (all-padding columns); each feeds its first prompt token next."""
        n = len(riders)
        for layer in cache_layers(self.cache):
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((n, *layer.keys.shape[1:]))])
            layer.values = torch.cat([layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))])
        self.mask = torch.cat([self.mask, self.mask.new_zeros((n, self.mask.shape[1]))])
        self.rows += riders
        assert self.last is not None
        first = torch.tensor([r.prompt_ids[0] for r in riders], dtype=torch.long, device=device)
        self.last = torch.cat([self.last, first])
        self.version += 1

    def extend(self, other: Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad_self, pad_other = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(other.cache), strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, pad_self), left_pad(theirs.keys, pad_other)])
            mine.values = torch.cat([left_pad(mine.values, pad_self), left_pad(theirs.values, pad_other)])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = width
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (pad_self, 0)),
                               torch.nn.functional.pad(other.mask, (pad_other, 0))])
        self.rows += other.rows
        assert self.last is not None and other.last is not None
        self.last = torch.cat([self.last, other.last])
        self.version += 1


def cache_layers(cache: Any) -> list[Any]:
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    if not layers:
        raise RuntimeError(f"unsupported KV cache {type(cache).__name__}: "
                           "the engine needs per-layer keys and values")
    return layers


def map_cache(cache: Any, fn: Any) -> None:
    for layer in cache_layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = layer.keys.shape[-2]


def left_pad(t: Tensor, n: int) -> Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2)

