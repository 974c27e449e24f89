"""Tests for zojax.subspaces: covariances, scalings, refresh consistency, re-projection."""

import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import zojax
from tests import numerics, stats
from tests.training import scan_steps

FAN_IN, FAN_OUT = 5, 4
RNG = np.random.default_rng(0)
G = jnp.asarray(RNG.normal(size=(FAN_IN, FAN_OUT)), jnp.float32)
X0 = jnp.asarray(RNG.normal(size=(FAN_IN, FAN_OUT)), jnp.float32)
PARAMS = {"w": X0}


def linear_loss(p):
  return jnp.sum(G * p["w"])


def estimates(tx, loss, num=4000, subspace_count=None):
  """Lifted estimates for inner steps 0..num-1 (and subspace steps, if given)."""
  state = tx.init(PARAMS)

  def one(i):
    s = state._replace(inner_state=state.inner_state._replace(count=i))
    if subspace_count is not None:
      s = s._replace(count=subspace_count(i))
    return tx.update(None, s, PARAMS, value_fn=loss)[0]["w"].reshape(-1)

  # lax.map, not vmap: QRs of vmapped basis draws can hang XLA's CPU backend
  # (idle, nondeterministically; the reliability issue's open vmap item).
  return jax.jit(lambda xs: jax.lax.map(one, xs))(jnp.arange(num, dtype=jnp.int32))


def test_lifted_perturbation_covariance_is_the_projector():
  # With a fixed Haar basis P (out x r), the lifted direction is U P^T, whose
  # covariance is I_in (x) P P^T; for a linear loss the mean estimate is
  # therefore G P P^T.
  tx = zojax.subspace(zojax.zo_grad(key=1), rank=2, refresh_every=None, key=2)
  p = tx.init(PARAMS).bases[0]
  chex.assert_shape(p, (FAN_OUT, 2))
  np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)
  samples = estimates(tx, linear_loss)
  stats.assert_mean_matches(samples, (G @ p @ p.T).reshape(-1), what="subspace mean")


def test_lifted_direction_second_moment():
  # Direct covariance check: for a one-hot linear loss e_j, c = <e_j, D> and the
  # estimate is D_j * D, whose mean is column j of Cov(vec D) = I (x) P P^T.
  tx = zojax.subspace(zojax.zo_grad(key=4), rank=3, refresh_every=None, key=5)
  p = np.asarray(tx.init(PARAMS).bases[0])
  cov = np.kron(np.eye(FAN_IN), p @ p.T)
  for j in (0, 7, 13):
    e = np.zeros(FAN_IN * FAN_OUT, np.float32)
    e[j] = 1.0
    e_mat = jnp.asarray(e.reshape(FAN_IN, FAN_OUT))
    samples = estimates(tx, lambda q, e_mat=e_mat: jnp.sum(e_mat * q["w"]))
    stats.assert_mean_matches(samples, cov[:, j], what=f"covariance column {j}")


def test_lozo_one_over_r_is_unbiased_over_v():
  # LOZO: Delta = V U^T (flax layout), V Gaussian redrawn every step here so
  # the expectation runs over V too; E[c Delta] = r G, and the 1/r factor
  # makes it G.
  rank = 2
  tx = zojax.subspace(
    zojax.zo_grad(key=1), rank=rank, refresh_every=1, side="in", basis="gaussian", key=3
  )
  samples = estimates(tx, linear_loss, num=8000, subspace_count=lambda i: i + 1) / rank
  stats.assert_mean_matches(samples, G.reshape(-1), what="LOZO 1/r")


def test_subzero_scaling():
  # SubZero: Delta = s U Z V^T with s = sqrt(mn)/r gives E||Delta||_F^2 = mn and
  # an unbiased estimate over the Haar U, V.
  rank = 2
  tx = zojax.subspace(
    zojax.zo_grad(key=1, estimator="one_sided", eps=1.0),
    rank=rank,
    refresh_every=1,
    side="both",
    scale="sqrt_mn_over_r",
    key=3,
  )
  state = tx.init(PARAMS)
  sq_dist = lambda q: jnp.sum((q["w"] - X0) ** 2)  # f(X0 + eps D) - f(X0) = ||D||^2 at eps=1

  def norms(i):
    s = state._replace(count=i + 1, inner_state=state.inner_state._replace(count=i))
    return tx.update(None, s, PARAMS, value_fn=sq_dist)[1].inner_state.projected_grads[0]

  sq = np.asarray(jax.jit(lambda xs: jax.lax.map(norms, xs))(jnp.arange(4000)))  # see estimates
  mn = FAN_IN * FAN_OUT
  stats.assert_mean_matches(sq[:, None], [mn], tight=0.25, what="E||Delta||^2")
  tx2 = zojax.subspace(
    zojax.zo_grad(key=1),
    rank=rank,
    refresh_every=1,
    side="both",
    scale="sqrt_mn_over_r",
    key=3,
  )
  samples = estimates(tx2, linear_loss, num=8000, subspace_count=lambda i: i + 1)
  stats.assert_mean_matches(samples, G.reshape(-1), what="SubZero mean")


def test_refresh_step_uses_the_perturbation_draws():
  # At a refresh step the basis is redrawn before the queries: the update must
  # be sum_i c_i lift(U_i) / N with the NEW basis, where c_i are the recorded
  # scalars, and (linear loss) c_i = <G, lift(U_i)> with that same basis.
  num = 3
  tx = zojax.subspace(
    zojax.zo_grad(num_queries=num, estimator="one_sided", key=7),
    rank=2,
    refresh_every=4,
    key=8,
  )
  state = tx.init(PARAMS)
  state = state._replace(count=jnp.int32(4), inner_state=state.inner_state._replace(count=4))
  updates, new_state = jax.jit(lambda s: tx.update(None, s, PARAMS, value_fn=linear_loss))(state)
  p_new = new_state.bases[0]
  assert not np.allclose(p_new, state.bases[0])
  inner = new_state.inner_state
  key_t = zojax.keys.step_key(inner.key, 4)
  coords = {"w": jnp.zeros((FAN_IN, 2))}
  draws = [zojax.sample_direction(zojax.keys.query_key(key_t, i), coords)["w"] for i in range(num)]
  lifted = [d @ p_new.T for d in draws]
  c = np.asarray(inner.projected_grads, np.float64)
  # Float32 error bound (Higham's gamma_n = n u for sums of n terms, u =
  # 2^-24): the loss f(y) = sum(G * y) of 20 products is off by at most
  # 21 u S(y), S(y) = sum|G * y|; the perturbed weights by u |y| each; the
  # one-sided difference divides both by eps. The reference <G, lift(U)> is
  # off by 21 u S(lift(U)) plus the lift's own rounding (rank + 1 terms).
  u = numerics.F32_UNIT_ROUNDOFF
  g, x0, eps = np.abs(np.asarray(G, np.float64)), np.abs(np.asarray(X0, np.float64)), 1e-3
  bound = []
  for d in lifted:
    x_plus = x0 + eps * np.abs(np.asarray(d, np.float64))
    s_d = np.sum(g * np.abs(np.asarray(d, np.float64)))
    bound.append((21 * u * (np.sum(g * x_plus) + np.sum(g * x0)) + u * np.sum(g * x_plus)) / eps)
    bound[-1] += (21 + 3) * u * s_d
  reference = np.asarray([jnp.sum(G * d) for d in lifted], np.float64)
  assert np.all(np.abs(c - reference) <= np.asarray(bound)), (c, reference, bound)
  assert max(bound) < 0.1 * np.min(np.abs(reference))  # tight enough to catch wrong maths
  # The update lifts sum_i c_i U_i / N: each entry a sum of N * rank products,
  # off by at most (N * rank + 2) u sum_i |c_i| |U_i| |P|^T / N.
  expected = sum(ci * d for ci, d in zip(c, lifted)) / num
  p_abs = np.abs(np.asarray(p_new, np.float64))
  magnitude = sum(abs(ci) * np.abs(np.asarray(d, np.float64)) @ p_abs.T for ci, d in zip(c, draws))
  err = np.abs(np.asarray(updates["w"], np.float64) - np.asarray(expected, np.float64))
  assert np.all(err <= (num * 2 + 2) * 2 * u * magnitude / num + 1e-30), err


@pytest.mark.parametrize("side,basis", [("out", "haar"), ("in", "gaussian"), ("in", "haar")])
def test_reprojection_is_exact_for_full_rank_bases(side, basis):
  # With a full-rank basis the least-squares re-projection must reproduce the
  # lifted momentum exactly across a refresh, up to float32 rounding: solving
  # the normal equations (B^T B) T = B^T B_old with a basis of condition
  # number k loses about k^2 u (u = 2^-24) relative to the momentum's size, and
  # the lifts and products add a few n u more (n = 5 here). The bound used,
  # 20 n k^2 u, holds with a wide margin (observed errors are below a tenth of
  # it) and stays far below what a wrong re-projection gives (an O(1) error).
  rank = 5
  inner = optax.chain(zojax.zo_grad(key=0), optax.trace(0.9))
  tx = zojax.subspace(inner, rank=rank, refresh_every=2, side=side, basis=basis, key=1)
  state = tx.init(PARAMS)
  step = jax.jit(lambda s: tx.update(None, s, PARAMS, value_fn=linear_loss)[1])
  state = step(state)  # count 0 -> 1, momentum nonzero
  state = step(state)  # count 1 -> 2
  geo = zojax.subspaces._Geometry(PARAMS, rank, side, None, None)
  spec = geo.specs[0]
  before = geo.lift(spec, state.bases[0], state.inner_state[1].trace["w"])
  refreshed = jax.jit(
    lambda s: tx.update(None, s, PARAMS, value_fn=lambda p: 0.0 * linear_loss(p))
  )(state)[1]
  after = geo.lift(spec, refreshed.bases[0], refreshed.inner_state[1].trace["w"] / 0.9)
  assert not np.allclose(
    np.asarray(jax.tree.leaves(refreshed.bases[0])[0]),
    np.asarray(jax.tree.leaves(state.bases[0])[0]),
  )
  bases = [np.asarray(b, np.float64) for b in (state.bases[0], refreshed.bases[0])]
  kappa = max(np.linalg.cond(b) for b in bases)
  scale = np.max(np.abs(np.asarray(before, np.float64)))
  bound = 20 * rank * kappa**2 * numerics.F32_UNIT_ROUNDOFF * scale
  assert bound < 0.05 * scale, (kappa, bound, scale)
  np.testing.assert_allclose(after, before, rtol=0, atol=bound)


def test_momentum_anchored_basis_keeps_momentum_directions():
  inner = optax.chain(zojax.zo_grad(num_queries=2, key=0), optax.ema(0.5))
  params = {"w": jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)}
  g = jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)
  tx = zojax.subspace(inner, rank=4, refresh_every=3, basis="momentum", anchor_rank=2, key=1)
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(None, s, params, value_fn=lambda q: jnp.sum(g * q["w"]))[1])
  for _ in range(3):
    state = step(state)
  p_old, m = state.bases[0], state.inner_state[1].ema["w"]
  new = step(state)
  p_new = new.bases[0]
  np.testing.assert_allclose(p_new.T @ p_new, np.eye(4), atol=1e-5)
  _, _, vt = np.linalg.svd(np.asarray(m), full_matrices=False)
  anchor = p_old @ vt[:2].T
  residual = anchor - p_new @ (p_new.T @ anchor)
  np.testing.assert_allclose(residual, np.zeros_like(residual), atol=1e-5)


def _momentum_subspace(rank, anchor_rank, refresh_every=3):
  inner = optax.chain(zojax.zo_grad(num_queries=2, key=0), optax.ema(0.5))
  return zojax.subspace(
    inner, rank=rank, refresh_every=refresh_every, basis="momentum", anchor_rank=anchor_rank
  )


def test_anchor_reaching_the_rank_keeps_the_subspace_and_warns():
  """anchor_rank = rank: the refresh rotates the basis within its old span, and init says so."""
  params = {"w": jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)}
  g = jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)
  tx = _momentum_subspace(rank=4, anchor_rank=4)
  with pytest.warns(UserWarning, match=r"anchor_rank=4.*\['w'\] \(rank 4\).*never changes"):
    state = tx.init(params)
  step = jax.jit(lambda s: tx.update(None, s, params, value_fn=lambda q: jnp.sum(g * q["w"]))[1])
  for _ in range(3):
    state = step(state)
  p_old, p_new = state.bases[0], step(state).bases[0]
  np.testing.assert_allclose(p_new @ p_new.T, p_old @ p_old.T, atol=1e-5)


def test_anchor_warning_is_per_leaf_after_clamping():
  """rank 8 with anchor 4 is fine on a 16-wide matrix, a no-op on a 4-wide one."""
  params = {
    "wide": jnp.ones((6, 16)),
    "narrow": jnp.ones((6, 4)),
    "row": jnp.ones((1, 1, 16)),  # viewed (1 x 16) below: fan_out 1, basis +-1 anyway
    "thin_in": jnp.ones((2, 16)),  # fan_in 2 < rank: the refresh keeps 2 of 8 directions
    "b": jnp.zeros(4),
  }
  default = MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  dims = {
    "wide": default,
    "narrow": default,
    "row": MuonDimensionNumbers(reduction_axis=(1, 2), output_axis=0),
    "thin_in": default,
    "b": None,
  }
  inner = optax.chain(zojax.zo_grad(key=0), optax.ema(0.5))
  tx = zojax.subspace(inner, rank=8, basis="momentum", anchor_rank=4, weight_dimension_numbers=dims)
  with pytest.warns(UserWarning) as record:
    tx.init(params)
  assert len(record) == 1
  message = str(record[0].message)
  assert "['narrow'] (rank 4)" in message
  assert all(f"['{name}']" not in message for name in ("wide", "row", "thin_in", "b"))


@pytest.mark.parametrize("rank, anchor_rank, refresh_every", [(4, 2, 3), (4, 4, None), (2, 1, 3)])
def test_anchor_below_every_leaf_rank_does_not_warn(rank, anchor_rank, refresh_every):
  params = {"w": jnp.ones((6, 8)), "b": jnp.zeros(8)}
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("error")
    _momentum_subspace(rank, anchor_rank, refresh_every).init(params)


def test_rank_is_clamped_and_vectors_pass_through():
  params = {"w": jnp.ones((8, 3)), "b": jnp.ones(3), "conv": jnp.ones((3, 3, 2, 4))}
  tx = zojax.subspace(zojax.zo_grad(), rank=64, refresh_every=10)
  state = tx.init(params)
  assert state.bases[0] == ()  # "b" (leaves sorted: b, conv, w)
  chex.assert_shape(state.bases[1], (4, 4))
  chex.assert_shape(state.bases[2], (3, 3))
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2) + jnp.sum(p["conv"] ** 2)
  updates, _ = jax.jit(lambda s: tx.update(None, s, params, value_fn=loss))(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  # Full rank on every matrix: the estimate is unrestricted, so it is nonzero everywhere.
  assert float(jnp.abs(updates["b"]).sum()) > 0


def test_loss_bound_inner_equals_value_fn_form():
  batch = jnp.float32(2.0)
  bound = zojax.subspace(zojax.zo_grad(lambda p, b: b * linear_loss(p), key=3), rank=2, key=4)
  free = zojax.subspace(zojax.zo_grad(key=3), rank=2, key=4)
  a = bound.update(None, bound.init(PARAMS), PARAMS, batch=batch)[0]
  b = free.update(None, free.init(PARAMS), PARAMS, value_fn=lambda p: batch * linear_loss(p))[0]
  chex.assert_trees_all_equal(a, b)


def test_first_order_updates_are_projected():
  # Incoming gradients are projected with the adjoint of the lift: with
  # identity inner, the output is G P P^T.
  tx = zojax.subspace(optax.identity(), rank=2, refresh_every=None)
  state = tx.init(PARAMS)
  out, _ = tx.update({"w": G}, state, PARAMS)
  p = state.bases[0]
  np.testing.assert_allclose(out["w"], G @ p @ p.T, rtol=1e-5, atol=1e-6)


def test_lowers_loss_and_is_deterministic():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  params = {"kernel": jnp.zeros((8, 6)), "bias": jnp.zeros(6)}
  loss = lambda p: jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)
  tx = optax.chain(
    zojax.subspace(zojax.zo_grad(num_queries=4, estimator="one_sided"), rank=3, refresh_every=5),
    optax.sgd(0.05),
  )

  run = scan_steps(tx, loss, 200)

  p1, _ = run(params, tx.init(params))
  p2, _ = run(params, tx.init(params))
  chex.assert_trees_all_equal(p1, p2)
  assert float(loss(p1)) < 0.85 * float(loss(params))


def test_errors():
  inner = zojax.zo_grad()
  with pytest.raises(ValueError, match="rank"):
    zojax.subspace(inner, rank=0)
  with pytest.raises(ValueError, match="refresh_every"):
    zojax.subspace(inner, rank=2, refresh_every=0)
  with pytest.raises(ValueError, match="'out'"):
    zojax.subspace(inner, rank=2, side="left")
  with pytest.raises(ValueError, match="haar"):
    zojax.subspace(inner, rank=2, basis="sobol")
  with pytest.raises(ValueError, match="anchor_rank"):
    zojax.subspace(inner, rank=2, basis="momentum")
  with pytest.raises(ValueError, match="side"):
    zojax.subspace(inner, rank=2, basis="momentum", anchor_rank=1, side="in")
  with pytest.raises(ValueError, match="anchor_rank"):
    zojax.subspace(inner, rank=2, anchor_rank=1)
  with pytest.raises(ValueError, match="scale"):
    zojax.subspace(inner, rank=2, scale="huge")
  with pytest.raises(ValueError, match="momentum"):
    tx = zojax.subspace(inner, rank=2, refresh_every=1, basis="momentum", anchor_rank=1)
    tx.update(None, tx.init(PARAMS), PARAMS, value_fn=linear_loss)


# ---------------------------------------------------------------------------
# Batch axes (stacked layers) and transposed views.

NUM_SLICES = 8
G3 = jnp.asarray(RNG.normal(size=(NUM_SLICES, FAN_IN, FAN_OUT)), jnp.float32)
STACKED = {
  "w": jnp.asarray(RNG.normal(size=(NUM_SLICES, FAN_IN, FAN_OUT)), jnp.float32),
  "b": jnp.zeros((NUM_SLICES, FAN_OUT), jnp.float32),
}
STACKED_DIMS = {"w": MuonDimensionNumbers(reduction_axis=1, output_axis=2), "b": None}


@pytest.mark.parametrize("side,basis", [("out", "haar"), ("in", "gaussian"), ("both", "haar")])
def test_batch_axes_give_every_slice_its_own_basis(side, basis):
  # Identity inner, first-order input: the output is each slice's own
  # projection (out: G P P^T; in: B (B^T B)^-1... here B B^T G for the lift of
  # the adjoint; both: B_in B_in^T G B_out B_out^T), computed per slice in
  # float64 from the state's bases. Leaves marked None pass through unchanged.
  tx = zojax.subspace(
    optax.identity(),
    rank=2,
    refresh_every=None,
    side=side,
    basis=basis,
    weight_dimension_numbers=STACKED_DIMS,
    key=3,
  )
  state = tx.init(STACKED)
  grads = {"w": G3, "b": jnp.ones((NUM_SLICES, FAN_OUT))}
  out, _ = jax.jit(lambda g, s: tx.update(g, s, STACKED))(grads, state)
  bases = state.bases[1]  # leaves sorted: b, w
  assert state.bases[0] == ()
  chex.assert_trees_all_equal(out["b"], grads["b"])
  g = np.asarray(G3, np.float64)
  # Float32 bound (Higham): a chain of matmuls whose inner sizes add to n is
  # off by at most gamma_n |A_1| ... |A_k| elementwise; n <= FAN_IN + FAN_OUT + 4.
  n = FAN_IN + FAN_OUT + 4
  for i in range(NUM_SLICES):
    if side == "out":
      p = np.asarray(bases[i], np.float64)
      chex.assert_shape(bases, (NUM_SLICES, FAN_OUT, 2))
      np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)
      want, mag = g[i] @ p @ p.T, np.abs(g[i]) @ np.abs(p) @ np.abs(p).T
    elif side == "in":
      b = np.asarray(bases[i], np.float64)
      chex.assert_shape(bases, (NUM_SLICES, FAN_IN, 2))
      want, mag = b @ b.T @ g[i], np.abs(b) @ np.abs(b).T @ np.abs(g[i])
    else:
      b_in, b_out = (np.asarray(x[i], np.float64) for x in bases)
      want = b_in @ b_in.T @ g[i] @ b_out @ b_out.T
      mag = np.abs(b_in) @ np.abs(b_in).T @ np.abs(g[i]) @ np.abs(b_out) @ np.abs(b_out).T
    err = np.abs(np.asarray(out["w"][i], np.float64) - want)
    assert np.all(err <= 2 * n * numerics.F32_UNIT_ROUNDOFF * mag + 1e-30), (i, err)
  flat = np.asarray(bases if side != "both" else bases[0]).reshape(NUM_SLICES, -1)
  assert len({tuple(np.round(r, 6)) for r in flat}) == NUM_SLICES  # no two slices share a basis


def test_transposed_view_puts_the_basis_on_the_first_axis():
  # A (V, D) table viewed with output axis 0 (PyTorch's embedding layout): the
  # basis spans V, and the projected update is P P^T E.
  table = {"e": jnp.asarray(RNG.normal(size=(7, 3)), jnp.float32)}
  g = jnp.asarray(RNG.normal(size=(7, 3)), jnp.float32)
  tx = zojax.subspace(
    optax.identity(),
    rank=2,
    refresh_every=None,
    weight_dimension_numbers={"e": MuonDimensionNumbers(reduction_axis=1, output_axis=0)},
  )
  state = tx.init(table)
  p = np.asarray(state.bases[0], np.float64)
  chex.assert_shape(p, (7, 2))
  out, _ = tx.update({"e": g}, state, table)
  np.testing.assert_allclose(out["e"], p @ p.T @ np.asarray(g, np.float64), atol=1e-5)


def test_batch_axes_estimate_is_each_slices_projector():
  # The ZO estimate of a linear loss <G3, W> has mean G3[i] P_i P_i^T on every
  # slice: the slices are perturbed and lifted independently.
  tx = zojax.subspace(
    zojax.zo_grad(key=1), rank=2, refresh_every=None, weight_dimension_numbers=STACKED_DIMS, key=2
  )
  state = tx.init(STACKED)
  loss = lambda p: jnp.sum(G3 * p["w"]) + jnp.sum(p["b"])

  def one(i):
    s = state._replace(inner_state=state.inner_state._replace(count=i))
    return tx.update(None, s, STACKED, value_fn=loss)[0]["w"].reshape(-1)

  samples = jax.jit(lambda xs: jax.lax.map(one, xs))(jnp.arange(6000, dtype=jnp.int32))
  p = np.asarray(state.bases[1], np.float64)
  want = np.stack([np.asarray(G3[i], np.float64) @ p[i] @ p[i].T for i in range(NUM_SLICES)])
  stats.assert_mean_matches(samples, want.reshape(-1), what="stacked subspace mean")


def test_zo_muon_orthogonalizes_each_slice_and_steps_stacked_vectors_as_vectors():
  # Each slice's update C_i P_i^T has the singular values of
  # NS5(C_i): in NS_SINGULAR_VALUE_BAND when each slice is orthogonalized on
  # its own; orthogonalizing the stack of 8 as one matrix would leave each
  # slice's near 1/sqrt(8) = 0.35, below the band. The stacked bias (None)
  # takes the vector learning rate (0 here), not the matrix one.
  tx = zojax.zo_muon(
    1.0,
    rank=2,
    refresh_every=None,
    num_queries=4,
    vector_learning_rate=0.0,
    weight_dimension_numbers=STACKED_DIMS,
    key=5,
  )
  loss = lambda p: jnp.sum(G3 * p["w"]) + jnp.sum(jnp.sin(p["b"]))
  updates, _ = jax.jit(lambda s: tx.update(None, s, STACKED, value_fn=loss))(tx.init(STACKED))
  chex.assert_trees_all_equal(updates["b"], jnp.zeros_like(updates["b"]))
  low, high = zojax.orthogonalizers.NS_SINGULAR_VALUE_BAND
  for i in range(NUM_SLICES):
    s = np.linalg.svd(np.asarray(updates["w"][i], np.float64), compute_uv=False)[:2]
    assert np.all((s >= low) & (s <= high)), (i, s)


def test_coordinate_dimension_numbers():
  coords = {"a": jnp.zeros((3, 4, 2)), "b": jnp.zeros((4, 2)), "c": jnp.zeros(5)}
  dims = zojax.coordinate_dimension_numbers(coords)
  assert dims["a"] == MuonDimensionNumbers(1, 2)
  assert dims["b"] == MuonDimensionNumbers(0, 1)
  assert dims["c"] is None


VMAP_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax, zojax
from zojax import orthogonalizers as orth

# The plain-JAX reduction of the hang: twelve orthonormalized vmapped 128 x 24 draws.
draws = lambda key: [orth.random_orthonormal(k, 128, 24) for k in jax.random.split(key, 12)]
jax.block_until_ready(jax.jit(jax.vmap(draws))(jax.random.split(jax.random.key(0), 4)))

params = {f"w{i}": jnp.full((128, 128), 0.01, jnp.float32) for i in range(12)}
loss = lambda p: sum(jnp.sum(jnp.tanh(w) ** 2) for w in p.values())
make = lambda seed: zojax.subspace(
  optax.chain(zojax.zo_grad(key=seed), optax.sgd(1e-2)), rank=24, side="both", key=seed
)
seeds = jnp.arange(4)
states = jax.jit(jax.vmap(lambda s: make(s).init(params)))(seeds)
step = lambda seed, state: make(seed).update(None, state, params, value_fn=loss)
updates, _ = jax.jit(jax.vmap(step))(seeds, states)
init_alone = jax.jit(lambda seed: make(seed).init(params))
step_alone = jax.jit(lambda seed, s: make(seed).update(None, s, params, value_fn=loss))
for i in range(4):  # each lane is that seed's own optimizer
  alone = init_alone(seeds[i])
  for a, b in zip(jax.tree.leaves(alone.bases), jax.tree.leaves(states.bases)):
    np.testing.assert_allclose(a, b[i], rtol=0, atol=1e-5)
  u, _ = step_alone(seeds[i], alone)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(updates)):
    np.testing.assert_allclose(a, b[i], rtol=0, atol=1e-3 * float(jnp.abs(a).max()))
assert float(jnp.abs(updates["w0"][0] - updates["w0"][1]).max()) > 0
print("ok")
"""


def test_vmapped_init_and_step_over_seeds_finish():
  """jax.jit(jax.vmap(init)) and a vmapped step over 4 seeds, the issue's configuration.

  Twelve 128 x 128 leaves, rank 24, side="both": with LAPACK's QR such a program
  deadlocked XLA's CPU backend, idle, when run alongside other work (the Gram-Schmidt
  of `orth.orthonormalize_columns` is plain matrix-vector products). In a subprocess
  with a timeout, so a hang fails instead of blocking the suite. Each lane equals its
  seed's own optimizer: both run the same algorithm and differ at most in the summation
  order of batched dot products (length <= 128), so a basis entry (|q| <= 1) moves by
  at most about 128 u = 8e-6 (atol 1e-5; observed: equal bit for bit); the update's
  finite differences amplify a basis change by 1 / eps = 1e3 (atol 1e-3 of the
  largest update entry), far below the order-one difference between two seeds.
  """
  result = subprocess.run(
    [sys.executable, "-c", VMAP_SCRIPT], capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
