"""Reading a question in both option orders (torch-free, so readers anywhere can merge the reads).

A small model's answer depends on the letters as much as on the options: SmolLM2-135M's probability for one
option moves by up to 0.42 when the options are reversed. A debiased read asks each question twice, with its
options as given and reversed (`in_both_orders`), maps the reversed read back to the given order
(`split_orders`) and averages the two (`average_orders`). The result does not depend on the order the caller
gave the options in, at twice the reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from steer_core.data import OpinionItem, reverse_options

READ_ORDERS = (1, 2)  # read the given option order only, or also reversed and average the two
DEFAULT_READ_ORDERS = 2


def check_read_orders(orders: Any, field: str = "orders") -> int:
    if isinstance(orders, bool) or orders not in READ_ORDERS:
        raise ValueError(f"{field} must be 1 (the given option order) or 2 (both orders, averaged)")
    return int(orders)


def in_both_orders(items: Sequence[OpinionItem]) -> list[OpinionItem]:
    """`items`, then each of them with its options reversed."""
    return list(items) + [reverse_options(it) for it in items]


def split_orders(dists: Sequence[Any], n: int) -> list[list[np.ndarray]]:
    """Reads of `in_both_orders(items)` (2n distributions) as two lists in the items' own option order."""
    if len(dists) != 2 * n:
        raise ValueError(f"{len(dists)} reads for {n} items in two orders")
    return [[np.asarray(d) for d in dists[:n]], [np.asarray(d)[::-1].copy() for d in dists[n:]]]


def average_orders(by_order: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Each item's distribution averaged over the orders read (one list per order, the items' option order)."""
    if len(by_order) == 1:
        return list(by_order[0])
    return [np.mean(reads, axis=0) for reads in zip(*by_order, strict=True)]
