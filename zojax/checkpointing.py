"""Checkpoint and resume a zojax run with `orbax.checkpoint.CheckpointManager`.

A zojax optimizer state holds everything a run needs to continue exactly:
the typed `jax.random` keys (never advanced, see `zojax.keys`), the int32
step counters that index the key stream, subspace bases, block orders and
the inner optimizer's buffers. `save` writes the parameters and that state
as they are; `restore` reads them back into templates (for instance
``tx.init(params)`` of a freshly built optimizer), so that a resumed run
takes bit-identical steps to an uninterrupted one.

What the state cannot show is checked too. Each checkpoint carries JSON
metadata: a structural `signature` of the parameters and of the optimizer
state (key path, NamedTuple types along it, shape and dtype of every leaf),
and an optional user ``config`` of hyperparameters (learning rate, eps,
...). `restore` compares both with the templates and the given ``config``
before it reads any array, and raises `CheckpointMismatchError` naming the
first differing paths: a MeZO checkpoint never loads silently into a
ZO-Muon state, nor a rank-8 state into a rank-4 one.

On disk a step holds three items of an ``args.Composite``: ``"params"`` and
``"opt_state"`` (``StandardSave``) and ``"zojax"`` (``JsonSave``).

Integrity. orbax reads back whatever bytes are on disk: a few flipped bytes
in an array data file restore as garbage (values near 3e38) without a word.
`save` therefore records two SHA-256 digests in the metadata: one over every
saved array (key path, dtype, shape and bytes of each leaf of the parameters
and of the state, typed keys by their key data) and one over the metadata
itself (signatures, config, extras and the array digest). `metadata` checks
the second, `restore` the first after reading the arrays; a damaged,
truncated or incomplete step raises `CheckpointCorruptedError` naming the
step and the directory, never returns garbage. `restore_latest_intact` falls
back from a damaged latest step to the newest intact one, for resuming.
In a multi-process run, an array replicated on every process (the
parameters and state of zojax's data parallelism) is hashed from this
process's copy, which is the whole value; an array split between processes
is not hashed, and a checkpoint holding one is restored unverified.
Checkpoints of the
previous format (``zojax.checkpointing/1``, without digests) still restore,
unverified.

Typed keys. orbax-checkpoint 0.12.8 saves typed key arrays (``key<fry>``,
``key<rbg>``, ...) itself: it writes their raw key data and records the key
implementation in the array metadata, and restores a typed key wherever the
template has one. No conversion is done here; the signature records the key
dtype, so a checkpoint with threefry keys is refused for a template with rbg
keys instead of being reinterpreted.

Import. ``import zojax`` does not import this module, so orbax stays an
optional dependency (the ``dev`` and ``examples`` extras); use
``import zojax.checkpointing`` or ``from zojax import checkpointing``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

try:
  import orbax.checkpoint as ocp
except ImportError as e:  # pragma: no cover - exercised only without orbax
  raise ImportError(
    "zojax.checkpointing needs orbax-checkpoint: pip install 'orbax-checkpoint>=0.12.8'."
  ) from e

__all__ = [
  "CheckpointCorruptedError",
  "CheckpointMismatchError",
  "Restored",
  "metadata",
  "restore",
  "restore_latest_intact",
  "save",
  "signature",
]

FORMAT = "zojax.checkpointing/2"
_UNVERIFIED_FORMAT = "zojax.checkpointing/1"  # written before the digests; read unverified
_METADATA_ITEM = "zojax"
_METADATA_DIGEST = "metadata_sha256"
_ARRAYS_DIGEST = "arrays_sha256"
_REQUIRED = ("params", "opt_state", "config", _ARRAYS_DIGEST)
_MAX_REPORTED = 5


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the templates or config given to `restore`."""


class CheckpointCorruptedError(ValueError):
  """A checkpoint step is damaged or incomplete.

  Its metadata or array files cannot be read, or what was read differs from
  the SHA-256 digests `save` recorded. The message names the step and the
  checkpoint directory; ``step`` and ``directory`` hold them.
  """

  def __init__(self, message: str, *, step: int | None = None, directory: str | None = None):
    super().__init__(message)
    self.step = step
    self.directory = directory


# ----------------------------------------------------------------------------- signature


def _children(node) -> list:
  """``(key_path_entry, child)`` pairs of one level of a pytree node."""
  pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  return [(path[0], child) for path, child in pairs if path]


def _is_leaf(node) -> bool:
  treedef = jax.tree.structure(node)
  return treedef.num_nodes == 1 and treedef.num_leaves == 1


def signature(tree) -> list[dict[str, Any]]:
  """Structural signature of a pytree: one JSON-able entry per leaf or empty node.

  Each entry has the ``path`` of the node (`jax.tree_util.keystr`), the
  ``types`` of the containers from the root down to it (NamedTuple names
  such as ``"SubspaceState"``), and either ``shape`` and ``dtype`` (a leaf:
  array, `jax.ShapeDtypeStruct` or scalar) or ``empty``, the type name of a
  node without leaves (``"EmptyState"``, ``"NoneType"``, ``"tuple"``), so
  that states differing only in their empty parts differ too.

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    A list of dicts, in `jax.tree.leaves` order.

  Examples:
    >>> import jax.numpy as jnp, zojax
    >>> from zojax.checkpointing import signature
    >>> state = zojax.mezo(1e-3, num_queries=2).init({"w": jnp.zeros((3, 2))})
    >>> entry = signature(state)[3]
    >>> entry["path"], entry["types"], entry["shape"], entry["dtype"]
    ('[0].projected_grads', ['tuple', 'ZOGradState'], [2], 'float32')
    >>> signature(state)[-1]["path"], signature(state)[-1]["empty"]
    ('[2]', 'EmptyState')
  """
  entries = []

  def walk(node, path, types):
    if _is_leaf(node):
      shape = getattr(node, "shape", None)
      dtype = getattr(node, "dtype", None)
      entries.append(
        {
          "path": path,
          "types": types,
          "shape": list(np.shape(node) if shape is None else shape),
          "dtype": str(np.result_type(node) if dtype is None else dtype),
        }
      )
      return
    children = _children(node)
    if not children:
      entries.append({"path": path, "types": types, "empty": type(node).__name__})
    for entry, child in children:
      walk(child, path + jax.tree_util.keystr((entry,)), [*types, type(node).__name__])

  walk(tree, "", [])
  return entries


def _describe(entry: Mapping[str, Any]) -> str:
  if "empty" in entry:
    return "None" if entry["empty"] == "NoneType" else f"an empty {entry['empty']}"
  return f"an array of shape {tuple(entry['shape'])} and dtype {entry['dtype']}"


def _entry_difference(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
  if saved["types"] != expected["types"]:
    return (
      f"saved inside {' > '.join(saved['types'])}, expected inside {' > '.join(expected['types'])}"
    )
  if ("empty" in saved) != ("empty" in expected) or saved.get("empty") != expected.get("empty"):
    return f"saved {_describe(saved)}, expected {_describe(expected)}"
  if "empty" in saved:
    return None
  if saved["shape"] != expected["shape"]:
    return f"saved shape {tuple(saved['shape'])}, expected {tuple(expected['shape'])}"
  if saved["dtype"] != expected["dtype"]:
    return f"saved dtype {saved['dtype']}, expected {expected['dtype']}"
  return None


def _signature_differences(saved: list, expected: list) -> list[str]:
  """Human-readable differences, in the template's leaf order."""
  saved_at = {e["path"]: e for e in saved}
  expected_at = {e["path"]: e for e in expected}
  out = []
  for entry in expected:
    where = entry["path"] or "<root>"
    if entry["path"] not in saved_at:
      out.append(f"at {where}: not in the checkpoint (expected {_describe(entry)})")
    elif diff := _entry_difference(saved_at[entry["path"]], entry):
      out.append(f"at {where}: {diff}")
  for entry in saved:
    if entry["path"] not in expected_at:
      out.append(f"at {entry['path'] or '<root>'}: only in the checkpoint ({_describe(entry)})")
  return out


def _config_differences(saved: Any, expected: Any, path: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(expected, dict):
    out = []
    for key in [*expected, *(k for k in saved if k not in expected)]:
      where = f"{path}[{key!r}]"
      if key not in saved:
        out.append(f"at {where}: not in the checkpoint (expected {expected[key]!r})")
      elif key not in expected:
        out.append(f"at {where}: only in the checkpoint (saved {saved[key]!r})")
      else:
        out.extend(_config_differences(saved[key], expected[key], where))
    return out
  if saved != expected:
    return [f"at {path or '<root>'}: saved {saved!r}, expected {expected!r}"]
  return []


def _mismatch(what: str, differences: list[str], where: str, hint: str) -> CheckpointMismatchError:
  shown = differences[:_MAX_REPORTED]
  if len(differences) > len(shown):
    shown.append(f"... and {len(differences) - len(shown)} more")
  lines = "\n  ".join(shown)
  return CheckpointMismatchError(f"{what} differs from the checkpoint {where}:\n  {lines}\n{hint}")


# ----------------------------------------------------------------------------- digests


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _local_value(leaf):
  """The whole value of ``leaf`` as this process holds it, or None if it holds only a part.

  A `jax.Array` on devices of several processes is whole here when it is
  replicated: any local shard is the full array.
  """
  if getattr(leaf, "is_fully_addressable", True):
    return leaf
  if leaf.is_fully_replicated:
    return leaf.addressable_shards[0].data
  return None


def _arrays_digest(trees: Mapping[str, Any]) -> str | None:
  """SHA-256 over the key path, dtype, shape and bytes of every leaf, in leaf order.

  Typed keys contribute their key data (and their ``key<impl>`` dtype).
  Leaves are copied to the host one at a time. Returns None if a leaf's
  bytes are not all on this process (an array split between processes).
  """
  digest = hashlib.sha256()
  for name, tree in trees.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      dtype = str(leaf.dtype) if _is_typed_key(leaf) else None
      data = _local_value(jax.random.key_data(leaf) if dtype else leaf)
      if data is None:
        return None
      data = np.ascontiguousarray(jax.device_get(data))
      dtype = dtype or str(data.dtype)
      header = json.dumps([name + jax.tree_util.keystr(path), dtype, list(data.shape)])
      digest.update(header.encode())
      digest.update(data.tobytes())
  return digest.hexdigest()


def _metadata_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 of the canonical JSON of ``meta`` without its own digest."""
  content = {k: v for k, v in meta.items() if k != _METADATA_DIGEST}
  text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- save / restore


def _normalized_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """``config`` as it reads back from JSON; raises if it cannot be written."""
  if config is None:
    return None
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a dict of hyperparameters or None, got {config!r}.")
  try:
    return json.loads(json.dumps(dict(config), allow_nan=False))
  except (TypeError, ValueError) as e:
    raise type(e)(
      f"config must be JSON-serializable (numbers, strings, lists, dicts; no NaN): {e}"
    ) from e


def save(
  manager: ocp.CheckpointManager,
  step: int,
  params,
  opt_state,
  *,
  config: Mapping[str, Any] | None = None,
  extras: Mapping[str, Any] | None = None,
) -> bool:
  """Saves parameters, optimizer state and their metadata as checkpoint ``step``.

  The state is saved whole: keys (typed, with their implementation),
  counters, bases and inner buffers. The metadata records SHA-256 digests of
  the arrays and of itself, which `restore` verifies. Computing the array
  digest copies each leaf to the host once, before the save starts. The
  save may run in the background, as ``manager`` is configured; call
  ``manager.wait_until_finished()`` (or ``manager.close()``) before the
  process exits.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager`.
    step: the step number to save under (usually the optimizer's count).
    params: the parameter pytree.
    opt_state: the optimizer state, e.g. from ``tx.init`` / ``tx.update``.
    config: optional JSON-able dict of the hyperparameters that built the
      optimizer (learning rate, eps, ...), which the state's structure does
      not show; `restore` checks it when given one.
    extras: optional JSON-able dict saved alongside and never checked
      against anything (only for damage), for what a training program needs
      to resume besides the optimizer (the data iterator's state, wall time
      so far, ...); read it back with ``metadata(manager, step)["extras"]``.

  Returns:
    Whether a checkpoint was written (False when the manager's save policy,
    e.g. ``save_interval_steps``, skips this step).

  Raises:
    TypeError, ValueError: if ``config`` or ``extras`` is not a
      JSON-serializable dict.
  """
  meta = {
    "format": FORMAT,
    "params": signature(params),
    "opt_state": signature(opt_state),
    "config": _normalized_config(config),
    "extras": _normalized_config(extras),
  }
  if not manager.should_save(step):
    return False
  meta[_ARRAYS_DIGEST] = _arrays_digest({"params": params, "opt_state": opt_state})
  meta[_METADATA_DIGEST] = _metadata_digest(meta)
  return manager.save(
    step,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      **{_METADATA_ITEM: ocp.args.JsonSave(meta)},
    ),
  )


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  steps = sorted(manager.all_steps())
  if not steps and not os.path.isdir(manager.directory):
    raise FileNotFoundError(f"The checkpoint directory {manager.directory} does not exist.")
  if step is None:
    if not steps:
      raise FileNotFoundError(f"No checkpoints in {manager.directory}.")
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(
      f"No checkpoint at step {step} in {manager.directory}; saved steps: {steps}."
    )
  return step


def _step_path(manager: ocp.CheckpointManager, step: int):
  name_format = getattr(manager, "_step_name_format", None) or ocp.step.standard_name_format()
  return ocp.step.build_step_path(manager.directory, name_format, step)


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  line = text.splitlines()[0]
  return line if len(line) <= 300 else line[:300] + "..."


def _corrupted(step: int, manager: ocp.CheckpointManager, what: str) -> CheckpointCorruptedError:
  return CheckpointCorruptedError(
    f"Checkpoint step {step} in {manager.directory} is damaged or incomplete: {what}",
    step=step,
    directory=str(manager.directory),
  )


def metadata(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of checkpoint ``step`` (None: the latest), verified.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager`.
    step: a saved step, or None for the latest.

  Returns:
    A dict with ``"format"``, ``"step"``, the signatures ``"params"`` and
    ``"opt_state"`` (see `signature`), the saved ``"config"`` and
    ``"extras"`` (each None if not given) and the digests.

  Raises:
    FileNotFoundError: if there is no such step (or no checkpoint at all, or
      no such directory).
    CheckpointCorruptedError: (a ValueError) if the step is empty or its
      metadata file is missing, not JSON, incomplete, or differs from the
      digest saved in it.
    ValueError: if the step was not written by `save`.
  """
  manager.wait_until_finished()
  step = _resolve_step(manager, step)
  step_path = _step_path(manager, step)
  meta_file = step_path / _METADATA_ITEM / "metadata"
  not_ours = (
    f"Checkpoint step {step} in {manager.directory} was not written by "
    f"zojax.checkpointing.save (format {FORMAT!r})"
  )
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
    )
  except KeyError as e:  # orbax: the item is not in the checkpoint
    if step_path.is_dir() and not any(p.is_dir() for p in step_path.iterdir()):
      raise _corrupted(step, manager, f"its directory {step_path} holds no items") from e
    raise ValueError(f"{not_ours}: {e}") from e
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    raise _corrupted(
      step, manager, f"its metadata file {meta_file} cannot be read ({_first_line(e)})"
    ) from e
  meta = restored[_METADATA_ITEM]
  if isinstance(meta, dict) and meta.get("format") == _UNVERIFIED_FORMAT:
    return {"extras": None, **meta, "step": step}
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{not_ours}.")
  missing = [k for k in (*_REQUIRED, _METADATA_DIGEST) if k not in meta]
  if missing:
    raise _corrupted(step, manager, f"its metadata file {meta_file} lacks {', '.join(missing)}")
  try:
    intact = meta[_METADATA_DIGEST] == _metadata_digest(meta)
  except (TypeError, ValueError):
    intact = False
  if not intact:
    raise _corrupted(
      step, manager, f"its metadata file {meta_file} differs from the digest saved in it"
    )
  return {"extras": None, **meta, "step": step}


def restore(
  manager: ocp.CheckpointManager,
  step: int | None,
  params,
  opt_state,
  *,
  config: Mapping[str, Any] | None = None,
):
  """Restores checkpoint ``step`` into the structure of the given templates.

  The templates give the pytree structure (NamedTuples, typed keys), shapes
  and dtypes to restore into: concrete arrays (``params`` and
  ``tx.init(params)`` of the rebuilt optimizer) or `jax.ShapeDtypeStruct`s
  (``jax.eval_shape(tx.init, params)``); their values are not used. The
  saved signatures, and the config when one is given, are checked first;
  the arrays read are then checked against the digest `save` recorded.

  To restore without creating a missing directory, open the manager with
  ``ocp.CheckpointManagerOptions(create=False)``, or give
  `restore_latest_intact` the directory itself.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager` on the checkpoint
      directory.
    step: the step to restore, or None for the latest.
    params: template of the parameters.
    opt_state: template of the optimizer state.
    config: the hyperparameters of the rebuilt optimizer, compared with the
      saved ``config`` (None skips that check).

  Returns:
    ``(params, opt_state)`` with the templates' structure and dtypes.

  Raises:
    FileNotFoundError: if there is no such step (or no checkpoint at all).
    CheckpointMismatchError: (a ValueError) if the parameters, the optimizer
      state or the config differ from the checkpoint's.
    CheckpointCorruptedError: (a ValueError) if the step is damaged or
      incomplete: its files cannot be read, or what was read differs from
      the saved digests.

  Examples:
    >>> import tempfile
    >>> import jax.numpy as jnp, optax, orbax.checkpoint as ocp, zojax
    >>> from zojax import checkpointing
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = zojax.mezo(learning_rate=1e-2, key=0)
    >>> state = tx.init(params)
    >>> _, state = tx.update(None, state, params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     _ = checkpointing.save(manager, 1, params, state, config={"lr": 1e-2})
    ...   fresh = zojax.mezo(learning_rate=1e-2, key=0).init(params)
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     params, state = checkpointing.restore(manager, None, params, fresh, config={"lr": 1e-2})
    >>> int(state[0].count)
    1
  """
  return _restore_verified(manager, metadata(manager, step), params, opt_state, config)


def _restore_verified(manager, meta, params, opt_state, config):
  step = meta["step"]
  where = f"at step {step} in {manager.directory}"
  for name, template, hint in (
    ("params", params, "The checkpoint was made for different parameters (model or dtypes)."),
    (
      "opt_state",
      opt_state,
      "The checkpoint was made by a different optimizer configuration (another preset, "
      "rank, num_queries, ...); rebuild the optimizer that wrote it.",
    ),
  ):
    differences = _signature_differences(meta[name], signature(template))
    if differences:
      raise _mismatch(name, differences, where, hint)
  if config is not None:
    differences = _config_differences(meta["config"], _normalized_config(config))
    if differences:
      raise _mismatch(
        "config",
        differences,
        where,
        "The checkpoint was made by a different optimizer configuration (hyperparameters).",
      )
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        opt_state=ocp.args.StandardRestore(opt_state),
      ),
    )
  except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions on damaged data
    raise _corrupted(step, manager, f"its arrays cannot be read ({_first_line(e)})") from e
  params, opt_state = restored["params"], restored["opt_state"]
  expected = meta.get(_ARRAYS_DIGEST)
  if expected is not None:
    actual = _arrays_digest({"params": params, "opt_state": opt_state})
    if actual is not None and actual != expected:
      raise _corrupted(
        step,
        manager,
        "its arrays differ from the SHA-256 digest saved with them (damaged data files); "
        "the values read are not the values saved",
      )
  return params, opt_state


class Restored(NamedTuple):
  """What `restore_latest_intact` found.

  Attributes:
    params: the restored parameters.
    opt_state: the restored optimizer state.
    metadata: the step's metadata (see `metadata`): ``"step"``, ``"extras"``, ...
    skipped: ``(step, reason)`` of each newer step that was damaged or
      incomplete, newest first; empty when the latest step was intact.
  """

  params: Any
  opt_state: Any
  metadata: dict[str, Any]
  skipped: tuple[tuple[int, str], ...]


def restore_latest_intact(
  manager: ocp.CheckpointManager | str | os.PathLike,
  params,
  opt_state,
  *,
  config: Mapping[str, Any] | None = None,
) -> Restored:
  """Restores the newest checkpoint step that is intact, for resuming a run.

  Steps are tried newest first; one that is damaged or incomplete
  (`CheckpointCorruptedError`: unreadable or missing files, data that differ
  from the saved digests) is skipped and reported in ``skipped``. A step of
  another configuration (`CheckpointMismatchError`) stops the search: older
  steps were written by the same run. Nothing on disk is changed.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager`, or the checkpoint
      directory, which is then opened without being created.
    params: template of the parameters (see `restore`).
    opt_state: template of the optimizer state.
    config: the hyperparameters of the rebuilt optimizer (see `restore`).

  Returns:
    A `Restored` of the parameters, state, metadata and the steps skipped.

  Raises:
    FileNotFoundError: if the directory does not exist or holds no checkpoint.
    CheckpointCorruptedError: if every step is damaged; the message lists
      each step and why.
    CheckpointMismatchError: if the newest readable metadata belongs to
      another configuration.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp, orbax.checkpoint as ocp, zojax
    >>> from zojax import checkpointing
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = zojax.mezo(learning_rate=1e-2).init(params)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     _ = checkpointing.save(manager, 1, params, state)
    ...     _ = checkpointing.save(manager, 2, params, state)
    ...   os.remove(os.path.join(directory, "2", "zojax", "metadata"))  # damage step 2
    ...   found = checkpointing.restore_latest_intact(directory, params, state)
    >>> found.metadata["step"], [step for step, _ in found.skipped]
    (1, [2])
  """
  if not isinstance(manager, ocp.CheckpointManager):
    directory = os.fspath(manager)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"The checkpoint directory {directory} does not exist.")
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as opened:
      return restore_latest_intact(opened, params, opt_state, config=config)
  manager.wait_until_finished()
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    _resolve_step(manager, None)  # raises the FileNotFoundError
  skipped = []
  for step in steps:
    try:
      meta = metadata(manager, step)
      params_out, state_out = _restore_verified(manager, meta, params, opt_state, config)
    except CheckpointCorruptedError as e:
      skipped.append((step, str(e)))
      continue
    return Restored(params_out, state_out, meta, tuple(skipped))
  reasons = "\n  ".join(reason for _, reason in skipped)
  raise CheckpointCorruptedError(
    f"No intact checkpoint in {manager.directory}; every step is damaged:\n  {reasons}",
    directory=str(manager.directory),
  )
