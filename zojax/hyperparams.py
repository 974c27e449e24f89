"""Checking hyperparameters: a clear error at construction, traced values let through.

Every zojax transform checks its hyperparameters when it is built, so that a
NaN learning rate or a negative ``eps`` fails there, with a message naming
the argument, instead of turning the parameters into NaN one step later.
Python numbers, NumPy scalars and concrete 0-d JAX arrays are accepted
alike (a NumPy integer is a valid ``num_queries``).

Traced values pass unchecked. `optax.inject_hyperparams` builds the
transform twice: eagerly in ``init`` with concrete arrays (checked here),
then inside ``update`` with the values stored in its state, which are
tracers under `jax.jit`. Real-valued hyperparameters (learning rates,
``eps``, weight decay, momentum) work as tracers. Integers that fix array
shapes (``num_queries``, ``rank``, ``k``) must be known when the step is
traced: the presets default them to None (their documented value) so that
``inject_hyperparams`` leaves them static, and a transform given a traced
one reads it back from the shapes of its own state (see `integer`).

A schedule (a callable learning rate) is checked at its first value,
``schedule(0)``, evaluated once at construction.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_traced", "integer", "real", "real_or_schedule", "learning_rate", "flag"]


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a JAX tracer (its value is unknown until the program runs)."""
  return isinstance(value, jax.core.Tracer)


def _describe(value: Any) -> str:
  if isinstance(value, str):
    return f"the string {value!r}"
  return repr(value)


def _scalar(name: str, value: Any, kind: str) -> Any:
  """``value`` as a Python scalar of ``kind`` ("integer" or "real"), or raises TypeError."""
  if isinstance(value, bool) or isinstance(value, np.bool_):
    what = "an integer" if kind == "integer" else "a number"
    raise TypeError(f"{name} must be {what}, got {value!r}.")
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(value) if not isinstance(value, jax.Array) else value
    if array.shape != ():
      raise TypeError(f"{name} must be a scalar, got an array of shape {tuple(array.shape)}.")
    dtype = array.dtype
    if kind == "integer" and not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer, got a {dtype} value {value!r}.")
    if kind == "real" and not (
      jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
      raise TypeError(f"{name} must be a real number, got a {dtype} value {value!r}.")
    value = array.item() if isinstance(array, np.ndarray) else np.asarray(array).item()
  if kind == "integer":
    if not isinstance(value, int):
      raise TypeError(f"{name} must be an integer, got {_describe(value)}.")
    return int(value)
  if not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a real number, got {_describe(value)}.")
  return float(value)


def integer(name: str, value: Any, *, minimum: int = 1) -> Any:
  """A checked integer hyperparameter: an ``int >= minimum``, or the tracer itself.

  Args:
    name: the argument's name, for the message.
    value: a Python or NumPy integer, a 0-d integer array, or a tracer.
    minimum: the smallest valid value.

  Returns:
    The value as a Python int; a tracer unchanged (the caller reads the
    value from its state's shapes, or uses it in traced arithmetic).

  Raises:
    TypeError: not an integer (a float, a string, a bool, an array).
    ValueError: below ``minimum``.
  """
  if is_traced(value):
    if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.integer):
      raise TypeError(f"{name} must be an integer scalar, got a traced {jax.typeof(value)}.")
    return value
  out = _scalar(name, value, "integer")
  if out < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {out}.")
  return out


def real(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  hint: str = "",
) -> Any:
  """A checked real hyperparameter: a finite float in the given interval, or the tracer itself.

  Args:
    name: the argument's name, for the message.
    value: a Python/NumPy number, a 0-d array, or a tracer.
    low: lower bound (None: unbounded).
    high: upper bound (None: unbounded).
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    hint: a sentence appended to the range error (e.g. what to do instead).

  Returns:
    The value as a Python float; a tracer unchanged.

  Raises:
    TypeError: not a real number (a string, a bool, an array, None).
    ValueError: NaN, infinite, or outside the interval.
  """
  if is_traced(value):
    if jnp.shape(value) != ():
      raise TypeError(f"{name} must be a scalar, got a traced {jax.typeof(value)}.")
    return value
  out = _scalar(name, value, "real")
  if not math.isfinite(out):
    raise ValueError(f"{name} must be a finite number, got {out}.")
  below = low is not None and (out <= low if low_open else out < low)
  above = high is not None and (out >= high if high_open else out > high)
  if below or above:
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    opening = "(" if low_open or low is None else "["
    closing = ")" if high_open or high is None else "]"
    interval = f"{opening}{left}, {right}{closing}"
    raise ValueError(f"{name} must lie in {interval}, got {out:g}.{' ' + hint if hint else ''}")
  return out


def real_or_schedule(name: str, value: Any, **bounds) -> Any:
  """`real` for a number; for a schedule (a callable), checks ``value(0)`` and returns it as is.

  Args:
    name: the argument's name.
    value: a number, a tracer, or an optax schedule ``count -> value``.
    **bounds: as for `real`.

  Returns:
    The checked float, the tracer, or the schedule unchanged.

  Raises:
    TypeError, ValueError: as for `real` (for a schedule: its value at step 0).
  """
  if callable(value):
    first = value(jnp.zeros([], jnp.int32))
    if not is_traced(first):
      real(f"{name} (the schedule's value at step 0)", first, **bounds)
    return value
  return real(name, value, **bounds)


def flag(name: str, value: Any) -> bool:
  """A checked boolean hyperparameter: only ``True``/``False`` (a string like "no" is refused).

  Raises:
    TypeError: for anything but a Python or NumPy bool.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"{name} must be True or False, got {_describe(value)}.")


def learning_rate(name: str, value: Any) -> Any:
  """A learning rate or schedule: finite and >= 0."""
  return real_or_schedule(
    name,
    value,
    low=0.0,
    hint="A ZO step moves against the estimated gradient already; to ascend, negate the loss.",
  )
