"""The statistics and the picture of an A/B experiment: pure functions of reward lists, no database.

- `assign_bucket` / `choose_variant`: a deterministic, salted position of (experiment, user) in [0, 1)
  (sha256, so the same in every process and after restarts) and the variant whose share of the traffic
  weights covers it.
- `summarize_rewards`: count, mean and a 95% interval of one variant's rewards (Student t for ratings and
  numbers; Wilson score for thumbs, which stays inside [0, 1] and behaves at 0% and 100%).
- `compare`: a variant against the control: the difference of means, its interval, a two-sided p-value
  and a verdict. The interval is always the set of differences that the *same* test does not reject, so
  `significant` (p < alpha) holds exactly when the interval excludes 0, at every n:
    * ratings and numbers: Welch's unequal-variance t-test; interval and p-value from one t distribution
      (Welch-Satterthwaite df). Needs two rewards a side.
    * thumbs, sparse (some expected cell count under `EXACT_BELOW_EXPECTED`, both arms at most
      `EXACT_MAX_PER_ARM`): Barnard's exact unconditional test with the score statistic (two-sided, the
      p-value maximised over the common rate), interval by inverting the exact score test of
      p_t - p_c = d (Chan & Zhang 1999). Small tables are where the z-test's p-value is badly off.
    * thumbs otherwise: the pooled two-proportion z-test (the 2x2 chi-square test without correction),
      interval by inverting the same score statistic (Mee's score interval, inside [-1, 1]).
  Below `MIN_PER_ARM` rewards in either arm there is no verdict ("not enough data"): no p-value, no
  interval, not significant.
- `sample_ratio_check`: whether the users were split as the traffic weights ask (chi-square goodness of
  fit; a mismatch below `SRM_ALPHA` means the assignment or the logging is broken and the comparison is
  not to be trusted).
- `rewards_png`: the per-variant means with their intervals as a PNG (matplotlib, Agg, no pyplot state).

Every variant is compared with the control separately; with several treatment variants the p-values
are not corrected for multiple comparisons (read them with that in mind).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import special, stats

ALPHA = 0.05
CONFIDENCE = 1 - ALPHA  # intervals and tests share the level, so the interval excludes 0 iff p < ALPHA
REWARD_KINDS = ("thumbs", "rating", "number")
# Fewer rewards than this in either arm: no verdict. The tests are valid at any n, but with a handful of
# rewards one more thumb swings the estimate, and Welch's t leans on roughly normal means.
MIN_PER_ARM = 10
# Thumbs: the exact test when some expected cell count of the 2x2 table is under 5 (Cochran's rule for
# the chi-square approximation), as long as the exact computation is cheap (it grows as n_t * n_c).
EXACT_BELOW_EXPECTED = 5.0
EXACT_MAX_PER_ARM = 50
# Sample ratio mismatch: flagged below this p-value (strict, since the check is read on every results
# request while the experiment runs), and only once every expected count is at least SRM_MIN_EXPECTED.
SRM_ALPHA = 0.001
SRM_MIN_EXPECTED = 5.0

TestName = Literal["welch_t", "two_proportion_z", "barnard_exact"]
Verdict = Literal["not enough data", "better", "worse", "no significant difference"]


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
    """A variant minus the control. `p_value` is two-sided; it, the interval and the statistic are None
    when there is no test (too few rewards). `significant` is p_value < alpha, which is exactly when the
    interval [ci_low, ci_high] excludes 0."""

    test: TestName
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    statistic: float | None
    p_value: float | None
    df: float | None = None  # Welch-Satterthwaite degrees of freedom (t-test only)
    significant: bool = False
    enough_data: bool = True  # False: no verdict (a side has too few rewards)

    @property
    def verdict(self) -> Verdict:
        if not self.enough_data or self.p_value is None or self.difference is None:
            return "not enough data"
        if not self.significant:
            return "no significant difference"
        return "better" if self.difference > 0 else "worse"


def _untested(test: TestName, difference: float | None) -> Comparison:
    return Comparison(test, difference, None, None, None, None, None, significant=False, enough_data=False)


def welch_t_test(treatment: Sequence[float], control: Sequence[float], alpha: float = ALPHA) -> Comparison:
    """Welch's t-test of mean(treatment) - mean(control), with the interval of the same t distribution
    (Welch-Satterthwaite df), so the interval excludes 0 exactly when p < alpha.

    Both samples need n >= 2 (a variance each); with less there is only the difference. When both have
    zero variance the test is degenerate: equal means give p = 1, different means p = 0 (the data cannot
    be explained by noise at all), and the interval is the difference itself.
    """
    n1, n2 = len(treatment), len(control)
    if n1 < 2 or n2 < 2:
        return _untested("welch_t", _mean(treatment) - _mean(control) if n1 and n2 else None)
    diff = _mean(treatment) - _mean(control)
    if np.var(treatment) == 0 and np.var(control) == 0:
        same = diff == 0
        return Comparison("welch_t", diff, diff, diff, 0.0 if same else math.copysign(math.inf, diff),
                          1.0 if same else 0.0, None, significant=not same)
    result = stats.ttest_ind(treatment, control, equal_var=False)
    p = float(result.pvalue)
    if not math.isfinite(p):  # a variance lost to rounding (values equal but for the last bits): no test
        return _untested("welch_t", diff)
    interval = result.confidence_interval(1 - alpha)
    low, high = _agreeing(float(interval.low), float(interval.high), p < alpha, diff)
    return Comparison("welch_t", diff, low, high, float(result.statistic), p, float(result.df),
                      significant=p < alpha)


def _agreeing(low: float, high: float, significant: bool, difference: float) -> tuple[float, float]:
    """The t interval and p-value come from one distribution, but `t.ppf` and `t.sf` round separately:
    right at the boundary they can disagree in the last bit. The p-value decides; the bound moves by
    that rounding only."""
    if not significant:
        return min(low, 0.0), max(high, 0.0)
    if low <= 0.0 <= high:
        return (math.nextafter(0.0, 1.0), high) if difference > 0 else (low, math.nextafter(0.0, -1.0))
    return low, high


def two_proportion_z_test(successes_t: int, n_t: int, successes_c: int, n_c: int,
                          alpha: float = ALPHA) -> Comparison:
    """The pooled two-proportion z-test of p_t - p_c (the 2x2 chi-square test without continuity
    correction; z is the signed square root of its statistic), with Mee's score interval: the
    differences d whose score test of p_t - p_c = d is not rejected at `alpha`. At d = 0 that score
    test is this z-test, so the interval excludes 0 exactly when p < alpha; it stays inside [-1, 1]."""
    if n_t < 1 or n_c < 1:
        return _untested("two_proportion_z", None)
    diff = successes_t / n_t - successes_c / n_c

    def p_of(delta: float) -> float:
        z = float(_score(np.asarray(successes_t), n_t, np.asarray(successes_c), n_c, delta))
        return float(2 * special.ndtr(-abs(z)))  # two-sided normal tail (ndtr: the normal cdf)

    p = p_of(0.0)
    low, high = _invert(p_of, diff, p, alpha, steps=40)
    z = float(_score(np.asarray(successes_t), n_t, np.asarray(successes_c), n_c, 0.0))
    return Comparison("two_proportion_z", diff, low, high, z, p, significant=p < alpha)


def barnard_exact_test(successes_t: int, n_t: int, successes_c: int, n_c: int,
                       alpha: float = ALPHA) -> Comparison:
    """Barnard's exact unconditional test of p_t = p_c with the pooled score statistic (two-sided; the
    chance of a table at least as extreme, maximised over the common rate: scipy's `barnard_exact` with
    `pooled=True`, except that tables tied with the observed one count, as they should, where scipy's
    float comparison can drop them: scipy/scipy#18798), and the interval that inverts the same exact test for
    p_t - p_c = d with the score statistic of d (Chan & Zhang 1999). Exact at every n; the cost grows
    as n_t * n_c, so it is for small or sparse tables."""
    if n_t < 1 or n_c < 1:
        return _untested("barnard_exact", None)
    diff = successes_t / n_t - successes_c / n_c

    p_of = _exact_score_p(successes_t, n_t, successes_c, n_c)
    p = p_of(0.0)
    low, high = _invert(p_of, diff, p, alpha, steps=22)
    z = float(_score(np.asarray(successes_t), n_t, np.asarray(successes_c), n_c, 0.0))
    return Comparison("barnard_exact", diff, low, high, z, p, significant=p < alpha)


def proportion_test(successes_t: int, n_t: int, successes_c: int, n_c: int, alpha: float = ALPHA) -> Comparison:
    """Barnard's exact test for sparse tables (an expected cell count under `EXACT_BELOW_EXPECTED`, where
    the z-test's normal approximation fails, e.g. p = 0.046 for 0/2 against 2/2 where the exact tests
    give 0.125 to 0.33), the z-test otherwise."""
    exact = _proportion_test_name(successes_t, n_t, successes_c, n_c) == "barnard_exact"
    return (barnard_exact_test if exact else two_proportion_z_test)(successes_t, n_t, successes_c, n_c, alpha)


def _proportion_test_name(successes_t: int, n_t: int, successes_c: int,
                          n_c: int) -> Literal["two_proportion_z", "barnard_exact"]:
    n, up = n_t + n_c, successes_t + successes_c
    smallest_expected = min(n_t, n_c) * min(up, n - up) / n if n else 0.0
    if smallest_expected < EXACT_BELOW_EXPECTED and max(n_t, n_c) <= EXACT_MAX_PER_ARM:
        return "barnard_exact"
    return "two_proportion_z"


def compare(treatment: Sequence[float], control: Sequence[float], kind: str, alpha: float = ALPHA,
            min_per_arm: int = MIN_PER_ARM) -> Comparison:
    """The test that fits the reward kind (two proportions for thumbs, Welch's t otherwise). With fewer
    than `min_per_arm` rewards in either arm: only the difference, verdict "not enough data"."""
    _check_kind(kind)
    enough = min(len(treatment), len(control)) >= min_per_arm
    if kind == "thumbs":
        s_t, n_t, s_c, n_c = _successes(treatment), len(treatment), _successes(control), len(control)
        if enough:
            return proportion_test(s_t, n_t, s_c, n_c, alpha)
        return _untested(_proportion_test_name(s_t, n_t, s_c, n_c), s_t / n_t - s_c / n_c if n_t and n_c else None)
    if enough:
        return welch_t_test(treatment, control, alpha)
    return _untested("welch_t", _mean(treatment) - _mean(control) if treatment and control else None)


def _invert(p_of: Callable[[float], float], estimate: float, p_zero: float, alpha: float,
            steps: int) -> tuple[float, float]:
    """The interval of differences d with p_of(d) >= alpha around the estimate (where p = 1), each bound
    found by bisection towards -1 and 1 (rejected: the score there is infinite unless the estimate is
    that bound). 0 enters the search with p_zero, the reported p-value, so the interval holds 0 exactly
    when the test does not reject 0, even where an exact test's p(d) is not monotone."""

    def bound(end: float) -> float:
        inside, outside = estimate, end
        if inside == end:
            return end
        if min(estimate, end) < 0.0 < max(estimate, end):
            if p_zero >= alpha:
                inside = 0.0
            else:
                outside = 0.0
        for _ in range(steps):
            mid = (inside + outside) / 2
            if p_of(mid) >= alpha:
                inside = mid
            else:
                outside = mid
        if p_zero >= alpha and 0.0 < abs(inside) <= 2.0 ** (1 - steps):
            # Within the search's resolution of 0 is 0 (an exact p can jump right next to 0, where
            # tables tied at d = 0 stop being tied).
            return 0.0
        return inside

    return bound(-1.0), bound(1.0)


def _restricted_rates(s_t: NDArray[np.float64], n_t: int, s_c: NDArray[np.float64], n_c: int,
                      delta: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The maximum-likelihood rates (r_t, r_c) under r_t - r_c = delta: the pooled rate at delta = 0,
    else the likelihood equation's cubic root in closed form (Farrington & Manning 1990)."""
    if delta == 0:
        pooled = (s_t + s_c) / (n_t + n_c)
        return pooled, pooled
    p_t, p_c = s_t / n_t, s_c / n_c
    theta = n_c / n_t
    a = 1 + theta
    b = -(1 + theta + p_t + theta * p_c + delta * (theta + 2))
    c = delta ** 2 + delta * (2 * p_t + theta + 1) + p_t + theta * p_c
    d = -p_t * delta * (1 + delta)
    v = b ** 3 / (27 * a ** 3) - b * c / (6 * a ** 2) + d / (2 * a)
    u = np.where(v >= 0, 1.0, -1.0) * np.sqrt(np.maximum(b ** 2 / (9 * a ** 2) - c / (3 * a), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(u == 0, 1.0, v / u ** 3)
    w = (math.pi + np.arccos(np.clip(cosine, -1.0, 1.0))) / 3
    r_t = np.clip(2 * u * np.cos(w) - b / (3 * a), max(0.0, delta), min(1.0, 1.0 + delta))
    return r_t, r_t - delta


def _score(s_t: NDArray[np.int_], n_t: int, s_c: NDArray[np.int_], n_c: int, delta: float) -> NDArray[np.float64]:
    """The score statistic of p_t - p_c = delta for tables (s_t of n_t, s_c of n_c), broadcast: the
    observed difference minus delta over its standard error at the restricted rates (Mee's, i.e.
    Miettinen & Nurminen's without the n / (n - 1); at delta = 0 the pooled two-proportion z)."""
    st, sc = np.asarray(s_t, dtype=float), np.asarray(s_c, dtype=float)
    r_t, r_c = _restricted_rates(st, n_t, sc, n_c, delta)
    variance = r_t * (1 - r_t) / n_t + r_c * (1 - r_c) / n_c
    departure = st / n_t - sc / n_c - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = departure / np.sqrt(variance)
    # No departure is a score of 0, also where the variance is 0 (everyone up on both sides at delta = 0).
    return np.where(departure == 0, 0.0, z)


def _exact_score_p(s_t: int, n_t: int, s_c: int, n_c: int) -> Callable[[float], float]:
    """delta -> the exact unconditional p-value of p_t - p_c = delta: the chance of a table whose |score|
    is at least the observed one, maximised over the control's rate (the nuisance parameter)."""
    k_t, k_c = np.arange(n_t + 1), np.arange(n_c + 1)
    choose_t = np.asarray(special.comb(n_t, k_t), dtype=np.float64)
    choose_c = np.asarray(special.comb(n_c, k_c), dtype=np.float64)

    def p_of(delta: float) -> float:
        scores = _score(k_t[:, None], n_t, k_c[None, :], n_c, delta)
        observed = abs(float(scores[s_t, s_c]))
        # Tables tied with the observed one in exact arithmetic may differ from it in the last bits here.
        extreme = (np.abs(scores) >= observed * (1 - 1e-9)).astype(float)

        def mass(rates_c: NDArray[np.float64]) -> NDArray[np.float64]:
            chances = (_binom_pmf(k_t, choose_t, rates_c + delta) @ extreme) * _binom_pmf(k_c, choose_c, rates_c)
            return np.asarray(chances.sum(axis=1))

        # The control's rate keeps both rates in [0, 1]; the maximum by a grid zoomed in twice (the mass
        # is a smooth polynomial in the rate; each zoom shrinks the spacing 32 times, to 1.5e-5).
        low, high = max(0.0, -delta), min(1.0, 1.0 - delta)
        best = 0.0
        for _ in range(3):
            grid = np.linspace(low, high, 65)
            values = mass(grid)
            i = int(np.argmax(values))
            best = max(best, float(values[i]))
            low, high = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
        return min(best, 1.0)

    return p_of


def _binom_pmf(k: NDArray[np.int_], choose: NDArray[np.float64],
               rates: NDArray[np.float64]) -> NDArray[np.float64]:
    """Binomial probabilities of k = 0..n successes, one row per rate (n <= EXACT_MAX_PER_ARM: the
    binomial coefficients are exact in floating point and the powers do not underflow to matter)."""
    r = np.clip(rates, 0.0, 1.0)[:, None]
    return np.asarray(choose * r ** k * (1.0 - r) ** k[::-1])


def _successes(values: Sequence[float]) -> int:
    return int(round(math.fsum(values)))


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _check_kind(kind: str) -> None:
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; choose one of {', '.join(REWARD_KINDS)}")


# ------------------------------------------------------------------------------------ sample ratio

@dataclass(frozen=True)
class SampleRatio:
    """Users per arm against the traffic weights: chi-square goodness of fit over the arms of positive
    weight (an arm of weight 0 takes nobody new; whoever it holds came under earlier weights).
    `p_value` is None with fewer than two such arms or nobody in them; `mismatch` needs `enough_data`
    (every expected count at least `SRM_MIN_EXPECTED`, where the chi-square approximation holds)."""

    statistic: float | None
    p_value: float | None
    enough_data: bool
    mismatch: bool


def sample_ratio_check(observed: Sequence[int], weights: Sequence[float], alpha: float = SRM_ALPHA,
                       min_expected: float = SRM_MIN_EXPECTED) -> SampleRatio:
    """Whether `observed` users per arm fit the shares the `weights` ask (flagged when p < alpha)."""
    pairs = [(int(o), float(w)) for o, w in zip(observed, weights, strict=True) if w > 0]
    total = sum(o for o, _ in pairs)
    if len(pairs) < 2 or total == 0:
        return SampleRatio(None, None, False, False)
    weight_sum = math.fsum(w for _, w in pairs)
    expected = [total * w / weight_sum for _, w in pairs]
    result = stats.chisquare([o for o, _ in pairs], expected)
    p = float(result.pvalue)
    enough = min(expected) >= min_expected
    return SampleRatio(float(result.statistic), p, enough, enough and p < alpha)


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
