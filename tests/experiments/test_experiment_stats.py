"""A/B statistics at every small n, against scipy: every (successes, n) pair per arm for n = 0..6.

What must hold at every n: a proportion's interval inside [0, 1] around its estimate; a difference's
interval inside [-1, 1]; significant <=> the interval excludes 0 <=> p < alpha; the p-values those of
scipy for the test used; no verdict below MIN_PER_ARM; the sample-ratio check as scipy's chisquare.
"""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from service.experiments.stats import (
    ALPHA,
    CONFIDENCE,
    MIN_PER_ARM,
    SRM_ALPHA,
    SRM_MIN_EXPECTED,
    Comparison,
    barnard_exact_test,
    compare,
    proportion_test,
    sample_ratio_check,
    summarize_rewards,
    two_proportion_z_test,
    welch_t_test,
)

NS = range(7)
ARMS = [(s, n) for n in NS for s in range(n + 1)]  # every (successes, n) of one arm


def thumbs(successes: int, n: int) -> list[float]:
    return [1.0] * successes + [0.0] * (n - successes)


def assert_agrees(c: Comparison, alpha: float = ALPHA) -> None:
    """The invariants of a comparison that has a test."""
    assert c.p_value is not None and c.ci_low is not None and c.ci_high is not None and c.difference is not None
    assert 0.0 <= c.p_value <= 1.0
    assert c.ci_low <= c.difference <= c.ci_high
    excludes_zero = c.ci_low > 0 or c.ci_high < 0
    assert c.significant == excludes_zero == (c.p_value < alpha), c
    assert c.verdict == (("better" if c.difference > 0 else "worse") if c.significant
                         else "no significant difference")


def assert_untested(c: Comparison) -> None:
    assert (c.p_value, c.ci_low, c.ci_high, c.statistic) == (None, None, None, None)
    assert c.significant is False and c.enough_data is False and c.verdict == "not enough data"


# ----------------------------------------------------------------------------------- one arm's interval

@pytest.mark.parametrize(("successes", "n"), ARMS)
def test_proportion_interval_is_inside_0_1_around_the_estimate(successes, n):
    s = summarize_rewards(thumbs(successes, n), "thumbs")
    if n == 0:
        assert (s.mean, s.ci_low, s.ci_high) == (None, None, None)
        return
    assert s.successes == successes and s.mean == successes / n
    assert 0.0 <= s.ci_low <= s.mean <= s.ci_high <= 1.0
    ref = stats.binomtest(successes, n).proportion_ci(CONFIDENCE, method="wilson")
    assert (s.ci_low, s.ci_high) == (pytest.approx(max(0.0, ref.low), abs=1e-12),
                                     pytest.approx(min(1.0, ref.high), abs=1e-12))


# ------------------------------------------------------------------------------- difference of thumbs

def exact_reference_p(s_t: int, n_t: int, s_c: int, n_c: int) -> float:
    """Barnard's two-sided exact test with the pooled score, independently: the tables as extreme as the
    observed one in exact rational arithmetic (so ties are ties), the maximum over the common rate on a
    fine grid. z^2 = (s_t n_c - s_c n_t)^2 N / (n_t n_c k (N - k)) with k = s_t + s_c, N = n_t + n_c."""
    big_n = n_t + n_c

    def z2(a: int, b: int) -> Fraction:
        k = a + b
        if a * n_c == b * n_t:
            return Fraction(0)
        return Fraction((a * n_c - b * n_t) ** 2 * big_n, n_t * n_c * k * (big_n - k))

    observed = z2(s_t, s_c)
    region = np.array([[float(z2(a, b) >= observed) for b in range(n_c + 1)] for a in range(n_t + 1)])
    return float(np.max(np.einsum("gi,ij,gj->g", fine_pmf(n_t), region, fine_pmf(n_c))))


@functools.cache
def fine_pmf(n: int) -> np.ndarray:
    """Binomial probabilities of 0..n successes at 20001 rates in [0, 1], one row per rate."""
    rates = np.linspace(0.0, 1.0, 20001)
    return np.asarray(stats.binom.pmf(np.arange(n + 1)[None, :], n, rates[:, None]))


def has_ties(s_t: int, n_t: int, s_c: int, n_c: int) -> bool:
    """Whether another table's pooled score equals the observed one's in exact arithmetic (where scipy's
    float comparison may leave it out of the p-value: scipy/scipy#18798)."""
    def key(a: int, b: int) -> Fraction:
        k = a + b
        return Fraction(0) if a * n_c == b * n_t else Fraction((a * n_c - b * n_t) ** 2,
                                                               k * (n_t + n_c - k))
    observed = key(s_t, s_c)
    return observed != 0 and any(key(a, b) == observed and (a, b) != (s_t, s_c)
                                 for a in range(n_t + 1) for b in range(n_c + 1))


@pytest.mark.parametrize(("n_t", "n_c"), list(itertools.product(NS, NS)))
def test_proportion_tests_agree_at_every_small_n(n_t, n_c):
    for s_t, s_c in itertools.product(range(n_t + 1), range(n_c + 1)):
        table = [[s_t, s_c], [n_t - s_t, n_c - s_c]]  # columns are the arms (scipy's barnard_exact)
        exact, z = barnard_exact_test(s_t, n_t, s_c, n_c), two_proportion_z_test(s_t, n_t, s_c, n_c)
        if n_t == 0 or n_c == 0:
            for c in (exact, z):
                assert_untested(c)
                assert c.difference is None
            continue
        for c in (exact, z):
            assert_agrees(c)
            assert -1.0 <= c.ci_low and c.ci_high <= 1.0
            assert c.difference == pytest.approx(s_t / n_t - s_c / n_c)
        # The exact p-value: scipy's barnard_exact (pooled score, two-sided), except that ties count.
        ref = stats.barnard_exact(table, alternative="two-sided", pooled=True).pvalue
        assert exact.p_value == pytest.approx(exact_reference_p(s_t, n_t, s_c, n_c), abs=1e-6)
        assert exact.p_value >= ref - 1e-6
        if not has_ties(s_t, n_t, s_c, n_c):
            assert exact.p_value == pytest.approx(ref, abs=1e-6), (table, exact.p_value, ref)
        # The z-test: the 2x2 chi-square test without correction (p = 1 when everyone voted alike).
        up = s_t + s_c
        if 0 < up < n_t + n_c:
            chi2 = stats.chi2_contingency(table, correction=False)
            assert z.p_value == pytest.approx(chi2.pvalue, rel=1e-9, abs=1e-15)
            assert z.statistic ** 2 == pytest.approx(chi2.statistic, rel=1e-9, abs=1e-12)
        else:
            assert z.p_value == pytest.approx(1.0) and z.statistic == 0.0


def test_small_tables_use_the_exact_test():
    # Up to 6 a side some expected cell count is under 5, always: the exact test is the one used.
    for s_t, n_t, s_c, n_c in ((0, 1, 1, 1), (3, 6, 3, 6), (6, 6, 0, 6), (2, 5, 4, 6)):
        assert proportion_test(s_t, n_t, s_c, n_c) == barnard_exact_test(s_t, n_t, s_c, n_c)


def test_the_cases_of_the_issue():
    # One thumb per arm, up against down: an interval that is not a point, no significance.
    one = proportion_test(1, 1, 0, 1)
    assert one.difference == 1.0 and one.ci_low < 0 < one.ci_high <= 1.0 and not one.significant
    # 0/2 against 2/2: p = 0.125 (the z-test said 0.046), so no winner.
    zero_two = proportion_test(0, 2, 2, 2)
    assert zero_two.test == "barnard_exact" and zero_two.p_value == pytest.approx(0.125, abs=1e-9)
    assert zero_two.ci_low == -1.0 and zero_two.ci_high > 0 and not zero_two.significant
    # 1/2 against 0/2: the interval stays inside [-1, 1].
    half = proportion_test(1, 2, 0, 2)
    assert -1.0 <= half.ci_low < 0 < half.ci_high <= 1.0
    # 4/4 against 1/4: the Wald interval was 0.326 to 1.174; now inside [-1, 1] and holding 0 as p > alpha.
    most = proportion_test(4, 4, 1, 4)
    assert most.p_value > ALPHA and most.ci_low <= 0.0 < most.ci_high <= 1.0
    # And none of them gets a verdict: too few rewards.
    for s_t, n_t, s_c, n_c in ((1, 1, 0, 1), (0, 2, 2, 2), (1, 2, 0, 2), (4, 4, 1, 4)):
        c = compare(thumbs(s_t, n_t), thumbs(s_c, n_c), "thumbs")
        assert_untested(c)
        assert c.difference == pytest.approx(s_t / n_t - s_c / n_c)


def test_large_tables_use_the_z_test_and_its_score_interval():
    c = proportion_test(70, 100, 52, 100)
    assert c.test == "two_proportion_z"
    assert_agrees(c)
    chi2 = stats.chi2_contingency([[70, 52], [30, 48]], correction=False)
    assert c.p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    # At each bound the score test of p_t - p_c = bound sits at the critical value (Mee's interval).
    z_crit = stats.norm.isf(ALPHA / 2)
    for bound in (c.ci_low, c.ci_high):
        assert abs(mee_score(70, 100, 52, 100, bound)) == pytest.approx(z_crit, rel=1e-6)
    # Published values of Mee's interval (R DescTools::BinomDiffCI(method = "mee"), to its root-finding
    # tolerance).
    for table, (lo, hi) in (((56, 70, 48, 80), (0.05335712, 0.3377272)), ((9, 10, 3, 10), (0.1821489, 0.8369538))):
        mee = two_proportion_z_test(*table)
        assert (mee.ci_low, mee.ci_high) == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))
    # A sparse table of many rewards: the exact test up to 50 a side, the z-test beyond.
    assert proportion_test(1, 40, 6, 40).test == "barnard_exact"
    assert proportion_test(1, 400, 6, 400).test == "two_proportion_z"


def mee_score(s_t: int, n_t: int, s_c: int, n_c: int, delta: float) -> float:
    """The score statistic of p_t - p_c = delta, the restricted rates found by maximising the likelihood
    numerically (independent of the closed form the module uses)."""
    from scipy.optimize import minimize_scalar

    def nll(r_c: float) -> float:
        return -(stats.binom.logpmf(s_t, n_t, r_c + delta) + stats.binom.logpmf(s_c, n_c, r_c))

    r_c = minimize_scalar(nll, bounds=(max(0.0, -delta), min(1.0, 1.0 - delta)), method="bounded",
                          options={"xatol": 1e-12}).x
    r_t = r_c + delta
    se = math.sqrt(r_t * (1 - r_t) / n_t + r_c * (1 - r_c) / n_c)
    return (s_t / n_t - s_c / n_c - delta) / se


# ------------------------------------------------------------------------------- Welch's t, small n

values = st.lists(st.integers(1, 5).map(float) | st.floats(-100, 100, allow_nan=False), max_size=6)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # nearly equal values
@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(treatment=values, control=values)
def test_welch_at_every_small_n(treatment, control):
    c = welch_t_test(treatment, control)
    if len(treatment) < 2 or len(control) < 2:
        assert_untested(c)
        assert (c.difference is None) == (not treatment or not control)
        return
    if np.var(treatment) == 0 and np.var(control) == 0:
        assert_agrees(c)
        return  # degenerate: checked in tests/experiments/test_experiments_stats.py
    ref = stats.ttest_ind(treatment, control, equal_var=False)
    if not np.isfinite(ref.pvalue):
        assert_untested(c)
        return
    assert_agrees(c)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    assert c.df == pytest.approx(ref.df, rel=1e-9)
    lo, hi = ref.confidence_interval(CONFIDENCE)
    # The interval of the same t distribution (moved off 0 only where the two disagree in the last bit).
    assert c.ci_low == pytest.approx(lo, rel=1e-9, abs=1e-12) and c.ci_high == pytest.approx(hi, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("kind", ["thumbs", "rating", "number"])
def test_no_verdict_below_the_minimum_per_arm(kind):
    good = [1.0] * MIN_PER_ARM if kind != "rating" else [5.0, 4.0] * (MIN_PER_ARM // 2)
    bad = [0.0] * MIN_PER_ARM if kind != "rating" else [1.0, 2.0] * (MIN_PER_ARM // 2)
    for n_t, n_c in ((MIN_PER_ARM - 1, MIN_PER_ARM), (MIN_PER_ARM, MIN_PER_ARM - 1), (0, 0), (1, 1)):
        c = compare(good[:n_t], bad[:n_c], kind)
        assert_untested(c)
    full = compare(good, bad, kind)
    assert full.enough_data and full.significant and full.verdict == "better"
    assert compare(bad, good, kind).verdict == "worse"


# --------------------------------------------------------------------------------- sample ratio check

WEIGHTS = [[1, 1], [1, 3], [0.2, 0.3, 0.5], [1, 0, 3], [0, 1]]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_sample_ratio_check_is_scipys_chisquare(weights):
    for observed in itertools.product(NS, repeat=len(weights)):
        check = sample_ratio_check(observed, weights)
        kept = [(o, w) for o, w in zip(observed, weights, strict=True) if w > 0]
        total = sum(o for o, _ in kept)
        if len(kept) < 2 or total == 0:
            assert (check.p_value, check.mismatch) == (None, False)
            continue
        expected = [total * w / sum(w for _, w in kept) for _, w in kept]
        ref = stats.chisquare([o for o, _ in kept], expected)
        assert check.statistic == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
        assert check.p_value == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-300)
        assert check.enough_data == (min(expected) >= SRM_MIN_EXPECTED)
        assert check.mismatch == (check.enough_data and check.p_value < SRM_ALPHA)


def test_sample_ratio_mismatch_is_flagged():
    # 74/46 of a 50/50 split: unlikely (p ~ 0.011) but not beyond the threshold; 600/400 is.
    uneven = sample_ratio_check([74, 46], [1, 1])
    assert uneven.p_value == pytest.approx(stats.chisquare([74, 46]).pvalue) and not uneven.mismatch
    assert sample_ratio_check([600, 400], [1, 1]).mismatch
    assert not sample_ratio_check([250, 750], [1, 3]).mismatch
    # Too few users: the p-value is shown, nothing is flagged.
    few = sample_ratio_check([6, 0], [1, 1])
    assert few.p_value is not None and not few.enough_data and not few.mismatch
