"""Low-precision parameters: a float32 master copy, or keyed stochastic rounding.

At MeZO's learning rates (1e-7 to 1e-6) a step changes a weight by about
1e-6, while the spacing of bfloat16 numbers near a weight of 0.02 is about
1.2e-4 (float16: 1.5e-5). Under round-to-nearest almost every update to
bf16/fp16 weights is lost, and a run "trains" without moving. Two remedies,
each an optax transform:

* `master_weights`: the optimizer keeps a float32 copy of the parameters in
  its state, runs the inner optimizer on it, and hands back updates that set
  the low-precision parameters to the rounded master. Updates accumulate at
  float32 resolution; the forward passes still run on low-precision weights
  (each perturbed copy is formed in float32 and rounded once). Costs 4 bytes
  per parameter of state.
* `stochastic_rounding`: the last transform of a chain; rounds
  ``theta + update`` up or down at random with probabilities that make the
  result unbiased, ``E[round(x)] = x`` (as in QuZO, arXiv 2502.12346, and
  Gupta et al., arXiv 1502.02551). No extra memory; the noise is one spacing
  per move. The random bits come from the optimizer's key, so runs are
  deterministic and data-parallel replicas round identically.

In both cases `zojax.zo_grad` forms the loss difference in float32 (losses
are cast before subtracting). The loss itself should be computed in float32
(e.g. cast the logits before the softmax): a bfloat16 loss near 2 has a
spacing of 0.016, far above ``eps * |grad|``, and `zojax.zo_grad` warns when
it is given one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zojax import _deprecations, eager
from zojax import keys as keys_lib

__all__ = [
  "MasterWeightsState",
  "StochasticRoundingState",
  "master_weights",
  "stochastic_round",
  "stochastic_rounding",
]


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _narrower(dtype, than) -> bool:
  return jnp.finfo(dtype).bits < jnp.finfo(than).bits


def _check_some_narrow(params, dtype, who: str) -> None:
  floats = [jnp.result_type(x) for x in jax.tree.leaves(params) if _is_float(x)]
  if not any(_narrower(d, dtype) for d in floats):
    found = sorted({str(d) for d in floats}) or ["no floating-point leaves"]
    raise ValueError(
      f"{who} is for low-precision (e.g. bfloat16 or float16) parameters, but every "
      f"floating-point leaf here is already {', '.join(found)}: it would only duplicate "
      "or no-op. Drop it, or cast the parameters to the low precision first."
    )


class MasterWeightsState(NamedTuple):
  """State of `master_weights`.

  Attributes:
    master: the parameters in high precision, same tree as the parameters.
      Leaves narrower than the master dtype hold their master copy, which is
      authoritative: the parameters are its rounding. Other leaves (already
      float32, or not floating point) are not duplicated: they hold an empty
      array and the parameters themselves are used.
    inner_state: the state of the inner transform, which runs on ``master``.
  """

  master: Any
  inner_state: Any


def master_weights(
  inner: optax.GradientTransformation, dtype: Any = jnp.float32
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on a high-precision master copy of low-precision parameters.

  With ``M`` the master copy (``dtype``) and ``theta`` the parameters
  (e.g. bfloat16):

  .. math::

    u = \mathrm{inner}(M), \qquad M \leftarrow M + u, \qquad
    \theta \leftarrow \mathrm{round}(M),

  where the returned updates are ``round(M) - theta`` in float32, so that
  `optax.apply_updates` lands exactly on ``round(M)`` (it adds in float32 and
  casts once). Leaves already at ``dtype`` or wider have no master copy: the
  inner transform sees the parameters themselves and their updates ``u``
  are returned as they are.

  ``inner`` sees ``M`` as its parameters; a `zojax.zo_grad` inside it
  evaluates the loss at ``round(M + eps z)``, i.e. on weights of the
  parameters' own dtype, through the ``param_map=`` extra argument.
  Put `master_weights` outermost: ``master_weights(zojax.mezo(1e-6))``.

  Args:
    inner: the optimizer to run on the master copy.
    dtype: the master dtype, float32 (default) or float64.

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `MasterWeightsState`.

  Raises:
    ValueError: at construction if ``dtype`` is not float32/float64; at init
      if no floating-point leaf is narrower than ``dtype`` (e.g. master
      weights asked for float32 parameters).

  Examples:
    >>> import jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.full(4, 0.1, jnp.bfloat16)}
    >>> loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
    >>> tx = zojax.master_weights(zojax.mezo(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].dtype, state.master["w"].dtype
    (dtype(bfloat16), dtype('float32'))
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f"master_weights dtype must be float32 or float64, got {dtype}.")
  inner = optax.with_extra_args_support(inner)

  def has_master(p) -> bool:
    return _is_float(p) and _narrower(jnp.result_type(p), dtype)

  def to_master(params):
    return jax.tree.map(lambda p: p.astype(dtype) if _is_float(p) else p, params)

  def working(stored, params):
    """What the inner transform sees: master copies, and the other leaves as given."""
    return jax.tree.map(lambda m, p: m if has_master(p) else p, stored, params)

  def stored(master, params):
    return jax.tree.map(
      lambda m, p: m if has_master(p) else jnp.zeros((0,), jnp.result_type(p)), master, params
    )

  def init_fn(params):
    _check_some_narrow(params, dtype, f"master_weights(dtype={dtype})")
    master = to_master(params)
    return MasterWeightsState(master=stored(master, params), inner_state=inner.init(master))

  def update_fn(updates, state, params=None, *, param_map=None, **extra_args):
    if params is None:
      raise ValueError("master_weights needs params: call update(updates, state, params, ...).")

    def view(master):
      rounded = jax.tree.map(lambda m, p: m.astype(jnp.result_type(p)), master, params)
      return rounded if param_map is None else param_map(rounded)

    if updates is not None:
      updates = to_master(updates)
    current = working(state.master, params)
    inner_updates, inner_state = inner.update(
      updates, state.inner_state, current, param_map=view, **extra_args
    )
    master = optax.apply_updates(current, inner_updates)

    def out(m, u, p):
      if not has_master(p):
        return u
      wide = jnp.promote_types(jnp.result_type(p), jnp.float32)
      return m.astype(jnp.result_type(p)).astype(wide) - p.astype(wide)

    new_updates = jax.tree.map(out, master, inner_updates, params)
    new_state = MasterWeightsState(master=stored(master, params), inner_state=inner_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(
    init_fn, eager.jit_when_concrete(update_fn, "master_weights")
  )


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
  r"""Rounds ``x`` to ``dtype`` up or down at random, unbiased.

  With ``lo <= x <= hi`` the two neighbouring ``dtype`` values,

  .. math::

    \mathrm{round}(x) = \begin{cases} hi & \text{with probability }
      (x - lo) / (hi - lo) \\ lo & \text{otherwise,} \end{cases}
    \qquad E[\mathrm{round}(x)] = x .

  Values exactly representable (and non-finite ones) are returned as
  ``x.astype(dtype)``; values beyond the largest finite number saturate to it.

  Args:
    x: a floating-point array, wider than ``dtype``.
    dtype: the target dtype, e.g. ``jnp.bfloat16``.
    key: the `jax.random` key of the rounding noise.

  Returns:
    An array of ``dtype`` and the shape of ``x``.
  """
  dtype = jnp.dtype(dtype)
  wide = jnp.promote_types(jnp.result_type(x), jnp.float32)
  x = jnp.asarray(x, wide)
  near = x.astype(dtype)
  near_w = near.astype(wide)
  toward = jnp.where(x > near_w, jnp.inf, -jnp.inf).astype(dtype)
  other_w = jnp.nextafter(near, toward).astype(wide)
  lo, hi = jnp.minimum(near_w, other_w), jnp.maximum(near_w, other_w)
  p_hi = (x - lo) / (hi - lo)
  u = jax.random.uniform(key, x.shape, wide)
  rounded = jnp.where(u < p_hi, hi, lo).astype(dtype)
  keep = (near_w == x) | ~jnp.isfinite(x)
  return jnp.where(keep, near, rounded)


class StochasticRoundingState(NamedTuple):
  """State of `stochastic_rounding`: the step ``count`` and the rounding ``key``."""

  count: jax.Array
  key: jax.Array


def stochastic_rounding(
  key: keys_lib.KeyLike = 0, *, seed: keys_lib.KeyLike | None = None
) -> optax.GradientTransformation:
  r"""Makes the next `optax.apply_updates` round ``theta + u`` stochastically.

  Place it last in a chain, after the learning rate. For each low-precision
  leaf it returns float32 updates ``SR(theta + u) - theta`` (see
  `stochastic_round`), which `optax.apply_updates` adds exactly, so

  .. math::

    \theta_{t+1} = \mathrm{SR}(\theta_t + u_t), \qquad
    E[\theta_{t+1}] = \theta_t + u_t ,

  and updates far below the dtype's spacing still move the weights on
  average. Float32 (and wider) leaves pass through unchanged. Step ``t``
  draws from ``fold_in(key, t)`` split per leaf, with the key from the
  ``"stochastic_rounding"`` stream of ``key``.

  Args:
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).

  Returns:
    An `optax.GradientTransformation` with state `StochasticRoundingState`.

  Raises:
    ValueError: at init if no floating-point leaf is narrower than float32.

  Examples:
    >>> import jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.full(4, 0.1, jnp.bfloat16)}
    >>> loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
    >>> tx = optax.chain(zojax.mezo(1e-6), zojax.stochastic_rounding(key=0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> optax.apply_updates(params, updates)["w"].dtype
    dtype(bfloat16)
  """
  key = _deprecations.renamed("zojax.stochastic_rounding", "key", key, "seed", seed, 0)
  key = keys_lib.stream_key(keys_lib.as_key(key), "stochastic_rounding")

  def init_fn(params):
    _check_some_narrow(params, jnp.float32, "stochastic_rounding")
    return StochasticRoundingState(count=jnp.zeros([], jnp.int32), key=key)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "stochastic_rounding needs params: call update(updates, state, params, ...)."
      )
    leaves, treedef = jax.tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    leaf_keys = keys_lib.leaf_keys(keys_lib.step_key(state.key, state.count), params)
    out = []
    for i, (p, u) in enumerate(zip(leaves, u_leaves)):
      dtype = jnp.result_type(p)
      if not _is_float(p) or not _narrower(dtype, jnp.float32):
        out.append(u)
        continue
      target = p.astype(jnp.float32) + u.astype(jnp.float32)
      rounded = stochastic_round(target, dtype, leaf_keys[i])
      out.append(rounded.astype(jnp.float32) - p.astype(jnp.float32))
    new_state = StochasticRoundingState(count=optax.safe_increment(state.count), key=state.key)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)
