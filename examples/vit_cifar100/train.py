"""Fine-tune a ViT with zeroth-order optimizers (zojax) or backprop baselines.

Two tasks:

* ``--dataset digits`` (the default, runs anywhere in a few minutes on 2 CPU
  cores): scikit-learn's bundled 8x8 digits. A small ViT is first trained
  with first-order Adam on digits 0-4 only; its head is then replaced by a
  zero 10-way head and the whole network is fine-tuned on all ten digits
  with the chosen optimizer.
* ``--dataset cifar100``: CIFAR-100 from a prepared tfds directory
  (``--data-dir``), starting from an official ViT ``.npz`` checkpoint
  (``--pretrained``), as in the ZO-Muon paper's ViT experiments.

One jitted train step (all queries, subspace refreshes and the update of a
ZO step inside it) with donated buffers, data parallel over every visible
device (batch sharded over a mesh, parameters replicated: the optimizer
exchanges only loss values). Stops at ``--steps``, ``--forward-budget`` or
``--max-time``, whichever comes first. Writes a JSON-lines log, a PNG plot
of test accuracy against forward passes and wall time, and orbax
checkpoints from which ``--resume`` continues bit for bit (parameters,
optimizer state with its keys, and the data iterator's position).

Several processes (hosts, or processes on one machine) run one data-parallel
job with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; flags win): every process runs the same command with its
own id, reads and prepares only its rows of every global training batch
(evaluation batches whole, for their labels), and takes part in every step
and evaluation. Process 0 alone prints, logs and writes the JSON summary and
the plot; every process takes part in writing a checkpoint (orbax
coordinates them; the directory must be shared). ``--max-time`` follows
process 0's clock.

Run ``python -m examples.vit_cifar100.train --help`` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import zojax
from examples.run_files import UsageError, set_aside, trim_log
from examples.run_files import check_output_dir as _check_output_dir
from examples.run_files import check_output_file as _check_output_file
from examples.vit_cifar100 import data as data_lib
from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers
from examples.vit_cifar100 import pretrained as pretrained_lib

# Learning rates that work for each task when --lr is not given.
DEFAULT_LR = {
  "digits": {
    "mezo": 2.5e-4,
    "mezo_bcd": 5e-4,
    "zo_muon": 3e-2,
    "zo_mopi": 3e-2,
    "lozo": 2.5e-4,
    "lozo_m": 2.5e-4,
    "subzero": 1.25e-4,
    "fo-adam": 1e-3,
    "fo-muon": 2e-2,
  },
  # The papers' settings for ViT-B/16 on CIFAR-100.
  "cifar100": {
    "mezo": 1e-4,
    "mezo_bcd": 1e-4,
    "zo_muon": 1e-2,
    "zo_mopi": 1e-2,
    "lozo": 1e-4,
    "lozo_m": 1e-4,
    "subzero": 1e-4,
    "fo-adam": 1e-4,
    "fo-muon": 2e-3,
  },
}
# Subspace ranks that differ from the presets' defaults (the papers' settings
# for 768-wide ViT-B and LLMs). The digits ViT is 64 wide, so the preset's
# rank 64 is the full space; rank 8 keeps ZO-Muon's rank/width ratio near
# the paper's 64/768 and learns faster there (benchmarks/query_efficiency:
# rank 4, 8, 16 and 64 compared over three seeds).
DEFAULT_RANK = {"digits": {"zo_muon": 8, "zo_mopi": 8}, "cifar100": {}}
DEFAULT_MODEL = {"digits": "digits", "cifar100": "B/16"}
DEFAULT_IMAGE_SIZE = {"digits": 8, "cifar100": 224}
NUM_CLASSES = {"digits": 10, "cifar100": 100}
PRETRAIN_CLASSES = 5  # digits: Adam pretraining sees digits 0-4 only


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (``argv`` None reads `sys.argv`)."""
  p = argparse.ArgumentParser(
    prog="python -m examples.vit_cifar100.train",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--dataset",
    choices=sorted(NUM_CLASSES),
    default="digits",
    help="digits: the embedded CPU task; cifar100: needs --data-dir (and --pretrained).",
  )
  p.add_argument(
    "--optimizer",
    default="zo_muon",
    help=f"one of: {', '.join(optimizers.NAMES)} (fo-* use backprop: the baselines).",
  )
  p.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer).")
  p.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale.")
  p.add_argument(
    "--num-queries", type=int, default=None, help="ZO directions per step (default: preset's)."
  )
  p.add_argument(
    "--rank",
    type=int,
    default=None,
    help="subspace rank (default: the preset's; 8 for ZO-Muon and ZO-MOPI on digits).",
  )
  p.add_argument(
    "--refresh-every",
    type=int,
    default=None,
    help="steps between subspace refreshes / MeZO-BCD block switches (default: preset's).",
  )
  p.add_argument("--steps", type=int, default=3000, help="maximum optimizer steps.")
  p.add_argument(
    "--forward-budget",
    type=int,
    default=None,
    help="stop before exceeding this many forward passes (compare methods at equal queries).",
  )
  p.add_argument(
    "--max-time",
    type=float,
    default=None,
    help="stop after this many seconds of training (equal-wall-clock comparisons).",
  )
  p.add_argument("--batch-size", type=int, default=64, help="global batch size.")
  p.add_argument("--eval-every", type=int, default=500, help="steps between test evaluations.")
  p.add_argument("--seed", type=int, default=0, help="seed of data order, init and directions.")
  p.add_argument("--model", default=None, help="ViT config (default: digits / B/16).")
  p.add_argument("--image-size", type=int, default=None, help="input resolution.")
  p.add_argument(
    "--pretrained",
    default=None,
    help="official ViT .npz checkpoint to start from (cifar100 only: digits pretrains itself).",
  )
  p.add_argument("--data-dir", default=None, help="tfds data directory holding cifar100.")
  p.add_argument("--pretrain-steps", type=int, default=600, help="digits: Adam steps on 0-4.")
  p.add_argument("--checkpoint-dir", default=None, help="save orbax checkpoints here.")
  p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints.")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest intact checkpoint in --checkpoint-dir (damaged newer steps "
    "are reported and kept aside as <step>.damaged).",
  )
  p.add_argument(
    "--log",
    default=None,
    help="append a JSON line per evaluation here (on --resume, lines after the restored step "
    "are dropped first).",
  )
  p.add_argument("--plot", default=None, help="write a PNG of test accuracy here.")
  p.add_argument("--json", default=None, help="write the final summary as JSON here.")
  p.add_argument("--quiet", action="store_true", help="no progress bar and no printed summary.")
  p.add_argument(
    "--coordinator",
    default=None,
    help="multi-process runs: HOST:PORT of process 0's coordinator, the same for every process "
    "(default: $JAX_COORDINATOR_ADDRESS).",
  )
  p.add_argument(
    "--num-processes",
    type=int,
    default=None,
    help="multi-process runs: how many processes take part (default: $JAX_NUM_PROCESSES, else 1).",
  )
  p.add_argument(
    "--process-id",
    type=int,
    default=None,
    help="multi-process runs: this process's id, 0 to N-1; 0 writes the outputs "
    "(default: $JAX_PROCESS_ID).",
  )
  return p.parse_args(argv)


ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Processes:
  """Where this process stands in the run: ``coordinator`` is None for a single process."""

  coordinator: str | None = None
  count: int = 1
  index: int = 0


def resolve_processes(args: argparse.Namespace, environ=os.environ) -> Processes:
  """The multi-process settings from the flags, else the environment, checked.

  Raises:
    UsageError: a value is malformed or out of range, or a multi-process run
      lacks the coordinator or this process's id.
  """

  def integer(flag: str, value, variable: str):
    if value is not None:
      return value, flag
    if environ.get(variable, "") == "":
      return None, flag
    try:
      return int(environ[variable]), f"${variable}"
    except ValueError:
      raise UsageError(f"${variable} must be an integer, got {environ[variable]!r}") from None

  count, count_from = integer("--num-processes", args.num_processes, ENV_NUM_PROCESSES)
  index, index_from = integer("--process-id", args.process_id, ENV_PROCESS_ID)
  coordinator = args.coordinator or environ.get(ENV_COORDINATOR) or None
  if count is None:
    given = index_from if index is not None else "--coordinator" if args.coordinator else None
    if given:
      raise UsageError(
        f"{given} is for multi-process runs; give --num-processes (or ${ENV_NUM_PROCESSES}) too"
      )
    return Processes()
  if count < 1:
    raise UsageError(f"{count_from} must be >= 1, got {count}")
  if count == 1:
    if index not in (None, 0):
      raise UsageError(f"{index_from} {index} is out of range for 1 process")
    return Processes()
  if index is None:
    raise UsageError(
      f"{count_from} {count} needs this process's --process-id (or ${ENV_PROCESS_ID})"
    )
  if not 0 <= index < count:
    raise UsageError(f"{index_from} must be between 0 and {count - 1}, got {index}")
  if coordinator is None:
    raise UsageError(
      f"{count_from} {count} needs --coordinator HOST:PORT (or ${ENV_COORDINATOR}): the "
      "address of process 0, the same for every process"
    )
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UsageError(f"--coordinator must be HOST:PORT with a port in 1-65535, got {coordinator!r}")
  return Processes(coordinator, count, index)


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _check_args(
  args: argparse.Namespace, num_devices: int | None, *, writes_outputs: bool = True
) -> None:
  """Every check that can fail before anything is computed or written.

  ``num_devices``: the devices the batch is split over (None: not known yet,
  before a multi-process run is joined; check it then with
  `_check_batch_size`). ``writes_outputs``: whether this process writes
  --log, --json and --plot (process 0 of a multi-process run), whose paths
  are then checked.
  """
  if args.optimizer not in optimizers.NAMES:
    raise UsageError(
      f"unknown --optimizer {args.optimizer!r}; choose one of: {', '.join(optimizers.NAMES)}"
    )
  positive = ["steps", "batch_size", "eval_every", "checkpoint_every"]
  optional = ["num_queries", "rank", "refresh_every", "image_size", "forward_budget"]
  for name in positive + [n for n in optional if getattr(args, n) is not None]:
    if getattr(args, name) < 1:
      raise UsageError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
  if args.pretrain_steps < 0:
    raise UsageError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
  for name in ("lr", "eps", "max_time"):
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value > 0):
      raise UsageError(f"{_flag(name)} must be a positive number, got {value}")
  if args.pretrained is not None:
    if args.dataset != "cifar100":
      raise UsageError(
        f"--pretrained is for --dataset cifar100; --dataset {args.dataset} pretrains its own "
        "model (see --pretrain-steps)"
      )
    if not os.path.isfile(args.pretrained):
      raise UsageError(f"--pretrained {args.pretrained} is not a file")
  if num_devices is not None:
    _check_batch_size(args, num_devices)
  if args.resume and not args.checkpoint_dir:
    raise UsageError("--resume needs --checkpoint-dir")
  if args.dataset == "cifar100" and not args.data_dir:
    raise UsageError("--dataset cifar100 needs --data-dir (see data.py for how to prepare it)")
  for name in ("log", "json", "plot") if writes_outputs else ():
    _check_output_file(_flag(name), getattr(args, name))
  if args.checkpoint_dir:
    _check_output_dir("--checkpoint-dir", args.checkpoint_dir)


def _check_batch_size(args: argparse.Namespace, num_devices: int) -> None:
  if args.batch_size % num_devices:
    raise UsageError(
      f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices the "
      "batch is sharded over; use a multiple of the device count."
    )


def join(processes: Processes) -> None:
  """Joins a multi-process run (`jax.distributed.initialize`); nothing for a single process.

  Must come before any other JAX call. Returns once every process has joined.
  """
  if processes.coordinator is not None:
    jax.distributed.initialize(processes.coordinator, processes.count, processes.index)


def agreed(decision: bool, processes: Processes) -> bool:
  """``decision`` as process 0 took it, on every process.

  Each process times its own steps, so a decision taken from a clock
  (``--max-time``) can differ between them; a process that stopped alone
  would leave the others waiting in the next step's collectives.
  """
  if processes.count == 1:
    return decision
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Data parallelism over every device of every process: batch rows split, the rest replicated.

  Each process holds the rows of a global batch that its own devices take:
  ``rows(batch_size)`` of them, the ``process_index``-th equal part.
  """

  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def rows(self, batch_size: int) -> tuple[int, int]:
    """``(start, stop)``: this process's rows of a global batch of ``batch_size``."""
    part = batch_size // jax.process_count()
    return jax.process_index() * part, (jax.process_index() + 1) * part

  def put_batch(self, batch: dict) -> dict:
    """A global batch from this process's rows of it (all of it when there is one process)."""
    return {
      k: jax.make_array_from_process_local_data(self.batch, np.asarray(v)) for k, v in batch.items()
    }

  def put_global_batch(self, batch: dict) -> dict:
    """A global batch from the whole of it, which every process holds."""
    start, stop = self.rows(len(batch["label"]))
    return self.put_batch({k: v[start:stop] for k, v in batch.items()})

  def replicate(self, params):
    """Copies of ``params``, the same on every process, on every device.

    For parameters only: in a multi-process run `jax.device_put` checks that
    every process passes the same value, which fails on NaN (an optimizer
    state's initial loss) and on typed keys; create a state with `init`.
    """
    return jax.device_put(params, self.replicated)

  def init(self, tx: optax.GradientTransformation, params):
    """``tx.init(params)``, created replicated on every device of every process."""
    return jax.jit(tx.init, out_shardings=self.replicated)(params)


@dataclasses.dataclass
class Task:
  """What the training loop needs to know about the model and data."""

  apply: Callable[[Any, jax.Array], jax.Array]  # (params, images) -> logits
  params: Any
  train: Any  # a grain iterator of {"image", "label"} batches (with get_state/set_state)
  evaluate: Callable[[Any], float]  # params -> test accuracy
  description: dict


def cross_entropy(apply, params, batch) -> jax.Array:
  """Mean softmax cross-entropy, computed in float32."""
  logits = apply(params, batch["image"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def make_train_step(apply, optimizer: optimizers.Optimizer):
  """The jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

  Parameters and optimizer state are donated. A ZO step evaluates the loss
  through ``value_fn``; the loss reported is the optimizer's own (no extra
  forward pass). A backprop step uses `jax.value_and_grad`.
  """
  tx = optimizer.tx

  def step(params, opt_state, batch):
    loss_fn = functools.partial(cross_entropy, apply)
    if optimizer.zeroth_order:
      updates, opt_state = tx.update(None, opt_state, params, value_fn=lambda p: loss_fn(p, batch))
      loss = zo_loss(opt_state)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def zo_loss(opt_state) -> jax.Array:
  """The loss a zojax state saw in its last step (outermost estimator or block state)."""
  nodes = (zojax.ZOGradState, zojax.BlockCoordinateState)
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, nodes)):
    if isinstance(node, nodes):
      return node.loss
  raise ValueError("the optimizer state holds no zojax estimator")


def accuracy_fn(apply, batches: Callable[[], Iterator[dict]], shardings: Shardings):
  """Returns ``params -> accuracy`` over padded eval batches (label -1 marks padding)."""
  predict = jax.jit(lambda p, x: jnp.argmax(apply(p, x), -1), out_shardings=shardings.replicated)

  def evaluate(params) -> float:
    correct = total = 0
    for batch in batches():
      pred = np.asarray(predict(params, shardings.put_global_batch(batch)["image"]))
      real = batch["label"] >= 0
      correct += int(np.sum((pred == batch["label"]) & real))
      total += int(np.sum(real))
    return correct / max(total, 1)

  return evaluate


def _with_zero_head(params, num_classes: int):
  """``params`` with a fresh zero ``head`` of ``num_classes`` outputs."""
  params = dict(params)
  width = params["head"]["kernel"].shape[0]
  params["head"] = {
    "kernel": jnp.zeros((width, num_classes), jnp.float32),
    "bias": jnp.zeros((num_classes,), jnp.float32),
  }
  return params


def _evaluator(apply, source, args, shardings: Shardings) -> Callable[[Any], float]:
  """Test accuracy over ``source`` in padded batches of ``--batch-size``."""
  dataset = data_lib.eval_dataset(
    source, batch_size=args.batch_size, image_size=args.image_size, pad_remainder=True
  )
  return accuracy_fn(apply, data_lib.batches(dataset), shardings)


def pretrain_digits(args, shardings: Shardings, log: Callable[[str], None]):
  """First-order Adam on digits 0-4 with a 5-way head; returns the body with a zero 10-way head."""
  model, params = model_lib.create(
    args.model, PRETRAIN_CLASSES, args.image_size, key=jax.random.key(args.seed)
  )
  apply = model_lib.make_logits(model)
  train, test = data_lib.digits_sources(classes=range(PRETRAIN_CLASSES), split_seed=args.seed)
  dataset = data_lib.train_dataset(
    train,
    batch_size=args.batch_size,
    image_size=args.image_size,
    seed=args.seed,
    augment=False,
    rows=shardings.rows(args.batch_size),
  )
  optimizer = optimizers.make("fo-adam", 1e-3)
  step = make_train_step(apply, optimizer)
  params = shardings.replicate(params)
  opt_state = shardings.init(optimizer.tx, params)
  start = time.perf_counter()
  iterator = data_lib.make_iterator(dataset)
  for _ in range(args.pretrain_steps):
    params, opt_state, _ = step(params, opt_state, shardings.put_batch(next(iterator)))
  accuracy = _evaluator(apply, test, args, shardings)(params)
  log(
    f"pretrained with Adam on digits 0-{PRETRAIN_CLASSES - 1} ({args.pretrain_steps} steps, "
    f"{time.perf_counter() - start:.1f} s): test accuracy on those digits {accuracy:.4f}"
  )
  return _with_zero_head(jax.device_get(params), NUM_CLASSES["digits"]), accuracy


def build_task(args, shardings: Shardings, log: Callable[[str], None], *, need_params: bool):
  """Model, initial parameters (None when resuming), data and evaluation for ``args``."""
  num_classes = NUM_CLASSES[args.dataset]
  if args.dataset == "digits":
    train, test = data_lib.digits_sources(split_seed=args.seed)
    augment = False
  else:
    train = data_lib.cifar100_source(args.data_dir, "train")
    test = data_lib.cifar100_source(args.data_dir, "test")
    augment = True
  model = model_lib.VisionTransformer(model_lib.get_config(args.model), num_classes)
  apply = model_lib.make_logits(model)
  description = {"num_train": len(train), "num_test": len(test)}
  params = None
  if need_params:
    if args.dataset == "digits":
      params, description["pretrain_accuracy"] = pretrain_digits(args, shardings, log)
    elif args.pretrained:
      try:
        params = pretrained_lib.load_npz(args.pretrained, args.model, num_classes, args.image_size)
      except ValueError as e:
        raise UsageError(f"--pretrained {e}") from None
    else:
      log("no --pretrained checkpoint: starting from a random initialisation")
      _, params = model_lib.create(
        args.model, num_classes, args.image_size, key=jax.random.key(args.seed)
      )
  dataset = data_lib.train_dataset(
    train,
    batch_size=args.batch_size,
    image_size=args.image_size,
    seed=args.seed,
    augment=augment,
    rows=shardings.rows(args.batch_size),
  )
  return Task(apply, params, dataset, _evaluator(apply, test, args, shardings), description)


def run_config(args, optimizer: optimizers.Optimizer) -> dict:
  """What must match for a checkpoint to be resumed: model, data and optimizer settings."""
  keys = (
    "dataset",
    "model",
    "image_size",
    "optimizer",
    "lr",
    "eps",
    "num_queries",
    "rank",
    "refresh_every",
    "batch_size",
    "seed",
    "pretrained",
  )
  config = {k: getattr(args, k) for k in keys}
  if args.dataset == "digits":
    config["pretrain_steps"] = args.pretrain_steps
  config["forwards_per_step"] = optimizer.forwards_per_step
  return config


def _resolve_defaults(args) -> None:
  if args.model is None:
    args.model = DEFAULT_MODEL[args.dataset]
  if args.image_size is None:
    args.image_size = DEFAULT_IMAGE_SIZE[args.dataset]
  if args.lr is None and args.optimizer in optimizers.NAMES:
    args.lr = DEFAULT_LR[args.dataset][args.optimizer]
  if args.rank is None:
    args.rank = DEFAULT_RANK[args.dataset].get(args.optimizer)


def _plot(history: list[dict], path: str) -> None:
  """Test accuracy against forward passes and against training time."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  for ax, key, label in (
    (axes[0], "forwards", "forward passes"),
    (axes[1], "seconds", "training time (s)"),
  ):
    ax.plot([h[key] for h in history], [h["test_accuracy"] for h in history], marker="o")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[dict, Any]:
  """Runs (or resumes) one fine-tuning run; returns its summary and final parameters.

  Raises:
    UsageError: for settings that cannot work, before anything is written.
    data_lib.DataNotPrepared: if CIFAR-100 is not prepared under --data-dir.
    zojax.checkpointing.CheckpointMismatchError: if --resume finds a
      checkpoint of another model or optimizer configuration.
    zojax.checkpointing.CheckpointCorruptedError: if --resume finds no
      intact checkpoint.
  """
  processes = resolve_processes(args)
  _resolve_defaults(args)
  lead = processes.index == 0  # the process that prints and writes logs, JSON and plots
  _check_args(args, None, writes_outputs=lead)  # before joining: no process waits on a bad one
  join(processes)
  if not lead:
    log = lambda *_: None  # noqa: E731
  devices = jax.devices()  # of every process
  _check_batch_size(args, len(devices))
  try:  # the presets check their hyperparameters and name the one at fault
    optimizer = optimizers.make(
      args.optimizer,
      args.lr,
      eps=args.eps,
      num_queries=args.num_queries,
      rank=args.rank,
      refresh_every=args.refresh_every,
      seed=args.seed,
    )
  except (ValueError, TypeError) as e:
    raise UsageError(f"--optimizer {args.optimizer}: {e}") from None
  if args.forward_budget is not None and args.forward_budget < optimizer.forwards_per_step:
    raise UsageError(
      f"--forward-budget {args.forward_budget} is smaller than one {args.optimizer} step "
      f"({optimizer.forwards_per_step} forward passes)"
    )
  shardings = Shardings(Mesh(np.array(devices), ("data",)))
  config = run_config(args, optimizer)

  manager = None
  resumed = None
  if args.checkpoint_dir:
    import orbax.checkpoint as ocp

    from zojax import checkpointing

    if args.resume:
      if not os.path.isdir(args.checkpoint_dir):
        raise UsageError(f"--resume: no checkpoint directory {args.checkpoint_dir}")
      shapes = model_lib.param_shapes(args.model, NUM_CLASSES[args.dataset], args.image_size)
      params_t = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
      state_t = jax.eval_shape(optimizer.tx.init, params_t)
      # Restored straight onto every device, replicated (as every process needs them).
      replicated = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings.replicated)
      params_t, state_t = jax.tree.map(replicated, (params_t, state_t))
      try:
        found = checkpointing.restore_latest_intact(
          args.checkpoint_dir, params_t, state_t, config=config
        )
      except FileNotFoundError:
        raise UsageError(f"--resume: no checkpoint in {args.checkpoint_dir}") from None
      params, opt_state, meta, damaged = found
      resumed = meta["extras"]

  task = build_task(args, shardings, log, need_params=resumed is None)
  step_fn = make_train_step(task.apply, optimizer)
  iterator = data_lib.make_iterator(task.train)
  if resumed is None:
    params = shardings.replicate(task.params)
    opt_state = shardings.init(optimizer.tx, params)
    progress_state = {"step": 0, "forwards": 0, "seconds": 0.0, "history": []}
    accuracy_before = task.evaluate(params)
    log(f"before fine-tuning ({args.optimizer}): test accuracy {accuracy_before:.4f}")
  else:
    data_lib.set_state(iterator, resumed["data"])
    progress_state = resumed["progress"]
    accuracy_before = resumed["accuracy_before"]
    log(f"resumed from step {progress_state['step']} in {args.checkpoint_dir}")
  # Restored parameters and state are replicated already (see the templates above).

  # Everything that can fail has been checked: now outputs may be written.
  if resumed is not None and lead:
    for step, reason in damaged:
      kept = set_aside(args.checkpoint_dir, step)
      print(
        f"warning: --resume: {reason}\n  kept it as {kept}; resuming from step {meta['step']}",
        file=sys.stderr,
      )
    if args.log:
      dropped = trim_log(args.log, resumed.get("log"))
      if dropped:
        log(f"dropped {dropped} lines after step {progress_state['step']} from {args.log}")
  if resumed is not None and processes.count > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("damaged checkpoints set aside")
  if manager is None and args.checkpoint_dir:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
      os.path.abspath(args.checkpoint_dir), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
  log_file = open(args.log, "a") if args.log and lead else None  # noqa: SIM115

  def save():
    # Every process saves (orbax writes the arrays together, the JSON from process 0,
    # whose extras hold the log's size).
    if manager is None:
      return
    from zojax import checkpointing

    extras = {
      "data": data_lib.get_state(iterator),
      "progress": progress_state,
      "accuracy_before": accuracy_before,
      # Where the log stood, so that a resumed run drops the lines logged after this step.
      "log": None
      if log_file is None
      else {"path": os.path.abspath(args.log), "bytes": os.fstat(log_file.fileno()).st_size},
    }
    checkpointing.save(
      manager, progress_state["step"], params, opt_state, config=config, extras=extras
    )

  def record(loss):
    accuracy = task.evaluate(params)
    entry = {
      "step": progress_state["step"],
      "forwards": progress_state["forwards"],
      "seconds": round(progress_state["seconds"], 3),
      "loss": loss if math.isfinite(loss) else None,
      "test_accuracy": accuracy,
    }
    progress_state["history"].append(entry)
    if log_file:
      log_file.write(json.dumps(entry) + "\n")
      log_file.flush()
    return accuracy

  compile_start = time.perf_counter()
  example = shardings.put_batch(task.train[0])
  compiled = step_fn.lower(params, opt_state, example).compile()
  compile_seconds = time.perf_counter() - compile_start

  bar = None
  if not args.quiet and lead:
    from tqdm.auto import tqdm

    bar = tqdm(
      total=args.steps,
      initial=progress_state["step"],
      desc=args.optimizer,
      unit="step",
      file=sys.stderr,
    )
  budget = math.inf if args.forward_budget is None else args.forward_budget
  max_time = math.inf if args.max_time is None else args.max_time
  accuracy = progress_state["history"][-1]["test_accuracy"] if progress_state["history"] else None
  loss = math.nan
  stop = "steps"
  while progress_state["step"] < args.steps:
    if progress_state["forwards"] + optimizer.forwards_per_step > budget:
      stop = "forward budget"
      break
    if max_time < math.inf and agreed(progress_state["seconds"] >= max_time, processes):
      stop = "time"
      break
    batch = shardings.put_batch(next(iterator))
    t0 = time.perf_counter()
    params, opt_state, loss_value = compiled(params, opt_state, batch)
    jax.block_until_ready(params)
    progress_state["seconds"] += time.perf_counter() - t0
    progress_state["step"] += 1
    progress_state["forwards"] += optimizer.forwards_per_step
    step = progress_state["step"]
    if step % args.eval_every == 0 or step == args.steps:
      loss = float(loss_value)
      accuracy = record(loss)
    if manager is not None and step % args.checkpoint_every == 0:
      save()
    if bar is not None:
      bar.update(1)
      if step % 10 == 0 or accuracy is not None:
        bar.set_postfix(
          loss=f"{float(loss_value):.4f}",
          acc="-" if accuracy is None else f"{accuracy:.3f}",
          fwd=progress_state["forwards"],
          refresh=False,
        )
  if bar is not None:
    bar.close()
  final = progress_state["history"]
  if not final or final[-1]["step"] != progress_state["step"]:
    accuracy = record(float(loss_value) if progress_state["step"] else math.nan)
  save()
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if log_file:
    log_file.close()
  if args.plot and lead:
    _plot(progress_state["history"], args.plot)

  summary = {
    "optimizer": args.optimizer,
    "accuracy_before": accuracy_before,
    "accuracy_after": progress_state["history"][-1]["test_accuracy"],
    "loss_after": progress_state["history"][-1]["loss"],
    "steps": progress_state["step"],
    "forward_passes": progress_state["forwards"],
    "train_seconds": round(progress_state["seconds"], 2),
    "compile_seconds": round(compile_seconds, 2),
    "stopped_by": stop,
    "devices": len(devices),
    "processes": processes.count,
    "num_params": model_lib.num_params(params),
    "config": config,
    **task.description,
  }
  log(
    f"after {summary['steps']} {args.optimizer} steps ({summary['forward_passes']} forward "
    f"passes, {summary['train_seconds']:.1f} s + {summary['compile_seconds']:.1f} s compile): "
    f"test accuracy {summary['accuracy_before']:.4f} -> {summary['accuracy_after']:.4f}"
  )
  if args.json and lead:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return summary, params


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit code."""
  args = parse_args(argv)
  log = (lambda *_: None) if args.quiet else print
  try:
    train(args, log)
  except (UsageError, data_lib.DataNotPrepared) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    from zojax.checkpointing import CheckpointCorruptedError, CheckpointMismatchError

    if isinstance(e, (CheckpointMismatchError, CheckpointCorruptedError)):
      print(f"error: --resume: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
