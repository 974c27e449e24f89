"""Random perturbation directions over a parameter pytree.

A direction ``z`` has the structure of the parameters. It is never stored
between uses: every function here regenerates it from a key (see
`zojax.keys`), so the same key gives the same ``z`` for the forward passes
and for the update.

Three distributions are offered, each with ``E[z z^T] = I`` over the
perturbed coordinates, which makes the SPSA estimate ``c z`` unbiased up to
O(eps^2) (ALGORITHMS.md section 1.1):

* ``"gaussian"``: ``z ~ N(0, I_d)``, MeZO's choice (arXiv 2305.17333).
* ``"rademacher"``: iid entries in {-1, +1} (Spall's SPSA; FZOO,
  arXiv 2506.09034).
* ``"sphere"``: uniform on the sphere of radius ``sqrt(d)``, the root mean
  square norm of the Gaussian (``E||z||^2 = d``). We scale to ``sqrt(d)``
  rather than to ``E||z||`` (which is slightly smaller) so the covariance is
  exactly the identity and the estimator stays unbiased. ``d`` counts every
  perturbed entry of the tree: the direction is uniform on the sphere of the
  whole model, not per leaf.

Only floating-point leaves can be perturbed. Leaves are selected by a mask
(a pytree of booleans with the structure of the parameters, or a callable
returning one); masked-out leaves are left untouched and get zero updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from zojax import fastrandom
from zojax import keys as keys_lib

DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")

Mask = Any | Callable[[Any], Any] | None

__all__ = [
  "DISTRIBUTIONS",
  "check_distribution",
  "check_not_masked",
  "resolve_mask",
  "perturbable_leaves",
  "sample_direction",
  "perturb",
  "perturb_flagged",
  "sphere_factor",
  "combine_directions",
]


def check_distribution(distribution: str) -> str:
  """Returns ``distribution`` or raises a ValueError naming the valid ones."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
      f"Unknown direction distribution {distribution!r}; expected one of {DISTRIBUTIONS}."
    )
  return distribution


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def resolve_mask(mask: Mask, params) -> list[bool]:
  """Returns one Python bool per leaf of ``params``: True if it is perturbed.

  Args:
    mask: None (every leaf), a pytree of booleans with the structure of
      ``params``, or a callable mapping ``params`` to such a pytree. The mask
      must be static (Python booleans), as for `optax.masked`.
    params: the parameter pytree.

  Returns:
    A list of bools in `jax.tree.leaves(params)` order.

  Raises:
    ValueError: if the mask does not match the structure of ``params`` or is
      not made of static booleans.
  """
  num_leaves = len(jax.tree.leaves(params))
  if mask is None:
    return [True] * num_leaves
  mask_tree = mask(params) if callable(mask) else mask
  params_def = jax.tree.structure(params)
  try:
    flat = params_def.flatten_up_to(mask_tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "The mask must have the same pytree structure as the parameters "
      f"({params_def}); got {jax.tree.structure(mask_tree)}."
    ) from err
  out = []
  for value in flat:
    if isinstance(value, jax.core.Tracer):
      raise ValueError("The mask must hold static Python booleans, not traced arrays.")
    out.append(bool(value))
  return out


def check_not_masked(params) -> None:
  """Raises a clear error if ``params`` holds `optax.MaskedNode` placeholders.

  `optax.masked` and `optax.multi_transform` hand the transform they wrap
  only the leaves of its label, with `optax.MaskedNode` in place of the
  others. A ZO estimator evaluates the loss, which needs every parameter, so
  it cannot run there.

  Raises:
    TypeError: naming the wrappers and the supported way to freeze leaves.
  """
  is_masked_node = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  if any(is_masked_node(x) for x in jax.tree.leaves(params, is_leaf=is_masked_node)):
    raise TypeError(
      "The parameters contain optax.MaskedNode placeholders: a zojax estimator was wrapped "
      "in optax.masked or optax.multi_transform, which hide the other leaves from it, but "
      "the loss needs every parameter. To train some leaves and freeze the others, pass "
      "mask= to the estimator or preset (zojax.mezo(lr, mask={'w': True, 'b': False})): "
      "masked-out leaves are neither perturbed nor updated. Use optax.masked and "
      "optax.multi_transform only for transforms after the estimator."
    )


def perturbable_leaves(params, mask: Mask = None) -> list[bool]:
  """Validates ``params`` for perturbation and returns the resolved mask.

  Args:
    params: the parameter pytree.
    mask: see `resolve_mask`.

  Returns:
    One bool per leaf, True where the leaf is perturbed.

  Raises:
    TypeError: if a leaf that is not masked out is not a real floating-point
      array (integer, bool or complex), naming its path; or if ``params`` holds
      `optax.MaskedNode` placeholders (the estimator was wrapped in
      `optax.masked`, which hides leaves the loss needs).
  """
  check_not_masked(params)
  flags = resolve_mask(mask, params)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), flag in zip(paths, flags):
    if not flag:
      continue
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"Parameter {_path_str(path)} has dtype {dtype}; only real floating-point "
        "leaves can be perturbed. Mask it out with mask=... (for example "
        "mask=lambda p: jax.tree.map(lambda x: jnp.issubdtype(x.dtype, "
        "jnp.floating), p))."
      )
  return flags


def draw_dtype(dtype) -> jnp.dtype:
  """The dtype directions of a ``dtype`` leaf are drawn and combined in.

  At least float32: a bfloat16 Gaussian drawn natively has 8 bits of
  mantissa (coarse tails, visible bias in ``E[z z^T]``), and ``theta + eps z``
  rounded twice loses the perturbation's low bits. Low-precision leaves are
  therefore perturbed in float32 and rounded once to their own dtype.
  """
  return jnp.promote_types(dtype, jnp.float32)


def _draw(key: jax.Array, shape, dtype, distribution: str) -> jax.Array:
  """One leaf's raw draw (Gaussian or Rademacher) in `draw_dtype` of ``dtype``.

  Float32 draws use the counter-based hash of `zojax.fastrandom` (cheap,
  elementwise, fused by XLA into the perturbation or update that consumes
  them); wider dtypes use `jax.random`.
  """
  dtype = draw_dtype(dtype)
  if dtype == jnp.float32:
    if distribution == "rademacher":
      return fastrandom.rademacher(key, shape, dtype)
    return fastrandom.normal(key, shape, dtype)
  if distribution == "rademacher":
    return jax.random.rademacher(key, shape, dtype=dtype)
  return jax.random.normal(key, shape, dtype=dtype)


# Leaves with fewer entries than this are drawn in groups of equal shape by one
# vmapped generator call (fewer kernels to compile; the group's draws are held
# at once, which costs little for small leaves). Larger leaves are drawn one by
# one, so XLA fuses each draw into its consumer and never holds the direction.
GROUP_BELOW = 1 << 13

# combine_directions sums up to this many directions as one fused expression.
UNROLL_SUM_UP_TO = 32


def _raw_directions(key, params, distribution, flags) -> list[jax.Array | None]:
  """Per-leaf draws (None for masked-out leaves), sphere-normalised if asked.

  Leaf ``l`` is drawn from ``split(key, L)[l]`` (grouping small leaves of
  equal shape into one vmapped call gives the same values).
  """
  leaves = jax.tree.leaves(params)
  all_keys = keys_lib.leaf_keys(key, params)
  draws: list[jax.Array | None] = [None] * len(leaves)
  groups: dict[tuple, list[int]] = {}
  for index, (leaf, flag) in enumerate(zip(leaves, flags)):
    if not flag:
      continue
    shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
    if math.prod(shape) >= GROUP_BELOW:
      draws[index] = _draw(all_keys[index], shape, dtype, distribution)
    else:
      groups.setdefault((shape, dtype), []).append(index)
  for (shape, dtype), indices in groups.items():
    block = jax.vmap(lambda k, s=shape, d=dtype: _draw(k, s, d, distribution))(
      all_keys[jnp.asarray(indices)]
    )
    for row, index in enumerate(indices):
      draws[index] = block[row]
  if distribution == "sphere":
    factor = _sphere_factor_of([z for z in draws if z is not None])
    if factor is not None:
      draws = [None if z is None else (z * factor.astype(z.dtype)) for z in draws]
  return draws


def _sphere_factor_of(live: list[jax.Array]) -> jax.Array | None:
  if not live:
    return None
  dim = sum(z.size for z in live)
  sq_norm = sum(jnp.sum(jnp.square(z.astype(jnp.float32))) for z in live)
  return jnp.sqrt(jnp.float32(dim)) * jax.lax.rsqrt(sq_norm)


def sphere_factor(key: jax.Array, params, flags: list[bool]) -> jax.Array | None:
  """``sqrt(d) / ||g||`` for the Gaussian draws ``g`` of the flagged leaves.

  The ``"sphere"`` direction of leaf ``l`` is ``g_l`` times this factor (see
  the module docstring); None when no leaf is flagged.
  """
  return _sphere_factor_of(
    [z for z in _raw_directions(key, params, "gaussian", flags) if z is not None]
  )


def perturb_flagged(params, key, scale, distribution: str, flags: list[bool], factor=None):
  """`perturb` with the perturbed leaves given as one bool per leaf.

  With ``distribution="sphere"``, ``factor`` (from `sphere_factor` over the
  leaves of the whole direction) replaces the normalisation over ``flags``,
  so a direction can be perturbed in parts.
  """
  if distribution == "sphere" and factor is not None:
    draws = _raw_directions(key, params, "gaussian", flags)
    draws = [None if z is None else z * factor.astype(z.dtype) for z in draws]
  else:
    draws = _raw_directions(key, params, distribution, flags)
  leaves, treedef = jax.tree.flatten(params)
  scale = jnp.asarray(scale, jnp.float32)
  out = [
    p if z is None else (p.astype(z.dtype) + scale.astype(z.dtype) * z).astype(p.dtype)
    for p, z in zip(leaves, draws)
  ]
  return jax.tree.unflatten(treedef, out)


def sample_direction(
  key: jax.Array,
  params,
  distribution: str = "gaussian",
  mask: Mask = None,
):
  """Draws one direction ``z`` with the structure and dtypes of ``params``.

  Args:
    key: a `jax.random` key (typically a query key from `zojax.keys`).
    params: the parameter pytree (only shapes and dtypes are used).
    distribution: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
    mask: which leaves are perturbed (see `resolve_mask`); masked-out leaves
      of the result are zeros.

  Returns:
    A pytree ``z`` like ``params`` with ``E[z z^T] = I`` on the perturbed
    coordinates.
  """
  check_distribution(distribution)
  flags = perturbable_leaves(params, mask)
  draws = _raw_directions(key, params, distribution, flags)
  leaves, treedef = jax.tree.flatten(params)
  out = [
    jnp.zeros_like(p) if z is None else z.astype(jnp.result_type(p)) for p, z in zip(leaves, draws)
  ]
  return jax.tree.unflatten(treedef, out)


def perturb(
  params,
  key: jax.Array,
  scale: jax.Array | float,
  distribution: str = "gaussian",
  mask: Mask = None,
):
  """Returns ``params + scale * z(key)``; masked-out leaves are returned as is.

  ``z`` is drawn inside this function, so under `jit` XLA can fuse the draw
  into the addition and never hold ``z`` and the perturbed copy at once.

  Args:
    params: the parameter pytree.
    key: the key ``z`` is drawn from.
    scale: a scalar, e.g. ``+eps`` or ``-eps``.
    distribution: see `sample_direction`.
    mask: see `resolve_mask`.

  Returns:
    The perturbed parameters, with the dtypes of ``params``; low-precision
    leaves are computed in float32 and rounded once.
  """
  check_distribution(distribution)
  flags = perturbable_leaves(params, mask)
  return perturb_flagged(params, key, scale, distribution, flags)


def combine_directions(
  params,
  query_keys: jax.Array,
  weights: jax.Array,
  distribution: str = "gaussian",
  mask: Mask = None,
  vectorize: bool = False,
):
  """Returns ``sum_i weights[i] * z(query_keys[i])`` without storing the z_i.

  By default, for up to `UNROLL_SUM_UP_TO` directions, the sum is one
  elementwise expression per leaf, which XLA fuses into whatever consumes it
  (the update), so neither the directions nor the sum are held; with more,
  the directions are regenerated one at a time in a `lax.scan` that
  accumulates the sum (memory: one parameter-sized accumulator).
  With ``vectorize=True`` all directions are drawn at once and contracted
  (memory: ``len(weights)`` directions).

  Args:
    params: the parameter pytree (shapes and dtypes).
    query_keys: keys of shape (N,).
    weights: float array of shape (N,).
    distribution: see `sample_direction`.
    mask: see `resolve_mask`; masked-out leaves of the result are zeros.
    vectorize: draw all directions at once instead of sequentially.

  Returns:
    A pytree like ``params``.
  """
  check_distribution(distribution)
  flags = perturbable_leaves(params, mask)
  leaves, treedef = jax.tree.flatten(params)
  weights = jnp.asarray(weights, jnp.float32)
  num = weights.shape[0]

  def one(key, weight):
    draws = _raw_directions(key, params, distribution, flags)
    return [None if z is None else weight.astype(z.dtype) * z for z in draws]

  def acc_dtype(leaf):
    return draw_dtype(jnp.result_type(leaf))

  if num == 1:
    summed = one(query_keys[0], weights[0])
  elif vectorize:

    def draw_all(key):
      return [z for z in _raw_directions(key, params, distribution, flags) if z is not None]

    stacked = jax.vmap(draw_all)(query_keys)
    it = iter(stacked)
    summed = []
    for flag, leaf in zip(flags, leaves):
      if not flag:
        summed.append(None)
        continue
      zs = next(it)
      total = jnp.tensordot(weights, zs.astype(acc_dtype(leaf)), axes=1)
      summed.append(total.astype(jnp.result_type(leaf)))
  elif num <= UNROLL_SUM_UP_TO:
    # One elementwise expression per leaf: XLA fuses the N draws into the
    # consumer (the update), so no parameter-sized accumulator is held.
    summed = [
      jnp.zeros(jnp.shape(leaf), acc_dtype(leaf)) if flag else None
      for flag, leaf in zip(flags, leaves)
    ]
    for i in range(num):
      draws = _raw_directions(query_keys[i], params, distribution, flags)
      summed = [
        None if a is None else a + weights[i] * z.astype(a.dtype) for a, z in zip(summed, draws)
      ]
    summed = [
      None if t is None else t.astype(jnp.result_type(leaf)) for t, leaf in zip(summed, leaves)
    ]
  else:
    init = [
      jnp.zeros(jnp.shape(leaf), acc_dtype(leaf)) if flag else None
      for flag, leaf in zip(flags, leaves)
    ]

    def body(acc, inputs):
      key, weight = inputs
      draws = _raw_directions(key, params, distribution, flags)
      new = [None if a is None else a + weight * z.astype(a.dtype) for a, z in zip(acc, draws)]
      return new, None

    total, _ = jax.lax.scan(body, init, (query_keys, weights))
    summed = [
      None if t is None else t.astype(jnp.result_type(leaf)) for t, leaf in zip(total, leaves)
    ]
  out = [
    jnp.zeros_like(p) if s is None else s.astype(jnp.result_type(p)) for p, s in zip(leaves, summed)
  ]
  return jax.tree.unflatten(treedef, out)
