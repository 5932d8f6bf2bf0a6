"""The paired (and hierarchical) bootstrap against hand-computable cases and scipy's paired bootstrap."""

import numpy as np
import pytest
from scipy.stats import bootstrap

from evaluation.bootstrap import difference_intervals, resampled_means


def test_a_constant_difference_has_a_zero_width_interval_at_that_constant():
    a = np.random.default_rng(1).random((1, 3, 500))
    low, high = difference_intervals([(a, a + 0.25)], resamples=2000)
    assert low == pytest.approx([0.25] * 3, abs=1e-12) and high == pytest.approx([0.25] * 3, abs=1e-12)


def test_a_normal_sample_gives_the_textbook_width():
    n, sigma = 2000, 0.3
    differences = np.random.default_rng(2).normal(0.1, sigma, n)
    a = np.zeros((1, 1, n))
    low, high = difference_intervals([(a, a + differences)], resamples=10_000)
    standard_error = differences.std(ddof=1) / np.sqrt(n)
    assert high[0] - low[0] == pytest.approx(2 * 1.96 * standard_error, rel=0.05)
    assert (low[0] + high[0]) / 2 == pytest.approx(differences.mean(), abs=0.1 * standard_error)


def test_one_seed_interval_matches_scipy_s_paired_bootstrap():
    generator = np.random.default_rng(3)
    a = generator.random(800)
    b = a + generator.normal(0.02, 0.2, 800)
    low, high = difference_intervals([(a[None, None], b[None, None])], resamples=10_000)
    scipy_interval = bootstrap((a, b), lambda x, y, axis: y.mean(axis) - x.mean(axis), paired=True, vectorized=True,
                               n_resamples=10_000, method="percentile", random_state=4).confidence_interval
    width = scipy_interval.high - scipy_interval.low
    assert low[0] == pytest.approx(scipy_interval.low, abs=0.05 * width)
    assert high[0] == pytest.approx(scipy_interval.high, abs=0.05 * width)


def test_hierarchical_resampling_spans_the_seeds_spread():
    # No query noise: every query scores 0.5 for A; B's three seeds score +0, +0.01, +0.02 on every query.
    a = np.full((1, 1, 300), 0.5)
    b = np.stack([a[0] + offset for offset in (0.0, 0.01, 0.02)])
    low, high = difference_intervals([(a, b)], resamples=5000)
    # The mean of 3 seeds drawn with replacement from {0, 0.01, 0.02} is 0 (all three draws the first) with
    # probability 1/27 > 2.5 %, and 0.02 likewise: the interval is the seeds' whole range.
    assert low[0] == pytest.approx(0.0, abs=1e-12) and high[0] == pytest.approx(0.02, abs=1e-12)
    # With one seed per side the same B (its middle seed) has a zero-width interval: the spread came from the seeds.
    assert np.concatenate(difference_intervals([(a, b[1:2])], resamples=500)) == pytest.approx([0.01, 0.01])


def test_tasks_are_averaged_and_cells_share_the_query_draw():
    generator = np.random.default_rng(5)
    first = generator.random((1, 1, 40)).repeat(2, axis=1)  # two cells with the same per-query scores
    second = generator.random((1, 1, 60)).repeat(2, axis=1)
    a_means, b_means = resampled_means([(first, first + 0.2), (second, second + 0.5)], resamples=300)
    assert a_means.shape == b_means.shape == (300, 2)
    assert np.array_equal(a_means[:, 0], a_means[:, 1])  # one query draw for every cell
    assert np.ptp(a_means[:, 0]) > 0.01
    assert b_means - a_means == pytest.approx(np.full((300, 2), (0.2 + 0.5) / 2), abs=1e-12)  # mean over tasks
