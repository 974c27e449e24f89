"""Zeroth-order gradient estimation as an optax transformation.

`zo_grad` turns a loss into a gradient estimate from forward passes alone,
and emits that estimate as its ``updates``, so any optax transform can
follow it in an `optax.chain` (SGD, momentum, Adam, schedules, masks).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jex_core

from zojax import _deprecations, array_leaves, eager, hyperparams, perturb_at_use, perturbations
from zojax import keys as keys_lib

ESTIMATORS = ("two_sided", "one_sided")
# eps is a perturbation scale relative to weights of order 1e-2 .. 1: above 1
# the perturbed model is another model and the difference quotient no longer
# estimates a derivative. Below 1e-5 a float32 weight of order 1 no longer
# moves by eps * z (its spacing is 6e-8 * |w|): warned, not refused (float64).
EPS_MAX = 1.0
EPS_WARN_BELOW = 1e-5
EPS_HINT = "It is the perturbation scale (MeZO: 1e-3), not a stability constant."
# Finite differences larger than this are treated like a non-finite loss. A |c_i| of 2^40 ~ 1.1e12
# means the loss moved by 2.2e9 within eps = 1e-3: a spike or a divergence, not a slope. Below it,
# the products later transforms form stay finite in float32 (largest value ~2^128): Adam's g^2,
# g = c z, for any direction entry |z| < 2^24 (Gaussian and Rademacher entries are below 8; a
# sphere direction's reach 2^24 only for d >= 2^48); ZO-MOPI's M^T M V, sums of up to r n squares
# of momentum entries below 2^43 (|z| < 8), for r n = rank x fan-in < 2^42.
MAX_PROJECTED_GRAD = 2.0**40
CLIP_HINT = (
  "It is k in |c_i| <= k * RMS(past c); k <= 1 clips typical steps and the running RMS, which is "
  "fed the clipped values, shrinks towards 0. Use 3 to 10."
)

__all__ = ["ESTIMATORS", "MAX_PROJECTED_GRAD", "ZOGradState", "zo_grad", "forwards_per_step"]


class ZOGradState(NamedTuple):
  """State of `zo_grad`.

  Attributes:
    count: number of steps taken (int32); step ``t`` draws from
      ``fold_in(key, t)``.
    key: the transform's `jax.random` key. It is never advanced; every draw
      is derived from it (see `zojax.keys`).
    loss: the loss at the current parameters as seen by the last step, in
      float32: ``f(theta)`` for the one-sided estimator, and the mean of the
      ``f(theta +- eps z_i)`` for the two-sided one (equal to ``f(theta)`` up
      to O(eps^2)). Lets a training loop log the loss without another
      forward pass.
    projected_grads: the finite-difference scalars ``c_i`` of the last step
      as applied (after ``clip_c``), shape ``(num_queries,)``, float32 (zero
      on a skipped step). With the key they determine the step exactly, so a
      run can be replayed from them.
    num_nonfinite: how many steps were skipped because a loss or a ``c_i``
      was not finite or a ``|c_i|`` exceeded `MAX_PROJECTED_GRAD`.
    c_mean_square: float32 running mean ``s^2`` of the ``c_i^2`` (as
      applied) over the steps counted by ``c_count``: an exponential moving
      average with decay ``clip_decay``, debiased like Adam's second moment,
      so ``sqrt(c_mean_square)`` is the typical ``|c_i|`` of recent steps.
      0 before the first such step. Kept with clipping off too.
    c_count: number of steps averaged into ``c_mean_square``: steps that
      were not skipped and whose ``c_i`` are not all zero.
  """

  count: jax.Array
  key: jax.Array
  loss: jax.Array
  projected_grads: jax.Array
  num_nonfinite: jax.Array
  c_mean_square: jax.Array
  c_count: jax.Array


_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Config:
  num_queries: int
  eps: float
  estimator: str
  distribution: str
  mask: Any
  vectorize: bool
  axis_name: str | None
  perturb_at_use: bool = True


def forwards_per_step(num_queries: int = 1, estimator: str = "two_sided") -> int:
  """Forward passes one `zo_grad` step costs: ``2 N`` two-sided, ``N + 1`` one-sided."""
  _check_estimator(estimator)
  return 2 * num_queries if estimator == "two_sided" else num_queries + 1


def _check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown estimator {estimator!r}; expected one of {ESTIMATORS}.")


def _resolve_value_fn(loss_fn, value_fn, batch) -> Callable[[Any], jax.Array]:
  if loss_fn is not None:
    if value_fn is not None:
      raise ValueError(
        "This zo_grad was built with a loss_fn, so it takes the batch as "
        "update(..., batch=batch); it does not also take value_fn=."
      )
    if batch is _MISSING:
      return loss_fn
    return lambda p: loss_fn(p, batch)
  if value_fn is None:
    raise ValueError(
      "zo_grad needs the loss: call update(updates, state, params, "
      "value_fn=lambda p: loss(p, batch)), or build it as zo_grad(loss_fn) and "
      "call update(updates, state, params, batch=batch)."
    )
  if not callable(value_fn):
    raise TypeError(f"value_fn must be callable, got {type(value_fn).__name__}.")
  return value_fn


def _check_value_fn(value_fn, params, flags=None) -> None:
  """Trace-time checks of the loss: a float scalar that depends on the perturbed leaves."""
  closed, out = jax.make_jaxpr(value_fn, return_shape=True)(params)
  leaves = jax.tree.leaves(out)
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    shapes = jax.tree.map(lambda x: x.shape, out)
    first = jax.tree.leaves(out[0]) if isinstance(out, (tuple, list)) and len(out) == 2 else []
    if len(first) == 1 and first[0].shape == ():
      raise ValueError(
        "value_fn must return the scalar loss alone; it returned a pair (loss, aux) "
        f"with shapes {shapes}. zojax evaluates the loss at perturbed parameters, so an "
        "auxiliary output (e.g. Flax batch_stats from mutable=['batch_stats']) would "
        "come from a perturbed model: return the loss only, and compute what you need "
        "from an unperturbed forward after the step (see the Flax pages of the docs)."
      )
    if isinstance(out, dict):
      raise ValueError(
        f"value_fn must return a scalar loss; it returned a dict with shapes {shapes}. "
        "Return the loss itself (e.g. out['loss'])."
      )
    raise ValueError(
      f"value_fn must return a scalar loss; it returned shapes {shapes}. "
      "Reduce the loss over the batch (e.g. with .mean())."
    )
  if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
    raise TypeError(f"value_fn must return a floating-point scalar, got dtype {leaves[0].dtype}.")
  if jnp.finfo(leaves[0].dtype).bits < 32:
    warnings.warn(
      f"value_fn returns a {leaves[0].dtype} loss. Its spacing (about 0.016 near a loss of 2 "
      "for bfloat16) is far above eps * |grad|, so the finite differences are mostly rounding "
      "noise. Compute the loss in float32 (e.g. cast the logits before the softmax).",
      stacklevel=4,
    )
  if not _depends_on_inputs(closed.jaxpr, flags):
    warnings.warn(
      "The loss does not depend on the parameters zo_grad perturbs: every finite "
      "difference is 0 and nothing trains. Does value_fn use its argument? (An NNX "
      "value_fn must rebuild the model from it, nnx.merge(graphdef, params, rest), not "
      "close over the model; a linen one must call model.apply with it.)",
      stacklevel=4,
    )


def _depends_on_inputs(jaxpr, flags=None) -> bool:
  """Whether the jaxpr's output depends on one of its (flagged) inputs.

  A forward pass over the equations; an equation with a dependent input makes
  all its outputs dependent (sub-jaxprs, e.g. of ``scan``, are not looked
  into: conservative, it may report a dependence that a branch drops).
  """
  invars = list(jaxpr.invars)
  if flags is not None and len(flags) == len(invars):
    invars = [v for v, f in zip(invars, flags) if f]
  dependent = set(invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jex_core.Literal) and v in dependent for v in eqn.invars):
      dependent.update(eqn.outvars)
  return any(not isinstance(v, jex_core.Literal) and v in dependent for v in jaxpr.outvars)


def _replica_mean(values: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of the loss values over the data-parallel axis (the only communication)."""
  if axis_name is None:
    return values
  try:
    return jax.lax.pmean(values, axis_name)
  except NameError as err:
    raise ValueError(
      f"zo_grad(axis_name={axis_name!r}) is not running under a jax.pmap or jax.shard_map "
      "that binds that axis. Map the train step over it, or leave axis_name=None under "
      "plain jit."
    ) from err


def _estimate(
  value_fn: Callable[[Any], jax.Array],
  params,
  step_key: jax.Array,
  config: _Config,
  param_map: Callable[[Any], Any] | None = None,
):
  """Runs the queries of one step and returns ``(loss, c, ok)``.

  Two-sided (MeZO/SPSA, arXiv 2305.17333 eq. 2):
    ``c_i = [f(theta + eps z_i) - f(theta - eps z_i)] / (2 eps)``
  One-sided with a shared baseline (ZO-Muon/ZO-MOPI multi-query path):
    ``c_i = [f(theta + eps z_i) - f(theta)] / eps``
  (`_combine` turns them into ``g = (1/N) sum_i c_i z_i``). Losses are
  differenced in their own dtype promoted to at least float32 (so float64
  losses are not rounded to float32 before the division by eps amplifies the
  rounding), and the ``c_i`` and the loss are returned in float32. The step
  is not ``ok`` if a loss or a ``c_i`` is not finite or a ``|c_i|`` exceeds
  `MAX_PROJECTED_GRAD` (checked before the cast to float32); every ``c_i``
  is then zeroed, so the estimate is exactly zero.
  """
  num, eps = config.num_queries, config.eps
  dist, mask = config.distribution, config.mask
  inner_fn = value_fn
  if param_map is not None:
    value_fn = lambda p: inner_fn(param_map(p))
  loss_dtype = jnp.promote_types(jax.eval_shape(value_fn, params).dtype, jnp.float32)
  qkeys = jax.vmap(lambda i: keys_lib.query_key(step_key, i))(jnp.arange(num))

  def evaluate(key, scale):
    if config.perturb_at_use:
      value = perturb_at_use.value_at(inner_fn, params, key, scale, dist, mask, param_map)
      return jnp.asarray(value, loss_dtype)
    perturbed = perturbations.perturb(params, key, scale, dist, mask)
    return jnp.asarray(value_fn(perturbed), loss_dtype)

  def run(keys, scales):
    if config.vectorize:
      return jax.vmap(evaluate)(keys, scales)
    return jax.lax.map(lambda a: evaluate(*a), (keys, scales))

  if config.estimator == "two_sided":
    # One map entry per (query, sign): each forward regenerates its z, so the
    # program never holds z next to a perturbed copy of the weights.
    keys2 = jnp.repeat(qkeys, 2)
    scales = jnp.tile(jnp.asarray([eps, -eps], jnp.float32), num)
    values = _replica_mean(run(keys2, scales), config.axis_name).reshape(num, 2)
    c = (values[:, 0] - values[:, 1]) / (2.0 * eps)
    loss = jnp.mean(values)
    finite = jnp.all(jnp.isfinite(values))
  else:
    if config.vectorize:
      f0 = jnp.asarray(value_fn(params), loss_dtype)
      both = jnp.concatenate([f0[None], run(qkeys, jnp.full((num,), eps, jnp.float32))])
    else:
      # The unperturbed forward f(theta) runs as entry 0 of the queries'
      # sequential map: evaluated outside it, its activations get buffers of
      # their own and the step needs the memory of two forward passes.
      def entry(args):
        key, base = args
        if config.perturb_at_use:
          # theta + 0 z is theta exactly (z is finite), so the baseline is the
          # same perturbed-at-use forward with scale 0.
          return evaluate(key, jnp.where(base, 0.0, eps).astype(jnp.float32))
        perturbed = jax.lax.cond(
          base, lambda: params, lambda: perturbations.perturb(params, key, eps, dist, mask)
        )
        return jnp.asarray(value_fn(perturbed), loss_dtype)

      keys0 = jnp.concatenate([qkeys[:1], qkeys])
      both = jax.lax.map(entry, (keys0, jnp.arange(num + 1) == 0))
    both = _replica_mean(both, config.axis_name)
    f0, values = both[0], both[1:]
    c = (values - f0) / eps
    loss = f0
    finite = jnp.all(jnp.isfinite(values)) & jnp.isfinite(f0)
  # NaN compares False, so a NaN c_i fails the bound too.
  ok = finite & jnp.all(jnp.abs(c) <= MAX_PROJECTED_GRAD)
  c = jnp.where(ok, c, jnp.zeros_like(c)).astype(jnp.float32)
  return loss.astype(jnp.float32), c, ok


def _combine(params, step_key: jax.Array, c: jax.Array, config: _Config):
  """The estimate ``g = (1/N) sum_i c_i z_i``, the ``z_i`` regenerated from their keys."""
  num = config.num_queries
  qkeys = jax.vmap(lambda i: keys_lib.query_key(step_key, i))(jnp.arange(num))
  return perturbations.combine_directions(
    params, qkeys, c / num, config.distribution, config.mask, vectorize=config.vectorize
  )


def _clip(c: jax.Array, c_mean_square: jax.Array, clip_c) -> jax.Array:
  """``clip(c_i, -k s, k s)`` with ``k = clip_c`` and ``s^2 = c_mean_square`` (none while 0)."""
  bound = jnp.where(c_mean_square > 0, clip_c * jnp.sqrt(c_mean_square), jnp.inf)
  return jnp.clip(c, -bound, bound).astype(jnp.float32)


def _update_c_mean_square(c_mean_square, c_count, c, ok, decay):
  """One debiased EMA step of ``s^2`` towards ``mean_i c_i^2``; see `ZOGradState`.

  With ``n`` the count after the step, ``s^2 <- s^2 + w (mean_i c_i^2 - s^2)`` and
  ``w = (1 - decay) / (1 - decay^n)``, which equals dividing the plain EMA by
  ``1 - decay^n``; ``w = 1`` on the first step, so it seeds ``s^2``. Steps that are
  not ``ok`` or whose ``c_i`` are all zero (a replayed skipped step looks like that)
  leave ``s^2`` and ``n`` unchanged.
  """
  square = jnp.mean(jnp.square(c))
  observed = ok & (square > 0)
  count = jnp.where(observed, optax.safe_increment(c_count), c_count)
  # n = 1 exactly 1 (jnp.power may not return decay^1 == decay bit for bit).
  weight = jnp.where(count <= 1, 1.0, (1.0 - decay) / (1.0 - decay ** jnp.maximum(count, 1)))
  mean = jnp.where(observed, c_mean_square + weight * (square - c_mean_square), c_mean_square)
  return mean.astype(jnp.float32), count


def _check_no_updates(updates) -> None:
  """Raises if ``updates`` holds arrays: the estimator takes no incoming gradient."""
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return
  raise ValueError(
    "zo_grad computes the gradient itself, from the loss, so it takes updates=None, but it "
    f"received a tree of {len(leaves)} arrays. Pass zojax.NO_GRADIENT (or None): "
    "tx.update(zojax.NO_GRADIENT, state, params, value_fn=loss). If a transform before "
    "the estimator made them, put it after the estimator: "
    "optax.chain(zojax.zo_grad(), optax.clip_by_global_norm(1.0), optax.sgd(lr)). "
    "optax.MultiSteps and optax.apply_if_finite cannot wrap a zojax optimizer (they read "
    "the incoming updates, which are None here): accumulate with zojax.multi_steps(tx, k); "
    "non-finite steps are already skipped by the estimator. See 'Wrappers' in the optax "
    "page of the docs."
  )


def _replay(projected_grads, config: _Config, value_fn, batch):
  """A recorded step's ``(loss, c, ok)``: NaN, the ``c_i`` as recorded, True."""
  if value_fn is not None or batch is not _MISSING:
    raise ValueError(
      "zo_grad got projected_grads= (replaying a recorded step) together with a loss or "
      "batch; a replayed step evaluates no loss, so pass one or the other."
    )
  c = jnp.asarray(projected_grads)
  if c.shape != (config.num_queries,) or not jnp.issubdtype(c.dtype, jnp.floating):
    raise ValueError(
      f"projected_grads must be a float array of shape ({config.num_queries},) (one scalar "
      f"per query), got dtype {c.dtype} and shape {c.shape}."
    )
  return jnp.full([], jnp.nan, jnp.float32), c.astype(jnp.float32), jnp.asarray(True)


def zo_grad(
  loss_fn: Callable[..., jax.Array] | None = None,
  *,
  num_queries: int | None = None,
  eps: float = 1e-3,
  estimator: str = "two_sided",
  distribution: str = "gaussian",
  mask: perturbations.Mask = None,
  vectorize: bool = False,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  perturb_at_use: bool = True,
  clip_c: float | None = None,
  clip_decay: float = 0.99,
  seed: keys_lib.KeyLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Zeroth-order (SPSA) gradient estimate from forward passes only.

  Estimates the gradient of a scalar loss ``f`` at the current parameters
  with ``N = num_queries`` random directions ``z_i`` (MeZO, Malladi et al.,
  arXiv 2305.17333; SPSA, Spall 1992):

  .. math::

    \text{two-sided:}\quad c_i = \frac{f(\theta + \epsilon z_i) -
      f(\theta - \epsilon z_i)}{2\epsilon}, \qquad
    \text{one-sided:}\quad c_i = \frac{f(\theta + \epsilon z_i) -
      f(\theta)}{\epsilon},

  .. math::

    \hat g = \frac{1}{N} \sum_{i=1}^{N} c_i z_i ,

  with ``E[z z^T] = I``, so ``E[g] = grad f + O(eps^2)``. The estimate is
  returned as ``updates``; follow it with e.g. `optax.sgd`, `optax.trace`
  or `optax.adam` to make an optimizer. A step costs ``2N`` forward passes
  (two-sided) or ``N + 1`` (one-sided), see `forwards_per_step`.

  The loss reaches ``update`` in one of two ways:

  * ``zo_grad(...)``: pass ``value_fn=lambda p: loss(p, batch)`` as an extra
    argument (the convention of optax's line searches, which `optax.chain`
    forwards unchanged);
  * ``zo_grad(loss_fn, ...)``: the loss is bound here and the batch is passed
    as ``update(..., batch=batch)``, calling ``loss_fn(params, batch)`` (or
    ``loss_fn(params)`` when no batch is given).

  There is no incoming gradient: pass ``updates=None`` (a tree with array
  leaves raises, since it means a transform of the gradient was placed
  before the estimator, where it has nothing to act on). ``params`` is
  required. Wrappers that read the incoming updates (`optax.MultiSteps`,
  `optax.apply_if_finite`, `optax.masked`) cannot wrap the estimator; see
  `zojax.multi_steps` for gradient accumulation.

  Replay: ``update(..., projected_grads=c)`` with the ``c_i`` a step
  recorded (``state.projected_grads`` after it, see `zojax.trajectory`)
  rebuilds that step's estimate from the key alone, without a loss or a
  forward pass; the state's ``loss`` is then NaN.

  A combinator that hands this estimator other coordinates than the model's
  parameters (`zojax.subspace`) passes ``param_map=``, a function from those
  coordinates to the parameters the loss takes; the loss is then evaluated
  at ``param_map(params + eps z)``. This works with both ways of giving the
  loss, so a subspace wraps a loss-bound estimator as well.

  Randomness: the state holds a `jax.random` key; step ``t`` and query ``i``
  draw from ``fold_in(fold_in(key, t), i)``, split per leaf, so the same key
  and inputs give bit-identical updates. Directions are regenerated from
  their keys for every forward and for the update instead of being stored.

  Queries run inside the caller's `jit`: one after another in a `lax.map`
  (memory of one forward pass) or, with ``vectorize=True``, batched with
  `vmap` (faster when memory allows).

  Skipped steps: if any loss or ``c_i`` of a step is not finite, or any
  ``|c_i|`` exceeds `MAX_PROJECTED_GRAD` (``2^40``: the loss moved by 2.2e9
  within ``eps = 1e-3``, a spike rather than a slope, whose square or matrix
  products would overflow float32 later in the chain), every ``c_i`` is set
  to zero, the emitted updates are zero, and ``num_nonfinite`` is
  incremented: one bad batch never turns the parameters or the state of a
  transform after this one into NaN or inf. Those transforms still run on
  the zero estimate: momentum (`optax.trace`, `optax.ema`, `optax.adam`)
  decays and keeps moving the parameters, weight decay still applies.

  Clipping (``clip_c = k``): a finite spike below that bound still gives a
  step of ``|c_i|`` times the learning rate (a loss jump of 100 on one query
  makes ``c = 5e4`` at ``eps = 1e-3``). With ``k`` set, each ``c_i`` is
  clipped to a multiple of the running scale of the past ones:

  .. math::

    \tilde c_{i,t} = \operatorname{clip}(c_{i,t}, -k s_{t-1}, k s_{t-1}),
    \qquad
    s_t^2 = s_{t-1}^2 + \frac{1 - \beta}{1 - \beta^{n_t}}
      \Big(\frac{1}{N}\sum_i \tilde c_{i,t}^2 - s_{t-1}^2\Big),

  with ``beta = clip_decay`` and ``n_t`` the number of steps averaged so far
  (`ZOGradState.c_count`): a debiased exponential moving average of the
  clipped squares, over steps that were not skipped and whose ``c_i`` are not
  all zero (others leave ``s`` and ``n`` unchanged). Fed the clipped values,
  ``s`` grows by at most a factor ``sqrt(1 + w (k^2 - 1))`` per spike, with
  ``w = (1 - beta) / (1 - beta^n)`` the step's weight (``1 - beta`` once ``n
  >> 1 / (1 - beta)``, about ``1 / n`` before), so a single spike is bounded
  to ``k s`` and moves the scale little. Warm-up: until a first step has been
  averaged there is no scale and that step is not clipped (it seeds ``s^2 =
  mean_i c_i^2``, so a spike on the very first step is not bounded); the
  debiasing then gives the early steps equal weight, so an unluckily small
  first ``|c|`` is outgrown within a few steps (each may raise ``s^2`` by up
  to ``k^2`` times its weight). For Gaussian ``c_i`` the scale settles at the
  fixed point of ``s^2 = E[min(c^2, k^2 s^2)]``: 0.997 of their RMS at ``k =
  3``, 0.95 at ``k = 2``, 0.3 at ``k = 1.1``, and it shrinks to zero at ``k <=
  1``. The ``c_i`` are clipped one by one, not the estimate's norm, so with
  ``N > 1`` one spiking query does not shrink the others. All of it is a few
  scalar operations on the ``c_i`` inside the step: no gradient-sized work,
  nothing communicated beyond the averaged losses (every replica computes the
  same ``c_i`` and the same ``s``), and the same key gives the same clipped
  steps. The scale is kept in the state with clipping off too. A clip on the
  norm of the estimate instead is ``optax.clip_by_global_norm(max_norm)``
  after this transform, with a fixed threshold of the order of ``|c|
  sqrt(d)``.

  Args:
    loss_fn: optional loss ``loss_fn(params, batch) -> scalar`` bound at
      construction; if None, ``value_fn`` must be passed to ``update``.
    num_queries: number of directions per step, ``N >= 1``; None means 1.
    eps: the perturbation scale ``epsilon > 0`` of the MeZO and SPSA papers
      (not optax's stability constant).
    estimator: ``"two_sided"`` (MeZO) or ``"one_sided"`` (shared baseline).
    distribution: direction distribution, ``"gaussian"``, ``"rademacher"``
      or ``"sphere"`` (uniform on the sphere of radius ``sqrt(d)``).
    mask: which leaves to perturb and estimate: None for all, or a pytree of
      bools / a callable returning one (as in `optax.masked`). Masked-out
      leaves are not perturbed and get zero updates. Integer and boolean
      leaves must be masked out.
    vectorize: evaluate the queries with `vmap` instead of `lax.map`.
    key: an integer or a `jax.random` key for the state (``seed=``, its former name, is deprecated).
    axis_name: for data parallelism under `jax.pmap` or `jax.shard_map`: the
      mapped axis the batch is split over. Every replica holds the same key,
      so all draw the same directions; only the loss values are averaged
      over the axis (``num_queries`` scalars per step, plus the baseline for
      the one-sided estimator), so replicas compute identical updates and
      never exchange gradients. Leave it None under plain `jit`, where a
      loss that averages a sharded batch is already global.
    perturb_at_use: evaluate each perturbed forward with
      `zojax.perturb_at_use.value_at`, which perturbs every large leaf where
      the loss uses it (one layer's slice inside a ``scan``, the gathered
      rows of an embedding) instead of building a perturbed copy of all the
      weights: a step then needs about the memory of an inference forward
      when the weights dominate (language models). Same draws and formula,
      so the estimate equals the up-front one up to float rounding. False
      perturbs the whole tree up front (the behaviour before this option).
    clip_c: ``k > 1``, clip each ``c_i`` to ``k`` times the running RMS of
      the past ones (see above; 3 to 10 is a sensible range), or None (the
      default) for no clipping.
    clip_decay: ``beta`` in [0, 1), the decay of the running mean of the
      ``c_i^2`` (0.99: a memory of about 100 steps).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `ZOGradState`.

  Raises:
    ValueError: at construction for ``num_queries < 1``, ``eps <= 0``,
      ``clip_c <= 1``, ``clip_decay`` outside [0, 1) or an unknown
      estimator/distribution; at trace time for a missing loss, a loss
      that is not a scalar, or incoming ``updates`` that hold arrays.
    TypeError: at construction for a ``key`` that is neither an integer nor a
      key; at ``init`` for parameters with `optax.MaskedNode` placeholders
      (inside `optax.masked` or `optax.multi_transform`); at trace time for a
      non-floating leaf that is not masked out.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p, x: jnp.sum((p["w"] * x) ** 2)
    >>> tx = optax.chain(zojax.zo_grad(num_queries=2, key=0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
    >>> int(state[0].count)
    1
  """
  key = _deprecations.renamed("zojax.zo_grad", "key", key, "seed", seed, 0)
  num_queries = hyperparams.integer(
    "num_queries", 1 if num_queries is None else num_queries, minimum=1
  )
  eps = hyperparams.real("eps", eps, low=0.0, low_open=True, high=EPS_MAX, hint=EPS_HINT)
  if not hyperparams.is_traced(eps) and eps < EPS_WARN_BELOW:
    warnings.warn(
      f"eps={eps:g}: a float32 weight w moves by eps * z only where |w| is below about "
      f"eps / 6e-8 = {eps / 6e-8:.3g}; beyond, the perturbation rounds away and the "
      "finite differences measure rounding. MeZO uses 1e-3.",
      stacklevel=2,
    )
  if clip_c is not None:
    clip_c = hyperparams.real("clip_c", clip_c, low=1.0, low_open=True, hint=CLIP_HINT)
  clip_decay = hyperparams.real("clip_decay", clip_decay, low=0.0, high=1.0, high_open=True)
  _check_estimator(estimator)
  perturbations.check_distribution(distribution)
  if loss_fn is not None and not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  static_queries = num_queries if isinstance(num_queries, int) else None
  config = _Config(
    static_queries,
    eps,
    estimator,
    distribution,
    mask,
    bool(vectorize),
    axis_name,
    bool(perturb_at_use),
  )
  key = keys_lib.as_key(key)

  def init_fn(params):
    perturbations.check_not_masked(params)
    array_leaves.check_array_leaves(params)
    if static_queries is None:
      raise ValueError(
        "num_queries is traced here (optax.inject_hyperparams inside jax.jit or "
        "jax.eval_shape?), but it fixes the shape of the state. Leave it at its default, "
        "pass static_args=('num_queries',) to optax.inject_hyperparams, or call init "
        "outside jit."
      )
    return ZOGradState(
      count=jnp.zeros([], jnp.int32),
      key=key,
      loss=jnp.full([], jnp.nan, jnp.float32),
      projected_grads=jnp.zeros([static_queries], jnp.float32),
      num_nonfinite=jnp.zeros([], jnp.int32),
      c_mean_square=jnp.zeros([], jnp.float32),
      c_count=jnp.zeros([], jnp.int32),
    )

  def config_for(state) -> _Config:
    """The configuration checked against ``state`` (a traced num_queries read from it)."""
    shape = jnp.shape(state.projected_grads)
    if static_queries is None:
      return dataclasses.replace(config, num_queries=shape[0])
    if shape != (static_queries,):
      raise ValueError(
        f"This zo_grad has num_queries={static_queries}, but its state holds "
        f"projected_grads of shape {shape}: the state was built by an optimizer with "
        f"num_queries={shape[0] if len(shape) == 1 else shape}. Initialise the state with "
        "this optimizer, or build the optimizer with the state's settings."
      )
    return config

  def update_fn(
    updates,
    state,
    params=None,
    *,
    value_fn=None,
    batch=_MISSING,
    param_map=None,
    projected_grads=None,
    **extra_args,
  ):
    del extra_args
    _check_no_updates(updates)
    if params is None:
      raise ValueError("zo_grad needs params: call update(updates, state, params, ...).")
    array_leaves.check_array_leaves(params)
    key_t = keys_lib.step_key(state.key, state.count)
    config = config_for(state)
    if projected_grads is not None:
      # Recorded c_i are the applied ones (clipped already): not clipped again.
      loss, c, ok = _replay(projected_grads, config, value_fn, batch)
    else:
      fn = _resolve_value_fn(loss_fn, value_fn, batch)
      perturbations.perturbable_leaves(params, mask)
      _check_value_fn(
        fn if param_map is None else (lambda p: fn(param_map(p))),
        params,
        perturbations.perturbable_leaves(params, mask),
      )
      loss, c, ok = _estimate(fn, params, key_t, config, param_map)
      if clip_c is not None:
        c = _clip(c, state.c_mean_square, clip_c)
    grad = _combine(params, key_t, c, config)
    c_mean_square, c_count = _update_c_mean_square(
      state.c_mean_square, state.c_count, c, ok, clip_decay
    )
    new_state = ZOGradState(
      count=optax.safe_increment(state.count),
      key=state.key,
      loss=loss,
      projected_grads=c,
      num_nonfinite=state.num_nonfinite + jnp.where(ok, 0, 1).astype(jnp.int32),
      c_mean_square=c_mean_square,
      c_count=c_count,
    )
    return grad, new_state

  return optax.GradientTransformationExtraArgs(
    init_fn, eager.jit_when_concrete(update_fn, "zo_grad")
  )
