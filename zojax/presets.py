"""Ready-made optimizers from the papers, each one `optax.chain` of public pieces."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from zojax import keys as keys_lib
from zojax import perturbations
from zojax.estimators import zo_grad

__all__ = ["mezo", "matrix_mask"]


def matrix_mask(mask: perturbations.Mask = None) -> Callable:
  """Mask selecting leaves with ``ndim >= 2`` (and inside ``mask``, if given).

  MeZO (like most LLM recipes) applies weight decay only to weight matrices,
  not to biases or normalisation gains; this is the mask for
  `optax.add_decayed_weights` and friends.
  """

  def fn(tree):
    flags = perturbations.resolve_mask(mask, tree)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
      treedef, [flag and leaf.ndim >= 2 for flag, leaf in zip(flags, leaves)]
    )

  return fn


def mezo(
  learning_rate: optax.ScalarOrSchedule,
  eps: float = 1e-3,
  weight_decay: float = 0.0,
  *,
  num_queries: int = 1,
  distribution: str = "gaussian",
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  vectorize: bool = False,
  seed: keys_lib.KeyLike = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., arXiv 2305.17333).

  Per step, with ``N`` Gaussian directions ``z_i`` (``N = 1`` in the paper):

  .. math::

    c_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2\epsilon},
    \qquad
    \theta \leftarrow \theta - \eta_t \Big(\frac{1}{N}\sum_i c_i z_i
      + \lambda \theta\Big),

  where the decay ``lambda`` skips leaves with fewer than two dimensions
  (biases, LayerNorm), as MeZO skips "bias" and "layer_norm" parameters.
  Defaults follow the paper: ``eps = 1e-3``, no weight decay, 2 forward
  passes per step. The paper's learning rates are 1e-6 / 1e-7 for full
  fine-tuning of OPT-13B and 1e-6 for RoBERTa-large.

  This is ``optax.chain(zo_grad(...), add_decayed_weights(...),
  scale_by_learning_rate(...))``. ZO-SGD with momentum and ZO-Adam are the
  same chain with another optimizer after `zo_grad`, e.g.
  ``optax.chain(zojax.zo_grad(), optax.sgd(lr, momentum=0.9))`` or
  ``optax.chain(zojax.zo_grad(), optax.adam(lr))``.

  Args:
    learning_rate: ``eta``, a float or an optax schedule.
    eps: perturbation scale.
    weight_decay: ``lambda``, applied to leaves with ``ndim >= 2``.
    num_queries: directions per step (n-SPSA; the estimate is their mean).
    distribution: ``"gaussian"`` (MeZO), ``"rademacher"`` or ``"sphere"``.
    mask: leaves to train (see `zojax.zo_grad`); others are left unchanged.
    loss_fn: optional loss bound at construction (see `zojax.zo_grad`).
    vectorize: evaluate the queries with `vmap`.
    seed: an integer seed or a `jax.random` key.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass ``value_fn=`` (or
    ``batch=`` when ``loss_fn`` is bound) to ``update``.

  Example:
    >>> import jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p: jnp.sum((p["w"] @ jnp.ones(2) + p["b"]) ** 2)
    >>> tx = zojax.mezo(learning_rate=1e-2, weight_decay=1e-4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
    zo_grad(
      loss_fn,
      num_queries=num_queries,
      eps=eps,
      estimator="two_sided",
      distribution=distribution,
      mask=mask,
      vectorize=vectorize,
      seed=seed,
    ),
    optax.add_decayed_weights(weight_decay, mask=matrix_mask(mask)),
    optax.scale_by_learning_rate(learning_rate),
  )
