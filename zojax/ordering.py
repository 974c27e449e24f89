"""Data dependencies that order XLA's schedule without changing any value.

XLA schedules independent computations freely. On a step that treats many
leaves alike (orthogonalize every matrix, draw every basis), its CPU
scheduler may start all of them before finishing any, and hold every leaf's
intermediate buffers at once; the memory of the step then grows with the
number of leaves instead of with the largest one. Its common-subexpression
and loop-invariant passes likewise merge or hoist a draw that is meant to be
recomputed where it is used.

``(x != x) & (x == x)`` is false for every float, NaN included, but no XLA
pass proves it, so a zero computed that way from an element of ``x`` carries
a data dependency on ``x``: adding it to an input makes that input (and all
that follows from it) wait for ``x``, while every value stays the same.
`jax.lax.optimization_barrier` states the intent more plainly, but XLA's CPU
pipeline expands barriers before it schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["zero_after", "after"]


def zero_after(values: Sequence[Any]) -> jax.Array | None:
  """A uint32 zero that XLA cannot compute before ``values`` exist.

  Depends on the first element of the first non-empty floating-point array
  among the leaves of ``values``; None if there is none.
  """
  for v in jax.tree.leaves(values):
    if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating) and v.size:
      first = jnp.ravel(v)[0]
      return ((first != first) & (first == first)).astype(jnp.uint32)
  return None


def after(x: jax.Array, values: Sequence[Any]) -> jax.Array:
  """``x`` unchanged, computed only once ``values`` exist (``x + 0``).

  A floating ``x`` gets a float zero added (``-0.0`` becomes ``+0.0``, the
  only change); an integer ``x`` an integer zero; a typed `jax.random` key a
  zero added to its key data.
  """
  zero = zero_after(values)
  if zero is None:
    return x
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(x)
    return jax.random.wrap_key_data(data + zero.astype(data.dtype), impl=jax.random.key_impl(x))
  return x + zero.astype(x.dtype)
