"""Tests for zojax.testing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import testing

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}


def _loss(p):
  return jnp.sum((jnp.ones(4) @ p["w"] + p["b"] - 1.0) ** 2)


def _stepped(tx, steps=2):
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    updates, state = tx.update(None, state, params, value_fn=_loss)
    params = optax.apply_updates(params, updates)
  return state


PRESETS = {
  "mezo": lambda seed: zojax.mezo(1e-2, key=seed),
  "zo_muon": lambda seed: zojax.zo_muon(1e-2, rank=2, key=seed),
  "mezo_bcd": lambda seed: zojax.mezo_bcd(1e-2, switch_every=1, key=seed),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_chex_cannot_compare_a_state_but_the_helpers_can(name):
  state = _stepped(PRESETS[name](0))
  with pytest.raises(TypeError, match="PRNGKey"):
    chex.assert_trees_all_close(state, state)
  testing.assert_states_close(state, state, rtol=1e-6)
  testing.assert_states_equal(state, state)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_same_run_twice_gives_equal_states(name):
  testing.assert_states_equal(_stepped(PRESETS[name](3)), _stepped(PRESETS[name](3)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_another_seed_is_caught(name):
  a, b = PRESETS[name](0).init(PARAMS), PRESETS[name](1).init(PARAMS)
  with pytest.raises(AssertionError):
    testing.assert_states_close(a, b, atol=1e3)
  with pytest.raises(AssertionError):
    testing.assert_states_equal(a, b)


def test_another_step_count_is_caught():
  tx = zojax.mezo(1e-2, key=0)
  with pytest.raises(AssertionError):
    testing.assert_states_equal(_stepped(tx, 1), _stepped(tx, 2))


def test_keys_and_counters_are_exact_under_any_tolerance():
  # key(0) and key(1) have data [0, 0] and [0, 1]: within atol=1 of each other.
  with pytest.raises(AssertionError):
    testing.assert_states_close({"key": jax.random.key(0)}, {"key": jax.random.key(1)}, atol=1)
  with pytest.raises(AssertionError):
    testing.assert_states_close({"count": jnp.int32(3)}, {"count": jnp.int32(4)}, atol=1)
  testing.assert_states_close({"x": jnp.float32(3)}, {"x": jnp.float32(4)}, atol=1)


def test_tolerances_apply_to_float_leaves_only():
  state = zojax.zo_grad(key=0).init(PARAMS)
  nudged = state._replace(loss=jnp.float32(1.0))
  state = state._replace(loss=jnp.float32(1.0 + 1e-5))
  testing.assert_states_close(state, nudged, rtol=1e-4)
  with pytest.raises(AssertionError):
    testing.assert_states_close(state, nudged, rtol=1e-7, atol=0.0)
  with pytest.raises(AssertionError):
    testing.assert_states_equal(state, nudged)


def test_another_key_implementation_is_caught():
  threefry = jax.random.key(0, impl="threefry2x32")
  rbg = jax.random.key(0, impl="rbg")
  with pytest.raises(AssertionError, match="different jax.random keys"):
    testing.assert_states_close({"key": threefry}, {"key": rbg})


def test_keys_to_data_unwraps_only_keys():
  key = jax.random.key(7)
  keys = jax.random.split(key, 3)
  tree = {"key": key, "keys": keys, "x": jnp.arange(3.0), "raw": jax.random.PRNGKey(1)}
  out = testing.keys_to_data(tree)
  np.testing.assert_array_equal(out["key"], jax.random.key_data(key))
  assert out["keys"].shape == (3, 2) and out["keys"].dtype == jnp.uint32
  assert out["x"] is tree["x"] and out["raw"] is tree["raw"]
  assert testing.is_key(key) and not testing.is_key(tree["raw"]) and not testing.is_key(1)


def test_works_on_optax_add_noise_state():
  tx = optax.add_noise(0.1, 0.55, key=0)
  state = tx.init(PARAMS)
  _, later = tx.update(PARAMS, state)
  testing.assert_states_equal(state, tx.init(PARAMS))
  with pytest.raises(AssertionError):
    testing.assert_states_equal(state, later)


def test_works_under_jit():
  tx = zojax.mezo(1e-2, key=0)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, value_fn=_loss)
    return optax.apply_updates(params, updates), state

  _, jitted = step(PARAMS, tx.init(PARAMS))
  testing.assert_states_close(jitted, _stepped(tx, 1), rtol=1e-5, atol=1e-6)
