"""The one prompt formatter and the one answer-distribution reader.

Every method, metric and endpoint formats multiple-choice prompts with `format_prompt` and reads the
model's answer distribution with `answer_distributions`: the softmax over the option letters' logits at
the first assistant position, renormalized over the item's valid options (`answer_distributions_under`
reads the same items under several steerings, as a build's search does, sharing what they share).
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import BatchEncoding, PreTrainedTokenizerBase

from steer_core.blocks import block_inputs, last_logits_from
from steer_core.data import OpinionItem
from steer_core.models import LanguageModel
from steer_core.steering import RowSteering, apply, is_one_steering, steers_in_chunks

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


@dataclass
class AnswerDistribution:
    item: OpinionItem
    probs: np.ndarray  # one probability per option


Steering = RowSteering | Sequence[RowSteering | None] | None


@torch.no_grad()
def answer_distributions(lm: LanguageModel, items: Sequence[OpinionItem], steering: Steering = None,
                         batch_size: int = 16,
                         progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """The model's answer distribution over each item's options, optionally steered.

    `steering` is one `RowSteering` for every item, or a list with one entry per item.
    """
    per_item = _per_item_steering(steering, len(items))
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    order = by_length(lm, items)
    for start in range(0, len(items), batch_size):
        indices = order[start:start + batch_size]
        chunk = [items[i] for i in indices]
        batch = encode_items(lm, chunk)
        rows = [per_item[i] for i in indices] if per_item is not None else None
        if rows is not None and any(rows):
            with apply(lm, rows):
                logits = lm.model(**batch, use_cache=False, **last_logits_only(lm)).logits[:, -1, :]
        else:
            logits = lm.model(**batch, use_cache=False, **last_logits_only(lm)).logits[:, -1, :]
        probs = option_log_probs(lm, logits, chunk).exp().cpu().numpy()
        for row, (i, it) in enumerate(zip(indices, chunk, strict=True)):
            out[i] = probs[row, :len(it.options)].astype(np.float64)
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return out


@torch.no_grad()
def answer_distributions_under(lm: LanguageModel, items: Sequence[OpinionItem],
                               steerings: Sequence[RowSteering | None], batch_size: int = 16,
                               rows_per_call: int = 48) -> list[list[np.ndarray]]:
    """Every item's answer distribution under each of `steerings` (None: unsteered), one list per steering.

    Where every steering is position-local (`steers_in_chunks`: constant vectors, LoRA adapters, ODESteer
    flows; what they add at a position depends on that position alone), the blocks below the lowest steered
    one run once per batch of items and each steering runs the rest: a build reads one fold under every
    candidate strength. Otherwise this is `answer_distributions` over the items once per steering."""
    rows = [list(s) if s else [] for s in steerings]
    if not any(rows) or not all(steers_in_chunks(row) for row in rows):
        flat = answer_distributions(lm, list(items) * len(rows), [row or None for row in rows for _ in items],
                                    batch_size=batch_size)
        return [flat[k * len(items):(k + 1) * len(items)] for k in range(len(rows))]
    first = min(iv.layer for row in rows for iv in row)
    out = [[np.empty(0)] * len(items) for _ in rows]
    order = by_length(lm, items)
    for start in range(0, len(items), batch_size):
        indices = order[start:start + batch_size]
        chunk = [items[i] for i in indices]
        together = max(1, rows_per_call // len(chunk))  # steerings per partial run, each on every item
        with apply(lm, [[] for _ in chunk]) as hooks:
            # The model's call stops at block `first`; the partial runs below steer as parts of that call
            # (its tokens and padding say which positions are steered), stacked once per steering.
            args, kwargs = block_inputs(lm, encode_items(lm, chunk), first)
            call = hooks.ctx
            for k0 in range(0, len(rows), together):
                group = rows[k0:k0 + together]
                hooks.plan([row for row in group for _ in chunk])
                hooks.use_context(replace(call, input_ids=_tiled(call.input_ids, len(group), len(chunk)),
                                          attention_mask=_tiled(call.attention_mask, len(group), len(chunk))))
                logits = last_logits_from(lm, first, _tiled(args, len(group), len(chunk)),
                                          _tiled(kwargs, len(group), len(chunk)))
                probs = option_log_probs(lm, logits, chunk * len(group)).exp().cpu().numpy()
                for g in range(len(group)):
                    for r, (i, it) in enumerate(zip(indices, chunk, strict=True)):
                        out[k0 + g][i] = probs[g * len(chunk) + r, :len(it.options)].astype(np.float64)
    return out


def _tiled(value: Any, copies: int, batch: int) -> Any:
    """`value` (a block's inputs) for `copies` stacked copies of a batch of `batch` rows: every tensor of two
    or more dimensions with `batch` rows repeated along them; the rest (position embeddings shared by the
    rows, 1-D position vectors, flags) stays as it is."""
    if copies == 1:
        return value
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple | list):
        return type(value)(_tiled(v, copies, batch) for v in value)
    if isinstance(value, dict):
        return {k: _tiled(v, copies, batch) for k, v in value.items()}
    return value


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
