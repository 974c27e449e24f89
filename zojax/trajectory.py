"""Trajectory logs: a whole ZO run as its seed plus a few scalars per step.

A zojax step is a deterministic function of the parameters, the optimizer
state (which holds the key) and the finite-difference scalars ``c_i`` of the
step: the directions are regenerated from ``fold_in(key, t)``. Recording the
``c_i`` of every step (``num_queries`` float32 values) is therefore enough to
rebuild the run from its initial parameters and seed, without data and
without a single forward pass (MeZO, arXiv 2305.17333, section 2 and
appendix: "a trajectory is a seed and one projected gradient per step").

Typical use::

  @jax.jit
  def train_step(params, state, batch):
    updates, state = tx.update(None, state, params, value_fn=lambda p: loss(p, batch))
    return optax.apply_updates(params, updates), state, zojax.trajectory.record(state)

  rows = []
  for batch in data:
    params, state, c = train_step(params, state, batch)
    rows.append(c)
  log = zojax.trajectory.TrajectoryLog(0, np.stack(rows))
  zojax.trajectory.save("run.npz", log)

  # Later: the same parameters (bit for bit when both programs compile alike).
  params_again, _ = zojax.trajectory.replay(tx, params0, tx.init(params0), log)

A log stores ``4 * num_queries`` bytes per step: 400 KB for 100k MeZO
steps. Replay works for every transform built on `zojax.zo_grad`,
including subspace refreshes, orthogonalization and block switches, since
those depend only on the key, the step count and earlier updates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax.block_coordinates import BlockCoordinateState
from zojax.estimators import ZOGradState
from zojax.subspaces import SubspaceState

__all__ = ["TrajectoryLog", "record", "concatenate", "save", "load", "replay"]


class TrajectoryLog(NamedTuple):
  """The recorded scalars of consecutive steps.

  Attributes:
    start_step: the step count of the optimizer state before the first
      recorded step (0 for a run from ``tx.init``).
    projected_grads: float32 array of shape ``(steps, num_queries)``; row
      ``j`` holds the ``c_i`` of step ``start_step + j``.
  """

  start_step: int
  projected_grads: np.ndarray


def _is_node(x) -> bool:
  return isinstance(x, (ZOGradState, BlockCoordinateState))


def _records(state) -> list[jax.Array]:
  """The ``c`` of the last step of every estimator in ``state`` (one per estimator)."""
  found = []
  for node in jax.tree.leaves(state, is_leaf=_is_node):
    if isinstance(node, ZOGradState):
      found.append(node.projected_grads)
    elif isinstance(node, BlockCoordinateState):
      per_block = [_records(s) for s in node.inner_states]
      if any(len(r) != 1 for r in per_block) or len({r[0].shape for r in per_block}) != 1:
        raise ValueError(
          "Every block of a block_coordinate state must hold exactly one zo_grad estimator "
          "with the same number of queries to be recorded."
        )
      # Only the active block's estimator ran in the last step.
      found.append(jnp.stack([r[0] for r in per_block])[node.block])
  return found


def record(opt_state) -> jax.Array:
  """The scalars ``c_i`` of the step that produced ``opt_state``.

  Call it on the state returned by ``tx.update`` (inside `jit` is fine) and
  keep the results, one row per step.

  Args:
    opt_state: the state of a transform containing exactly one `zojax.zo_grad`
      (directly, inside `zojax.subspace`, or one per block inside
      `zojax.block_coordinate`, of which the active block's is taken).

  Returns:
    A float32 array of shape ``(num_queries,)``.

  Raises:
    ValueError: if the state holds no estimator or several independent ones.
  """
  found = _records(opt_state)
  if len(found) != 1:
    raise ValueError(
      f"record needs an optimizer state with exactly one zo_grad estimator; found {len(found)}."
    )
  return found[0]


def concatenate(logs: Sequence[TrajectoryLog]) -> TrajectoryLog:
  """Joins logs of consecutive stretches of one run (e.g. before and after a resume).

  Raises:
    ValueError: if the logs are not consecutive or differ in ``num_queries``.
  """
  if not logs:
    raise ValueError("concatenate needs at least one log.")
  expected = logs[0].start_step
  for log in logs:
    if log.start_step != expected:
      raise ValueError(
        f"Logs are not consecutive: one starts at step {log.start_step}, expected {expected}."
      )
    expected += len(log.projected_grads)
  widths = {np.shape(log.projected_grads)[1] for log in logs}
  if len(widths) != 1:
    raise ValueError(f"Logs record different numbers of queries: {sorted(widths)}.")
  rows = np.concatenate([np.asarray(log.projected_grads, np.float32) for log in logs])
  return TrajectoryLog(int(logs[0].start_step), rows)


def save(path: str | os.PathLike, log: TrajectoryLog) -> None:
  """Writes ``log`` to an uncompressed ``.npz`` file (the scalars are float32 noise)."""
  np.savez(
    path,
    start_step=np.int64(log.start_step),
    projected_grads=np.asarray(log.projected_grads, np.float32),
  )


def load(path: str | os.PathLike) -> TrajectoryLog:
  """Reads a log written by `save`."""
  with np.load(path) as data:
    return TrajectoryLog(int(data["start_step"]), np.asarray(data["projected_grads"]))


def _step_count(state) -> Any:
  """The step counter of the outermost zojax state (steps taken so far)."""
  for node in jax.tree.leaves(
    state, is_leaf=lambda x: isinstance(x, (ZOGradState, BlockCoordinateState, SubspaceState))
  ):
    if isinstance(node, (ZOGradState, BlockCoordinateState, SubspaceState)):
      return node.count
  return None


def replay(tx: optax.GradientTransformation, params, opt_state, log: TrajectoryLog):
  """Re-runs the logged steps from ``(params, opt_state)`` without any loss.

  Each step calls ``tx.update(None, state, params, projected_grads=c_t)``
  and applies the updates, inside one jitted `lax.scan`. Started from the
  run's initial parameters and ``tx.init`` of the same optimizer (same seed),
  it reproduces the run's parameters and optimizer state (except the
  recorded ``loss`` fields, which become NaN).

  Args:
    tx: the optimizer the run used, built with the same arguments and seed.
    params: the parameters before step ``log.start_step``.
    opt_state: the optimizer state before that step.
    log: the recorded scalars.

  Returns:
    ``(params, opt_state)`` after the last logged step.

  Raises:
    ValueError: if the log does not start at the state's step count or has
      the wrong number of queries for ``tx``.
  """
  rows = jnp.asarray(log.projected_grads, jnp.float32)
  if rows.ndim != 2:
    raise ValueError(f"log.projected_grads must be (steps, num_queries), got {rows.shape}.")
  count = _step_count(opt_state)
  if count is not None and not isinstance(count, jax.core.Tracer):
    if int(count) != log.start_step:
      raise ValueError(
        f"The log starts at step {log.start_step} but the optimizer state has taken "
        f"{int(count)} steps; replay from the state the log starts from."
      )
  width = record(opt_state).shape
  if width != rows.shape[1:]:
    raise ValueError(
      f"The log records {rows.shape[1]} scalars per step but the optimizer takes {width[0]}."
    )
  return _replay_scan(tx, params, opt_state, rows)


def _replay_scan(tx, params, opt_state, rows):
  @jax.jit
  def run(params, opt_state, rows):
    def body(carry, c):
      p, s = carry
      updates, s = tx.update(None, s, p, projected_grads=c)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(body, (params, opt_state), rows)[0]

  return run(params, opt_state, rows)
