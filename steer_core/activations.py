"""Residual-stream activations at the answer token, batched over items, options and layers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from steer_core.data import OpinionItem
from steer_core.models import LanguageModel
from steer_core.prompts import LETTERS, encode, format_prompt, last_logits_only


@dataclass
class AnswerActivations:
    """`by_layer[L]` is (N, K, D): `Z_L` at the answer letter of item n answered with option k.

    `valid` (N, K) marks real options (items have different option counts); `target` (N, K) holds
    each item's target distribution (0 past its options).
    """

    by_layer: dict[int, Tensor]
    valid: Tensor
    target: Tensor


# (model fingerprint, text, layer) -> Z_L at the text's last token, while `reuse_answer_activations` is on.
_MEMO: ContextVar[dict[tuple[str, str, int], Tensor] | None] = ContextVar("answer_activation_memo", default=None)


@contextmanager
def reuse_answer_activations() -> Iterator[None]:
    """Within this block `answer_activations` runs each text through the model once: a cross-validated
    build fits its folds on subsets of the items it has already read."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def answer_texts(lm: LanguageModel, item: OpinionItem) -> list[str]:
    prompt = format_prompt(lm.tokenizer, item)
    space = "" if lm.tokenizer.chat_template else " "
    return [prompt + space + LETTERS[k] for k in range(len(item.options))]


@torch.no_grad()
def answer_activations(lm: LanguageModel, items: Sequence[OpinionItem], layers: Sequence[int],
                       batch_size: int = 16) -> AnswerActivations:
    """One forward per batch of (item, option) texts gives every requested layer at once."""
    k_max = max(len(it.options) for it in items)
    pairs = [(n, k, text) for n, it in enumerate(items) for k, text in enumerate(answer_texts(lm, it))]
    out = {layer: torch.zeros(len(items), k_max, lm.hidden_size) for layer in layers}
    memo = _MEMO.get()
    if memo is not None:  # take the texts read earlier in this block from the memo, read the rest
        unread = []
        for n, k, text in pairs:
            if all((lm.fingerprint, text, layer) in memo for layer in layers):
                for layer in layers:
                    out[layer][n, k] = memo[(lm.fingerprint, text, layer)]
            else:
                unread.append((n, k, text))
        pairs = unread
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = encode(lm, [text for _, _, text in chunk])
        hidden = lm.model(**batch, output_hidden_states=True, use_cache=False, **last_logits_only(lm)).hidden_states
        n_idx = torch.tensor([n for n, _, _ in chunk])
        k_idx = torch.tensor([k for _, k, _ in chunk])
        for layer in layers:
            rows = hidden[layer + 1][:, -1, :].float().cpu()
            out[layer][n_idx, k_idx] = rows
            if memo is not None:
                memo.update({(lm.fingerprint, text, layer): row for (_, _, text), row in zip(chunk, rows, strict=True)})
    valid = torch.zeros(len(items), k_max, dtype=torch.bool)
    target = torch.zeros(len(items), k_max)
    for n, it in enumerate(items):
        valid[n, :len(it.options)] = True
        target[n, :len(it.options)] = torch.tensor(it.target)
    return AnswerActivations(by_layer=out, valid=valid, target=target)

