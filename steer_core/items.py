"""The opinion item (`OpinionItem`) and its validation (`make_item`), which every way in uses: the files'
loaders (`steer_core.data`), the tables' and uploads' readers (`steer_core.tables`) and the service's JSON
bodies alike, so the tables' loader need not import `steer_core.data`, whose `load_items` hands tables to it.

The text rules (`text_problem`), the same for every way in: no NUL, no lone surrogate (text that cannot be
written as UTF-8), and at most MAX_QUESTION_CHARS characters in a question, MAX_OPTION_CHARS in an option
and MAX_ID_CHARS in an id (counted as sent, in characters). Numbers are finite and at most MAX_NUMBER in size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steer_core.errors import SteerError

MAX_OPTIONS = 26  # one letter each
# Text limits, in characters. The longest question of the bundled research data (CAA, OpinionsQA, persona)
# is about 1,200 characters and its longest option about 1,800.
MAX_QUESTION_CHARS = 4000
MAX_OPTION_CHARS = 2000
MAX_ID_CHARS = 200  # what the databases store (service.protocol.MAX_ID_CHARS)
# The bound every JSON body's numbers are held to (service.api.openapi.MAX_JSON_NUMBER).
MAX_NUMBER = 1e15
_TARGET_TOLERANCE = 1e-3
_SURROGATE = re.compile("[\ud800-\udfff]")
NUL_PROBLEM = "text must not contain NUL characters"
SURROGATE_PROBLEM = "text must not contain lone surrogates (\\ud800-\\udfff)"


def text_problem(text: str, limit: int | None = None) -> str | None:
    """What is wrong with `text` as stored text (None: nothing): a NUL, a lone surrogate, more than `limit`
    characters."""
    if "\x00" in text:
        return NUL_PROBLEM
    if _SURROGATE.search(text):
        return SURROGATE_PROBLEM
    if limit is not None and len(text) > limit:
        return f"must be at most {limit} characters, got {len(text)}"
    return None


def check_text(text: str, field: str, limit: int | None = None) -> None:
    """`text_problem` as a `SteerError` naming `field`."""
    problem = text_problem(text, limit)
    if problem is not None:
        raise SteerError(problem, field)


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages about values of any size."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit]) + "..."
    return text if len(text) <= limit + 10 else text[:limit] + "..."


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
    if not isinstance(question, str):
        raise SteerError("must be a non-empty string", f"{field}.question")
    check_text(question, f"{field}.question")
    if not question.strip():  # before its length: blank is blank, as a table's empty cell, however long
        raise SteerError("must be a non-empty string", f"{field}.question")
    check_text(question, f"{field}.question", MAX_QUESTION_CHARS)
    if not isinstance(options, Sequence) or isinstance(options, str | bytes):
        raise SteerError("must be a list of non-empty strings", f"{field}.options")
    if len(options) > MAX_OPTIONS:
        raise SteerError(f"at most {MAX_OPTIONS} options are supported, got {len(options)}", f"{field}.options")
    for k, option in enumerate(options):
        if isinstance(option, str):
            check_text(option, f"{field}.options[{k}]", MAX_OPTION_CHARS)
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise SteerError("must be a list of non-empty strings", f"{field}.options")
    if len(options) < 2:
        raise SteerError(f"needs at least 2 options, got {len(options)}", f"{field}.options")
    n = len(options)
    if (target is None) == (answer is None):
        raise SteerError("give exactly one of 'target' and 'answer'", f"{field}.target")
    if answer is not None:
        if isinstance(answer, bool):
            raise SteerError("must be an option index or the option's text", f"{field}.answer")
        if isinstance(answer, str):
            if answer not in options:
                raise SteerError(f"{shown(answer)} is not one of the options", f"{field}.answer")
            answer = list(options).index(answer)
        if not isinstance(answer, int) or not 0 <= answer < n:
            raise SteerError(f"must be an option index in 0..{n - 1} or the option's text", f"{field}.answer")
        probs = [1.0 if k == answer else 0.0 for k in range(n)]
    else:
        probs = _distribution(target, n, f"{field}.target")
        total = sum(probs)
        probs = [p / total for p in probs]
    positions = list(range(1, n + 1)) if ordinal is None else _numbers(ordinal, n, f"{field}.ordinal")
    if isinstance(id, str) and not id.strip():
        id = None  # a blank id is none, as a table's empty cell is
    if id is not None:
        if isinstance(id, bool) or not isinstance(id, str | int):
            raise SteerError("must be a string or an integer", f"{field}.id")
        if isinstance(id, int) and abs(id) >= 10**MAX_ID_CHARS:  # str() of it would be longer
            raise SteerError(f"must be at most {MAX_ID_CHARS} characters", f"{field}.id")
        check_text(id if isinstance(id, str) else str(id), f"{field}.id", MAX_ID_CHARS)
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
        # An integer is compared before float() sees it: float(10**400) overflows.
        if isinstance(v, bool) or not isinstance(v, int | float) or \
                not (abs(v) <= MAX_NUMBER if isinstance(v, int) else math.isfinite(v) and abs(v) <= MAX_NUMBER):
            raise SteerError(f"must be a list of {n} finite numbers of at most {MAX_NUMBER:g} in size", field)
        out.append(float(v))
    return out
