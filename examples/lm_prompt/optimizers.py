"""The optimizers the language-model example offers: every zojax preset and backprop with Adam.

`make` turns a name from `NAMES` and the command-line settings into an
`Optimizer`: the optax transformation, how many forward passes a step costs
(what ``--forward-budget`` counts) and whether it needs gradients. Low-precision
weights get a float32 master copy (`zojax.master_weights`) or stochastic
rounding (`zojax.stochastic_rounding`) around the optimizer.

The decoder's parameters (examples/lm_prompt/model.py) are plain nested dicts
whose linear kernels are flax-style ``(in, out)`` matrices. The per-matrix
methods (ZO-Muon, ZO-MOPI, LOZO, LOZO-M, SubZero) get their matrix view from
`examples.lm_prompt.model.matrix_dimension_numbers`: one matrix per layer in
either layout (the layer axis of stacked kernels is a batch axis), the token
and position tables with the vocabulary as their output axis (as the released
PyTorch code treats a ``(V, D)`` embedding), biases and norms not matrices.
MeZO-BCD's blocks are the decoder layers (`layer_blocks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

import zojax
from examples.lm_prompt import model as model_lib

ZEROTH_ORDER = ("mezo", "mezo_bcd", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero")
FIRST_ORDER = ("fo-adam",)
NAMES = ZEROTH_ORDER + FIRST_ORDER
BF16_UPDATES = ("master", "stochastic")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optimizer as the training loop uses it.

  Attributes:
    name: one of `NAMES`.
    tx: the optax transformation (``GradientTransformationExtraArgs`` taking
      ``value_fn=`` for the zeroth-order ones).
    forwards_per_step: forward passes one step costs (a backprop step counts
      its one forward pass; its backward pass is not a forward).
    zeroth_order: whether the step uses forward passes only.
  """

  name: str
  tx: optax.GradientTransformation
  forwards_per_step: int
  zeroth_order: bool


def layer_blocks(params) -> Any:
  """MeZO-BCD's blocks for the decoder: one block per layer, nothing else trained.

  Decoder layer ``i`` is block ``i``; the token and position tables, the
  final norm, OPT's ``project_in``/``project_out`` and an untied ``lm_head``
  get id ``-1`` and stay frozen, as in the reference code of MeZO-BCD (arXiv
  2501.19099, siihwanpark/zo-block: ``include_embedding`` and
  ``include_lm_head`` both default to False). This is
  `zojax.top_level_blocks` with everything but ``"layers"`` excluded; in the
  scanned layout (``params["layers"]`` stacked leaves) each layer is a slice
  of every leaf (`zojax.StackedBlocks`), and a step perturbs and updates
  only that slice, inside the scan body.

  Args:
    params: decoder parameters in either layout.

  Returns:
    A pytree with the structure of ``params``: Python ints in the unrolled
    layout, `zojax.StackedBlocks` for the stacked layers.
  """
  layers = params["layers"]
  frozen = {k: jax.tree.map(lambda _: -1, v) for k, v in params.items() if k != "layers"}
  if not isinstance(layers, list | tuple):
    return {**frozen, "layers": jax.tree.map(lambda _: zojax.StackedBlocks(0), layers)}
  ids = [jax.tree.map(lambda _, i=i: i, layer) for i, layer in enumerate(layers)]
  return {**frozen, "layers": type(layers)(ids)}


def _base(
  name: str,
  learning_rate: float,
  *,
  eps: float,
  num_queries: int | None,
  rank: int | None,
  refresh_every: int | None,
  vector_learning_rate: float | None,
  seed: int,
) -> tuple[optax.GradientTransformation, int]:
  """The transformation of ``name`` before any low-precision wrapper, and its forwards per step."""
  given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
  if name == "fo-adam":
    return optax.adam(learning_rate), 1
  if name == "mezo":
    q = num_queries or 1
    return zojax.mezo(learning_rate, eps=eps, num_queries=q, key=seed), 2 * q
  if name == "mezo_bcd":
    q = num_queries or 1
    tx = zojax.mezo_bcd(
      learning_rate,
      eps=eps,
      blocks=layer_blocks,
      num_queries=q,
      key=seed,
      **given(switch_every=refresh_every),
    )
    return tx, 2 * q
  dims = model_lib.matrix_dimension_numbers
  if vector_learning_rate is None:
    vector_learning_rate = learning_rate / 100
  if name in ("zo_muon", "zo_mopi"):
    preset = zojax.zo_muon if name == "zo_muon" else zojax.zo_mopi
    # ZO-MOPI at a chosen rank keeps the released recipe's k = r / 2: its
    # default k (32) would reach a small rank, where the power iteration is a
    # full orthogonalization and the anchored refresh keeps the whole basis.
    extra = given(k=max(1, rank // 2) if name == "zo_mopi" and rank is not None else None)
    tx = preset(
      learning_rate,
      eps=eps,
      vector_learning_rate=vector_learning_rate,
      weight_dimension_numbers=dims,
      key=seed,
      **given(num_queries=num_queries, rank=rank, refresh_every=refresh_every),
      **extra,
    )
    q = num_queries or zojax.presets.DEFAULTS[name]["num_queries"]
    return tx, zojax.forwards_per_step(q, "one_sided")
  preset = {"lozo": zojax.lozo, "lozo_m": zojax.lozo_m, "subzero": zojax.subzero}[name]
  tx = preset(
    learning_rate,
    eps=eps,
    weight_dimension_numbers=dims,
    key=seed,
    **given(rank=rank, refresh_every=refresh_every),
  )
  return tx, 2


def make(
  name: str,
  learning_rate: float,
  *,
  eps: float = 1e-3,
  num_queries: int | None = None,
  rank: int | None = None,
  refresh_every: int | None = None,
  vector_learning_rate: float | None = None,
  seed: int = 0,
  low_precision: str | None = None,
) -> Optimizer:
  """Builds optimizer ``name`` with the given settings (None: the preset's default).

  Args:
    name: one of `NAMES`.
    learning_rate: the learning rate (of the matrix parameters, for ZO-Muon
      and ZO-MOPI).
    eps: ZO perturbation scale.
    num_queries: directions per step (MeZO, MeZO-BCD, ZO-Muon, ZO-MOPI).
    rank: subspace rank (ZO-Muon, ZO-MOPI, LOZO, LOZO-M, SubZero); ZO-MOPI then uses
      k = rank // 2, its released recipe (at the default rank, its default k).
    refresh_every: steps between subspace refreshes (block switches for
      MeZO-BCD).
    vector_learning_rate: learning rate of 1-D parameters for ZO-Muon and
      ZO-MOPI (default: ``learning_rate / 100``).
    seed: seed of the optimizer's key.
    low_precision: None for float32 parameters; ``"master"`` wraps the
      optimizer in `zojax.master_weights` (a float32 copy in the state),
      ``"stochastic"`` appends `zojax.stochastic_rounding` (keyed, unbiased
      rounding of each update to the parameters' dtype).

  Returns:
    An `Optimizer`.

  Raises:
    ValueError: an unknown name or ``low_precision`` (the message lists the
      valid ones).
  """
  if name not in NAMES:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(NAMES)}.")
  if low_precision not in (None, *BF16_UPDATES):
    raise ValueError(f"low_precision must be None or one of {BF16_UPDATES}, got {low_precision!r}")
  tx, forwards = _base(
    name,
    learning_rate,
    eps=eps,
    num_queries=num_queries,
    rank=rank,
    refresh_every=refresh_every,
    vector_learning_rate=vector_learning_rate,
    seed=seed,
  )
  if low_precision == "master":
    tx = zojax.master_weights(tx)
  elif low_precision == "stochastic":
    tx = optax.with_extra_args_support(optax.chain(tx, zojax.stochastic_rounding(key=seed)))
  return Optimizer(name, tx, forwards, name in ZEROTH_ORDER)
