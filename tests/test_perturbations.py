"""Tests for zojax.perturbations: distributions, regeneration, masks, dtypes."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree

import zojax
from zojax import fastrandom, perturbations

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3), "s": jnp.zeros(())}  # d = 10


def _samples(distribution, num=20000, params=PARAMS):
  keys = jax.random.split(jax.random.key(0), num)
  draw = jax.jit(
    jax.vmap(lambda k: ravel_pytree(perturbations.sample_direction(k, params, distribution))[0])
  )
  return np.asarray(draw(keys), np.float64)


@pytest.mark.parametrize("distribution", zojax.DISTRIBUTIONS)
def test_second_moment_is_identity(distribution):
  # E[z z^T] = I. Each entry of the empirical second moment has standard
  # error <= sqrt(E z^4 / K) <= sqrt(3 / 20000) = 0.012, so a tolerance of
  # 0.06 (5 sigma) passes for the right scale and fails for a direction
  # scaled by 0.9 or 1.1 (second moment off by about 0.2).
  z = _samples(distribution)
  second = z.T @ z / z.shape[0]
  np.testing.assert_allclose(second, np.eye(10), atol=0.06)
  np.testing.assert_allclose(z.mean(axis=0), np.zeros(10), atol=0.05)


def test_distribution_specific_values():
  r = _samples("rademacher", num=100)
  np.testing.assert_array_equal(np.abs(r), np.ones_like(r))
  s = _samples("sphere", num=100)
  np.testing.assert_allclose(np.sum(s**2, axis=1), 10.0, rtol=1e-5)
  g = _samples("gaussian", num=20000)
  # Gaussian fourth moment is 3 (Rademacher 1, sphere 3d/(d+2) = 2.5).
  np.testing.assert_allclose(np.mean(g**4), 3.0, atol=0.15)


def test_perturb_is_params_plus_scaled_direction():
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(3)}
  key = jax.random.key(3)
  for dist in zojax.DISTRIBUTIONS:
    z = perturbations.sample_direction(key, params, dist)
    out = perturbations.perturb(params, key, -0.5, dist)
    chex.assert_trees_all_close(out, jax.tree.map(lambda p, d: p - 0.5 * d, params, z), rtol=1e-6)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("distribution", zojax.DISTRIBUTIONS)
def test_combine_directions_is_the_weighted_sum(vectorize, distribution):
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(3))
  weights = jnp.array([0.5, -2.0, 1.5])
  out = jax.jit(
    lambda k, w: perturbations.combine_directions(params, k, w, distribution, vectorize=vectorize)
  )(keys, weights)
  expected = sum(
    w * ravel_pytree(perturbations.sample_direction(k, params, distribution))[0]
    for k, w in zip(keys, weights)
  )
  np.testing.assert_allclose(ravel_pytree(out)[0], expected, rtol=1e-5, atol=1e-6)


def test_leaves_drawn_from_split_keys():
  # Leaf l of a direction is fastrandom's draw from split(key, L)[l], so
  # leaves of equal shape get different values.
  params = [jnp.zeros((2, 3)), jnp.zeros(4), jnp.zeros((2, 3))]
  key = jax.random.key(4)
  z = perturbations.sample_direction(key, params)
  leaf_keys = jax.random.split(key, 3)
  for leaf, k, p in zip(z, leaf_keys, params):
    np.testing.assert_array_equal(leaf, fastrandom.normal(k, p.shape))
  assert not np.array_equal(z[0], z[2])
  r = perturbations.sample_direction(key, params, "rademacher")
  np.testing.assert_array_equal(r[1], fastrandom.rademacher(leaf_keys[1], (4,)))
  # float64 leaves (x64 mode only) would use jax.random; float32 and narrower use fastrandom.
  half = perturbations.sample_direction(key, [jnp.zeros(4, jnp.bfloat16)])
  expected = fastrandom.normal(jax.random.split(key, 1)[0], (4,)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(half[0], expected)


def test_sphere_masked_counts_only_perturbed_entries():
  z = perturbations.sample_direction(
    jax.random.key(0), PARAMS, "sphere", mask={"w": True, "b": False, "s": True}
  )
  np.testing.assert_array_equal(z["b"], np.zeros(3))
  np.testing.assert_allclose(jnp.sum(z["w"] ** 2) + z["s"] ** 2, 7.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_preserved(dtype):
  params = {"w": jnp.zeros((2, 2), dtype)}
  for dist in zojax.DISTRIBUTIONS:
    assert perturbations.sample_direction(jax.random.key(0), params, dist)["w"].dtype == dtype
    assert perturbations.perturb(params, jax.random.key(0), 1e-3, dist)["w"].dtype == dtype


def test_mask_must_be_static():
  with pytest.raises(ValueError, match="static"):
    jax.jit(lambda m: perturbations.resolve_mask({"a": m}, {"a": jnp.ones(2)}))(True)


def test_unknown_distribution():
  with pytest.raises(ValueError, match="rademacher"):
    perturbations.sample_direction(jax.random.key(0), PARAMS, "laplace")


shapes = st.lists(
  st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=8, deadline=None)
@given(shapes=shapes, distribution=st.sampled_from(zojax.DISTRIBUTIONS))
def test_structure_shapes_and_sphere_radius(shapes, distribution):
  params = [jnp.zeros(s) for s in shapes]
  z = perturbations.sample_direction(jax.random.key(1), params, distribution)
  chex.assert_trees_all_equal_shapes_and_dtypes(z, params)
  if distribution == "sphere":
    dim = sum(int(np.prod(s)) for s in shapes)
    np.testing.assert_allclose(sum(float(jnp.sum(leaf**2)) for leaf in z), dim, rtol=1e-4)
