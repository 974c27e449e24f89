"""Tests for zojax.ordering: values unchanged, the data dependency present."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from zojax import ordering


def test_after_keeps_values_of_every_kind():
  previous = {"w": jnp.asarray([np.nan, 1.0], jnp.float32)}  # a NaN still gives zero
  x = jnp.asarray([1.5, -2.0, 0.0], jnp.float32)
  chex.assert_trees_all_equal(jax.jit(ordering.after)(x, previous), x)
  ints = jnp.arange(4, dtype=jnp.uint32)
  chex.assert_trees_all_equal(jax.jit(ordering.after)(ints, previous), ints)
  key = jax.random.key(3)
  out = jax.jit(ordering.after)(key, previous)
  chex.assert_trees_all_equal(jax.random.key_data(out), jax.random.key_data(key))
  np.testing.assert_array_equal(jax.random.normal(out, (3,)), jax.random.normal(key, (3,)))


def test_after_depends_on_the_previous_values():
  # The result reads an element of ``previous``: it is an input of the
  # computation, so XLA cannot schedule ``x``'s consumers before it exists.
  jaxpr = jax.make_jaxpr(ordering.after)(jnp.ones(3), jnp.ones(2))
  used = {v for eqn in jaxpr.jaxpr.eqns for v in eqn.invars if hasattr(v, "aval")}
  assert jaxpr.jaxpr.invars[1] in used


def test_zero_after_without_floats_is_none():
  assert ordering.zero_after([jnp.arange(3), None]) is None
  assert ordering.after(jnp.ones(2), [jnp.arange(3)]) is not None
  assert int(ordering.zero_after([jnp.zeros(0), jnp.ones(2)])) == 0
