"""Tests for zojax.presets."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from tests.training import scan_steps


def regression_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
  y = x @ w_true + 0.5
  params = {"kernel": jnp.zeros((8, 1)), "bias": jnp.zeros(1)}

  def loss(p, batch=(x, y)):
    bx, by = batch
    return jnp.mean((bx @ p["kernel"] + p["bias"] - by) ** 2)

  return params, loss, (x, y)


def test_mezo_lowers_regression_loss():
  params, loss, _ = regression_problem()
  tx = zojax.mezo(learning_rate=0.02, key=0)

  run = scan_steps(tx, loss, 400)

  start = float(loss(params))
  params, state = run(params, tx.init(params))
  assert float(loss(params)) < 0.05 * start
  assert int(state[0].count) == 400


def test_mezo_weight_decay_skips_vectors():
  # With a constant loss every c_i is 0, so the update is -lr * wd * theta on
  # leaves with ndim >= 2 and exactly zero on vectors.
  params = {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full(2, 2.0)}
  tx = zojax.mezo(learning_rate=0.1, weight_decay=0.5)
  with pytest.warns(UserWarning, match="does not depend on the parameters"):  # constant loss
    updates, _ = tx.update(None, tx.init(params), params, value_fn=lambda p: jnp.float32(1.0))
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0 * np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], np.zeros(2))


def test_mezo_is_sgd_on_the_estimate_with_schedule():
  params, loss, batch = regression_problem()
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  tx = zojax.mezo(learning_rate=schedule, loss_fn=loss, key=3)
  ref = zojax.zo_grad(loss, key=3)
  state, ref_state = tx.init(params), ref.init(params)
  for t in range(3):
    updates, state = tx.update(None, state, params, batch=batch)
    est, ref_state = ref.update(None, ref_state, params, batch=batch)
    chex.assert_trees_all_close(
      updates, jax.tree.map(lambda g, t=t: -schedule(t) * g, est), rtol=1e-6, atol=1e-9
    )


def test_matrix_mask():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "conv": jnp.ones((3, 3, 1, 2))}
  assert zojax.matrix_mask()(params) == {"kernel": True, "bias": False, "conv": True}
  inner = {"kernel": False, "bias": True, "conv": True}
  assert zojax.matrix_mask(inner)(params) == {"kernel": False, "bias": False, "conv": True}


def _classification_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 64))
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    "l1": {"kernel": jax.random.normal(k1, (10, 16)) * 0.3, "bias": jnp.zeros(16)},
    "l2": {"kernel": jax.random.normal(k2, (16, 16)) * 0.25, "bias": jnp.zeros(16)},
    "out": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)},
  }

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    logits = h @ p["out"]["kernel"] + p["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss


FORWARD_BUDGET = 3000
# ZO-MOPI's k stays below every leaf's clamped rank (4 for "out"), so its
# power iteration is partial everywhere (no no-op warning).
PRESETS = {
  "mezo": (lambda: zojax.mezo(0.03), 2),  # 0.05 is at the edge of stability here
  "zo_muon": (
    lambda: zojax.zo_muon(0.05, rank=8, refresh_every=50, vector_learning_rate=0.05),
    5,
  ),
  "zo_mopi": (
    lambda: zojax.zo_mopi(
      0.02, rank=8, k=3, refresh_every=50, num_queries=4, vector_learning_rate=0.02
    ),
    5,
  ),
  "zo_mopi_random_refresh": (
    lambda: zojax.zo_mopi(
      0.05,
      rank=8,
      k=3,  # < 4, the rank of the 4-wide output layer: partial there too
      beta=0.0,
      refresh_every=1,
      anchored=False,
      num_queries=4,
      vector_learning_rate=0.05,
    ),
    5,
  ),
  "lozo": (lambda: zojax.lozo(0.05, rank=2), 2),
  "lozo_m": (lambda: zojax.lozo_m(0.05, rank=2), 2),
  "subzero": (lambda: zojax.subzero(0.03, rank=8, refresh_every=100), 2),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_jits_is_deterministic_and_lowers_loss(name):
  make, forwards = PRESETS[name]
  params, loss = _classification_problem()
  tx = make()
  steps = FORWARD_BUDGET // forwards

  run_full = scan_steps(tx, loss, steps)
  run = lambda p, s: run_full(p, s)[0]

  first = run(params, tx.init(params))
  chex.assert_trees_all_equal(first, run(params, tx.init(params)))
  chex.assert_tree_all_finite(first)
  assert float(loss(first)) < 0.5 * float(loss(params)), name


def test_split_learning_rates():
  params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
  tx = zojax.split_learning_rates(0.5, 0.01)
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((2, 3)))
  np.testing.assert_allclose(updates["bias"], -0.01 * np.ones(3))


# ZO-MOPI's k >= rank: both rank-k mechanisms are no-ops (a full
# orthogonalization, an anchor that keeps the whole basis), so construction warns.


@pytest.mark.parametrize("k, rank", [(8, 8), (9, 8), (1, 1)])
def test_zo_mopi_warns_when_k_reaches_the_rank(k, rank):
  with pytest.warns(UserWarning, match=rf"k={k} >= rank={rank}.*k = rank // 2"):
    zojax.zo_mopi(rank=rank, k=k)


def test_zo_mopi_random_refresh_warning_does_not_mention_the_anchor():
  with pytest.warns(UserWarning, match="full orthogonalization") as record:
    zojax.zo_mopi(rank=4, k=4, anchored=False)
  assert "anchored" not in str(record[0].message)


@pytest.mark.parametrize("anchored", [True, False])
def test_zo_mopi_with_k_below_the_rank_does_not_warn(anchored):
  params = {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("error")
    tx = zojax.zo_mopi(rank=8, k=4, anchored=anchored)
    tx.init(params)  # nor at init: no leaf's rank is clamped to 4 or less
