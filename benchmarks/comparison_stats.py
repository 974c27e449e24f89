"""Statistics for comparing optimizers over paired seeds: bootstrap intervals, curve summaries.

Pure NumPy (no JAX), so a saved benchmark result can be re-analysed anywhere.
Every function takes per-seed numbers, seeds along the first axis, and every
bootstrap is a percentile bootstrap over seeds: ``resamples`` draws of seed
indices with replacement (NumPy's ``default_rng(seed)``, so results are
reproducible), the statistic recomputed on each draw, and the interval the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those draws.

What the percentile bootstrap can and cannot say: it treats the seeds as a
sample from the distribution of runs, so its intervals cover the spread of
seeds, not that of other settings (model, task, budget). With few seeds it is
too narrow: for the mean of normal data it is about ``mean +- z * s *
sqrt((n - 1) / n) / sqrt(n)`` instead of Student's ``t``, so a nominal 95%
interval covers about 90% of the time at 10 seeds and 94% at 40.

Example:
  >>> import numpy as np
  >>> est, low, high = bootstrap_ci(np.array([0.50, 0.52, 0.55, 0.49, 0.51]))
  >>> low <= est <= high
  True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# A curve "reaches" a target when it is at least ``target - REACH_TOLERANCE``: a target taken from
# a curve (a method's own final mean) must count as reached by that curve despite rounding.
# Accuracies are multiples of 1 / (test examples), far coarser than this; float32 curves
# averaged in float32 and in float64 differ by up to about 1e-7.
REACH_TOLERANCE = 1e-6


def _check_level(level: float, resamples: int) -> None:
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")


def _per_seed(values, name: str) -> np.ndarray:
  """``values`` as a float64 array with >= 2 seeds on axis 0 and no NaN or inf."""
  values = np.asarray(values, np.float64)
  if values.ndim < 1 or values.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 seeds on its first axis, got shape {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name} must be finite (no NaN or inf); drop or mark failed seeds first")
  return values


def _resample_indices(num_seeds: int, resamples: int, seed: int) -> np.ndarray:
  """``(resamples, num_seeds)`` seed indices drawn with replacement."""
  return np.random.default_rng(seed).integers(0, num_seeds, size=(resamples, num_seeds))


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
  """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``draws``."""
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(draws, [tail, 1.0 - tail])
  return float(low), float(high)


def bootstrap_ci(
  values,
  statistic: Callable[..., np.ndarray] = np.mean,
  level: float = 0.95,
  resamples: int = 10000,
  seed: int = 0,
) -> tuple[float, float, float]:
  """A statistic over seeds with its percentile bootstrap interval.

  Args:
    values: per-seed numbers, seeds on the first axis (usually ``[seeds]``).
    statistic: a NumPy-style reduction with an ``axis`` keyword (`np.mean`,
      `np.median`, ...); ``statistic(values, axis=0)`` must be a scalar. It is
      called once on ``values`` and once, with ``axis=1``, on the stack of
      resamples.
    level: the interval's nominal coverage.
    resamples: bootstrap draws of the seeds.
    seed: seeds the draws.

  Returns:
    ``(estimate, low, high)``: the statistic on all seeds and the interval.

  Raises:
    ValueError: if ``values`` has fewer than 2 seeds or a NaN or inf, if the
      statistic is not a scalar, or for a bad ``level`` or ``resamples``.
  """
  _check_level(level, resamples)
  values = _per_seed(values, "values")
  estimate = np.asarray(statistic(values, axis=0))
  if estimate.ndim:
    raise ValueError(
      f"statistic(values, axis=0) must be a scalar, got shape {estimate.shape}; reduce "
      "values to one number per seed first"
    )
  draws = statistic(values[_resample_indices(len(values), resamples, seed)], axis=1)
  return (float(estimate), *_percentiles(np.asarray(draws), level))


def paired_difference(
  a, b, level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
  """The mean of ``a - b`` over paired seeds with its percentile bootstrap interval.

  Seed ``i`` of ``a`` and of ``b`` must share everything but the method (data
  order, initial model), so each bootstrap draw keeps the pairs together: it
  draws seed indices and takes ``a - b`` at those indices. When seeds move both
  methods alike, this interval is much narrower than one from resampling ``a``
  and ``b`` independently.

  Args:
    a: per-seed numbers of the first method, ``[seeds]``.
    b: the same seeds' numbers of the second method, ``[seeds]``.
    level: the interval's nominal coverage.
    resamples: bootstrap draws of the seeds.
    seed: seeds the draws.

  Returns:
    ``(mean difference, low, high)``.

  Raises:
    ValueError: if ``a`` and ``b`` differ in shape, have fewer than 2 seeds or
      a NaN or inf.
  """
  a = _per_seed(a, "a")
  b = _per_seed(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must be paired seed by seed; shapes {a.shape} and {b.shape} differ")
  return bootstrap_ci(a - b, np.mean, level, resamples, seed)


def _forwards(forwards) -> np.ndarray:
  """``forwards`` as a 1-D, strictly increasing array of at least 2 points."""
  forwards = np.asarray(forwards)
  if forwards.ndim != 1 or len(forwards) < 2:
    raise ValueError(f"forwards must be 1-D with >= 2 points, got shape {forwards.shape}")
  if np.any(np.diff(forwards) <= 0):
    raise ValueError("forwards must be strictly increasing")
  return forwards


def _curves(forwards: np.ndarray, curves, name: str) -> np.ndarray:
  curves = np.asarray(curves, np.float64)
  if curves.ndim not in (1, 2) or curves.shape[-1] != len(forwards):
    raise ValueError(
      f"{name} must be [points] or [seeds, points] with {len(forwards)} points, got shape "
      f"{curves.shape}"
    )
  return curves


def area_under_curve(forwards, curve) -> float | np.ndarray:
  """The mean accuracy over the budget: trapezoid area under the curve over the forward span.

  A curve that is linear between its first and last points gives exactly the
  mean of the two (its midpoint); a constant curve gives that constant.

  Args:
    forwards: the evaluation points, ``[points]``, strictly increasing.
    curve: accuracy at those points, ``[points]`` or ``[seeds, points]``.

  Returns:
    A float for one curve, or ``[seeds]`` areas.

  Raises:
    ValueError: for mismatched or malformed shapes or non-increasing forwards.
  """
  forwards = _forwards(forwards)
  curve = _curves(forwards, curve, "curve")
  x = forwards.astype(np.float64)
  area = np.sum((curve[..., 1:] + curve[..., :-1]) / 2.0 * np.diff(x), axis=-1)
  area = area / (x[-1] - x[0])
  return float(area) if area.ndim == 0 else area


def accuracy_at(forwards, curves, budget: float) -> np.ndarray:
  """Each seed's accuracy at the last evaluation point within ``budget`` forwards.

  Args:
    forwards: the evaluation points, ``[points]``, strictly increasing.
    curves: accuracy at those points, ``[seeds, points]`` (or ``[points]``).
    budget: forward passes allowed.

  Returns:
    ``[seeds]`` accuracies (a 0-d array for one curve).

  Raises:
    ValueError: if no evaluation point is within ``budget``, or for bad shapes.
  """
  forwards = _forwards(forwards)
  curves = _curves(forwards, curves, "curves")
  within = np.flatnonzero(forwards <= budget)
  if not within.size:
    raise ValueError(f"no evaluation point within budget {budget} (first is {forwards[0]})")
  return curves[..., within[-1]]


def _first_reach(forwards: np.ndarray, curves: np.ndarray, target: float) -> np.ndarray:
  """Forwards at which each curve (last axis) first reaches ``target``; inf if never."""
  hits = curves >= target - REACH_TOLERANCE
  first = forwards.astype(np.float64)[np.argmax(hits, axis=-1)]
  return np.where(hits.any(axis=-1), first, np.inf)


def _as_number(x: float) -> int | float | None:
  if not np.isfinite(x):
    return None
  return int(x) if float(x).is_integer() else float(x)


def forwards_to_target(
  forwards, curves, target: float, level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> dict:
  """Forward passes the seed-mean curve needs to first reach ``target``, with an interval.

  The point estimate is the first evaluation point at which the mean over seeds
  of ``curves`` is at least ``target`` (minus `REACH_TOLERANCE`), None if it
  never is. The interval is a percentile bootstrap over seeds: each draw
  resamples the seeds with replacement, averages their curves and takes that
  mean curve's first crossing, counting a draw whose mean curve never reaches
  ``target`` as crossing at +inf (beyond the budget). ``low`` and ``high`` are
  the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the draws, each
  the smallest draw with at least that share of draws at or below it (so
  always an evaluation point). ``high`` is None ("not bounded by the budget")
  exactly when fewer than a ``(1 + level) / 2`` share of the draws reach the
  target (``reached_fraction < (1 + level) / 2``), ``low`` None when fewer than
  ``(1 - level) / 2`` do.

  Args:
    forwards: the evaluation points, ``[points]``, strictly increasing.
    curves: accuracy at those points, ``[seeds, points]``.
    target: the accuracy to reach.
    level: the interval's nominal coverage.
    resamples: bootstrap draws of the seeds.
    seed: seeds the draws.

  Returns:
    ``{"point", "low", "high"}`` (forward counts or None), ``"reached_fraction"``
    (the share of draws whose mean curve reaches the target), and ``"level"``.

  Raises:
    ValueError: for fewer than 2 seeds, NaN or inf, or bad shapes.
  """
  _check_level(level, resamples)
  forwards = _forwards(forwards)
  curves = _per_seed(curves, "curves")
  curves = _curves(forwards, curves, "curves")
  if curves.ndim != 2:
    raise ValueError(f"curves must be [seeds, points], got shape {curves.shape}")
  point = _first_reach(forwards, curves.mean(axis=0), target)
  means = curves[_resample_indices(len(curves), resamples, seed)].mean(axis=1)
  draws = _first_reach(forwards, means, target)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(draws, [tail, 1.0 - tail], method="inverted_cdf")
  return {
    "point": _as_number(point),
    "low": _as_number(low),
    "high": _as_number(high),
    "reached_fraction": float(np.mean(np.isfinite(draws))),
    "level": level,
  }


def _grid(learning_rates) -> np.ndarray:
  lrs = np.asarray(learning_rates, np.float64)
  if lrs.ndim != 1 or not len(lrs):
    raise ValueError(f"learning_rates must be a non-empty list, got shape {lrs.shape}")
  if np.any(lrs <= 0) or np.any(np.diff(lrs) <= 0):
    raise ValueError(f"learning_rates must be positive and strictly ascending, got {lrs.tolist()}")
  return lrs


def select_learning_rate(learning_rates: Sequence[float], validation_scores) -> tuple[int, bool]:
  """The learning rate with the best mean validation score, and whether it is on the grid's edge.

  Args:
    learning_rates: the grid, positive and strictly ascending.
    validation_scores: ``[lrs, seeds]`` scores, higher is better (e.g. final
      validation accuracy); no NaN.

  Returns:
    ``(index, at_edge)``: the index of the highest mean score (the smallest
    learning rate among ties) and whether it is the grid's first or last point
    (a better learning rate may lie beyond it).

  Raises:
    ValueError: for a malformed grid, mismatched shapes or NaN scores.
  """
  lrs = _grid(learning_rates)
  scores = np.asarray(validation_scores, np.float64)
  if scores.ndim != 2 or scores.shape[0] != len(lrs) or scores.shape[1] < 1:
    raise ValueError(
      f"validation_scores must be [lrs, seeds] with {len(lrs)} rows, got shape {scores.shape}"
    )
  if np.any(np.isnan(scores)):
    raise ValueError("validation_scores must not contain NaN")
  best = int(np.argmax(scores.mean(axis=1)))
  return best, best in (0, len(lrs) - 1)


def extend_grid(learning_rates: Sequence[float], at_edge_index: int, factor: float) -> list[float]:
  """The grid with one more point beyond the edge its best learning rate sits on.

  Args:
    learning_rates: the grid, positive and strictly ascending, >= 2 points.
    at_edge_index: 0 (adds ``learning_rates[0] / factor`` in front) or
      ``len(learning_rates) - 1`` (adds ``learning_rates[-1] * factor`` last).
    factor: the multiplicative step, > 1.

  Returns:
    The extended grid, ascending.

  Raises:
    ValueError: if ``at_edge_index`` is not an edge, the grid has one point (its
      only point is both edges), or ``factor <= 1``.
  """
  lrs = [float(x) for x in _grid(learning_rates)]
  if len(lrs) < 2:
    raise ValueError("a one-point grid has two edges; give at least 2 learning rates")
  if not factor > 1.0:
    raise ValueError(f"factor must be > 1, got {factor}")
  if at_edge_index == 0:
    return [lrs[0] / factor, *lrs]
  if at_edge_index == len(lrs) - 1:
    return [*lrs, lrs[-1] * factor]
  raise ValueError(f"index {at_edge_index} is not an edge of a {len(lrs)}-point grid")
