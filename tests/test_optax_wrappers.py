"""optax wrappers around zojax optimizers: what runs, and what fails with zojax's own error.

A zojax optimizer takes ``updates=None`` and computes its gradient inside
``update``. Wrappers that read the incoming updates cannot see that gradient;
each case here either works (`zojax.multi_steps`, transforms after the
estimator, ``mask=``) or raises a zojax error naming the supported way.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from tests import numerics

K = 4


def problem():
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 7.0, "b": jnp.ones(3)}
  batches = jax.random.normal(jax.random.key(1), (K, 5, 3))

  def loss(p, x):
    return jnp.mean(jnp.sum(x @ p["w"].T, -1) ** 2) + jnp.sum(p["b"] ** 2 * jnp.mean(x, 0))

  return params, batches, loss


def run_calls(tx, params, batches, loss):
  """Calls ``tx`` once per batch under jit, applying each update; returns params and updates."""
  step = jax.jit(lambda p, s, x: tx.update(None, s, p, value_fn=lambda q: loss(q, x)))
  state, history = tx.init(params), []
  for x in batches:
    updates, state = step(params, state, x)
    history.append(updates)
    params = optax.apply_updates(params, updates)
  return params, state, history


def test_multi_steps_update_is_the_mean_of_the_k_estimates():
  with numerics.float64():
    params, batches, loss = problem()
    params = numerics.to_float64(params)
    batches = batches.astype(jnp.float64)
    inner = zojax.mezo(1e-2, weight_decay=0.1, num_queries=3, key=2)
    final, state, history = run_calls(zojax.multi_steps(inner, K), params, batches, loss)
    # Only the k-th call moves the parameters.
    for updates in history[:-1]:
      for leaf in jax.tree.leaves(updates):
        assert not np.any(np.asarray(leaf))
    # MeZO's update is linear in the estimate, so the accumulated step is the
    # mean of the steps each batch alone gives from the same state.
    s0 = inner.init(params)
    singles = [
      inner.update(None, s0, params, value_fn=lambda q, x=x: loss(q, x))[0] for x in batches
    ]
    mean = jax.tree.map(lambda *u: sum(u) / K, *singles)
    # The c_i are float32 (zo_grad's output), so their mean over K calls is
    # rounded to float32: relative error a few 2^-24 = 6e-8, well below 1e-6
    # (a factor-of-two error in the mean, e.g. a sum, is off by 100%).
    scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(mean))
    chex.assert_trees_all_close(history[-1], mean, rtol=0, atol=1e-6 * scale)
    chex.assert_trees_all_close(
      final, jax.tree.map(jnp.add, params, mean), rtol=0, atol=1e-6 * scale
    )
    assert int(state.gradient_step) == 1 and int(state.mini_step) == 0
    assert int(optax.tree_utils.tree_get(state, "count")) == 1


def test_multi_steps_equals_one_step_on_the_union_batch():
  # ZO-Muon orthogonalizes the estimate (not linear in it): accumulation is
  # still exactly the step on the mean loss over the k batches.
  params, batches, loss = problem()
  inner = zojax.zo_muon(1e-2, rank=1, key=3)
  _, state, history = run_calls(zojax.multi_steps(inner, K), params, batches, loss)
  union = lambda p: jnp.mean(jax.vmap(lambda x: loss(p, x))(batches))  # noqa: E731
  want, want_state = inner.update(None, inner.init(params), params, value_fn=union)
  chex.assert_trees_all_close(history[-1], want, rtol=1e-4, atol=1e-7)
  # The logged loss is the mean of the mini-steps' losses, not a replay's NaN.
  np.testing.assert_allclose(
    optax.tree_utils.tree_get(state, "loss"),
    optax.tree_utils.tree_get(want_state, "loss"),
    rtol=1e-5,
  )


def test_multi_steps_counts_a_skipped_batch():
  # A batch with a NaN loss contributes c = 0 and is counted at the step.
  params, batches, loss = problem()
  inner = zojax.mezo(1e-2, num_queries=2, key=1)
  poisoned = lambda p, i: jnp.where(i == 1, jnp.nan, 1.0) * loss(p, batches[i])  # noqa: E731
  final, state, history = run_calls(zojax.multi_steps(inner, K), params, jnp.arange(K), poisoned)
  s0 = inner.init(params)
  singles = [
    inner.update(None, s0, params, value_fn=lambda q, i=i: loss(q, batches[i]))[0]
    for i in range(K)
    if i != 1
  ]
  want = jax.tree.map(lambda *u: sum(u) / K, *singles)
  chex.assert_trees_all_close(history[-1], want, rtol=1e-5, atol=1e-7)
  assert int(optax.tree_utils.tree_get(state, "num_nonfinite")) == 1
  assert int(state.pending_nonfinite) == 0


def test_multi_steps_needs_one_estimator():
  with pytest.raises(ValueError, match="exactly one zo_grad"):
    zojax.multi_steps(optax.sgd(0.1), 2).init({"w": jnp.ones(2)})


def test_optax_multi_steps_gets_zojax_error():
  # With updates=None, optax.MultiSteps fails in its own accumulator; with
  # zeros (the first-order habit) it reached the estimator, which ran every
  # call's forwards and kept only the last: now a zojax error.
  params, batches, loss = problem()
  tx = optax.MultiSteps(zojax.mezo(1e-2), K)
  zeros = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="zojax.multi_steps"):
    tx.update(zeros, tx.init(params), params, value_fn=lambda p: loss(p, batches[0]))


def test_optax_apply_if_finite_gets_zojax_error():
  params, batches, loss = problem()
  tx = optax.apply_if_finite(zojax.mezo(1e-2), 2)
  zeros = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="apply_if_finite"):
    tx.update(zeros, tx.init(params), params, value_fn=lambda p: loss(p, batches[0]))


def test_non_finite_loss_is_skipped_without_apply_if_finite():
  # What optax.apply_if_finite would do, the estimator does itself: zero
  # updates and a count of skipped steps.
  params, batches, loss = problem()
  tx = zojax.mezo(1e-2)
  state = tx.init(params)
  nan_loss = lambda p: jnp.nan * loss(p, batches[0])  # noqa: E731
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=nan_loss))
  updates, state = step(params, state)
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  assert int(optax.tree_utils.tree_get(state, "num_nonfinite")) == 1


def test_transform_before_the_estimator_gets_zojax_error():
  params, batches, loss = problem()
  tx = optax.chain(optax.clip_by_global_norm(1.0), zojax.mezo(1e-2))
  zeros = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="put it after"):
    tx.update(zeros, tx.init(params), params, value_fn=lambda p: loss(p, batches[0]))


def test_clip_after_the_estimator_clips():
  params, batches, loss = problem()
  tx = optax.chain(zojax.zo_grad(key=0), optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
  updates, _ = tx.update(None, tx.init(params), params, value_fn=lambda p: loss(p, batches[0]))
  np.testing.assert_allclose(optax.tree.norm(updates), 1e-3, rtol=1e-5)


@pytest.mark.parametrize("wrap", ["masked", "multi_transform"])
@pytest.mark.parametrize("preset", ["mezo", "zo_muon"])
def test_masking_wrappers_get_zojax_error(wrap, preset):
  params, _, _ = problem()
  inner = zojax.mezo(1e-2) if preset == "mezo" else zojax.zo_muon(1e-2, rank=1)
  if wrap == "masked":
    tx = optax.masked(inner, {"w": True, "b": False})
  else:
    tx = optax.multi_transform(
      {"zo": inner, "frozen": optax.set_to_zero()}, {"w": "zo", "b": "frozen"}
    )
  with pytest.raises(TypeError, match="pass\\s+mask= to the estimator or preset"):
    tx.init(params)


def test_mask_freezes_leaves():
  params, batches, loss = problem()
  tx = zojax.mezo(1e-1, mask={"w": True, "b": False}, key=0)
  final, _, _ = run_calls(tx, params, batches, loss)
  chex.assert_trees_all_equal(final["b"], params["b"])
  assert np.any(np.asarray(final["w"] != params["w"]))


# zojax.NO_GRADIENT: None's meaning, but a transform that reads it as a gradient fails.

PRESETS_FOR_NO_GRADIENT = {
  "mezo": lambda: zojax.mezo(1e-2, key=0),
  "zo_muon": lambda: zojax.zo_muon(1e-2, rank=2, key=0),
  "mezo_bcd": lambda: zojax.mezo_bcd(1e-2, key=0),
  "multi_steps": lambda: zojax.multi_steps(zojax.mezo(1e-2, key=0), 2),
}


@pytest.mark.parametrize("name", sorted(PRESETS_FOR_NO_GRADIENT))
def test_no_gradient_is_none_to_zojax(name):
  # Same updates and state as None, jitted and eager.
  params, batches, loss = problem()
  tx = PRESETS_FOR_NO_GRADIENT[name]()
  state = tx.init(params)
  for jitted in (True, False):
    call = lambda g, s, p: tx.update(g, s, p, value_fn=lambda q: loss(q, batches[0]))  # noqa: E731
    step = jax.jit(call, static_argnums=0) if jitted else call
    with_none = step(None, state, params)
    with_sentinel = step(zojax.NO_GRADIENT, state, params)
    chex.assert_trees_all_equal(
      with_none[0], with_sentinel[0], custom_message=f"{name} jitted={jitted}"
    )
    assert jax.tree.structure(with_none[1]) == jax.tree.structure(with_sentinel[1])


@pytest.mark.parametrize(
  "wrapped",
  [
    lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    lambda tx: optax.chain(optax.scale(0.5), tx),
    lambda tx: optax.MultiSteps(tx, 2),
  ],
  ids=["clip_before", "scale_before", "optax_multi_steps"],
)
def test_reading_no_gradient_raises_zojax_message(wrapped):
  # With None these clip or scale nothing, silently (optax passes None through).
  params, batches, loss = problem()
  tx = wrapped(zojax.mezo(1e-2, key=0))
  state = tx.init(params)
  step = jax.jit(
    lambda s, p: tx.update(zojax.NO_GRADIENT, s, p, value_fn=lambda q: loss(q, batches[0]))
  )
  with pytest.raises(TypeError, match="zojax.NO_GRADIENT is what a zeroth-order optimizer"):
    step(state, params)


def test_apply_if_finite_on_no_gradient_names_the_zojax_type():
  # optax.apply_if_finite calls jnp.isfinite on it: JAX's own error, naming our type.
  params, batches, loss = problem()
  tx = optax.apply_if_finite(zojax.mezo(1e-2, key=0), 2)
  with pytest.raises(TypeError, match="zojax.no_gradient.NoGradient"):
    tx.update(zojax.NO_GRADIENT, tx.init(params), params, value_fn=lambda q: loss(q, batches[0]))
