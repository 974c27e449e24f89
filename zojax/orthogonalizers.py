"""Orthogonalization of matrix-shaped updates: Newton-Schulz, SVD polar factor, power iteration.

`orthogonalize` is an optax transform that replaces every matrix-shaped leaf
``G`` of the updates by an (approximately) orthogonal matrix with the same
dominant singular vectors, and passes vectors and scalars through:

* ``"newton_schulz"``: Muon's quintic Newton-Schulz iteration (Jordan et al.;
  optax.contrib.muon), ``NS5(G) ~= U S' V^T`` with ``S'`` in a band around 1;
* ``"svd"``: the exact polar factor ``msign(G) = U V^T`` of the thin SVD
  ``G = U S V^T`` (ZO-Muon's ``muon_svd``, arXiv 2602.17155);
* ``"power_iteration"``: ZO-MOPI's partial orthogonalization (arXiv
  2605.09034), one warm-started block power-iteration sweep per update giving
  the rank-``k`` ``U_k V_k^T``.

Leaves that are "really matrices" (conv kernels, stacked heads) are mapped to
a batch of matrices and back by `matrix_view`, configured with optax.contrib's
`MuonDimensionNumbers`; the single-matrix forms `newton_schulz`, `polar_svd`
and `power_iteration_step` are public so that other modules (e.g. a subspace
method orthogonalizing its small ``r x n`` factor) can call them directly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib as optax_contrib
from optax.contrib import MuonDimensionNumbers

from zojax import _deprecations, eager, fastrandom, hyperparams
from zojax import keys as keys_lib

try:  # Exported from optax.contrib in newer releases; optax 0.2.8 keeps it in _muon.
  _optax_newton_schulz = optax_contrib.orthogonalize_via_newton_schulz
except AttributeError:  # pragma: no cover - depends on the optax version
  from optax.contrib._muon import orthogonalize_via_newton_schulz as _optax_newton_schulz

METHODS = ("newton_schulz", "svd", "power_iteration")
DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Singular values of `newton_schulz` (default coefficients, 5 steps) lie in this band for every
# input singular value sigma with sigma / ||G||_F >= 1e-3 (measured on the iterated scalar map
# p(s) = a s + b s^3 + c s^5 in float32: min 0.4705 at 1e-3, max 1.2024 over all of (0, 1]).
NS_SINGULAR_VALUE_BAND = (0.47, 1.21)

DimensionNumbers = (
  MuonDimensionNumbers | optax.Params | Callable[[optax.Params], optax.Params | None] | None
)

__all__ = [
  "DEFAULT_NS_COEFFS",
  "METHODS",
  "NS_SINGULAR_VALUE_BAND",
  "MuonDimensionNumbers",
  "PowerIterationState",
  "default_dimension_numbers",
  "matrix_view",
  "newton_schulz",
  "orthonormalize_columns",
  "orthogonalize",
  "polar_svd",
  "power_iteration_step",
  "random_orthonormal",
  "resolve_dimension_numbers",
]


class PowerIterationState(NamedTuple):
  """State of `orthogonalize` with ``method="power_iteration"``.

  Attributes:
    v: a pytree with the structure of the params: for each matrix leaf, the
      warm-start right basis ``V`` of shape ``(batch, fan_in, k)`` in float32
      (``batch`` = product of the leaf's batch axes, 1 for a plain matrix;
      ``fan_in`` = product of its reduction axes), with orthonormal columns;
      None for leaves that pass through.
  """

  v: Any


# ----------------------------------------------------------------------------- matrix view


def default_dimension_numbers(x: chex.Array) -> MuonDimensionNumbers | None:
  """The default matrix view of a leaf: None (pass through) below two dimensions.

  ``ndim == 2``: reduction axis 0, output axis 1 (a flax ``(in, out)`` kernel).
  ``ndim > 2``: reduction axes all but the last, output axis the last (e.g. a
  conv ``HWIO`` kernel is viewed as ``(H*W*I, O)``).
  """
  if jnp.ndim(x) < 2:
    return None
  if x.ndim == 2:
    return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
  return MuonDimensionNumbers(reduction_axis=tuple(range(x.ndim - 1)), output_axis=x.ndim - 1)


def _is_dim_nums_leaf(x) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def _is_dimension_numbers_tree(x) -> bool:
  """A pytree of numbers / None, even if callable (an Equinox module is: `zojax.layouts`)."""
  leaves = jax.tree.leaves(x, is_leaf=_is_dim_nums_leaf)
  return bool(leaves) and all(_is_dim_nums_leaf(leaf) for leaf in leaves)


def _check_dimension_numbers_tree(tree) -> None:
  for leaf in jax.tree.leaves(tree, is_leaf=_is_dim_nums_leaf):
    if not _is_dim_nums_leaf(leaf):
      raise TypeError(
        "weight_dimension_numbers must be None, a MuonDimensionNumbers, a pytree of "
        "MuonDimensionNumbers / None, or a callable returning one; found an entry "
        f"{leaf!r} of type {type(leaf).__name__}."
      )


def resolve_dimension_numbers(dimension_numbers: DimensionNumbers, tree: optax.Params):
  """Returns one `MuonDimensionNumbers` or None per leaf of ``tree``.

  Args:
    dimension_numbers: None for the default rule (`default_dimension_numbers`
      on every leaf); one `MuonDimensionNumbers` for every leaf with
      ``ndim >= 2``; a pytree of them whose structure is a prefix of ``tree``'s
      (an entry applies to every leaf below it; None entries pass through); or
      a callable ``tree -> such a pytree`` (returning None means the default
      rule). The convention of optax.contrib.muon's
      ``muon_weight_dimension_numbers``.
    tree: the params (or updates; only shapes matter).

  Returns:
    A pytree with the structure of ``tree`` whose leaves are
    `MuonDimensionNumbers` or None. Leaves of ``tree`` with ``ndim < 2`` always
    get None.

  Raises:
    TypeError: for an entry that is neither None nor a `MuonDimensionNumbers`.
    ValueError: if the pytree's structure is not a prefix of ``tree``'s.
  """
  if callable(dimension_numbers) and not _is_dimension_numbers_tree(dimension_numbers):
    dimension_numbers = dimension_numbers(tree)
  if dimension_numbers is None:
    return jax.tree.map(default_dimension_numbers, tree)
  if isinstance(dimension_numbers, MuonDimensionNumbers):
    dn = dimension_numbers
    return jax.tree.map(lambda x: dn if jnp.ndim(x) >= 2 else None, tree)
  _check_dimension_numbers_tree(dimension_numbers)

  def broadcast(dn, subtree):
    return jax.tree.map(lambda x: dn if dn is not None and jnp.ndim(x) >= 2 else None, subtree)

  try:
    return jax.tree.map(broadcast, dimension_numbers, tree, is_leaf=_is_dim_nums_leaf)
  except ValueError as e:
    raise ValueError(
      "The structure of weight_dimension_numbers must be a prefix of the params' structure: "
      f"{jax.tree.structure(dimension_numbers, is_leaf=_is_dim_nums_leaf)} vs "
      f"{jax.tree.structure(tree)}."
    ) from e


def _normalize_axes(axes: Sequence[int] | int, ndim: int, what: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  if not axes:
    raise ValueError(f"{what} must name at least one axis.")
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(f"{what} {ax} is out of range for an array of rank {ndim}.")
  return tuple(int(ax) % ndim for ax in axes)


def matrix_view(
  x: chex.Array, dim_nums: MuonDimensionNumbers | None = None
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """Views ``x`` as a batch of matrices ``(batch, fan_in, fan_out)`` and returns the way back.

  The axes of ``x`` are permuted to (batch axes, reduction axes, output axes)
  and flattened to ``(prod(batch), prod(reduction), prod(output))``; batch axes
  are all axes named by neither field, in their original order.

  Args:
    x: an array with ``ndim >= 2``.
    dim_nums: which axes are the reduction (``fan_in``) and output
      (``fan_out``) axes; None for `default_dimension_numbers`.

  Returns:
    ``(matrix, inverse_fn)``: the 3-D view, and a function mapping an array of
    the view's shape back to ``x``'s shape and axis order.

  Raises:
    ValueError: if ``x.ndim < 2`` or the axes are out of range, empty or
      overlapping.

  Examples:
    >>> import jax.numpy as jnp
    >>> m, back = matrix_view(jnp.zeros((3, 3, 4, 8)))  # conv HWIO kernel
    >>> m.shape, back(m).shape
    ((1, 36, 8), (3, 3, 4, 8))
  """
  if x.ndim < 2:
    raise ValueError(f"matrix_view needs an array with ndim >= 2, got shape {x.shape}.")
  if dim_nums is None:
    dim_nums = default_dimension_numbers(x)
  reduction = _normalize_axes(dim_nums.reduction_axis, x.ndim, "reduction_axis")
  output = _normalize_axes(dim_nums.output_axis, x.ndim, "output_axis")
  if len(set(reduction + output)) != len(reduction) + len(output):
    raise ValueError(
      f"reduction_axis {dim_nums.reduction_axis} and output_axis {dim_nums.output_axis} must "
      f"be distinct axes (array shape {x.shape})."
    )
  batch = tuple(ax for ax in range(x.ndim) if ax not in reduction + output)
  perm = batch + reduction + output
  inv_perm = tuple(np.argsort(perm))
  permuted_shape = tuple(x.shape[ax] for ax in perm)
  sizes = [math.prod(x.shape[ax] for ax in axes) for axes in (batch, reduction, output)]
  matrix = jnp.transpose(x, perm).reshape(sizes)

  def inverse_fn(m: jax.Array) -> jax.Array:
    return jnp.transpose(m.reshape(permuted_shape), inv_perm)

  return matrix, inverse_fn


# ------------------------------------------------------------------ single-matrix forms


def _concat(arrays):
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)


def in_place_map(fn, stacks: tuple) -> tuple:
  """``fn`` applied to each index of the leading axis of ``stacks``, written back in place.

  A `jax.lax.fori_loop` whose carry is the stacks: each iteration reads slice
  ``i``, computes ``fn`` and writes the result over it
  (``dynamic_update_slice`` of a loop carry, which XLA performs in the
  carry's buffer). `jax.lax.map` computes the same values but collects them
  in a second stack, so the input and output stacks are both alive at the
  loop's end; here one is.

  Args:
    fn: slices -> a tuple of results, each with its slice's shape and dtype.
    stacks: arrays sharing their leading axis.

  Returns:
    The stacks with every slice replaced by ``fn``'s result.
  """

  def body(i, carry):
    results = fn(*(jax.lax.dynamic_index_in_dim(s, i, keepdims=False) for s in carry))
    return tuple(
      jax.lax.dynamic_update_index_in_dim(s, r.astype(s.dtype), i, 0)
      for s, r in zip(carry, results)
    )

  return jax.lax.fori_loop(0, stacks[0].shape[0], body, tuple(stacks))


def _check_matrix(x: chex.Array, name: str) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} takes a 2-D array, got shape {x.shape}; see matrix_view.")


def _cast_back(y: jax.Array, like: chex.Array) -> jax.Array:
  return y.astype(like.dtype) if jnp.issubdtype(like.dtype, jnp.floating) else y


def newton_schulz(
  x: chex.Array,
  *,
  ns_steps: int = 5,
  ns_coeffs: Sequence[float] | chex.Array = DEFAULT_NS_COEFFS,
  eps: float = 1e-8,
) -> jax.Array:
  r"""Muon's quintic Newton-Schulz orthogonalization of one matrix, in float32.

  With ``X_0 = G / (||G||_F + eps)`` and ``(a, b, c) = ns_coeffs``, ``ns_steps`` times

  .. math::

    A = X X^T, \qquad X \leftarrow a X + (b A + c A^2) X ,

  (computed on the wide orientation; optax.contrib's
  ``orthogonalize_via_newton_schulz``). Each singular value ``sigma`` of ``G``
  maps to ``p^{(5)}(sigma / ||G||_F)`` with ``p(s) = a s + b s^3 + c s^5``, the
  singular vectors are kept. With the default coefficients and 5 steps every
  singular value with ``sigma / ||G||_F >= 1e-3`` lands in
  `NS_SINGULAR_VALUE_BAND` = [0.47, 1.21]; smaller ones are lifted less.
  ``NS(P G) = P NS(G)`` for ``P`` with orthonormal columns.

  Args:
    x: a 2-D array.
    ns_steps: number of iterations.
    ns_coeffs: ``(a, b, c)``, or a ``(ns_steps, 3)`` table of per-step
      coefficients.
    eps: added to ``||G||_F`` before normalising.

  Returns:
    The orthogonalized matrix, in ``x``'s dtype.

  Raises:
    ValueError: if ``x`` is not 2-D.
  """
  _check_matrix(x, "newton_schulz")
  coeffs = jnp.asarray(ns_coeffs, jnp.float32)
  y = _optax_newton_schulz(x.astype(jnp.float32), coeffs, ns_steps, "frobenius", eps)
  return _cast_back(y, x)


def polar_svd(x: chex.Array) -> jax.Array:
  r"""Exact polar factor ``msign(G) = U V^T`` of one matrix, from its thin SVD in float32.

  ``G = U S V^T``; singular directions with ``sigma <= max(m, n) * eps_32 *
  sigma_max`` (numerically zero) are dropped, so a rank-deficient ``G`` gives
  the partial isometry on its range and the zero matrix gives zeros (no NaN).
  ``polar(P G) = P polar(G)`` for ``P`` with orthonormal columns.

  Args:
    x: a 2-D array.

  Returns:
    ``U V^T`` in ``x``'s dtype.

  Raises:
    ValueError: if ``x`` is not 2-D.
  """
  _check_matrix(x, "polar_svd")
  u, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
  tol = max(x.shape) * jnp.finfo(jnp.float32).eps * s[0]
  return _cast_back((u * (s > tol)) @ vt, x)


# Gram-Schmidt's projections must run at full float32 precision on every backend (a TPU's or
# GPU's default matmul precision rounds the operands to bfloat16 or TF32).
_HIGHEST = jax.lax.Precision.HIGHEST


def _project_out(q: jax.Array, v: jax.Array, rows: jax.Array | None = None) -> jax.Array:
  """``v - Q^T (Q v)`` for rows ``q`` (..., k, n) and ``v`` (..., n): one Gram-Schmidt pass.

  ``rows``: a (k,) 0/1 mask; only those rows of ``q`` are projected on (the others'
  coefficients are zeroed, so they contribute exact zeros).
  """
  h = jnp.einsum("...kn,...n->...k", q, v, precision=_HIGHEST)
  if rows is not None:
    h = h * rows
  return v - jnp.einsum("...kn,...k->...n", q, h, precision=_HIGHEST)


def _norm(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))


def orthonormalize_columns(a: chex.Array) -> jax.Array:
  """Q of the thin QR of ``a`` with ``diag(R) > 0``, in float32, by Gram-Schmidt.

  Leading axes of ``a`` are a batch of matrices. ``Q`` is the unique
  orthonormal factor whose first ``j`` columns span the first ``j`` columns of
  ``a`` with ``R_jj > 0``: for a Gaussian ``a``, exactly Haar distributed
  (Mezzadri, arXiv math-ph/0609050, the QR with its sign fix).

  Computed by classical Gram-Schmidt applied twice per column ("CGS2", Giraud
  et al., Numer. Math. 101, 2005: ``||Q^T Q - I|| = O(eps)`` for numerically
  full-rank ``a``), written in matrix-vector products and a `jax.lax.fori_loop`
  over the columns, not LAPACK's QR: XLA's CPU backend deadlocked, idle, on
  programs holding several QRs of vmapped (batched) draws (a `jax.vmap` over
  seeds of a subspace optimizer's ``init``). Each column is scaled by the
  power of two at or below its largest entry first (no overflow in its norm;
  exact, so Q does not depend on it). A second pass that removes
  more than ``1 - 1/sqrt(2)`` of the remainder's norm (Kahan-Parlett's
  criterion) is followed by a third; a column with nothing left (zero, or
  exactly in the span of the previous ones) is replaced by the standard basis
  vector the previous columns represent least, orthonormalized the same way.
  So ``Q`` always has orthonormal columns, as Householder QR's has; for a
  numerically rank-deficient ``a`` the extra directions are arbitrary, as
  there.

  Args:
    a: a matrix ``(..., n, k)`` with ``k <= n``.

  Returns:
    ``Q``, float32, shaped like ``a``.
  """
  a = jnp.asarray(a, jnp.float32)
  n, k = a.shape[-2:]
  if k > n:
    raise ValueError(f"orthonormalize_columns needs k <= n columns, got shape {a.shape}.")
  return _orthonormalize_rows(jnp.swapaxes(a, -1, -2))


def _orthonormalize_rows(at: jax.Array, scaled: bool = True) -> jax.Array:
  """`orthonormalize_columns` of ``swapaxes(at, -1, -2)``, given the columns as rows ``(k, n)``.

  ``scaled=False`` skips the scaling of each row, for rows that cannot overflow a sum of
  squares (Gaussian draws): the scale is a power of two, so the result does not depend on it.
  """
  k, n = at.shape[-2:]
  # Rows of ``at`` are the columns of ``a``, each scaled by its largest entry; Q is built row
  # by row as Q^T (contiguous rows: a loop body about half as costly to compile), in place:
  # row j of the loop's one buffer is replaced by q_j once its projections are done, and
  # rows j.. (not yet processed) are masked out of every projection. Building Q in a buffer
  # of its own held one more basis-sized copy (the 50272 x 64 token-table basis of an LM).
  if scaled:
    # The power of two at or below each row's largest entry: dividing by it is exact, and
    # every later step (dot products, differences, the norm's square root, the division by
    # it) commutes exactly with a power-of-two scale, so Q does not depend on it.
    largest = jnp.max(jnp.abs(at), axis=-1, keepdims=True)
    _, exponent = jnp.frexp(jnp.where(largest > 0, largest, 1.0))
    at = at / jnp.ldexp(jnp.float32(1.0), exponent - 1)
  order = jnp.arange(k)

  def column(j, q):
    done = (order < j).astype(jnp.float32)  # rows 0..j-1 hold q_0..q_{j-1}

    def twice(v):
      v1 = _project_out(q, v, done)
      return v1, _project_out(q, v1, done)

    def kept(after, before):  # Kahan-Parlett: the pass did not cancel (and left something)
      n_after = _norm(after)
      return (n_after > 0) & (n_after >= _norm(before) / math.sqrt(2.0))

    v = jax.lax.dynamic_index_in_dim(q, j, axis=-2, keepdims=False)
    v1, v2 = twice(v)
    ok2 = kept(v2, v1)

    def rare():  # cancellation: a third pass, and a fallback for a dependent column
      v3 = _project_out(q, v2, done)
      weight = jnp.sum(q * q * done[:, None], axis=-2)
      e = jax.nn.one_hot(jnp.argmin(weight, axis=-1), n, dtype=jnp.float32)
      e1, e2 = twice(e)
      e2 = jnp.where(kept(e2, e1), e2, _project_out(q, e2, done))
      return jnp.where(kept(v3, v2), v3, e2)

    w = jax.lax.cond(jnp.all(ok2), lambda: v2, rare)
    w = jnp.where(ok2, v2, w)
    w = w / _norm(w)
    return jax.lax.dynamic_update_index_in_dim(q, w, j, axis=-2)

  return jnp.swapaxes(jax.lax.fori_loop(0, k, column, at), -1, -2)


def random_orthonormal(key: jax.Array, n: int, k: int) -> jax.Array:
  """A Haar-random ``n x k`` float32 matrix with orthonormal columns (``k <= n``).

  `orthonormalize_columns` of a standard Gaussian ``n x k`` matrix, drawn with
  `zojax.fastrandom` (a hash of each element's index, fused into its use:
  `jax.random.normal`'s threefry held uint32 arrays several times the size
  of the basis, e.g. four of 12 MiB for a 50272 x 64 token-table basis).
  """
  if not 1 <= k <= n:
    raise ValueError(f"random_orthonormal needs 1 <= k <= n, got n={n}, k={k}.")
  # fastrandom.normal(key, (n, k)) drawn directly in the (k, n) layout the Gram-Schmidt loop
  # works in (element (j, i) is the draw at flat index i k + j), so no transposed copy of the
  # draw is made. The key-derived zero joins the first line, so no key-free index array exists
  # for XLA to hoist out of a loop over keys (`_haar_group`'s map).
  words = fastrandom.seed_words(key)
  as_float = jax.lax.bitcast_convert_type(words[0], jnp.float32)
  zero = ((as_float != as_float) & (as_float == as_float)).astype(jnp.uint32)
  column = (jax.lax.iota(jnp.uint32, k) + zero)[:, None]
  row = (jax.lax.iota(jnp.uint32, n) * jnp.uint32(k))[None, :]
  bits = fastrandom.bits_at(words, column + row)
  # |z| < 5.3: no scaling needed, and none changes Q (see `_orthonormalize_rows`).
  return _orthonormalize_rows(fastrandom.normal_from_bits(bits, jnp.float32), scaled=False)


def power_iteration_step(m: chex.Array, v: chex.Array) -> tuple[jax.Array, jax.Array]:
  r"""One warm-started block power-iteration sweep (ZO-MOPI, arXiv 2605.09034).

  For ``M`` (``a x b``) and the previous basis ``V`` (``b x k``), in float32:

  .. math::

    V_0 = \mathrm{qr}(V)_Q, \quad Z = M^T (M V_0), \quad V' = \mathrm{qr}(Z)_Q, \quad
    \tilde U = M V', \quad U = \tilde U \operatorname{diag}(\|\tilde u_j\|_2)^{-1}, \quad
    O = U V'^T .

  ``O`` has rank ``k`` and ``||O||_F = sqrt(k)`` (columns of ``U`` are unit,
  ``V'`` is orthonormal). Repeated with the same ``M`` it converges to
  ``U_k V_k^T`` of ``M``'s thin SVD at rate ``(sigma_{k+1} / sigma_k)^2``
  when the top ``k`` singular values are distinct. Zero columns of ``U~`` stay
  zero; if ``Z = 0`` (e.g. ``M = 0``) the basis is kept, ``V' = V_0``, and
  ``O = 0``.

  Args:
    m: the ``a x b`` matrix ``M``.
    v: the previous right basis, ``b x k`` with ``k <= min(a, b)``.

  Returns:
    ``(o, v_new)``: ``O`` (``a x b``, in ``m``'s dtype) and ``V'`` (``b x k``,
    float32), the warm start for the next call.

  Raises:
    ValueError: for inconsistent shapes or ``k > min(a, b)``.
  """
  _check_matrix(m, "power_iteration_step")
  if v.ndim != 2 or v.shape[0] != m.shape[1] or not 1 <= v.shape[1] <= min(m.shape):
    raise ValueError(
      f"power_iteration_step needs v of shape (b, k) with 1 <= k <= min(a, b) for m of shape "
      f"(a, b) = {m.shape}; got v of shape {v.shape}."
    )
  m32 = m.astype(jnp.float32)
  v0, _ = jnp.linalg.qr(v.astype(jnp.float32))
  z = m32.T @ (m32 @ v0)
  q, _ = jnp.linalg.qr(z)
  v_new = jnp.where(jnp.any(z != 0), q, v0)
  u = m32 @ v_new
  norms = jnp.linalg.norm(u, axis=0, keepdims=True)
  u = jnp.where(norms > 0, u / jnp.where(norms > 0, norms, 1.0), 0.0)
  return _cast_back(u @ v_new.T, m), v_new


# --------------------------------------------------------------------------- transform


def _warn_full_power_iteration(rank: int, full: list[tuple[str, int]]) -> None:
  """Warns that the power iteration of rank ``rank`` spans every direction of ``full``'s leaves.

  Args:
    rank: the power-iteration rank ``k``.
    full: ``(leaf path, smaller matrix dimension)`` of each such leaf.
  """
  if not full:
    return
  listed = ", ".join(f"{path} (smaller dimension {dim})" for path, dim in full)
  warnings.warn(
    f"orthogonalize('power_iteration', rank={rank}): k={rank} >= the smaller dimension of "
    f"the matrix of {listed}. There the rank-k power iteration keeps every direction: it is "
    "a full orthogonalization, not ZO-MOPI's partial one. Use k < that dimension (e.g. the "
    "released recipe's k = rank // 2 on zo_mopi's rank-r coordinates) for a partial one.",
    UserWarning,
    stacklevel=3,
  )


def _check_construction(method, ns_steps, ns_coeffs, eps, rank):
  """Checks the hyperparameters; returns ``(ns_steps, eps, rank)`` (rank may be a tracer)."""
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  if method == "power_iteration":
    if rank is None:
      raise ValueError('method="power_iteration" needs rank=k, an integer >= 1.')
    rank = hyperparams.integer("rank", rank, minimum=1)
  elif rank is not None:
    raise ValueError(
      f'rank is only used by method="power_iteration"; got rank={rank!r} with method={method!r}.'
    )
  ns_steps = hyperparams.integer("ns_steps", ns_steps, minimum=1)
  coeffs = np.asarray(ns_coeffs, np.float64)
  if coeffs.shape != (3,) and coeffs.shape != (ns_steps, 3):
    raise ValueError(
      f"ns_coeffs must have shape (3,) or (ns_steps, 3) = ({ns_steps}, 3), got {coeffs.shape}."
    )
  if not np.all(np.isfinite(coeffs)):
    raise ValueError(f"ns_coeffs must be finite, got {coeffs.tolist()}.")
  eps = hyperparams.real("eps", eps, low=0.0)
  return ns_steps, eps, rank


def orthogonalize(
  method: str = "newton_schulz",
  *,
  ns_steps: int = 5,
  ns_coeffs: Sequence[float] | chex.Array = DEFAULT_NS_COEFFS,
  eps: float = 1e-8,
  rank: int | None = None,
  key: keys_lib.KeyLike = 0,
  weight_dimension_numbers: DimensionNumbers = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers: DimensionNumbers = None,
) -> optax.GradientTransformation:
  r"""Replaces each matrix-shaped update ``G`` by an orthogonalized version.

  Each leaf with a matrix view (`resolve_dimension_numbers`; by default every
  leaf with ``ndim >= 2``) is mapped to ``(batch, fan_in, fan_out)`` by
  `matrix_view`, each of its ``batch`` matrices is orthogonalized in float32,
  and the result is mapped back and cast to the leaf's dtype. Leaves with
  ``ndim < 2`` or a None dimension number pass through unchanged. No shape
  scale is applied, so ``optax.chain(optax.trace(0.95), orthogonalize(),
  optax.scale(-lr))`` is Muon without its ``sqrt(max(1, out/in))`` factor.

  Methods:

  * ``"newton_schulz"``: ``NS5(G)`` (`newton_schulz`; Muon, Jordan et al.,
    optax.contrib.muon). Singular values land in `NS_SINGULAR_VALUE_BAND`
    = [0.47, 1.21] for those with ``sigma / ||G||_F >= 1e-3``.
  * ``"svd"``: ``U V^T`` from the thin SVD ``G = U S V^T`` (`polar_svd`;
    ZO-Muon's ``muon_svd``, arXiv 2602.17155).
  * ``"power_iteration"``: ZO-MOPI's partial orthogonalization (arXiv
    2605.09034, `power_iteration_step`): one warm-started block power-iteration
    sweep per update, ``O = U_k V_k^T`` of rank ``k = min(rank, fan_in,
    fan_out)`` with ``||O||_F = sqrt(k)``; ``V`` is kept in the state and
    starts as a Haar-random orthonormal basis (`random_orthonormal`) drawn
    from ``seed``. Orientation: the iteration runs on ``M = X^T``, where ``X``
    is the ``fan_in x fan_out`` view (flax ``(in, out)``), i.e. on PyTorch's
    ``(out, in)`` layout as in the ZO-MOPI code, so ``V`` (``fan_in x k``)
    spans the input (reduction) axis; ``O^T`` is returned in the leaf's layout.
    ``newton_schulz`` and ``svd`` commute with transposition and need no such
    choice.

  Args:
    method: one of `METHODS`.
    ns_steps: Newton-Schulz iterations.
    ns_coeffs: Newton-Schulz ``(a, b, c)``, or a ``(ns_steps, 3)`` table.
    eps: added to ``||G||_F`` before the Newton-Schulz normalisation.
    rank: the power-iteration rank ``k >= 1`` (required for, and only for,
      ``"power_iteration"``); clamped per leaf to ``min(fan_in, fan_out)``.
      Where ``k >= min(fan_in, fan_out)`` the sweep keeps every direction, a
      full orthogonalization rather than a partial one: ``init`` then issues
      one `UserWarning` naming those leaves (leaves with a dimension of 1,
      where no ``k < 1`` exists, are left out).
    key: an integer or a `jax.random` key for the initial ``V``
      (``"power_iteration"`` only; one key per leaf via `zojax.keys.leaf_keys`;
      ``seed=``, its former name, is deprecated).
    weight_dimension_numbers: the matrix view of each leaf: None (default rule, see
      `default_dimension_numbers`), a `MuonDimensionNumbers`, a pytree of them
      (None entries pass through) or a callable ``params -> pytree``, as
      optax.contrib.muon's ``muon_weight_dimension_numbers``. The callable is
      called with the params at ``init`` and the updates at ``update``.
      (``dimension_numbers=``, its former name, is deprecated.)

  Returns:
    An `optax.GradientTransformation`; its state is `optax.EmptyState` except
    for ``"power_iteration"`` (`PowerIterationState`).

  Raises:
    ValueError: at construction for an unknown method, a missing or
      non-positive ``rank`` with ``"power_iteration"``, a ``rank`` with another
      method, ``ns_steps < 1``, badly shaped ``ns_coeffs`` or ``eps < 0``; at
      ``init``/``update`` for bad axes or a dimension-number tree that does not
      match the params.
    TypeError: for a ``key`` that is neither an integer nor a key, or a
      dimension-number entry that is not a `MuonDimensionNumbers` or None.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> tx = optax.chain(optax.trace(0.95), orthogonalize(), optax.scale(-0.02))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, bool(jnp.all(updates["b"] == -0.02))
    ((4, 3), True)
    >>> tx = orthogonalize("power_iteration", rank=2, key=0)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> state.v["w"].shape, round(float(jnp.linalg.norm(updates["w"])) ** 2, 3)
    ((1, 4, 2), 2.0)
  """
  key = _deprecations.renamed("zojax.orthogonalize", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.orthogonalize",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  ns_steps, eps, rank = _check_construction(method, ns_steps, ns_coeffs, eps, rank)
  if not isinstance(weight_dimension_numbers, MuonDimensionNumbers) and not callable(
    weight_dimension_numbers
  ):
    _check_dimension_numbers_tree(weight_dimension_numbers)
  key = keys_lib.as_key(key) if method == "power_iteration" else None
  coeffs = np.asarray(ns_coeffs, np.float32)

  def orthogonalize_matrix(x: jax.Array) -> jax.Array:
    if method == "newton_schulz":
      return newton_schulz(x, ns_steps=ns_steps, ns_coeffs=coeffs, eps=eps)
    return polar_svd(x)

  def init_fn(params):
    if method != "power_iteration":
      return optax.EmptyState()
    if not isinstance(rank, int):
      raise ValueError(
        "The power-iteration rank is traced here (optax.inject_hyperparams inside jax.jit "
        "or jax.eval_shape?), but it fixes the shape of the state. Leave zo_mopi's k at its "
        "default, pass static_args=('k',) to optax.inject_hyperparams, or call init "
        "outside jit."
      )
    leaves, treedef = jax.tree.flatten(params)
    dims = treedef.flatten_up_to(resolve_dimension_numbers(weight_dimension_numbers, params))
    leaf_keys = keys_lib.leaf_keys(key, params)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    vs, full = [], []
    for i, (x, dn) in enumerate(zip(leaves, dims)):
      if dn is None:
        vs.append(None)
        continue
      matrix, _ = matrix_view(x, dn)
      batch, fan_in, fan_out = matrix.shape
      k = min(rank, fan_in, fan_out)
      if rank >= min(fan_in, fan_out) > 1:
        full.append((paths[i] or "the root", min(fan_in, fan_out)))
      batch_keys = jax.random.split(leaf_keys[i], batch)
      vs.append(jax.vmap(lambda kk, n=fan_in, k=k: random_orthonormal(kk, n, k))(batch_keys))
    _warn_full_power_iteration(rank, full)
    return PowerIterationState(v=treedef.unflatten(vs))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    dims = treedef.flatten_up_to(resolve_dimension_numbers(weight_dimension_numbers, updates))
    if method == "power_iteration":
      vs = treedef.flatten_up_to(state.v)
    else:
      vs = [None] * len(leaves)
    # Matrices of one shape are stacked and orthogonalized one after the
    # other by a loop (`jax.lax.map`): XLA otherwise ran every matrix's
    # iterations side by side and held all their intermediates at once (about
    # 0.3x the weights of a 12-layer model for ZO-Muon's coordinates).
    views, groups = {}, {}
    for i, (x, dn, v) in enumerate(zip(leaves, dims, vs)):
      if dn is None:
        continue
      matrix, inverse_fn = matrix_view(x, dn)
      if method == "power_iteration" and (v is None or v.shape[:2] != matrix.shape[:2]):
        raise ValueError(
          f"The power-iteration state does not match a leaf of shape {x.shape} "
          f"(state basis {None if v is None else v.shape}); was init called on "
          "params with the same structure and dimension numbers?"
        )
      if method == "power_iteration" and isinstance(rank, int):
        k = min(rank, matrix.shape[1], matrix.shape[2])
        if v.shape[-1] != k:
          raise ValueError(
            f"This orthogonalizer has power-iteration rank {rank} (k = {k} for a leaf of "
            f"shape {x.shape}), but its state holds a basis of rank {v.shape[-1]}: the "
            "state was built with another rank (zo_mopi's k). Initialise the state with "
            "this optimizer."
          )
      views[i] = (matrix, inverse_fn)
      key = (matrix.shape[1:], matrix.dtype, None if v is None else (v.shape[1:], v.dtype))
      groups.setdefault(key, []).append(i)
    results = {}
    for members in groups.values():
      stacked = _concat([views[i][0] for i in members])
      if method == "power_iteration":
        v_stacked = _concat([vs[i] for i in members])
        y, v_new = in_place_map(
          lambda m, v: (lambda o, v_out: (o.T, v_out))(*power_iteration_step(m.T, v)),
          (stacked, v_stacked),
        )
      else:
        (y,), v_new = in_place_map(lambda m: (orthogonalize_matrix(m),), (stacked,)), None
      start = 0
      for i in members:
        n = views[i][0].shape[0]
        piece = y[start : start + n]
        results[i] = (piece, None if v_new is None else v_new[start : start + n])
        start += n
    out, new_vs = [], []
    for i, x in enumerate(leaves):
      if i not in results:
        out.append(x)
        new_vs.append(None)
        continue
      y, v_new = results[i]
      out.append(views[i][1](y).astype(x.dtype))
      new_vs.append(v_new)
    new_updates = treedef.unflatten(out)
    if method == "power_iteration":
      return new_updates, PowerIterationState(v=treedef.unflatten(new_vs))
    return new_updates, state

  return optax.GradientTransformation(init_fn, eager.jit_when_concrete(update_fn, "orthogonalize"))
