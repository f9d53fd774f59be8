"""The one prompt formatter and the one answer-distribution reader.

Every method, metric and endpoint formats multiple-choice prompts with `format_prompt` and reads the
model's answer distribution with `answer_distributions`: the softmax over the option letters' logits at
the first assistant position, renormalized over the item's valid options (`answer_distributions_under`
reads the same items under several steerings, as a build's search does, sharing what they share;
`PromptsAtBlock` reads them under one steering after another, sharing the blocks below the steered one;
`read_answers` also returns the prompts' mean hidden states after some blocks, from the same calls).

Option order (`steer_core.option_orders`): the readers are debiased by default (`orders = 2`): each question
is read in its options' order and reversed, in the same batches, and the two distributions (the reversed one
mapped back) are averaged, as are the prompts' states. The result is the same whichever order the caller
gave the options in, at twice the reads; `orders = 1` reads the given order only (what generation sees).
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import BatchEncoding, PreTrainedTokenizerBase

from steer_core.blocks import block_inputs, last_logits_from, map_rows
from steer_core.data import OpinionItem
from steer_core.models import LanguageModel
from steer_core.option_orders import (
    DEFAULT_READ_ORDERS,
    average_orders,
    check_read_orders,
    in_both_orders,
    split_orders,
)
from steer_core.steering import ForwardContext, RowSteering, apply, is_one_steering, steers_in_chunks

LETTERS = string.ascii_uppercase
SYSTEM_INSTRUCTION = "Answer the question with the letter of one option only."


def format_question(item: OpinionItem) -> str:
    lines = [item.question, ""]
    lines += [f"{LETTERS[k]}. {option}" for k, option in enumerate(item.options)]
    return "\n".join(lines)


def format_prompt(tokenizer: PreTrainedTokenizerBase, item: OpinionItem) -> str:
    """The model's chat template when it has one; a plain `Question/Answer:` layout otherwise."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": SYSTEM_INSTRUCTION},
                    {"role": "user", "content": format_question(item)}]
        # transformers types the result for every `tokenize`; with tokenize=False it is the text.
        return tokenizer.apply_chat_template(  # type: ignore[return-value]
            messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_INSTRUCTION}\n\nQuestion: {format_question(item)}\nAnswer:"


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, item: OpinionItem) -> list[int]:
    """The token ids of `item`'s prompt, as `encode_items` tokenizes it (without the padding)."""
    return list(tokenizer.encode(format_prompt(tokenizer, item), add_special_tokens=not tokenizer.chat_template))


def option_token_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    """Token id of each option letter as the model would write it first after the prompt."""
    prefix = "" if tokenizer.chat_template else " "
    ids = []
    for letter in LETTERS[:n]:
        tokens = tokenizer.encode(prefix + letter, add_special_tokens=False)
        ids.append(tokens[-1])
    return ids


def encode(lm: LanguageModel, texts: Sequence[str]) -> BatchEncoding:
    """Tokenize with left padding (so the last position is every row's last token) onto the model's device.

    Where the model takes `position_ids`, each row's positions count its real tokens only (as the engine and
    `generate` count them): a model with absolute position embeddings (GPT-2) then reads a prompt the same
    alone and beside longer ones (rotary models do either way)."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    batch = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template)
    if _takes(type(lm.model).forward, "position_ids"):
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch.to(lm.device)


def encode_items(lm: LanguageModel, items: Sequence[OpinionItem]) -> BatchEncoding:
    return encode(lm, [format_prompt(lm.tokenizer, it) for it in items])


def option_logits(lm: LanguageModel, last_logits: Tensor, items: Sequence[OpinionItem]) -> Tensor:
    """(B, K) letter logits at the answer position, -inf past each item's last option (K = most options)."""
    k_max = max(len(it.options) for it in items)
    ids = torch.tensor(option_token_ids(lm.tokenizer, k_max), device=last_logits.device)
    letters = last_logits[:, ids].float()
    counts = torch.tensor([len(it.options) for it in items], device=last_logits.device)
    valid = torch.arange(k_max, device=last_logits.device).unsqueeze(0) < counts.unsqueeze(1)
    return letters.masked_fill(~valid, float("-inf"))


def option_log_probs(lm: LanguageModel, last_logits: Tensor, items: Sequence[OpinionItem]) -> Tensor:
    """(B, K) log-probabilities over each item's options (renormalized over the valid letters)."""
    return torch.log_softmax(option_logits(lm, last_logits, items), dim=-1)


Steering = RowSteering | Sequence[RowSteering | None] | None


def answer_distributions(lm: LanguageModel, items: Sequence[OpinionItem], steering: Steering = None,
                         batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                         orders: int = DEFAULT_READ_ORDERS) -> list[np.ndarray]:
    """The model's answer distribution over each item's options, optionally steered; with `orders = 2` the
    mean of the reads in both option orders (the module's docstring says why).

    `steering` is one `RowSteering` for every item, or a list with one entry per item.
    """
    return read_answers(lm, items, steering, (), batch_size, progress, orders).distributions


@dataclass
class AnswerRead:
    """What one read of some items gives: each item's answer distribution and, for each block asked for,
    each prompt's hidden state after that block averaged over the prompt's tokens, (items, hidden); both
    averaged over the orders read. `by_order`: each order's distributions on their own (the given order
    first, then reversed and mapped back to the given order), what a single-order reader would see."""

    distributions: list[np.ndarray]
    states: dict[int, np.ndarray]
    by_order: list[list[np.ndarray]]


@torch.no_grad()
def read_answers(lm: LanguageModel, items: Sequence[OpinionItem], steering: Steering = None,
                 state_layers: Sequence[int] = (), batch_size: int = 16,
                 progress: Callable[[int, int], None] | None = None,
                 orders: int = DEFAULT_READ_ORDERS) -> AnswerRead:
    """`answer_distributions`, and the prompts' mean hidden states after the blocks `state_layers`, from the
    same forward calls. A state is read before the steering of its own block acts on that block's output
    (its hook comes first), so a steering at block L does not move the states of blocks up to L. With
    `orders = 2` both orders are read in the same batches and averaged (distributions and states)."""
    if check_read_orders(orders) == 1:
        return _read(lm, items, steering, state_layers, batch_size, progress)
    per_item = _per_item_steering(steering, len(items))
    read = _read(lm, in_both_orders(items), None if per_item is None else per_item * 2, state_layers, batch_size,
                 None if progress is None else lambda done, total: progress(done // 2, total // 2))
    return _averaged_orders(read, len(items))


def _averaged_orders(read: AnswerRead, n: int) -> AnswerRead:
    """A read of `in_both_orders(items)` (n items) as a read of the items: both orders averaged."""
    by_order = split_orders(read.distributions, n)
    states = {layer: 0.5 * (s[:n] + s[n:]) for layer, s in read.states.items()}
    return AnswerRead(average_orders(by_order), states, by_order)


def _read(lm: LanguageModel, items: Sequence[OpinionItem], steering: Steering, state_layers: Sequence[int],
          batch_size: int, progress: Callable[[int, int], None] | None) -> AnswerRead:
    """Each item read once, in its own option order."""
    per_item = _per_item_steering(steering, len(items))
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    states = {layer: np.zeros((len(items), lm.hidden_size)) for layer in state_layers}
    order = by_length(lm, items)
    for start in range(0, len(items), batch_size):
        indices = order[start:start + batch_size]
        chunk = [items[i] for i in indices]
        batch = encode_items(lm, chunk)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        handles = [lm.blocks[layer].register_forward_hook(_keep_prompt_mean(states[layer], indices, mask))
                   for layer in state_layers]
        try:
            rows = [per_item[i] for i in indices] if per_item is not None else None
            if rows is not None and any(rows):
                with apply(lm, rows):
                    logits = lm.model(**batch, use_cache=False, **last_logits_only(lm)).logits[:, -1, :]
            else:
                logits = lm.model(**batch, use_cache=False, **last_logits_only(lm)).logits[:, -1, :]
        finally:
            for handle in handles:
                handle.remove()
        probs = option_log_probs(lm, logits, chunk).exp().cpu().numpy()
        for row, (i, it) in enumerate(zip(indices, chunk, strict=True)):
            out[i] = probs[row, :len(it.options)].astype(np.float64)
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return AnswerRead(out, states, [out])


def _keep_prompt_mean(out: np.ndarray, rows: list[int], mask: Tensor) -> Callable[..., None]:
    """A block's forward hook writing each prompt's output state averaged over its tokens into `out[rows]`."""
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).float()
        out[rows] = ((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy()
    return hook


@dataclass
class BlockBatch:
    """Prompts run together through the blocks below one block: which of the caller's items they are
    (`indices`), their left-padded tokens, and what that block is called with for them."""

    indices: list[int]
    input_ids: Tensor
    attention_mask: Tensor
    args: tuple
    kwargs: dict

    def rows(self, rows: Sequence[int], indices: list[int]) -> BlockBatch:
        """Rows `rows` of this batch, as the caller's items `indices`."""
        index = torch.tensor(rows, device=self.input_ids.device)
        return self._per_row(lambda t: t[index], indices)

    def stacked(self, copies: int) -> BlockBatch:
        """`copies` copies of the batch stacked along the rows (one per steering read in one run)."""
        if copies == 1:
            return self
        return self._per_row(lambda t: t.repeat(copies, *([1] * (t.dim() - 1))), self.indices * copies)

    def _per_row(self, fn: Callable[[Tensor], Tensor], indices: list[int]) -> BlockBatch:
        """This batch with `fn` applied to every tensor that has one row per prompt."""
        n = len(self.indices)
        return BlockBatch(indices, fn(self.input_ids), fn(self.attention_mask), map_rows(self.args, n, fn),
                          map_rows(self.kwargs, n, fn))

    def context(self, lm: LanguageModel) -> ForwardContext:
        """The forward call the steering hooks see while the upper blocks run on this batch: whole prompts."""
        seq = int(self.input_ids.shape[1])
        return ForwardContext(prompt_length=seq, seq_length=seq, input_ids=self.input_ids,
                              attention_mask=self.attention_mask, model=lm)


# (model fingerprint, layer) -> {prompt: (the batch it was run in, its row)} while `reuse_block_inputs` is on.
_BLOCK_MEMO: ContextVar[dict[tuple[str, int], dict[str, tuple[BlockBatch, int]]] | None] = ContextVar(
    "block_input_memo", default=None)


@contextmanager
def reuse_block_inputs() -> Iterator[None]:
    """Within this block a prompt that `block_batches(..., keep=True)` has run up to a block is not run there
    again: a LoRA build trains its folds on subsets of the items its full run has read, and reads each fold's
    held-out items from the same."""
    token = _BLOCK_MEMO.set({})
    try:
        yield
    finally:
        _BLOCK_MEMO.reset(token)


def block_batches(lm: LanguageModel, items: Sequence[OpinionItem], layer: int, batch_size: int,
                  keep: bool = False) -> Iterator[BlockBatch]:
    """`items` in batches of at most `batch_size` prompts of like lengths, each with what block `layer` is
    called with (the blocks below run unsteered, as the batch comes). Within `reuse_block_inputs`, items whose
    prompts were kept come first, as rows of the batches they were run in; `keep` keeps the prompts run here."""
    prompts = [format_prompt(lm.tokenizer, it) for it in items]
    memo = _BLOCK_MEMO.get()
    known = memo.setdefault((lm.fingerprint, layer), {}) if memo is not None else {}
    found: dict[int, tuple[BlockBatch, list[int], list[int]]] = {}  # id(source) -> (source, rows, indices)
    missing = []
    for i, prompt in enumerate(prompts):
        if prompt in known:
            source, row = known[prompt]
            _, rows, indices = found.setdefault(id(source), (source, [], []))
            rows.append(row)
            indices.append(i)
        else:
            missing.append(i)
    for source, rows, indices in found.values():
        for start in range(0, len(rows), batch_size):
            yield source.rows(rows[start:start + batch_size], indices[start:start + batch_size])
    order = [missing[j] for j in by_length(lm, [items[i] for i in missing])]
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = encode(lm, [prompts[i] for i in indices])
        args, kwargs = block_inputs(lm, batch, layer)
        run = BlockBatch(indices, batch["input_ids"], batch["attention_mask"], args, kwargs)
        if keep and memo is not None:
            known.update((prompts[i], (run, row)) for row, i in enumerate(indices))
        yield run


@torch.no_grad()
def answer_distributions_under(lm: LanguageModel, items: Sequence[OpinionItem],
                               steerings: Sequence[RowSteering | None], batch_size: int = 16,
                               rows_per_call: int = 48, orders: int = DEFAULT_READ_ORDERS) -> list[list[np.ndarray]]:
    """Every item's answer distribution under each of `steerings` (None: unsteered), one list per steering;
    with `orders = 2` the mean of both option orders (read together, as `read_answers` does).

    Where every steering is position-local (`steers_in_chunks`: constant vectors, LoRA adapters, ODESteer
    flows; what they add at a position depends on that position alone), the blocks below the lowest steered
    one run once per batch of items (or not at all, for prompts kept by `reuse_block_inputs`) and each
    steering runs the rest: a build reads one fold under every candidate strength. Otherwise this is
    `answer_distributions` over the items once per steering."""
    if check_read_orders(orders) == 2:
        both = answer_distributions_under(lm, in_both_orders(items), steerings, batch_size, rows_per_call, orders=1)
        return [average_orders(split_orders(reads, len(items))) for reads in both]
    rows = [list(s) if s else [] for s in steerings]
    if not any(rows) or not all(steers_in_chunks(row) for row in rows):
        flat = answer_distributions(lm, list(items) * len(rows), [row or None for row in rows for _ in items],
                                    batch_size=batch_size, orders=1)
        return [flat[k * len(items):(k + 1) * len(items)] for k in range(len(rows))]
    first = min(iv.layer for row in rows for iv in row)
    out = [[np.empty(0)] * len(items) for _ in rows]
    for run in block_batches(lm, items, first, batch_size):
        chunk = [items[i] for i in run.indices]
        together = max(1, rows_per_call // len(chunk))  # steerings per partial run, each on every item
        with apply(lm, [[] for _ in chunk]) as hooks:
            for k0 in range(0, len(rows), together):
                group = rows[k0:k0 + together]
                stacked = run.stacked(len(group))
                # The partial run steers as a forward call over these tokens (they and their padding say
                # which positions are steered), one stacked copy of the batch per steering.
                hooks.plan([row for row in group for _ in chunk])
                hooks.use_context(stacked.context(lm))
                logits = last_logits_from(lm, first, stacked.args, stacked.kwargs)
                probs = option_log_probs(lm, logits, chunk * len(group)).exp().cpu().numpy()
                for g in range(len(group)):
                    for r, (i, it) in enumerate(zip(run.indices, chunk, strict=True)):
                        out[k0 + g][i] = probs[g * len(chunk) + r, :len(it.options)].astype(np.float64)
    return out


class PromptsAtBlock:
    """Items' prompts run once through the blocks below `layer`, then read (`read`) under one steering after
    another, each acting at `layer` or above: for a caller whose next steering depends on the last read (a
    subject's fit reads its answers unsteered, blends a vector from them, then reads them under it), so each
    further read costs the upper blocks only. Reads are `read_answers`'s, with the states of `state_layers`:
    those below `layer` come from the shared run and are the same in every read.

    `inputs`, when given, are the prompts' inputs to block `layer` kept from an earlier run (`block_states`:
    one (tokens, hidden) array per prompt of `in_both_orders(items)`, or of `items` with `orders = 1`); then no
    block below `layer` runs here, and `state_layers` must be `layer` or above. They stand for the blocks below
    only where every block is called with the same masks and position embeddings (`blocks_share_inputs`)."""

    def __init__(self, lm: LanguageModel, items: Sequence[OpinionItem], layer: int, state_layers: Sequence[int] = (),
                 batch_size: int = 16, orders: int = DEFAULT_READ_ORDERS,
                 inputs: Sequence[np.ndarray] | None = None) -> None:
        lm.check_layer(layer, "layer")
        self.lm, self.layer, self.n = lm, layer, len(items)
        self.orders = check_read_orders(orders)
        self.prompts = in_both_orders(items) if self.orders == 2 else list(items)
        self.upper_state_layers = [s for s in state_layers if s >= layer]
        self.lower_states = {s: np.zeros((len(self.prompts), lm.hidden_size)) for s in state_layers if s < layer}
        if inputs is not None and (len(inputs) != len(self.prompts) or self.lower_states):
            raise ValueError(f"kept inputs are one per prompt ({len(self.prompts)}, got {len(inputs)}) and give no "
                             f"states below block {layer}")
        self.runs: list[BlockBatch] = []
        order = by_length(lm, self.prompts)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                batch = encode_items(lm, [self.prompts[i] for i in indices])
                if inputs is not None:
                    args, kwargs = _with_hidden(*block_inputs(lm, batch, 0), batch["attention_mask"],
                                                [inputs[i] for i in indices])
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    handles = [lm.blocks[s].register_forward_hook(_keep_prompt_mean(states, indices, mask))
                               for s, states in self.lower_states.items()]
                    try:
                        args, kwargs = block_inputs(lm, batch, layer)
                    finally:
                        for handle in handles:
                            handle.remove()
                self.runs.append(BlockBatch(indices, batch["input_ids"], batch["attention_mask"], args, kwargs))

    @torch.no_grad()
    def read(self, steering: RowSteering | None = None) -> AnswerRead:
        """The items' answers (and states) under `steering`, one steering for every item (None: unsteered)."""
        row = list(steering or [])
        if any(iv.layer < self.layer for iv in row) or not steers_in_chunks(row):
            raise ValueError(f"a read from block {self.layer}'s inputs takes position-local steerings at block "
                             f"{self.layer} or above")
        out: list[np.ndarray] = [np.empty(0)] * len(self.prompts)
        states = {**{s: v.copy() for s, v in self.lower_states.items()},
                  **{s: np.zeros((len(self.prompts), self.lm.hidden_size)) for s in self.upper_state_layers}}
        for run in self.runs:
            chunk = [self.prompts[i] for i in run.indices]
            mask = run.attention_mask.unsqueeze(-1).float()
            handles = [self.lm.blocks[s].register_forward_hook(_keep_prompt_mean(states[s], run.indices, mask))
                       for s in self.upper_state_layers]
            try:
                with apply(self.lm, [row for _ in chunk]) as hooks:
                    hooks.use_context(run.context(self.lm))
                    logits = last_logits_from(self.lm, self.layer, run.args, run.kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            probs = option_log_probs(self.lm, logits, chunk).exp().cpu().numpy()
            for r, (i, it) in enumerate(zip(run.indices, chunk, strict=True)):
                out[i] = probs[r, :len(it.options)].astype(np.float64)
        read = AnswerRead(out, states, [out])
        return _averaged_orders(read, self.n) if self.orders == 2 else read


@torch.no_grad()
def block_states(lm: LanguageModel, items: Sequence[OpinionItem], layer: int, batch_size: int = 16) -> list[np.ndarray]:
    """What block `layer` is called with for each of `items`' prompts, as read (no orders added): its hidden
    states, one (tokens, hidden) array per prompt without the padding; `PromptsAtBlock`'s `inputs`."""
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    for run in block_batches(lm, items, layer, batch_size):
        hidden = run.args[0] if run.args else run.kwargs["hidden_states"]
        for row, i in enumerate(run.indices):
            out[i] = hidden[row][run.attention_mask[row].bool()].float().cpu().numpy()
    return out


@torch.no_grad()
def blocks_share_inputs(lm: LanguageModel, items: Sequence[OpinionItem], layer: int) -> bool:
    """Whether block `layer` is called with what block 0 is for `items` read together, hidden states aside
    (the same masks and position embeddings: true of models whose blocks all attend alike, not of those that
    mix sliding-window layers in)."""
    batch = encode_items(lm, items)
    first, upper = block_inputs(lm, batch, 0), block_inputs(lm, batch, layer)
    return _same(first[0][1:], upper[0][1:]) and _same({k: v for k, v in first[1].items() if k != "hidden_states"},
                                                       {k: v for k, v in upper[1].items() if k != "hidden_states"})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _with_hidden(args: tuple, kwargs: dict, attention_mask: Tensor, rows: Sequence[np.ndarray]) -> tuple[tuple, dict]:
    """A block's inputs for a batch with its hidden states replaced by `rows` (each prompt's, at its tokens)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    out = torch.zeros_like(hidden)
    for r, states in enumerate(rows):
        keep = attention_mask[r].bool()
        if int(keep.sum()) != len(states):
            raise ValueError(f"a kept prompt has {len(states)} tokens, its prompt now {int(keep.sum())}")
        out[r, keep] = torch.as_tensor(states, dtype=out.dtype, device=out.device)
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": out}


def by_length(lm: LanguageModel, items: Sequence[OpinionItem]) -> list[int]:
    """Indices of `items` from the shortest prompt to the longest (stable): batches cut from this order pad
    little (a batch costs its longest prompt times its rows; OpinionsQA prompts run 50..100 tokens)."""
    lengths = [len(prompt_token_ids(lm.tokenizer, it)) for it in items]
    return sorted(range(len(items)), key=lengths.__getitem__)


def last_logits_only(lm: LanguageModel) -> dict[str, int]:
    """Ask for the last position's logits only where the model takes `logits_to_keep` (transformers >= 4.50):
    the LM head over every position dominates a small model's forward, and readers need the last one."""
    return {"logits_to_keep": 1} if _takes(type(lm.model).forward, "logits_to_keep") else {}


@functools.cache
def _takes(forward: Callable[..., Any], argument: str) -> bool:
    return argument in inspect.signature(forward).parameters


def _per_item_steering(steering: Steering, n: int) -> list[RowSteering | None] | None:
    if not steering:
        return None
    if is_one_steering(steering):
        return [list(steering)] * n
    if len(steering) != n:
        raise ValueError(f"steering has {len(steering)} rows for {n} items")
    return list(steering)
