"""Steering mechanics: add a displacement to the output of decoder block `L` at chosen positions.

An `Intervention` is one (already weighted) effect at one layer: given the block's output for some rows
of the batch, it returns the displacement to add. A row's steering is a list of interventions
(`compose` blends weighted profiles into it); a batch carries one such list per row, so every row can
be steered differently. `apply(lm, rows)` registers the hooks for the duration of a `with` block and
removes them in `finally`; `SteeringHooks` is the lower-level handle a generation engine keeps open and
re-plans between batches.

Positions (per intervention):
- ``prompt``: every non-padding prompt position, no generated position (generated tokens feel it
  through the KV cache);
- ``last``: the last position of every forward call (the last prompt token at prefill, then each new
  token);
- ``all``: every non-padding position, prompt and generated.
They are defined on absolute positions, so generation with and without the KV cache steers the same
tokens. An intervention whose displacement at a position depends only on that position's activation sets
`position_local = True`; only such steering may run a prompt in several forward calls (`steers_in_chunks`).

Low-rank adapters (`LowRankDelta`, LoRA profiles) change module outputs inside the blocks instead:
`LowRankRows` adds each row's own ``(x A_i^T) B_i^T`` to every adapted Linear's output at every position,
gathered per row in one batched product per module (rows without an adapter get zero factors).

Note: transformers' `output_hidden_states` records block outputs before forward hooks change them; to
see the steered residual stream, read the input of block `L + 1`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from steer_core.errors import SteerError
from steer_core.method_spec import POSITIONS
from steer_core.models import LanguageModel

if TYPE_CHECKING:
    from typing_extensions import TypeIs

Positions = Literal["prompt", "last", "all"]


@dataclass
class ForwardContext:
    """What the hooks know about the forward call being run (filled by a pre-hook on the model)."""

    past_length: int = 0  # tokens already in the KV cache
    # Where the prompt ends, in this call's absolute positions: one length for the batch (the padded
    # prompt), or one per row, (B,), when rows of one call are at different stages (a serving engine's decode
    # step that also feeds another request's prompt a token at a time).
    prompt_length: int | tuple[int, ...] = 0
    seq_length: int = 0  # tokens in this call
    input_ids: Tensor | None = None  # (B, T) this call's tokens
    attention_mask: Tensor | None = None  # (B, past + T)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the model call's other arguments
    block0_args: tuple[Any, ...] = ()  # what block 0 was called with, for methods that re-run blocks 0..L
    block0_kwargs: dict[str, Any] = field(default_factory=dict)
    # layer -> batch rows whose block output the hooks changed in this call (a method that re-runs
    # blocks 0..L from block 0's inputs needs to know when Z_L is no longer the unsteered one).
    steered: dict[int, Tensor] = field(default_factory=dict)
    model: LanguageModel | None = None  # the model being run (for methods that re-run its blocks)

    def position_mask(self, positions: str, rows: Tensor | None = None) -> Tensor:
        """(n, T) boolean mask of the positions of this call that `positions` steers."""
        absolute = torch.arange(self.past_length, self.past_length + self.seq_length).unsqueeze(0)
        ends = torch.tensor(self.prompt_length).reshape(-1, 1)  # (1, 1) or (B, 1)
        if rows is not None and ends.shape[0] > 1:
            ends = ends[rows.cpu()]
        if positions == "prompt":
            mask = absolute < ends
        elif positions == "last":
            mask = absolute >= ends - 1
        elif positions == "all":
            mask = torch.ones_like(absolute, dtype=torch.bool)
        else:
            raise SteerError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}",
                             "positions")
        if self.attention_mask is not None:
            real = self.attention_mask[:, self.past_length:self.past_length + self.seq_length].bool().cpu()
            if rows is not None:
                real = real[rows.cpu()]
            mask = mask & real
        elif rows is not None:
            mask = mask.expand(len(rows), -1)
        return mask


@runtime_checkable
class Intervention(Protocol):
    """One weighted effect at one layer. Implementations are small frozen dataclasses (so `layer` and
    `positions` are read-only here: a frozen field satisfies a property, not a settable attribute)."""

    @property
    def layer(self) -> int: ...

    @property
    def positions(self) -> str: ...

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        """Displacement for `hidden` (n, T, D): the block-`layer` output of batch rows `rows`.

        Returns a tensor broadcastable to (n, T, D); the caller masks it to the steered positions.
        """
        ...

    @classmethod
    def blend(cls, weighted: Sequence[tuple[Any, float]]) -> Intervention:
        """One intervention equal to the weighted combination of several of this class (same layer
        and positions)."""
        ...


@dataclass(frozen=True, eq=False)
class ConstantShift:
    """A constant vector added at every steered position (DiffMean, COLD-Kernel unit kernel)."""

    layer: int
    positions: str
    vector: Tensor  # (D,)
    position_local: ClassVar[bool] = True

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        return self.vector.to(device=hidden.device, dtype=hidden.dtype).view(1, 1, -1)

    @classmethod
    def blend(cls, weighted: Sequence[tuple[ConstantShift, float]]) -> ConstantShift:
        first = weighted[0][0]
        vector = sum((w * iv.vector.float() for iv, w in weighted), torch.zeros_like(first.vector, dtype=torch.float))
        return cls(layer=first.layer, positions=first.positions, vector=vector)


@dataclass(frozen=True, eq=False)
class Scaled:
    """A weighted sum of interventions whose displacements simply add (the default blend)."""

    layer: int
    positions: str
    parts: tuple[tuple[Any, float], ...]

    def displacement(self, hidden: Tensor, ctx: ForwardContext, rows: Tensor) -> Tensor:
        return sum(w * iv.displacement(hidden, ctx, rows) for iv, w in self.parts)

    @classmethod
    def blend(cls, weighted: Sequence[tuple[Any, float]]) -> Scaled:
        first = weighted[0][0]
        return cls(layer=first.layer, positions=first.positions, parts=tuple(weighted))


@runtime_checkable
class LowRankDelta(Protocol):
    """An intervention that adds ``(x A^T) B^T`` to the output of Linear modules (a LoRA adapter) at every
    position, rather than a displacement at a block's output. `layer` is the first block it changes."""

    layer: int
    positions: str

    def low_rank(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Module path -> (A (r, in), B (out, r)) with every scale folded into B."""
        ...


class LowRankRows:
    """Forward hooks on the Linear modules that some row's low-rank deltas adapt: each adds, for every row,
    ``(x_i A_i^T) B_i^T`` with that row's factors (a row's several deltas concatenated along the rank,
    padded with zeros to the batch's largest rank) in two batched matmuls per module and call.

    `active` is cleared while other interventions run their own passes through the blocks (COLD-FD's extra
    pass), so those passes see the base weights whatever the batch holds."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.modules = dict(lm.model.named_modules())
        self.active = True
        self.first_block: dict[int, int] = {}  # batch row -> first block its deltas change
        self._tables: dict[str, tuple[Tensor | None, Tensor, Tensor]] = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._batch = 0

    def plan(self, rows: Sequence[Sequence[LowRankDelta]]) -> None:
        per_module: dict[str, dict[int, tuple[list[Tensor], list[Tensor]]]] = {}
        self.first_block = {}
        for i, row in enumerate(rows):
            for iv in row:
                self.first_block[i] = min(self.first_block.get(i, iv.layer), iv.layer)
                for path, (a, b) in iv.low_rank().items():
                    parts = per_module.setdefault(path, {}).setdefault(i, ([], []))
                    parts[0].append(a)
                    parts[1].append(b)
        self._batch = len(rows)
        tables: dict[str, tuple[Tensor | None, Tensor, Tensor]] = {}
        for path, by_row in per_module.items():
            module = self.modules.get(path)
            if module is None:
                raise SteerError(f"the model has no module {path!r} to adapt", "profile")
            weight = module.weight
            order = sorted(by_row)
            a_rows = [torch.cat(by_row[i][0]) for i in order]
            b_rows = [torch.cat(by_row[i][1], dim=1) for i in order]
            rank = max(a.shape[0] for a in a_rows)
            # (n, in, R) and (n, R, out): the transposes a batched x @ A^T @ B^T wants, zero-padded ranks.
            a_t = torch.zeros(len(order), a_rows[0].shape[1], rank, dtype=weight.dtype, device=weight.device)
            b_t = torch.zeros(len(order), rank, b_rows[0].shape[0], dtype=weight.dtype, device=weight.device)
            for k, (a, b) in enumerate(zip(a_rows, b_rows, strict=True)):
                a_t[k, :, :a.shape[0]] = a.T.to(a_t)
                b_t[k, :b.shape[1], :] = b.T.to(b_t)
            index = None if order == list(range(len(rows))) else torch.tensor(order, device=weight.device)
            tables[path] = (index, a_t, b_t)
        for path in [p for p in self._handles if p not in tables]:
            self._handles.pop(path).remove()
        for path in tables:
            if path not in self._handles:
                self._handles[path] = self.modules[path].register_forward_hook(self._make_hook(path))
        self._tables = tables

    def _make_hook(self, path: str) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            table = self._tables.get(path)
            if not self.active or table is None:
                return None
            index, a_t, b_t = table
            x = args[0]
            if x.shape[0] != self._batch:
                raise RuntimeError(f"low-rank deltas planned for {self._batch} rows, batch has {x.shape[0]}")
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            if index is None:
                delta = torch.bmm(torch.bmm(flat.to(a_t.dtype), a_t), b_t)
                return output + delta.view(output.shape).to(output.dtype)
            delta = torch.bmm(torch.bmm(flat[index].to(a_t.dtype), a_t), b_t)
            out = output.clone()
            out.view(x.shape[0], -1, out.shape[-1]).index_add_(0, index, delta.to(out.dtype))
            return out

        return hook

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._tables = {}


RowSteering = list[Intervention]


def steers_in_chunks(row: RowSteering) -> bool:
    """Whether `row` steers a prompt run in several forward calls (chunked prefill, a KV cache carrying the
    earlier positions) as it steers the prompt in one: every intervention is `position_local` (a `Scaled`
    blend when all its parts are). Those that read the call's last position or re-run the blocks over the
    whole call (COLD-Kernel, COLD-FD) are not."""
    for iv in row:
        parts = [part for part, _ in iv.parts] if isinstance(iv, Scaled) else [iv]
        if not all(getattr(part, "position_local", False) for part in parts):
            return False
    return True


def is_one_steering(rows: Sequence[RowSteering | None] | RowSteering) -> TypeIs[RowSteering]:
    """Whether `rows` is one steering for every row, rather than one steering (or None) per row."""
    return bool(rows) and not isinstance(rows[0], list | type(None))


def compose(weighted: Sequence[tuple[Intervention, float]]) -> RowSteering:
    """Blend weighted interventions into one row's steering.

    Interventions of one class, layer and positions are merged by that class's `blend` (constant
    vectors add, COLD-FD gradients add, ODESteer barriers add); the rest stay separate and their
    displacements add.
    """
    groups: dict[tuple[type, int, str], list[tuple[Intervention, float]]] = {}
    for iv, w in weighted:
        w = float(w)
        if not torch.isfinite(torch.tensor(w)):
            raise SteerError(f"weight {w} is not finite", "weight")
        groups.setdefault((type(iv), iv.layer, iv.positions), []).append((iv, w))
    out: RowSteering = []
    for (cls, _, _), members in groups.items():
        blend = getattr(cls, "blend", None)
        out.append(blend(members) if blend is not None else Scaled.blend(members))
    return out


class SteeringHooks:
    """Forward hooks on one model that steer each row of each batch by its own plan.

    Only one `SteeringHooks` may be attached to a model at a time: a second one (another thread
    steering the same model) raises instead of silently mixing displacements. The model's own hook
    table says whether one is attached; there is no registry beside it.

    Plain `ConstantShift`s are summed per (layer, positions) into one (batch, hidden) table when a plan
    is set, so a batch whose rows each carry a different constant vector costs one add per steered
    layer. With `on_error`, an intervention whose displacement raises is reported as
    `on_error(rows, exc)` (the batch rows it steers) and skipped, so a serving engine can fail those
    rows' requests alone; without it the exception propagates.
    """

    def __init__(self, lm: LanguageModel,
                 on_error: Callable[[Tensor, Exception], None] | None = None) -> None:
        self.lm = lm
        self.ctx = ForwardContext()
        self.on_error = on_error
        self._rows: list[RowSteering] = []
        self._every_row: RowSteering | None = None
        self._prompt_length: int | tuple[int, ...] | None = None
        self._plans: dict[int, list[tuple[Intervention, Tensor]]] = {}
        # layer -> [(positions, (B, D) summed constant vectors of each row)]
        self._constants: dict[int, list[tuple[str, Tensor]]] = {}
        # positions -> this forward call's (B, T) steered-position mask, None when it steers nothing
        self._masks: dict[str, Tensor | None] = {}
        self._low_rank: LowRankRows | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._owner = threading.get_ident()
        if attached_hooks(lm) is not None:
            raise RuntimeError("this model is already being steered by another SteeringHooks; "
                               "one engine thread must own the model")
        try:
            self._handles.append(lm.model.register_forward_pre_hook(self._capture_call, with_kwargs=True))
            self._handles.append(lm.blocks[0].register_forward_pre_hook(self._capture_block0, with_kwargs=True))
            for layer, block in enumerate(lm.blocks):
                self._handles.append(block.register_forward_hook(self._make_hook(layer)))
        except BaseException:
            self.remove()
            raise

    def plan(self, rows: Sequence[RowSteering | None], prompt_length: int | Sequence[int] | None = None) -> None:
        """Set the steering of each batch row for the following forward calls.

        `prompt_length` is the padded prompt length (or one per row: where each row's prompt ends, in
        absolute positions); leave it None when every forward call starts a new prompt (scoring) or runs
        with a KV cache (generation: the first call's length is taken).
        """
        for layer in {iv.layer for row in rows if row for iv in row}:
            self.lm.check_layer(layer)
        self._every_row = None
        self._rows = [list(r) if r else [] for r in rows]
        self._prompt_length = prompt_length if prompt_length is None or isinstance(prompt_length, int) \
            else tuple(prompt_length)
        plans: dict[int, dict[int, tuple[Intervention, list[int]]]] = {}
        constants: dict[tuple[int, str], Tensor] = {}
        low_rank: list[list[LowRankDelta]] = [[] for _ in self._rows]
        for i, row in enumerate(self._rows):
            for iv in row:
                if isinstance(iv, LowRankDelta):
                    low_rank[i].append(iv)
                    continue
                if type(iv) is ConstantShift:  # exact type: a subclass may override displacement
                    table = constants.get((iv.layer, iv.positions))
                    if table is None:
                        table = torch.zeros(len(self._rows), iv.vector.shape[-1])
                        constants[(iv.layer, iv.positions)] = table
                    table[i] += iv.vector.detach().float().cpu()
                    continue
                by_id = plans.setdefault(iv.layer, {})
                by_id.setdefault(id(iv), (iv, []))[1].append(i)
        self._plans = {layer: [(iv, torch.tensor(idx)) for iv, idx in ivs.values()] for layer, ivs in plans.items()}
        self._constants = {}
        for (layer, positions), table in constants.items():
            self._constants.setdefault(layer, []).append((positions, table.to(self.lm.device)))
        if any(low_rank):
            if self._low_rank is None:
                self._low_rank = LowRankRows(self.lm)
            self._low_rank.plan(low_rank)
        elif self._low_rank is not None:
            self._low_rank.remove()
            self._low_rank = None

    def plan_every_row(self, row: RowSteering, prompt_length: int | None = None) -> None:
        """Steer every row of whatever batch comes next with the same `row`."""
        self.plan([], prompt_length)
        for layer in {iv.layer for iv in row}:
            self.lm.check_layer(layer)
        self._every_row = list(row)

    def use_context(self, ctx: ForwardContext) -> None:
        """Steer the following block runs as part of the forward call `ctx` describes: for a caller that
        runs blocks itself after a model call (several steerings of one batch, stacked along the rows)."""
        self.ctx = ctx
        self._masks = {}

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("a steered model was run from a second thread; one engine thread must own it")

    def _capture_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._check_thread()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise RuntimeError("the model was called with neither input_ids nor inputs_embeds")
        seq = int(tokens.shape[1])
        # transformers 5.24 renamed `past_key_values` to `cache` (generate passes the new name; callers
        # may still pass the old one until 5.40).
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if cache is not None and not hasattr(cache, "get_seq_length") and len(cache) > 0:  # legacy tuples
            past = int(cache[0][0].shape[-2])
        prompt: int | tuple[int, ...]
        if self._prompt_length is not None:
            prompt = self._prompt_length
        elif past == 0:
            prompt = seq
        else:
            prompt = self.ctx.prompt_length
        batch = int(tokens.shape[0])
        if self._every_row is not None and len(self._rows) != batch:
            every_row = self._every_row
            self.plan([every_row] * batch, self._prompt_length)
            self._every_row = every_row
        if self._rows and len(self._rows) != batch:
            raise RuntimeError(f"steering planned for {len(self._rows)} rows, batch has {batch}")
        self.ctx = ForwardContext(past_length=past, prompt_length=prompt, seq_length=seq, input_ids=input_ids,
                                  attention_mask=kwargs.get("attention_mask"),
                                  model_kwargs={k: v for k, v in kwargs.items() if k != "input_ids"},
                                  model=self.lm)
        self._masks = {}
        if self._low_rank is not None:
            self._low_rank.active = True
            for row, block in self._low_rank.first_block.items():
                self._mark(block, torch.tensor([row]))

    def _capture_block0(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.ctx.block0_args = args
        self.ctx.block0_kwargs = kwargs

    def _mask(self, positions: str, batch: int, device: torch.device) -> Tensor | None:
        """This call's (B, T) mask of the positions `positions` steers, computed once per call."""
        if positions not in self._masks:
            mask = self.ctx.position_mask(positions).expand(batch, -1)
            self._masks[positions] = mask.to(device) if bool(mask.any()) else None
        return self._masks[positions]

    def _make_hook(self, layer: int) -> Callable[[nn.Module, tuple, Any], Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            plan = self._plans.get(layer)
            constants = self._constants.get(layer)
            if not plan and not constants:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden
            for positions, table in constants or ():
                mask = self._mask(positions, hidden.shape[0], hidden.device)
                if mask is not None:
                    shift = table.to(hidden.dtype).unsqueeze(1) * mask.unsqueeze(-1).to(hidden.dtype)
                    steered = steered + shift
                    self._mark(layer, table.abs().sum(dim=-1).nonzero().flatten())
            if self._low_rank is not None:
                self._low_rank.active = False  # passes the displacements run see the base weights
            for iv, rows in plan or ():
                rows = rows.to(hidden.device)
                full = self._mask(iv.positions, hidden.shape[0], hidden.device)
                if full is None:
                    continue
                mask = full[rows]
                if not mask.any():
                    continue
                try:
                    delta = iv.displacement(hidden[rows], self.ctx, rows)
                    delta = delta.to(hidden.dtype) * mask.unsqueeze(-1).to(hidden.dtype)
                    delta = delta.expand(len(rows), hidden.shape[1], -1)
                except Exception as exc:
                    if self.on_error is None:
                        raise
                    self.on_error(rows.cpu(), exc)
                    continue
                if steered is hidden:
                    steered = hidden.clone()
                steered.index_add_(0, rows, delta)
                self._mark(layer, rows)
            if self._low_rank is not None:
                self._low_rank.active = True
            if steered is hidden:
                return None
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _mark(self, layer: int, rows: Tensor) -> None:
        done = self.ctx.steered.get(layer)
        rows = rows.cpu()
        self.ctx.steered[layer] = rows if done is None else torch.cat([done, rows])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._low_rank is not None:
            self._low_rank.remove()
            self._low_rank = None


def attached_hooks(lm: LanguageModel) -> SteeringHooks | None:
    """The `SteeringHooks` attached to `lm`, read from the model's own pre-hooks."""
    for hook in lm.model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SteeringHooks):
            return owner
    return None


@contextmanager
def apply(lm: LanguageModel, rows: Sequence[RowSteering | None] | RowSteering,
          prompt_length: int | None = None) -> Iterator[SteeringHooks]:
    """Steer `lm` inside a `with` block: one `RowSteering` per batch row, or one for every row."""
    hooks = SteeringHooks(lm)
    try:
        if is_one_steering(rows):
            hooks.plan_every_row(rows, prompt_length)
        else:
            hooks.plan(rows, prompt_length)
        yield hooks
    finally:
        hooks.remove()
