"""Tests for zojax.estimators: unbiasedness against jax.grad, keys, guards, errors."""

import itertools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

import zojax
from tests import numerics, stats

NUM_SAMPLES = 4000


def quadratic_problem(dtype=jnp.float32):
  """f(theta) = 0.5 theta^T A theta + b^T theta on a two-leaf tree (d = 10)."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(10, 10))
  a = jnp.asarray(m @ m.T / 10 + np.eye(10), dtype)
  b = jnp.asarray(rng.normal(size=10), dtype)
  params = {
    "w": jnp.asarray(rng.normal(size=(2, 3)), dtype),
    "v": jnp.asarray(rng.normal(size=4), dtype),
  }

  def loss(p):
    theta = ravel_pytree(p)[0]
    return 0.5 * theta @ a @ theta + b @ theta

  return params, loss


def mlp_problem(dtype=jnp.float32):
  """A 3-4-1 tanh MLP with squared loss on fixed data (d = 21)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 3)), dtype)
  y = jnp.asarray(rng.normal(size=(16, 1)), dtype)
  params = {
    "l1": {
      "kernel": jnp.asarray(rng.normal(size=(3, 4)) * 0.7, dtype),
      "bias": jnp.asarray(rng.normal(size=4) * 0.1, dtype),
    },
    "l2": {
      "kernel": jnp.asarray(rng.normal(size=(4, 1)) * 0.7, dtype),
      "bias": jnp.zeros(1, dtype),
    },
  }

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

  return params, loss


PROBLEMS = {"quadratic": quadratic_problem, "mlp": mlp_problem}


def many_estimates(tx, params, loss, num=NUM_SAMPLES):
  """``num`` independent estimates (steps 0..num-1 of one key), raveled."""
  state = tx.init(params)

  def one(count):
    updates, _ = tx.update(None, state._replace(count=count), params, value_fn=loss)
    return ravel_pytree(updates)[0]

  return jax.jit(jax.vmap(one))(jnp.arange(num, dtype=jnp.int32))


CASES = [
  dict(testcase_name=f"{p}_{e}_{d}_q{q}", problem=p, estimator=e, distribution=d, num_queries=q)
  for p, e, d, q in itertools.product(PROBLEMS, zojax.ESTIMATORS, zojax.DISTRIBUTIONS, (1, 4))
]


class UnbiasednessTest(parameterized.TestCase):
  @parameterized.named_parameters(*CASES)
  def test_mean_matches_exact_gradient(self, problem, estimator, distribution, num_queries):
    params, loss = PROBLEMS[problem]()
    tx = zojax.zo_grad(
      num_queries=num_queries, eps=1e-3, estimator=estimator, distribution=distribution, key=3
    )
    samples = many_estimates(tx, params, loss)
    exact = ravel_pytree(jax.grad(loss)(params))[0]
    stats.assert_mean_matches(samples, exact, what=f"{problem}/{estimator}/{distribution}")

  @parameterized.parameters(*zojax.ESTIMATORS)
  def test_check_catches_a_factor_of_two(self, estimator):
    # The same check, fed the estimate with 1/eps instead of 1/(2 eps) (two-sided)
    # or 1/(2 eps) instead of 1/eps (one-sided), must fail.
    params, loss = quadratic_problem()
    tx = zojax.zo_grad(estimator=estimator, key=3)
    samples = many_estimates(tx, params, loss)
    factor = 2.0 if estimator == "two_sided" else 0.5
    exact = ravel_pytree(jax.grad(loss)(params))[0]
    with pytest.raises(AssertionError, match="exceeds"):
      stats.assert_mean_matches(factor * samples, exact)


class ScalarsTest(parameterized.TestCase):
  """The recorded scalars are the finite differences of the actual draws.

  zojax's step and the reference below are different programs, so they run in
  float64 (`tests.numerics`): in float32 their losses may differ in the last
  bits on another CPU, which the finite difference amplifies by 1/eps.
  """

  def test_two_sided_scalars_and_loss(self):
    with numerics.float64():
      params, loss = quadratic_problem(jnp.float64)
      eps = 1e-2
      tx = zojax.zo_grad(num_queries=3, eps=eps, key=5)
      state = tx.init(params)
      updates, new_state = tx.update(None, state, params, value_fn=loss)
      key_t = zojax.keys.step_key(state.key, state.count)
      fplus, fminus, expected = [], [], []
      for i in range(3):
        z = zojax.sample_direction(zojax.keys.query_key(key_t, i), params)
        fp = loss(jax.tree.map(lambda p, d: p + eps * d, params, z))
        fm = loss(jax.tree.map(lambda p, d: p - eps * d, params, z))
        fplus.append(fp)
        fminus.append(fm)
        expected.append((fp - fm) / (2 * eps))
      # Float64 losses are differenced in float64 and the scalars and the loss
      # then stored in float32 (ZOGradState): relative error <= 2^-24 each,
      # plus float64 rounding amplified by 1/eps (~1e-13, see tests/numerics.py).
      rtol = 2 * numerics.F32_UNIT_ROUNDOFF
      np.testing.assert_allclose(new_state.projected_grads, expected, rtol=rtol)
      np.testing.assert_allclose(new_state.loss, np.mean(fplus + fminus), rtol=rtol)
      z_sum = sum(
        c / 3 * ravel_pytree(zojax.sample_direction(zojax.keys.query_key(key_t, i), params))[0]
        for i, c in enumerate(new_state.projected_grads)
      )
      np.testing.assert_allclose(
        ravel_pytree(updates)[0], z_sum, rtol=numerics.F64_RTOL, atol=numerics.F64_ATOL
      )
      self.assertEqual(int(new_state.count), 1)

  def test_one_sided_records_baseline(self):
    with numerics.float64():
      params, loss = quadratic_problem(jnp.float64)
      tx = zojax.zo_grad(num_queries=2, estimator="one_sided", key=5)
      _, state = tx.update(None, tx.init(params), params, value_fn=loss)
      rtol = 2 * numerics.F32_UNIT_ROUNDOFF
      np.testing.assert_allclose(state.loss, loss(params), rtol=rtol)

  def test_forwards_per_step(self):
    self.assertEqual(zojax.forwards_per_step(1), 2)
    self.assertEqual(zojax.forwards_per_step(4, "two_sided"), 8)
    self.assertEqual(zojax.forwards_per_step(16, "one_sided"), 17)

  def test_forward_count_matches_traced_calls(self):
    params, loss = quadratic_problem()
    for estimator in zojax.ESTIMATORS:
      calls = []

      def counting(p, calls=calls):
        calls.append(1)
        return loss(p)

      tx = zojax.zo_grad(num_queries=3, estimator=estimator, vectorize=True)
      jax.jit(lambda p, s: tx.update(None, s, p, value_fn=counting)).lower(params, tx.init(params))
      # One trace for the shape check, one for the (vmapped) queries, plus
      # the baseline for the one-sided estimator.
      self.assertEqual(len(calls), 2 if estimator == "two_sided" else 3)


class DeterminismTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_same_key_bit_identical(self):
    params, loss = mlp_problem()
    tx = optax.chain(zojax.zo_grad(num_queries=2), optax.sgd(0.05))
    step = self.variant(lambda p, s: tx.update(None, s, p, value_fn=loss))
    num_steps = 3 if self.variant.type == chex.ChexVariantType.WITH_JIT else 1

    def run(seed):
      # The seed only changes the initial state, so every run shares `step`.
      state = optax.chain(zojax.zo_grad(num_queries=2, key=seed), optax.sgd(0.05)).init(params)
      p = params
      for _ in range(num_steps):
        u, state = step(p, state)
        p = optax.apply_updates(p, u)
      return p

    reference = run(7)
    chex.assert_trees_all_equal(reference, run(7))
    if self.variant.type == chex.ChexVariantType.WITH_JIT:  # eager steps are slow to trace
      chex.assert_trees_all_equal(run(jax.random.key(7)), reference)
      with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(reference, run(8))

  # Eager and jitted, vectorized and sequential steps are different XLA
  # programs: compared in float64 (see tests/numerics.py for the bound).

  def test_jit_matches_eager(self):
    with numerics.float64():
      params, loss = mlp_problem(jnp.float64)
      tx = zojax.zo_grad(num_queries=3, key=1)
      state = tx.init(params)
      eager = tx.update(None, state, params, value_fn=loss)[0]
      jitted = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss)[0])(params, state)
      chex.assert_trees_all_close(eager, jitted, rtol=numerics.F64_RTOL, atol=numerics.F64_ATOL)

  @parameterized.parameters(*zojax.ESTIMATORS)
  def test_vectorized_matches_sequential(self, estimator):
    with numerics.float64():
      params, loss = mlp_problem(jnp.float64)
      outs = []
      for vectorize in (False, True):
        tx = zojax.zo_grad(num_queries=4, estimator=estimator, vectorize=vectorize, key=2)
        outs.append(
          jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, value_fn=loss)[0])(
            params, tx.init(params)
          )
        )
      chex.assert_trees_all_close(outs[0], outs[1], rtol=numerics.F64_RTOL, atol=numerics.F64_ATOL)

  def test_steps_use_fresh_directions(self):
    params, loss = mlp_problem()
    tx = zojax.zo_grad(key=0)
    state = tx.init(params)
    u1, state = tx.update(None, state, params, value_fn=loss)
    u2, _ = tx.update(None, state, params, value_fn=loss)
    self.assertFalse(np.allclose(ravel_pytree(u1)[0], ravel_pytree(u2)[0]))


class LossBoundFormTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_extra_arg_equals_value_fn(self):
    params, _ = mlp_problem()
    rng = np.random.default_rng(3)
    batch = (
      jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
      jnp.asarray(rng.normal(size=(8, 1)), jnp.float32),
    )

    def loss_fn(p, b):
      x, y = b
      h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
      return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

    bound = optax.chain(zojax.zo_grad(loss_fn, key=4), optax.scale(-0.1))
    free = optax.chain(zojax.zo_grad(key=4), optax.scale(-0.1))
    a = self.variant(lambda p, s, b: bound.update(None, s, p, batch=b))(
      params, bound.init(params), batch
    )
    b = self.variant(lambda p, s, b: free.update(None, s, p, value_fn=lambda q: loss_fn(q, b)))(
      params, free.init(params), batch
    )
    chex.assert_trees_all_equal(a, b)

  def test_loss_without_batch(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad(loss, key=1)
    a = tx.update(None, tx.init(params), params)[0]
    b = zojax.zo_grad(key=1).update(None, tx.init(params), params, value_fn=loss)[0]
    chex.assert_trees_all_equal(a, b)


class NonFiniteGuardTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*zojax.ESTIMATORS)
  def test_nonfinite_query_is_a_noop(self, estimator):
    params, loss = mlp_problem()
    w0 = params["l1"]["kernel"][0, 0]

    def spiky(p):  # infinite whenever the perturbation raises this weight
      return jnp.where(p["l1"]["kernel"][0, 0] > w0, jnp.inf, loss(p))

    tx = optax.chain(zojax.zo_grad(num_queries=2, estimator=estimator, key=0), optax.sgd(0.1))
    state = tx.init(params)
    step = self.variant(lambda p, s: tx.update(None, s, p, value_fn=spiky))
    updates, state = step(params, state)
    new_params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_tree_all_finite(new_params)
    self.assertEqual(int(state[0].num_nonfinite), 1)
    np.testing.assert_array_equal(state[0].projected_grads, np.zeros(2))

  def test_finite_step_after_a_skipped_one(self):
    params, loss = mlp_problem()
    tx = optax.chain(zojax.zo_grad(key=0), optax.sgd(0.1))

    @jax.jit
    def step(p, s, bad):
      return tx.update(None, s, p, value_fn=lambda q: loss(q) + jnp.where(bad, jnp.nan, 0.0))

    updates, state = step(params, tx.init(params), True)
    self.assertEqual(float(optax.tree_utils.tree_norm(updates)), 0.0)
    updates, state = step(params, state, False)
    self.assertEqual(int(state[0].num_nonfinite), 1)
    self.assertEqual(int(state[0].count), 2)
    self.assertGreater(float(optax.tree_utils.tree_norm(updates)), 0.0)

  def test_nan_batch(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad(lambda p, b: loss(p) * b, key=0)
    updates, state = tx.update(None, tx.init(params), params, batch=jnp.float32(jnp.nan))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    self.assertTrue(np.isnan(state.loss))
    self.assertEqual(int(state.num_nonfinite), 1)


def spike_on_one_sign(loss, params, spike):
  """``loss`` plus ``spike`` where the perturbation raises ``l1.kernel[0, 0]`` above ``params``'.

  Two-sided, exactly one of the pair ``theta +- eps z`` spikes, so
  ``c = +-spike / (2 eps)`` up to the slope term.
  """
  w0 = params["l1"]["kernel"][0, 0]
  return lambda p: loss(p) + jnp.where(p["l1"]["kernel"][0, 0] > w0, spike, 0.0)


class OutlierGuardTest(chex.TestCase):
  """Finite differences beyond MAX_PROJECTED_GRAD are skipped like a non-finite loss."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(estimator=zojax.ESTIMATORS, spike=[1e20, 1e30])
  def test_huge_finite_spike_is_skipped(self, estimator, spike):
    params, loss = mlp_problem()
    tx = zojax.zo_grad(num_queries=2, estimator=estimator, key=0)
    step = self.variant(
      lambda p, s: tx.update(None, s, p, value_fn=spike_on_one_sign(loss, p, spike))
    )
    updates, state = step(params, tx.init(params))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_array_equal(state.projected_grads, np.zeros(2))
    self.assertEqual(int(state.num_nonfinite), 1)
    self.assertEqual(int(state.c_count), 0)
    chex.assert_tree_all_finite((state.loss, state.c_mean_square))

  def test_bound_is_max_projected_grad(self):
    # |c| = spike / (2 eps) up to the slope (|c| ~ 1 here): a factor of two
    # either side of the bound is far outside that.
    params, loss = mlp_problem()
    tx = zojax.zo_grad(key=0)
    for factor, skipped in [(0.5, 0), (2.0, 1)]:
      spike = factor * zojax.MAX_PROJECTED_GRAD * 2 * 1e-3
      _, state = tx.update(
        None, tx.init(params), params, value_fn=spike_on_one_sign(loss, params, spike)
      )
      self.assertEqual(int(state.num_nonfinite), skipped)
      if not skipped:
        np.testing.assert_allclose(np.abs(state.projected_grads), spike / 2e-3, rtol=1e-3)

  def test_float64_loss_beyond_float32_range_is_skipped(self):
    # c = 1e300 / 2e-3 is finite in float64 but inf once stored in float32:
    # the bound is checked before the cast.
    params, loss = mlp_problem()
    with numerics.float64():
      tx = zojax.zo_grad(key=0)
      spiky = spike_on_one_sign(lambda p: loss(p).astype(jnp.float64), params, 1e300)
      updates, state = tx.update(None, tx.init(params), params, value_fn=spiky)
    chex.assert_tree_all_finite(updates)
    self.assertEqual(int(state.num_nonfinite), 1)

  @parameterized.parameters(jnp.inf, jnp.nan, 1e20, 1e30)
  def test_adam_after_zo_grad_keeps_moving_after_one_bad_step(self, bad):
    # Before the bound, a 1e20 spike made g^2 overflow: Adam's nu became inf
    # and every later update m / sqrt(nu) was exactly 0 (frozen for good).
    params, loss = mlp_problem()
    tx = optax.chain(zojax.zo_grad(key=0), optax.adam(1e-2))

    @jax.jit
    def step(p, s, spike):
      updates, s = tx.update(None, s, p, value_fn=spike_on_one_sign(loss, p, spike))
      return optax.apply_updates(p, updates), s, updates

    p, s = params, tx.init(params)
    for t, spike in enumerate([0.0, 0.0, bad, 0.0, 0.0, 0.0]):
      p, s, updates = step(p, s, jnp.float32(spike))
      chex.assert_tree_all_finite((p, s[1]))
      if t > 2:  # every coordinate moves on every step after the bad one
        for leaf in jax.tree.leaves(updates):
          self.assertTrue(np.all(np.asarray(leaf) != 0))
    self.assertEqual(int(s[0].num_nonfinite), 1)


class ClipTest(chex.TestCase):
  """clip_c: each c_i clipped to k times the debiased running RMS of the past ones."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_spike_is_clipped_to_k_times_the_running_rms(self):
    params, loss = mlp_problem()
    k = 3.0
    tx = zojax.zo_grad(num_queries=2, key=0, clip_c=k)
    step = self.variant(
      lambda p, s, spike: tx.update(None, s, p, value_fn=spike_on_one_sign(loss, p, spike))
    )
    state = tx.init(params)
    for _ in range(3):
      _, state = step(params, state, 0.0)
    before = state
    updates, state = step(params, state, 100.0)  # c = +-5e4 unclipped
    bound = k * np.sqrt(np.float32(before.c_mean_square))
    self.assertLess(bound, 100.0)
    # Both queries spike on one of their signs: both hit the bound, signs kept.
    np.testing.assert_allclose(np.abs(state.projected_grads), bound, rtol=1e-6)
    # The update is the estimate of the clipped c_i (a replay of them). Another
    # program: sum_i c_i z_i / N may round differently, by a few units of
    # 6e-8 relative to the terms |c_i z_i| <= bound * 6.
    replayed, _ = tx.update(None, before, params, projected_grads=state.projected_grads)
    chex.assert_trees_all_close(updates, replayed, rtol=1e-6, atol=1e-6 * float(bound))
    self.assertEqual(int(state.num_nonfinite), 0)
    self.assertEqual(int(state.c_count), 4)

  def test_off_by_default_and_first_step_not_clipped(self):
    # No clipping by default; with clip_c there is no scale before the first
    # averaged step, so that step passes unclipped and seeds s^2 = mean c^2.
    params, loss = mlp_problem()
    spiky = spike_on_one_sign(loss, params, 100.0)
    for clip_c in [None, 3.0]:
      tx = zojax.zo_grad(key=0, clip_c=clip_c)
      _, state = tx.update(None, tx.init(params), params, value_fn=spiky)
      self.assertGreater(float(np.abs(state.projected_grads[0])), 4e4)
      np.testing.assert_allclose(state.c_mean_square, np.square(state.projected_grads[0]))

  def test_running_mean_square_is_a_debiased_ema_of_averaged_steps(self):
    # Driven through replay (c_i as given): all-zero rows, like a replayed
    # skipped step, are not averaged; a live skipped step is not either.
    params = {"w": jnp.ones(3)}
    decay = 0.9
    tx = zojax.zo_grad(num_queries=2, clip_decay=decay, key=0)
    rows = np.asarray([[3.0, -1.0], [0.0, 0.0], [0.5, 2.0], [-4.0, 0.0]], np.float32)
    state = tx.init(params)
    ema, n = 0.0, 0
    for row in rows:
      _, state = tx.update(None, state, params, projected_grads=jnp.asarray(row))
      if np.any(row != 0):
        n += 1
        ema = decay * ema + (1 - decay) * np.mean(row.astype(np.float64) ** 2)
      np.testing.assert_allclose(state.c_mean_square, ema / (1 - decay**n), rtol=1e-6)
      self.assertEqual(int(state.c_count), n)
    _, skipped = tx.update(None, state, params, value_fn=lambda p: jnp.sum(p["w"]) + jnp.inf)
    self.assertEqual(int(skipped.num_nonfinite), 1)
    chex.assert_trees_all_equal(
      (skipped.c_mean_square, skipped.c_count), (state.c_mean_square, state.c_count)
    )

  def test_one_spike_barely_moves_the_scale(self):
    # Fed the clipped value, a spike raises s^2 by at most the factor
    # 1 + w (k^2 - 1) with w the step's weight; the unclipped square would
    # multiply it by about 1 + w (5e4)^2.
    params, loss = mlp_problem()
    k, decay = 3.0, 0.5
    tx = zojax.zo_grad(key=0, clip_c=k, clip_decay=decay)
    step = jax.jit(
      lambda s, spike: tx.update(None, s, params, value_fn=spike_on_one_sign(loss, params, spike))
    )
    state = tx.init(params)
    for _ in range(20):  # w = (1 - decay) / (1 - decay^n) ~ 0.5 by now
      _, state = step(state, 0.0)
    before = float(state.c_mean_square)
    _, state = step(state, 100.0)
    weight = (1 - decay) / (1 - decay**21)
    self.assertLessEqual(float(state.c_mean_square), before * (1 + weight * (k**2 - 1)) * 1.000001)

  def test_clip_c_is_checked_and_injectable(self):
    for bad in [1.0, 0.5, -3.0, float("nan")]:
      with pytest.raises(ValueError, match="clip_c"):
        zojax.zo_grad(clip_c=bad)
    with pytest.raises(ValueError, match="clip_decay"):
      zojax.zo_grad(clip_decay=1.0)
    # Under optax.inject_hyperparams k and the decay are traced arrays.
    params, loss = mlp_problem()
    plain = zojax.zo_grad(key=0, clip_c=3.0, clip_decay=0.9)
    injected = optax.inject_hyperparams(zojax.zo_grad)(key=0, clip_c=3.0, clip_decay=0.9)
    spiky = spike_on_one_sign(loss, params, 100.0)

    def run(tx):
      state = tx.init(params)
      step = jax.jit(lambda s, f=loss: tx.update(None, s, params, value_fn=f))
      for _ in range(2):
        _, state = step(state)
      return jax.jit(lambda s: tx.update(None, s, params, value_fn=spiky))(state)

    (u_plain, s_plain), (u_inj, s_inj) = run(plain), run(injected)
    chex.assert_trees_all_close(u_plain, u_inj, rtol=1e-6)
    np.testing.assert_allclose(
      s_plain.projected_grads, s_inj.inner_state.projected_grads, rtol=1e-6
    )


class MaskTest(parameterized.TestCase):
  def test_masked_leaves_get_zero_updates_and_others_unchanged(self):
    params, loss = mlp_problem()
    mask = {"l1": {"kernel": True, "bias": False}, "l2": {"kernel": True, "bias": True}}
    tx = zojax.zo_grad(mask=mask, key=9)
    state = tx.init(params)
    updates, _ = tx.update(None, state, params, value_fn=loss)
    np.testing.assert_array_equal(updates["l1"]["bias"], np.zeros(4))
    # Masking a leaf does not change the draws of the others.
    key = zojax.keys.query_key(zojax.keys.step_key(state.key, 0), 0)
    z_full = zojax.sample_direction(key, params)
    z_mask = zojax.sample_direction(key, params, mask=mask)
    chex.assert_trees_all_equal(z_full["l2"], z_mask["l2"])
    chex.assert_trees_all_equal(z_full["l1"]["kernel"], z_mask["l1"]["kernel"])

  def test_integer_leaf_must_be_masked(self):
    params, loss = quadratic_problem()
    params = dict(params, step=jnp.array(3, jnp.int32))
    tx = zojax.zo_grad(key=0)
    with pytest.raises(TypeError, match=r"\['step'\].*int32"):
      tx.update(None, tx.init(params), params, value_fn=lambda p: loss({"w": p["w"], "v": p["v"]}))
    mask_fn = lambda p: jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.floating), p)
    tx = zojax.zo_grad(mask=mask_fn, key=0)
    updates, _ = jax.jit(
      lambda p, s: tx.update(None, s, p, value_fn=lambda q: loss({"w": q["w"], "v": q["v"]}))
    )(params, tx.init(params))
    self.assertEqual(int(updates["step"]), 0)

  def test_bool_leaf_must_be_masked(self):
    params = {"w": jnp.ones(3), "flag": jnp.array(True)}
    tx = zojax.zo_grad()
    with pytest.raises(TypeError, match="bool"):
      tx.update(None, tx.init(params), params, value_fn=lambda p: jnp.sum(p["w"]))

  def test_inside_optax_masked_is_rejected(self):
    params, loss = quadratic_problem()
    tx = optax.masked(zojax.zo_grad(), {"w": True, "v": False})
    with pytest.raises(TypeError, match="MaskedNode"):
      tx.update(params, tx.init(params), params, value_fn=loss)

  def test_mask_structure_mismatch(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad(mask={"w": True})
    with pytest.raises(ValueError, match="same pytree structure"):
      tx.update(None, tx.init(params), params, value_fn=loss)


class CompositionTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_followed_by_sgd_is_minus_lr_times_estimate(self):
    params, loss = mlp_problem()
    raw = zojax.zo_grad(key=11)
    est = self.variant(lambda p, s: raw.update(None, s, p, value_fn=loss)[0])(
      params, raw.init(params)
    )
    tx = optax.chain(zojax.zo_grad(key=11), optax.sgd(0.25))
    upd = self.variant(lambda p, s: tx.update(None, s, p, value_fn=loss)[0])(
      params, tx.init(params)
    )
    chex.assert_trees_all_close(upd, jax.tree.map(lambda g: -0.25 * g, est), rtol=1e-6)

  @parameterized.named_parameters(
    ("momentum", lambda: optax.chain(zojax.zo_grad(), optax.trace(0.9), optax.scale(-0.01))),
    ("adam", lambda: optax.chain(zojax.zo_grad(), optax.adam(1e-2))),
    (
      "schedule",
      lambda: optax.chain(
        zojax.zo_grad(), optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.05, 50))
      ),
    ),
    (
      "masked_after",
      lambda: optax.chain(
        zojax.zo_grad(),
        optax.masked(
          optax.scale(0.0),
          {"l1": {"kernel": False, "bias": True}, "l2": {"kernel": False, "bias": True}},
        ),
        optax.sgd(0.05),
      ),
    ),
    ("mezo_momentum", lambda: optax.chain(zojax.zo_grad(), optax.sgd(0.01, momentum=0.9))),
  )
  def test_chains_lower_the_loss(self, make):
    params, loss = mlp_problem()
    tx = make()
    state = tx.init(params)

    @jax.jit
    def step(p, s):
      u, s = tx.update(None, s, p, value_fn=loss)
      return optax.apply_updates(p, u), s

    start = loss(params)
    for _ in range(150):
      params, state = step(params, state)
    self.assertLess(float(loss(params)), 0.9 * float(start))
    self.assertEqual(int(state[0].count), 150)


class ErrorTest(parameterized.TestCase):
  @parameterized.parameters((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError))
  def test_bad_num_queries(self, n, error):
    with pytest.raises(error, match="num_queries"):
      zojax.zo_grad(num_queries=n)

  @parameterized.parameters(0.0, -1e-3)
  def test_bad_eps(self, eps):
    with pytest.raises(ValueError, match="eps"):
      zojax.zo_grad(eps=eps)

  def test_unknown_names(self):
    with pytest.raises(ValueError, match="gaussian"):
      zojax.zo_grad(distribution="uniform")
    with pytest.raises(ValueError, match="two_sided"):
      zojax.zo_grad(estimator="central")

  def test_missing_value_fn(self):
    params, _ = quadratic_problem()
    tx = optax.chain(zojax.zo_grad(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="needs the loss"):
      tx.update(None, tx.init(params), params)

  def test_non_scalar_loss(self):
    params, _ = quadratic_problem()
    tx = zojax.zo_grad()
    with pytest.raises(ValueError, match="scalar"):
      jax.jit(lambda p, s: tx.update(None, s, p, value_fn=lambda q: q["v"] ** 2))(
        params, tx.init(params)
      )

  def test_integer_loss(self):
    params, _ = quadratic_problem()
    tx = zojax.zo_grad()
    with pytest.raises(TypeError, match="floating"):
      tx.update(None, tx.init(params), params, value_fn=lambda q: jnp.int32(1))

  def test_missing_params(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad()
    with pytest.raises(ValueError, match="needs params"):
      tx.update(None, tx.init(params), None, value_fn=loss)

  def test_both_loss_forms(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad(lambda p, b: loss(p))
    with pytest.raises(ValueError, match="batch="):
      tx.update(None, tx.init(params), params, value_fn=loss)

  def test_bad_seed(self):
    with pytest.raises(TypeError, match="key must be"):
      zojax.zo_grad(key=1.5)

  def test_loss_with_an_auxiliary_output_says_what_to_do(self):
    params, loss = quadratic_problem()
    tx = zojax.zo_grad()
    with pytest.raises(ValueError, match=r"pair \(loss, aux\).*batch_stats"):
      tx.update(None, tx.init(params), params, value_fn=lambda q: (loss(q), {"mean": q["v"]}))
    with pytest.raises(ValueError, match=r"dict.*out\['loss'\]"):
      tx.update(None, tx.init(params), params, value_fn=lambda q: {"loss": loss(q)})


class ParameterDependenceTest(parameterized.TestCase):
  """A loss that ignores its argument (an NNX value_fn closing over the model) trains nothing."""

  def test_warns_when_the_loss_ignores_the_parameters(self):
    params, loss = quadratic_problem()
    frozen = dict(params)  # the loss closes over these, not over its argument
    tx = optax.chain(zojax.zo_grad(), optax.sgd(0.1))
    with pytest.warns(UserWarning, match="does not depend on the parameters.*nnx.merge"):
      updates, state = tx.update(None, tx.init(params), params, value_fn=lambda q: loss(frozen))
    # What the warning is about: every c_i is exactly 0.
    np.testing.assert_array_equal(state[0].projected_grads, 0.0)

  def test_warns_when_the_loss_reads_only_masked_out_leaves(self):
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    tx = zojax.zo_grad(mask={"a": True, "b": False})
    with pytest.warns(UserWarning, match="does not depend"):
      tx.update(None, tx.init(params), params, value_fn=lambda q: jnp.sum(q["b"] ** 2))

  @parameterized.parameters("plain", "scan", "masked")
  def test_no_warning_when_the_loss_uses_them(self, kind):
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
    mask = {"a": True, "b": False} if kind == "masked" else None

    def loss(q):
      if kind == "scan":
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h * w), None), q["b"], q["a"])
        return jnp.sum(h**2)
      return jnp.sum(q["a"] ** 2) + jnp.sum(q["b"])

    tx = zojax.zo_grad(mask=mask)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      tx.update(None, tx.init(params), params, value_fn=loss)
