"""Run a transform on low-dimensional coordinates of each weight matrix.

`subspace` is a combinator in the spirit of `optax.masked`: it hands its
``inner`` transform (any chain holding a ZO estimator, an orthogonalizer,
momentum, ...) the coordinates of each matrix leaf in a rank-``r`` basis,
makes the loss see those coordinates as low-rank weight perturbations, and
lifts the inner updates back to full weights. It covers the subspace
families of zeroth-order fine-tuning:

* ``side="out"``, ``basis="haar"``: ZO-Muon's random projection
  (arXiv 2602.17155), ``W = W0 + P C`` with ``P`` (out x r) Haar-orthonormal,
  redrawn every ``refresh_every`` steps.
* ``basis="momentum"``: ZO-MOPI's momentum-anchored refresh
  (arXiv 2605.09034): the new basis keeps the top singular directions of the
  inner momentum.
* ``side="in"``, ``basis="gaussian"``: LOZO's lazy factor (arXiv 2410.07698),
  ``W = W0 + U V^T`` with the Gaussian ``V`` (in x r) kept for
  ``refresh_every`` steps and the coordinates ``U`` fresh every step.
* ``side="both"``: SubZero (arXiv 2410.08989), ``W = W0 + s U Z V^T`` with
  orthonormal ``U``, ``V`` and ``s = sqrt(m n) / r``.

Layout. A leaf is viewed as a matrix ``X`` of shape (fan_in, fan_out) by its
dimension numbers (`optax.contrib.MuonDimensionNumbers`: reduction axes =
fan_in, output axes = fan_out). The default rule: 2-D leaves are flax
``(in, out)`` kernels; leaves with more axes (conv ``HWIO`` kernels,
attention ``(in, heads, head_dim)`` kernels with explicit numbers) reduce
over all axes but the last; leaves with fewer than two axes are not
matrices and are handed to ``inner`` as they are (full space). The papers
write PyTorch ``(out, in)`` weights ``W = X^T``; ZO-Muon's ``P`` on the
output axis of ``W`` becomes, in flax layout, ``X = X0 + C P^T`` with
coordinates ``C`` of shape (in, r) (ALGORITHMS.md 10.1). Because ``P`` has
orthonormal columns, orthogonalizing ``C`` and lifting equals
orthogonalizing the lifted update, at ``O(r^2 n)`` cost.

Batch axes: axes named by neither ``reduction_axis`` nor ``output_axis``
(the layer axis of stacked ``(layers, in, out)`` kernels run by
`jax.lax.scan`) make a leaf a batch of matrices, each with its own basis and
coordinates (leading batch axis, flattened); an orthogonalizer in ``inner``
then needs `coordinate_dimension_numbers` to treat each slice on its own, as
the presets pass it. Leaves kept in full space with two or more axes (a
stack of biases, marked None) are handed to ``inner`` flattened, so no
orthogonalizer takes them for a matrix.

At-use evaluation: for a leaf whose matrix view is the leaf itself, its
transpose, or a stack of either kind (``(batch, in, out)``), the perturbed
leaf is handed to `zojax.perturb_at_use.value_at` as low-rank factors
(`zojax.perturb_at_use.low_rank`): a gather reads only the rows it takes, a
scan body forms one slice, a matmul gets its matrix formed just before it.
The update ``x + lift(u)`` is formed in the leaf's own layout as a
broadcast-multiply-sum over the rank, which XLA fuses with the update; put
the learning rate inside ``inner`` (as the presets do), since a scalar
applied after the lift is materialized by that fusion as weight-sized
constants (see `_outer_sum`).

Rank: a rank larger than the dimension the basis spans is clamped to that
dimension (the ZO-Muon ViT code does the same), so ``rank=64`` works on a
model with 32-wide layers.

Refresh and inner state. The basis is drawn at ``init`` (step 0) and redrawn
at the start of every step ``t > 0`` with ``t % refresh_every == 0``, from
``fold_in(basis_key, t)``. The refresh happens before the step's queries, so
the perturbations, the estimate and the update of a refresh step all use the
same basis by construction (the released ZO-Muon, ZO-MOPI and LOZO code mix
old and new draws on refresh steps, ALGORITHMS.md 3.5, 4.5, 6.4). Every
parameter-shaped buffer of the inner state (momentum, EMA, Adam moments) is
carried across a refresh by re-projection: its lifted value ``L(C)`` is
projected onto the new basis by least squares,
``C_new = argmin ||L_new(C') - L_old(C)||_F``, which is
``C P_old^T P_new`` for orthonormal bases (ZO-MOPI's re-projection without
the stray ``1/m`` of the released code) and the exact form of LOZO-M's
``N V_old^T V_new / n`` for Gaussian ones.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from zojax import (
  _deprecations,
  array_leaves,
  eager,
  hyperparams,
  ordering,
  perturb_at_use,
  perturbations,
)
from zojax import keys as keys_lib
from zojax import orthogonalizers as orth

SIDES = ("out", "in", "both")
BASES = ("haar", "gaussian", "momentum")

__all__ = [
  "BASES",
  "SIDES",
  "SubspaceState",
  "coordinate_dimension_numbers",
  "subspace",
]


class SubspaceState(NamedTuple):
  """State of `subspace`.

  Attributes:
    count: steps taken (int32).
    key: the basis key (a stream of the ``key`` argument, see `zojax.keys.stream_key`).
    bases: per leaf, the basis (``side`` "out"/"in": one array; "both": a
      pair ``(in_basis, out_basis)``), or an empty tuple for leaves handled
      in full space.
    inner_state: the state of ``inner``, on coordinates.
  """

  count: jax.Array
  key: jax.Array
  bases: Any
  inner_state: Any


@dataclasses.dataclass(frozen=True)
class _LeafSpec:
  """How one leaf maps to a matrix (or a stack of matrices) and its coordinates (static)."""

  shape: tuple[int, ...]
  dtype: Any
  dim_nums: MuonDimensionNumbers
  fan_in: int
  fan_out: int
  rank: int  # effective (clamped) rank
  batch: int | None = None  # product of the batch axes; None when the leaf has none

  def to_matrix(self, x):
    """The ``(fan_in, fan_out)`` view, or ``(batch, fan_in, fan_out)`` with batch axes."""
    m = orth.matrix_view(x, self.dim_nums)[0]
    return m if self.batch is not None else m[0]

  def from_matrix(self, m):
    # Only the inverse map is used; the placeholder is dead code under jit.
    placeholder = jnp.zeros(self.shape, m.dtype)
    return orth.matrix_view(placeholder, self.dim_nums)[1](m if self.batch is not None else m[None])


# Ranks up to which a lifted update is written as a sum of rank-1 products.
UNROLL_LIFT_UP_TO = 8


def _outer_sum(left, right):
  """``left @ right`` over the last two axes, written so that XLA fuses it into its consumer.

  The update ``theta - lr * lift(u)`` should be one pass over the donated
  ``theta``. A matmul's output is a parameter-sized buffer of its own, and
  XLA's CPU scheduler ran every leaf's matmul before any update (all lifted
  updates held at once). A broadcast-multiply-sum over the rank is fused
  with the update instead (on CPU as a dot fusion, XLA's YNNPACK path);
  note that such a fusion materializes a scalar that multiplies its result
  (a learning rate applied after `subspace`) as a parameter-sized constant,
  one per leaf shape, alive through the step, so the presets scale the
  coordinates inside ``inner`` instead. Up to `UNROLL_LIFT_UP_TO` (LOZO's
  rank 2, say) the sum is written out, ``sum_k left[:, k] right[k, :]``, a
  plain elementwise loop at that size; written out at rank 64 it ran about
  twice as slow as the dot fusion.
  """
  rank = left.shape[-1]
  if rank > UNROLL_LIFT_UP_TO:
    return jnp.sum(left[..., :, :, None] * right[..., None, :, :], axis=-2)
  out = left[..., :, 0:1] * right[..., 0:1, :]
  for k in range(1, rank):
    out = out + left[..., :, k : k + 1] * right[..., k : k + 1, :]
  return out


def _t(x):
  """Transpose of the last two axes (a batch of matrices or one matrix)."""
  return jnp.swapaxes(x, -1, -2)


def _num_axes(axes) -> int:
  return len(axes) if isinstance(axes, (tuple, list)) else 1


def _leaf_spec(path, leaf, dim_nums, rank: int, side: str) -> _LeafSpec | None:
  if dim_nums is None or math.prod(jnp.shape(leaf)) == 0:
    return None  # not a matrix, or an empty one: nothing to project (full space, size 0)
  view = jax.eval_shape(lambda x: orth.matrix_view(x, dim_nums)[0], leaf)
  batch, fan_in, fan_out = view.shape
  has_batch = jnp.ndim(leaf) > _num_axes(dim_nums.reduction_axis) + _num_axes(dim_nums.output_axis)
  limit = {"out": fan_out, "in": fan_in, "both": min(fan_in, fan_out)}[side]
  return _LeafSpec(
    tuple(jnp.shape(leaf)),
    jnp.result_type(leaf),
    dim_nums,
    fan_in,
    fan_out,
    min(rank, limit),
    batch if has_batch else None,
  )


def coordinate_dimension_numbers(coords) -> Any:
  """The matrix view of `subspace`'s coordinates, for an orthogonalizer inside ``inner``.

  A coordinate leaf is a matrix in its last two axes, after the batch axes of
  its parameter (e.g. the layer axis of stacked layers): ``(fan_in, r)``,
  ``(r, fan_out)`` or ``(r, r)``. Leaves `subspace` hands ``inner`` in full
  space are 1-D or scalars (it flattens larger ones), so they get None. For
  parameters without batch axes this is the default rule.

  Args:
    coords: the coordinates (or updates on them).

  Returns:
    A pytree of `optax.contrib.MuonDimensionNumbers` / None.
  """
  return jax.tree.map(
    lambda c: MuonDimensionNumbers(jnp.ndim(c) - 2, jnp.ndim(c) - 1) if jnp.ndim(c) >= 2 else None,
    coords,
  )


class _Geometry:
  """Static per-leaf specs plus the basis algebra for one ``side``."""

  def __init__(self, params, rank, side, dimension_numbers, scale):
    paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    dnums = self.treedef.flatten_up_to(orth.resolve_dimension_numbers(dimension_numbers, params))
    self.side = side
    self.scale_mode = scale
    self.specs = [
      _leaf_spec(path, leaf, dn, rank, side) for (path, leaf), dn in zip(paths_leaves, dnums)
    ]

  # Coordinates ---------------------------------------------------------------

  def coord_shape(self, spec: _LeafSpec) -> tuple[int, ...]:
    r = spec.rank
    shape = {"out": (spec.fan_in, r), "in": (r, spec.fan_out), "both": (r, r)}[self.side]
    return shape if spec.batch is None else (spec.batch, *shape)

  def factor(self, spec: _LeafSpec) -> float:
    if self.scale_mode == "sqrt_mn_over_r":
      return math.sqrt(spec.fan_in * spec.fan_out) / spec.rank
    return 1.0

  def lift(self, spec, basis, c, fused: bool = False):
    """Coordinates -> (fan_in, fan_out) matrix, in float32.

    With ``fused=True`` the last product is `_outer_sum`, which XLA fuses
    into its consumer (the update ``theta - lr * lift(u)``, in the donated
    buffer).
    """
    c = c.astype(jnp.float32)
    if self.side == "out":
      left, right = c, _t(basis)
    elif self.side == "in":
      left, right = basis, c
    else:
      b_in, b_out = basis
      left, right = b_in, c @ _t(b_out)
    if fused:
      m = _outer_sum(left, right)
    else:
      m = left @ right
    return self.factor(spec) * m

  def project(self, spec, basis, m):
    """Adjoint of `lift`: (fan_in, fan_out) matrix -> coordinates."""
    m = m.astype(jnp.float32)
    if self.side == "out":
      c = m @ basis
    elif self.side == "in":
      c = _t(basis) @ m
    else:
      b_in, b_out = basis
      c = _t(b_in) @ m @ b_out
    return self.factor(spec) * c

  def reproject(self, spec, old, new, c, orthonormal: bool):
    """Least-squares coordinates in ``new`` of the matrix ``c`` lifts to in ``old``."""
    c32 = c.astype(jnp.float32)

    def change(b_old, b_new):  # (r x r): solves (B_new^T B_new) T = B_new^T B_old
      cross = _t(b_new) @ b_old
      if orthonormal:
        return cross
      return jnp.linalg.solve(_t(b_new) @ b_new, cross)

    if self.side == "out":
      out = c32 @ _t(change(old, new))
    elif self.side == "in":
      out = change(old, new) @ c32
    else:
      out = change(old[0], new[0]) @ c32 @ _t(change(old[1], new[1]))
    return out.astype(c.dtype)


class _Assemble:
  """Coordinates -> parameters ``x + lift(c)``: the ``param_map`` `subspace` passes.

  Also tells `zojax.perturb_at_use.value_at` how to form each lifted leaf at
  its point of use (``deferred_leaves``), so a perturbed forward never holds
  every lifted matrix at once.
  """

  def __init__(self, geo: _Geometry, p_leaves, bases, param_map):
    self.geo, self.p_leaves, self.bases, self.param_map = geo, p_leaves, bases, param_map

  def _lifted(self, x, c, spec, b):
    delta = spec.from_matrix(self.geo.lift(spec, b, c))
    return (x.astype(jnp.float32) + delta).astype(spec.dtype)

  def __call__(self, coords):
    c_leaves = self.geo.treedef.flatten_up_to(coords)
    out = [
      _unflat(c, x) if spec is None else self._lifted(x, c, spec, b)
      for x, c, spec, b in zip(self.p_leaves, c_leaves, self.geo.specs, self.bases)
    ]
    full = jax.tree.unflatten(self.geo.treedef, out)
    return full if self.param_map is None else self.param_map(full)

  def _low_rank_factors(self, spec: _LeafSpec, b, c):
    """``(left, right)`` with ``leaf = left @ right`` (batched over a leading axis), or None.

    Covers the layouts whose matrix view is the leaf itself or its transpose:
    2-D leaves viewed as ``(in, out)`` or ``(out, in)`` (e.g. a token table
    whose output axis is the vocabulary, as in PyTorch's layout), and 3-D
    leaves ``(batch, in, out)`` (stacked layers). ``c`` is an array, or a
    `zojax.perturb_at_use` deferred value; the factor built from it is then
    deferred too (the basis factor stays an array, so a row gather of the
    leaf gathers the basis rows).
    """
    axes = lambda a: tuple(a) if isinstance(a, (tuple, list)) else (a,)  # noqa: E731
    ndim = len(spec.shape)
    red = tuple(a % ndim for a in axes(spec.dim_nums.reduction_axis))
    out = tuple(a % ndim for a in axes(spec.dim_nums.output_axis))
    if ndim == 2 and (red, out) == ((0,), (1,)):
      transposed = False
    elif ndim == 2 and (red, out) == ((1,), (0,)):
      transposed = True
    elif ndim == 3 and (red, out) == ((1,), (2,)):
      transposed = False
    else:
      return None
    f = self.geo.factor(spec)
    side = self.geo.side
    orient = _t if transposed else (lambda m: m)

    def moving_of(c):  # the factor made from the coordinates, in the leaf's layout
      c = c.astype(jnp.float32)
      return orient(f * (c @ _t(b[1])) if side == "both" else f * c)

    fixed_of = {"out": lambda: _t(b), "in": lambda: b, "both": lambda: b[0]}[side]
    if isinstance(c, jax.Array):
      moving, fixed = moving_of(c), orient(fixed_of())
    elif side != "both" and not transposed:
      # f * (a draw around the zero coordinates) is still a draw, and the
      # basis's transpose a view: a scan over stacked layers forms one
      # layer's slice of each per iteration.
      moving = perturb_at_use.scaled(c, f, zero_base=True)
      fixed = perturb_at_use.transposed(b) if side == "out" else b
    else:  # deferred coordinates (a perturbed draw): the factor is deferred too
      like = jax.eval_shape(lambda: moving_of(perturb_at_use.concrete(c)))
      moving = perturb_at_use.deferred(lambda zero: moving_of(c.materialize(zero)), like)
      fixed = orient(fixed_of())
    left, right = (moving, fixed) if side == "out" else (fixed, moving)
    return (right, left) if transposed else (left, right)

  def deferred_leaves(self, values):
    """The parameters' leaves for `zojax.perturb_at_use.value_at` (None: trace ``__call__``)."""
    if self.param_map is not None:
      return None
    out = []
    for x, value, spec, b in zip(self.p_leaves, values, self.geo.specs, self.bases):
      if spec is None:
        out.append(perturb_at_use.reshaped(value, jnp.shape(x)))
        continue
      if math.prod(spec.shape) < perturbations.GROUP_BELOW:  # small: formed up front
        out.append(self._lifted(x, perturb_at_use.concrete(value), spec, b))
        continue
      factors = self._low_rank_factors(spec, b, value)
      if factors is not None:
        out.append(perturb_at_use.low_rank(x, *factors))
        continue
      c = perturb_at_use.concrete(value)

      def lifted(zero, x=x, c=c, spec=spec, b=b):
        c = c if zero is None else c + zero.astype(c.dtype)
        return self._lifted(x, c, spec, b)

      out.append(perturb_at_use.deferred(lifted, x))
    return self.geo.treedef, out


def _flat(x):
  """A leaf `subspace` hands ``inner`` in full space: flattened when it has two or more axes.

  So an orthogonalizer inside ``inner`` never takes it for a matrix.
  """
  return jnp.reshape(x, (-1,)) if jnp.ndim(x) >= 2 else x


def _unflat(c, like):
  """Inverse of `_flat` for a leaf shaped like ``like``."""
  return jnp.reshape(c, jnp.shape(like)) if jnp.ndim(like) >= 2 else c


def _draw_gaussian_basis(geometry: _Geometry, spec: _LeafSpec, key):
  """One leaf's iid N(0, 1) basis (a pair for ``side="both"``); Haar ones: `_draw_haar_bases`."""
  out = [
    jax.vmap(lambda k, dim=dim: jax.random.normal(k, (dim, spec.rank), jnp.float32))(keys)
    for dim, keys in _basis_draws(geometry, spec, key)
  ]
  out = [b if spec.batch is not None else b[0] for b in out]
  return out[0] if len(out) == 1 else tuple(out)


def _basis_draws(geometry: _Geometry, spec: _LeafSpec, key) -> list[tuple[int, jax.Array]]:
  """``(dim, keys)`` per basis of a leaf: one key per matrix of the leaf's batch (1 if none)."""

  def keys_of(k):
    return jax.random.split(k, spec.batch) if spec.batch is not None else k[None]

  if geometry.side == "out":
    return [(spec.fan_out, keys_of(key))]
  if geometry.side == "in":
    return [(spec.fan_in, keys_of(key))]
  k_in, k_out = jax.random.split(key)
  return [(spec.fan_in, keys_of(k_in)), (spec.fan_out, keys_of(k_out))]


def _haar_group(keys: jax.Array, dim: int, rank: int, after=None) -> jax.Array:
  """Haar bases ``(len(keys), dim, rank)``, one per key, drawn one after another.

  One compiled loop (Gram-Schmidt's, `orth.orthonormalize_columns`) for every basis of the
  shape, and the memory of one Gaussian draw at a time. Each basis is written into the
  group's stack, which is created only once ``after`` (the previous group's stack) exists:
  `jax.lax.map` allocated every group's output up front, so they were all held while the
  largest basis was drawn.
  """
  stack = jnp.zeros((keys.shape[0], dim, rank), jnp.float32)
  if after is not None:
    stack = ordering.after(stack, after)

  def body(i, stack):
    basis = orth.random_orthonormal(keys[i], dim, rank)
    return jax.lax.dynamic_update_index_in_dim(stack, basis, i, 0)

  return jax.lax.fori_loop(0, keys.shape[0], body, stack)


def _draw_haar_bases(geo: _Geometry, leaf_keys) -> list:
  """Every leaf's Haar basis (``()`` for full-space leaves), grouped by shape.

  Bases of one shape (the fan-in and fan-out bases of SubZero's square layers, every layer of
  a transformer) are drawn in one `_haar_group`, so a program holds one orthonormalization
  loop per basis shape instead of one per basis: compiling that loop costs about as much as
  the QR it replaces, once. The result is what drawing leaf by leaf gives (same keys, same
  function per key). Groups run one after another (`zojax.ordering`).
  """
  groups: dict[tuple[int, int], list] = {}
  for i, spec in enumerate(geo.specs):
    if spec is None:
      continue
    for slot, (dim, keys) in enumerate(_basis_draws(geo, spec, leaf_keys[i])):
      groups.setdefault((dim, spec.rank), []).append((i, slot, keys))
  drawn: dict[tuple[int, int], jax.Array] = {}
  previous = None
  # The largest bases first: while one is drawn, only the groups before it are held.
  for (dim, rank), members in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
    keys = jnp.concatenate([keys for _, _, keys in members])
    if previous is not None:
      keys = ordering.after(keys, previous)
    previous = _haar_group(keys, dim, rank, previous)
    start = 0
    for i, slot, member_keys in members:
      count = member_keys.shape[0]
      drawn[(i, slot)] = previous[start : start + count]
      start += count
  out = []
  for i, spec in enumerate(geo.specs):
    if spec is None:
      out.append(())
      continue
    pieces = [drawn[(i, slot)] for slot in range(2 if geo.side == "both" else 1)]
    pieces = [b if spec.batch is not None else b[0] for b in pieces]
    out.append(pieces[0] if len(pieces) == 1 else tuple(pieces))
  return out


def _orthonormalize_grouped(geo: _Geometry, mats: list) -> list:
  """`orth.orthonormalize_columns` of every leaf's matrix, one loop per shape.

  As in `_draw_haar_bases`: one compiled Gram-Schmidt loop per shape, not per
  leaf; each result is written over its input in the stack (`orth.in_place_map`),
  where `jax.lax.map` held a second stack.
  """
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, spec in enumerate(geo.specs):
    if spec is not None:
      groups.setdefault(tuple(mats[i].shape[-2:]), []).append(i)
  out = list(mats)
  for members in groups.values():
    flat = [jnp.reshape(mats[i], (-1, *mats[i].shape[-2:])) for i in members]
    (done,) = orth.in_place_map(
      lambda m: (orth.orthonormalize_columns(m),), (jnp.concatenate(flat),)
    )
    start = 0
    for i, f in zip(members, flat):
      out[i] = jnp.reshape(done[start : start + f.shape[0]], mats[i].shape)
      start += f.shape[0]
  return out


def _basis_shapes(geo: _Geometry, spec: _LeafSpec) -> tuple[tuple[int, ...], ...]:
  """Shapes of a leaf's basis (two for ``side="both"``), as they are drawn."""

  def shape(dim):
    return (dim, spec.rank) if spec.batch is None else (spec.batch, dim, spec.rank)

  dims = {"out": (spec.fan_out,), "in": (spec.fan_in,), "both": (spec.fan_in, spec.fan_out)}
  return tuple(shape(d) for d in dims[geo.side])


def _no_basis(b) -> bool:
  """Whether a state's basis entry is the placeholder of a full-space leaf, ``()``."""
  return isinstance(b, tuple) and len(b) == 0


def _check_bases(geo: _Geometry, bases) -> None:
  """Raises if the state's bases were built for other parameters or another rank."""
  if len(bases) != len(geo.specs):
    raise ValueError(
      f"The subspace state holds {len(bases)} bases but the parameters have "
      f"{len(geo.specs)} leaves: was it initialised with other parameters?"
    )
  for spec, b in zip(geo.specs, bases):
    if spec is None:
      if not _no_basis(b):
        raise ValueError(
          "The subspace state has a basis for a leaf that these dimension numbers treat as "
          "full-space: was it built with other weight_dimension_numbers?"
        )
      continue
    got = tuple(jnp.shape(x) for x in (b if isinstance(b, tuple) else (b,)))
    want = _basis_shapes(geo, spec)
    if got != want:
      raise ValueError(
        f"The subspace state's basis for a leaf of shape {spec.shape} has shape "
        f"{got if len(got) > 1 else got[0]}, but this optimizer (rank {spec.rank}, side "
        f"{geo.side!r}) needs {want if len(want) > 1 else want[0]}: the state was built with "
        "another rank, side or weight_dimension_numbers. Initialise the state with this optimizer."
      )


def _map_param_shaped(state, template, fn):
  """Applies ``fn(index, leaf)`` to every subtree of ``state`` shaped like ``template``.

  A subtree is parameter-shaped when it has the pytree structure of the
  coordinates and the same leaf shapes (optax's momentum, EMA and Adam
  moments are). Other leaves (keys, counters, power-iteration bases) are
  returned unchanged.
  """
  t_def = jax.tree.structure(template)
  t_shapes = [jnp.shape(x) for x in jax.tree.leaves(template)]

  def matches(x):
    try:
      if jax.tree.structure(x) != t_def:
        return False
    except Exception:  # noqa: BLE001 - exotic nodes are simply not matches
      return False
    return [jnp.shape(y) for y in jax.tree.leaves(x)] == t_shapes

  def visit(x):
    if not matches(x):
      return x
    leaves = jax.tree.leaves(x)
    return jax.tree.unflatten(t_def, [fn(i, leaf) for i, leaf in enumerate(leaves)])

  return jax.tree.map(visit, state, is_leaf=matches)


def _first_param_shaped(state, template):
  found = []
  _map_param_shaped(state, template, lambda i, x: found.append((i, x)) or x)
  if not found:
    return None
  num = len(jax.tree.leaves(template))
  return [x for _, x in found[:num]]


def _warn_static_anchor(geo: _Geometry, params, anchor_rank: int) -> None:
  """Warns if an anchored refresh keeps the whole basis of some leaf (see `subspace`).

  For a leaf of (clamped) rank ``r`` the refresh keeps
  ``min(anchor_rank, r, fan_in)`` old directions; when that is ``r`` it keeps
  them all and the new basis spans the old one. Leaves with ``fan_out = 1``
  (a row, e.g. a class token in PyTorch's layout) are left out: their basis
  is +-1 whatever the anchor.

  Args:
    geo: the geometry of ``params``.
    params: the parameters (for the leaf paths).
    anchor_rank: the concrete anchor rank.
  """
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  kept = [
    f"{paths[i] or 'the root'} (rank {spec.rank})"
    for i, spec in enumerate(geo.specs)
    if spec is not None and spec.fan_out > 1 and min(anchor_rank, spec.fan_in) >= spec.rank
  ]
  if kept:
    warnings.warn(
      f'subspace(basis="momentum", anchor_rank={anchor_rank}): anchor_rank >= the rank of '
      f"{', '.join(kept)} (ranks are clamped to each matrix's output dimension). The anchored "
      "refresh keeps every direction of the old basis there, so that subspace never changes. "
      "Use anchor_rank < rank (e.g. the released recipe's k = rank // 2), a smaller rank for "
      'narrow matrices, or basis="haar".',
      UserWarning,
      stacklevel=3,
    )


def subspace(
  inner: optax.GradientTransformation,
  rank: int,
  refresh_every: int | None = 100,
  *,
  side: str = "out",
  basis: str = "haar",
  anchor_rank: int | None = None,
  scale: str | None = None,
  update_scale: str | None = None,
  weight_dimension_numbers=None,
  key: keys_lib.KeyLike = 0,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on rank-``r`` coordinates of every matrix leaf.

  For a matrix leaf ``X`` (flax layout, fan_in x fan_out) with basis ``B``,
  ``inner`` sees coordinates ``C`` (zeros: the current weights are the
  origin) and the loss sees ``X + lift(C)``:

  * ``side="out"``: ``lift(C) = C B^T``, ``B``: fan_out x r, ``C``: fan_in x r.
  * ``side="in"``: ``lift(C) = B C``, ``B``: fan_in x r, ``C``: r x fan_out.
  * ``side="both"``: ``lift(C) = s B_in C B_out^T``, ``C``: r x r.

  ``s`` is 1, or ``sqrt(fan_in fan_out) / r`` with ``scale="sqrt_mn_over_r"``
  (SubZero, so that ``E||lift(Z)||_F^2 = m n`` for Gaussian ``Z``). The
  inner updates ``U`` are lifted the same way, ``X <- X + lift(U)`` after
  the outer chain's learning rate. Leaves that are not matrices are passed
  to ``inner`` unchanged, so one estimator perturbs the whole model in one
  forward pass per query. Incoming ``updates`` (if not None, e.g. first-order
  gradients) are projected with the adjoint of ``lift``.

  The loss reaches ``inner`` unchanged (``value_fn=`` or ``batch=``) plus a
  ``param_map=`` extra argument mapping coordinates to parameters, which
  `zojax.zo_grad` evaluates the loss through.

  Bases (``basis``): ``"haar"`` (orthonormal, QR of a Gaussian with sign
  fix), ``"gaussian"`` (iid N(0, 1), LOZO), or ``"momentum"`` (ZO-MOPI,
  ``side="out"`` only): on refresh, with ``M`` the first parameter-shaped
  buffer of the inner state (the momentum of `optax.ema`/`optax.trace`),
  ``B_new = QR([B_old V_k, G])`` where ``V_k`` are the top ``anchor_rank``
  right singular vectors of the (fan_in x r) coordinates ``M`` and ``G`` is
  Gaussian; the other columns are fresh.

  See the module docstring for the refresh rule and the re-projection of the
  inner state.

  Args:
    inner: the transform on coordinates, e.g.
      ``optax.chain(zojax.zo_grad(...), zojax.orthogonalize())``.
    rank: ``r >= 1``, clamped per leaf to the dimension the basis spans.
    refresh_every: redraw the basis every this many steps (None: never).
    side: ``"out"``, ``"in"`` or ``"both"``.
    basis: ``"haar"``, ``"gaussian"`` or ``"momentum"``.
    anchor_rank: ``k`` for ``basis="momentum"`` (``1 <= k <= rank``). Where
      ``k`` reaches a leaf's effective rank (its rank clamped to its output
      dimension) the refresh keeps the whole old basis and that leaf's
      subspace never changes: ``init`` then issues one `UserWarning` naming
      those leaves (not for leaves with an output dimension of 1, whose
      basis is +-1 anyway, nor with ``refresh_every=None``).
    scale: None or ``"sqrt_mn_over_r"`` (applies to perturbations and updates).
    update_scale: None, or ``"inverse_rank"`` to multiply the lifted updates
      (not the perturbations) of each matrix by ``1 / r`` (its clamped rank):
      LOZO's factor, which makes ``E[c U V^T] / r = G`` for Gaussian ``V``.
    weight_dimension_numbers: None (default rule), a
      `optax.contrib.MuonDimensionNumbers` for all leaves with >= 2 axes, or
      a pytree (or a callable returning one) of them, None marking leaves
      kept in full space. Axes named by neither field are batch axes (one
      basis per matrix of the batch).
    key: an integer or a `jax.random` key; the bases use its ``"subspace"``
      stream (``seed=``, its former name, is deprecated, as is ``dimension_numbers=`` for
      ``weight_dimension_numbers=``).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `SubspaceState`.

  Raises:
    ValueError: at construction for a bad rank, refresh interval, side,
      basis, anchor rank or scale; at init/trace time for dimension numbers
      that do not fit a leaf.

  Examples:
    >>> import jax.numpy as jnp, optax, zojax
    >>> params = {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}
    >>> loss = lambda p: jnp.sum((jnp.ones(8) @ p["kernel"] + p["bias"]) ** 2)
    >>> tx = optax.chain(
    ...     zojax.subspace(zojax.zo_grad(num_queries=2), rank=2, refresh_every=10),
    ...     optax.sgd(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> updates["kernel"].shape
    (8, 6)
  """
  key = _deprecations.renamed("zojax.subspace", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.subspace",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  rank = hyperparams.integer("rank", rank, minimum=1)
  if refresh_every is not None:
    refresh_every = hyperparams.integer("refresh_every (or None)", refresh_every, minimum=1)
  if side not in SIDES:
    raise ValueError(f"Unknown side {side!r}; expected one of {SIDES}.")
  if basis not in BASES:
    raise ValueError(f"Unknown basis {basis!r}; expected one of {BASES}.")
  if basis == "momentum":
    if side != "out":
      raise ValueError('basis="momentum" (ZO-MOPI) is defined for side="out" only.')
    if anchor_rank is None:
      raise ValueError('basis="momentum" needs 1 <= anchor_rank <= rank, got anchor_rank=None.')
    anchor_rank = hyperparams.integer("anchor_rank", anchor_rank, minimum=1)
    if isinstance(anchor_rank, int) and isinstance(rank, int) and anchor_rank > rank:
      raise ValueError(
        f'basis="momentum" needs 1 <= anchor_rank <= rank, got anchor_rank={anchor_rank} '
        f"> rank={rank}."
      )
  elif anchor_rank is not None:
    raise ValueError('anchor_rank is only used with basis="momentum".')
  if scale not in (None, "sqrt_mn_over_r"):
    raise ValueError(f"Unknown scale {scale!r}; expected None or 'sqrt_mn_over_r'.")
  if update_scale not in (None, "inverse_rank"):
    raise ValueError(f"Unknown update_scale {update_scale!r}; expected None or 'inverse_rank'.")
  inner = optax.with_extra_args_support(inner)
  basis_key = keys_lib.stream_key(keys_lib.as_key(key), "subspace")
  draw_kind = "gaussian" if basis == "gaussian" else "haar"
  orthonormal = basis != "gaussian"

  def geometry_of(params, state=None):
    array_leaves.check_array_leaves(params)
    if isinstance(rank, int):
      geo = _Geometry(params, rank, side, weight_dimension_numbers, scale)
      if state is not None:
        _check_bases(geo, state.bases)
      return geo
    if state is None:
      raise ValueError(
        "rank is traced here (optax.inject_hyperparams inside jax.jit or jax.eval_shape?), "
        "but it fixes the shapes of the state. Leave the preset's rank at its default, pass "
        "static_args=('rank',) to optax.inject_hyperparams, or call init outside jit."
      )
    # A traced rank (optax.inject_hyperparams): read back from the bases. Each
    # leaf's rank is min(rank, its limit), so the largest basis rank gives
    # the same per-leaf ranks as the rank the state was built with.
    widths = [
      jnp.shape(b[0] if isinstance(b, tuple) else b)[-1] for b in state.bases if not _no_basis(b)
    ]
    geo = _Geometry(params, max(widths, default=1), side, weight_dimension_numbers, scale)
    _check_bases(geo, state.bases)
    return geo

  def coords_like(geo, params):
    leaves = geo.treedef.flatten_up_to(params)
    out = [
      _flat(x) if spec is None else jnp.zeros(geo.coord_shape(spec), spec.dtype)
      for x, spec in zip(leaves, geo.specs)
    ]
    return jax.tree.unflatten(geo.treedef, out)

  def draw_bases(geo, key, count):
    k = keys_lib.step_key(key, count)
    leaf_keys = jax.random.split(k, len(geo.specs)) if geo.specs else []
    if draw_kind == "haar":
      return _draw_haar_bases(geo, leaf_keys)
    out, previous = [], None
    for i, spec in enumerate(geo.specs):
      if spec is None:
        out.append(())
        continue
      # Each draw waits for the previous basis: XLA drew every basis before
      # orthonormalizing any, holding several basis-sized buffers per leaf.
      leaf_key = leaf_keys[i] if previous is None else ordering.after(leaf_keys[i], previous)
      previous = _draw_gaussian_basis(geo, spec, leaf_key)
      out.append(previous)
    return out

  def init_fn(params):
    geo = geometry_of(params)
    if basis == "momentum" and refresh_every is not None and isinstance(anchor_rank, int):
      _warn_static_anchor(geo, params, anchor_rank)
    bases = draw_bases(geo, basis_key, jnp.zeros([], jnp.int32))
    return SubspaceState(
      count=jnp.zeros([], jnp.int32),
      key=basis_key,
      bases=tuple(bases),
      inner_state=inner.init(coords_like(geo, params)),
    )

  def refresh(geo, state, template):
    bases = list(state.bases)
    new = draw_bases(geo, state.key, state.count)
    if basis == "momentum":
      momentum = _first_param_shaped(state.inner_state, template)
      if momentum is None:
        raise ValueError(
          'basis="momentum" needs a parameter-shaped momentum in the inner state '
          "(e.g. optax.ema or optax.trace inside inner)."
        )
      for i, spec in enumerate(geo.specs):
        if spec is None:
          continue
        _, _, vt = jnp.linalg.svd(momentum[i].astype(jnp.float32), full_matrices=False)
        if isinstance(anchor_rank, int):
          k = min(anchor_rank, spec.rank, spec.fan_in)
          anchor = bases[i] @ _t(vt[..., :k, :])  # fan_out x k: the momentum's top directions
          stacked = jnp.concatenate([anchor, new[i][..., k:]], axis=-1)
        else:  # traced (optax.inject_hyperparams): the same columns, chosen by a mask
          width = min(spec.rank, spec.fan_in)
          anchor = bases[i] @ _t(vt[..., :width, :])
          anchor = jnp.pad(anchor, [(0, 0)] * (anchor.ndim - 1) + [(0, spec.rank - width)])
          keep = jnp.arange(spec.rank) < jnp.minimum(anchor_rank, width)
          stacked = jnp.where(keep, anchor, new[i])
        new[i] = stacked
      new = _orthonormalize_grouped(geo, new)

    def reproject(index, leaf):
      spec = geo.specs[index]
      if spec is None:
        return leaf
      return geo.reproject(spec, bases[index], new[index], leaf, orthonormal)

    inner_state = _map_param_shaped(state.inner_state, template, reproject)
    return tuple(new), inner_state

  def update_fn(updates, state, params=None, *, param_map=None, **extra_args):
    if params is None:
      raise ValueError("subspace needs params: call update(updates, state, params, ...).")
    geo = geometry_of(params, state)
    template = coords_like(geo, params)
    bases, inner_state = state.bases, state.inner_state
    if refresh_every is not None:
      do_refresh = (state.count > 0) & (state.count % refresh_every == 0)
      bases, inner_state = jax.lax.cond(
        do_refresh,
        lambda: refresh(geo, state, template),
        lambda: (state.bases, state.inner_state),
      )
    assemble = _Assemble(geo, geo.treedef.flatten_up_to(params), bases, param_map)

    if updates is None:
      inner_updates = None
    else:
      u_leaves = geo.treedef.flatten_up_to(updates)
      inner_updates = jax.tree.unflatten(
        geo.treedef,
        [
          _flat(u) if spec is None else geo.project(spec, b, spec.to_matrix(u)).astype(spec.dtype)
          for u, spec, b in zip(u_leaves, geo.specs, bases)
        ],
      )
    coord_updates, inner_state = inner.update(
      inner_updates, inner_state, template, param_map=assemble, **extra_args
    )
    cu_leaves = geo.treedef.flatten_up_to(coord_updates)

    def lift_update(u, spec, b, x):
      if spec is None:
        return _unflat(u, x)
      # The basis factor (often a transposed copy of the basis) is formed
      # only once the update exists: it depends on the state alone, and XLA
      # otherwise made every matrix's copy at the start of the step and held
      # them all through the forward passes.
      b = jax.tree.map(lambda a: ordering.after(a, u), b)
      factors = assemble._low_rank_factors(spec, b, u)
      if factors is not None:  # formed in the leaf's own layout: no transpose of a full matrix
        left, right = factors
        delta = _outer_sum(left, right)
      else:
        delta = spec.from_matrix(geo.lift(spec, b, u, fused=True))
      if update_scale == "inverse_rank":
        delta = delta / spec.rank
      return delta.astype(spec.dtype)

    lifted = [
      lift_update(u, spec, b, x)
      for u, spec, b, x in zip(cu_leaves, geo.specs, bases, assemble.p_leaves)
    ]
    new_state = SubspaceState(
      count=optax.safe_increment(state.count),
      key=state.key,
      bases=bases,
      inner_state=inner_state,
    )
    return jax.tree.unflatten(geo.treedef, lifted), new_state

  return optax.GradientTransformationExtraArgs(
    init_fn, eager.jit_when_concrete(update_fn, "subspace")
  )
