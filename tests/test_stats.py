"""Bootstrap intervals over videos, checked against cases with a known answer."""
import math

import numpy as np
import pytest

from pipeline.stats import bootstrap_mean, paired_difference, resample_indices


def test_constant_differences_give_a_zero_width_interval():
    a = np.linspace(20.0, 30.0, 40)
    draws = resample_indices(40, resamples=2000, seed=0)
    iv = paired_difference(a + 0.7, a, draws)
    assert iv.mean == pytest.approx(0.7) and iv.lo == pytest.approx(0.7) and iv.hi == pytest.approx(0.7)
    assert iv.excludes_zero
    same = paired_difference(a, a, draws)
    assert (same.lo, same.mean, same.hi) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_a_normal_sample_interval_covers_its_mean_with_the_textbook_width():
    rng = np.random.default_rng(1)
    n, sigma = 400, 2.0
    x = rng.normal(5.0, sigma, n)
    iv = bootstrap_mean(x, resample_indices(n, resamples=4000, seed=3))
    assert iv.lo < 5.0 < iv.hi
    assert iv.lo < x.mean() < iv.hi
    # a percentile interval of the mean of a normal sample is about mean +- 1.96 s / sqrt(n)
    expected = 2 * 1.96 * x.std(ddof=1) / math.sqrt(n)
    assert iv.hi - iv.lo == pytest.approx(expected, rel=0.1)


def test_the_coverage_of_95_percent_intervals_is_about_95_percent():
    rng = np.random.default_rng(7)
    draws = resample_indices(50, resamples=1000, seed=0)
    intervals = [bootstrap_mean(rng.normal(0.0, 1.0, 50), draws) for _ in range(300)]
    covered = sum(iv.lo < 0.0 < iv.hi for iv in intervals) / len(intervals)
    assert 0.88 <= covered <= 0.99


def test_pairing_removes_the_variation_the_methods_share():
    rng = np.random.default_rng(2)
    video_difficulty = rng.normal(0.0, 5.0, 64)  # big, shared by both methods
    a = 30 + video_difficulty + rng.normal(0.3, 0.2, 64)
    b = 30 + video_difficulty
    draws = resample_indices(64, resamples=2000, seed=0)
    paired = paired_difference(a, b, draws)
    assert paired.excludes_zero and paired.lo > 0.2
    # the unpaired intervals of the two means overlap widely
    ia, ib = bootstrap_mean(a, draws), bootstrap_mean(b, draws)
    assert ia.lo < ib.hi


def test_draws_are_seeded_and_bad_input_is_refused():
    np.testing.assert_array_equal(resample_indices(10, resamples=5, seed=4), resample_indices(10, resamples=5, seed=4))
    draws = resample_indices(3, resamples=10, seed=0)
    with pytest.raises(ValueError, match="NaN or inf at videos \\[1\\]"):
        bootstrap_mean([1.0, float("nan"), 2.0], draws)
    with pytest.raises(ValueError, match="same videos"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0], draws)
    with pytest.raises(ValueError, match="resamples, n"):
        bootstrap_mean([1.0, 2.0], draws)
    with pytest.raises(ValueError, match="at least one video"):
        resample_indices(0, resamples=10, seed=0)
