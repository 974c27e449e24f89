"""Comparing zojax optimizer states in tests.

Every zojax state holds typed `jax.random` keys (``jax.random.key``), and
`chex.assert_trees_all_close` / `chex.assert_trees_all_equal` cannot compare
them: they turn each leaf into a NumPy array, which a key refuses (optax's
own `optax.add_noise` state fails the same way). A key is opaque on purpose,
so the comparison has to say what "equal keys" means. Here it means: the
same PRNG implementation and the same `jax.random.key_data`, which is what
makes two keys draw the same numbers.

* `keys_to_data` rewrites a pytree with every key leaf replaced by its
  ``key_data`` (a plain uint32 array); use it to hand a state to any array
  comparison, or to print or hash it.
* `assert_states_close` and `assert_states_equal` are chex's assertions on
  such pytrees that also check that the keys' implementations agree.
  ``assert_states_equal`` is the one for determinism tests (same seed, same
  inputs: bit-identical states); ``assert_states_close`` takes chex's
  ``rtol``/``atol`` for states computed in two different ways (jit against
  no jit, one device against many), where only the float buffers may round
  differently: the keys and counters are still compared exactly.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

__all__ = ["assert_states_close", "assert_states_equal", "is_key", "keys_to_data"]


def is_key(x: Any) -> bool:
  """Whether ``x`` is a typed `jax.random` key array (``jax.random.key``, not ``PRNGKey``)."""
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  """Replaces every typed key leaf of ``tree`` by its `jax.random.key_data`.

  Args:
    tree: any pytree, e.g. an optimizer state.

  Returns:
    The same pytree with key leaves replaced by uint32 arrays (shape
    ``key.shape + impl_shape``, ``(2,)`` per key for the default threefry
    implementation); other leaves are returned as they are.

  Examples:
    >>> import chex, jax, jax.numpy as jnp, zojax
    >>> state = zojax.zo_grad(key=0).init({"w": jnp.ones(3)})
    >>> chex.assert_trees_all_equal(zojax.testing.keys_to_data(state),
    ...                             zojax.testing.keys_to_data(state))
  """
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _is_inexact(x: Any) -> bool:
  return not is_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _key_impls(tree: Any) -> list:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(p), str(jax.random.key_impl(x))) for p, x in leaves if is_key(x)]


def _check_impls(actual: Any, expected: Any) -> None:
  a, e = _key_impls(actual), _key_impls(expected)
  if a != e:
    raise AssertionError(
      f"The states hold different jax.random keys: {a} (path, PRNG implementation) in the "
      f"first, {e} in the second."
    )


def assert_states_close(actual: Any, expected: Any, **tolerances: Any) -> None:
  """`chex.assert_trees_all_close` for pytrees holding typed `jax.random` keys.

  Keys are compared exactly, by implementation and `jax.random.key_data`,
  and so are integer and boolean leaves (step counters, block indices): a
  tolerance on those would let ``key(0)`` pass for ``key(1)``, whose data
  differ by one. Floating-point leaves are compared as chex does, within
  the tolerances.

  Args:
    actual: a pytree, e.g. an optimizer state.
    expected: a pytree of the same structure.
    **tolerances: ``rtol`` and ``atol``, passed to
      `chex.assert_trees_all_close` for the floating-point leaves.

  Raises:
    AssertionError: if the structures differ, a key's implementation or data
      differ, or another leaf is not close.

  Examples:
    >>> import jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = zojax.mezo(1e-2, key=0)
    >>> zojax.testing.assert_states_close(tx.init(params), tx.init(params), rtol=1e-6)
  """
  chex.assert_trees_all_equal_structs(actual, expected)
  _check_impls(actual, expected)
  exact = lambda tree: jax.tree.map(lambda x: None if _is_inexact(x) else x, keys_to_data(tree))
  inexact = lambda tree: jax.tree.map(lambda x: x if _is_inexact(x) else None, tree)
  chex.assert_trees_all_equal(exact(actual), exact(expected))
  chex.assert_trees_all_close(inexact(actual), inexact(expected), **tolerances)


def assert_states_equal(actual: Any, expected: Any) -> None:
  """`chex.assert_trees_all_equal` for pytrees holding typed `jax.random` keys.

  The assertion of determinism tests: the same key and inputs must give
  bit-identical states, keys included.

  Args:
    actual: a pytree, e.g. an optimizer state.
    expected: a pytree of the same structure.

  Raises:
    AssertionError: if the structures differ, a key's implementation or data
      differ, or another leaf is not exactly equal.
  """
  chex.assert_trees_all_equal_structs(actual, expected)
  _check_impls(actual, expected)
  chex.assert_trees_all_equal(keys_to_data(actual), keys_to_data(expected))
