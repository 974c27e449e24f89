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
  """Matrix views of the ViT's kernels for Muon-style orthogonalization.

  Attention kernels are stored per head: query/key/value ``(D, heads,
  head_dim)`` are viewed as ``D x (heads * head_dim)`` and the output
  projection ``(heads, head_dim, D)`` as ``(heads * head_dim) x D``, the
  matrices a PyTorch ViT holds; other kernels follow zojax's default rule.
  """

  def view(path, x):
    names = [str(getattr(entry, "key", entry)) for entry in path]
    if x.ndim == 3 and names[-1] == "kernel" and len(names) >= 2:
      if names[-2] in ("query", "key", "value"):
        return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
      if names[-2] == "out":
        return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    return zojax.orthogonalizers.default_dimension_numbers(x)

  return jax.tree_util.tree_map_with_path(view, params)


def vit_blocks(params) -> Any:
  """MeZO-BCD blocks of a ViT: one per encoder block, plus one for the rest.

  The embedding, class token, position embedding, final norm and head form
  block 0; ``encoderblock_i`` is block ``i + 1``.
  """

  def block(path, _):
    for entry in path:
      match = re.fullmatch(r"encoderblock_(\d+)", str(getattr(entry, "key", entry)))
      if match:
        return int(match.group(1)) + 1
    return 0

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
    k: ZO-MOPI's partial-orthogonalization rank (the preset's default: 32,
      capped at ``rank``; the released recipe uses ``rank / 2``).
    anchored: ZO-MOPI's refresh, momentum-anchored (True, the preset's
      default) or a random basis (False, the released code).
    vector_learning_rate: learning rate of 1-D parameters for ZO-Muon and
      ZO-MOPI (default: ``learning_rate / 100``).
    seed: seed of the optimizer's key.
    dimension_numbers: matrix views for subspace methods and Muon.

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
    preset = zojax.zo_muon if name == "zo_muon" else zojax.zo_mopi
    mopi = given(k=k, anchored=anchored) if name == "zo_mopi" else {}
    tx = preset(
      learning_rate,
      eps=eps,
      vector_learning_rate=vector_learning_rate,
      weight_dimension_numbers=dimension_numbers,
      key=seed,
      **given(num_queries=num_queries, rank=rank, refresh_every=refresh_every),
      **mopi,
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
