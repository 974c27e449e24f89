"""The parameters zojax accepts: a pytree whose leaves are arrays.

A zojax transform draws a direction of each leaf's shape and dtype, so it
needs every leaf to be an array (a `jax.Array`, a NumPy array, a Python or
NumPy scalar, or a `jax.ShapeDtypeStruct` under `jax.eval_shape`). Models of
some libraries are pytrees that also hold other things: a whole Equinox
module has its activation functions (``jax.nn.relu`` is a ``custom_jvp``,
a jitted function a ``PjitFunction``) and any non-static Python object as
leaves, and optax or JAX then fail deep inside with errors such as
``'PjitFunction' object has no attribute 'ndim'``. `check_array_leaves`
catches this where the parameters enter (`zojax.zo_grad`, `zojax.subspace`
and `zojax.block_coordinate` call it in ``init`` and ``update``, i.e. at
trace time) and names the leaf and the fix: split the model with
``eqx.partition(model, eqx.is_inexact_array)`` and rebuild it inside the
loss with ``eqx.combine``.

The check is structural (no array is read), so it costs nothing under
`jax.jit`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

__all__ = ["check_array_leaves", "is_array_leaf"]


def is_array_leaf(x: Any) -> bool:
  """Whether ``x`` can be a leaf of zojax parameters (anything with a shape and a dtype)."""
  if isinstance(x, (numbers.Number, np.generic)):
    return True
  return hasattr(x, "shape") and hasattr(x, "dtype")


def check_array_leaves(params: Any) -> None:
  """Raises a clear error if a leaf of ``params`` is not an array.

  Args:
    params: the parameter pytree handed to a zojax transform.

  Raises:
    TypeError: naming the path and type of the first leaf that is not an
      array, and how to split an Equinox model into its arrays and the rest.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from zojax.array_leaves import check_array_leaves
    >>> check_array_leaves({"w": jnp.ones(3), "b": 0.0})
    >>> check_array_leaves({"w": jnp.ones(3), "act": lambda x: x})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: zojax needs a pytree of arrays as parameters, but ['act'] is a function...
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if is_array_leaf(leaf):
      continue
    where = jax.tree_util.keystr(path) or "the root"
    raise TypeError(
      f"zojax needs a pytree of arrays as parameters, but {where} is a "
      f"{type(leaf).__name__} ({leaf!r:.60}). An Equinox model holds functions and other "
      "non-array fields: pass only its arrays, "
      "`params, static = eqx.partition(model, eqx.is_inexact_array)`, and rebuild the model "
      "inside the loss, `value_fn=lambda p: loss(eqx.combine(p, static), batch)`. For other "
      "pytrees, move non-array leaves out of the parameters (or make them static fields)."
    )
