"""Tests for zojax.orthogonalizers: lifting, exactness, the Newton-Schulz band, power iteration,
use in first-order chains, matrix views, errors."""

import warnings

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

from zojax import fastrandom
from zojax import orthogonalizers as orth
from zojax.orthogonalizers import MuonDimensionNumbers

SINGLE = {"newton_schulz": orth.newton_schulz, "svd": orth.polar_svd}


def haar(rng, m, r):
  """``m x r`` with orthonormal columns (numpy, float64)."""
  q, _ = np.linalg.qr(rng.normal(size=(m, r)))
  return q


def with_singular_values(rng, s, m, n):
  """``(G, U, V)`` with ``G = U diag(s) V^T`` of shape ``m x n``."""
  u, v = haar(rng, m, len(s)), haar(rng, n, len(s))
  return (u * s) @ v.T, u, v


def svals(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def f32(x):
  return jnp.asarray(x, jnp.float32)


class LiftTest(parameterized.TestCase):
  """f(P c) = P f(c), P with orthonormal columns: why ZO-Muon may orthogonalize the r x n factor."""

  @parameterized.parameters("newton_schulz", "svd")
  def test_single_matrix_form(self, method):
    rng = np.random.default_rng(0)
    p, c = haar(rng, 48, 8), rng.normal(size=(8, 20))
    lifted = SINGLE[method](f32(p @ c))
    np.testing.assert_allclose(lifted, p @ np.asarray(SINGLE[method](f32(c))), atol=1e-4)

  @parameterized.parameters("newton_schulz", "svd")
  def test_transform_on_flax_layout(self, method):
    # Flax (in, out) kernel whose out axis (48) carries the subspace: W = (P c)^T.
    rng = np.random.default_rng(1)
    p, c = haar(rng, 48, 8), rng.normal(size=(8, 20))
    tx = orth.orthogonalize(method)
    out, _ = tx.update({"w": f32((p @ c).T)}, tx.init({"w": f32((p @ c).T)}))
    np.testing.assert_allclose(out["w"], (p @ np.asarray(SINGLE[method](f32(c)))).T, atol=1e-4)

  def test_power_iteration_step(self):
    rng = np.random.default_rng(2)
    p, c = haar(rng, 30, 6), rng.normal(size=(6, 9))
    v = orth.random_orthonormal(jax.random.key(0), 9, 3)
    o_lift, v_lift = orth.power_iteration_step(f32(p @ c), v)
    o_small, v_small = orth.power_iteration_step(f32(c), v)
    np.testing.assert_allclose(o_lift, p @ np.asarray(o_small), atol=1e-4)
    np.testing.assert_allclose(v_lift @ v_lift.T, v_small @ v_small.T, atol=1e-4)


class PolarSvdTest(parameterized.TestCase):
  @parameterized.parameters((7, 5), (5, 7), (6, 6))
  def test_equals_numpy_polar_factor(self, m, n):
    g = np.random.default_rng(m * n).normal(size=(m, n))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    out = orth.polar_svd(f32(g))
    np.testing.assert_allclose(out, u @ vt, atol=1e-5)
    np.testing.assert_allclose(svals(out), 1.0, atol=1e-5)

  def test_zero_and_rank_deficient(self):
    zero = orth.polar_svd(jnp.zeros((4, 3)))
    np.testing.assert_array_equal(zero, 0.0)
    g, u, v = with_singular_values(np.random.default_rng(3), [3.0, 0.5], 6, 4)
    out = orth.polar_svd(f32(g))
    np.testing.assert_allclose(out, u @ v.T, atol=1e-5)
    np.testing.assert_allclose(svals(out), [1, 1, 0, 0], atol=1e-5)

  def test_keeps_dtype(self):
    out = orth.polar_svd(jnp.eye(3, dtype=jnp.bfloat16) * 4)
    self.assertEqual(out.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.eye(3))


_ns = jax.jit(orth.newton_schulz)


class NewtonSchulzBandTest(parameterized.TestCase):
  def test_scalar_map_band_is_tight(self):
    # sigma -> p^(5)(sigma / ||G||_F): the band holds on [1e-3, 1] and is attained at its ends.
    a, b, c = orth.DEFAULT_NS_COEFFS
    s = np.logspace(-3, 0, 100_001, dtype=np.float32)
    for _ in range(5):
      s = a * s + b * s**3 + c * s**5
    lo, hi = orth.NS_SINGULAR_VALUE_BAND
    self.assertTrue(lo <= s.min() < lo + 0.01, s.min())
    self.assertTrue(hi - 0.01 < s.max() <= hi, s.max())

  @hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
  @hypothesis.given(
    m=st.sampled_from([2, 5, 16, 33]),
    n=st.sampled_from([3, 16, 40]),
    seed=st.integers(0, 2**16),
  )
  def test_singular_values_in_band(self, m, n, seed):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    # Log-uniform sigma in [1e-3 sqrt(k), 1], smallest at the end: sigma / ||sigma|| >= 1e-3.
    s = np.exp(rng.uniform(np.log(1e-3 * np.sqrt(k)), 0.0, size=k))
    s[-1] = 1e-3 * np.sqrt(k)
    s[0] = 1.0
    g, u, v = with_singular_values(rng, s, m, n)
    out = np.asarray(_ns(f32(g)), np.float64)
    lo, hi = orth.NS_SINGULAR_VALUE_BAND
    sv = svals(out)
    self.assertTrue(np.all((sv >= lo - 1e-3) & (sv <= hi + 1e-3)), (s / np.linalg.norm(s), sv))
    # Singular vectors are kept: U^T O V is diagonal.
    core = u.T @ out @ v
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-3)

  def test_bf16_input_computed_in_float32(self):
    g = np.random.default_rng(4).normal(size=(8, 5))
    out = orth.newton_schulz(jnp.asarray(g, jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.bfloat16)
    ref = orth.newton_schulz(f32(jnp.asarray(g, jnp.bfloat16)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=1e-2)


_pi_step = jax.jit(orth.power_iteration_step)


class PowerIterationTest(parameterized.TestCase):
  def test_converges_to_top_k_polar_factor(self):
    # sigma = (8, 4, 2, 1 | 0.1, ...): error shrinks by (0.1 / 1)^2 per sweep on the
    # subspace and by <= (1/2)^2 within it, so 30 warm sweeps reach float32 accuracy.
    rng = np.random.default_rng(5)
    k = 4
    s = [8.0, 4.0, 2.0, 1.0, 0.1, 0.08, 0.05, 0.02]
    m, u, v = with_singular_values(rng, s, 12, 10)
    target = u[:, :k] @ v[:, :k].T
    basis = orth.random_orthonormal(jax.random.key(1), 10, k)
    o, basis = _pi_step(f32(m), basis)
    # First sweep from a random start: exactly rank k, the k values near 1.
    sv = svals(o)
    self.assertLess(sv[k:].max(), 1e-5)
    self.assertTrue(np.all((sv[:k] > 0.5) & (sv[:k] < 1.5)), sv)
    for _ in range(30):
      np.testing.assert_allclose(np.linalg.norm(o), np.sqrt(k), rtol=1e-5)
      np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-5)
      o, basis = _pi_step(f32(m), basis)
    np.testing.assert_allclose(o, target, atol=1e-4)

  def test_zero_matrix_keeps_basis(self):
    basis = orth.random_orthonormal(jax.random.key(2), 5, 2)
    o, new = orth.power_iteration_step(jnp.zeros((4, 5)), basis)
    np.testing.assert_array_equal(o, 0.0)
    np.testing.assert_allclose(new @ new.T, basis @ basis.T, atol=1e-6)

  def test_transform_orientation_state_and_rank_clamp(self):
    rng = np.random.default_rng(6)
    params = {"w": f32(rng.normal(size=(10, 12))), "small": f32(rng.normal(size=(4, 3)))}
    params["b"] = jnp.ones(3)
    tx = orth.orthogonalize("power_iteration", rank=5, key=7)
    with pytest.warns(UserWarning, match=r"\['small'\]"):  # k = 5 >= 3: see the warning tests
      state = tx.init(params)
    self.assertIsNone(state.v["b"])
    self.assertEqual(state.v["w"].shape, (1, 10, 5))  # V spans fan_in (flax axis 0)
    self.assertEqual(state.v["small"].shape, (1, 4, 3))  # rank clamped to min(4, 3)
    out, new_state = tx.update(params, state)
    o_ref, v_ref = orth.power_iteration_step(params["w"].T, state.v["w"][0])
    np.testing.assert_allclose(out["w"], o_ref.T, atol=1e-5)
    np.testing.assert_allclose(new_state.v["w"][0], v_ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["small"]) ** 2, 3.0, rtol=1e-5)
    np.testing.assert_array_equal(out["b"], params["b"])
    with pytest.warns(UserWarning, match=r"\['small'\]"):
      other = orth.orthogonalize("power_iteration", rank=5, key=8).init(params)
    self.assertFalse(np.allclose(other.v["w"], state.v["w"]))

  @parameterized.parameters(3, 4, 8)
  def test_warns_once_listing_leaves_where_k_spans_every_direction(self, k):
    params = {
      "a": jnp.ones((6, 3)),  # smaller dimension 3
      "conv": jnp.ones((2, 2, 1, 8)),  # (4, 8): smaller dimension 4
      "wide": jnp.ones((16, 16)),
      "row": jnp.ones((1, 5)),  # a dimension of 1: k >= 1 always, never listed
      "b": jnp.ones(3),
    }
    tx = orth.orthogonalize("power_iteration", rank=k)
    with pytest.warns(UserWarning, match="full orthogonalization") as record:
      jax.jit(tx.init)(params)  # at trace time is fine: shapes are static
    self.assertLen(record, 1)
    message = str(record[0].message)
    expected = {"a": k >= 3, "conv": k >= 4, "wide": False, "row": False, "b": False}
    for name, listed in expected.items():
      self.assertEqual(f"['{name}']" in message, listed, (name, message))

  @parameterized.parameters(1, 2)
  def test_no_warning_below_every_smaller_dimension(self, k):
    params = {"a": jnp.ones((6, 3)), "conv": jnp.ones((2, 2, 1, 8)), "row": jnp.ones((1, 5))}
    tx = orth.orthogonalize("power_iteration", rank=k)
    with warnings.catch_warnings(record=True):
      warnings.simplefilter("error")
      state = tx.init(params)
      tx.update(params, state)


class TransformTest(chex.TestCase):
  def _params(self):
    rng = np.random.default_rng(8)
    return {
      "w": f32(rng.normal(size=(5, 3))),
      "conv": f32(rng.normal(size=(3, 3, 4, 8))),
      "b": f32(rng.normal(size=3)),
      "scalar": jnp.asarray(2.0),
    }

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("newton_schulz", "svd", "power_iteration")
  def test_default_rule_conv_and_passthrough(self, method):
    params = self._params()
    tx = orth.orthogonalize(method, rank=2 if method == "power_iteration" else None)
    state = tx.init(params)
    out, _ = self.variant(tx.update)(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(out["b"], params["b"])
    np.testing.assert_array_equal(out["scalar"], params["scalar"])
    x = params["conv"].reshape(36, 8)  # HWIO -> (H*W*I, O)
    if method == "power_iteration":
      ref = orth.power_iteration_step(x.T, state.v["conv"][0])[0].T
    else:
      ref = SINGLE[method](x)
    np.testing.assert_allclose(out["conv"], ref.reshape(3, 3, 4, 8), atol=1e-5)

  def test_dimension_number_tree_callable_and_batch_axes(self):
    params = self._params()
    dn = {"w": None, "conv": MuonDimensionNumbers((0, 1, 2), 3), "b": None, "scalar": None}
    for dims in (dn, lambda p: dn):
      out, _ = orth.orthogonalize(weight_dimension_numbers=dims).update(params, optax.EmptyState())
      np.testing.assert_array_equal(out["w"], params["w"])
      np.testing.assert_allclose(
        out["conv"], orth.newton_schulz(params["conv"].reshape(36, 8)).reshape(3, 3, 4, 8)
      )
    # Axis 0 as a batch axis: each (4, 8) slice of a (2, 4, 8) leaf separately.
    x = f32(np.random.default_rng(9).normal(size=(2, 4, 8)))
    tx = orth.orthogonalize("svd", weight_dimension_numbers=MuonDimensionNumbers(1, 2))
    out, _ = tx.update({"x": x, "b": jnp.ones(2)}, optax.EmptyState())
    for i in range(2):
      np.testing.assert_allclose(out["x"][i], orth.polar_svd(x[i]), atol=1e-6)
    np.testing.assert_array_equal(out["b"], 1.0)

  def test_matrix_view_round_trip(self):
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    m, back = orth.matrix_view(x, MuonDimensionNumbers(reduction_axis=(3, 0), output_axis=2))
    self.assertEqual(m.shape, (3, 10, 4))
    np.testing.assert_array_equal(m[1, :, 2], np.asarray(x)[:, 1, 2, :].T.reshape(-1))
    np.testing.assert_array_equal(back(m), x)

  @parameterized.parameters("newton_schulz", "svd", "power_iteration")
  def test_first_order_chain_lowers_least_squares(self, method):
    rng = np.random.default_rng(10)
    a = f32(rng.normal(size=(32, 6)))
    y = a @ f32(rng.normal(size=(6, 4))) + 1.0

    def loss(p):
      return jnp.mean((a @ p["w"] + p["b"] - y) ** 2)

    tx = optax.chain(
      optax.trace(0.9),
      orth.orthogonalize(method, rank=2 if method == "power_iteration" else None),
      optax.scale(-0.1),
    )
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}

    @jax.jit
    def steps(params, state):
      def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

      return jax.lax.scan(body, (params, state), None, length=100)[0]

    # A plain bias step passes through: b moves by -0.1 * (momentum of its gradient).
    g0 = jax.grad(loss)(params)
    u0, _ = tx.update(g0, tx.init(params), params)
    np.testing.assert_allclose(u0["b"], -0.1 * g0["b"], rtol=1e-6)
    final, state = steps(params, tx.init(params))
    chex.assert_tree_all_finite((final, state))
    self.assertLess(loss(final), 0.02 * loss(params))


class ErrorTest(parameterized.TestCase):
  def test_unknown_method_lists_valid_ones(self):
    with pytest.raises(ValueError, match="newton_schulz.*svd.*power_iteration"):
      orth.orthogonalize("muon")

  @parameterized.parameters(
    (None, ValueError), (0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)
  )
  def test_power_iteration_needs_positive_rank(self, rank, error):
    with pytest.raises(error, match="rank"):
      orth.orthogonalize("power_iteration", rank=rank)

  @parameterized.parameters("newton_schulz", "svd")
  def test_rank_only_for_power_iteration(self, method):
    with pytest.raises(ValueError, match="only used by"):
      orth.orthogonalize(method, rank=4)

  def test_bad_hyperparameters(self):
    with pytest.raises(ValueError, match="ns_steps"):
      orth.orthogonalize(ns_steps=0)
    with pytest.raises(ValueError, match="ns_coeffs"):
      orth.orthogonalize(ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="eps"):
      orth.orthogonalize(eps=-1.0)
    with pytest.raises(TypeError, match="key must be"):
      orth.orthogonalize("power_iteration", rank=2, key="a")

  def test_bad_dimension_numbers(self):
    with pytest.raises(TypeError, match="MuonDimensionNumbers"):
      orth.orthogonalize(weight_dimension_numbers={"w": (0, 1)})
    params = {"w": jnp.ones((3, 4))}
    tx = orth.orthogonalize(weight_dimension_numbers=MuonDimensionNumbers(0, 0))
    with pytest.raises(ValueError, match="distinct"):
      tx.update(params, tx.init(params))
    tx = orth.orthogonalize(weight_dimension_numbers={"v": None})
    with pytest.raises(ValueError, match="prefix"):
      tx.update(params, tx.init(params))

  def test_single_matrix_forms_check_shapes(self):
    with pytest.raises(ValueError, match="2-D"):
      orth.newton_schulz(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="ndim >= 2"):
      orth.matrix_view(jnp.ones(3))
    with pytest.raises(ValueError, match=r"min\(a, b\)"):
      orth.power_iteration_step(jnp.ones((2, 5)), jnp.ones((5, 3)))


def _signed_qr64(a):
  """Q of the float64 QR with ``diag(R) > 0`` (numpy's LAPACK, the reference)."""
  q, r = np.linalg.qr(np.asarray(a, np.float64))
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


@pytest.mark.parametrize("shape", [(128, 24), (768, 64), (3072, 64), (32, 32), (3, 50, 8)])
def test_orthonormalize_columns_is_the_signed_qr(shape):
  """Gram-Schmidt twice (CGS2) gives the sign-fixed QR factor to float32 accuracy.

  ``||Q^T Q - I||_max <= k 2^-23``: CGS2's loss of orthogonality is O(u) for a
  numerically full-rank input (Giraud et al. 2005), observed at most 0.06 k 2^-23 on these
  shapes, so the bound has a 16x margin and an algorithm that lost orthogonality like
  one-pass CGS (O(u kappa^2)) or in bfloat16 matmuls fails it. Against float64 QR with
  ``diag(R) > 0``: the factor is unique, so it must match to the forward error of a
  backward-stable factorization of these well-conditioned Gaussian matrices (observed
  <= 4e-7; atol 1e-5).
  """
  a = jax.random.normal(jax.random.key(sum(shape)), shape, jnp.float32)
  q = np.asarray(jax.jit(orth.orthonormalize_columns)(a), np.float64)
  k = shape[-1]
  flat_a = np.asarray(a).reshape(-1, *shape[-2:])
  for qi, ai in zip(q.reshape(-1, *shape[-2:]), flat_a):
    assert np.abs(qi.T @ qi - np.eye(k)).max() <= k * 2.0**-23
    np.testing.assert_allclose(qi, _signed_qr64(ai), rtol=0, atol=1e-5)


def test_orthonormalize_columns_rank_deficient():
  """A zero column and a dependent one still give orthonormal columns (as Householder QR);
  the independent leading columns keep their span."""
  a = jax.random.normal(jax.random.key(3), (10, 5), jnp.float32)
  a = a.at[:, 2].set(2.0 * a[:, 0] - a[:, 1]).at[:, 3].set(0.0)
  q = np.asarray(orth.orthonormalize_columns(a), np.float64)
  assert np.isfinite(q).all()
  assert np.abs(q.T @ q - np.eye(5)).max() <= 5 * 2.0**-23
  np.testing.assert_allclose(q[:, :2], _signed_qr64(a[:, :2]), rtol=0, atol=1e-5)


def test_random_orthonormal_is_gram_schmidt_of_the_fastrandom_draw():
  # The draw is made in the (k, n) layout the loop works in, from the flat
  # indices of the (n, k) draw, and left unscaled (scaling by a power of two
  # is exact and commutes with every step): the same basis bit for bit, op by
  # op. Jitted, the two programs differ, and XLA may round their arithmetic
  # differently (it does without backend optimization, as in this suite):
  # within Gram-Schmidt's rounding, |dQ| <= 4 n k 2^-24.
  key = jax.random.key(3)
  reference = lambda key, n, k: orth.orthonormalize_columns(fastrandom.normal(key, (n, k)))
  for n, k in [(50, 7), (9, 9), (64, 1)]:
    chex.assert_trees_all_equal(orth.random_orthonormal(key, n, k), reference(key, n, k))
    jitted = [jax.jit(f, static_argnums=(1, 2)) for f in (orth.random_orthonormal, reference)]
    np.testing.assert_allclose(
      jitted[0](key, n, k), jitted[1](key, n, k), rtol=0, atol=4 * n * k * 2.0**-24
    )
