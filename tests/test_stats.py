"""The report's statistics on cases whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewardlab.stats import ROUNDS, mean_ci, paired_bootstrap


def test_mean_ci_is_students_t_over_the_seeds():
    mean, low, high = mean_ci([0.70, 0.72, 0.74])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2 dof) × sd / √n
    assert mean == pytest.approx(0.72) and low == pytest.approx(0.72 - half) and high == pytest.approx(0.72 + half)


def test_one_seed_has_an_unknown_interval_not_a_zero_width_one():
    mean, low, high = mean_ci([0.8])
    assert mean == 0.8 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in mean_ci([]))
    assert mean_ci([0.6, math.nan, 0.8])[0] == pytest.approx(0.7)  # a missing value is not a zero


def test_identical_settings_differ_by_nothing_with_p_one():
    a = (np.random.default_rng(0).random((3, 100)) < 0.7).astype(float)
    d = paired_bootstrap(a, a.copy(), seeds_paired=True)
    assert (d.diff, d.ci_low, d.ci_high, d.p, d.pairs) == (0.0, 0.0, 0.0, 1.0, 100)


def test_always_right_against_always_wrong_has_the_smallest_p():
    d = paired_bootstrap(np.ones((2, 30)), np.zeros((2, 30)), seeds_paired=True)
    assert d.diff == 1.0 and d.ci_low == pytest.approx(1.0) and d.p == pytest.approx(2 / (ROUNDS + 1))


def test_two_pairs_one_won_by_a():
    """Pairs resampled: a wins pair 0 only, so the resampled difference is k/2 with k ~ Binomial(2, 1/2);
    it is 0 a quarter of the time: p = 2 × 1/4, and the 95% interval is [0, 1]."""
    d = paired_bootstrap(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]), seeds_paired=True)
    assert d.diff == 0.5 and (d.ci_low, d.ci_high) == (0.0, 1.0) and d.p == pytest.approx(0.5, abs=0.03)


def test_a_large_single_seed_difference_matches_the_normal_interval():
    a, b = np.zeros((1, 1000)), np.zeros((1, 1000))
    a[0, :600], b[0, :500] = 1, 1  # 100 pairs won by a alone: diff 0.1, sd of the per-pair difference 0.3
    d = paired_bootstrap(a, b, seeds_paired=True)
    half = 1.959964 * 0.3 / math.sqrt(1000)
    assert d.diff == pytest.approx(0.1) and d.p == pytest.approx(2 / (ROUNDS + 1))
    assert d.ci_low == pytest.approx(0.1 - half, abs=0.003) and d.ci_high == pytest.approx(0.1 + half, abs=0.003)


def test_one_lucky_seed_is_not_significant_however_many_pairs():
    """a: 0.9 on seed 1, 0.5 on seed 2; b: 0.6 on both. Over 1,000 pairs a pair-level test would call
    the +0.1 certain; with seeds resampled it is +0.3, +0.1 or −0.1, and the last comes a quarter of the time."""
    n = 1000
    a = np.zeros((2, n))
    a[0, :900], a[1, :500] = 1, 1
    b = np.zeros((2, n))
    b[:, :600] = 1
    d = paired_bootstrap(a, b, seeds_paired=True)
    assert d.diff == pytest.approx(0.1) and d.ci_low < 0 < d.ci_high and d.p == pytest.approx(0.5, abs=0.05)


def test_unpaired_seeds_are_drawn_separately():
    a, b = np.zeros((2, 50)), np.zeros((3, 50))
    a[0, :40], a[1, :30], b[:, :20] = 1, 1, 1
    d = paired_bootstrap(a, b, seeds_paired=False)
    assert d.diff == pytest.approx(0.7 - 0.4)
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_bootstrap(a, b, seeds_paired=True)
    with pytest.raises(ValueError, match="same pairs"):
        paired_bootstrap(a, np.zeros((3, 49)), seeds_paired=False)
