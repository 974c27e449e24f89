"""Tests for zojax.train_state: linen TrainState steps driven by the loss."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state

import zojax
from zojax.train_state import ZOTrainState, apply_loss

X = jax.random.normal(jax.random.key(1), (32, 3))
Y = X @ jnp.array([[1.0], [-2.0], [0.5]])


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))


MODEL = _Model()
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def _loss(apply_fn, x, y):
  return lambda p: jnp.mean((apply_fn({"params": p}, x) - y) ** 2)


def test_step_equals_a_direct_tx_update():
  tx = zojax.mezo(1e-2, key=0)
  state = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
  new = jax.jit(lambda s: s.apply_loss(value_fn=_loss(s.apply_fn, X, Y)))(state)
  updates, opt_state = tx.update(None, tx.init(PARAMS), PARAMS, value_fn=_loss(MODEL.apply, X, Y))
  chex.assert_trees_all_close(new.params, optax.apply_updates(PARAMS, updates), rtol=1e-6)
  zojax.testing.assert_states_close(new.opt_state, opt_state, rtol=1e-6)
  assert int(new.step) == 1
  assert isinstance(new, ZOTrainState)
  assert float(optax.tree_utils.tree_get(new.opt_state, "loss")) > 0


def test_extra_arguments_reach_tx_update():
  # A loss bound in zo_grad takes the batch as update(..., batch=...).
  bound = lambda p, batch: _loss(MODEL.apply, *batch)(p)
  tx = optax.chain(zojax.zo_grad(bound, key=0), optax.sgd(1e-2))
  state = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
  by_batch = state.apply_loss(batch=(X, Y))
  by_value_fn = ZOTrainState.create(
    apply_fn=MODEL.apply, params=PARAMS, tx=optax.chain(zojax.zo_grad(key=0), optax.sgd(1e-2))
  ).apply_loss(value_fn=_loss(MODEL.apply, X, Y))
  chex.assert_trees_all_close(by_batch.params, by_value_fn.params, rtol=1e-6)
  assert not jnp.allclose(by_batch.params["Dense_0"]["kernel"], PARAMS["Dense_0"]["kernel"])


def test_the_loss_goes_down():
  state = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=zojax.mezo(5e-2, key=0))
  loss = _loss(MODEL.apply, X, Y)

  @jax.jit
  def train(state):
    return jax.lax.fori_loop(0, 300, lambda _, s: s.apply_loss(value_fn=loss), state)

  trained = train(state)
  assert int(trained.step) == 300
  assert float(loss(trained.params)) < 0.5 * float(loss(PARAMS))


def test_function_form_works_on_a_plain_train_state():
  tx = zojax.mezo(1e-2, key=0)
  plain = train_state.TrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
  ours = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
  loss = _loss(MODEL.apply, X, Y)
  a, b = apply_loss(plain, value_fn=loss), ours.apply_loss(value_fn=loss)
  assert type(a) is train_state.TrainState
  chex.assert_trees_all_equal(a.params, b.params)


def test_apply_gradients_points_to_apply_loss():
  state = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=zojax.mezo(1e-2))
  with pytest.raises(TypeError, match="apply_loss"):
    state.apply_gradients(grads=None)
  # First-order steps still work as in TrainState.
  sgd = ZOTrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  stepped = sgd.apply_gradients(grads=grads)
  chex.assert_trees_all_close(stepped.params, jax.tree.map(lambda p: p - 1.0, PARAMS))
