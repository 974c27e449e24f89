"""The optimizers the ViT example offers: every zojax preset and two backprop baselines.

`make` turns a name from `NAMES` and the command-line settings into an
`Optimizer`: the optax transformation, how many forward passes a step costs
(what ``--forward-budget`` counts), and whether it needs gradients.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers

import zojax

ZEROTH_ORDER = ("mezo", "mezo_bcd", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero")
FIRST_ORDER = ("fo-adam", "fo-muon")
NAMES = ZEROTH_ORDER + FIRST_ORDER


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


def vit_dimension_numbers(params) -> Any:
  """The matrix view of every ViT leaf: the one the PyTorch references see.

  ZO-Muon and ZO-MOPI (and their ViT code, ALGORITHMS.md 1.3 and 3.2) treat a
  parameter by its PyTorch shape: ``ndim >= 2`` is a matrix, flattened to
  ``(dim0, rest)`` with ``dim0`` the output side (their projection ``P`` is
  ``dim0 x r``, ``r`` clamped to ``dim0``); ``ndim < 2`` is a vector, updated
  by ZO-SGD at the 1-D learning rate. Flax stores some leaves with other
  shapes, so each leaf is mapped by what it is:

  * every ``bias`` and LayerNorm ``scale`` -> None (a vector). PyTorch stores
    them 1-D; flax's attention keeps the query/key/value biases 2-D as
    ``(heads, head_dim)``, which the default rule would take for a matrix and
    give a subspace and an orthogonalization;
  * query/key/value kernels ``(D, heads, head_dim)`` -> ``D x (heads *
    head_dim)`` and the ``out`` kernel ``(heads, head_dim, D)`` ->
    ``(heads * head_dim) x D``: the ``(in, out)`` views of PyTorch's
    ``(D, D)`` projections;
  * the patch-embedding conv ``(p, p, C, D)`` -> ``(p * p * C) x D``, Dense
    kernels (MLP, ``pre_logits``, ``head``) ``(in, out)`` as they are: the
    ``(out, in)`` PyTorch weights, with ``out`` the output axis;
  * the class token ``(1, 1, D)`` and the position embedding ``(1, 1 + N,
    D)`` (PyTorch: the same shapes) -> one row, output axis 0 (size 1),
    reduction axes the rest. The references flatten them to ``1 x D`` and
    ``1 x (1 + N) D`` matrices with ``dim0 = 1``, so their rank is clamped to
    1: the perturbation covers the whole leaf and the update is the
    estimate normalized to unit Frobenius norm at the matrix learning rate.
    The default rule would instead put a rank-``r`` basis on the ``D`` axis.

  Args:
    params: the ViT's parameters (only names and shapes are read).

  Returns:
    A pytree of `optax.contrib.MuonDimensionNumbers` / None with the
    structure of ``params``.
  """

  def view(path, x):
    names = [str(getattr(entry, "key", entry)) for entry in path]
    leaf = names[-1]
    parent = names[-2] if len(names) >= 2 else None
    if leaf in ("bias", "scale") or x.ndim < 2:
      return None
    if leaf in ("cls", "pos_embedding"):
      return MuonDimensionNumbers(reduction_axis=tuple(range(1, x.ndim)), output_axis=0)
    if leaf == "kernel" and x.ndim == 3 and parent in ("query", "key", "value"):
      return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    if leaf == "kernel" and x.ndim == 3 and parent == "out":
      return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    return zojax.orthogonalizers.default_dimension_numbers(x)

  return jax.tree_util.tree_map_with_path(view, params)


# Leaves MeZO-BCD never trains: the embeddings (the reference's include_embedding=False).
EMBEDDINGS = ("embedding", "cls", "posembed_input")


def _layer(path) -> int | None:
  """The ``i`` of the ``encoderblock_i`` a leaf lives under, or None."""
  for entry in path:
    match = re.fullmatch(r"encoderblock_(\d+)", str(getattr(entry, "key", entry)))
    if match:
      return int(match.group(1))
  return None


def vit_blocks(params) -> Any:
  """MeZO-BCD's blocks for the ViT, as its reference code makes them for a transformer.

  The reference (siihwanpark/zo-block, ALGORITHMS.md 5.2) makes one block per
  transformer layer; embeddings join the cycle only with
  ``include_embedding`` and the LM head "plus all other parameters" only
  with ``include_lm_head`` (both False by default: never trained). Here:

  * ``encoderblock_i`` is block ``i``, one per layer;
  * the patch embedding, class token and position embedding get ``-1``
    (frozen, ``include_embedding=False``);
  * the head with every other leaf (``encoder_norm``, ``pre_logits`` if
    any) is block ``L`` (``include_lm_head=True``).

  The head is in the cycle because this example's tasks replace it by a
  new zero-initialised head, which must be trained (a frozen zero head gives
  zero logits and chance accuracy). As its own block it is trained the way
  the reference trains a head when asked to, one block among ``L + 1``, with
  no library mechanism the reference lacks. While the head is still zero the
  loss does not depend on the encoder, so the layer blocks' finite
  differences are exactly zero until the head has had a turn.

  Args:
    params: the ViT's parameters.

  Returns:
    A pytree of int block ids with the structure of ``params``.
  """
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  head_block = len({_layer(path) for path in paths} - {None})

  def block(path, _):
    layer = _layer(path)
    if layer is not None:
      return layer
    if any(str(getattr(entry, "key", entry)) in EMBEDDINGS for entry in path):
      return -1
    return head_block

  return jax.tree_util.tree_map_with_path(block, params)


def make(
  name: str,
  learning_rate: float,
  *,
  eps: float = 1e-3,
  num_queries: int | None = None,
  rank: int | None = None,
  refresh_every: int | None = None,
  k: int | None = None,
  anchored: bool | None = None,
  vector_learning_rate: float | None = None,
  seed: int = 0,
  dimension_numbers: Callable | Any = vit_dimension_numbers,
) -> Optimizer:
  """Builds optimizer ``name`` with the given settings (None: the preset's default).

  Args:
    name: one of `NAMES`.
    learning_rate: the learning rate (of the matrix parameters, for ZO-Muon
      and ZO-MOPI).
    eps: ZO perturbation scale.
    num_queries: directions per step (presets with queries).
    rank: subspace rank (ZO-Muon, ZO-MOPI, LOZO, SubZero).
    refresh_every: steps between subspace refreshes (or block switches for
      MeZO-BCD).
    anchored: ZO-MOPI's refresh, momentum-anchored (True, the preset's
      default) or a random basis (False, the released code).
    vector_learning_rate: learning rate of 1-D parameters for ZO-Muon and
      ZO-MOPI (default: ``learning_rate / 100``).
    seed: seed of the optimizer's key.
    dimension_numbers: matrix views for subspace methods and Muon.
    k: ZO-MOPI's partial-orthogonalization rank; None: ``rank // 2`` when
      ``rank`` is given (the released recipe's 32 of 64, so that ``k <
      rank`` and both of its rank-``k`` mechanisms act), else the preset's.

  Returns:
    An `Optimizer`.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in NAMES:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(NAMES)}.")
  given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
  if vector_learning_rate is None:
    vector_learning_rate = learning_rate / 100
  if name == "fo-adam":
    return Optimizer(name, optax.adam(learning_rate), 1, False)
  if name == "fo-muon":
    tx = optax.contrib.muon(
      learning_rate,
      adam_learning_rate=vector_learning_rate,
      muon_weight_dimension_numbers=dimension_numbers,
    )
    return Optimizer(name, tx, 1, False)
  if name == "mezo":
    q = num_queries or 1
    return Optimizer(name, zojax.mezo(learning_rate, eps=eps, num_queries=q, key=seed), 2 * q, True)
  if name == "mezo_bcd":
    q = num_queries or 1
    tx = zojax.mezo_bcd(
      learning_rate,
      eps=eps,
      blocks=vit_blocks,
      num_queries=q,
      key=seed,
      **given(switch_every=refresh_every),
    )
    return Optimizer(name, tx, 2 * q, True)
  if name in ("zo_muon", "zo_mopi"):
    extra = {}
    if name == "zo_mopi":
      extra = given(k=k if k is not None or rank is None else max(1, rank // 2), anchored=anchored)
    preset = zojax.zo_muon if name == "zo_muon" else zojax.zo_mopi
    tx = preset(
      learning_rate,
      eps=eps,
      vector_learning_rate=vector_learning_rate,
      weight_dimension_numbers=dimension_numbers,
      key=seed,
      **given(num_queries=num_queries, rank=rank, refresh_every=refresh_every),
      **extra,
    )
    q = num_queries or zojax.presets.DEFAULTS[name]["num_queries"]
    return Optimizer(name, tx, zojax.forwards_per_step(q, "one_sided"), True)
  preset = {"lozo": zojax.lozo, "lozo_m": zojax.lozo_m, "subzero": zojax.subzero}[name]
  tx = preset(
    learning_rate,
    eps=eps,
    weight_dimension_numbers=dimension_numbers,
    key=seed,
    **given(rank=rank, refresh_every=refresh_every),
  )
  return Optimizer(name, tx, 2, True)
