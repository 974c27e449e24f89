"""Comparisons that hold on every CPU: float64 where rounding is amplified.

Two XLA programs that compute the same loss (a jitted and an eager step, a
vectorized and a sequential one, a run and its replay) may round
differently: fusion, vectorization width and FMA contraction differ between
programs and between CPUs (try ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2``). A
float32 loss ``f`` of magnitude ``F`` evaluated by ``n`` operations carries
an error of up to ``n u F`` with ``u = 2^-24 ~ 6e-8``; a finite difference
divides it by ``2 eps``, so with ``eps = 1e-3``, ``F ~ 1`` and ``n ~ 30`` the
scalars ``c_i`` of two programs may differ by ``~1e-3`` relative. No fixed
float32 tolerance below that is portable.

Tests that compare two programs therefore run in float64 (``u = 2^-53 ~
1.1e-16``): the same bound gives ``n u F / (2 eps) ~ 2e-12`` for the
settings above, so a tolerance of ``1e-8`` is portable with four orders of
magnitude to spare and still catches any error in the maths (a wrong sign,
a missing factor, a wrong key), which is of order one. `F64_RTOL` is that
tolerance. Float64 directions are drawn by `jax.random` instead of
`zojax.fastrandom` (see `zojax.perturbations.draw_dtype`), which these
comparisons do not depend on: both programs draw the same way.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

F32_UNIT_ROUNDOFF = 2.0**-24
F64_UNIT_ROUNDOFF = 2.0**-53
# n u F / (2 eps) <= 1e3 * 1.1e-16 * 1e2 / 2e-3 ~ 6e-9 for up to 1000 operations,
# losses up to 100 and eps down to 1e-3: every float64 comparison in the suite.
F64_RTOL = 1e-8
F64_ATOL = 1e-8


@contextlib.contextmanager
def float64():
  """Enables 64-bit arrays inside the block (`jax.enable_x64`)."""
  with jax.enable_x64(True):
    yield


def to_float64(tree):
  """Casts every floating leaf of ``tree`` to float64 (call inside `float64`)."""

  def cast(x):
    return jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

  return jax.tree.map(cast, tree)
