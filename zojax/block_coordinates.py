"""Block-coordinate zeroth-order training: perturb and update one block per step.

`block_coordinate` is a combinator in the spirit of `optax.masked`: it splits
the parameters into ``L`` blocks (by default one per top-level submodule),
and each step runs an inner transform (typically ``zo_grad`` followed by an
optimizer) on the *active* block only. The active block switches every
``switch_every`` steps, in random-reshuffle, ascending or descending order.
`zojax.mezo_bcd` is MeZO-SGD restricted to the active block (MeZO-BCD, Park et al.,
arXiv 2501.19099).

The forward passes still evaluate the whole model, but random-number
generation, perturbation, restoration and the update touch only the active
block, about ``1/L`` of the parameters; that parameter-sized work is where
the reported wall-clock speedup comes from (ALGORITHMS.md section 5.2).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax import _deprecations, array_leaves, eager, hyperparams, perturb_at_use
from zojax import keys as keys_lib

ORDERS = ("random", "ascending", "descending")

Blocks = Any | Callable[[Any], Any] | None

__all__ = [
  "ORDERS",
  "BlockCoordinateState",
  "StackedBlocks",
  "active_block",
  "block_coordinate",
  "top_level_blocks",
]


class BlockCoordinateState(NamedTuple):
  """State of `block_coordinate`.

  Attributes:
    count: number of steps taken (int32).
    key: the `jax.random` key of the block order (a stream of the ``key`` argument
      named ``"block_coordinate"``, see `zojax.keys.stream_key`). Never
      advanced; epoch ``e`` of the random order is drawn from
      ``fold_in(key, e)``.
    block: index of the block updated by the last step (int32); before the
      first step, the block the first step will update.
    loss: float32 loss reported by the active block's inner state after the
      last step (its field named ``loss``, e.g. `zojax.ZOGradState.loss`);
      NaN before the first step or if the inner state has no such field.
      Read it with ``optax.tree_utils.tree_get(state,
      "BlockCoordinateState").loss``: a plain ``tree_get(state, "loss")``
      is ambiguous here, because every block's inner state has a loss too.
    inner_states: a tuple with one inner state per block. Block ``b``'s state
      covers only that block's leaves and changes only on steps where ``b``
      is active.
  """

  count: jax.Array
  key: jax.Array
  block: jax.Array
  loss: jax.Array
  inner_states: tuple


@dataclasses.dataclass(frozen=True)
class StackedBlocks:
  """The block id of a stacked leaf: its slice ``j`` along axis 0 is block ``first + j``.

  For layers stacked on a leading axis and run by `jax.lax.scan` (one leaf
  holds every layer), MeZO-BCD's blocks are the layers, i.e. slices of
  leaves. Put ``StackedBlocks(first)`` in ``blocks`` where an int would go:
  a leaf of ``n`` layers then belongs to blocks ``first, ..., first + n - 1``.
  All leaves of one stack of layers take the same ``first``
  (`top_level_blocks` with ``stacked=`` does this).

  Attributes:
    first: the block id of slice 0, ``>= 0``.
  """

  first: int

  def __post_init__(self):
    if isinstance(self.first, bool) or not isinstance(self.first, (int, np.integer)):
      raise TypeError(f"StackedBlocks.first must be a Python int, got {self.first!r}.")
    if self.first < 0:
      raise ValueError(f"StackedBlocks.first must be >= 0, got {self.first}.")


def _natural_key(name: Any) -> tuple:
  """Sort key under which ``layer_2`` comes before ``layer_10``."""
  parts = re.split(r"(\d+)", str(name))
  return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _entry_name(entry: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _split_depth(paths: list[tuple], named: set[str]) -> int:
  """The first level of ``paths`` with more than one entry (see `top_level_blocks`).

  Descends while every leaf lives under one and the same entry that is not
  a leaf itself and is not named in ``exclude``/``stacked``.
  """
  depth = 0
  while paths and all(len(path) > depth + 1 for path in paths):
    first = {_entry_name(path[depth]) for path in paths}
    if len(first) != 1 or str(next(iter(first))) in named:
      break
    depth += 1
  return depth


def top_level_blocks(
  params: optax.Params, exclude: Collection[str] = (), stacked: Collection[str] = ()
) -> Any:
  """Block ids with one block per top-level submodule of ``params``.

  This is the default rule of `block_coordinate`. The entries of the top
  level (keys of a dict, items of a list, fields of a dataclass or Equinox
  module) are numbered in natural order (``layer_2`` before ``layer_10``);
  every leaf gets the number of the entry it lives under.

  "Top level" is the first level with more than one entry: while every
  leaf lives under one single entry (which is not a leaf itself and not
  named in ``exclude``/``stacked``), the split moves one level down. So
  ``{"params": {...}}`` (Flax variables) is split at the submodules of
  ``"params"``, and the arrays of an ``equinox.nn.MLP``, whose only array
  field is the tuple ``layers``, at its layers. One block for the whole
  model would make block-coordinate descent plain MeZO.

  An entry named in ``stacked`` holds layers stacked on a leading axis (run
  by `jax.lax.scan`): each of its ``n`` layers is a block of its own, so it
  takes ``n`` consecutive ids and its leaves get `StackedBlocks`.

  Args:
    params: the parameter pytree.
    exclude: names of top-level entries to freeze: their leaves get id
      ``-1`` and are never perturbed or updated (MeZO-BCD's reference code
      leaves embeddings and the LM head out by default).
    stacked: names of top-level entries whose leaves stack layers on axis 0
      (all with the same leading size).

  Returns:
    A pytree with the structure of ``params`` holding Python ints (and
    `StackedBlocks` under the ``stacked`` entries).

  Raises:
    ValueError: if ``params`` has a leaf at its top level (nothing to split;
      pass ``blocks=`` to `block_coordinate`), ``exclude`` or ``stacked``
      names an entry that does not exist, an entry is in both, or the leaves
      of a stacked entry disagree on their number of layers.

  Examples:
    >>> import jax.numpy as jnp
    >>> from zojax.block_coordinates import top_level_blocks
    >>> params = {"params": {"layer_10": jnp.ones(2), "layer_2": jnp.ones(2),
    ...                      "head": jnp.ones(2)}}
    >>> top_level_blocks(params, exclude=["head"])
    {'params': {'head': -1, 'layer_10': 1, 'layer_2': 0}}
    >>> top_level_blocks({"embed": jnp.ones(2), "layers": jnp.ones((3, 2))},
    ...                  stacked=["layers"])
    {'embed': 0, 'layers': StackedBlocks(first=1)}
    >>> top_level_blocks({"model": {"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]}})
    {'model': {'layers': [{'w': 0}, {'w': 1}]}}
  """
  if isinstance(exclude, str):
    exclude = (exclude,)
  if isinstance(stacked, str):
    stacked = (stacked,)
  exclude = {str(name) for name in exclude}
  stacked = {str(name) for name in stacked}
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  depth = _split_depth([path for path, _ in paths], exclude | stacked)
  names = []
  for path, _ in paths:
    if len(path) <= depth:
      where = jax.tree_util.keystr(path) or "the root"
      raise ValueError(
        f"Cannot split the parameters into top-level blocks: {where} is a single array. "
        "Pass blocks= (a pytree of int block ids, or a callable returning one)."
      )
    names.append(_entry_name(path[depth]))
  present = {str(n) for n in names}
  for argument, asked in (("exclude", exclude), ("stacked", stacked)):
    unknown = asked - present
    if unknown:
      raise ValueError(
        f"{argument} names {sorted(unknown)} that are not top-level entries; they are "
        f"{sorted(present, key=_natural_key)}."
      )
  if exclude & stacked:
    raise ValueError(f"Entries {sorted(exclude & stacked)} are in both exclude and stacked.")
  layers: dict[str, int] = {}
  for (path, leaf), name in zip(paths, names):
    if str(name) not in stacked:
      continue
    shape = jnp.shape(leaf)
    n = shape[0] if shape else 0
    if layers.setdefault(str(name), n) != n or n == 0:
      raise ValueError(
        f"The leaves of stacked entry {str(name)!r} must share one leading axis of layers; "
        f"{jax.tree_util.keystr(path)} has shape {tuple(shape)}, others "
        f"{layers[str(name)]} layers."
      )
  kept = sorted({n for n in names if str(n) not in exclude}, key=_natural_key)
  ids: dict[Any, Any] = {}
  next_id = 0
  for name in kept:
    if str(name) in stacked:
      ids[name] = StackedBlocks(next_id)
      next_id += layers[str(name)]
    else:
      ids[name] = next_id
      next_id += 1
  return jax.tree.unflatten(treedef, [ids.get(name, -1) for name in names])


def _resolve_blocks(blocks: Blocks, params) -> tuple[list[Any], int]:
  """One block spec per leaf (an int, ``-1`` for frozen, or `StackedBlocks`) and the count."""
  array_leaves.check_array_leaves(params)
  if blocks is None:
    tree = top_level_blocks(params)
  else:
    tree = blocks(params) if callable(blocks) else blocks
  params_def = jax.tree.structure(params)
  try:
    flat = params_def.flatten_up_to(tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "blocks must have the same pytree structure as the parameters "
      f"({params_def}); got {jax.tree.structure(tree)}."
    ) from err
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0]) if flat else ((), ())
  ids: list[Any] = []
  owned: set[int] = set()
  for path, leaf, value in zip(paths, leaves, flat):
    if isinstance(value, StackedBlocks):
      shape = jnp.shape(leaf)
      if not shape or shape[0] == 0:
        raise ValueError(
          f"Parameter {jax.tree_util.keystr(path)} has shape {tuple(shape)}: StackedBlocks "
          "needs a leading axis of layers."
        )
      ids.append(value)
      owned.update(range(value.first, value.first + shape[0]))
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(
        f"The block id of parameter {jax.tree_util.keystr(path)} must be a static Python "
        f"int (-1 to freeze the leaf) or a zojax.StackedBlocks, got {value!r}."
      )
    ids.append(max(int(value), -1))
    if ids[-1] >= 0:
      owned.add(ids[-1])
  num_blocks = max(owned, default=-1) + 1
  if num_blocks == 0:
    raise ValueError("blocks assigns no leaf to a block (every id is negative).")
  empty = sorted(set(range(num_blocks)) - owned)
  if empty:
    raise ValueError(
      f"Blocks {empty} have no leaves: number the blocks 0, 1, ..., L-1 without gaps "
      f"(got ids {sorted(owned)})."
    )
  return ids, num_blocks


def _position(spec: Any, leaf: Any, block: int) -> int | None:
  """Where block ``block`` lives in a leaf: -1 for the whole leaf, a layer, or None."""
  if isinstance(spec, StackedBlocks):
    j = block - spec.first
    return j if 0 <= j < jnp.shape(leaf)[0] else None
  return -1 if spec == block else None


def _leaf_update(x, spec, block: jax.Array, value) -> jax.Array:
  """A leaf's update: its slot's value where its block is active, zero elsewhere.

  For a stacked leaf the slot holds one layer; it is broadcast over the
  layers and kept on the active one, an elementwise expression that XLA
  fuses into `optax.apply_updates` (no stack-sized zeros are written).
  """
  zero = jnp.zeros((), x.dtype)
  if value is None:
    return jnp.zeros(jnp.shape(x), x.dtype)
  if isinstance(spec, StackedBlocks):
    layer = jax.lax.broadcasted_iota(jnp.int32, jnp.shape(x), 0)
    full = jnp.broadcast_to(jnp.asarray(value, x.dtype)[None], jnp.shape(x))
    return jnp.where(layer == block - spec.first, full, zero)
  return jnp.where(block == spec, value, zero)


def _check_order(order: str) -> None:
  if order not in ORDERS:
    raise ValueError(f"Unknown block order {order!r}; expected one of {ORDERS}.")


def _check_switch_every(switch_every: Any) -> Any:
  """``switch_every`` as an int >= 1 (a tracer passes: it only enters traced arithmetic)."""
  return hyperparams.integer("switch_every", switch_every, minimum=1)


def active_block(
  count: jax.Array | int,
  num_blocks: int,
  *,
  switch_every: int = 100,
  order: str = "random",
  key: jax.Array | None = None,
) -> jax.Array:
  """Index of the block active at step ``count``: a pure function of its inputs.

  With ``s = count // switch_every`` (the switch number), ``e = s // L``
  (the epoch) and ``j = s mod L``:

  * ``"ascending"``: block ``j`` (0, 1, ..., L-1, 0, ...);
  * ``"descending"``: block ``L - 1 - j``;
  * ``"random"``: ``perm_e[j]``, where ``perm_e`` is a random permutation of
    the ``L`` blocks drawn from ``fold_in(key, e)``: random reshuffling, so
    every block is active exactly once per epoch of ``L`` switches.

  Args:
    count: step number (a Python int or an int32 scalar, possibly traced).
    num_blocks: the number of blocks ``L`` (static).
    switch_every: steps between switches, ``K >= 1`` (static).
    order: ``"random"``, ``"ascending"`` or ``"descending"``.
    key: a `jax.random` key; required for ``"random"``.

  Returns:
    An int32 scalar in ``[0, L)``.

  Raises:
    ValueError: for an unknown order, ``switch_every < 1``, ``num_blocks < 1``
      or a missing key with ``"random"``.
  """
  _check_order(order)
  _check_switch_every(switch_every)
  if num_blocks < 1:
    raise ValueError(f"num_blocks must be >= 1, got {num_blocks!r}.")
  switch = jnp.asarray(count, jnp.int32) // switch_every
  pos = switch % num_blocks
  if order == "ascending":
    return pos.astype(jnp.int32)
  if order == "descending":
    return (num_blocks - 1 - pos).astype(jnp.int32)
  if key is None:
    raise ValueError('order="random" needs a key.')
  perm = jax.random.permutation(jax.random.fold_in(key, switch // num_blocks), num_blocks)
  return perm[pos].astype(jnp.int32)


def _fold_keys(state, index: int):
  """Folds ``index`` into every typed `jax.random` key of ``state``."""

  def fold(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      flat = x.reshape(-1)
      return jax.vmap(lambda k: jax.random.fold_in(k, index))(flat).reshape(x.shape)
    return x

  return jax.tree.map(fold, state)


def _inner_loss(state) -> jax.Array:
  for _, value in optax.tree_utils.tree_get_all_with_path(state, "loss"):
    if hasattr(value, "shape") and jnp.shape(value) == ():
      return jnp.asarray(value, jnp.float32)
  return jnp.full([], jnp.nan, jnp.float32)


def _select(leaves: list, ids: list[Any], block: int, treedef):
  """The sub-tree of block ``block``: ``None`` in place of every other leaf.

  A stacked leaf contributes its layer ``block - first`` (`StackedBlocks`).
  """
  out = []
  for x, spec in zip(leaves, ids):
    where = _position(spec, x, block)
    out.append(None if where is None else (x if where < 0 else x[where]))
  return jax.tree.unflatten(treedef, out)


class _Placement:
  """``param_map`` of block ``b``: puts the block's (perturbed) leaves back into the model.

  Whole leaves are placed as they are. A stacked leaf gets its layer written
  back; for `zojax.perturb_at_use` (``deferred_leaves``) that write is itself
  deferred (`zojax.perturb_at_use.patched`), so a scan over the stack forms
  the perturbed layer inside the iteration that reads it, and no perturbed
  copy of the stack is made.
  """

  def __init__(self, leaves, ids, block, treedef, param_map):
    self.leaves, self.ids, self.block = leaves, ids, block
    self.treedef, self.param_map = treedef, param_map

  def _place(self, sub_leaves, write):
    new = iter(sub_leaves)
    out = []
    for x, spec in zip(self.leaves, self.ids):
      where = _position(spec, x, self.block)
      if where is None:
        out.append(x)
      elif where < 0:
        out.append(next(new))
      else:
        out.append(write(x, where, next(new)))
    return out

  def __call__(self, sub):
    def write(x, where, piece):
      return jax.lax.dynamic_update_index_in_dim(x, jnp.asarray(piece, x.dtype), where, 0)

    full = jax.tree.unflatten(self.treedef, self._place(jax.tree.leaves(sub), write))
    return full if self.param_map is None else self.param_map(full)

  def deferred_leaves(self, values):
    if self.param_map is not None:
      return None
    return self.treedef, self._place(list(values), perturb_at_use.patched)


def block_coordinate(
  inner: optax.GradientTransformation,
  blocks: Blocks = None,
  *,
  switch_every: int = 100,
  order: str = "random",
  key: keys_lib.KeyLike = 0,
  seed: keys_lib.KeyLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Block-coordinate descent: runs ``inner`` on one block of leaves per step.

  The parameters are split into blocks ``B_0, ..., B_{L-1}``. At step ``t``
  exactly one block ``b_t`` is active (see `active_block`): ``inner`` runs on
  the leaves of ``b_t`` alone, with its own state for that block, and every
  other leaf gets a zero update. With ``inner = chain(zo_grad(), sgd(lr))``
  (MeZO-BCD, arXiv 2501.19099) a step is

  .. math::

    c = \frac{L(\theta + \epsilon z_{b_t}) - L(\theta - \epsilon z_{b_t})}
      {2\epsilon}, \qquad
    \theta_{b_t} \leftarrow \theta_{b_t} - \eta\, c\, z_{b_t}, \qquad
    \theta_{b} \leftarrow \theta_{b} \ (b \ne b_t),

  where ``z_{b_t}`` is Gaussian on the leaves of block ``b_t`` and zero
  elsewhere. The loss is still evaluated on the whole model.

  The active block changes every ``switch_every`` steps, in ``order``:
  ``"random"`` (random reshuffling: a fresh permutation of all blocks per
  epoch of ``L`` switches, derived from the key and the epoch number),
  ``"ascending"`` (0, 1, ..., L-1, 0, ...) or ``"descending"``.

  **Blocks.** ``blocks`` is None, or a pytree with the structure of the
  parameters holding a static Python int per leaf (or a callable returning
  one from the parameters). Ids ``0 .. L-1`` name the blocks, each must own
  at least one leaf, and ``"ascending"`` visits them by id; a negative id
  (use ``-1``) freezes a leaf: it is never perturbed and its update is
  always zero. None means `top_level_blocks`: one block per top-level
  submodule, in natural name order, where the top level is the first level
  with more than one entry: a tree whose leaves all live under one entry is
  split one level further down, repeatedly. So ``{"params": {...}}`` (Flax
  variables) splits at the submodules of ``"params"``, and the arrays of an
  ``equinox.nn.MLP`` (``eqx.partition(mlp, eqx.is_inexact_array)[0]``,
  whose only array field is ``layers``) split at its layers, one block per
  ``Linear``, instead of one block for the whole model (plain MeZO). A
  model with several top-level entries is split there even if one of them
  holds all the layers (e.g. ``embed``, ``blocks``, ``head``): pass
  ``blocks=`` to split it further.
  For layers stacked on a leading axis and run by `jax.lax.scan`, a leaf's
  id may be `StackedBlocks` ``(first)``: its layer ``j`` is block
  ``first + j`` (``top_level_blocks(params, stacked=["layers"])``).

  **What ``inner`` sees.** For block ``b``, ``inner`` is initialised on and
  updated with the *sub-tree* of block ``b``: the parameters with ``None``
  in place of every leaf of other blocks (as `optax.masked` does with its
  placeholders); a stacked leaf appears as its active layer (the slice
  ``leaf[b - first]``). Its state, e.g. Adam moments, therefore covers only
  that block, and all blocks together hold one optimizer state for the
  model.
  Masks inside ``inner`` should be callables (e.g. `zojax.matrix_mask`).
  The loss reaches the estimator unchanged (``value_fn=`` or ``batch=``),
  together with ``param_map=``, which puts the block back into the full
  parameters before the loss is evaluated; zojax estimators honour it.
  Every typed `jax.random` key in block ``b``'s inner state is folded with
  ``b`` at ``init``, so blocks draw independent directions even though they
  share ``inner`` and its seed.

  **Cost under jit.** The step is one `jax.lax.switch` over ``L`` branches;
  branch ``b`` runs ``inner`` on block ``b`` with its static leaf set. The
  active index lives in the state, so switching blocks never recompiles,
  and only the taken branch runs: random numbers, perturbations and the
  inner update touch block ``b_t`` alone. Leaves outside it get zero
  updates, so the remaining per-step cost outside the forwards is one
  elementwise pass over the model (writing zeros, then
  `optax.apply_updates`). The price is compile time: each branch traces the
  inner step, model forward included, so the program holds ``L`` copies of
  it and tracing and compiling take about ``L`` times as long as for the
  inner transform alone (for a 12-block MLP, ~12x a MeZO step's compile).
  Use coarser blocks (group layers with ``blocks=``) if that is too slow.

  **Memory.** With `zojax.zo_grad`'s default ``perturb_at_use=True`` the
  perturbed block is formed where the forward reads it, and in a scanned
  stack only in the iteration of the active layer
  (`zojax.perturb_at_use.patched`): a step holds about one layer beyond
  inference, on unrolled and scanned layers alike. The update of a stacked
  leaf is its layer's update broadcast and kept on the active layer, fused
  by XLA into `optax.apply_updates`.

  **Logging.** The state records the loss of the last step; read it with
  ``optax.tree_utils.tree_get(state, "BlockCoordinateState").loss`` (see
  `BlockCoordinateState`).

  Args:
    inner: the per-block transform, e.g. ``optax.chain(zojax.zo_grad(),
      optax.adam(1e-4))``. It is shared by all blocks (each has its own
      state).
    blocks: None (one block per top-level submodule), a pytree of block ids
      (ints, or `StackedBlocks` for stacked layers) matching the
      parameters, or a callable returning one.
    switch_every: steps between block switches, ``K >= 1``.
    order: ``"random"``, ``"ascending"`` or ``"descending"``.
    key: an integer or a `jax.random` key for the block order (``seed=``, its
      former name, is deprecated).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state
    `BlockCoordinateState`.

  Raises:
    ValueError: at construction for ``switch_every < 1`` or an unknown order;
      at ``init``/``update`` for blocks that do not match the parameters, a
      block with no leaves, no block at all, or a state built for another
      number of blocks.
    TypeError: at construction if ``inner`` is not an optax transform; at
      ``init``/``update`` for a block id that is not a static int.

  Examples:
    >>> import jax.numpy as jnp, optax, zojax
    >>> from zojax.block_coordinates import block_coordinate
    >>> params = {"l0": {"w": jnp.ones((2, 2))}, "l1": {"w": jnp.ones((2, 2))}}
    >>> loss = lambda p: jnp.sum((p["l1"]["w"] @ p["l0"]["w"]) ** 2)
    >>> tx = block_coordinate(optax.chain(zojax.zo_grad(), optax.sgd(1e-2)),
    ...                       switch_every=10)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
  """
  key = _deprecations.renamed("zojax.block_coordinate", "key", key, "seed", seed, 0)
  if not isinstance(inner, optax.GradientTransformation | optax.GradientTransformationExtraArgs):
    raise TypeError(f"inner must be an optax GradientTransformation, got {type(inner).__name__}.")
  switch_every = _check_switch_every(switch_every)
  _check_order(order)
  inner = optax.with_extra_args_support(inner)
  key = keys_lib.stream_key(keys_lib.as_key(key), "block_coordinate")

  def schedule(count, num_blocks):
    return active_block(count, num_blocks, switch_every=switch_every, order=order, key=key)

  def init_fn(params):
    ids, num_blocks = _resolve_blocks(blocks, params)
    leaves, treedef = jax.tree.flatten(params)
    inner_states = tuple(
      _fold_keys(inner.init(_select(leaves, ids, b, treedef)), b) for b in range(num_blocks)
    )
    count = jnp.zeros([], jnp.int32)
    return BlockCoordinateState(
      count=count,
      key=key,
      block=schedule(count, num_blocks),
      loss=jnp.full([], jnp.nan, jnp.float32),
      inner_states=inner_states,
    )

  def update_fn(updates, state, params=None, *, param_map=None, **extra_args):
    if params is None:
      raise ValueError("block_coordinate needs params: call update(updates, state, params, ...).")
    ids, num_blocks = _resolve_blocks(blocks, params)
    if len(state.inner_states) != num_blocks:
      raise ValueError(
        f"The state holds {len(state.inner_states)} inner states but the parameters split "
        f"into {num_blocks} blocks; was it initialised with other parameters?"
      )
    leaves, treedef = jax.tree.flatten(params)
    update_leaves = None if updates is None else treedef.flatten_up_to(updates)
    block = active_block(
      state.count, num_blocks, switch_every=switch_every, order=order, key=state.key
    )

    def make_branch(b):
      def branch(inner_states):
        sub_params = _select(leaves, ids, b, treedef)
        sub_updates = None if updates is None else _select(update_leaves, ids, b, treedef)
        to_full = _Placement(leaves, ids, b, treedef, param_map)
        new_sub, new_state = inner.update(
          sub_updates, inner_states[b], sub_params, param_map=to_full, **extra_args
        )
        new = iter(jax.tree.leaves(new_sub))
        mine = {
          index: next(new)
          for index, (x, spec) in enumerate(zip(leaves, ids))
          if _position(spec, x, b) is not None
        }
        out = []
        for slot in slots:
          index = slot_of_leaf_in_block[b].get(slot)
          if index is None:
            out.append(jnp.zeros(slot[0], slot[1]))
          else:
            out.append(jnp.asarray(mine[index], slot[1]))
        states = inner_states[:b] + (new_state,) + inner_states[b + 1 :]
        return out, states, _inner_loss(new_state)

      return branch

    # The switch returns one block's worth of updates, in "slots" keyed by
    # (shape, dtype, occurrence): every leaf's update is then selected from its
    # slot outside the switch (zero unless its block is active), an
    # elementwise expression XLA fuses into the update of the parameters.
    # Returning the whole update tree from the switch would make XLA hold a
    # parameter-sized buffer for it (a conditional's outputs are buffers).
    slot_of_leaf_in_block = [dict() for _ in range(num_blocks)]
    leaf_slot: list = [None] * len(leaves)
    for b in range(num_blocks):
      seen: dict = {}
      for index, (x, spec) in enumerate(zip(leaves, ids)):
        where = _position(spec, x, b)
        if where is None:
          continue
        if where < 0:
          kind = (tuple(jnp.shape(x)), jnp.result_type(x))
          slot = (*kind, seen.get(kind, 0))
          seen[kind] = slot[2] + 1
        else:  # a stacked leaf: one slot (a layer) of its own, whichever layer is active
          slot = (tuple(jnp.shape(x)[1:]), jnp.result_type(x), ("stacked", index))
        slot_of_leaf_in_block[b][slot] = index
        leaf_slot[index] = slot
    slots = sorted({s for d in slot_of_leaf_in_block for s in d}, key=repr)
    branches = [make_branch(b) for b in range(num_blocks)]
    slot_values, inner_states, loss = jax.lax.switch(block, branches, state.inner_states)
    by_slot = dict(zip(slots, slot_values))
    new_updates = jax.tree.unflatten(
      treedef,
      [
        _leaf_update(x, spec, block, by_slot.get(leaf_slot[index]))
        for index, (x, spec) in enumerate(zip(leaves, ids))
      ],
    )
    new_state = BlockCoordinateState(
      count=optax.safe_increment(state.count),
      key=state.key,
      block=block,
      loss=loss,
      inner_states=inner_states,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(
    init_fn, eager.jit_when_concrete(update_fn, "block_coordinate")
  )
