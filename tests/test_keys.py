"""Tests for zojax.keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax import keys


def _data(key):
  return np.asarray(jax.random.key_data(key))


def test_as_key_accepts_ints_and_keys():
  ref = _data(jax.random.key(5))
  np.testing.assert_array_equal(_data(keys.as_key(5)), ref)
  np.testing.assert_array_equal(_data(keys.as_key(np.int64(5))), ref)
  np.testing.assert_array_equal(_data(keys.as_key(jnp.int32(5))), ref)
  np.testing.assert_array_equal(_data(keys.as_key(jax.random.key(5))), ref)
  np.testing.assert_array_equal(_data(keys.as_key(jax.random.PRNGKey(5))), ref)


@pytest.mark.parametrize(
  "bad", [1.5, "0", True, None, jnp.ones(3), jax.random.split(jax.random.key(0))]
)
def test_as_key_rejects_other_things(bad):
  with pytest.raises(TypeError, match="key must be"):
    keys.as_key(bad)


def test_derivation_is_fold_in_then_split():
  key = jax.random.key(0)
  k_t = keys.step_key(key, jnp.int32(3))
  k_ti = keys.query_key(k_t, 2)
  np.testing.assert_array_equal(
    _data(k_ti), _data(jax.random.fold_in(jax.random.fold_in(key, 3), 2))
  )
  tree = {"a": jnp.ones(2), "b": (jnp.ones(3), jnp.ones(1))}
  leaf = keys.leaf_keys(k_ti, tree)
  assert leaf.shape == (3,)
  np.testing.assert_array_equal(_data(leaf), _data(jax.random.split(k_ti, 3)))


def test_distinct_steps_and_queries_give_distinct_keys():
  key = jax.random.key(1)
  seen = {
    tuple(_data(keys.query_key(keys.step_key(key, t), i)).tolist())
    for t in range(20)
    for i in range(8)
  }
  assert len(seen) == 160


def test_stream_keys_are_distinct_and_stable():
  key = jax.random.key(0)
  a, b = keys.stream_key(key, "subspace"), keys.stream_key(key, "block_coordinate")
  assert not np.array_equal(_data(a), _data(b))
  assert not np.array_equal(_data(a), _data(key))
  np.testing.assert_array_equal(_data(a), _data(keys.stream_key(key, "subspace")))
