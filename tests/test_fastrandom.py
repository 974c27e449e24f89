"""Statistical tests of zojax.fastrandom, the generator of perturbation directions.

Sample sizes are chosen so each bound is several standard errors wide yet
would catch a broken generator (wrong variance, biased bits, streams that
repeat or correlate across keys, elements or leaves). Keys are fixed, so the
tests are deterministic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from zojax import fastrandom

N = 1 << 20  # samples per stream


@pytest.fixture(scope="module")
def normals():
  return np.asarray(jax.jit(lambda k: fastrandom.normal(k, (N,)))(jax.random.key(0)), np.float64)


def test_normal_moments_and_distribution(normals):
  se = 1 / np.sqrt(N)
  assert abs(normals.mean()) < 5 * se
  assert abs(normals.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(stats.skew(normals)) < 5 * np.sqrt(6) * se
  assert abs(stats.kurtosis(normals)) < 5 * np.sqrt(24) * se
  # Kolmogorov-Smirnov against N(0, 1): the statistic of a correct sampler
  # is about 0.87 / sqrt(N) at its median; a 1% error in scale gives ~0.004.
  assert stats.kstest(normals, "norm").statistic < 2.0 / np.sqrt(N)
  assert np.abs(normals).max() < 5.6  # tails end near 5.3 sigma


def test_uniform_is_open_interval_and_flat():
  u = np.asarray(fastrandom.uniform(jax.random.key(1), (N,)), np.float64)
  assert u.min() > 0 and u.max() < 1
  counts = np.bincount((u * 256).astype(int), minlength=256)
  chi2 = ((counts - N / 256) ** 2 / (N / 256)).sum()
  # chi-square with 255 degrees of freedom: mean 255, sd ~22.6.
  assert chi2 < 255 + 6 * 22.6


def test_every_bit_is_fair():
  bits = np.asarray(fastrandom.hash_bits(jax.random.key(2), (N,)), np.uint32)
  for position in range(32):
    frequency = ((bits >> position) & 1).mean()
    assert abs(frequency - 0.5) < 5 * 0.5 / np.sqrt(N), position


def test_no_correlation_between_neighbours_keys_or_leaves(normals):
  tol = 5 / np.sqrt(N)
  for lag in (1, 2, 7, 64, 4096):
    assert abs(np.corrcoef(normals[:-lag], normals[lag:])[0, 1]) < tol, lag
  key = jax.random.key(0)
  # Streams of related keys: consecutive query keys, split leaf keys.
  related = [jax.random.fold_in(key, 1), jax.random.fold_in(key, 2), *jax.random.split(key, 2)]
  for other_key in related:
    other = np.asarray(fastrandom.normal(other_key, (N,)), np.float64)
    assert abs(np.corrcoef(normals, other)[0, 1]) < tol
    # Nor a shifted copy: the hash's Weyl counter could, without its second
    # keyed round, repeat another key's stream at an offset.
    bits = np.asarray(fastrandom.hash_bits(other_key, (N,)))
    base = np.asarray(fastrandom.hash_bits(key, (N,)))
    # Independent streams share about N^2 / 2^32 = 256 words (sd 16); a
    # shifted copy would share up to N.
    assert len(np.intersect1d(bits, base)) < 400


def test_covariance_is_identity_over_keys():
  keys = jax.random.split(jax.random.key(3), 20000)
  z = np.asarray(jax.vmap(lambda k: fastrandom.normal(k, (6,)))(keys), np.float64)
  cov = z.T @ z / len(z)
  np.testing.assert_allclose(cov, np.eye(6), atol=5 / np.sqrt(len(z)))
  r = np.asarray(jax.vmap(lambda k: fastrandom.rademacher(k, (6,)))(keys), np.float64)
  assert set(np.unique(r)) == {-1.0, 1.0}
  np.testing.assert_allclose(r.T @ r / len(r), np.eye(6), atol=5 / np.sqrt(len(r)))


def test_deterministic_shape_consistent_and_jittable():
  key = jax.random.key(7)
  a = fastrandom.normal(key, (3, 5))
  b = jax.jit(lambda k: fastrandom.normal(k, (3, 5)))(key)
  np.testing.assert_array_equal(a, b)
  # Element i of any shape is the hash of its flat index.
  np.testing.assert_array_equal(a.reshape(-1), fastrandom.normal(key, (15,)))
  assert not np.array_equal(a, fastrandom.normal(jax.random.key(8), (3, 5)))
  assert fastrandom.normal(key, (2,), jnp.float64 if jax.config.x64_enabled else jnp.float32).shape
  with pytest.raises(ValueError, match="2\\*\\*32"):
    jax.eval_shape(lambda k: fastrandom.hash_bits(k, (1 << 16, (1 << 16) + 1)), key)
