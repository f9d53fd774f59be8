"""Losses over opinion items, batched and differentiable.

- ``ce``: soft-target cross-entropy over the option letters, ``-sum_k q_k log p_k`` with ``p`` renormalized
  over the item's options (one-hot ``q`` for a person, the distribution for a group);
- ``dpo``: ``-log sigmoid(beta (l_w - l_l))`` on (chosen, rejected) pairs, ``l`` the mean token log-prob of
  a completion, ``beta = 0.1``, no reference model;
- ``sft``: mean token cross-entropy of positive-only text;
- ``contrast``: the group's answers preferred over the pooled answers of the groups it is told apart
  from (each item's `contrast`), DPO style: ``-log sigmoid(beta (sum_k q_k log p_k - sum_k c_k log p_k))``.
  The chosen and rejected completions are an answer drawn from ``q`` and one drawn from ``c``, scored by
  their expected log-prob. Its gradient at the letter logits is ``-beta sigmoid(-beta delta) (q - c)``:
  only where the group differs from the others, never toward a flatter or sharper answer that any group
  would gain from (which is what ``ce`` learns first on an over-confident model).

For opinion items the completion of option ``k`` is its letter (what the model is asked to write), so
every completion is one token and its mean token log-prob is read from the answer position's logits.
An item's DPO pairs are every (k, j) with ``q_k > q_j``, weighted by ``q_k - q_j`` (for one person: the
answer against each other option); its SFT loss weighs each option's completion by ``q_k``.
`completion_log_probs` is the general form for multi-token completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from steer_core.data import OpinionItem
from steer_core.errors import SteerError
from steer_core.method_params import check_loss  # torch-free: the service checks params by it too
from steer_core.models import LanguageModel
from steer_core.prompts import option_log_probs, option_token_ids

DPO_BETA = 0.1


def soft_cross_entropy(log_probs: Tensor, target: Tensor) -> Tensor:
    """(B,) ``-sum_k q_k log p_k``. Entries with ``q_k = 0`` add nothing, even where ``log p_k = -inf``
    (options past an item's last one)."""
    safe = torch.where(target > 0, log_probs, torch.zeros_like(log_probs))
    return -(target * safe).sum(dim=-1)


def dpo_loss(chosen: Tensor, rejected: Tensor, beta: float = DPO_BETA) -> Tensor:
    """Elementwise ``-log sigmoid(beta (l_w - l_l))`` of mean token log-probs (no reference model)."""
    return -F.logsigmoid(beta * (chosen - rejected))


def sft_loss(mean_log_probs: Tensor) -> Tensor:
    """Mean token cross-entropy of positive-only text, from its mean token log-prob."""
    return -mean_log_probs


def targets(items: Sequence[OpinionItem], device: torch.device | str = "cpu") -> Tensor:
    """(B, K) target distributions, 0 past each item's options (K = most options)."""
    k_max = max(len(it.options) for it in items)
    out = torch.zeros(len(items), k_max, device=device)
    for n, it in enumerate(items):
        out[n, :len(it.options)] = torch.tensor(it.target, device=device)
    return out


def letter_log_probs(lm: LanguageModel, last_logits: Tensor, items: Sequence[OpinionItem]) -> Tensor:
    """(B, K) log-prob of each option's letter over the whole vocabulary (not renormalized): the mean token
    log-prob of the one-token completion; 0 past each item's options (masked by the targets' zeros)."""
    k_max = max(len(it.options) for it in items)
    ids = torch.tensor(option_token_ids(lm.tokenizer, k_max), device=last_logits.device)
    lp = torch.log_softmax(last_logits.float(), dim=-1)[:, ids]
    counts = torch.tensor([len(it.options) for it in items], device=last_logits.device)
    valid = torch.arange(k_max, device=last_logits.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def contrasts(items: Sequence[OpinionItem], device: torch.device | str = "cpu") -> Tensor:
    """(B, K) each item's contrast distribution, 0 past its options; every item must carry one."""
    missing = sum(it.contrast is None for it in items)
    if missing:
        raise SteerError(f"the contrast loss needs the other groups' answers on every item; {missing} of "
                         f"{len(items)} items have none (no contrast subject answered them)", "contrast")
    k_max = max(len(it.options) for it in items)
    out = torch.zeros(len(items), k_max, device=device)
    for n, it in enumerate(items):
        out[n, :len(it.options)] = torch.tensor(it.contrast, device=device)
    return out


def contrast_loss(log_probs: Tensor, target: Tensor, contrast: Tensor, beta: float = DPO_BETA) -> Tensor:
    """(B,) ``-log sigmoid(beta (sum_k q_k log p_k - sum_k c_k log p_k))``; entries where both ``q_k`` and
    ``c_k`` are 0 add nothing (options past an item's last one)."""
    weight = target - contrast
    safe = torch.where(weight != 0, log_probs, torch.zeros_like(log_probs))
    return dpo_loss((weight * safe).sum(dim=-1), torch.zeros_like(weight[:, 0]), beta)


def dpo_pair_weights(target: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B, K, K) weight of pair (chosen k, rejected j): ``max(q_k - q_j, 0)``, normalized per item;
    `valid` (B, K) marks each item's real options (the rest pair with nothing)."""
    diff = (target.unsqueeze(2) - target.unsqueeze(1)).clamp(min=0)
    if valid is not None:
        diff = diff * (valid.unsqueeze(2) & valid.unsqueeze(1)).to(diff.dtype)
    return diff / diff.sum(dim=(1, 2), keepdim=True).clamp(min=1e-12)


def item_losses(lm: LanguageModel, last_logits: Tensor, items: Sequence[OpinionItem], loss: str = "ce",
                beta: float = DPO_BETA) -> Tensor:
    """(B,) per-item losses from the answer position's logits (B, vocab), differentiable."""
    check_loss(loss, "loss")
    q = targets(items, last_logits.device)
    if loss == "ce":
        return soft_cross_entropy(option_log_probs(lm, last_logits, items), q)
    if loss == "contrast":
        return contrast_loss(option_log_probs(lm, last_logits, items), q, contrasts(items, q.device), beta)
    lp = letter_log_probs(lm, last_logits, items)
    if loss == "sft":
        return (q * sft_loss(lp)).sum(dim=-1)
    counts = torch.tensor([len(it.options) for it in items], device=q.device)
    pairs = dpo_pair_weights(q, torch.arange(q.shape[1], device=q.device).unsqueeze(0) < counts.unsqueeze(1))
    return (pairs * dpo_loss(lp.unsqueeze(2), lp.unsqueeze(1), beta)).sum(dim=(1, 2))


def completion_log_probs(lm: LanguageModel, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
    """(B,) mean token log-prob of each completion after its prompt, in one left-padded batch.

    Prompt and completion are tokenized separately (so the completion's tokens do not depend on how
    the tokenizer would merge across the boundary). Differentiable: call it under `torch.no_grad()`
    when only the values are wanted.
    """
    if len(prompts) != len(completions) or not prompts:
        raise SteerError("need one completion per prompt, and at least one", "completions")
    tok = lm.tokenizer
    special = not tok.chat_template
    rows, n_completion = [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise SteerError("an empty completion has no tokens to score", f"completions[{i}]")
        rows.append(tok(p, add_special_tokens=special)["input_ids"] + c_ids)
        n_completion.append(len(c_ids))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    counts = torch.tensor(n_completion, device=ids.device)
    # Predicted token t+1 belongs to the completion when it is among the row's last n_completion tokens.
    position = torch.arange(1, width, device=ids.device).unsqueeze(0)
    in_completion = position >= (width - counts).unsqueeze(1)
    return (token_lp * in_completion).sum(dim=-1) / counts
