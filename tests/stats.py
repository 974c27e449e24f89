"""Statistical assertions shared by the estimator tests.

The bound: for K iid samples with covariance S, the error of the sample mean
``e = mean - target`` satisfies ``E||e||^2 = tr(S) / K``. We assert
``||e|| <= 3 sqrt(tr(S_hat) / K)`` (``S_hat`` the sample covariance):
``K ||e||^2 / tr(S)`` is a weighted chi-square of mean 1, which exceeds 9
with probability below 0.3% even with one degree of freedom. Keys are fixed,
so each test is deterministic; the bound only says the fixed draw is typical.

Every check also asserts that the bound is *tight*: ``3 sqrt(tr/K) <=
tight * ||target||`` (0.5 by default), so an estimator that is off by a
constant factor of 2 (mean ``2 target`` or ``target / 2``, error at least
``||target|| / 2``) fails; with ``tight=0.25`` a 25% error fails as well.
"""

from __future__ import annotations

import numpy as np


def assert_mean_matches(samples, target, *, tight: float = 0.5, what: str = "estimate") -> None:
  """Asserts the mean of ``samples`` (K, d) matches ``target`` (d,)."""
  samples = np.asarray(samples, np.float64)
  target = np.asarray(target, np.float64).reshape(-1)
  samples = samples.reshape(samples.shape[0], -1)
  k = samples.shape[0]
  err = np.linalg.norm(samples.mean(axis=0) - target)
  trace = samples.var(axis=0, ddof=1).sum()
  bound = 3.0 * np.sqrt(trace / k)
  scale = np.linalg.norm(target)
  assert bound <= tight * scale, (
    f"test too weak for {what}: bound {bound:.3g} > {tight} * ||target|| = {tight * scale:.3g};"
    " use more samples"
  )
  assert err <= bound, (
    f"{what}: ||mean - target|| = {err:.4g} exceeds the 3-sigma bound {bound:.4g}"
  )
