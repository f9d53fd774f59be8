"""The profile page's per-item alignment plot: where each item of the build's sample stood before steering
(the calibrated model when the build fitted one, else unsteered) and after (the profile as shipped), read
from `metrics["per_item"]` (`steer_core.build.per_item_record`). This module computes the geometry; the
template draws it as inline SVG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from steer_core.evaluation import estimate

WIDTH, HEIGHT = 720, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 44  # margins around the plot box: axis labels, legend, caption room
TICK_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25)
MAX_TICKS = 6


@dataclass(frozen=True)
class ItemMark:
    """One item: its column's centre `x`, the y of each reading (None: not recorded), its gain and a tooltip."""

    x: float
    before_y: float
    after_y: float
    unsteered_y: float | None
    gain: float
    label: str

    @property
    def direction(self) -> str:
        return "up" if self.gain > 0 else "down" if self.gain < 0 else "none"


@dataclass(frozen=True)
class ItemPlot:
    marks: list[ItemMark]
    radius: float
    y_ticks: list[tuple[float, str]]
    before: str  # the reading the gain is measured from: "calibrated" or "unsteered"
    y_label: str
    x_label: str
    caption: str
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def _number(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _rows(per_item: Any) -> list[dict[str, Any]]:
    """The recorded rows a plot can use (a steered and an unsteered reading each), or [] for anything else."""
    if not isinstance(per_item, dict) or not isinstance(per_item.get("items"), list):
        return []
    return [r for r in per_item["items"] if isinstance(r, dict) and _number(r.get("steered"))
            and _number(r.get("unsteered"))]


def _ticks(lo: float, hi: float) -> list[float]:
    step = next((s for s in TICK_STEPS if (hi - lo) / s <= MAX_TICKS - 1), TICK_STEPS[-1])
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 6) for k in range(int((hi - first) / step + 1e-9) + 1)]


def _estimate_text(values: list[float]) -> str:
    d = estimate(values)
    se = "n/a" if math.isnan(d.standard_error) else f"{d.standard_error:.3f}"
    return f"{d.mean:+.3f} ± {se}"


def item_plot(metrics: dict[str, Any]) -> ItemPlot | None:
    """The plot of `metrics["per_item"]`, or None when the build recorded none (profiles built before it was
    recorded, imported adapters)."""
    per_item = metrics.get("per_item")
    rows = _rows(per_item)
    if not rows or not isinstance(per_item, dict):  # rows come from a dict only
        return None
    calibrated = all(_number(r.get("calibrated")) for r in rows)
    before = "calibrated" if calibrated else "unsteered"
    gains = [r["steered"] - r[before] for r in rows]
    order = sorted(range(len(rows)), key=lambda k: (gains[k], k))
    readings = [r[name] for r in rows for name in ("unsteered", before, "steered")]
    lo = max(0.0, math.floor(min(readings) * 20) / 20)
    hi = min(1.0, math.ceil(max(readings) * 20) / 20)
    if hi - lo < 0.1:
        lo, hi = max(0.0, hi - 0.1), max(hi, 0.1)

    def y(value: float) -> float:
        return round(HEIGHT - BOTTOM - (value - lo) / (hi - lo) * (HEIGHT - BOTTOM - TOP), 2)

    slot = (WIDTH - RIGHT - LEFT) / len(rows)
    marks = []
    for position, k in enumerate(order):
        r = rows[k]
        name = r.get("id") or f"#{r.get('index', k)}"
        label = (f"{name}: {r.get('question', '')}\nunsteered {r['unsteered']:.3f}"
                 + (f", calibrated {r['calibrated']:.3f}" if calibrated else "")
                 + f", steered {r['steered']:.3f} ({gains[k]:+.3f})")
        marks.append(ItemMark(x=round(LEFT + slot * (position + 0.5), 2), before_y=y(r[before]),
                              after_y=y(r["steered"]), unsteered_y=y(r["unsteered"]) if calibrated else None,
                              gain=gains[k], label=label))
    evaluation = metrics.get("evaluation") or "recorded"
    recorded_total = per_item.get("total")
    total = recorded_total if _number(recorded_total) else len(rows)
    sample = f"{len(rows)} items" if total <= len(rows) else f"the first {len(rows)} of {total} items"
    caption = f"Mean gain of steered over {before}: {_estimate_text(gains)} (paired standard error, {sample}, " \
              f"{evaluation})"
    if calibrated:
        caption += f"; over unsteered: {_estimate_text([r['steered'] - r['unsteered'] for r in rows])}"
    return ItemPlot(marks=marks, radius=round(min(4.0, max(1.2, slot * 0.3)), 2),
                    y_ticks=[(y(t), f"{t:.2f}") for t in _ticks(lo, hi)], before=before,
                    y_label=f"{per_item.get('metric', 'alignment')} ({evaluation})",
                    x_label=f"items ({len(rows)}), sorted by gain over {before}", caption=caption + ".")
