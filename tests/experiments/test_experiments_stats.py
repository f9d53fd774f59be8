"""A/B statistics and assignment, checked against scipy on known data; the results plot is a real PNG."""

from __future__ import annotations

import hashlib
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from service.experiments.stats import (
    PlotBar,
    RewardSummary,
    assign_bucket,
    choose_variant,
    compare,
    rewards_png,
    summarize_rewards,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[2]

# Known data with unequal sizes and variances (Welch's test is the one that matters here).
A = [3.1, 2.4, 4.8, 3.9, 2.2, 5.0, 3.3, 4.1, 2.9, 3.6, 4.4]
B = [4.2, 5.9, 3.8, 6.4, 5.1, 7.0, 4.9]


def test_welch_matches_scipy_both_ways():
    for treatment, control in ((B, A), (A, B)):
        ours = welch_t_test(treatment, control)
        ref = stats.ttest_ind(treatment, control, equal_var=False)
        assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-10)
        assert ours.df == pytest.approx(ref.df, rel=1e-12)
        lo, hi = ref.confidence_interval(0.95)
        assert (ours.ci_low, ours.ci_high) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
        assert ours.difference == pytest.approx(np.mean(treatment) - np.mean(control))


def test_welch_on_random_samples_matches_scipy():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n1, n2 = rng.integers(2, 60, size=2)
        a = rng.normal(rng.normal(), rng.uniform(0.1, 3), n1).tolist()
        b = rng.normal(rng.normal(), rng.uniform(0.1, 3), n2).tolist()
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert welch_t_test(a, b).p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


def test_welch_degenerate_and_small_samples():
    assert welch_t_test([1.0], [2.0, 3.0]).p_value is None
    assert welch_t_test([], []).difference is None
    same = welch_t_test([2.0, 2.0], [2.0, 2.0, 2.0])
    assert same.p_value == 1.0 and same.difference == 0.0
    apart = welch_t_test([3.0, 3.0], [2.0, 2.0])
    assert apart.p_value == 0.0 and apart.statistic == math.inf


def test_two_proportions_match_chi_square_without_correction():
    # z^2 of the pooled two-proportion test is the 2x2 chi-square statistic; the p-values are equal.
    for s_t, n_t, s_c, n_c in ((70, 100, 52, 100), (9, 40, 15, 35), (1, 12, 0, 9), (480, 1000, 500, 1010)):
        ours = two_proportion_z_test(s_t, n_t, s_c, n_c)
        chi2, p, _, _ = stats.chi2_contingency([[s_t, n_t - s_t], [s_c, n_c - s_c]], correction=False)
        assert ours.statistic ** 2 == pytest.approx(chi2, rel=1e-10)
        assert ours.p_value == pytest.approx(p, rel=1e-9)
        assert math.copysign(1, ours.statistic) == math.copysign(1, s_t / n_t - s_c / n_c)
        # The difference's interval inverts the same score test (Mee): inside [-1, 1], around the
        # estimate, excluding 0 exactly when p < 0.05 (the unpooled Wald interval could leave [-1, 1]).
        diff = s_t / n_t - s_c / n_c
        assert -1 <= ours.ci_low <= diff <= ours.ci_high <= 1
        assert ours.significant == (ours.p_value < 0.05) == (ours.ci_low > 0 or ours.ci_high < 0)


def test_two_proportions_degenerate():
    assert two_proportion_z_test(5, 5, 7, 7).p_value == 1.0
    assert two_proportion_z_test(0, 0, 7, 7).p_value is None


def test_t_interval_of_mean_matches_scipy():
    s = summarize_rewards(A, "number")
    lo, hi = stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=stats.sem(A))
    assert s.n == len(A) and s.mean == pytest.approx(np.mean(A))
    assert s.std == pytest.approx(np.std(A, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    one = summarize_rewards([4.0], "rating")
    assert one.mean == 4.0 and one.ci_low is None
    assert summarize_rewards([], "number") == RewardSummary(0, None, None, None, None)


def test_wilson_interval_matches_scipy():
    for k, n in ((0, 10), (3, 10), (10, 10), (57, 123)):
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert (lo, hi) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    s = summarize_rewards([1, 0, 1, 1], "thumbs")
    assert s.successes == 3 and s.mean == 0.75 and 0 < s.ci_low < 0.75 < s.ci_high <= 1


def test_compare_picks_the_test_of_the_kind():
    # Thumbs: the exact test while an expected cell count is under 5, the z-test beyond.
    assert compare([1, 1, 0, 1], [0, 0, 1, 0], "thumbs").test == "barnard_exact"
    assert compare([1, 0] * 20, [0, 1, 0] * 12, "thumbs").test == "two_proportion_z"
    assert compare(B, A, "rating").test == "welch_t"
    with pytest.raises(ValueError):
        compare(B, A, "stars")


def test_assignment_is_deterministic_and_salted():
    assert assign_bucket("s1", "exp", "alice") == assign_bucket("s1", "exp", "alice")
    assert assign_bucket("s1", "exp", "alice") != assign_bucket("s2", "exp", "alice")
    assert assign_bucket("s1", "exp", "alice") != assign_bucket("s1", "exp2", "alice")
    # The separator keeps differently split strings apart.
    assert assign_bucket("s", "ab", "c") != assign_bucket("s", "a", "bc")
    # The documented rule (64 bits of sha256), and the same value in another process with another
    # PYTHONHASHSEED (nothing depends on Python's per-process string hash).
    digest = hashlib.sha256(b"salt\x1fe\x1fu").digest()
    assert assign_bucket("salt", "e", "u") == int.from_bytes(digest[:8], "big") / 2 ** 64
    # The module file alone (importing the `service` package would load torch: slow, and not the point).
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('m', sys.argv[1]); "
            "m = sys.modules['m'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(repr(m.assign_bucket('salt', 'e', 'u')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "service" / "experiments" / "stats.py")],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert float(out.stdout) == assign_bucket("salt", "e", "u")


@pytest.mark.parametrize("weights", [[1, 1], [0.2, 0.3, 0.5], [70, 20, 10], [1, 0, 3]])
def test_assignment_matches_the_weights_within_two_points(weights):
    users = [f"user-{i}" for i in range(10_000)]
    counts = np.zeros(len(weights))
    for uid in users:
        counts[choose_variant(weights, assign_bucket("a-salt", "exp-1", uid))] += 1
    shares = counts / len(users)
    expected = np.asarray(weights, dtype=float) / sum(weights)
    assert np.all(np.abs(shares - expected) <= 0.02), (shares, expected)
    assert counts[np.asarray(weights) == 0].sum() == 0  # a zero weight gets nobody


def test_choose_variant_edges():
    assert choose_variant([1, 1], 0.0) == 0
    assert choose_variant([1, 1], 0.4999) == 0 and choose_variant([1, 1], 0.5) == 1
    assert choose_variant([0, 0, 2], 0.999999) == 2
    for bad in ([0, 0], [1, -1], [math.nan, 1], [math.inf, 1]):
        with pytest.raises(ValueError):
            choose_variant(bad, 0.3)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    return width, height


def test_rewards_png_is_a_png_and_shows_every_variant():
    bars = [PlotBar("control", summarize_rewards([0, 1, 0, 0, 1], "thumbs"), True),
            PlotBar("steered", summarize_rewards([1, 1, 0, 1, 1], "thumbs")),
            PlotBar("empty", summarize_rewards([], "thumbs"))]
    png = rewards_png(bars, "exp", "thumbs")
    width, height = _png_size(png)
    assert width > 300 and height > 200
    wider = rewards_png(bars + [PlotBar("more", summarize_rewards([1, 0], "thumbs"))], "exp", "thumbs")
    assert _png_size(wider)[0] > width  # one slot per variant
