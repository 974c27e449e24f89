"""Fast counter-based draws for perturbation directions.

A ZO step draws a parameter-sized direction for every forward pass and again
for the update, so on a CPU the generator, not the forward, can dominate a
MeZO step: `jax.random.normal`'s threefry-2x32 spends about 50 integer
operations per 32-bit word. Directions need statistical quality, not
cryptographic strength, so zojax draws them from a cheaper counter-based
hash, keyed by two 32-bit words taken from a `jax.random` key:

    x_i = fmix32(fmix32(i * 0x9E3779B9 + k0) ^ k1),

where ``i`` is the element's flat index and ``fmix32`` is MurmurHash3's
32-bit finaliser (a bijection with full avalanche; two xor-shift-multiply
rounds). The Weyl step makes ``i -> x_i`` a bijection for fixed keys; the
second mixing round, keyed by ``k1``, decorrelates streams whose ``k0``
differ by a multiple of the Weyl constant. About 15 operations per word,
elementwise, so XLA fuses the draw into its consumer (``theta + eps z``)
and never materialises ``z``.

Values: ``uniform`` takes the top 23 bits as ``(m + 1/2) 2^-23`` in (0, 1);
``normal`` is ``sqrt(2) erfinv(2u - 1)`` (as `jax.random.normal`; tails
truncated at about 5.3 sigma); ``rademacher`` is the top bit as a sign.
Same key, same values, on every backend. `tests/test_fastrandom.py` checks
moments, uniformity, independence across elements, keys and leaves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  "seed_words",
  "bits_at",
  "hash_bits",
  "uniform",
  "normal",
  "rademacher",
  "normal_from_bits",
  "rademacher_from_bits",
]

_WEYL = 0x9E3779B9
# _WEYL's inverse modulo 2^32 (_WEYL is odd): i W + k0 = (i + k0 W^-1) W mod 2^32.
_WEYL_INVERSE = 0x144CBC89
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (a bijection of uint32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(_M1)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(_M2)
  return x ^ (x >> 16)


def seed_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two uint32 words ``(k0, k1)`` of the hash, drawn from a `jax.random` key."""
  words = jax.random.bits(key, (2,), jnp.uint32)
  return words[0], words[1]


def bits_at(words: tuple[jax.Array, jax.Array], index: jax.Array) -> jax.Array:
  """uint32 words ``x_i`` for the given element indices ``i`` (any shape).

  ``bits_at(seed_words(key), i)`` equals ``hash_bits(key, shape).ravel()[i]``,
  so a slice of a leaf can be drawn on its own, at the point where it is
  used, with the values the whole-leaf draw would give it.

  Args:
    words: ``(k0, k1)`` from `seed_words`.
    index: uint32 flat element indices.

  Returns:
    A uint32 array shaped like ``index``.
  """
  k0, k1 = words
  index = jnp.asarray(index, jnp.uint32)
  # i W + k0 computed as (i + k0 W^-1) W, the same words: the key enters
  # before the first element-wise op, so no key-independent array (i W, as
  # large as the draw) exists for XLA to hoist out of a loop over draws and
  # keep alive across it.
  return _fmix32(_fmix32((index + k0 * jnp.uint32(_WEYL_INVERSE)) * jnp.uint32(_WEYL)) ^ k1)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 words ``x_i`` (see the module docstring) for every element of ``shape``.

  Args:
    key: a `jax.random` key (any implementation); two words are drawn from it.
    shape: the output shape; at most 2^32 elements.

  Returns:
    A uint32 array of ``shape``.
  """
  size = math.prod(shape)
  if size > 2**32:
    raise ValueError(f"hash_bits draws at most 2**32 values per key, got shape {shape}")
  index = lax.iota(jnp.uint32, size).reshape(shape)
  return bits_at(seed_words(key), index)


def _uniform_from_bits(bits: jax.Array, dtype) -> jax.Array:
  m = (bits >> 9).astype(jnp.int32)
  return ((m.astype(dtype) + 0.5) * (2.0**-23)).astype(dtype)


def normal_from_bits(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Standard normal values from hash words (what `normal` applies to `hash_bits`)."""
  u = _uniform_from_bits(bits, dtype)
  return (jnp.sqrt(jnp.asarray(2.0, dtype)) * lax.erf_inv(2.0 * u - 1.0)).astype(dtype)


def rademacher_from_bits(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Signs in {-1, +1} from hash words (what `rademacher` applies to `hash_bits`)."""
  sign = (bits >> 31).astype(jnp.int32)
  return (1 - 2 * sign).astype(dtype)


def uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Uniform draws in the open interval (0, 1), 23 bits of resolution.

  Args:
    key: a `jax.random` key.
    shape: the output shape.
    dtype: a floating dtype of at least 32 bits.

  Returns:
    ``(m + 1/2) 2^-23`` with ``m`` the top 23 bits of `hash_bits`.
  """
  return _uniform_from_bits(hash_bits(key, shape), dtype)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Standard normal draws: ``sqrt(2) erfinv(2u - 1)`` of `uniform` ``u``.

  Args:
    key: a `jax.random` key.
    shape: the output shape.
    dtype: a floating dtype of at least 32 bits.

  Returns:
    An array of ``shape`` and ``dtype`` with mean 0 and variance 1 (up to the
    truncation of the tails beyond ``|z| ~ 5.3``, a variance deficit below
    1e-5).
  """
  return normal_from_bits(hash_bits(key, shape), dtype)


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Entries in {-1, +1} with equal probability (the top bit of `hash_bits`).

  Args:
    key: a `jax.random` key.
    shape: the output shape.
    dtype: the output dtype.

  Returns:
    An array of ``shape`` and ``dtype``.
  """
  return rademacher_from_bits(hash_bits(key, shape), dtype)
