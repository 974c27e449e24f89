"""Query efficiency: test accuracy against forward passes, every method on the digits ViT task.

The task is the ``--dataset digits`` fine-tuning of ``examples/vit_cifar100``:
a small ViT (the ``digits`` config, 69k parameters, 8x8 grey images) is
pretrained with first-order Adam on digits 0-4 (`train.pretrain_digits`, once
per seed, reused by every method), its head is replaced by a zero 10-way head,
and the whole network is fine-tuned on all ten digits. The data: the 1347
training and 450 test images of the example's per-class split (seeded by the
seed); ``--val-fraction`` of every class of the training images (seeded
too) is held out as a validation split, and the rest is what the methods
train on. Methods: MeZO, ZO-Muon, ZO-MOPI, LOZO, LOZO-M, SubZero and
MeZO-BCD (the example's `optimizers.make` settings, with ZO-MOPI as its
released recipe: k = r / 2 and a random basis refresh every
``--zo-mopi-refresh`` steps), with first-order Adam as the ceiling.

Paired seeds. Seed s fixes the split, the validation split, the pretrained
model, the batch order and the optimizer's key: every method and learning
rate at seed s starts from the same model and sees the same batch at the
same step. Differences between methods are therefore compared seed by seed
(`comparison_stats.paired_difference`), which removes the between-seed
spread the methods share. The default is ten seeds (``--seeds 0 ... 9``).

Learning rates are chosen on the validation split, never the test split.
Each method starts from the grid ``CENTRE x --lr-factors``; every (learning
rate, seed) run is trained, and the learning rate with the highest mean
final validation accuracy is chosen. When it is the smallest or largest of
the grid, the grid is extended by one point beyond that edge (x or /
``--lr-extend-factor``), the new learning rate is run on every seed, and the
choice is made again, at most ``--max-extensions`` times. The chosen
learning rate, whether it still sits at the edge, and every grid tried are
reported. (The example's pretraining uses the whole training split of digits
0-4, validation images included, so validation accuracy runs above test
accuracy; it only ranks learning rates.)

What is reported at the chosen learning rate, each figure with a 95%
percentile-bootstrap interval over seeds (`benchmarks.comparison_stats`):

* test accuracy at 25%, 50% and 100% of ``--forward-budget`` (the last
  evaluation at or below each; Adam, whose budget is ``--fo-budget`` steps,
  is its final figure wherever its budget is smaller), and the mean accuracy
  over the run (area under the accuracy-forwards curve over the forward
  span, `comparison_stats.area_under_curve`); for each, the paired difference
  to MeZO;
* forwards to target: the first evaluation at which the seed-mean test curve
  reaches MeZO's final mean test accuracy, with its bootstrap interval (its
  upper end "not bounded" when too few resamples reach the target within the
  budget; see `comparison_stats.forwards_to_target`), the share of
  resamples that reach it, and the ratio to MeZO's own figure under the same
  rule (the point estimates only; MeZO's is where its mean curve first
  reaches its own final mean); the same in estimated seconds;
* curves against forwards and against estimated seconds (equal wall clock),
  mean over seeds with a pointwise bootstrap band, in the PNG.

The ZO-Muon paper reports 24.7% of MeZO's queries and about 70% of its run
time; the issue's target here is the best zojax method at <= 25% of MeZO's
forwards (point estimates).

What it cannot conclude. Intervals that overlap do not show the methods
equal, and a paired interval that excludes 0 shows a difference on this
task, model, budget and grid only. The intervals come from the seeds
alone: with 10 seeds a nominal 95% percentile interval covers about 90%
for normal data (see `comparison_stats`), and the learning-rate choice,
made on the same seeds' validation curves, is not resampled. Forwards to
target is read on an evaluation grid (``--eval-every``), so it is a
multiple of it, and its ratio has no interval. Methods whose step is not a
whole divisor of the evaluation interval end slightly below the budget
(ZO-MOPI's 9 forwards per step), which the figures at a budget account for
and the area does not (it is over each method's own span). Adam's forwards
exclude its backward passes: it is a ceiling, not a competitor.

How it runs fast. Each method's step is compiled once, for a batch of one
run per seed: the seeds' runs at one learning rate are trained together
under `jax.vmap` over stacked parameters, optimizer states and batches,
``eval_every`` steps at a time inside one `jax.lax.scan`, and every learning
rate of the grid (extensions included) reuses that program with its own
learning rate. (ZO-Muon, ZO-MOPI, SubZero and MeZO-BCD use `jax.lax.map`
over the runs instead, see ``--batching`` and `MAP_METHODS`. The two are
not interchangeable bit for bit: under `jax.lax.map` every run computes
exactly what it computes alone, while vmap's batched arithmetic differs in
the last bits (3e-8 after one ZO-Muon step), which thousands of ZO steps
amplify into runs that differ by several accuracy points; only the
statistics over seeds agree.)

This relies on two properties, both checked numerically at start-up for
every method (printed and stored; skipped under ``--quick`` unless
``--checks``, as the checks compile three more programs per method; on 2
CPU cores every check passed, linearity to a relative 1e-7 and seeding bit
for bit):

* linearity in the learning rate: every preset ends its chain with
  ``scale_by_learning_rate`` (ZO-Muon and ZO-MOPI scale matrices by ``lr``
  and vectors by ``lr / 100``, the example's rule), and so does Adam, so the
  update of the optimizer built with ``lr = 1`` times ``lr`` is the update of
  the optimizer built with ``lr`` (checked on one step against the preset
  built with the default learning rate);
* the preset's ``seed`` only seeds the keys in its initial state: the update
  function of the seed-0 preset applied to the initial state of the seed-s
  preset follows the seed-s preset exactly (checked over a few steps).

Batches are drawn here with NumPy, not through grain: per seed, a fresh
permutation of the training images (validation split removed) every epoch,
a ``--batch-size`` batch a step, the remainder of every epoch dropped (what
`data.train_dataset` does without augmentation), and images scaled to
[-1, 1].

Wall time. Vmapped runs give no per-run time, so each method's single-run
jitted step is timed separately, all methods in alternation
(`common.interleaved_medians`); estimated seconds are steps times that
median step time. Like every figure here, they are only comparable within
one run of the benchmark.

Settings. Fine-tuning runs at batch 16 from 300 Adam pretraining steps; each
grid starts at its `CENTRE` learning rate times x0.5, x1 and x2 (centres
from coarse sweeps at this batch size). The full setting (the default) gives
every ZO run 10000 forward passes and Adam 1000 steps over ten seeds;
``--quick``, for `benchmarks.all`, gives 1000 forward passes (Adam 250
steps) over three seeds with at most one grid extension. The quick figures
are early-training figures: within 2000 forwards every method is still near
the accuracy the pretrained features give for digits 0-4 (about 0.5), so
they say little about the query efficiency the issue is about; the full run
does.

The JSON keeps every run's validation and test curve (every learning rate,
every seed), so every table can be recomputed from it.

A full run takes hours on 2 CPU cores. With ``--resume-dir`` each method's
runs are saved as soon as they finish and a later run with the same
settings reads them back instead of running them again
(`common.read_checkpoint`); the step timing, which the wall-clock figures
scale by, is measured afresh every time, all methods side by side. The
commit each method's runs came from is stored with its row (``commits``
lists them all).

Example:
  python -m benchmarks.query_efficiency --quick --out-dir /tmp/qe
  python -m benchmarks.query_efficiency --variant zo_muon:rank=64 --out-dir /tmp/qe
  python -m benchmarks.query_efficiency --methods mezo zo_muon \\
    --variant zo_muon:num_queries=8,rank=16 --out-dir /tmp/qe
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from benchmarks import common
from benchmarks import comparison_stats as stats
from benchmarks.step_cost import Stepper
from examples.vit_cifar100 import data as data_lib
from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers
from examples.vit_cifar100 import train as train_lib

METHODS = ("mezo", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero", "mezo_bcd", "fo-adam")
KNOBS = ("num_queries", "rank", "k", "refresh_every", "eps")
ZO_MUON_TARGET = 0.25  # the target: <= 25% of MeZO's forwards
PAPER = {"queries": 0.247, "time": 0.70}  # ZO-Muon paper, relative to MeZO
MODEL = "digits"
IMAGE_SIZE = 8
NUM_CLASSES = 10
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # test accuracy reported at these shares of the budget
LEVEL = 0.95  # every interval's nominal coverage
RESAMPLES = 10000  # bootstrap draws of the seeds for the tables (2000 for the plot's bands)
# Methods whose runs share the compiled step through jax.lax.map instead of jax.vmap. SubZero's
# vmapped step hangs, idle, on CPU with jax 0.10.2: twelve or more QRs of vmapped 128 x 24
# Gaussian draws in one program never finish (its basis refresh at rank 24; pure-JAX reproducer
# in docs/benchmarks.md). ZO-Muon's and ZO-MOPI's hung in an earlier version and run under vmap
# now, but lax.map keeps every run bit-identical to a single run, and the committed results
# were made that way. MeZO-BCD's block switch becomes a select over every block under vmap.
MAP_METHODS = ("zo_muon", "zo_mopi", "subzero", "mezo_bcd")
# Each method's grid centre at batch 16 (coarse sweeps, see the module docstring).
CENTRE = {
  "mezo": 1.25e-4,
  "mezo_bcd": 2.5e-4,
  "zo_muon": 3e-2,
  "zo_mopi": 7.5e-3,
  "lozo": 1.25e-4,
  "lozo_m": 1.25e-4,
  "subzero": 1.25e-4,
  "fo-adam": 2e-3,
  "fo-muon": 2e-2,
}
PRETRAIN_BATCH = 64  # the example's batch size; pretraining is the same in every setting
# Settings of a full run and of --quick (flags given explicitly override either).
FULL = {
  "seeds": list(range(10)),
  "lr_factors": [0.5, 1.0, 2.0],
  "max_extensions": 3,
  "forward_budget": 10000,
  "fo_budget": 1000,
  "eval_every": 500,
  "batch_size": 16,
  "pretrain_steps": 300,
  "timing_repeats": 10,
}
QUICK = {
  "seeds": [0, 1, 2],
  "lr_factors": [0.5, 1.0, 2.0],
  "max_extensions": 1,
  "forward_budget": 1000,
  "fo_budget": 250,
  "eval_every": 250,
  "batch_size": 16,
  "pretrain_steps": 300,
  "timing_repeats": 10,
}


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer configuration in the comparison.

  Attributes:
    label: the name printed and stored (``name`` plus any overrides).
    name: an `optimizers.NAMES` entry.
    overrides: keyword arguments for `optimizers.make` (num_queries, rank, k,
      refresh_every, eps).
  """

  label: str
  name: str
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def knobs(self) -> dict:
    """Every keyword `make` passes to `optimizers.make` besides the learning rate and seed.

    The example's digits rank, then the overrides; ZO-MOPI as released: k = rank / 2 and a
    random (not momentum-anchored) refresh unless overridden.
    """
    knobs = {"rank": train_lib.DEFAULT_RANK["digits"].get(self.name), **dict(self.overrides)}
    if self.name == "zo_mopi":
      rank = knobs["rank"] or zojax_default("zo_mopi", "rank")
      knobs.setdefault("k", max(1, rank // 2))
      knobs.setdefault("anchored", False)
    return knobs

  def make(self, learning_rate: float, seed: int = 0) -> optimizers.Optimizer:
    """The example's optimizer at ``learning_rate`` with these knobs."""
    return optimizers.make(self.name, learning_rate, seed=seed, **self.knobs)

  @property
  def default_lr(self) -> float:
    """The centre of this method's learning-rate grid (`CENTRE`)."""
    return CENTRE[self.name]


def zojax_default(preset: str, name: str) -> int:
  """The value a zojax preset's integer argument takes when left at None."""
  import zojax

  return zojax.presets.DEFAULTS[preset][name]


def parse_variant(text: str) -> Method:
  """Parses ``name:key=value,...`` (e.g. ``zo_muon:num_queries=8,rank=16``) into a `Method`.

  Raises:
    ValueError: for an unknown optimizer or knob, or a malformed value.
  """
  name, _, rest = text.partition(":")
  if name not in optimizers.NAMES:
    raise ValueError(f"unknown optimizer {name!r} in --variant {text!r}")
  overrides = []
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    if key not in KNOBS:
      raise ValueError(f"unknown knob {key!r} in --variant {text!r}; choose from {KNOBS}")
    overrides.append((key, float(value) if key == "eps" else int(value)))
  short = {"num_queries": "q", "rank": "r", "k": "k", "refresh_every": "T", "eps": "eps"}
  label = name + "".join(f" {short[k]}{v:g}" for k, v in overrides)
  return Method(label, name, tuple(overrides))


def with_mopi_refresh(method: Method, refresh_every: int) -> Method:
  """``method`` with ZO-MOPI's refresh interval set, unless it is not ZO-MOPI or sets its own."""
  if method.name != "zo_mopi" or "refresh_every" in dict(method.overrides):
    return method
  overrides = (*method.overrides, ("refresh_every", refresh_every))
  return dataclasses.replace(method, overrides=overrides)


def _setting_help(key: str, what: str) -> str:
  return f"{what} (default {FULL[key]}, quick {QUICK[key]})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (``argv`` None reads `sys.argv`)."""
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.query_efficiency",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--methods", nargs="+", default=list(METHODS), help="optimizers to compare")
  p.add_argument(
    "--variant",
    action="append",
    default=[],
    help="an extra configuration, name:knob=value,... (knobs: "
    f"{', '.join(KNOBS)}), e.g. zo_muon:num_queries=8,rank=16; repeatable",
  )
  p.add_argument(
    "--seeds",
    nargs="+",
    type=int,
    default=None,
    help=_setting_help("seeds", "paired seeds (>= 2; intervals want >= 10)"),
  )
  p.add_argument(
    "--lr-factors",
    nargs="+",
    type=float,
    default=None,
    help=_setting_help("lr_factors", "the starting grid: each method's CENTRE learning rate times"),
  )
  p.add_argument(
    "--lr-extend-factor",
    type=float,
    default=2.0,
    help="when the chosen learning rate is at the grid's edge, the next point is that edge "
    "times (or divided by) this",
  )
  p.add_argument(
    "--max-extensions",
    type=int,
    default=None,
    help=_setting_help("max_extensions", "grid extensions per method at most"),
  )
  p.add_argument(
    "--val-fraction",
    type=float,
    default=0.2,
    help="share of every class of the training split held out to choose learning rates",
  )
  p.add_argument(
    "--zo-mopi-refresh",
    type=int,
    default=100,
    help="steps between ZO-MOPI's random basis refreshes (a variant's refresh_every wins)",
  )
  p.add_argument(
    "--forward-budget",
    type=int,
    default=None,
    help=_setting_help("forward_budget", "forward passes per ZO run"),
  )
  p.add_argument(
    "--fo-budget",
    type=int,
    default=None,
    help=_setting_help("fo_budget", "forward passes (= steps) per Adam run"),
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=None,
    help=_setting_help("eval_every", "forward passes between evals"),
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help=_setting_help("batch_size", "fine-tuning batch size"),
  )
  p.add_argument(
    "--pretrain-steps",
    type=int,
    default=None,
    help=_setting_help("pretrain_steps", "Adam steps on digits 0-4, batch 64"),
  )
  p.add_argument(
    "--timing-repeats",
    type=int,
    default=None,
    help=_setting_help("timing_repeats", "rounds of the step timing"),
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="the quick settings above (a smoke-scale run of a few minutes on 2 CPU cores)",
  )
  p.add_argument(
    "--checks",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="run the linearity and seed checks (default: on, off with --quick: they compile "
    "three more programs per method)",
  )
  p.add_argument(
    "--batching",
    choices=["auto", "vmap", "map"],
    default="auto",
    help="how the runs of a method share a step: jax.vmap, jax.lax.map, or auto (lax.map "
    f"for {', '.join(MAP_METHODS)}, see MAP_METHODS; vmap for "
    "the rest)",
  )
  p.add_argument("--out-dir", default=None, help="write query_efficiency.json and .png here")
  p.add_argument(
    "--resume-dir",
    default=None,
    help="save each method's runs here as it finishes, and reuse the saved ones whose "
    "settings match (a stopped run resumes; the step timing is always re-measured)",
  )
  args = p.parse_args(argv)
  if args.checks is None:
    args.checks = not args.quick
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  unknown = sorted(set(args.methods) - set(optimizers.NAMES))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(optimizers.NAMES)}")
  if "mezo" not in args.methods:
    p.error("--methods must include mezo (the reference)")
  try:
    args.variants = [parse_variant(v) for v in args.variant]
  except ValueError as e:
    p.error(str(e))
  if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
    p.error("--seeds must be at least 2 distinct seeds (the intervals resample them)")
  for name in (
    "forward_budget",
    "fo_budget",
    "eval_every",
    "batch_size",
    "pretrain_steps",
    "zo_mopi_refresh",
  ):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.max_extensions < 0:
    p.error("--max-extensions must be >= 0")
  if not args.lr_extend_factor > 1:
    p.error("--lr-extend-factor must be > 1")
  if not 0 < args.val_fraction < 1:
    p.error("--val-fraction must be in (0, 1)")
  if any(f <= 0 for f in args.lr_factors):
    p.error("--lr-factors must be positive")
  args.lr_factors = sorted(set(args.lr_factors))
  return args


# --------------------------------------------------------------------------- task


@dataclasses.dataclass
class SeedData:
  """One seed's splits (images in [-1, 1]), pretrained parameters and batch order."""

  seed: int
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  params: Any
  pretrain_accuracy: float
  order: np.ndarray  # (steps, batch) indices into the training split


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """``(steps, batch_size)`` indices: a fresh permutation per epoch, remainders dropped."""
  rng = np.random.default_rng([seed, 2024])
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  rows = [
    rng.permutation(num_examples)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
    for _ in range(epochs)
  ]
  return np.concatenate(rows)[:steps].astype(np.int32)


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
  """``(train, validation)`` indices into ``labels``: ``fraction`` of every class held out.

  Each class is permuted with a generator seeded by ``seed`` (and a constant
  that keeps it apart from the test split's), its first ``round(fraction *
  size)`` members validate; both index arrays are sorted.
  """
  return data_lib.stratified_split(labels, fraction, [seed, 7919])


def prepare_seed(seed: int, args: argparse.Namespace, steps: int, log) -> SeedData:
  """Pretrains (Adam on digits 0-4) and loads the splits of ``seed``."""
  pre_args = argparse.Namespace(
    model=MODEL,
    image_size=IMAGE_SIZE,
    seed=seed,
    batch_size=PRETRAIN_BATCH,
    pretrain_steps=args.pretrain_steps,
  )
  shardings = train_lib.Shardings(Mesh(np.array(jax.devices()), ("data",)))
  params, accuracy = train_lib.pretrain_digits(pre_args, shardings, log)
  train, test = data_lib.digits_sources(split_seed=seed)
  scale = lambda x: np.asarray(x, np.float32) * 2.0 - 1.0
  images, labels = scale(train.images), np.asarray(train.labels, np.int32)
  fit, val = validation_split(labels, args.val_fraction, seed)
  return SeedData(
    seed,
    images[fit],
    labels[fit],
    images[val],
    labels[val],
    scale(test.images),
    np.asarray(test.labels, np.int32),
    jax.device_get(params),
    accuracy,
    batch_order(len(fit), args.batch_size, steps, seed),
  )


def cross_entropy(apply, params, images, labels) -> jax.Array:
  """Mean softmax cross-entropy in float32."""
  logits = apply(params, images).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees leaf by leaf along a new leading (run) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# --------------------------------------------------------------------------- steps


def single_step(apply, tx, zeroth_order: bool):
  """``(params, state, images, labels) -> (updates, state, loss)`` of one run (not jitted)."""

  def step(params, state, images, labels):
    loss_fn = lambda p: cross_entropy(apply, p, images, labels)
    if zeroth_order:
      updates, state = tx.update(None, state, params, value_fn=loss_fn)
      loss = train_lib.zo_loss(state)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params)
    return updates, state, loss

  return step


def make_chunk(apply, tx, zeroth_order: bool, batching: str = "vmap"):
  """The jitted, donating ``(params, states, lrs, xs, ys, idx) -> (params, states, losses)``.

  Every argument has a leading run axis except ``idx``, ``(steps, runs,
  batch)``: ``steps`` steps of all runs run inside one `jax.lax.scan`, the
  runs of a step under `jax.vmap` (``batching="vmap"``) or one after the
  other under `jax.lax.map` (``"map"``, the same numbers). ``tx`` is the
  optimizer built with learning rate 1; each run's updates are scaled by its
  ``lrs`` entry. ``losses`` is the ``(runs,)`` loss of the last step.
  """
  step = single_step(apply, tx, zeroth_order)

  def one_run(params, state, lr, xs, ys, idx):
    updates, state, loss = step(params, state, xs[idx], ys[idx])
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    return optax.apply_updates(params, updates), state, loss

  if batching == "vmap":
    vstep = jax.vmap(one_run)
  elif batching == "map":
    vstep = lambda *args: jax.lax.map(lambda a: one_run(*a), args)
  else:
    raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")

  def chunk(params, states, lrs, xs, ys, idx):
    def body(carry, idx_t):
      p, s, _ = carry
      p, s, loss = vstep(p, s, lrs, xs, ys, idx_t)
      return (p, s, loss), None

    init_loss = jnp.zeros(lrs.shape, jnp.float32)
    (params, states, loss), _ = jax.lax.scan(body, (params, states, init_loss), idx)
    return params, states, loss

  return jax.jit(chunk, donate_argnums=(0, 1))


def make_evaluate(apply):
  """Jitted ``(params, test_x, test_y) -> (runs,)`` test accuracy, vmapped over runs."""

  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(apply(params, x), -1) == y)

  return jax.jit(jax.vmap(accuracy))


def _max_rel(a, b) -> float:
  """max |a - b| / max |b| over all leaves."""
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
  return diff / max(scale, 1e-30)


def check_method(method: Method, apply, data: SeedData) -> dict:
  """Checks the two properties the vmapped runs rely on (see the module docstring).

  Returns:
    ``{"linearity": max relative difference of lr * update(lr = 1) from
    update(lr) at the method's default lr, "seed": max absolute
    difference of the parameters after 3 steps of the seed-0 update function
    from the seed-1 initial state against the seed-1 preset}``.
  """
  params = jax.tree.map(jnp.asarray, data.params)
  idx = data.order[:3]
  batches = [(data.train_x[i], data.train_y[i]) for i in idx]
  unit = method.make(1.0)
  step_unit = jax.jit(single_step(apply, unit.tx, unit.zeroth_order))
  state = unit.tx.init(params)
  updates_unit, _, _ = step_unit(params, state, *batches[0])
  lr = method.default_lr
  real = method.make(lr)
  updates, _, _ = jax.jit(single_step(apply, real.tx, real.zeroth_order))(
    params, real.tx.init(params), *batches[0]
  )
  linearity = _max_rel(jax.tree.map(lambda u: lr * u, updates_unit), updates)
  # The seed-0 update function from the seed-1 initial state against the seed-1 preset.
  other = method.make(1.0, seed=1)
  step_other = jax.jit(single_step(apply, other.tx, other.zeroth_order))
  p_a = p_b = params
  s_a = s_b = other.tx.init(params)
  for images, labels in batches:
    u_a, s_a, _ = step_unit(p_a, s_a, images, labels)
    u_b, s_b, _ = step_other(p_b, s_b, images, labels)
    p_a, p_b = optax.apply_updates(p_a, u_a), optax.apply_updates(p_b, u_b)
  seed_diff = max(
    float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b))
  )
  # And the two seeds' initial states really differ (else the check above is vacuous).
  s0, s1 = unit.tx.init(params), other.tx.init(params)
  keys_differ = any(
    not np.array_equal(np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1))
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
  )
  return {"linearity": linearity, "seed": seed_diff, "seed_keys_differ": keys_differ}


# --------------------------------------------------------------------------- runs


def run_method(
  method: Method,
  apply,
  seeds: Sequence[SeedData],
  lrs: Sequence[float],
  budget: int,
  eval_every: int,
  log,
  batching: str = "vmap",
  cache: dict | None = None,
) -> dict:
  """Trains ``method`` at each of ``lrs`` on every seed; returns the curves.

  The runs of one learning rate, one per seed, are trained together (see
  `make_chunk`); every learning rate reuses one compiled program, kept in
  ``cache`` (pass the same dict for the same method, seeds, budget and
  batching), so a grid extension compiles nothing.

  Returns:
    ``{"forwards": (evals,), "test": (lrs, seeds, evals), "validation": (lrs,
    seeds, evals), "final_loss": (lrs, seeds), "forwards_per_step", "steps",
    "compile_seconds", "run_seconds"}`` (accuracies on the test and
    validation splits).
  """
  cache = {} if cache is None else cache
  unit = method.make(1.0)
  fps = unit.forwards_per_step
  per_chunk = max(1, eval_every // fps)  # so evals never fall later than multiples of eval_every
  # Whole chunks only (one compiled program): the budget is rounded down to them.
  steps = max(1, budget // (per_chunk * fps)) * per_chunk
  of_seeds = lambda field: jnp.asarray(np.stack([getattr(d, field) for d in seeds]))
  xs, ys = of_seeds("train_x"), of_seeds("train_y")
  splits = {"test": (of_seeds("test_x"), of_seeds("test_y"))}
  splits["validation"] = (of_seeds("val_x"), of_seeds("val_y"))
  order = np.stack([d.order[:steps] for d in seeds], axis=1)  # (steps, seeds, batch)
  fresh_params = lambda: stack([jax.tree.map(jnp.asarray, d.params) for d in seeds])
  seed_ids = jnp.asarray([d.seed for d in seeds], jnp.int32)
  compile_start = time.perf_counter()
  if "init" not in cache:
    # One compiled program for every seed's initial state (each seed unbatched under
    # lax.map): initialising eagerly, seed by seed, took up to 30 s per seed (ZO-MOPI).
    init_one = lambda a: method.make(1.0, seed=a[0]).tx.init(a[1])
    cache["init"] = jax.jit(lambda ids, params: jax.lax.map(init_one, (ids, params)))
  fresh_states = lambda: cache["init"](seed_ids, fresh_params())
  if "chunk" not in cache:
    chunk = make_chunk(apply, unit.tx, unit.zeroth_order, batching)
    lr_array = jnp.zeros((len(seeds),), jnp.float32)
    first = jnp.asarray(order[:per_chunk])
    cache["chunk"] = chunk.lower(fresh_params(), fresh_states(), lr_array, xs, ys, first).compile()
    cache["evaluate"] = make_evaluate(apply)
  compile_seconds = time.perf_counter() - compile_start
  compiled, evaluate = cache["chunk"], cache["evaluate"]

  def accuracies(params) -> dict:
    return {k: np.asarray(evaluate(params, x, y)) for k, (x, y) in splits.items()}

  start = time.perf_counter()
  curves, losses = [], []
  for lr in lrs:
    params, states = fresh_params(), fresh_states()
    lr_array = jnp.full((len(seeds),), lr, jnp.float32)
    lr_curves = [accuracies(params)]
    for done in range(per_chunk, steps + 1, per_chunk):
      idx = jnp.asarray(order[done - per_chunk : done])
      params, states, loss = compiled(params, states, lr_array, xs, ys, idx)
      lr_curves.append(accuracies(params))
      log(
        f"  {method.label:<16s} lr {lr:<9.4g} {done * fps:>6d}/{steps * fps} fwd  "
        f"{time.perf_counter() - start:6.1f} s  mean val acc "
        f"{lr_curves[-1]['validation'].mean():.3f}"
      )
    curves.append({k: np.stack([c[k] for c in lr_curves], axis=-1) for k in splits})
    losses.append(np.asarray(loss))
  return {
    "forwards": np.arange(0, steps + 1, per_chunk) * fps,
    **{k: np.stack([c[k] for c in curves]) for k in splits},
    "final_loss": np.stack(losses),
    "forwards_per_step": fps,
    "steps": steps,
    "compile_seconds": compile_seconds,
    "run_seconds": time.perf_counter() - start,
  }


def merge_runs(runs: dict, new: dict, front: bool) -> dict:
  """``runs`` with the learning rates of ``new`` (same method, budget) added first or last."""
  out = dict(runs)
  for key in ("test", "validation", "final_loss"):
    parts = (new[key], runs[key]) if front else (runs[key], new[key])
    out[key] = np.concatenate(parts, axis=0)
  out["compile_seconds"] = runs["compile_seconds"] + new["compile_seconds"]
  out["run_seconds"] = runs["run_seconds"] + new["run_seconds"]
  return out


def tune_method(
  method: Method,
  apply,
  seeds: Sequence[SeedData],
  budget: int,
  args: argparse.Namespace,
  batching: str,
  log,
) -> tuple[dict, list[float], list[dict]]:
  """Runs ``method``'s grid and extends it while the validation choice sits at an edge.

  Returns:
    ``(runs, lrs, history)``: `run_method`'s result over the final grid
    ``lrs`` (ascending), and one ``{"lrs", "chosen_lr", "at_edge"}`` entry per
    grid tried.
  """
  lrs = [float(f"{method.default_lr * f:.4g}") for f in args.lr_factors]
  cache = {}
  run = lambda grid: run_method(
    method, apply, seeds, grid, budget, args.eval_every, log, batching, cache
  )
  runs = run(lrs)
  history = []
  while True:
    best, edge = stats.select_learning_rate(lrs, runs["validation"][:, :, -1])
    history.append({"lrs": list(lrs), "chosen_lr": lrs[best], "at_edge": edge})
    if not edge or len(history) > args.max_extensions or len(lrs) < 2:
      return runs, lrs, history
    lrs_next = stats.extend_grid(lrs, best, args.lr_extend_factor)
    front = best == 0
    new_lr = lrs_next[0] if front else lrs_next[-1]
    new_lr = float(f"{new_lr:.4g}")
    log(f"  {method.label}: chosen lr {lrs[best]:.4g} is the grid's edge; adding {new_lr:.4g}")
    runs = merge_runs(runs, run([new_lr]), front)
    lrs = [new_lr, *lrs] if front else [*lrs, new_lr]


def step_times(methods: Sequence[Method], apply, data: SeedData, repeats: int) -> dict:
  """Median seconds of one single-run jitted step of each method, timed in alternation."""
  params = jax.tree.map(jnp.asarray, data.params)
  idx = data.order[0]
  batch = (jnp.asarray(data.train_x[idx]), jnp.asarray(data.train_y[idx]))
  loss = lambda p, b: cross_entropy(apply, p, *b)
  fns = {}
  for m in methods:
    opt = m.make(m.default_lr)
    fns[m.label] = Stepper(opt.tx, params, loss, batch, zeroth_order=opt.zeroth_order)
  return common.interleaved_medians(fns, repeats, warmup=3)


# --------------------------------------------------------------------------- report


def _interval(estimate_low_high: tuple[float, float, float]) -> dict:
  mean, low, high = estimate_low_high
  return {"mean": mean, "low": low, "high": high}


def _finite_or_none(array: np.ndarray) -> list:
  """Nested lists of ``array`` with NaN and inf as None (JSON has neither)."""
  return np.where(np.isfinite(array), array, None).tolist()


def _by_lr(lrs: Sequence[float], final: np.ndarray, loss: np.ndarray) -> list[dict]:
  """Per learning rate: mean, min and max over seeds of ``final`` and the diverged seeds."""
  return [
    {
      "lr": lr,
      "mean": float(final[i].mean()),
      "min": float(final[i].min()),
      "max": float(final[i].max()),
      "diverged_seeds": int(np.sum(~np.isfinite(loss[i]))),
    }
    for i, lr in enumerate(lrs)
  ]


def run_settings(args: argparse.Namespace, method: Method, batching: str) -> dict:
  """Every setting that shapes ``method``'s runs (what `common.read_checkpoint` must match)."""
  keys = (
    "seeds",
    "lr_factors",
    "lr_extend_factor",
    "max_extensions",
    "val_fraction",
    "forward_budget",
    "fo_budget",
    "eval_every",
    "batch_size",
    "pretrain_steps",
  )
  return {
    **{k: getattr(args, k) for k in keys},
    "method": method.label,
    "optimizer": method.name,
    "knobs": method.knobs,
    "batching": batching,
    "jax": jax.__version__,
  }


def method_row(
  method: Method, runs: dict, lrs: list[float], history: list[dict], step_s: float
) -> dict:
  """A method's grid, its choice on validation and every run's curves (no statistics yet)."""
  best = lrs.index(history[-1]["chosen_lr"])
  return {
    "method": method.label,
    "optimizer": method.name,
    "overrides": dict(method.overrides),
    "knobs": method.knobs,
    "forwards_per_step": runs["forwards_per_step"],
    "steps": runs["steps"],
    "step_ms": 1e3 * step_s,
    "batching": runs["batching"],
    "compile_seconds": runs["compile_seconds"],
    "vmapped_run_seconds": runs["run_seconds"],
    "lrs": list(lrs),
    "lr_history": history,
    "extensions": len(history) - 1,
    "chosen_lr": lrs[best],
    "chosen_index": best,
    "at_edge": history[-1]["at_edge"],
    "validation_final_by_lr": _by_lr(lrs, runs["validation"][:, :, -1], runs["final_loss"]),
    "test_final_by_lr": _by_lr(lrs, runs["test"][:, :, -1], runs["final_loss"]),
    "forwards": runs["forwards"].tolist(),
    # [lrs][seeds][evals], every run, so that the tables can be recomputed.
    "test_curves": runs["test"].tolist(),
    "validation_curves": runs["validation"].tolist(),
    "final_loss": _finite_or_none(runs["final_loss"]),
  }


def chosen_curves(row: dict) -> np.ndarray:
  """``(seeds, evals)`` test accuracy at the chosen learning rate."""
  return np.asarray(row["test_curves"][row["chosen_index"]])


def compare(rows: list[dict], budget: int, resamples: int = RESAMPLES) -> float:
  """Adds each row's statistics at its chosen learning rate; returns the target (MeZO's final).

  Per row: ``at_budget`` (test accuracy at each of `BUDGET_FRACTIONS` of
  ``budget``), ``auc`` (mean accuracy over the run), each ``{"mean", "low",
  "high", "vs_mezo": paired difference}``; ``to_target`` (forwards to MeZO's
  final mean test accuracy, `comparison_stats.forwards_to_target`, plus
  ``seconds``, ``ratio`` and ``time_ratio`` to MeZO's point estimates);
  ``seeds_reaching`` (seeds whose own curve reaches the target); and the
  pointwise bootstrap band of the mean curve for the plot.
  """
  ref = next(r for r in rows if r["method"] == "mezo")
  ref_curves = chosen_curves(ref)
  target = float(ref_curves[:, -1].mean())
  ref_auc = stats.area_under_curve(ref["forwards"], ref_curves)
  for row in rows:
    forwards, curves = np.asarray(row["forwards"]), chosen_curves(row)
    ci = lambda v: _interval(stats.bootstrap_ci(v, level=LEVEL, resamples=resamples))
    diff = lambda a, b: _interval(stats.paired_difference(a, b, LEVEL, resamples))
    row["at_budget"] = []
    for fraction in BUDGET_FRACTIONS:
      b = int(fraction * budget)
      acc = stats.accuracy_at(forwards, curves, b)
      ref_acc = stats.accuracy_at(ref["forwards"], ref_curves, b)
      row["at_budget"].append(
        {"fraction": fraction, "forwards": b, **ci(acc), "vs_mezo": diff(acc, ref_acc)}
      )
    auc = stats.area_under_curve(forwards, curves)
    row["auc"] = {**ci(auc), "vs_mezo": diff(auc, ref_auc)}
    row["final_mean"] = float(curves[:, -1].mean())
    reach = stats.forwards_to_target(forwards, curves, target, LEVEL, resamples)
    to_seconds = lambda f: (
      None if f is None else f / row["forwards_per_step"] * row["step_ms"] / 1e3
    )
    reach["seconds"] = {k: to_seconds(reach[k]) for k in ("point", "low", "high")}
    row["to_target"] = reach
    row["seeds_reaching"] = int(np.sum(np.any(curves >= target - stats.REACH_TOLERANCE, axis=1)))
    band = [stats.bootstrap_ci(curves[:, j], resamples=2000) for j in range(len(forwards))]
    row["curve_mean"], row["curve_low"], row["curve_high"] = (list(x) for x in zip(*band))
  ref_reach = ref["to_target"]
  for row in rows:
    reach = row["to_target"]
    ok = reach["point"] is not None and ref_reach["point"]
    reach["ratio"] = reach["point"] / ref_reach["point"] if ok else None
    reach["time_ratio"] = reach["seconds"]["point"] / ref_reach["seconds"]["point"] if ok else None
  return target


def targets(rows: list[dict]) -> list[dict]:
  """The issue's target (best zojax method <= 25% of MeZO's forwards) and ZO-Muon's own."""
  zo = [r for r in rows if r["optimizer"] in optimizers.ZEROTH_ORDER and r["method"] != "mezo"]
  out = []
  reached = [r for r in zo if r["to_target"]["ratio"] is not None]
  ratio = lambda r: r["to_target"]["ratio"]
  if zo:
    best = min(reached, key=ratio) if reached else None
    out.append(
      {
        "what": "best zojax method forwards to MeZO's final accuracy / MeZO's"
        + (f" ({best['method']})" if best else " (none reaches it)"),
        "value": ratio(best) if best else math.inf,
        "limit": ZO_MUON_TARGET,
      }
    )
  for r in zo:
    if r["optimizer"] == "zo_muon":
      out.append(
        {
          "what": f"{r['method']} forwards to MeZO's final accuracy / MeZO's",
          "value": ratio(r) if ratio(r) is not None else math.inf,
          "limit": ZO_MUON_TARGET,
        }
      )
  for t in out:
    t["met"] = t["value"] <= t["limit"]
  return out


def plot(rows: list[dict], target: float, path: str) -> None:
  """Accuracy against forwards and against estimated seconds, mean and 95% band over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
  for row in rows:
    forwards = np.asarray(row["forwards"])
    seconds = forwards / row["forwards_per_step"] * row["step_ms"] / 1e3
    style = "--" if row["optimizer"] in optimizers.FIRST_ORDER else "-"
    for ax, x in zip(axes, (forwards, seconds)):
      (line,) = ax.plot(
        x, row["curve_mean"], style, label=f"{row['method']} (lr {row['chosen_lr']:.3g})"
      )
      ax.fill_between(x, row["curve_low"], row["curve_high"], color=line.get_color(), alpha=0.15)
  for ax in axes:
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"MeZO final mean {target:.3f}")
    ax.set_ylabel("test accuracy (10 digits)")
    ax.grid(alpha=0.3)
  axes[0].set_xlabel("forward passes (Adam: steps; its backward passes are not counted)")
  axes[1].set_xlabel("estimated seconds (steps x median single-run step time)")
  seeds = len(rows[0]["test_curves"][0])
  axes[0].set_title(
    f"equal forwards: mean over {seeds} seeds at the validation-chosen lr, 95% band"
  )
  axes[1].set_title("equal wall clock (same runs)")
  axes[0].legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _ci(d: dict, signed: bool = False) -> str:
  """``mean [low, high]``, with ``*`` when a signed interval excludes 0."""
  f = "+.3f" if signed else ".3f"
  mark = "*" if signed and (d["low"] > 0 or d["high"] < 0) else ""
  return f"{d['mean']:{f}} [{d['low']:{f}}, {d['high']:{f}}]{mark}"


def _fmt_opt(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def print_tables(rows: list[dict], target: float, checks: list[dict]) -> None:
  """Prints the learning-rate choice, accuracy and differences, forwards to target, targets."""
  seeds = len(rows[0]["test_curves"][0])
  print(
    "\nlearning rate chosen on validation: final validation accuracy, mean over seeds (* chosen)"
  )
  grid = []
  for row in rows:
    cells = {"method": row["method"], "ext": row["extensions"]}
    cells["edge"] = "EDGE" if row["at_edge"] else ""
    for i, f in enumerate(row["validation_final_by_lr"]):
      mark = "*" if i == row["chosen_index"] else " "
      div = f" {f['diverged_seeds']}nan" if f["diverged_seeds"] else ""
      cells[f"lr{i}"] = f"{f['lr']:.3g}: {f['mean']:.3f}{mark}{div}"
    grid.append(cells)
  width = max(len(r["lrs"]) for r in rows)
  columns = [("method", "method", "s"), ("ext", "ext", "d"), ("edge", "edge", "s")]
  print(common.format_table(grid, columns + [(f"lr{i}", f"lr {i}", "s") for i in range(width)]))

  budgets = [b["forwards"] for b in rows[0]["at_budget"]]
  print(
    f"\ntest accuracy at the chosen lr: mean [95% bootstrap interval] over {seeds} seeds; "
    "AUC = mean accuracy over the run"
  )
  acc, diff = [], []
  for row in rows:
    a = {"method": row["method"], "lr": row["chosen_lr"], "auc": _ci(row["auc"])}
    d = {"method": row["method"], "auc": _ci(row["auc"]["vs_mezo"], True)}
    for i, b in enumerate(row["at_budget"]):
      a[f"b{i}"], d[f"b{i}"] = _ci(b), _ci(b["vs_mezo"], True)
    acc.append(a)
    diff.append(d)
  heads = [(f"b{i}", f"@{b} fwd", "s") for i, b in enumerate(budgets)] + [("auc", "AUC", "s")]
  print(common.format_table(acc, [("method", "method", "s"), ("lr", "lr", ".3g")] + heads))
  print("\npaired difference to MeZO (method - MeZO, same seeds; * interval excludes 0)")
  print(common.format_table(diff, [("method", "method", "s")] + heads))

  print(
    f"\nforwards to MeZO's final mean test accuracy {target:.4f}: first eval of the seed-mean "
    "curve at or above it, [95% bootstrap interval; - high = not reached by enough resamples]"
  )
  table = []
  for row in rows:
    t = row["to_target"]
    table.append(
      {
        "method": row["method"],
        "fps": row["forwards_per_step"],
        "step_ms": row["step_ms"],
        "fwd": f"{_fmt_opt(t['point'], 'd')} [{_fmt_opt(t['low'], 'd')}, "
        f"{_fmt_opt(t['high'], 'd')}]",
        "reached": t["reached_fraction"],
        "fr": _fmt_opt(t["ratio"], ".3f"),
        "sec": _fmt_opt(t["seconds"]["point"], ".2f"),
        "tr": _fmt_opt(t["time_ratio"], ".3f"),
        "seeds": f"{row['seeds_reaching']}/{seeds}",
      }
    )
  print(
    common.format_table(
      table,
      [
        ("method", "method", "s"),
        ("fps", "fwd/step", "d"),
        ("step_ms", "step ms", ".2f"),
        ("fwd", "fwd to target [interval]", "s"),
        ("reached", "resamples reach", ".2f"),
        ("fr", "/ MeZO", "s"),
        ("sec", "s to target", "s"),
        ("tr", "/ MeZO", "s"),
        ("seeds", "seeds reach", "s"),
      ],
    )
  )
  print(
    f"(ZO-Muon paper: {PAPER['queries']:.1%} of MeZO's queries, about {PAPER['time']:.0%} of its"
    " time; seconds = steps x single-run median step time; ratios are of point estimates)"
  )
  for t in checks:
    verdict = "met" if t["met"] else "MISSED"
    print(f"target: {t['what']}: {t['value']:.3f} <= {t['limit']}: {verdict}")


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark, prints its tables, writes JSON and PNG (with ``--out-dir``).

  Returns:
    The result dict (also written as ``query_efficiency.json``).
  """
  args = parse_args(argv)
  wall_start = time.perf_counter()
  commit = common.commit()  # the code this process runs (HEAD may move while it does)
  log = lambda msg: print(msg, flush=True)
  methods = [Method(n, n) for n in args.methods] + args.variants
  methods = [with_mopi_refresh(m, args.zo_mopi_refresh) for m in methods]
  labels = [m.label for m in methods]
  if len(set(labels)) != len(labels):
    raise SystemExit(f"error: duplicate method labels {labels}")
  if len(args.seeds) < 10 and not args.quick:
    log(f"warning: {len(args.seeds)} seeds; the intervals want >= 10")
  max_steps = max(
    (args.fo_budget if m.name in optimizers.FIRST_ORDER else args.forward_budget) for m in methods
  )  # an upper bound on any method's steps
  log(f"pretraining ({args.pretrain_steps} Adam steps on digits 0-4) for seeds {args.seeds}")
  data = [prepare_seed(s, args, max_steps, log) for s in args.seeds]
  model = model_lib.VisionTransformer(model_lib.get_config(MODEL), NUM_CLASSES)
  apply = model_lib.make_logits(model)

  checks = {}
  if args.checks:
    log("checks: lr * update(lr=1) == update(lr); seed-0 update from a seed-1 state == seed 1")
  else:
    log("checks skipped (--quick or --no-checks); --checks verifies linearity and seeding")
  for m in methods if args.checks else ():
    checks[m.label] = check_method(m, apply, data[0])
    c = checks[m.label]
    ok = c["linearity"] < 1e-5 and c["seed"] == 0.0
    c["ok"] = ok
    log(
      f"  {m.label:<16s} linearity max rel diff {c['linearity']:.1e}, seed max diff "
      f"{c['seed']:.1e} (keys differ: {c['seed_keys_differ']}): {'ok' if ok else 'FAILED'}"
    )
    if not ok:
      raise RuntimeError(f"{m.label}: the vmapped runs would not match the preset ({c})")

  log(f"timing single-run steps ({args.timing_repeats} interleaved rounds)")
  seconds = step_times(methods, apply, data[0], args.timing_repeats)
  for m in methods:
    log(f"  {m.label:<16s} {1e3 * seconds[m.label]:.2f} ms/step")

  rows = []
  for m in methods:
    budget = args.fo_budget if m.name in optimizers.FIRST_ORDER else args.forward_budget
    batching = args.batching
    if batching == "auto":
      batching = "map" if m.name in MAP_METHODS else "vmap"
    settings = run_settings(args, m, batching)
    saved = common.read_checkpoint(args.resume_dir, m.label, settings)
    if saved is not None:
      # The runs are reused; the step time is this process's, measured beside the others'.
      rows.append({**saved, "step_ms": 1e3 * seconds[m.label]})
      log(f"{m.label}: runs read from {args.resume_dir} (commit {saved.get('commit')})")
      continue
    log(f"{m.label}: seeds {args.seeds}, {budget} forwards, runs batched by {batching}")
    runs, lrs, history = tune_method(m, apply, data, budget, args, batching, log)
    runs["batching"] = batching
    rows.append(method_row(m, runs, lrs, history, seconds[m.label]))
    rows[-1]["commit"] = commit
    common.write_checkpoint(args.resume_dir, m.label, settings, rows[-1])
    log(
      f"  {m.label}: chose lr {history[-1]['chosen_lr']:.4g} of {lrs}"
      + (" (at the grid's edge)" if history[-1]["at_edge"] else "")
      + f"; compile {runs['compile_seconds']:.1f} s, runs {runs['run_seconds']:.1f} s"
    )

  target = compare(rows, args.forward_budget)
  target_checks = targets(rows)
  print_tables(rows, target, target_checks)
  result = {
    "config": {k: v for k, v in vars(args).items() if k != "variants"},
    "task": {
      "model": MODEL,
      "num_params": model_lib.num_params(data[0].params),
      "num_train": int(len(data[0].train_y)),
      "num_validation": int(len(data[0].val_y)),
      "num_test": int(len(data[0].test_y)),
      "pretrain_accuracy": {str(s): d.pretrain_accuracy for s, d in zip(args.seeds, data)},
    },
    "seeds": list(args.seeds),
    "statistics": {"level": LEVEL, "resamples": RESAMPLES, "bootstrap": "percentile, over seeds"},
    "mezo_final_mean": target,
    "rows": rows,
    "targets": target_checks,
    "checks": checks,
    "commits": sorted({str(r.get("commit")) for r in rows}),  # more than one after a resume
    "paper": PAPER,
    "total_seconds": time.perf_counter() - wall_start,
    "environment": common.environment(),
  }
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(result, os.path.join(args.out_dir, "query_efficiency.json"))
    plot(rows, target, os.path.join(args.out_dir, "query_efficiency.png"))
    log(f"wrote {args.out_dir}/query_efficiency.json and .png")
  log(f"total {result['total_seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main()
