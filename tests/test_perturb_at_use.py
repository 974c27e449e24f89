"""Tests for zojax.perturb_at_use: the loss at perturbed weights, perturbed where used.

What is compared, and under which bounds.

`value_at(value_fn, params, key, s)` must equal ``value_fn(perturb(params,
key, s))``: both apply ``round(theta + s z)`` in the leaf's dtype to the
same float32 draws ``z``. The lazy path exists only for float32 draws, so
the two sides are float32 programs that XLA compiles differently; their
perturbed weights may differ only by roundings XLA chooses (FMA
contraction of ``theta + s z``, the erfinv of the draw fused into other
loops, the order of the sphere norm's sum). Element-wise the two programs'
perturbed weights differ by at most (`_weight_gap`, ``u = 2^-24``)

    delta = |s z| (k + 4u) + 4u |P|

where ``k`` bounds the relative disagreement of two evaluations of a draw:
0 for Rademacher (exactly +-1); ``2^-16`` (256 ulps) for Gaussian draws
(``sqrt(2) erfinv(2u - 1)`` of the same exact input, a log and a degree-9
polynomial, about 20 roundings); for the sphere, twice that plus
``(n + 8) u`` (a float32 sum of ``n`` squares has relative error at most
``(n - 1) u`` in any order, and the normalisation is its inverse square
root). ``4u |P|`` covers the final rounding of both programs. A bfloat16
leaf is such a float32 value ``v`` rounded once more: the two
programs agree exactly unless ``[v - 2 delta, v + 2 delta]`` holds a
rounding boundary of the narrow grid, and there differ by one narrow ulp.
A wrong draw (another element, key, sign or scale) moves ``P`` by
``O(|s z|)``, over 100 ``delta`` at the scales used here for all but a few
entries (`_assert_moved` checks it).

Outputs that select or exactly rescale perturbed weights (slices, gathers,
transposes, scan slices, ``relu``, ``2 x``) are compared element-wise
under ``|value_fn(delta)|``: a selection of ``delta``, or ``delta`` through a
1-Lipschitz map. Losses that do arithmetic are evaluated in float64 from
the float32 perturbed weights (the model casts each weight where it uses
it, so the lazy float32 path is still the one taken) and compared under
the first-order propagation ``sum |dL/dP| delta`` plus ``1e-11 (1 + |L|)``
for float64 rounding and the second-order term (`tests/numerics.py`:
float64 programs agree to ~1e-13 relative); the sphere's common
normalisation error enters as ``rho |dL/dP . s z|``. Each such test also
checks that the bound is at most 1/30 of what it measures (the loss change
of the perturbation, or a typical ``c_i``). `zo_grad` with
``perturb_at_use`` True and False is compared through its scalars ``c_i``,
whose bound is that of the losses divided by ``eps``, and its updates
``(1/N) sum c_i z_i``, bounded through the ``c_i`` and the draws.

Memory is checked on XLA's buffer assignment of a compiled step, which is
deterministic for a given XLA version (no timing, no allocation).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core as jex_core
from optax.contrib import MuonDimensionNumbers

import zojax
from tests import numerics
from zojax import estimators, keys, perturb_at_use, perturbations, presets

U32 = numerics.F32_UNIT_ROUNDOFF
GAUSSIAN_DRAW_RTOL = 2.0**-16
# |z| of a fastrandom Gaussian is at most sqrt(2) erfinv(1 - 2^-23) ~ 5.33.
MAX_ABS_GAUSSIAN = 5.5
# float64 rounding of the losses here (<= 1e4 operations, u = 1.1e-16) and
# the second-order term of the propagation (|H| delta^2 < 1e-14).
F64_SLACK = 1e-11
D = 96  # 96 x 96 = 9216 >= perturbations.GROUP_BELOW: a lazy leaf.


def _normal(seed, shape, scale=0.1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


# ---------------------------------------------------------------------------
# Bounds.


def _static_mask(mask, params):
  """The mask as a pytree of bools resolved on ``params`` (not on a cast copy)."""
  return jax.tree.unflatten(jax.tree.structure(params), perturbations.resolve_mask(mask, params))


def _sphere_factor_rtol(params, mask=None):
  """Relative disagreement of two programs' sphere normalisation ``sqrt(n) / ||g||``."""
  flags = perturbations.resolve_mask(mask, params)
  n = sum(np.size(x) for x, f in zip(jax.tree.leaves(params), flags) if f)
  return 2 * GAUSSIAN_DRAW_RTOL + (n + 8) * U32


def _draw_rtol(distribution, params, mask=None, with_factor=True):
  """``k``: relative disagreement of two programs' draws (module docstring)."""
  if distribution == "rademacher":
    return 0.0
  if distribution == "sphere" and with_factor:
    return GAUSSIAN_DRAW_RTOL + _sphere_factor_rtol(params, mask)
  return GAUSSIAN_DRAW_RTOL


def _weight_gap(params, key, scale, distribution="gaussian", mask=None, with_factor=True):
  """Element-wise bound on two programs' ``round(theta + s z)`` (float64 numpy tree).

  Float32 leaves: ``|s z| (k + 4u) + 4u |P|``. Narrower leaves are the
  rounding of such a float32 value ``v``: two programs can differ only where
  ``[v - 2 delta, v + 2 delta]`` holds a rounding boundary (a midpoint of
  the narrow grid), and there by one narrow ulp; elsewhere they are equal.
  Masked-out leaves are ``theta`` itself in both: bound 0. With
  ``with_factor=False`` the sphere's common normalisation error is left out
  (`_loss_gap` adds it to the loss as a whole).
  """
  as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  flags = perturbations.resolve_mask(mask, params)
  mask = _static_mask(mask, params)
  z = jax.tree.leaves(perturbations.sample_direction(key, as_f32, distribution, mask))
  ref = jax.tree.leaves(perturbations.perturb(as_f32, key, scale, distribution, mask))
  k = _draw_rtol(distribution, params, mask, with_factor)
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for p, zz, r, flag in zip(leaves, z, ref, flags):
    r64 = np.asarray(r, np.float64)
    if not flag:
      out.append(np.zeros(np.shape(p)))
      continue
    sz = abs(float(scale)) * np.abs(np.asarray(zz, np.float64))
    gap = sz * (k + 4 * U32) + 4 * U32 * np.abs(r64)
    dtype = jnp.result_type(p)
    if jnp.finfo(dtype).bits < 32:
      q = jnp.asarray(r, dtype)
      up = np.asarray(jnp.nextafter(q, jnp.full_like(q, jnp.inf)), np.float64)
      down = np.asarray(jnp.nextafter(q, jnp.full_like(q, -jnp.inf)), np.float64)
      q = np.asarray(q, np.float64)
      flips = (r64 - 2 * gap <= (q + down) / 2) | (r64 + 2 * gap >= (q + up) / 2)
      gap = np.where(flips, np.maximum(up - q, q - down) + 2 * gap, 0.0)
    out.append(gap)
  return jax.tree.unflatten(treedef, out)


def _f32(tree):
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64), tree)


def _assert_within(actual, expected, bound, what):
  """|actual - expected| <= bound element-wise (NaN where both are NaN)."""
  triples = list(
    zip(jax.tree.leaves(_f32(actual)), jax.tree.leaves(_f32(expected)), jax.tree.leaves(bound))
  )
  assert len(triples) == len(jax.tree.leaves(actual)) == len(jax.tree.leaves(bound))
  for a, e, b in triples:
    b = np.abs(np.asarray(b, np.float64)) * (1 + 2.0**-20)
    both_nan = np.isnan(a) & np.isnan(e)
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaN in one program only"
    err = np.where(both_nan, 0.0, np.abs(a - e))
    over = err > b
    if over.any():
      i = np.argmax(np.where(over, err - b, -np.inf))
      raise AssertionError(
        f"{what}: {over.sum()} of {a.size} entries differ by more than the bound; worst "
        f"flat index {i}: {a.ravel()[i]!r} vs {e.ravel()[i]!r} (|diff| {err.ravel()[i]:.3g}, "
        f"bound {b.ravel()[i]:.3g})"
      )


def _assert_moved(perturbed, unperturbed, bound, factor=100.0, fraction=0.98):
  """The perturbation is resolved: most entries moved by ``factor`` times their bound."""
  moved, total = 0, 0
  for p, q, b in zip(
    jax.tree.leaves(_f32(perturbed)), jax.tree.leaves(_f32(unperturbed)), jax.tree.leaves(bound)
  ):
    # No signal: entries zero on both sides (relu's dead half), and unperturbed
    # entries with a zero bound (masked-out leaves, equal to theta in both programs).
    live = np.isfinite(p) & np.isfinite(q) & ((p != 0) | (q != 0)) & ~((b == 0) & (p == q))
    moved += np.sum((np.abs(p - q) > factor * np.abs(b)) & live)
    total += np.sum(live)
  assert total > 0 and moved >= fraction * total, f"only {moved} of {total} entries moved"


def _loss_gap(loss64, params, key, scale, distribution="gaussian", mask=None):
  """Bound on |L(P_a) - L(P_b)| for two programs' perturbed weights (float64 loss).

  First order: ``sum |dL/dP| delta`` at the perturbed weights, plus, for the
  sphere, its common normalisation error ``rho`` times ``|dL/dP . s z|``
  (every draw is scaled by the same factor), plus `F64_SLACK`. Call inside
  `numerics.float64`. Returns the bound and the loss at the perturbed weights.
  """
  ref = perturbations.perturb(params, key, scale, distribution, mask)
  value, grad = jax.value_and_grad(loss64)(numerics.to_float64(ref))
  gap = _weight_gap(params, key, scale, distribution, mask, with_factor=False)
  grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(grad)]
  bound = sum(float(np.sum(np.abs(g) * d)) for g, d in zip(grads, jax.tree.leaves(gap)))
  if distribution == "sphere":
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    z = perturbations.sample_direction(key, as_f32, distribution, _static_mask(mask, params))
    along = sum(
      float(np.sum(g * np.asarray(zz, np.float64))) for g, zz in zip(grads, jax.tree.leaves(z))
    )
    bound += _sphere_factor_rtol(params, mask) * abs(float(scale) * along)
  return bound + F64_SLACK * (1 + abs(float(value))), float(value)


# ---------------------------------------------------------------------------
# value_at against perturb, output by output.


def _custom_jvp_times(n):
  @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
  def times(x, k):
    return x * k

  times.defjvp(lambda k, primals, tangents: (times(primals[0], k), tangents[0] * k))
  return lambda x: times(x, n)


@jax.custom_vjp
def _negate(x):
  return -x


_negate.defvjp(lambda x: (-x, None), lambda _, g: (-g,))


@jax.custom_vjp
def _product(x, y):
  return x * y


_product.defvjp(lambda x, y: (x * y, (x, y)), lambda res, g: (g * res[1], g * res[0]))

IDS = jnp.array([3, 5, 5, 127, -1, 0])
OOB_IDS = jnp.array([3, 200, -300, 7])


def _list(p):
  return p


# Scan bodies use their slice (w * 1.0): a body returning it as is would be
# forwarded by JAX around the scan, which the scan rule would then never see.


def _scan_slices(p):
  return lax.scan(lambda c, w: (c, w * 1.0), 0.0, p)[1]


def _scan_reverse(p):
  return lax.scan(lambda c, w: (c + 1.0, 2.0 * w), 0.0, p, reverse=True)[1]


def _scan_unroll(p):
  return lax.scan(lambda c, w: (c, -w), 0.0, p, unroll=2)[1]


def _scan_nested(p):
  inner = lambda c, w: (c, lax.scan(lambda c2, row: (c2, row * 1.0), 0.0, w)[1])
  return lax.scan(inner, 0.0, p)[1]


def _scan_of_reshape(p):
  return lax.scan(lambda c, w: (c, w * 1.0), 0.0, p.reshape(2 * p.shape[0], -1, p.shape[-1]))[1]


def _scan_with_plain_xs_and_remat(p):
  twos = jnp.full(p.shape, 2.0, p.dtype)
  body = jax.checkpoint(lambda c, x: (c, (x[0] * x[1], x[0])))
  return lax.scan(body, 0.0, (p, twos))[1]


def _map_transpose(p):
  return lax.map(lambda w: w.T, p)


def _gathers(e):
  return e[IDS], jnp.take(e, IDS, axis=0), e[jnp.array([7, 11])], e.at[IDS].get()


def _gather_out_of_bounds_nan(e):
  return jnp.take(e, OOB_IDS, axis=0)  # default mode: NaN rows, in both programs


def _gather_fill_value(e):
  # Out-of-bounds rows are the fill value itself, unperturbed (as for padding ids).
  return jnp.take(e, OOB_IDS, axis=0, mode="fill", fill_value=0.0), e.at[OOB_IDS].get(
    mode="fill", fill_value=0.0
  )


def _gather_clip_wrap(e):
  return jnp.take(e, OOB_IDS, axis=0, mode="clip"), jnp.take(e, OOB_IDS, axis=0, mode="wrap")


def _slices(w):
  return (w[:, : D // 2], w[10:20, 3:7], w[::2, 1::3], *jnp.split(w, 3, axis=1))


def _views(w):
  return (
    w.reshape(-1, D // 2).T,
    w.T.reshape(-1),
    w[::-1],
    w[None],
    jnp.broadcast_to(w, (2, *w.shape)),
    lax.dynamic_slice(w, (jnp.int32(90), jnp.int32(0)), (8, D)),  # start clamped to 88
    w.T[None, 2:5],
  )


def _nested_jit(w):
  return jax.jit(lambda q: (2.0 * q, q[:5], jax.jit(lambda r: r.T)(q)))(w)


def _remat(w):
  return jax.checkpoint(lambda q: (-q, q[3]))(w)


def _custom_jvp(w):
  return jax.nn.relu(w), _custom_jvp_times(4.0)(w)


def _custom_vjp(w):
  return _negate(w), _product(w, jnp.full_like(w, 2.0))


def _tied(e):
  return e[IDS], e.T, e


def _control_flow(p):
  w, b = p["w"], p["b"]
  pred = jnp.sum(b) > -1e9  # traced, from a small (eagerly perturbed) leaf
  n = jnp.int32(3) + (jnp.sum(b) > 1e9).astype(jnp.int32)  # a dynamic trip count: a while
  return (
    lax.cond(pred, lambda q: q, lambda q: -q, w),
    lax.fori_loop(0, 3, lambda i, q: 2.0 * q, w),
    lax.fori_loop(0, n, lambda i, q: 2.0 * q, w),
    b,
  )


def _mixed(p):
  return p


def _index_squeeze(p):
  return p[4], jnp.squeeze(p[:, :1], 1), p[..., 3], p[2, 5]


CASES = {
  # name: (params, value_fn, linear in the perturbed weights)
  "unrolled_list": (lambda: [_normal(i, (D, D)) for i in range(3)], _list, True),
  "scan_slices": (lambda: _normal(3, (4, D, D)), _scan_slices, True),
  "scan_reverse": (lambda: _normal(3, (4, D, D)), _scan_reverse, True),
  "scan_unroll2": (lambda: _normal(3, (4, D, D)), _scan_unroll, True),
  "scan_nested": (lambda: _normal(3, (4, D, D)), _scan_nested, True),
  "scan_of_reshape": (lambda: _normal(3, (4, D, D)), _scan_of_reshape, True),
  "scan_plain_xs_remat": (lambda: _normal(3, (4, D, D)), _scan_with_plain_xs_and_remat, True),
  "lax_map_transpose": (lambda: _normal(3, (4, D, D)), _map_transpose, True),
  "gather": (lambda: _normal(4, (128, D)), _gathers, True),
  "gather_out_of_bounds_nan": (lambda: _normal(4, (128, D)), _gather_out_of_bounds_nan, True),
  "gather_fill_value": (lambda: _normal(4, (128, D)), _gather_fill_value, True),
  "gather_clip_wrap": (lambda: _normal(4, (128, D)), _gather_clip_wrap, True),
  "slices_split": (lambda: _normal(5, (D, D)), _slices, True),
  "reshape_transpose_views": (lambda: _normal(5, (D, D)), _views, True),
  "nested_jit": (lambda: _normal(5, (D, D)), _nested_jit, True),
  "remat": (lambda: _normal(5, (D, D)), _remat, True),
  "custom_jvp": (lambda: _normal(5, (D, D)), _custom_jvp, False),
  "custom_vjp": (lambda: _normal(5, (D, D)), _custom_vjp, True),
  "tied_embedding_and_head": (lambda: _normal(4, (128, D)), _tied, True),
  "cond_fori_while": (
    lambda: {"w": _normal(5, (D, D)), "b": _normal(6, (D,))},
    _control_flow,
    True,
  ),
  "index_squeeze": (lambda: _normal(6, (8, 32, 32)), _index_squeeze, True),
}


def _mixed_params():
  return {
    "big": _normal(7, (D, D)),
    "stack": _normal(8, (2, D, D)),
    "small": _normal(9, (D,)),
    "tiny": _normal(10, (3, 3)),
    "frozen": _normal(11, (D, D)),
    "steps": jnp.arange(10_000, dtype=jnp.int32),
  }


MIXED_MASK = {
  "big": True,
  "stack": True,
  "small": True,
  "tiny": True,
  "frozen": False,
  "steps": False,
}


def _check_value_at(
  params, value_fn, distribution="gaussian", mask=None, scale=1e-3, linear=True, jit=True
):
  key = jax.random.key(17)

  def lazy(k, s):
    return perturb_at_use.value_at(value_fn, params, k, s, distribution, mask)

  def upfront(k, s):
    return value_fn(perturbations.perturb(params, k, s, distribution, mask))

  if jit:
    lazy, upfront = jax.jit(lazy), jax.jit(upfront)
  scale = jnp.float32(scale)
  got, want = lazy(key, scale), upfront(key, scale)
  gap = value_fn(
    jax.tree.map(
      lambda g: jnp.asarray(g, jnp.float32), _weight_gap(params, key, scale, distribution, mask)
    )
  )
  bound = jax.tree.map(lambda g: np.abs(np.asarray(g, np.float64)), gap)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
  _assert_within(got, want, bound, "value_at vs value_fn(perturb(...))")
  base = value_fn(params)
  _assert_moved(got, base, bound)
  if linear:
    # Also against the formula: value_fn(theta) + s value_fn(z), in float64.
    as_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    static = _static_mask(mask, params)
    z_out = value_fn(perturbations.sample_direction(key, as_f32, distribution, static))
    formula = jax.tree.map(
      lambda b, zz: (
        np.asarray(jnp.asarray(b, jnp.float32), np.float64)
        + float(scale) * np.asarray(jnp.asarray(zz, jnp.float32), np.float64)
      ),
      base,
      z_out,
    )
    _assert_within(got, formula, bound, "value_at vs theta + s z")


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_at_equals_perturb_then_value_fn(case):
  make, value_fn, linear = CASES[case]
  _check_value_at(make(), value_fn, linear=linear)


@pytest.mark.parametrize("distribution", zojax.DISTRIBUTIONS)
@pytest.mark.parametrize("case", ["scan_slices", "gather"])
def test_value_at_all_distributions(case, distribution):
  make, value_fn, linear = CASES[case]
  _check_value_at(make(), value_fn, distribution=distribution, linear=linear)


@pytest.mark.parametrize("distribution", zojax.DISTRIBUTIONS)
def test_value_at_small_masked_and_integer_leaves(distribution):
  params = _mixed_params()
  assert perturb_at_use.lazy_leaf_count(params, MIXED_MASK, distribution) == 2
  _check_value_at(params, _mixed, distribution=distribution, mask=MIXED_MASK)
  out = jax.jit(
    lambda: perturb_at_use.value_at(
      _mixed, params, jax.random.key(0), 1e-3, distribution, MIXED_MASK
    )
  )()
  np.testing.assert_array_equal(out["frozen"], params["frozen"])
  np.testing.assert_array_equal(out["steps"], params["steps"])


def test_value_at_callable_mask():
  params = _mixed_params()
  mask = lambda p: jax.tree.map(lambda x: x.dtype == jnp.float32 and x.shape != (D, D), p)
  _check_value_at(params, _mixed, mask=mask)


@pytest.mark.parametrize("case", ["unrolled_list", "scan_reverse"])
def test_value_at_bfloat16_leaves(case):
  # s = 0.1 moves a weight of ~0.1 by many bfloat16 ulps (2^-7 relative). (Not
  # float16: XLA's CPU backend cannot convert it under --xla_cpu_max_isa=SSE4_2.)
  make, value_fn, _ = CASES[case]
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make())
  assert perturb_at_use.lazy_leaf_count(params) == len(jax.tree.leaves(params))
  _check_value_at(params, value_fn, scale=0.1, linear=False)


def test_value_at_eager():
  params = {"w": _normal(3, (4, D, D)), "e": _normal(4, (128, D))}
  value_fn = lambda p: (_scan_slices(p["w"]), _gathers(p["e"]))
  _check_value_at(params, value_fn, jit=False)


def test_scan_slices_are_the_whole_leaf_draws():
  # Each iteration draws its slice from (leaf key, l * D * D + flat index):
  # the ys of a scan that returns its slices are the whole-leaf perturbation.
  stack = _normal(3, (5, D, D))
  key = jax.random.key(2)
  for reverse in (False, True):
    fn = lambda p: lax.scan(lambda c, w: (c, w * 1.0), 0.0, p, reverse=reverse)[1]
    got = jax.jit(lambda k: perturb_at_use.value_at(fn, stack, k, 1e-3))(key)
    whole = perturbations.perturb(stack, key, 1e-3)
    gap = _weight_gap(stack, key, 1e-3)
    _assert_within(got, whole, gap, f"scan slices (reverse={reverse})")
    _assert_moved(got, stack, gap)
    # And the slices differ from one another (not one slice's draw repeated).
    z = (np.asarray(got, np.float64) - np.asarray(stack, np.float64)) / 1e-3
    assert np.abs(np.corrcoef(z[0].ravel(), z[1].ravel())[0, 1]) < 0.05


def test_value_at_under_vmap_over_keys():
  params = {"w": _normal(3, (4, D, D)), "e": _normal(4, (128, D)), "b": _normal(6, (D,))}
  value_fn = lambda p: (_scan_slices(p["w"]), p["e"][IDS], p["b"])
  query_keys = jax.random.split(jax.random.key(5), 3)
  scales = jnp.array([1e-3, -1e-3, 2e-3], jnp.float32)
  got = jax.jit(jax.vmap(lambda k, s: perturb_at_use.value_at(value_fn, params, k, s)))(
    query_keys, scales
  )
  want = jax.jit(jax.vmap(lambda k, s: value_fn(perturbations.perturb(params, k, s))))(
    query_keys, scales
  )
  for i in range(3):
    gap = value_fn(
      jax.tree.map(
        lambda g: jnp.asarray(g, jnp.float32), _weight_gap(params, query_keys[i], scales[i])
      )
    )
    pick = lambda t, i=i: jax.tree.map(lambda x: x[i], t)
    _assert_within(pick(got), pick(want), gap, f"vmap entry {i}")
    _assert_moved(pick(got), value_fn(params), gap)


# ---------------------------------------------------------------------------
# Losses: float32 weights, float64 arithmetic, first-order bound.


def _unrolled_mlp():
  params = {
    "layers": [_normal(20 + i, (D, D), 1 / np.sqrt(D)) for i in range(3)],
    "bias": _normal(24, (D,)),
  }

  def loss(p, x):
    h = x
    for w in p["layers"]:
      h = jnp.tanh(h @ w.astype(jnp.float64) + p["bias"].astype(jnp.float64))
    return jnp.mean(h**2)

  return params, loss, None


def _scanned_lm():
  """Embedding lookup, scanned remat layers (gelu, relu), tied head, cross-entropy."""
  params = {
    "embed": _normal(30, (128, D), 1.0),
    "layers": _normal(31, (3, D, D), 1 / np.sqrt(D)),
    "out": [_normal(32, (D, D), 1 / np.sqrt(D))],
    "norm": jnp.ones((D,), jnp.float32),
  }
  batch = (jnp.array([1, 5, 9, 127]), jnp.array([2, 3, 4, 5]))

  def loss(p, batch):
    ids, labels = batch
    embed = p["embed"]
    h = embed[ids].astype(jnp.float64)

    @jax.checkpoint
    def layer(h, w):
      h = h + jax.nn.gelu(h @ w.astype(jnp.float64))
      return h * p["norm"].astype(jnp.float64) / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True)), None

    h, _ = lax.scan(layer, h, p["layers"])
    h = jax.nn.relu(h @ p["out"][0].astype(jnp.float64))
    logits = h @ embed.T.astype(jnp.float64) / np.sqrt(D)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  return params, loss, batch


def _fallback_model():
  """Weights through a cond and a while loop: perturbed there, not lazily."""
  params = {"w": _normal(40, (D, D), 1 / np.sqrt(D)), "b": _normal(41, (D,))}

  def loss(p, x):
    w = lax.cond(jnp.sum(x) > -1e9, lambda q: q, lambda q: -q, p["w"])
    h = lax.fori_loop(
      0, jnp.int32(2) + (jnp.sum(x) > 1e9), lambda i, h: jnp.tanh(h @ w.astype(jnp.float64)), x
    )
    return jnp.mean((h + p["b"].astype(jnp.float64)) ** 2)

  return params, loss, None


MODELS = {"unrolled_mlp": _unrolled_mlp, "scanned_lm": _scanned_lm, "fallback": _fallback_model}


def _model(name, dtype=jnp.float32):
  params, loss, data = MODELS[name]()
  if data is None:
    data = _normal(25, (4, D), 1.0, jnp.float64)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  return params, loss, data


@pytest.mark.parametrize(
  ("model", "distribution"),
  [("scanned_lm", d) for d in zojax.DISTRIBUTIONS]
  + [("unrolled_mlp", "gaussian"), ("fallback", "sphere")],
)
def test_loss_value_at_equals_perturb(model, distribution):
  with numerics.float64():
    params, loss, data = _model(model)
    key = jax.random.key(3)
    # The batch reaches value_at as a traced argument, closed over by the loss.
    lazy = jax.jit(
      lambda p, d, k, s: perturb_at_use.value_at(lambda q: loss(q, d), p, k, s, distribution)
    )
    upfront = jax.jit(lambda p, d, k, s: loss(perturbations.perturb(p, k, s, distribution), d))
    # s = 1e-2: the loss moves by ~s |dL . z|, the bound is ~u sum |dL| |P|.
    for scale in (1e-2, -1e-2):
      s = jnp.float32(scale)
      got, want = float(lazy(params, data, key, s)), float(upfront(params, data, key, s))
      bound, ref = _loss_gap(lambda q: loss(q, data), params, key, s, distribution)
      assert abs(got - want) <= bound, (got, want, bound)
      assert abs(want - ref) <= bound
      # Not vacuous: the perturbation changes the loss by far more than the bound,
      # so a mistake worth 1/30 of the perturbation's effect would be caught.
      moved = abs(got - float(loss(params, data)))
      assert moved > 30 * bound, f"loss moved {moved:.3g}, bound {bound:.3g}"


def test_loss_value_at_bfloat16_leaves():
  with numerics.float64():
    params, loss, data = _model("scanned_lm", jnp.bfloat16)
    assert perturb_at_use.lazy_leaf_count(params) == 3
    key, s = jax.random.key(4), jnp.float32(0.05)
    got = jax.jit(lambda p, k: perturb_at_use.value_at(lambda q: loss(q, data), p, k, s))(
      params, key
    )
    want = jax.jit(lambda p, k: loss(perturbations.perturb(p, k, s), data))(params, key)
    bound, _ = _loss_gap(lambda q: loss(q, data), params, key, s)
    assert abs(float(got) - float(want)) <= bound
    assert abs(float(got) - float(loss(params, data))) > 10 * bound


# ---------------------------------------------------------------------------
# zo_grad: perturb_at_use=True against False.


def _zo_bounds(
  loss64, params, state_key, count, num_queries, eps, estimator, distribution, mask=None
):
  """Per-query bounds on |c_i(True) - c_i(False)| (before float32 storage)."""
  step_key = keys.step_key(state_key, count)
  out = []
  for i in range(num_queries):
    qkey = keys.query_key(step_key, i)
    plus, _ = _loss_gap(loss64, params, qkey, jnp.float32(eps), distribution, mask)
    if estimator == "two_sided":
      minus, _ = _loss_gap(loss64, params, qkey, jnp.float32(-eps), distribution, mask)
      out.append((plus + minus) / (2 * eps))
    else:
      # The baseline theta + 0 z is theta exactly in both programs.
      value = float(loss64(numerics.to_float64(params)))
      out.append((plus + F64_SLACK * (1 + abs(value))) / eps)
  return np.asarray(out), step_key


def _assert_zo_close(
  loss64,
  params,
  state_t,
  state_f,
  upd_t,
  upd_f,
  num_queries,
  eps,
  estimator,
  distribution="gaussian",
  mask=None,
  count=0,
):
  c_t = np.asarray(state_t.projected_grads, np.float64)
  c_f = np.asarray(state_f.projected_grads, np.float64)
  bound_c, step_key = _zo_bounds(
    loss64, params, state_t.key, count, num_queries, eps, estimator, distribution, mask
  )
  bound_c = bound_c + U32 * (np.abs(c_t) + np.abs(c_f))  # both stored in float32
  assert np.all(np.abs(c_t - c_f) <= bound_c), (c_t, c_f, bound_c)
  # Not vacuous: the bound is far below a typical |c_i|, the gradient's norm.
  grad = jax.grad(loss64)(numerics.to_float64(params))
  flags = perturbations.resolve_mask(mask, params)
  grad_norm = np.sqrt(
    sum(float(np.sum(np.asarray(g) ** 2)) for g, f in zip(jax.tree.leaves(grad), flags) if f)
  )
  assert np.max(bound_c) < grad_norm / 100, (bound_c, grad_norm)
  bound_g = _update_bound(params, step_key, c_t, bound_c, num_queries, distribution, mask)
  _assert_within(upd_t, upd_f, bound_g, "zo_grad updates")


# Every (estimator, num_queries, vectorize), each on one model; each model sees
# both values of every option (a half fraction of the 16 combinations).
ZO_CONFIGS = [
  (
    estimator,
    num_queries,
    vectorize,
    "unrolled_mlp"
    if ((estimator == "one_sided") + (num_queries == 3) + vectorize) % 2 == 0
    else "scanned_lm",
  )
  for estimator in estimators.ESTIMATORS
  for num_queries in (1, 3)
  for vectorize in (False, True)
]


@pytest.mark.parametrize(("estimator", "num_queries", "vectorize", "model"), ZO_CONFIGS)
def test_zo_grad_at_use_matches_up_front(estimator, num_queries, vectorize, model):
  # eps = 1e-2: the bound on c is ~ 4u sum |dL| |P| / eps, the signal ~ |dL . z|.
  eps = 1e-2
  with numerics.float64():
    params, loss, data = _model(model)
    results = []
    for at_use in (True, False):
      tx = zojax.zo_grad(
        num_queries=num_queries,
        eps=eps,
        estimator=estimator,
        vectorize=vectorize,
        key=11,
        perturb_at_use=at_use,
      )
      step = jax.jit(lambda p, s, d, tx=tx: tx.update(None, s, p, value_fn=lambda q: loss(q, d)))
      results.append(step(params, tx.init(params), data))
    (upd_t, state_t), (upd_f, state_f) = results
    _assert_zo_close(
      lambda q: loss(q, data), params, state_t, state_f, upd_t, upd_f, num_queries, eps, estimator
    )
    np.testing.assert_allclose(state_t.loss, state_f.loss, rtol=1e-6)


def test_zo_grad_sphere_and_mask():
  mask = {"embed": True, "layers": True, "out": [False], "norm": True}
  with numerics.float64():
    params, loss, data = _model("scanned_lm")
    results = []
    for at_use in (True, False):
      tx = zojax.zo_grad(
        num_queries=2, eps=1e-2, distribution="sphere", mask=mask, key=3, perturb_at_use=at_use
      )
      step = jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, value_fn=lambda q: loss(q, data)))
      results.append(step(params, tx.init(params)))
    (upd_t, state_t), (upd_f, state_f) = results
    _assert_zo_close(
      lambda q: loss(q, data),
      params,
      state_t,
      state_f,
      upd_t,
      upd_f,
      2,
      1e-2,
      "two_sided",
      "sphere",
      mask,
    )
    np.testing.assert_array_equal(upd_t["out"][0], 0.0)


# ---------------------------------------------------------------------------
# Presets over several steps, each step from the same state in both modes.


def _preset_model():
  """0.5 ||W - T||^2 in float64 over a scanned stack, gathered embedding rows and a list."""
  params = {
    "stack": _normal(50, (2, D, D), 0.1),
    "embed": _normal(51, (128, D), 0.1),
    "dense": [_normal(52, (D, D), 0.1)],
    "bias": _normal(53, (D,), 0.1),
  }
  target = jax.tree.map(lambda x: np.asarray(x, np.float64) + 0.3, params)
  ids = np.arange(0, 128, 2)

  def loss(p):
    acc, _ = lax.scan(
      lambda a, wt: (a + 0.5 * jnp.sum((wt[0].astype(jnp.float64) - wt[1]) ** 2), None),
      jnp.zeros((), jnp.float64),
      (p["stack"], jnp.asarray(target["stack"])),
    )
    rows = p["embed"][ids].astype(jnp.float64) - target["embed"][ids]
    acc = acc + 0.5 * jnp.sum(rows**2)
    for w, t in [(p["dense"][0], target["dense"][0]), (p["bias"], target["bias"])]:
      acc = acc + 0.5 * jnp.sum((w.astype(jnp.float64) - t) ** 2)
    return acc

  return params, loss


def _force_up_front(monkeypatch):
  """Makes the presets build zo_grad(perturb_at_use=False)."""
  original = estimators.zo_grad

  def up_front(*args, **kwargs):
    return original(*args, **{**kwargs, "perturb_at_use": False})

  monkeypatch.setattr(presets, "zo_grad", up_front)


def _find_states(state, kind):
  """The states of type ``kind`` inside a (nested) preset state, in order."""
  found = []

  def visit(x):
    if isinstance(x, kind):
      found.append(x)
    elif isinstance(x, (tuple, list)):
      for y in x:
        visit(y)

  visit(state)
  return found


def _update_bound(tree, step_key, c, bound_c, num_queries, distribution="gaussian", mask=None):
  """Bound on |g_a - g_b| for ``g = (1/N) sum_i c_i z_i`` drawn and summed in float32."""
  k = _draw_rtol(distribution, tree, mask)
  bound = jax.tree.map(lambda x: np.zeros(np.shape(x)), tree)
  for i in range(num_queries):
    z = perturbations.sample_direction(keys.query_key(step_key, i), tree, distribution, mask)
    bound = jax.tree.map(
      lambda acc, zz: (
        acc
        + np.abs(np.asarray(zz, np.float64))
        * (bound_c[i] + abs(c[i]) * (k + 2 * (num_queries + 3) * U32))
        / num_queries
      ),
      bound,
      z,
    )
  return bound


def _lift_to_leaf(c, q, leaf_shape, layout):
  """``C Q^T`` (per slice for "stacked") in a leaf's own layout, float64 numpy."""
  m = np.matmul(c, np.swapaxes(q, -1, -2))
  return (m.T if layout == "transposed" else m).reshape(leaf_shape)


def _subspace_loss_gap(loss64, params, bases, coords, key, scale, layouts):
  """`_loss_gap` for ``W = W0 + C Q^T`` (zo_muon): C perturbed, then lifted in float32.

  Two programs' C differ by ``delta_C`` (`_weight_gap`); their lifted
  weights by ``delta_C |Q|^T + 2 r u |C| |Q|^T + 4u (|W0| + |C| |Q|^T)`` (a
  float32 matmul over the rank, then the addition). Bases are inputs of the
  step (no refresh), equal in both. ``layouts`` says per leaf how the lift
  lands in the leaf: "plain", "transposed" (output axis first) or "stacked"
  (a batch of slices).
  """
  c_ref = perturbations.perturb(coords, key, scale)
  c_gap = jax.tree.leaves(_weight_gap(coords, key, scale))
  leaves, treedef = jax.tree.flatten(params)
  weights, gaps = [], []
  for w0, c, dc, q, layout in zip(leaves, jax.tree.leaves(c_ref), c_gap, bases, layouts):
    if isinstance(q, tuple):  # full space: perturbed as a leaf of its own
      weights.append(np.asarray(c, np.float64).reshape(w0.shape))
      gaps.append(np.asarray(dc).reshape(w0.shape))
      continue
    q = np.asarray(q, np.float64)
    c = np.asarray(c, np.float64)
    r = q.shape[-1]
    w0 = np.asarray(w0, np.float64)
    lifted = _lift_to_leaf(c, q, w0.shape, layout)
    mag = _lift_to_leaf(np.abs(c), np.abs(q), w0.shape, layout)
    weights.append(w0 + lifted)
    gaps.append(
      _lift_to_leaf(np.asarray(dc), np.abs(q), w0.shape, layout)
      + 2 * r * U32 * mag
      + 4 * U32 * (np.abs(w0) + mag)
    )
  value, grad = jax.value_and_grad(loss64)(
    jax.tree.unflatten(treedef, [jnp.asarray(w) for w in weights])
  )
  bound = sum(float(np.sum(np.abs(np.asarray(g)) * d)) for g, d in zip(jax.tree.leaves(grad), gaps))
  return bound + F64_SLACK * (1 + abs(float(value)))


def _preset_bounds(preset, loss, params, before, after, eps, num_queries):
  """Per-query bounds on |c_i(at use) - c_i(up front)| of one preset step, and the tree
  (with its step key) the estimate's directions are drawn on."""
  zs_before = _find_states(before, estimators.ZOGradState)
  zs_after = _find_states(after, estimators.ZOGradState)
  (active,) = [i for i, (a, b) in enumerate(zip(zs_before, zs_after)) if b.count != a.count]
  zs = zs_before[active]
  step_key = keys.step_key(zs.key, zs.count)
  if preset == "mezo":
    bounds, _ = _zo_bounds(
      loss, params, zs.key, zs.count, num_queries, eps, "two_sided", "gaussian"
    )
    return bounds, params, step_key, active
  if preset == "mezo_bcd":
    # Block `active` is the active-th top-level entry (sorted keys); the inner
    # estimator sees the tree with None in place of every other block's leaves.
    name = sorted(params)[active]
    sub = {k: (v if k == name else jax.tree.map(lambda _: None, v)) for k, v in params.items()}
    merge = lambda s: {k: (s[k] if k == name else params[k]) for k in params}
    bounds, _ = _zo_bounds(
      lambda s: loss(merge(s)), sub, zs.key, zs.count, num_queries, eps, "two_sided", "gaussian"
    )
    return bounds, sub, step_key, active
  # zo_muon, one-sided: c_i = (L(C = eps z_i) - L(C = 0)) / eps; the baseline is W0 exactly.
  (sub_state,) = _find_states(after, zojax.SubspaceState)
  bases = list(sub_state.bases)
  layouts = [PRESET_LAYOUTS.get(preset, {}).get(name, "plain") for name in _leaf_names(params)]

  def coord(leaf, q, layout):
    if isinstance(q, tuple):  # full space, flattened when it has two or more axes
      return leaf.reshape(-1) if leaf.ndim >= 2 else leaf
    if layout == "stacked":
      return jnp.zeros((leaf.shape[0], leaf.shape[1], q.shape[-1]), jnp.float32)
    fan_in = leaf.shape[1] if layout == "transposed" else np.prod(leaf.shape[:-1])
    return jnp.zeros((fan_in, q.shape[-1]), jnp.float32)

  coords = jax.tree.unflatten(
    jax.tree.structure(params),
    [coord(leaf, q, lay) for leaf, q, lay in zip(jax.tree.leaves(params), bases, layouts)],
  )
  value = float(loss(numerics.to_float64(params)))
  bounds = np.asarray(
    [
      (
        _subspace_loss_gap(
          loss, params, bases, coords, keys.query_key(step_key, i), jnp.float32(eps), layouts
        )
        + F64_SLACK * (1 + abs(value))
      )
      / eps
      for i in range(num_queries)
    ]
  )
  return bounds, coords, step_key, active


def _leaf_names(params):
  return [jax.tree_util.keystr(path[:1]) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


# The preset model's matrix views as the LM example gives them: stacked layers one matrix per
# slice, the embedding table with its output axis first, the bias not a matrix.
LM_DIMS = {
  "stack": MuonDimensionNumbers(reduction_axis=1, output_axis=2),
  "embed": MuonDimensionNumbers(reduction_axis=1, output_axis=0),
  "dense": [MuonDimensionNumbers(reduction_axis=0, output_axis=1)],
  "bias": None,
}
PRESET_LAYOUTS = {"zo_muon_lm": {"['stack']": "stacked", "['embed']": "transposed"}}


PRESETS = {
  "mezo": lambda: zojax.mezo(1e-2, eps=1e-2, weight_decay=0.1, num_queries=2, key=1),
  "zo_muon": lambda: zojax.zo_muon(
    1e-2, rank=64, refresh_every=None, num_queries=2, eps=1e-2, key=1
  ),
  "zo_muon_lm": lambda: zojax.zo_muon(
    1e-2,
    rank=8,
    refresh_every=None,
    num_queries=2,
    eps=1e-2,
    weight_dimension_numbers=LM_DIMS,
    key=1,
  ),
  "mezo_bcd": lambda: zojax.mezo_bcd(1e-2, eps=1e-2, switch_every=1, order="ascending", key=1),
}
PRESET_QUERIES = {"mezo": 2, "zo_muon": 2, "zo_muon_lm": 2, "mezo_bcd": 1}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_at_use_match_up_front_over_steps(preset, monkeypatch):
  # Two steps; each from the at-use run's state, taken by both modes. Their
  # scalars c_i must agree within the bound of the losses divided by eps; the
  # updates are linear in c for mezo and mezo_bcd (bound: lr |dg| plus the
  # float32 rounding of the decay and scaling); zo_muon orthogonalizes with
  # five Newton-Schulz steps, whose slope is at most 3.4445 each (< 500 in
  # all) on the normalised input, and whose own float32 rounding on a
  # 64 x 96 matrix is at most ~3e-3 relative: a 1% tolerance after a
  # relative change rho of c (a wrong perturbation changes the update by O(1)).
  eps, num_steps, lr = 1e-2, 2, 1e-2
  num_queries = PRESET_QUERIES[preset]
  calls = []
  original_value_at = perturb_at_use.value_at

  def counting_value_at(*args, **kwargs):
    calls.append(1)
    return original_value_at(*args, **kwargs)

  monkeypatch.setattr(perturb_at_use, "value_at", counting_value_at)
  with numerics.float64():
    params, loss = _preset_model()
    tx_t = PRESETS[preset]()
    with monkeypatch.context() as m:
      _force_up_front(m)
      tx_f = PRESETS[preset]()
    step_t = jax.jit(lambda p, s: tx_t.update(None, s, p, value_fn=loss))
    step_f = jax.jit(lambda p, s: tx_f.update(None, s, p, value_fn=loss))
    state = tx_t.init(params)
    calls.clear()
    jax.eval_shape(step_f, params, state)
    assert not calls, "the up-front preset still perturbs at use"
    jax.eval_shape(step_t, params, state)
    assert calls, "the default preset does not perturb at use"
    grad_norm = float(
      np.sqrt(
        sum(
          np.sum(np.asarray(g) ** 2)
          for g in jax.tree.leaves(jax.grad(loss)(numerics.to_float64(params)))
        )
      )
    )
    for t in range(num_steps):
      upd_t, new_t = step_t(params, state)
      upd_f, new_f = step_f(params, state)
      bounds, tree, step_key, active = _preset_bounds(
        preset, loss, params, state, new_t, eps, num_queries
      )
      c_t = np.asarray(
        _find_states(new_t, estimators.ZOGradState)[active].projected_grads, np.float64
      )
      c_f = np.asarray(
        _find_states(new_f, estimators.ZOGradState)[active].projected_grads, np.float64
      )
      c_bound = bounds + U32 * (np.abs(c_t) + np.abs(c_f))
      assert np.all(np.abs(c_t - c_f) <= c_bound), (t, c_t, c_f, c_bound)
      # Not vacuous: the bound is far below a typical |c_i| (~ the gradient's norm),
      # so a mistake worth 1/30 of it would be caught.
      assert np.max(c_bound) < grad_norm / 30, (c_bound, grad_norm)
      flat = lambda tree: np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
      )
      if preset.startswith("zo_muon"):
        rho = float(np.max(c_bound / np.abs(c_t)))
        diff = np.linalg.norm(flat(upd_t) - flat(upd_f))
        assert diff <= (500 * rho + 1e-2) * np.linalg.norm(flat(upd_t)), (diff, rho)
      else:
        g_bound = _update_bound(tree, step_key, c_t, c_bound, num_queries)
        g_full = (
          g_bound
          if preset == "mezo"
          else {
            k: (
              g_bound[k]
              if k == sorted(params)[active]
              else jax.tree.map(np.zeros_like, _f32(params[k]))
            )
            for k in params
          }
        )
        decay = 0.1 if preset == "mezo" else 0.0
        tol = jax.tree.map(
          lambda g, u, p: lr * g + 6 * U32 * (2 * np.abs(u) + 2 * lr * decay * np.abs(p)),
          g_full,
          _f32(upd_t),
          _f32(params),
        )
        _assert_within(upd_t, upd_f, tol, f"{preset} updates, step {t}")
      assert np.linalg.norm(flat(upd_t)) > 0
      params = optax.apply_updates(params, upd_t)
      state = new_t


# ---------------------------------------------------------------------------
# Memory: XLA's buffer assignment of a donated MeZO step (deterministic).

MEM_LAYERS, MEM_WIDTH, MEM_BATCH = 8, 512, 4


def _scanned_loss(p, x):
  h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
  return jnp.mean(h**2)


def _unrolled_loss(p, x):
  h = x
  for w in p["w"]:
    h = jnp.tanh(h @ w)
  return jnp.mean(h**2)


def _step_temp_fraction(loss, params, at_use, tx=None):
  if tx is None:
    tx = optax.chain(zojax.zo_grad(perturb_at_use=at_use), optax.scale_by_learning_rate(1e-3))

  def step(params, state, x):
    updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, params)
  x = jax.ShapeDtypeStruct((MEM_BATCH, MEM_WIDTH), jnp.float32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  weights = sum(np.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(params))
  return compiled.memory_analysis().temp_size_in_bytes / weights


MEM_MODELS = {
  "scanned": (
    _scanned_loss,
    {"w": jax.ShapeDtypeStruct((MEM_LAYERS, MEM_WIDTH, MEM_WIDTH), jnp.float32)},
  ),
  "unrolled": (
    _unrolled_loss,
    {"w": [jax.ShapeDtypeStruct((MEM_WIDTH, MEM_WIDTH), jnp.float32)] * MEM_LAYERS},
  ),
}


@pytest.mark.parametrize("model", sorted(MEM_MODELS))
def test_step_memory_at_use_is_below_a_weight_copy(model):
  # One layer is 1/8 = 0.125 of the weights: perturbing at use may hold the
  # layer an operation reads (and the activations, ~1e-3), not a copy of the
  # stack; up front, XLA holds a perturbed copy of every weight.
  loss, params = MEM_MODELS[model]
  at_use = _step_temp_fraction(loss, params, True)
  up_front = _step_temp_fraction(loss, params, False)
  assert up_front > 0.9, up_front
  assert at_use < 0.25, f"temp = {at_use:.4f} of the weights (up front: {up_front:.4f})"


@pytest.mark.parametrize("model", sorted(MEM_MODELS))
def test_zo_muon_step_memory_is_below_a_weight_copy(model):
  # ZO-Muon with one matrix per layer (the stacked layers' axis a batch axis):
  # each perturbed layer is formed from its low-rank factors where it is used
  # (inside the scan body for stacked layers), and the update is formed in
  # each leaf's own layout, so the step holds a few layers (one layer is 1/8:
  # the low-rank product, the perturbed layer, the next one), not a copy (1.0).
  loss, params = MEM_MODELS[model]
  dims = {"w": MuonDimensionNumbers(1, 2)} if model == "scanned" else None
  tx = zojax.zo_muon(1e-2, rank=8, num_queries=2, refresh_every=None, weight_dimension_numbers=dims)
  at_use = _step_temp_fraction(loss, params, True, tx)
  assert at_use < 0.45, f"temp = {at_use:.4f} of the weights"


# ---------------------------------------------------------------------------
# Which leaves are lazy.


def test_lazy_leaf_count():
  params = {
    "f32": jnp.zeros((D, D)),
    "bf16": jnp.zeros((D, D), jnp.bfloat16),
    "bf16_row": jnp.zeros((8192,), jnp.bfloat16),  # exactly GROUP_BELOW entries
    "below": jnp.zeros((8191,)),
    "small": jnp.zeros((3, 3)),
    "masked": jnp.zeros((D, D)),
    "ints": jnp.zeros((D, D), jnp.int32),
  }
  mask = {k: k not in ("masked", "ints") for k in params}
  assert perturbations.GROUP_BELOW == 8192
  for distribution in zojax.DISTRIBUTIONS:
    assert perturb_at_use.lazy_leaf_count(params, mask, distribution) == 3
  assert perturb_at_use.lazy_leaf_count(params, lambda p: mask) == 3
  everything = {k: v for k, v in params.items() if k != "ints"}
  assert perturb_at_use.lazy_leaf_count(everything) == 4
  with numerics.float64():
    # float64 leaves draw with jax.random: never lazy.
    assert perturb_at_use.lazy_leaf_count({"w": jnp.zeros((D, D), jnp.float64)}) == 0
    assert perturb_at_use.lazy_leaf_count({"w": jnp.zeros((D, D), jnp.float32)}) == 1


def _sub_jaxprs(values):
  for v in values:
    if isinstance(v, jex_core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jex_core.Jaxpr):
      yield v
    elif isinstance(v, (tuple, list)):
      yield from _sub_jaxprs(v)


def _draw_placement(jaxpr):
  """(draws at the top level, draws inside a scan body) of a jaxpr: erf_inv ops."""
  top, inside = 0, 0

  def visit(j, in_scan):
    nonlocal top, inside
    for eqn in j.eqns:
      if eqn.primitive.name == "erf_inv":
        if in_scan:
          inside += 1
        else:
          top += 1
      for sub in _sub_jaxprs(eqn.params.values()):
        visit(sub, in_scan or eqn.primitive.name == "scan")

  visit(jaxpr.jaxpr, False)
  return top, inside


def test_lazy_leaves_are_drawn_inside_the_scan():
  # A counted leaf is drawn in the body of the scan that consumes it (one
  # layer per iteration); a leaf below GROUP_BELOW is drawn before the loop.
  fn = lambda p: _scanned_loss(p, jnp.ones((2, p["w"].shape[-1])))
  for shape, lazy in [((4, D, D), True), ((4, 40, 40), False)]:
    params = {"w": _normal(3, shape)}
    assert perturb_at_use.lazy_leaf_count(params) == int(lazy)
    jaxpr = jax.make_jaxpr(lambda p, k: perturb_at_use.value_at(fn, p, k, 1e-3))(
      params, jax.random.key(0)
    )
    top, inside = _draw_placement(jaxpr)
    if lazy:
      assert top == 0 and inside > 0, (top, inside)
    else:
      assert top > 0 and inside == 0, (top, inside)


def test_subspace_coordinates_of_stacked_layers_are_drawn_inside_the_scan():
  # ZO-Muon on stacked layers (one basis per slice, side="out"): the
  # perturbation of slice i is W_i + (f C_i) P_i^T with C the drawn
  # coordinates. f C stays a draw (`perturb_at_use.scaled`) and P_i^T a view
  # (`perturb_at_use.transposed`), so the scan body draws one slice's
  # coordinates and transposes one slice's basis per iteration; before, the
  # whole stack of each was formed before the loop (two coordinate-sized
  # copies of every matrix held through the forward).
  layers, width = 4, 128
  params = {"w": _normal(3, (layers, width, width))}
  fn = lambda p: _scanned_loss(p, jnp.ones((2, width)))
  tx = zojax.subspace(
    zojax.zo_grad(num_queries=1, key=1),
    rank=80,  # width x 80 coordinates per slice: a lazy draw (>= GROUP_BELOW)
    refresh_every=None,
    weight_dimension_numbers={"w": MuonDimensionNumbers(1, 2)},
    key=2,
  )
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(None, s, p, value_fn=fn))(params, state)

  def placement(j, depth=0, found=None):
    # erf_inv (a Gaussian draw) and transposes of the whole basis stack, by
    # scan depth: 0 the step, 1 the queries' loop (a lax.map), 2 the model's scan.
    found = collections.Counter() if found is None else found
    for eqn in j.eqns:
      if eqn.primitive.name == "erf_inv":
        found["draw", depth] += 1
      if eqn.primitive.name == "transpose" and eqn.outvars[0].aval.shape == (layers, 80, width):
        found["stack transpose", depth] += 1
      inner = depth + (eqn.primitive.name == "scan")
      for sub in _sub_jaxprs(eqn.params.values()):
        placement(sub, inner, found)
    return found

  found = placement(jaxpr.jaxpr)
  # The forwards draw one slice per iteration of the model's scan; the only
  # other draw is the estimate's combine after the forwards, and the only
  # transpose of the basis stack the update's lift.
  assert found["draw", 2] > 0 and found["draw", 1] == 0 and found["draw", 0] == 1, found
  assert found["stack transpose", 1] == 0 and found["stack transpose", 0] <= 1, found
