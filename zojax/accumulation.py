"""Gradient accumulation for zeroth-order optimizers: one step from the losses of k batches.

`optax.MultiSteps` cannot wrap a zojax optimizer. It averages the *incoming*
updates, and it calls the optimizer it wraps on every mini-step but keeps that
optimizer's output and state only on the k-th. A zojax optimizer takes no
incoming gradient (``updates=None``) and computes its estimate inside
``update``, so under `optax.MultiSteps` the estimates of k - 1 mini-steps
would be computed and thrown away.

`multi_steps` accumulates what a ZO step is made of instead: the
finite-difference scalars ``c_i`` (``num_queries`` floats). Each call
evaluates the loss on its batch along the directions of the pending step (the
wrapped optimizer's state does not advance between the calls, so all k calls
share their directions) and keeps the running mean of the ``c_i``; the k-th
call takes the step with that mean, rebuilt from the key as a replay does
(``projected_grads=``, see `zojax.trajectory`). The ``c_i`` are linear in the
loss, so their mean over k batches of equal size is the ``c_i`` of the mean
loss over the union: the step is the one the optimizer takes on a k times
larger batch. When the optimizer's update is linear in the estimate (`mezo`;
`zojax.zo_grad` followed by SGD or weight decay), it is also the mean of the
k updates each batch alone would give. The extra memory is ``num_queries``
floats, not a buffer the size of the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zojax import hyperparams, trajectory
from zojax.block_coordinates import BlockCoordinateState
from zojax.estimators import ZOGradState

__all__ = ["MultiStepsState", "multi_steps"]


class MultiStepsState(NamedTuple):
  """State of `multi_steps`.

  Attributes:
    mini_step: calls since the last step (int32, in ``[0, every_k)``).
    gradient_step: steps the wrapped optimizer has taken (int32).
    mean_projected_grads: running mean of the ``c_i`` of the calls since the
      last step, float32 of shape ``(num_queries,)``.
    mean_loss: running mean of the losses those calls saw (float32; 0 right
      after a step). After a step, the wrapped optimizer's ``loss`` field holds the step's mean, so
      ``optax.tree_utils.tree_get(state, "loss")`` logs as without the
      wrapper.
    pending_nonfinite: how many of those calls the estimator skipped (a loss
      or a finite difference not finite). A step adds them to the wrapped
      estimator's ``num_nonfinite``, which so counts skipped batches.
    inner_state: the wrapped optimizer's state; it changes only on steps.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  mean_projected_grads: jax.Array
  mean_loss: jax.Array
  pending_nonfinite: jax.Array
  inner_state: Any


def _is_estimator_state(x) -> bool:
  return isinstance(x, (ZOGradState, BlockCoordinateState))


def _loss(state) -> jax.Array:
  """The loss the (single) estimator in ``state`` saw on the last step."""
  nodes = jax.tree.leaves(state, is_leaf=_is_estimator_state)
  losses = [n.loss for n in nodes if _is_estimator_state(n)]
  return losses[0] if len(losses) == 1 else jnp.full([], jnp.nan, jnp.float32)


def _num_nonfinite(state) -> jax.Array:
  """Skipped steps counted by the estimators in ``state`` (all blocks together)."""
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ZOGradState))
  counts = [n.num_nonfinite for n in nodes if isinstance(n, ZOGradState)]
  return sum(counts, jnp.zeros([], jnp.int32))


def _record_step(new, old, loss, skipped):
  """``new`` with what the mini-steps saw, in the estimators that just stepped.

  A replayed step records a NaN loss and no skip (it evaluates nothing); the
  losses were evaluated, and any skips seen, by the mini-steps.
  """

  def fix(n, o):
    if isinstance(n, ZOGradState):
      stepped = n.count != o.count
      return n._replace(
        loss=jnp.where(stepped, loss, n.loss),
        num_nonfinite=jnp.where(stepped, n.num_nonfinite + skipped, n.num_nonfinite),
      )
    if isinstance(n, BlockCoordinateState):
      inner = _record_step(n.inner_states, o.inner_states, loss, skipped)
      return n._replace(loss=loss, inner_states=inner)
    return n

  return jax.tree.map(fix, new, old, is_leaf=_is_estimator_state)


def multi_steps(
  inner: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient accumulation: one step of ``inner`` every ``every_k`` calls, on their mean loss.

  The zeroth-order counterpart of `optax.MultiSteps` (which cannot wrap a
  zojax optimizer, see the module docstring). With ``c_{i,j}`` the ``i``-th
  finite difference that call ``j`` of a step measures on its batch, along
  the step's direction ``z_i``:

  .. math::

    \bar c_i = \frac{1}{k} \sum_{j=1}^{k} c_{i,j}, \qquad
    \hat g = \frac{1}{N} \sum_{i=1}^{N} \bar c_i z_i ,

  and the k-th call returns ``inner``'s update for the estimate ``g``; the
  other calls return zeros (adding them to the parameters changes nothing).
  Each call costs the forward passes of one step of ``inner``; the step
  itself, on the k-th call, costs none more. A call whose losses are not
  finite contributes ``c = 0`` (as `zojax.zo_grad` skips such a step) and
  is counted in the estimator's ``num_nonfinite`` at the step.

  Call it under `jax.jit`: each call evaluates ``inner``'s whole update to
  read the ``c_i`` of its batch, and only under `jit` is the unused rest of
  that computation removed.

  Args:
    inner: a zojax optimizer holding exactly one `zojax.zo_grad` (every
      preset; a `zojax.block_coordinate` counts as one).
    every_k: calls per step, ``k >= 1``.

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `MultiStepsState`;
    ``update`` takes what ``inner.update`` takes (``value_fn=`` or
    ``batch=``).

  Raises:
    ValueError: at ``init`` if ``inner`` holds no estimator or several; at
      ``update`` for ``projected_grads=`` (replay the wrapped optimizer
      instead).

  Example:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p, x: jnp.sum((p["w"] * x) ** 2)
    >>> tx = zojax.multi_steps(zojax.mezo(1e-2), every_k=4)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> for x in jnp.arange(8.0).reshape(8, 1):
    ...   params, state = step(params, state, x)
    >>> int(state.gradient_step)
    2
  """
  every_k = hyperparams.integer("every_k", every_k, minimum=1)
  if not isinstance(every_k, int):
    raise TypeError("every_k must be a Python integer; it is not a hyperparameter to inject.")

  def init_fn(params):
    inner_state = inner.init(params)
    try:
      c = trajectory.record(inner_state)
    except ValueError as err:
      raise ValueError(
        "multi_steps wraps a zojax optimizer holding exactly one zo_grad estimator (every "
        f"preset does): {err}"
      ) from err
    return MultiStepsState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=jnp.zeros([], jnp.int32),
      mean_projected_grads=jnp.zeros_like(c, jnp.float32),
      mean_loss=jnp.zeros([], jnp.float32),
      pending_nonfinite=jnp.zeros([], jnp.int32),
      inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if "projected_grads" in extra_args:
      raise ValueError(
        "multi_steps does not replay recorded steps: replay the wrapped optimizer, whose "
        "state holds the c_i of each step it took (zojax.trajectory.record)."
      )
    _, probed = inner.update(updates, state.inner_state, params, **extra_args)
    c = trajectory.record(probed).astype(jnp.float32)
    loss = _loss(probed).astype(jnp.float32)
    skipped = _num_nonfinite(probed) - _num_nonfinite(state.inner_state)
    pending = (state.pending_nonfinite + skipped).astype(jnp.int32)
    n = state.mini_step
    mean_c = state.mean_projected_grads + (c - state.mean_projected_grads) / (n + 1)
    mean_loss = state.mean_loss + (loss - state.mean_loss) / (n + 1)
    emit = n == every_k - 1
    # A replay evaluates no loss: the loss and batch stay with the mini-steps.
    replay_args = {k: v for k, v in extra_args.items() if k not in ("value_fn", "batch")}

    def take_step():
      out, new_inner = inner.update(
        updates, state.inner_state, params, projected_grads=mean_c, **replay_args
      )
      return out, _record_step(new_inner, state.inner_state, mean_loss, pending)

    def wait():
      shapes = jax.eval_shape(take_step)[0]
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return zeros, state.inner_state

    out, inner_state = jax.lax.cond(emit, take_step, wait)
    new_state = MultiStepsState(
      mini_step=jnp.where(emit, 0, n + 1).astype(jnp.int32),
      gradient_step=jnp.where(
        emit, optax.safe_increment(state.gradient_step), state.gradient_step
      ).astype(jnp.int32),
      mean_projected_grads=jnp.where(emit, jnp.zeros_like(mean_c), mean_c),
      mean_loss=jnp.where(emit, 0.0, mean_loss).astype(jnp.float32),
      pending_nonfinite=jnp.where(emit, 0, pending).astype(jnp.int32),
      inner_state=inner_state,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
