"""The opinion item (`OpinionItem`) and its validation (`make_item`), which every loader uses: the files'
(`steer_core.data`) and the tables' (`steer_core.tables`) alike, so the tables' loader need not import
`steer_core.data`, whose `load_items` hands tables to it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steer_core.errors import SteerError

MAX_OPTIONS = 26  # one letter each
_TARGET_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OpinionItem:
    """`contrast`, when set, is the pooled answer distribution of the subjects this item's target is to be
    told apart from (other groups on the same question); group-relative objectives read it."""

    question: str
    options: tuple[str, ...]
    target: tuple[float, ...]
    ordinal: tuple[float, ...]
    id: str | None = None
    contrast: tuple[float, ...] | None = None

    @property
    def answer(self) -> int:
        """Index of the most likely option of the target (the person's answer when one-hot)."""
        return max(range(len(self.target)), key=self.target.__getitem__)

    @property
    def is_one_hot(self) -> bool:
        return max(self.target) >= 1.0 - _TARGET_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"question": self.question, "options": list(self.options),
                               "ordinal": list(self.ordinal), "target": list(self.target)}
        if self.id is not None:
            out = {"id": self.id, **out}
        if self.contrast is not None:
            out["contrast"] = list(self.contrast)
        return out


def make_item(question: Any, options: Any, target: Any = None, answer: Any = None, ordinal: Any = None,
              id: Any = None, field: str = "item", contrast: Any = None) -> OpinionItem:
    """Validate raw fields into an `OpinionItem`; errors name `field.<name>`. A `target` is renormalized to
    sum to 1; a `contrast`, checked the same way, is kept as given (what `with_contrast` pooled, so an item
    written with `to_json` reads back equal)."""
    if not isinstance(question, str) or not question.strip():
        raise SteerError("must be a non-empty string", f"{field}.question")
    if not isinstance(options, Sequence) or isinstance(options, str) or \
            not all(isinstance(o, str) and o.strip() for o in options):
        raise SteerError("must be a list of non-empty strings", f"{field}.options")
    if len(options) < 2:
        raise SteerError(f"needs at least 2 options, got {len(options)}", f"{field}.options")
    if len(options) > MAX_OPTIONS:
        raise SteerError(f"at most {MAX_OPTIONS} options are supported, got {len(options)}", f"{field}.options")
    n = len(options)
    if (target is None) == (answer is None):
        raise SteerError("give exactly one of 'target' and 'answer'", f"{field}.target")
    if answer is not None:
        if isinstance(answer, bool):
            raise SteerError("must be an option index or the option's text", f"{field}.answer")
        if isinstance(answer, str):
            if answer not in options:
                raise SteerError(f"{answer!r} is not one of the options", f"{field}.answer")
            answer = list(options).index(answer)
        if not isinstance(answer, int) or not 0 <= answer < n:
            raise SteerError(f"must be an option index in 0..{n - 1} or the option's text", f"{field}.answer")
        probs = [1.0 if k == answer else 0.0 for k in range(n)]
    else:
        probs = _distribution(target, n, f"{field}.target")
        total = sum(probs)
        probs = [p / total for p in probs]
    positions = list(range(1, n + 1)) if ordinal is None else _numbers(ordinal, n, f"{field}.ordinal")
    if id is not None and not isinstance(id, str | int):
        raise SteerError("must be a string or an integer", f"{field}.id")
    return OpinionItem(question=question.strip(), options=tuple(o.strip() for o in options),
                       target=tuple(float(p) for p in probs), ordinal=tuple(float(x) for x in positions),
                       id=None if id is None else str(id),
                       contrast=None if contrast is None else tuple(_distribution(contrast, n, f"{field}.contrast")))


def _distribution(values: Any, n: int, field: str) -> list[float]:
    """Probabilities over `n` options: not negative, summing to 1 within `_TARGET_TOLERANCE`."""
    probs = _numbers(values, n, field)
    if any(p < 0 for p in probs):
        raise SteerError("probabilities must not be negative", field)
    total = sum(probs)
    if abs(total - 1.0) > _TARGET_TOLERANCE:
        raise SteerError(f"must sum to 1, sums to {total:.4f}", field)
    return probs


def _numbers(values: Any, n: int, field: str) -> list[float]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise SteerError(f"must be a list of {n} numbers", field)
    if len(values) != n:
        raise SteerError(f"has {len(values)} values for {n} options", field)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SteerError(f"must be a list of {n} finite numbers", field)
        out.append(float(v))
    return out
