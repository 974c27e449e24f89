"""Ready-made optimizers from the papers, each one `optax.chain` of public pieces."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from zojax import _deprecations, hyperparams, orthogonalizers, perturbations
from zojax import keys as keys_lib
from zojax.block_coordinates import Blocks, block_coordinate
from zojax.estimators import zo_grad
from zojax.orthogonalizers import orthogonalize
from zojax.subspaces import coordinate_dimension_numbers, subspace

__all__ = [
  "DEFAULTS",
  "mezo_bcd",
  "lozo",
  "lozo_m",
  "matrix_mask",
  "mezo",
  "split_learning_rates",
  "subzero",
  "zo_mopi",
  "zo_muon",
]


# The values the presets' integer arguments take when left at None. They fix
# array shapes, so the signatures default them to None: optax.inject_hyperparams
# then leaves them static instead of turning them into (traced) arrays.
DEFAULTS = {
  "mezo": {"num_queries": 1},
  "mezo_bcd": {"num_queries": 1},
  "zo_muon": {"rank": 64, "num_queries": 4},
  "zo_mopi": {"rank": 64, "k": 32, "num_queries": 8},
  "lozo": {"rank": 2},
  "lozo_m": {"rank": 2},
  "subzero": {"rank": 24},
}


def _or_default(preset: str, name: str, value):
  return DEFAULTS[preset][name] if value is None else value


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
      treedef, [flag and jnp.ndim(leaf) >= 2 for flag, leaf in zip(flags, leaves)]
    )

  return fn


def mezo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  eps: float = 1e-3,
  weight_decay: float = 0.0,
  num_queries: int | None = None,
  distribution: str = "gaussian",
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  vectorize: bool = False,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
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
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    weight_decay: ``lambda``, applied to leaves with ``ndim >= 2``.
    num_queries: directions per step (n-SPSA; the estimate is their mean);
      None means 1.
    distribution: ``"gaussian"`` (MeZO), ``"rademacher"`` or ``"sphere"``.
    mask: leaves to train (see `zojax.zo_grad`); others are left unchanged.
    loss_fn: optional loss bound at construction (see `zojax.zo_grad`).
    vectorize: evaluate the queries with `vmap`.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass ``value_fn=`` (or
    ``batch=`` when ``loss_fn`` is bound) to ``update``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.mezo(learning_rate=1e-2, weight_decay=1e-4, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(2))
  """
  key = _deprecations.renamed("zojax.mezo", "key", key, "seed", seed, 0)
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  weight_decay = hyperparams.real("weight_decay", weight_decay, low=0.0)
  return optax.chain(
    zo_grad(
      loss_fn,
      num_queries=num_queries,
      eps=eps,
      estimator="two_sided",
      distribution=distribution,
      mask=mask,
      vectorize=vectorize,
      key=key,
      axis_name=axis_name,
      clip_c=clip_c,
    ),
    optax.add_decayed_weights(weight_decay, mask=matrix_mask(mask)),
    optax.scale_by_learning_rate(learning_rate),
  )


def split_learning_rates(
  matrix_learning_rate: optax.ScalarOrSchedule,
  vector_learning_rate: optax.ScalarOrSchedule,
  weight_dimension_numbers=None,
  *,
  dimension_numbers=None,
) -> optax.GradientTransformation:
  """Descent step with one learning rate for matrix leaves, another for the rest.

  ZO-Muon and ZO-MOPI step their orthogonalized matrices with the main
  learning rate and update biases and normalisation gains by plain ZO-SGD at
  a learning rate of their own (1e-4 in the ViT code, 1e-7 in the LLM code).
  This is ``optax.multi_transform`` of two `optax.scale_by_learning_rate`.

  Args:
    matrix_learning_rate: for leaves with a matrix view.
    vector_learning_rate: for the others.
    weight_dimension_numbers: which leaves are matrices, as for `zojax.subspace`
      (None: the default rule, every leaf with ``ndim >= 2``; a None entry
      marks a leaf that is not, e.g. the stacked biases of scanned layers).
  """
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.split_learning_rates",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )

  def labels(tree):
    dims = orthogonalizers.resolve_dimension_numbers(weight_dimension_numbers, tree)
    treedef = jax.tree.structure(tree)
    return treedef.unflatten(
      ["matrix" if d is not None else "vector" for d in treedef.flatten_up_to(dims)]
    )

  return optax.multi_transform(
    {
      "matrix": optax.scale_by_learning_rate(matrix_learning_rate),
      "vector": optax.scale_by_learning_rate(vector_learning_rate),
    },
    labels,
  )


def zo_muon(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  *,
  rank: int | None = None,
  refresh_every: int | None = 100,
  num_queries: int | None = None,
  eps: float = 1e-3,
  estimator: str = "one_sided",
  orthogonalizer: str = "newton_schulz",
  vector_learning_rate: optax.ScalarOrSchedule = 1e-4,
  weight_dimension_numbers=None,
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  vectorize: bool = False,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-Muon: subspace zeroth-order gradient, orthogonalized (Lang et al., arXiv 2602.17155).

  For each matrix ``W`` (PyTorch layout m x n) with a Haar-random ``P``
  (m x r) redrawn every ``refresh_every`` steps, and ``N`` Gaussian
  ``U_i`` (r x n):

  .. math::

    c_i = \frac{L(\theta + \epsilon P U_i) - L(\theta)}{\epsilon}, \quad
    \hat G = \frac{1}{N}\sum_i c_i U_i, \quad
    W \leftarrow W - \eta\, P\, \mathrm{NS}_5(\hat G),

  (flax kernels are handled in their transpose, see `zojax.subspace`).
  Leaves with fewer than two axes are perturbed in full in the same
  forward passes and updated by ZO-SGD at ``vector_learning_rate``. No
  momentum, no shape factor, as released. ``N + 1`` forward passes per step
  (one-sided); ``estimator="two_sided"`` with ``num_queries=1`` is the
  paper's two-forward single-query variant.

  Defaults are the released LLM recipe (r = 64, T = 100, N = 4, eta = 1e-2,
  eps = 1e-3); the ViT recipe uses N = 16 and a 1-D learning rate of 1e-4
  (the LLM code hard-codes 1e-7). ``orthogonalizer="svd"`` is the
  ``muon_svd`` variant. The refresh draws the new ``P`` before the step's
  queries, so every query and the update share it (the released
  multi-query code does not on refresh steps, ALGORITHMS.md 3.5).

  It is ``optax.chain(subspace(chain(zo_grad, orthogonalize,
  split_learning_rates(...)), ...))``: the learning rates scale the
  coordinates before the lift (the same update up to rounding), which lets
  XLA fuse the lift into the update without weight-sized constants.

  Args:
    learning_rate: ``eta`` for matrices (float or schedule).
    rank: ``r``, clamped per matrix to its output dimension; None means 64.
    refresh_every: ``T``, steps between basis redraws (None: never).
    num_queries: ``N``; None means 4.
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    estimator: ``"one_sided"`` (released multi-query path) or ``"two_sided"``.
    orthogonalizer: ``"newton_schulz"`` or ``"svd"``.
    vector_learning_rate: learning rate of the leaves with ``ndim < 2``.
    weight_dimension_numbers: matrix view of leaves (see `zojax.subspace`;
      ``dimension_numbers=``, its former name, is deprecated).
    mask: leaves to train (see `zojax.zo_grad`; it is applied to the
      coordinates, whose tree has the structure of the parameters).
    loss_fn: optional loss bound at construction.
    vectorize: evaluate the queries with `vmap`.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.zo_muon(learning_rate=1e-2, rank=2, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
  """
  key = _deprecations.renamed("zojax.zo_muon", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.zo_muon",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  vector_learning_rate = hyperparams.learning_rate("vector_learning_rate", vector_learning_rate)
  inner = optax.chain(
    zo_grad(
      loss_fn,
      num_queries=_or_default("zo_muon", "num_queries", num_queries),
      eps=eps,
      estimator=estimator,
      mask=mask,
      vectorize=vectorize,
      key=key,
      axis_name=axis_name,
      clip_c=clip_c,
    ),
    orthogonalize(orthogonalizer, weight_dimension_numbers=coordinate_dimension_numbers),
    split_learning_rates(learning_rate, vector_learning_rate, coordinate_dimension_numbers),
  )
  return optax.chain(
    subspace(
      inner,
      _or_default("zo_muon", "rank", rank),
      refresh_every,
      weight_dimension_numbers=weight_dimension_numbers,
      key=key,
    )
  )


def _warn_full_rank_k(k: int, rank: int, anchored: bool) -> None:
  """Warns that ZO-MOPI's ``k >= rank`` turns its two rank-``k`` mechanisms into no-ops."""
  anchor = (
    " and the anchored refresh keeps the whole old basis, so the subspace never changes"
    if anchored
    else ""
  )
  warnings.warn(
    f"zo_mopi: k={k} >= rank={rank}: k is clamped to the rank, so the power iteration is a "
    f"full orthogonalization of the rank-{rank} coordinates (not a partial one){anchor}. "
    f"Use k < rank, e.g. the released recipe's k = rank // 2 (here k={max(1, rank // 2)}).",
    UserWarning,
    stacklevel=3,
  )


def zo_mopi(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  *,
  rank: int | None = None,
  k: int | None = None,
  beta: float = 0.9,
  refresh_every: int | None = 500,
  anchored: bool = True,
  num_queries: int | None = None,
  eps: float = 1e-3,
  vector_learning_rate: optax.ScalarOrSchedule = 1e-4,
  weight_dimension_numbers=None,
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  vectorize: bool = False,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZO-MOPI: partial orthogonalization by power iteration (Chen & Ma, arXiv 2605.09034).

  In the subspace of ZO-Muon (one-sided, ``N + 1`` forwards per step):

  .. math::

    M_t = \beta M_{t-1} + (1 - \beta) \hat G_t, \quad
    V_t = \mathrm{QR}(M_t^\top M_t V_{t-1}), \quad
    U_t = \mathrm{colnorm}(M_t V_t), \quad
    W \leftarrow W - \eta\, P\, U_t V_t^\top,

  a rank-``k`` update (``||U V^T||_F = sqrt(k)``) from one warm-started
  power-iteration sweep per step. With ``anchored=True`` (the paper's
  "subspace from the projection of momentum") a refresh keeps the top ``k``
  directions of the momentum in the new basis and re-projects ``M`` onto it;
  with ``anchored=False`` the basis is redrawn at random (the released
  code, which comments the anchored path out). Leaves with fewer than two
  axes keep the same EMA and step at ``vector_learning_rate``.

  Defaults follow the README example of the released code (r = 64, k = 32,
  T = 500, N = 8, eta = 1e-2, eps = 1e-3) with the paper's momentum
  (``beta = 0.9``, the ``run.py`` default); the released scripts use
  ``beta = 0``, ``refresh_every = 1`` and random refresh. The warm-start
  basis ``V`` (on the input axis, which a refresh of ``P`` does not change)
  is kept across refreshes rather than reset.

  It is ``optax.chain(subspace(chain(zo_grad, ema, orthogonalize(
  "power_iteration"), split_learning_rates(...)), basis="momentum"))``.

  Args:
    learning_rate: ``eta`` for matrices.
    rank: ``r``; None means 64.
    k: rank of the partial orthogonalization (and of the anchor), clamped
      to ``rank``; None means 32. With ``k >= rank`` the power iteration is a
      full orthogonalization and the anchored refresh keeps the whole basis
      (the subspace never changes), so construction then issues a
      `UserWarning` (as `zojax.subspace` and `zojax.orthogonalize` do at
      ``init`` for leaves whose clamped ranks make ``k`` reach them).
    beta: momentum ``beta`` in [0, 1) (0 disables it).
    refresh_every: ``T``.
    anchored: momentum-anchored refresh (True) or random refresh.
    num_queries: ``N``; None means 8.
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    vector_learning_rate: learning rate of leaves with ``ndim < 2`` (the
      released LLM code uses 1e-7).
    weight_dimension_numbers: matrix view of leaves (see `zojax.subspace`;
      ``dimension_numbers=``, its former name, is deprecated).
    mask: leaves to train (see `zojax.zo_grad`).
    loss_fn: optional loss bound at construction.
    vectorize: evaluate the queries with `vmap`.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.zo_mopi(learning_rate=1e-2, rank=2, k=1, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
  """
  key = _deprecations.renamed("zojax.zo_mopi", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.zo_mopi",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  vector_learning_rate = hyperparams.learning_rate("vector_learning_rate", vector_learning_rate)
  beta = hyperparams.real("beta", beta, low=0.0, high=1.0, high_open=True)
  anchored = hyperparams.flag("anchored", anchored)
  rank = hyperparams.integer("rank", _or_default("zo_mopi", "rank", rank), minimum=1)
  k = hyperparams.integer("k", _or_default("zo_mopi", "k", k), minimum=1)
  # Python's min for concrete ranks, jnp's for traced ones (optax.inject_hyperparams).
  static = isinstance(k, int) and isinstance(rank, int)
  anchor_rank = min(k, rank) if static else jnp.minimum(k, rank)
  if static and k >= rank:
    _warn_full_rank_k(k, rank, anchored)
  inner = optax.chain(
    zo_grad(
      loss_fn,
      num_queries=_or_default("zo_mopi", "num_queries", num_queries),
      eps=eps,
      estimator="one_sided",
      mask=mask,
      vectorize=vectorize,
      key=key,
      axis_name=axis_name,
      clip_c=clip_c,
    ),
    optax.ema(beta, debias=False),
    orthogonalize(
      "power_iteration", rank=k, key=key, weight_dimension_numbers=coordinate_dimension_numbers
    ),
    split_learning_rates(learning_rate, vector_learning_rate, coordinate_dimension_numbers),
  )
  return optax.chain(
    subspace(
      inner,
      rank,
      refresh_every,
      basis="momentum" if anchored else "haar",
      anchor_rank=anchor_rank if anchored else None,
      weight_dimension_numbers=weight_dimension_numbers,
      key=key,
    ),
  )


def _lozo_chain(inner_extra, learning_rate, rank, refresh_every, paper_scaling, dims, key):
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  paper_scaling = hyperparams.flag("paper_scaling", paper_scaling)
  return optax.chain(
    subspace(
      optax.chain(inner_extra, optax.scale_by_learning_rate(learning_rate)),
      _or_default("lozo", "rank", rank),
      refresh_every,
      side="in",
      basis="gaussian",
      update_scale="inverse_rank" if paper_scaling else None,
      weight_dimension_numbers=dims,
      key=key,
    ),
  )


def lozo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int | None = None,
  refresh_every: int | None = 50,
  eps: float = 1e-3,
  paper_scaling: bool = True,
  weight_dimension_numbers=None,
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LOZO: low-rank zeroth-order SGD (Chen et al., arXiv 2410.07698).

  Each matrix (PyTorch layout m x n) is perturbed along ``U_t V^T`` with a
  lazy Gaussian ``V`` (n x r) redrawn every ``refresh_every`` steps and a
  fresh Gaussian ``U_t`` (m x r) every step; other leaves along a full
  Gaussian ``z``. Two-sided, 2 forward passes per step:

  .. math::

    c = \frac{L(\theta + \epsilon U_t V^\top) - L(\theta - \epsilon U_t V^\top)}
      {2\epsilon}, \qquad
    W \leftarrow W - \eta\, \frac{c\, U_t V^\top}{r}.

  The ``1/r`` (``paper_scaling=True``) is the paper's and makes the estimate
  unbiased (``E[V V^T] = r I``); the released code omits it
  (``paper_scaling=False``), which is the same as a learning rate ``r``
  times larger. Defaults: r = 2, T = 50, eps = 1e-3 (the paper's grid is
  r in {1, 2}, T in {50, 100}, eta in {1e-6, 1e-7} for OPT-13B).

  Args:
    learning_rate: ``eta``.
    rank: ``r``, clamped per matrix to its input dimension; None means 2.
    refresh_every: ``T`` (``nu`` in the paper).
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    paper_scaling: divide the matrix updates by ``r``.
    weight_dimension_numbers: matrix view of leaves (see `zojax.subspace`;
      ``dimension_numbers=``, its former name, is deprecated).
    mask: leaves to train (see `zojax.zo_grad`).
    loss_fn: optional loss bound at construction.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.lozo(learning_rate=1e-2, rank=2, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
  """
  key = _deprecations.renamed("zojax.lozo", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.lozo",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  inner = zo_grad(loss_fn, eps=eps, mask=mask, key=key, axis_name=axis_name, clip_c=clip_c)
  return _lozo_chain(
    inner, learning_rate, rank, refresh_every, paper_scaling, weight_dimension_numbers, key
  )


def lozo_m(
  learning_rate: optax.ScalarOrSchedule,
  *,
  beta: float = 0.9,
  rank: int | None = None,
  refresh_every: int | None = 50,
  eps: float = 1e-3,
  paper_scaling: bool = True,
  weight_dimension_numbers=None,
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LOZO-M: LOZO with momentum kept in factored form (arXiv 2410.07698).

  The momentum lives in the coordinates ``N`` (m x r) of the lazy basis:
  ``N_t = beta N_{t-1} + (1 - beta) c U_t`` and ``W <- W - eta N_t V^T / r``.
  When ``V`` is redrawn, ``N`` is re-projected by least squares,
  ``N <- N V_old^T V_new (V_new^T V_new)^{-1}``, of which the released
  code's ``N V_old^T V_new / n`` is the large-``n`` approximation. Other
  leaves keep a full-size EMA. 2 forward passes per step; momentum memory
  is ``m r`` per matrix instead of ``m n``.

  Args:
    learning_rate: ``eta``.
    beta: momentum in [0, 1) (0.9 in the released code).
    rank: ``r``; None means 2.
    refresh_every: ``T``.
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    paper_scaling: divide the matrix updates by ``r`` (see `lozo`).
    weight_dimension_numbers: matrix view of leaves (see `zojax.subspace`;
      ``dimension_numbers=``, its former name, is deprecated).
    mask: leaves to train (see `zojax.zo_grad`).
    loss_fn: optional loss bound at construction.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.lozo_m(learning_rate=1e-2, rank=2, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
  """
  key = _deprecations.renamed("zojax.lozo_m", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.lozo_m",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  inner = optax.chain(
    zo_grad(loss_fn, eps=eps, mask=mask, key=key, axis_name=axis_name, clip_c=clip_c),
    optax.ema(hyperparams.real("beta", beta, low=0.0, high=1.0, high_open=True), debias=False),
  )
  return _lozo_chain(
    inner, learning_rate, rank, refresh_every, paper_scaling, weight_dimension_numbers, key
  )


def subzero(
  learning_rate: optax.ScalarOrSchedule,
  *,
  rank: int | None = None,
  refresh_every: int | None = 1000,
  eps: float = 1e-3,
  weight_dimension_numbers=None,
  mask: perturbations.Mask = None,
  loss_fn: Callable | None = None,
  key: keys_lib.KeyLike = 0,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
  dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
  r"""SubZero: random subspace zeroth-order optimization (Yu et al., arXiv 2410.08989).

  Each matrix (m x n) is perturbed along ``s U Z V^T`` with orthonormal
  ``U`` (m x r) and ``V`` (n x r) redrawn every ``refresh_every`` steps, a
  Gaussian core ``Z`` (r x r) fresh every step and ``s = sqrt(m n) / r``,
  so ``E||s U Z V^T||_F^2 = m n`` like a full Gaussian; other leaves along
  a full Gaussian. Two-sided, 2 forward passes per step:

  .. math::

    c = \frac{L(\theta + \epsilon \Delta) - L(\theta - \epsilon \Delta)}{2\epsilon},
    \qquad W \leftarrow W - \eta\, c\, \Delta .

  Defaults: the README recipe's r = 24 and T = 1000, eps = 1e-3 (the code
  defaults are r = 8, T = 2000). Bases are Haar (QR with sign fix; the
  released code skips the sign fix).

  Args:
    learning_rate: ``eta``.
    rank: ``r``, clamped per matrix to ``min(m, n)``; None means 24.
    refresh_every: ``T``.
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    weight_dimension_numbers: matrix view of leaves (see `zojax.subspace`;
      ``dimension_numbers=``, its former name, is deprecated).
    mask: leaves to train (see `zojax.zo_grad`).
    loss_fn: optional loss bound at construction.
    key: an integer or a `jax.random` key (``seed=``, its former name, is deprecated).
    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, zojax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
    >>> loss = lambda p, x: jnp.sum((p["w"] @ x + p["b"]) ** 2)
    >>> tx = zojax.subzero(learning_rate=1e-2, rank=2, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(3))
  """
  key = _deprecations.renamed("zojax.subzero", "key", key, "seed", seed, 0)
  weight_dimension_numbers = _deprecations.renamed(
    "zojax.subzero",
    "weight_dimension_numbers",
    weight_dimension_numbers,
    "dimension_numbers",
    dimension_numbers,
  )
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  return optax.chain(
    subspace(
      optax.chain(
        zo_grad(loss_fn, eps=eps, mask=mask, key=key, axis_name=axis_name, clip_c=clip_c),
        optax.scale_by_learning_rate(learning_rate),
      ),
      _or_default("subzero", "rank", rank),
      refresh_every,
      side="both",
      scale="sqrt_mn_over_r",
      weight_dimension_numbers=weight_dimension_numbers,
      key=key,
    ),
  )


def mezo_bcd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  eps: float = 1e-3,
  blocks: Blocks = None,
  switch_every: int = 100,
  order: str = "random",
  weight_decay: float = 0.0,
  num_queries: int | None = None,
  key: keys_lib.KeyLike = 0,
  loss_fn: Callable | None = None,
  axis_name: str | None = None,
  clip_c: float | None = None,
  seed: keys_lib.KeyLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MeZO-BCD: MeZO-SGD on one block of parameters at a time (arXiv 2501.19099).

  Park, Yun, Kim, Kundu and Yang, "Elucidating Subspace Perturbation in
  Zeroth-Order Optimization" (v1: "Unraveling Zeroth-Order Optimization
  through the Lens of Low-Dimensional Structured Perturbations"). At step
  ``t`` only block ``b_t`` is perturbed and updated, with ``N`` Gaussian
  directions ``z_i`` supported on that block:

  .. math::

    c_i = \frac{L(\theta + \epsilon z_i) - L(\theta - \epsilon z_i)}{2\epsilon},
    \qquad
    \theta_{b_t} \leftarrow \theta_{b_t} - \eta_t \Big(\frac{1}{N}\sum_i c_i z_i
      + \lambda \theta_{b_t}\Big),

  and every other block is left unchanged (no decay either, as frozen
  tensors in the reference code). The weight decay ``lambda`` skips leaves
  with fewer than two dimensions, as in `zojax.mezo`. ``b_t`` switches every
  ``K = switch_every`` steps; the defaults are the reference's: ``K = 100``
  and random-reshuffle order, 2 forward passes per step (``N = 1``). The
  schedule ``eta_t`` counts global steps.

  Blocks default to one per top-level submodule (`top_level_blocks`). The
  reference code (siihwanpark/zo-block) uses one block per transformer layer
  and by default leaves the embeddings and the LM head out entirely (never
  trained). To do the same, freeze them with ids ``-1``, e.g.
  ``blocks=lambda p: top_level_blocks(p, exclude=["embed", "head"])``
  with the names of your model's submodules; to group several modules into
  one block, pass your own pytree of ids. With layers stacked and run by
  `jax.lax.scan`, each layer's slice is a block:
  ``blocks=lambda p: top_level_blocks(p, exclude=[...], stacked=["layers"])``
  (`zojax.StackedBlocks`); a step then forms the perturbed layer inside the
  scan iteration that reads it.

  This is ``optax.chain(block_coordinate(chain(zo_grad(...),
  add_decayed_weights(...)), ...), scale_by_learning_rate(...))``; MeZO-BCD
  with Adam is ``block_coordinate(optax.chain(zojax.zo_grad(),
  optax.adam(lr)))``, which keeps Adam moments per block.

  Args:
    learning_rate: ``eta``, a float or an optax schedule (of the global step).
    eps: the perturbation scale epsilon (see `zojax.zo_grad`).
    blocks: see `block_coordinate`.
    switch_every: ``K``, steps between block switches.
    order: ``"random"`` (reshuffle each epoch), ``"ascending"`` or
      ``"descending"``.
    weight_decay: ``lambda``, applied to the active block's leaves with
      ``ndim >= 2``.
    num_queries: directions per step (their mean is the estimate); None
      means 1.
    key: an integer or a `jax.random` key (directions and block order
      use independent streams of it).
    loss_fn: optional loss bound at construction (see `zojax.zo_grad`).

    axis_name: the data-parallel axis under `jax.pmap` / `jax.shard_map`;
      only loss values cross it (see `zojax.zo_grad`).
    clip_c: ``k > 1`` to clip each finite difference ``c_i`` to ``k`` times
      the running RMS of the past ones, bounding the step a loss spike
      causes (see `zojax.zo_grad`); None (default): no clipping. Each
      block keeps its own estimator state, hence its own running RMS, whose
      warm-up (no clipping) is the block's first active step.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass ``value_fn=`` (or
    ``batch=`` when ``loss_fn`` is bound) to ``update``.

  Raises:
    ValueError: see `block_coordinate` and `zojax.zo_grad`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from zojax import mezo_bcd
    >>> params = {"l0": {"w": jnp.ones((2, 2))}, "l1": {"w": jnp.ones((2, 2))}}
    >>> loss = lambda p, x: jnp.sum((p["l1"]["w"] @ p["l0"]["w"] @ x) ** 2)
    >>> tx = mezo_bcd(learning_rate=1e-2, switch_every=10, key=0)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, x))
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, jnp.ones(2))
  """
  key = _deprecations.renamed("zojax.mezo_bcd", "key", key, "seed", seed, 0)
  learning_rate = hyperparams.learning_rate("learning_rate", learning_rate)
  weight_decay = hyperparams.real("weight_decay", weight_decay, low=0.0)
  inner = optax.chain(
    zo_grad(
      loss_fn,
      num_queries=num_queries,
      eps=eps,
      estimator="two_sided",
      key=key,
      axis_name=axis_name,
      clip_c=clip_c,
    ),
    optax.add_decayed_weights(weight_decay, mask=matrix_mask()),
  )
  return optax.chain(
    block_coordinate(inner, blocks, switch_every=switch_every, order=order, key=key),
    optax.scale_by_learning_rate(learning_rate),
  )
