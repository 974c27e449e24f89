"""Zeroth-order steps on a Flax linen `flax.training.train_state.TrainState`.

``TrainState.apply_gradients(grads=...)`` is built for first-order training:
it calls ``tx.update(grads, opt_state, params)`` and treats every other
keyword as a field to ``replace``. A zojax optimizer takes no gradients but
the loss, as ``tx.update(None, opt_state, params, value_fn=loss)``, so
``apply_gradients`` cannot take its step (``grads=None`` raises inside
Flax, and ``value_fn=`` never reaches ``tx.update``).

`ZOTrainState` is a ``TrainState`` with one more method, ``apply_loss``,
the zeroth-order counterpart of ``apply_gradients``: it takes the loss as a
function of the parameters and returns the next state. It adds no fields,
so ``ZOTrainState.create`` and checkpointing work as for ``TrainState``,
and it subclasses like one (add ``batch_stats`` and so on). For a state
class you cannot change, `apply_loss` is the same step as a function.

Design choices: keywords of ``apply_loss`` go to ``tx.update`` (``batch=``
for a loss bound with ``zojax.zo_grad(loss_fn)``, ``projected_grads=`` for
a replay), not to ``replace`` as in ``apply_gradients``, because reaching
the optimizer is what a zeroth-order step needs; change other fields with
``.replace`` on the result. The step is pure and jit-able like
``apply_gradients``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax.training import train_state as flax_train_state

__all__ = ["ZOTrainState", "apply_loss"]


def apply_loss(
  state: flax_train_state.TrainState,
  *,
  value_fn: Callable[[optax.Params], jax.Array] | None = None,
  **extra_args: Any,
) -> flax_train_state.TrainState:
  """One zeroth-order step of ``state.tx`` on any linen ``TrainState``.

  Runs ``state.tx.update(None, state.opt_state, state.params,
  value_fn=value_fn, **extra_args)``, applies the updates with
  `optax.apply_updates` and increments ``step``.

  Args:
    state: a `flax.training.train_state.TrainState` (or subclass) whose
      ``tx`` is a zojax optimizer.
    value_fn: the loss as a function of ``state.params`` only, e.g.
      ``lambda p: loss(state.apply_fn({"params": p}, x), y)``. May be
      omitted when ``tx`` was built with a bound ``loss_fn`` and
      ``batch=`` is given instead.
    **extra_args: further keywords for ``tx.update`` (``batch=``,
      ``projected_grads=``, ...).

  Returns:
    The state with ``step + 1``, the new ``params`` and ``opt_state``.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, zojax
    >>> from flax.training import train_state
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = train_state.TrainState.create(
    ...   apply_fn=model.apply, params=params, tx=zojax.mezo(1e-2))
    >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    >>> state = zojax.train_state.apply_loss(state, value_fn=loss)
    >>> int(state.step)
    1
  """
  if value_fn is not None:
    extra_args["value_fn"] = value_fn
  updates, opt_state = state.tx.update(None, state.opt_state, state.params, **extra_args)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


class ZOTrainState(flax_train_state.TrainState):
  """A linen ``TrainState`` that takes zeroth-order steps with ``apply_loss``.

  Create it with ``ZOTrainState.create(apply_fn=..., params=..., tx=...)``
  as a ``TrainState``, with a zojax optimizer as ``tx``. Its loss for
  logging is in the optimizer state:
  ``optax.tree_utils.tree_get(state.opt_state, "loss")`` (the last step's
  loss, no extra forward pass).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, zojax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> state = zojax.ZOTrainState.create(
    ...   apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
    ...   tx=zojax.mezo(1e-2))
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    ...   return state.apply_loss(value_fn=loss)
    >>> state = train_step(state, x, y)
    >>> int(state.step)
    1
  """

  def apply_loss(
    self, *, value_fn: Callable[[optax.Params], jax.Array] | None = None, **extra_args: Any
  ) -> ZOTrainState:
    """The zeroth-order step: see `zojax.train_state.apply_loss`.

    Args:
      value_fn: the loss as a function of ``self.params``.
      **extra_args: further keywords for ``tx.update``.

    Returns:
      The next state.
    """
    return apply_loss(self, value_fn=value_fn, **extra_args)

  def apply_gradients(self, *, grads, **kwargs):
    """``TrainState.apply_gradients``, with a pointer to ``apply_loss`` for ``grads=None``.

    Raises:
      TypeError: if ``grads`` is None (a zeroth-order step takes the loss).
    """
    if grads is None:
      raise TypeError(
        "apply_gradients takes gradients; a zeroth-order step takes the loss: "
        "state.apply_loss(value_fn=lambda p: loss(p, batch))."
      )
    return super().apply_gradients(grads=grads, **kwargs)
