"""The statistics and the picture of an A/B experiment: pure functions of reward lists, no database.

- `assign_bucket` / `choose_variant`: a deterministic, salted position of (experiment, user) in [0, 1)
  (sha256, so the same in every process and after restarts) and the variant whose share of the traffic
  weights covers it.
- `summarize_rewards`: count, mean and a 95% interval of one variant's rewards (Student t for ratings and
  numbers; Wilson score for thumbs, which stays inside [0, 1] and behaves at 0% and 100%).
- `compare`: a variant against the control: difference of means with its interval and a two-sided
  p-value (Welch's unequal-variance t-test; for thumbs the pooled two-proportion z-test).
- `rewards_png`: the per-variant means with their intervals as a PNG (matplotlib, Agg, no pyplot state).

Every variant is compared with the control separately; with several treatment variants the p-values
are not corrected for multiple comparisons (read them with that in mind).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
REWARD_KINDS = ("thumbs", "rating", "number")


# ------------------------------------------------------------------------------------------ assignment

def assign_bucket(salt: str, experiment_id: str, user: str) -> float:
    """A uniform-looking number in [0, 1) fixed by (salt, experiment, user).

    The unit separator keeps ("ab", "c") and ("a", "bc") apart; 64 bits of sha256 are far finer than
    any traffic weight.
    """
    digest = hashlib.sha256(f"{salt}\x1f{experiment_id}\x1f{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def choose_variant(weights: Sequence[float], bucket: float) -> int:
    """The index of the variant whose slice of [0, 1) holds `bucket`; slices are proportional to the
    weights (a zero weight gets no users). Raises ValueError unless the weights sum to a positive number."""
    total = math.fsum(weights)
    if any(w < 0 or not math.isfinite(w) for w in weights) or not total > 0 or not math.isfinite(total):
        raise ValueError("traffic weights must be finite, >= 0 and sum to a positive number")
    if not 0.0 <= bucket < 1.0:
        raise ValueError("bucket must be in [0, 1)")
    point = bucket * total
    running = 0.0
    last = max(i for i, w in enumerate(weights) if w > 0)
    for i, w in enumerate(weights):
        running += w
        if w > 0 and point < running:
            return i
    return last  # rounding at the very top of [0, 1)


# ------------------------------------------------------------------------------------------- summaries

@dataclass(frozen=True)
class RewardSummary:
    """One variant's rewards. `ci_low`/`ci_high` are None when there are too few values for an interval."""

    n: int
    mean: float | None
    std: float | None  # sample standard deviation (ddof 1)
    ci_low: float | None
    ci_high: float | None
    successes: int | None = None  # thumbs only: how many were up


def summarize_rewards(values: Sequence[float], kind: str, confidence: float = CONFIDENCE) -> RewardSummary:
    """Count, mean and a two-sided `confidence` interval of the mean.

    thumbs (values 0 or 1): Wilson score interval of the proportion. rating and number: Student t interval
    `mean +- t_{n-1} * s / sqrt(n)` (needs n >= 2).
    """
    _check_kind(kind)
    n = len(values)
    if n == 0:
        return RewardSummary(0, None, None, None, None, 0 if kind == "thumbs" else None)
    mean = _mean(values)
    std = float(np.std(values, ddof=1)) if n > 1 else None
    if kind == "thumbs":
        successes = int(round(math.fsum(values)))
        low, high = wilson_interval(successes, n, confidence)
        return RewardSummary(n, mean, std, low, high, successes)
    if n < 2 or std == 0:
        # scipy's interval of a constant sample is nan wide; the mean is then known exactly.
        return RewardSummary(n, mean, std, None, None) if n < 2 else RewardSummary(n, mean, std, mean, mean)
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return RewardSummary(n, mean, std, float(interval.low), float(interval.high))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (n > 0)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError("need 0 <= successes <= n and n > 0")
    interval = stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
    return max(0.0, float(interval.low)), min(1.0, float(interval.high))


# ------------------------------------------------------------------------------------------ comparisons

@dataclass(frozen=True)
class Comparison:
    """A variant minus the control. `p_value` is two-sided; None when a side has too little data."""

    test: Literal["welch_t", "two_proportion_z"]
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    statistic: float | None
    p_value: float | None
    df: float | None = None  # Welch-Satterthwaite degrees of freedom (t-test only)


def welch_t_test(treatment: Sequence[float], control: Sequence[float],
                 confidence: float = CONFIDENCE) -> Comparison:
    """Welch's t-test of mean(treatment) - mean(control), with its Welch-Satterthwaite interval.

    Both samples need n >= 2. When both have zero variance the test is degenerate: equal means give
    p = 1, different means p = 0 (the data cannot be explained by noise at all).
    """
    n1, n2 = len(treatment), len(control)
    if n1 < 2 or n2 < 2:
        diff = _mean(treatment) - _mean(control) if n1 and n2 else None
        return Comparison("welch_t", diff, None, None, None, None)
    diff = _mean(treatment) - _mean(control)
    if np.var(treatment) == 0 and np.var(control) == 0:
        same = diff == 0
        return Comparison("welch_t", diff, diff, diff, 0.0 if same else math.copysign(math.inf, diff),
                          1.0 if same else 0.0, None)
    result = stats.ttest_ind(treatment, control, equal_var=False)
    interval = result.confidence_interval(confidence)
    return Comparison("welch_t", diff, float(interval.low), float(interval.high), float(result.statistic),
                      float(result.pvalue), float(result.df))


def two_proportion_z_test(successes_t: int, n_t: int, successes_c: int, n_c: int,
                          confidence: float = CONFIDENCE) -> Comparison:
    """The pooled two-proportion z-test of p_t - p_c: the 2x2 chi-square test without continuity
    correction (z is the signed square root of its statistic); the interval is the unpooled Wald interval
    of the difference."""
    if n_t < 1 or n_c < 1:
        diff = successes_t / n_t - successes_c / n_c if n_t and n_c else None
        return Comparison("two_proportion_z", diff, None, None, None, None)
    p_t, p_c = successes_t / n_t, successes_c / n_c
    diff = p_t - p_c
    z_crit = float(stats.norm.ppf(0.5 + confidence / 2))
    half = z_crit * math.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c)
    pooled = (successes_t + successes_c) / (n_t + n_c)
    if pooled in (0.0, 1.0):  # everyone up (or down) on both sides: no evidence of a difference
        return Comparison("two_proportion_z", diff, diff - half, diff + half, 0.0, 1.0)
    table = [[successes_t, n_t - successes_t], [successes_c, n_c - successes_c]]
    result = stats.chi2_contingency(table, correction=False)
    z = math.copysign(math.sqrt(float(result.statistic)), diff)
    return Comparison("two_proportion_z", diff, diff - half, diff + half, z, float(result.pvalue))


def compare(treatment: Sequence[float], control: Sequence[float], kind: str,
            confidence: float = CONFIDENCE) -> Comparison:
    """The test that fits the reward kind: two proportions for thumbs, Welch's t otherwise."""
    _check_kind(kind)
    if kind == "thumbs":
        return two_proportion_z_test(int(round(math.fsum(treatment))), len(treatment),
                                     int(round(math.fsum(control))), len(control), confidence)
    return welch_t_test(treatment, control, confidence)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _check_kind(kind: str) -> None:
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {', '.join(REWARD_KINDS)}")


# ------------------------------------------------------------------------------------------------- plot

@dataclass(frozen=True)
class PlotBar:
    name: str
    summary: RewardSummary
    is_control: bool = False


def rewards_png(bars: Sequence[PlotBar], title: str, kind: str) -> bytes:
    """A PNG of each variant's mean reward with its interval (variants without feedback are labelled)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + the Agg canvas directly: no pyplot global state, safe in a multi-threaded server.
    fig = Figure(figsize=(max(4.0, 1.4 * len(bars) + 2.0), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(bars)))
    for x, bar in zip(xs, bars, strict=True):
        s = bar.summary
        colour = "tab:gray" if bar.is_control else "tab:blue"
        if s.mean is None:
            ax.annotate("no feedback", (x, 0), ha="center", va="bottom", fontsize=8, color="tab:gray")
            continue
        err = None
        if s.ci_low is not None and s.ci_high is not None:
            err = [[s.mean - s.ci_low], [s.ci_high - s.mean]]
        ax.errorbar([x], [s.mean], yerr=err, fmt="o", color=colour, capsize=6, markersize=7)
        ax.annotate(f"{s.mean:.3g}\nn={s.n}", (x, s.mean), textcoords="offset points", xytext=(10, -4),
                    fontsize=8)
    control_mean = next((b.summary.mean for b in bars if b.is_control and b.summary.mean is not None), None)
    if control_mean is not None:
        ax.axhline(control_mean, color="tab:gray", linestyle=":", linewidth=1)
    ax.set_xticks(xs, [f"{b.name}\n(control)" if b.is_control else b.name for b in bars])
    ax.set_xlim(-0.6, len(bars) - 0.4)
    label = {"thumbs": "share of thumbs up", "rating": "mean rating", "number": "mean reward"}[kind]
    ax.set_ylabel(f"{label} ({int(CONFIDENCE * 100)}% interval)")
    if kind == "thumbs":
        ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
