"""Key derivation: every random draw in zojax comes from one helper here.

A zojax transform keeps a single `jax.random` key in its state and never
advances it. Each draw is *derived* from that key, so any draw can be
regenerated later from integers alone (the "seed trick" of MeZO,
arXiv 2305.17333, section 2):

    step key   k_t     = fold_in(key, t)              (t = step count)
    query key  k_{t,i} = fold_in(k_t, i)              (i = query index)
    leaf keys  k_{t,i,l} = split(k_{t,i}, L)[l]       (l = leaf index)

Perturbing, restoring and updating therefore use the same draws by
construction, on one device or many, and a resumed run continues the same
stream as an uninterrupted one.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

KeyLike = int | jax.Array

__all__ = ["as_key", "stream_key", "step_key", "query_key", "leaf_keys", "KeyLike"]


def as_key(key: KeyLike) -> jax.Array:
  """Returns a typed `jax.random` key from an integer seed or a key (a ``key=`` argument).

  Args:
    key: an integer (Python, NumPy or a scalar integer array), a typed key
      (`jax.random.key`), or a raw uint32 key of shape (2,)
      (`jax.random.PRNGKey`).

  Returns:
    A typed key array of shape ().

  Raises:
    TypeError: if ``key`` is neither an integer nor a key.
  """
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise TypeError(f"key must be a single key, got a key array of shape {key.shape}.")
      return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
      return jax.random.wrap_key_data(jnp.asarray(key))
    if jnp.issubdtype(key.dtype, jnp.integer) and key.shape == ():
      return jax.random.key(key)
    raise TypeError(
      "key must be an integer or a jax.random key, got an array of dtype "
      f"{key.dtype} and shape {key.shape}."
    )
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  raise TypeError(f"key must be an integer or a jax.random key, got {key!r}.")


def stream_key(key: jax.Array, name: str) -> jax.Array:
  """An independent stream of ``key`` for one component, e.g. ``"subspace"``.

  Pieces that share a user's seed (an estimator and the subspace basis it
  runs in) fold in their own name first, so their draws never coincide.
  """
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def step_key(key: jax.Array, count: jax.Array) -> jax.Array:
  """Key of step ``count``: ``fold_in(key, count)``."""
  return jax.random.fold_in(key, count)


def query_key(key_t: jax.Array, index: jax.Array | int) -> jax.Array:
  """Key of query ``index`` within a step: ``fold_in(key_t, index)``."""
  return jax.random.fold_in(key_t, index)


def leaf_keys(key: jax.Array, tree) -> jax.Array:
  """Keys of shape ``(L,)``, one per leaf of ``tree`` in `jax.tree.leaves` order.

  Every leaf gets a key whether or not it is perturbed, so masking one leaf
  out never changes the draws of the others.
  """
  return jax.random.split(key, len(jax.tree.leaves(tree)))
