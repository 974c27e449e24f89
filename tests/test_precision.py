"""Tests for zojax.precision: ZO updates survive bf16 weights at MeZO learning rates."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax import trajectory

LR = 1e-6
STEPS = 1000


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  w = jax.random.normal(jax.random.key(0), (32, 32)) * 0.05
  params = {"w": w.astype(jnp.bfloat16), "b": jnp.zeros(32, jnp.bfloat16)}

  def loss(p):
    # bf16 weights, float32 accumulation and loss: the recommended setup.
    h = jnp.dot(x.astype(p["w"].dtype), p["w"], preferred_element_type=jnp.float32)
    return jnp.mean(jnp.sum((h + p["b"].astype(jnp.float32) - y) ** 2, axis=-1))

  return params, loss


def _run(tx, params, loss, steps):
  @jax.jit
  def run(p, s):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(None, s, p, value_fn=loss)
      return (optax.apply_updates(p, u), s), trajectory.record(s)

    return jax.lax.scan(body, (p, s), None, length=steps)

  return run(params, tx.init(params))


@functools.cache
def _reference():
  """A float32 MeZO run from the bf16 initial weights, and its trajectory log."""
  params, loss = _problem()
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  (final, _), rows = _run(zojax.mezo(LR), p32, loss, STEPS)
  return final, trajectory.TrajectoryLog(0, np.asarray(rows))


def _bf16_spacing(w):
  up = jnp.nextafter(w, jnp.full_like(w, jnp.inf))
  return np.asarray(up.astype(jnp.float32) - w.astype(jnp.float32))


def test_updates_at_lr_1e6_move_bf16_weights():
  # The float32 run's update stream (its logged c_t) is replayed onto bf16
  # weights three ways; a coordinate "should move" if the float32 run moved
  # it by at least one bf16 spacing.
  params, _ = _problem()
  ref, log = _reference()
  w0 = params["w"]
  should = np.abs(np.asarray(ref["w"]) - np.asarray(w0, np.float32)) >= _bf16_spacing(w0)
  assert should.mean() > 0.5

  def moved(tx):
    final, state = trajectory.replay(tx, params, tx.init(params), log)
    return np.asarray(final["w"] != w0)[should].mean(), final, state

  plain, _, _ = moved(zojax.mezo(LR))
  master, final, state = moved(zojax.master_weights(zojax.mezo(LR)))
  rounded, _, _ = moved(optax.chain(zojax.mezo(LR), zojax.stochastic_rounding(key=0)))

  # Round-to-nearest loses most per-step updates (each ~1e-5, the spacing ~2e-4).
  assert plain < 0.6, plain
  # The master copy is exactly the float32 run; the weights are its rounding.
  assert master >= 0.99, master
  chex.assert_trees_all_equal(state.master, ref)
  chex.assert_trees_all_equal(final, jax.tree.map(lambda a: a.astype(jnp.bfloat16), ref))
  # Stochastic rounding ends at a random neighbour of the float32 value: a
  # coordinate whose net drift is one or two spacings can end where it
  # started, so a few per cent of them do (about 5% here).
  assert rounded >= 0.9, rounded


def test_bf16_run_tracks_the_float32_loss():
  # Loss decrease over 1000 MeZO steps at lr 1e-6, each run drawing the same
  # directions. Tolerance: within 25% of the float32 run's decrease.
  params, loss = _problem()
  ref, _ = _reference()
  start = float(loss(params))
  fp32_drop = start - float(loss(ref))
  assert fp32_drop > 0.05

  def drop(tx):
    (final, _), _ = _run(tx, params, loss, STEPS)
    assert final["w"].dtype == jnp.bfloat16
    return start - float(loss(final))

  master = drop(zojax.master_weights(zojax.mezo(LR)))
  rounded = drop(optax.chain(zojax.mezo(LR), zojax.stochastic_rounding(key=0)))
  plain = drop(zojax.mezo(LR))
  assert abs(master - fp32_drop) <= 0.25 * fp32_drop, (master, fp32_drop)
  assert abs(rounded - fp32_drop) <= 0.25 * fp32_drop, (rounded, fp32_drop)
  assert plain < 0.5 * fp32_drop, (plain, fp32_drop)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_is_unbiased_between_neighbours(dtype):
  x = jnp.asarray([0.05 + 1.3e-5, -0.7 - 3e-4, 3.0 + 1e-3, 1e-3 + 1e-7, 0.25], jnp.float32)
  draws = 20_000
  tiled = jnp.broadcast_to(x, (draws, x.size))
  out = zojax.stochastic_round(tiled, dtype, jax.random.key(1))
  assert out.dtype == dtype
  lo = jnp.nextafter(x.astype(dtype), jnp.full(x.shape, -jnp.inf, dtype)).astype(jnp.float32)
  near = x.astype(dtype).astype(jnp.float32)
  hi = jnp.nextafter(x.astype(dtype), jnp.full(x.shape, jnp.inf, dtype)).astype(jnp.float32)
  values = out.astype(jnp.float32)
  # Every draw is a neighbour of x (or x itself when representable).
  assert bool(jnp.all((values == near) | ((values == lo) & (lo < x)) | ((values == hi) & (hi > x))))
  # Mean within 4 standard errors (a Bernoulli times one spacing: sd <= spacing / 2).
  spacing = np.asarray(hi - lo) / 2
  err = np.abs(np.asarray(values.mean(axis=0)) - np.asarray(x))
  assert np.all(err <= 4 * (spacing / 2) / np.sqrt(draws) + 1e-9), err
  # 0.25 is representable and is returned as is; round-to-nearest is biased here.
  np.testing.assert_array_equal(values[:, 4], 0.25)
  assert np.any(np.asarray(x[:4].astype(dtype).astype(jnp.float32)) != np.asarray(x[:4]))
  # Deterministic under the key.
  chex.assert_trees_all_equal(out, zojax.stochastic_round(tiled, dtype, jax.random.key(1)))


def test_stochastic_round_keeps_non_finite_values():
  x = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  out = zojax.stochastic_round(x, jnp.bfloat16, jax.random.key(0)).astype(jnp.float32)
  np.testing.assert_array_equal(out, np.asarray(x))


def test_master_weights_in_a_subspace_preset_and_mixed_trees():
  # ZO-Muon on bf16 matrices with a float32 bias: only the bf16 leaf has a
  # master copy; the float32 leaf is used and updated as it is.
  params = {"w": jnp.full((6, 4), 0.1, jnp.bfloat16), "b": jnp.zeros(4, jnp.float32)}
  loss = lambda p: jnp.sum((jnp.ones(6) @ p["w"].astype(jnp.float32) + p["b"] - 1.0) ** 2)
  tx = zojax.master_weights(
    zojax.zo_muon(1e-3, rank=2, refresh_every=2, vector_learning_rate=1e-3, num_queries=2)
  )
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
  state = tx.init(params)
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert params["w"].dtype == jnp.bfloat16 and params["b"].dtype == jnp.float32
  chex.assert_trees_all_equal(params["w"], state.master["w"].astype(jnp.bfloat16))
  assert state.master["b"].size == 0
  assert not np.allclose(np.asarray(params["b"]), 0.0)
  assert not np.allclose(np.asarray(state.master["w"]), 0.1)


def test_precision_errors():
  fp32 = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="already float32"):
    zojax.master_weights(zojax.mezo(1e-3)).init(fp32)
  with pytest.raises(ValueError, match="already float32"):
    zojax.stochastic_rounding().init(fp32)
  with pytest.raises(ValueError, match="float32 or float64"):
    zojax.master_weights(zojax.mezo(1e-3), dtype=jnp.bfloat16)
  bf16 = {"w": jnp.ones(3, jnp.bfloat16)}
  est = zojax.zo_grad()
  with pytest.warns(UserWarning, match="Compute the loss in float32"):
    est.update(None, est.init(bf16), bf16, value_fn=lambda p: jnp.sum(p["w"]))
