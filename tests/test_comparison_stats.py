"""Tests for benchmarks/comparison_stats.py: bootstrap intervals and curve summaries."""

from __future__ import annotations

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from benchmarks import comparison_stats as cs


def _coverage(num_seeds: int, datasets: int, resamples: int) -> float:
  """Share of simulated normal datasets whose 95% bootstrap interval covers the true mean."""
  rng = np.random.default_rng(1)
  covered = 0
  for i in range(datasets):
    values = rng.normal(3.0, 2.0, num_seeds)
    _, low, high = cs.bootstrap_ci(values, resamples=resamples, seed=i)
    covered += low <= 3.0 <= high
  return covered / datasets


# The bound: over 1000 independent datasets the observed coverage is binomial, sd
# sqrt(0.95 * 0.05 / 1000) = 0.0069; we allow 3 sd = 0.021 around the expected coverage. The
# expected coverage is not quite 0.95: for normal data the percentile interval of the mean is about
# mean +- 1.96 * s * sqrt((n - 1) / n) / sqrt(n), which covers P(|t_{n-1}| < 1.96 sqrt((n-1)/n)):
# 0.940 at n = 40 and 0.904 at n = 10. An interval half as wide covers about 68%, one at level 0.9
# about 90% (n = 40): both fail.
_BINOMIAL_3SD = 3 * np.sqrt(0.95 * 0.05 / 1000)


@pytest.mark.parametrize("num_seeds,expected", [(40, 0.940), (10, 0.904)])
def test_bootstrap_ci_covers_the_mean_at_the_expected_rate(num_seeds, expected):
  coverage = _coverage(num_seeds, datasets=1000, resamples=1000)
  assert abs(coverage - expected) <= _BINOMIAL_3SD, coverage
  # Nominal within the binomial tolerance plus the small-sample deficit 0.95 - expected.
  assert abs(coverage - 0.95) <= _BINOMIAL_3SD + (0.95 - expected), coverage


def test_bootstrap_ci_point_is_the_statistic_on_all_seeds_and_inside():
  values = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
  est, low, high = cs.bootstrap_ci(values, statistic=np.median, resamples=2000)
  assert est == 0.4
  assert values.min() <= low <= est <= high <= values.max()


def test_bootstrap_ci_is_deterministic_per_seed_and_level_orders_width():
  values = np.random.default_rng(0).normal(size=12)
  assert cs.bootstrap_ci(values, seed=3) == cs.bootstrap_ci(values, seed=3)
  _, lo90, hi90 = cs.bootstrap_ci(values, level=0.9)
  _, lo99, hi99 = cs.bootstrap_ci(values, level=0.99)
  assert lo99 < lo90 < hi90 < hi99


def test_bootstrap_ci_of_identical_seeds_is_a_point():
  assert cs.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7, 0.7))


@pytest.mark.parametrize(
  "values,match",
  [
    ([0.5], "values needs at least 2 seeds"),
    (np.float64(0.5), "values needs at least 2 seeds"),
    ([0.5, np.nan, 0.4], "values must be finite"),
    ([[0.1, 0.2], [0.3, 0.4]], "must be a scalar"),
  ],
)
def test_bootstrap_ci_rejects(values, match):
  with pytest.raises(ValueError, match=match):
    cs.bootstrap_ci(values)


@pytest.mark.parametrize("kwargs", [{"level": 1.0}, {"level": 0.0}, {"resamples": 0}])
def test_bootstrap_ci_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError):
    cs.bootstrap_ci([0.1, 0.2, 0.3], **kwargs)


def _unpaired_width(a, b, resamples=10000, seed=0) -> float:
  """Width of the 95% interval of mean(a) - mean(b) resampling a and b independently."""
  rng = np.random.default_rng(seed)
  ia = rng.integers(0, len(a), (resamples, len(a)))
  ib = rng.integers(0, len(b), (resamples, len(b)))
  draws = a[ia].mean(axis=1) - b[ib].mean(axis=1)
  low, high = np.quantile(draws, [0.025, 0.975])
  return high - low


def test_paired_difference_is_much_narrower_when_seeds_are_correlated():
  # Seeds move both methods alike (sd 0.1), the methods differ by 0.05 plus noise of sd 0.01:
  # the paired interval is about sqrt(2) * 0.01 wide per seed, the unpaired one 10x wider.
  rng = np.random.default_rng(0)
  shared = rng.normal(0.5, 0.1, 10)
  a = shared + 0.05 + rng.normal(0, 0.01, 10)
  b = shared + rng.normal(0, 0.01, 10)
  mean, low, high = cs.paired_difference(a, b)
  assert mean == pytest.approx(np.mean(a - b))
  assert low <= 0.05 <= high
  assert low > 0.0  # the paired comparison tells them apart
  assert high - low < 0.25 * _unpaired_width(a, b)


def test_paired_difference_of_independent_seeds_is_not_narrower():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.5, 0.1, 30), rng.normal(0.5, 0.1, 30)
  _, low, high = cs.paired_difference(a, b)
  assert high - low == pytest.approx(_unpaired_width(a, b), rel=0.25)


def test_paired_difference_resamples_pairs_jointly():
  # a - b is the same on every seed, so any joint resampling gives exactly that difference,
  # while a and b themselves vary a lot.
  a = np.array([0.1, 0.9, 0.4, 0.6])
  assert cs.paired_difference(a, a - 0.2) == pytest.approx((0.2, 0.2, 0.2))


@pytest.mark.parametrize(
  "a,b,match",
  [
    ([0.1, 0.2], [0.1, 0.2, 0.3], "paired"),
    ([0.1], [0.2], "a needs at least 2 seeds"),
    ([0.1, 0.2], [np.nan, 0.2], "b must be finite"),
  ],
)
def test_paired_difference_rejects(a, b, match):
  with pytest.raises(ValueError, match=match):
    cs.paired_difference(a, b)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
  forwards=st.lists(st.integers(0, 100000), min_size=2, max_size=30, unique=True),
  start=st.floats(0, 1),
  end=st.floats(0, 1),
)
def test_area_under_a_linear_curve_is_its_midpoint(forwards, start, end):
  x = np.sort(np.asarray(forwards))
  curve = start + (end - start) * (x - x[0]) / (x[-1] - x[0])
  assert cs.area_under_curve(x, curve) == pytest.approx((start + end) / 2, rel=1e-12, abs=1e-12)


def test_area_under_curve_per_seed_and_by_hand():
  forwards = np.array([0, 100, 300])
  curves = np.array([[0.0, 1.0, 1.0], [0.2, 0.2, 0.2]])
  # Seed 0: 100 * 0.5 + 200 * 1 = 250 over 300; seed 1 is constant.
  np.testing.assert_allclose(cs.area_under_curve(forwards, curves), [250 / 300, 0.2])
  assert isinstance(cs.area_under_curve(forwards, curves[0]), float)


@pytest.mark.parametrize(
  "forwards,curve,match",
  [
    ([0], [0.1], ">= 2 points"),
    ([0, 10, 10], [0.1, 0.2, 0.3], "strictly increasing"),
    ([0, 10], [0.1, 0.2, 0.3], "2 points"),
    ([0, 10], np.zeros((2, 2, 2)), "2 points"),
  ],
)
def test_area_under_curve_rejects(forwards, curve, match):
  with pytest.raises(ValueError, match=match):
    cs.area_under_curve(forwards, curve)


def test_accuracy_at_takes_the_last_point_within_budget():
  forwards = [0, 250, 500, 1000]
  curves = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
  np.testing.assert_array_equal(cs.accuracy_at(forwards, curves, 500), [0.3, 0.7])
  np.testing.assert_array_equal(cs.accuracy_at(forwards, curves, 999), [0.3, 0.7])
  np.testing.assert_array_equal(cs.accuracy_at(forwards, curves, 5000), [0.4, 0.8])
  np.testing.assert_array_equal(cs.accuracy_at(forwards, curves, 0), [0.1, 0.5])
  with pytest.raises(ValueError, match="no evaluation point within budget"):
    cs.accuracy_at([10, 20], curves[:, :2], 5)


FORWARDS = np.array([0, 100, 200, 300, 400])


def test_forwards_to_target_on_identical_seeds_is_exact():
  curves = np.tile([0.1, 0.3, 0.5, 0.7, 0.9], (4, 1))
  out = cs.forwards_to_target(FORWARDS, curves, 0.5, resamples=500)
  assert out == {"point": 200, "low": 200, "high": 200, "reached_fraction": 1.0, "level": 0.95}
  # A target equal to a point of the curve counts as reached despite rounding.
  out = cs.forwards_to_target(FORWARDS, curves, 0.1 + 0.2 + 0.2, resamples=500)
  assert out["point"] == 200


def test_forwards_to_target_interval_spans_the_seeds_crossings():
  # Two fast seeds (cross 0.5 at 100) and two slow ones (at 300): the mean curve crosses at 200;
  # resamples of only fast seeds cross at 100, of only slow ones at 300.
  fast = [0.1, 0.6, 0.6, 0.6, 0.6]
  slow = [0.1, 0.2, 0.2, 0.6, 0.6]
  curves = np.array([fast, fast, slow, slow])
  out = cs.forwards_to_target(FORWARDS, curves, 0.5, resamples=4000)
  assert out["point"] == 300  # mean curve: 0.1, 0.4, 0.4, 0.6, 0.6
  assert out["low"] == 100 and out["high"] == 300
  assert out["reached_fraction"] == 1.0


def test_forwards_to_target_high_is_none_when_too_few_resamples_reach():
  # One seed of four reaches 0.8 at 400 and lifts the mean to 0.6 = target; the others stay at
  # 0.53. A resample reaches the target only if it holds that seed at least as often as in the
  # data: about 68% of draws (P[Binomial(4, 1/4) >= 1]), below (1 + 0.95) / 2.
  curves = np.array([[0.1, 0.2, 0.3, 0.5, 0.8]] + [[0.1, 0.2, 0.3, 0.5, 0.5333333333333333]] * 3)
  out = cs.forwards_to_target(FORWARDS, curves, curves.mean(axis=0)[-1], resamples=4000)
  assert out["point"] == 400
  assert out["high"] is None
  assert out["low"] == 400
  assert out["reached_fraction"] == pytest.approx(1 - 0.75**4, abs=0.03)


def test_forwards_to_target_never_reached():
  curves = np.tile([0.1, 0.2, 0.3, 0.4, 0.5], (3, 1))
  out = cs.forwards_to_target(FORWARDS, curves, 0.9, resamples=100)
  assert out == {"point": None, "low": None, "high": None, "reached_fraction": 0.0, "level": 0.95}


@pytest.mark.parametrize(
  "curves,match",
  [
    (np.zeros((1, 5)), "at least 2 seeds"),
    (np.zeros(5), "\\[seeds, points\\]"),
    (np.zeros((3, 4)), "5 points"),
    (np.full((3, 5), np.nan), "finite"),
  ],
)
def test_forwards_to_target_rejects(curves, match):
  with pytest.raises(ValueError, match=match):
    cs.forwards_to_target(FORWARDS, curves, 0.5)


def test_select_learning_rate_interior_and_edges():
  lrs = [1e-4, 2e-4, 4e-4]
  assert cs.select_learning_rate(lrs, [[0.5, 0.6], [0.7, 0.7], [0.6, 0.6]]) == (1, False)
  assert cs.select_learning_rate(lrs, [[0.9, 0.8], [0.7, 0.7], [0.6, 0.6]]) == (0, True)
  assert cs.select_learning_rate(lrs, [[0.1, 0.1], [0.2, 0.2], [0.2, 0.3]]) == (2, True)
  # The mean decides, not the best seed; ties go to the smaller learning rate.
  assert cs.select_learning_rate(lrs, [[1.0, 0.0], [0.6, 0.6], [0.6, 0.6]]) == (1, False)
  assert cs.select_learning_rate([1e-3], [[0.4, 0.5]]) == (0, True)


@pytest.mark.parametrize(
  "lrs,scores,match",
  [
    ([2e-4, 1e-4], [[0.1], [0.2]], "ascending"),
    ([1e-4, 1e-4], [[0.1], [0.2]], "ascending"),
    ([0.0, 1e-4], [[0.1], [0.2]], "positive"),
    ([1e-4, 2e-4], [[0.1, 0.2]], "2 rows"),
    ([1e-4, 2e-4], [0.1, 0.2], "2 rows"),
    ([1e-4, 2e-4], [[0.1], [np.nan]], "NaN"),
  ],
)
def test_select_learning_rate_rejects(lrs, scores, match):
  with pytest.raises(ValueError, match=match):
    cs.select_learning_rate(lrs, scores)


def test_extend_grid_adds_one_point_beyond_the_edge():
  lrs = [1e-4, 2e-4, 4e-4]
  assert cs.extend_grid(lrs, 0, 2.0) == pytest.approx([5e-5, 1e-4, 2e-4, 4e-4])
  assert cs.extend_grid(lrs, 2, 2.0) == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4])
  for bad in ({"at_edge_index": 1, "factor": 2.0}, {"at_edge_index": 0, "factor": 1.0}):
    with pytest.raises(ValueError):
      cs.extend_grid(lrs, **bad)
  with pytest.raises(ValueError, match="one-point grid"):
    cs.extend_grid([1e-4], 0, 2.0)


def test_select_then_extend_walks_to_an_interior_optimum():
  # Scores peak at lr = 1.6e-3, beyond the initial grid's upper edge.
  score = lambda lr: -((np.log2(lr) - np.log2(1.6e-3)) ** 2)
  lrs = [1e-4, 2e-4, 4e-4]
  for _ in range(5):
    best, edge = cs.select_learning_rate(lrs, [[score(lr)] * 2 for lr in lrs])
    if not edge:
      break
    lrs = cs.extend_grid(lrs, best, 2.0)
  assert not edge and lrs[best] == pytest.approx(1.6e-3)
