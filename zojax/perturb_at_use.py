"""Evaluate a loss at ``theta + s z`` without ever holding the perturbed weights.

A ZO forward pass needs the loss at perturbed weights ``theta + s z``. Built
up front, ``theta + s z`` is a second copy of every weight: harmless when the
activations dominate memory (a ViT at 224 px), but it doubles the memory of
a language-model step, where the weights dominate (MeZO's reason to exist is
fine-tuning at the memory of inference; arXiv 2305.17333 perturbs in place).

`value_at` traces the loss to a jaxpr and evaluates it with every large
perturbed leaf kept *lazy*: a lazy leaf is its unperturbed values plus the
recipe of its perturbation (the leaf's hash words, the scale, and the flat
index of each element in the leaf). The perturbation is computed only where
an operation consumes the leaf, and only for what that operation reads:

* ``scan`` over stacked layers: the leaf enters the loop unperturbed, and the
  body perturbs the slice of the current iteration. `zojax.fastrandom` draws
  an element from (key, flat index), so the slice gets exactly the numbers
  the whole-leaf draw would give it. Memory: one layer, not the stack.
* view operations (``slice``, ``reshape``, ``transpose``, ``squeeze``,
  ``gather``, ``dynamic_slice``, ...) apply to the leaf and to its index
  alike, so an embedding lookup perturbs only the gathered rows, and a
  label-word head only the label words' rows.
* nested ``jit``, ``remat``/``checkpoint``, ``custom_jvp``/``custom_vjp``
  calls are inlined and evaluated the same way.
* any other operation (a matmul, say) gets the perturbed leaf, computed just
  before it. The draw is made data-dependent on the operation's other inputs
  and on the leaf's own hash words (a zero that no compiler pass can prove
  is zero is added to the hash words and to the element indices, which are
  built from small 1-D iotas): XLA then can neither compute every
  perturbation at the start of the program, nor hoist a draw or an index
  array out of the queries' loop or a scan as loop-invariant code, nor merge
  the draws of the two queries and of the update into one stored direction
  (its common-subexpression pass). Each of these kept a full perturbed copy
  (or leaf-sized index arrays) alive in a probe of 12 unrolled layers, and
  `jax.lax.optimization_barrier` did not prevent them on XLA's CPU backend.

Why a jaxpr interpreter rather than an API the model calls: any model (Flax
linen or NNX, equinox, plain functions, unrolled or scanned layers) gets it
unchanged, and the estimate is the same as perturbing up front up to float
rounding (the same formula, ``round(theta + s z)`` in the leaf's dtype, is
applied to the same draws). Why not MeZO's in-place chain (``theta += eps z``,
``theta -= 2 eps z``, ...): inside one XLA program "in place" is up to buffer
assignment, it drifts ``theta`` by rounding every step (so a replay or a
resumed run is no longer exact), and it cannot be expressed through optax's
``updates`` interface, which needs ``theta`` intact until `optax.apply_updates`.

Data parallelism: under `jax.shard_map` or `jax.pmap` the ordering zero is
computed from the replica's own activations and costs no communication.
Under plain sharded `jit`, reading one element of a batch-sharded activation
makes XLA's partitioner insert one scalar all-reduce per perturbed weight
outside a ``scan`` body (inside one no ordering zero is used: a body holds
one layer's slices anyway). Scalars still, but more of them than the loss
values; scanned layers, `jax.shard_map`, or ``perturb_at_use=False`` avoid
them.

Leaves below `zojax.perturbations.GROUP_BELOW` entries, leaves whose draws
are not float32 (float64 leaves use `jax.random`), and leaves an operation
above cannot see through (a ``while`` loop, a ``cond``) are perturbed up
front or at that operation, as before: never wrong, only not lazy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from zojax import fastrandom, ordering, perturbations
from zojax import keys as keys_lib

__all__ = [
  "value_at",
  "lazy_leaf_count",
  "low_rank",
  "deferred",
  "patched",
  "concrete",
  "reshaped",
  "scaled",
  "transposed",
]


class _Deferred:
  """A perturbed value computed where it is used (`materialize`)."""

  def materialize(self, zero: jax.Array | None = None) -> jax.Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Thunk(_Deferred):
  """Any perturbed leaf given as a function of a data-dependent zero."""

  fn: Callable[[jax.Array | None], jax.Array]
  shape_like: Any  # a jax.ShapeDtypeStruct of the value

  def materialize(self, zero=None):
    return self.fn(zero)


@dataclasses.dataclass(frozen=True)
class _LowRank(_Deferred):
  """``round(base + left @ right)`` in the base's dtype (a subspace perturbation).

  ``left`` has the base's leading axes and the rank as its last axis, so a
  row gather of the base gathers the rows of ``left`` (an embedding lookup
  perturbs only the rows it reads). A factor is an array or a `deferred`
  value (e.g. drawn coordinates), formed with the product where it is used.
  """

  base: Any
  left: Any
  right: Any

  def materialize(self, zero=None):
    if isinstance(self.left, _Deferred) or isinstance(self.right, _Deferred):
      left, right = _factor(self.left, zero), _factor(self.right, zero)
    else:
      left = self.left if zero is None else self.left + zero.astype(self.left.dtype)
      right = self.right
    delta = jnp.matmul(left.astype(jnp.float32), right.astype(jnp.float32))
    return (self.base.astype(jnp.float32) + delta).astype(self.base.dtype)

  def with_concrete_factors(self, zero=None, keep=lambda f: False) -> _LowRank:
    """The factors formed now (after ``zero``), except those ``keep`` selects."""
    left, right = ((f if keep(f) else _factor(f, zero)) for f in (self.left, self.right))
    return _LowRank(self.base, left, right)


def _factor(f, zero):
  """A low-rank factor as an array (a deferred one formed now, after ``zero``)."""
  return f.materialize(zero) if isinstance(f, _Deferred) else f


def _shape(f) -> tuple[int, ...]:
  if isinstance(f, _Thunk):
    return tuple(f.shape_like.shape)
  if isinstance(f, _Lazy):
    return tuple(jnp.shape(f.base))
  if isinstance(f, _Transposed):
    shape = tuple(jnp.shape(f.array))
    return (*shape[:-2], shape[-1], shape[-2])
  return tuple(jnp.shape(f))


def _dtype(f):
  if isinstance(f, _Thunk):
    return f.shape_like.dtype
  if isinstance(f, _Lazy):
    return jnp.result_type(f.base)
  if isinstance(f, _Transposed):
    return jnp.result_type(f.array)
  return jnp.result_type(f)


def low_rank(base, left, right) -> _Deferred:
  """A leaf ``round(base + left @ right)`` that `value_at` forms at its point of use.

  For combinators whose perturbation of a matrix leaf is low-rank
  (`zojax.subspace`); see `value_at`'s ``param_map``. ``left`` and ``right``
  are arrays or `deferred` values; a deferred factor is formed where the
  leaf is used, after that operation's other inputs, so XLA neither
  computes it early nor stores it for another use (its draw is recomputed).
  """
  return _LowRank(base, left, right)


def deferred(fn: Callable[[jax.Array | None], jax.Array], shape_like) -> _Deferred:
  """A leaf ``fn(zero)`` that `value_at` computes at its point of use.

  ``fn`` must return the same values for any ``zero`` (a uint32 zero that
  carries data dependencies, or None; add it to an input so the computation
  is scheduled late). ``shape_like`` has the value's shape and dtype.
  """
  return _Thunk(fn, jax.ShapeDtypeStruct(shape_like.shape, jnp.result_type(shape_like.dtype)))


@dataclasses.dataclass(frozen=True)
class _Transposed(_Deferred):
  """An array's transpose over its last two axes, formed where it is used.

  As a factor of a stacked `low_rank` leaf, a scan forms the transpose of one
  layer's slice per iteration: transposing the whole stack (a copy, as
  XLA's matmuls want the layout) would be made before the loop and held
  through it.
  """

  array: Any

  def materialize(self, zero=None):
    del zero
    return jnp.swapaxes(self.array, -1, -2)


def transposed(x: jax.Array) -> _Deferred:
  """``swapaxes(x, -1, -2)`` as a `low_rank` factor, formed per slice inside a scan."""
  return _Transposed(x)


def scaled(value, factor: float, *, zero_base: bool = False):
  """``factor * value`` for a deferred leaf, still deferred.

  A perturbed draw ``round(base + s z)`` stays a draw,
  ``round(factor base + (factor s) z)`` (equal up to float rounding): a
  `lax.scan` over stacked layers then forms one layer's slice of it per
  iteration, as it does for the leaf itself, where a `deferred` function of
  the draw would be formed for the whole stack before the loop. Other values
  are multiplied now (arrays) or when formed (other deferred values).

  Args:
    value: an array or a deferred value.
    factor: a Python float.
    zero_base: the caller knows the draw's base is zero (`zojax.subspace`'s
      coordinates): a scan then makes each slice's zero base inside the loop
      instead of slicing a stack of zeros.

  Returns:
    The scaled value, deferred where ``value`` is.
  """
  if isinstance(value, _Lazy) and value.base.dtype == jnp.float32:
    return dataclasses.replace(
      value,
      base=value.base * jnp.float32(factor),
      scale=value.scale * jnp.float32(factor),
      zero_base=zero_base,
    )
  if isinstance(value, _Deferred):
    like = jax.eval_shape(lambda: concrete(value))
    return deferred(lambda zero: value.materialize(zero) * jnp.asarray(factor, like.dtype), like)
  return value * factor


@dataclasses.dataclass(frozen=True)
class _Patched(_Deferred):
  """``base`` with its slice ``position`` (axis 0) replaced by the deferred ``piece``.

  A stacked leaf of which one layer is perturbed (`zojax.block_coordinate`
  with `zojax.StackedBlocks`). A ``scan`` over the stack forms the piece in
  the iteration that reads that layer and passes the other layers through.
  """

  base: Any
  position: int
  piece: _Deferred

  def materialize(self, zero=None):
    piece = self.piece.materialize(zero).astype(self.base.dtype)
    return lax.dynamic_update_index_in_dim(self.base, piece, self.position, 0)


def patched(base, position: int, piece):
  """A stacked leaf ``base`` whose slice ``position`` along axis 0 is ``piece``.

  ``piece`` is a deferred perturbed slice (or an array). Where `value_at`
  meets the result as an input scanned over by ``lax.scan``, only the
  iteration that reads slice ``position`` forms the piece: no perturbed copy
  of the stack exists. Any other use materializes the patched stack.
  """
  position = int(position)
  if not 0 <= position < jnp.shape(base)[0]:
    raise ValueError(f"position must lie in [0, {jnp.shape(base)[0]}), got {position}.")
  if not _is_lazy(piece):
    return lax.dynamic_update_index_in_dim(base, jnp.asarray(piece, base.dtype), position, 0)
  if tuple(_shape_of(piece)) != tuple(jnp.shape(base)[1:]):
    raise ValueError(
      f"piece has shape {tuple(_shape_of(piece))}, expected one slice of the base: "
      f"{tuple(jnp.shape(base)[1:])}."
    )
  return _Patched(base, position, piece)


def _shape_of(value) -> tuple[int, ...]:
  return tuple(jnp.shape(_base_of(value)))


def concrete(value):
  """``value`` itself, or the perturbed array a deferred leaf stands for."""
  return value.materialize() if isinstance(value, _Deferred) else value


def reshaped(value, shape: tuple[int, ...]):
  """``value`` (an array or a deferred leaf) reshaped row-major to ``shape``, still deferred."""
  shape = tuple(shape)
  if isinstance(value, _Lazy):
    if value.index is None:  # a row-major reshape keeps a contiguous view contiguous
      return dataclasses.replace(value, base=jnp.reshape(value.base, shape))
    return value.with_view(jnp.reshape(value.base, shape), lambda index: jnp.reshape(index, shape))
  if isinstance(value, _Deferred):
    like = _base_of(value)
    return _Thunk(
      lambda zero: jnp.reshape(value.materialize(zero), shape),
      jax.ShapeDtypeStruct(shape, jnp.result_type(like)),
    )
  return jnp.reshape(value, shape)


@dataclasses.dataclass(frozen=True)
class _Lazy(_Deferred):
  """A view of a perturbed leaf: ``round(base + scale * factor * z[index])``.

  Attributes:
    base: the unperturbed values of this view.
    words: the leaf's `zojax.fastrandom` hash words ``(k0, k1)``.
    scale: float32 scalar ``s`` (e.g. ``+eps``).
    factor: float32 scalar multiplying the draw (the sphere normalisation),
      or None.
    offset: for a contiguous view, the flat index of its first element in the
      leaf (the view's elements are then ``offset + 0, 1, ...`` row-major);
      None when ``index`` is given instead.
    index: for other views, a function of a uint32 zero returning the uint32
      flat indices of the view's elements (shape ``base.shape``).
    distribution: ``"gaussian"`` or ``"rademacher"``.
    sentinel: whether some indices are ``0xFFFFFFFF``, elements a fill-mode
      gather read out of bounds, which keep their (fill) value.
    zero_base: ``base`` is known to be zero (see `scaled`).
  """

  base: Any
  words: tuple
  scale: Any
  factor: Any
  offset: Any
  index: Callable[[jax.Array], jax.Array] | None
  distribution: str
  sentinel: bool = False
  zero_base: bool = False

  def indices(self, zero: jax.Array) -> jax.Array:
    """uint32 flat indices of the view's elements in the leaf (plus ``zero``)."""
    if self.index is not None:
      return self.index(zero)
    return _contiguous_indices(self.base.shape, jnp.asarray(self.offset, jnp.uint32) + zero)

  def with_view(self, base, index_op: Callable[[jax.Array], jax.Array], sentinel=False) -> _Lazy:
    parent = self.indices
    return dataclasses.replace(
      self,
      base=base,
      offset=None,
      index=lambda zero: index_op(parent(zero)),
      sentinel=self.sentinel or sentinel,
    )

  def materialize(self, zero: jax.Array | None = None) -> jax.Array:
    """``round(base + s z)`` in the base's dtype, as `zojax.perturbations.perturb`.

    ``zero`` (a uint32 zero with data dependencies, see `_zero_depending_on`)
    is added to the hash words and the indices, together with a zero that
    depends on the hash words themselves: same values, but nothing of the
    draw is loop-invariant or shared with another draw, so XLA neither
    hoists an index array out of a loop nor stores one for several uses.
    """
    k0, k1 = self.words
    zero = _zero_of_word(k0) + (jnp.uint32(0) if zero is None else zero)
    k0, k1 = k0 + zero, k1 + zero
    index = self.indices(zero)
    bits = fastrandom.bits_at((k0, k1), index)
    if self.distribution == "rademacher":
      z = fastrandom.rademacher_from_bits(bits, jnp.float32)
    else:
      z = fastrandom.normal_from_bits(bits, jnp.float32)
    if self.factor is not None:
      z = z * self.factor
    out = (self.base.astype(jnp.float32) + self.scale * z).astype(self.base.dtype)
    if self.sentinel:  # rows a fill-mode gather read out of bounds keep the fill value
      out = jnp.where(index == _SENTINEL, self.base, out)
    return out


_SENTINEL = np.uint32(0xFFFFFFFF)


def _zero_of_word(word: jax.Array) -> jax.Array:
  """A uint32 zero computed from ``word`` (see `_zero_depending_on`)."""
  f = lax.bitcast_convert_type(jnp.asarray(word, jnp.uint32), jnp.float32)
  return ((f != f) & (f == f)).astype(jnp.uint32)


def _contiguous_indices(shape: tuple[int, ...], start: jax.Array) -> jax.Array:
  """``start + (row-major flat index)`` for every element of ``shape``.

  Built from one small 1-D iota per axis, broadcast and added: XLA fuses that
  into the draw, where a ``shape``-sized iota would be hoisted out of loops
  and stored. ``start`` (which carries the draw's data-dependent zero) joins
  the first line added, so no partial sum of the lines is loop-invariant
  either: with it on the outermost axis, XLA hoisted the sum of the inner
  axes' lines (an index array of the whole stack of a scanned leaf's
  coordinates) out of the queries' loop.
  """
  if not shape:
    return start
  out = None
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    line = lax.iota(jnp.uint32, shape[axis]) * jnp.uint32(stride)
    if axis == len(shape) - 1:
      line = line + start
    part = lax.broadcast_in_dim(line, shape, (axis,))
    out = part if out is None else out + part
    stride *= shape[axis]
  return out


def _is_lazy(x) -> bool:
  return isinstance(x, _Deferred)


def _zero_depending_on(values: Sequence[Any]) -> jax.Array | None:
  """A uint32 zero that XLA cannot compute before ``values`` exist (`zojax.ordering`).

  Depends on the first element of the first floating-point array among
  ``values`` (None if there is none). XLA's CPU pipeline expands
  `jax.lax.optimization_barrier` before it schedules, and its loop-invariant
  code motion and common-subexpression passes then hoist and merge the draws
  (the probe behind this module); a data dependency survives them.
  """
  return ordering.zero_after([v for v in values if not _is_lazy(v)])


_SCAN_DEPTH = [0]  # > 0 while a scan body is being evaluated


def _tie_and_materialize(values: Sequence[Any]) -> list[Any]:
  """Materializes the lazy entries of ``values`` once the others exist.

  Each draw's hash words and element indices get a zero added that depends
  on the operation's other inputs (`_zero_depending_on`), so XLA can neither
  compute the perturbation early, nor hoist it out of the queries' loop, nor
  merge it with the same draw elsewhere (the other query, the update).
  """
  if not any(_is_lazy(v) for v in values):
    return list(values)
  # Inside a scan body only one layer's slices are live anyway: no tie there,
  # which also spares sharded-jit data parallelism its scalar collectives.
  zero = None if _SCAN_DEPTH[0] else _zero_depending_on([v for v in values if not _is_lazy(v)])
  out = []
  for v in values:
    if _is_lazy(v):
      out.append(v.materialize(zero))
    else:
      out.append(v)
  return out


def _bind_params(primitive, params) -> tuple[list, dict]:
  bound = primitive.get_bind_params(params)
  if isinstance(bound, tuple):  # older JAX: (subfuns, params)
    return list(bound[0]), bound[1]
  return [], bound


def _bind(eqn, invals, params=None):
  subfuns, bind_params = _bind_params(eqn.primitive, eqn.params if params is None else params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


def _materialize_rule(eqn, invals):
  return _bind(eqn, _tie_and_materialize(invals))


def _view_rule(eqn, invals):
  """Operand 0 lazy, the rest plain: apply the op to the values and the indices."""
  if any(_is_lazy(v) for v in invals[1:]):
    return _materialize_rule(eqn, invals)
  lazy, rest = invals[0], invals[1:]
  if isinstance(lazy, _LowRank):
    return _low_rank_view(eqn, lazy, rest)
  if not isinstance(lazy, _Lazy):
    return _materialize_rule(eqn, invals)
  (base,) = _bind(eqn, [lazy.base, *rest])
  params = dict(eqn.params)
  sentinel = False
  if "fill_value" in params:
    # Out-of-bounds rows of a fill-mode gather keep the fill value, unperturbed.
    params["fill_value"] = _SENTINEL
    sentinel = params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP

  def index_op(index):
    return _bind(eqn, [index, *rest], params)[0]

  if eqn.primitive.name == "reshape" and lazy.index is None and not params.get("dimensions"):
    # Row-major reshapes keep a contiguous view contiguous.
    return [dataclasses.replace(lazy, base=base)]
  return [lazy.with_view(base, index_op, sentinel)]


def _low_rank_view(eqn, lazy: _LowRank, rest):
  """Row gathers (embedding lookups) gather the rows of ``left``; other views materialize."""
  p = eqn.params
  if eqn.primitive.name == "gather" and lazy.base.ndim == 2:
    dn = p["dimension_numbers"]
    (indices,) = rest
    if (
      tuple(dn.collapsed_slice_dims) == (0,)
      and tuple(dn.start_index_map) == (0,)
      and tuple(dn.offset_dims) == (indices.ndim - 1,)
      and not tuple(dn.operand_batching_dims)
      and tuple(p["slice_sizes"]) == (1, lazy.base.shape[1])
    ):
      (base,) = _bind(eqn, [lazy.base, indices])
      rank = _shape(lazy.left)[-1]
      params = dict(p, slice_sizes=(1, rank))
      if isinstance(lazy.left, _Deferred):
        source = lazy.left
        left = _Thunk(
          lambda zero: _bind(eqn, [source.materialize(zero), indices], params)[0],
          jax.ShapeDtypeStruct((*base.shape[:-1], rank), _dtype(source)),
        )
      else:
        (left,) = _bind(eqn, [lazy.left, indices], params)
      return [_LowRank(base, left, lazy.right)]
  return _materialize_rule(eqn, [lazy, *rest])


def _inline_rule(jaxpr_param: str):
  def rule(eqn, invals):
    closed = eqn.params[jaxpr_param]
    if isinstance(closed, jex_core.ClosedJaxpr):
      jaxpr, consts = closed.jaxpr, closed.consts
    else:
      jaxpr, consts = closed, ()
    if len(jaxpr.invars) != len(invals):
      return _materialize_rule(eqn, invals)
    return _materialize_outputs(_eval_jaxpr(jaxpr, consts, invals))

  return rule


def _custom_jvp_rule(eqn, invals):
  num_consts = eqn.params.get("num_consts", 0)
  del num_consts  # the call jaxpr takes consts and arguments alike
  return _inline_rule("call_jaxpr")(eqn, invals)


def _sliceable(x, length: int) -> bool:
  """Whether a scanned-over input can enter the loop deferred and be perturbed per slice."""
  if isinstance(x, _Lazy):
    return x.index is None and x.base.ndim >= 1 and x.base.shape[0] == length
  if isinstance(x, _LowRank):
    shapes = (jnp.shape(x.base), _shape(x.left), _shape(x.right))
    return all(len(a) >= 3 and a[0] == length for a in shapes)
  if isinstance(x, _Patched):
    return x.base.shape[0] == length
  return False


def _sliced_draw(f) -> bool:
  """Whether a low-rank factor is a contiguous draw a scan can form one slice at a time."""
  return isinstance(f, _Lazy) and f.index is None


def _formed_per_slice(f) -> bool:
  """Whether a scan forms a low-rank factor one slice per iteration (not before the loop)."""
  return _sliced_draw(f) or isinstance(f, _Transposed)


def _draw_slice_source(f):
  """What a scan iterates over for a factor: the base of a draw (None if zero), else the array."""
  if _sliced_draw(f):
    return None if f.zero_base else f.base
  if isinstance(f, _Transposed):
    return f.array
  return f


def _draw_slice(f, piece, step):
  """Iteration ``step``'s slice of a factor, from its slice of `_draw_slice_source`."""
  if isinstance(f, _Transposed):
    return jnp.swapaxes(piece, -1, -2)
  if not _sliced_draw(f):
    return piece
  shape = f.base.shape[1:]
  base = jnp.zeros(shape, f.base.dtype) if f.zero_base else piece
  offset = jnp.asarray(f.offset, jnp.uint32) + step * jnp.uint32(math.prod(shape))
  return dataclasses.replace(f, base=base, offset=offset)


def _scan_rule(eqn, invals):
  """Perturbs a stacked leaf one slice per iteration, inside the scan body.

  A lazy draw is sliced by offset (its slice's draws are the whole leaf's);
  a low-rank leaf (stacked matrices, `low_rank` with batched factors) by
  slicing its base and both factors.
  """
  p = eqn.params
  num_consts, num_carry, length = p["num_consts"], p["num_carry"], p["length"]
  consts = invals[:num_consts]
  carry = invals[num_consts : num_consts + num_carry]
  xs = invals[num_consts + num_carry :]
  sliced = [i for i, x in enumerate(xs) if _sliceable(x, length)]
  if not sliced:
    return _materialize_rule(eqn, invals)
  # Lazy consts, carries, or xs that are not contiguous views: materialized
  # before the loop (correct, only not lazy).
  front = _tie_and_materialize(
    [
      v if not (_is_lazy(v) and i - num_consts - num_carry in sliced) else None
      for i, v in enumerate(invals)
    ]
  )
  consts = front[:num_consts]
  carry = front[num_consts : num_consts + num_carry]
  plain_xs = [None if i in sliced else front[num_consts + num_carry + i] for i in range(len(xs))]
  if any(isinstance(xs[i], _LowRank) for i in sliced):
    # Deferred factors (drawn coordinates, one slice per layer) are formed
    # before the loop, after its other inputs; the body slices them.
    # Contiguous draws (`scaled` coordinates) stay draws, sliced per iteration.
    zero = _zero_depending_on([v for v in front if v is not None])
    xs = [
      x.with_concrete_factors(zero, keep=_formed_per_slice)
      if i in sliced and isinstance(x, _LowRank)
      else x
      for i, x in enumerate(xs)
    ]
  pieces = [
    (xs[i].base, _draw_slice_source(xs[i].left), _draw_slice_source(xs[i].right))
    if isinstance(xs[i], _LowRank)
    else (xs[i].base,)
    for i in sliced
  ]
  body = p["jaxpr"]

  def body_fn(carry_in, x):
    plain_slices, piece_slices, step = x
    args = list(consts) + list(carry_in)
    it = iter(piece_slices)
    for i, plain in enumerate(plain_slices):
      if i in sliced:
        lazy = xs[i]
        piece = next(it)
        if isinstance(lazy, _LowRank):
          base, left, right = piece
          args.append(
            _LowRank(base, _draw_slice(lazy.left, left, step), _draw_slice(lazy.right, right, step))
          )
          continue
        if isinstance(lazy, _Patched):
          args.append(_patched_slice(lazy, piece[0], step))
          continue
        per_slice = math.prod(lazy.base.shape[1:])
        offset = jnp.asarray(lazy.offset, jnp.uint32) + step * jnp.uint32(per_slice)
        args.append(dataclasses.replace(lazy, base=piece[0], offset=offset))
      else:
        args.append(plain)
    _SCAN_DEPTH[0] += 1
    try:
      outs = _materialize_outputs(_eval_jaxpr(body.jaxpr, body.consts, args))
    finally:
      _SCAN_DEPTH[0] -= 1
    return outs[:num_carry], outs[num_carry:]

  steps = lax.iota(jnp.uint32, length)
  carry_out, ys = lax.scan(
    body_fn,
    list(carry),
    (plain_xs, pieces, steps),
    length=length,
    reverse=p["reverse"],
    unroll=p["unroll"],
  )
  return list(carry_out) + list(ys)


def _patched_slice(patched: _Patched, layer: jax.Array, step: jax.Array) -> _Thunk:
  """Iteration ``step``'s slice of a patched stack: the piece at its position, else ``layer``.

  A conditional, so the other iterations draw nothing (MeZO-BCD's saving).
  """

  def form(zero):
    return lax.cond(
      step == jnp.uint32(patched.position),
      lambda: patched.piece.materialize(zero).astype(layer.dtype),
      lambda: layer,
    )

  return _Thunk(form, jax.ShapeDtypeStruct(layer.shape, layer.dtype))


_VIEW_PRIMITIVES = (
  "reshape",
  "slice",
  "squeeze",
  "transpose",
  "rev",
  "gather",
  "dynamic_slice",
  "broadcast_in_dim",
  "copy",
  "copy_p",
)

_RULES: dict[str, Callable] = {name: _view_rule for name in _VIEW_PRIMITIVES}
_RULES.update(
  {
    "jit": _inline_rule("jaxpr"),
    "pjit": _inline_rule("jaxpr"),
    "closed_call": _inline_rule("call_jaxpr"),
    "core_call": _inline_rule("call_jaxpr"),
    "remat2": _inline_rule("jaxpr"),
    "checkpoint": _inline_rule("jaxpr"),
    "custom_jvp_call": _custom_jvp_rule,
    "custom_vjp_call": _inline_rule("call_jaxpr"),
    "custom_vjp_call_jaxpr": _inline_rule("fun_jaxpr"),
    "scan": _scan_rule,
  }
)


def _materialize_outputs(values):
  if any(_is_lazy(v) for v in values):
    return [v.materialize() if _is_lazy(v) else v for v in values]
  return values


def _eval_jaxpr(jaxpr, consts, args):
  env: dict = {}

  def read(var):
    if isinstance(var, jex_core.Literal):
      return var.val
    return env[var]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(_is_lazy(v) for v in invals):
      rule = _RULES.get(eqn.primitive.name, _materialize_rule)
      outvals = rule(eqn, invals)
    else:
      outvals = _bind(eqn, invals)
    for var, val in zip(eqn.outvars, outvals):
      if not isinstance(var, jex_core.DropVar):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _lazy_flags(params, flags, distribution) -> list[bool]:
  """Which perturbed leaves are evaluated lazily (large, float32 draws)."""
  out = []
  for leaf, flag in zip(jax.tree.leaves(params), flags):
    dtype = jnp.result_type(leaf)
    out.append(
      bool(flag)
      and distribution in ("gaussian", "rademacher", "sphere")
      and perturbations.draw_dtype(dtype) == jnp.float32
      and math.prod(jnp.shape(leaf)) >= perturbations.GROUP_BELOW
    )
  return out


def lazy_leaf_count(params, mask: perturbations.Mask = None, distribution="gaussian") -> int:
  """How many leaves of ``params`` `value_at` perturbs at their point of use."""
  flags = perturbations.perturbable_leaves(params, mask)
  return sum(_lazy_flags(params, flags, distribution))


def _perturbed_values(params, key, scale, distribution, flags) -> list:
  """Per leaf: a lazy draw for large float32-draw leaves, else the perturbed array."""
  lazy = _lazy_flags(params, flags, distribution)
  leaves = jax.tree.leaves(params)
  factor = None
  if distribution == "sphere" and any(lazy):
    factor = perturbations.sphere_factor(key, params, flags)
  # Small (and non-float32-draw) leaves: perturbed up front, as `perturb` does.
  eager_flags = [f and not lz for f, lz in zip(flags, lazy)]
  eager = perturbations.perturb_flagged(params, key, scale, distribution, eager_flags, factor)
  eager_leaves = jax.tree.leaves(eager)
  all_keys = keys_lib.leaf_keys(key, params)
  base_distribution = "gaussian" if distribution == "sphere" else distribution
  out = []
  for index, (leaf, is_lazy) in enumerate(zip(leaves, lazy)):
    if is_lazy:
      out.append(
        _Lazy(
          base=jnp.asarray(leaf),
          words=fastrandom.seed_words(all_keys[index]),
          scale=scale,
          factor=factor,
          offset=jnp.uint32(0),
          index=None,
          distribution=base_distribution,
        )
      )
    else:
      out.append(eager_leaves[index])
  return out


def value_at(
  value_fn: Callable[[Any], jax.Array],
  params,
  key: jax.Array,
  scale: jax.Array | float,
  distribution: str = "gaussian",
  mask: perturbations.Mask = None,
  param_map: Callable[[Any], Any] | None = None,
):
  """``value_fn(perturb(params, key, scale))``, perturbing each leaf where it is used.

  Equal to ``value_fn(zojax.perturbations.perturb(params, key, scale,
  distribution, mask))`` up to float rounding (the same draws and the same
  per-element formula ``round(theta + s z)``), with at most the slice of a
  perturbed leaf that one operation reads held at a time (see the module
  docstring).

  With ``param_map`` (the map a combinator such as `zojax.subspace` passes
  from the estimator's coordinates to the model's parameters) the value is
  ``value_fn(param_map(perturb(params, ...)))``. A ``param_map`` that has a
  method ``deferred_leaves(values) -> (treedef, leaves) | None`` takes the
  perturbed coordinates (arrays or deferred values; `concrete` turns one
  into its array) and returns the parameters' leaves, deferred where it can
  (`low_rank`, `deferred`), so that its own parameter-sized work also
  happens at the point of use; any other ``param_map`` is traced together
  with ``value_fn``.

  Args:
    value_fn: the loss, a function of the parameter pytree.
    params: the parameter pytree (the estimator's coordinates with
      ``param_map``).
    key: the query key (as for `zojax.perturbations.perturb`).
    scale: the scalar ``s``.
    distribution: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
    mask: which leaves are perturbed (see `zojax.perturbations.resolve_mask`).
    param_map: optional map from ``params`` to the parameters ``value_fn``
      takes.

  Returns:
    The outputs of ``value_fn`` (a pytree, as ``value_fn`` returns it).
  """
  perturbations.check_distribution(distribution)
  flags = perturbations.perturbable_leaves(params, mask)
  scale = jnp.asarray(scale, jnp.float32)
  values = _perturbed_values(params, key, scale, distribution, flags)
  placed = None
  if param_map is not None and hasattr(param_map, "deferred_leaves"):
    placed = param_map.deferred_leaves(values)
  if placed is not None:
    full_treedef, args = placed
    shapes = jax.tree.unflatten(
      full_treedef,
      [jax.ShapeDtypeStruct(jnp.shape(_base_of(a)), jnp.result_type(_base_of(a))) for a in args],
    )
    fn = value_fn
  else:
    args, shapes = values, params
    fn = value_fn if param_map is None else (lambda p: value_fn(param_map(p)))
    if not any(_is_lazy(a) for a in args):
      return fn(jax.tree.unflatten(jax.tree.structure(params), args))
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(shapes)
  outs = _materialize_outputs(_eval_jaxpr(closed.jaxpr, closed.consts, args))
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _base_of(value):
  """The array whose shape and dtype a (possibly deferred) leaf has."""
  if isinstance(value, (_Lazy, _LowRank, _Patched)):
    return value.base
  if isinstance(value, _Thunk):
    return value.shape_like
  return value
