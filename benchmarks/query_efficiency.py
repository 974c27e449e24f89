"""Query efficiency: test accuracy against forward passes, every method on the digits ViT task.

The task is the ``--dataset digits`` fine-tuning of ``examples/vit_cifar100``:
a small ViT (the ``digits`` config, 69k parameters, 8x8 grey images) is
pretrained with first-order Adam on digits 0-4 (`train.pretrain_digits`, once
per seed, reused by every method), its head is replaced by a zero 10-way head,
and the whole network is fine-tuned on all ten digits (1347 training and 450
test images, a per-class split seeded by the seed). Methods: MeZO, ZO-Muon,
ZO-MOPI, LOZO, SubZero and MeZO-BCD (the example's `optimizers.make`
settings), with first-order Adam as the ceiling.

What is measured, per method:

* an equal-sized learning-rate grid (the method's `CENTRE` learning rate
  times ``--lr-factors``), each learning rate with ``--seeds`` seeds;
* the test accuracy on the full test split every ``--eval-every`` forward
  passes (rounded to whole steps), up to ``--forward-budget`` forward passes
  (rounded down to whole evaluation intervals; ``--fo-budget`` for Adam,
  whose backward pass is not counted as a forward: it is the ceiling, not a
  forward-pass competitor);
* the best learning rate (highest mean final accuracy over seeds; chosen on
  the test split, there is no validation split), its accuracy curve (mean,
  min and max over seeds), and the forward passes and estimated seconds the
  mean curve needs to first reach MeZO's final mean accuracy (None when it
  never does), with the ratio to MeZO's own figure under the same rule
  (MeZO's first eval point at or above its final mean). The ZO-Muon paper
  reports 24.7% of MeZO's queries and about 70% of its run time; the target
  here is the best zojax method at <= 25% of MeZO's forwards.

How it runs fast. Each method's step is compiled once and every (learning
rate, seed) run of that method is trained together under `jax.vmap` over
stacked parameters, optimizer states and batches, ``eval_every`` steps at a
time inside one `jax.lax.scan`. (ZO-Muon, ZO-MOPI, SubZero and MeZO-BCD
use `jax.lax.map` over the runs instead, see ``--batching`` and
`MAP_METHODS`. The two are not interchangeable bit for bit: under
`jax.lax.map` every run computes exactly what it computes alone, while
vmap's batched arithmetic differs in the last bits (3e-8 after one ZO-Muon
step), which thousands of ZO steps amplify into runs that differ by
several accuracy points; only the statistics over seeds agree.)

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
permutation of the training split every epoch, 64 images a step, the
remainder of every epoch dropped (what `data.train_dataset` does without
augmentation), and images scaled to [-1, 1]. Every run of a seed sees the
same batch at the same step, whatever its method or learning rate.

Wall time. Vmapped runs give no per-run time, so each method's single-run
jitted step (batch 64, buffers donated) is timed separately, all methods in
alternation (`common.interleaved_medians`); seconds to reach a target are
steps to reach it times that median step time. Like every figure here, they
are only comparable within one run of the benchmark.

Settings. Fine-tuning runs at batch 16 from 300 Adam pretraining steps; each
method's grid is its `CENTRE` learning rate times x0.5, x1 and x2 (centres
from coarse sweeps at this batch size over x1/32 to x2 of the example's
batch-64 defaults: at batch 16 MeZO, LOZO and ZO-MOPI diverge at those
defaults). The full setting (the default, about 35 minutes on 2 CPU cores)
gives every ZO run 10000 forward passes and Adam 1000 steps; ``--quick``, for
`benchmarks.all` (about 6 minutes), gives 1000 forward passes (Adam 250
steps). The quick figures are early-training figures: within 2000 forwards
every method is still near the accuracy the pretrained features give for
digits 0-4 (about 0.5), so they say little about the query efficiency the
issue is about; the full run does.

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
from benchmarks.step_cost import Stepper
from examples.vit_cifar100 import data as data_lib
from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers
from examples.vit_cifar100 import train as train_lib

METHODS = ("mezo", "zo_muon", "zo_mopi", "lozo", "subzero", "mezo_bcd", "fo-adam")
KNOBS = ("num_queries", "rank", "refresh_every", "eps")
ZO_MUON_TARGET = 0.25  # the target: <= 25% of MeZO's forwards
PAPER = {"queries": 0.247, "time": 0.70}  # ZO-Muon paper, relative to MeZO
MODEL = "digits"
IMAGE_SIZE = 8
NUM_CLASSES = 10
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
  "lr_factors": [0.5, 1.0, 2.0],
  "forward_budget": 10000,
  "fo_budget": 1000,
  "eval_every": 500,
  "batch_size": 16,
  "pretrain_steps": 300,
  "timing_repeats": 10,
}
QUICK = {
  "lr_factors": [0.5, 1.0, 2.0],
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
    overrides: keyword arguments for `optimizers.make` (num_queries, rank,
      refresh_every, eps).
  """

  label: str
  name: str
  overrides: tuple[tuple[str, Any], ...] = ()

  def make(self, learning_rate: float, seed: int = 0) -> optimizers.Optimizer:
    """The example's optimizer at ``learning_rate`` with these overrides."""
    knobs = {"rank": train_lib.DEFAULT_RANK["digits"].get(self.name), **dict(self.overrides)}
    return optimizers.make(self.name, learning_rate, seed=seed, **knobs)

  @property
  def default_lr(self) -> float:
    """The centre of this method's learning-rate grid (`CENTRE`)."""
    return CENTRE[self.name]


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
  short = {"num_queries": "q", "rank": "r", "refresh_every": "T", "eps": "eps"}
  label = name + "".join(f" {short[k]}{v:g}" for k, v in overrides)
  return Method(label, name, tuple(overrides))


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
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (>= 3)")
  p.add_argument(
    "--lr-factors",
    nargs="+",
    type=float,
    default=None,
    help="the grid: each method's CENTRE learning rate times these "
    f"(default {FULL['lr_factors']}, quick {QUICK['lr_factors']})",
  )
  p.add_argument(
    "--forward-budget",
    type=int,
    default=None,
    help=f"forward passes per ZO run (default {FULL['forward_budget']}, quick "
    f"{QUICK['forward_budget']})",
  )
  p.add_argument(
    "--fo-budget",
    type=int,
    default=None,
    help=f"forward passes (= steps) per Adam run (default {FULL['fo_budget']}, quick "
    f"{QUICK['fo_budget']})",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=None,
    help=f"forward passes between evals (default {FULL['eval_every']}, quick "
    f"{QUICK['eval_every']})",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help=f"fine-tuning batch size (default {FULL['batch_size']}, quick {QUICK['batch_size']})",
  )
  p.add_argument(
    "--pretrain-steps",
    type=int,
    default=None,
    help=f"Adam steps on digits 0-4, batch 64 (default {FULL['pretrain_steps']}, quick "
    f"{QUICK['pretrain_steps']})",
  )
  p.add_argument(
    "--timing-repeats",
    type=int,
    default=None,
    help=f"rounds of the step timing (default {FULL['timing_repeats']}, quick "
    f"{QUICK['timing_repeats']})",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="the quick settings above (a smoke-scale run, about 6 minutes on 2 CPU cores)",
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
  for name in ("forward_budget", "fo_budget", "eval_every", "batch_size", "pretrain_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  return args


# --------------------------------------------------------------------------- task


@dataclasses.dataclass
class SeedData:
  """One seed's split (images in [-1, 1]), pretrained parameters and batch order."""

  train_x: np.ndarray
  train_y: np.ndarray
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


def prepare_seed(seed: int, args: argparse.Namespace, steps: int, log) -> SeedData:
  """Pretrains (Adam on digits 0-4) and loads the split of ``seed``."""
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
  return SeedData(
    scale(train.images),
    np.asarray(train.labels, np.int32),
    scale(test.images),
    np.asarray(test.labels, np.int32),
    jax.device_get(params),
    accuracy,
    batch_order(len(train), args.batch_size, steps, seed),
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
) -> dict:
  """Trains every (learning rate, seed) run of ``method`` together; returns its curves.

  Returns:
    ``{"forwards": (evals,), "accuracy": (lrs, seeds, evals), "final_loss":
    (lrs, seeds), "forwards_per_step", "steps", "compile_seconds",
    "run_seconds"}``.
  """
  unit = method.make(1.0)
  fps = unit.forwards_per_step
  per_chunk = max(1, round(eval_every / fps))
  # Whole chunks only (one compiled program): the budget is rounded down to them.
  steps = max(1, budget // (per_chunk * fps)) * per_chunk
  n_lr, n_seed = len(lrs), len(seeds)
  # Run r is (learning rate r // n_seed, seed r % n_seed).
  run_seed = [seeds[r % n_seed] for r in range(n_lr * n_seed)]
  params = stack([jax.tree.map(jnp.asarray, d.params) for d in run_seed])
  init_states = [
    method.make(1.0, seed=s).tx.init(jax.tree.map(jnp.asarray, seeds[s].params))
    for s in range(n_seed)
  ]
  states = stack([init_states[r % n_seed] for r in range(n_lr * n_seed)])
  lr_array = jnp.asarray(np.repeat(np.asarray(lrs, np.float32), n_seed))
  xs = jnp.asarray(np.stack([d.train_x for d in run_seed]))
  ys = jnp.asarray(np.stack([d.train_y for d in run_seed]))
  test_x = jnp.asarray(np.stack([d.test_x for d in run_seed]))
  test_y = jnp.asarray(np.stack([d.test_y for d in run_seed]))
  order = np.stack([d.order[:steps] for d in run_seed], axis=1)  # (steps, runs, batch)
  chunk = make_chunk(apply, unit.tx, unit.zeroth_order, batching)
  evaluate = make_evaluate(apply)

  forwards = [0]
  accuracy = [np.asarray(evaluate(params, test_x, test_y))]
  compile_start = time.perf_counter()
  compiled = chunk.lower(params, states, lr_array, xs, ys, jnp.asarray(order[:per_chunk])).compile()
  compile_seconds = time.perf_counter() - compile_start
  start = time.perf_counter()
  done = 0
  loss = None
  while done < steps:
    n = per_chunk
    params, states, loss = compiled(
      params, states, lr_array, xs, ys, jnp.asarray(order[done : done + n])
    )
    done += n
    forwards.append(done * fps)
    acc = np.asarray(evaluate(params, test_x, test_y))
    accuracy.append(acc)
    by_lr = acc.reshape(n_lr, n_seed).mean(axis=1)
    log(
      f"  {method.label:<16s} {done * fps:>6d}/{steps * fps} fwd  "
      f"{time.perf_counter() - start:6.1f} s  mean acc by lr: "
      + " ".join(f"{a:.3f}" for a in by_lr)
    )
  run_seconds = time.perf_counter() - start
  acc = np.stack(accuracy, axis=-1).reshape(n_lr, n_seed, -1)
  return {
    "forwards": np.asarray(forwards),
    "accuracy": acc,
    "final_loss": np.asarray(loss).reshape(n_lr, n_seed),
    "forwards_per_step": fps,
    "steps": steps,
    "compile_seconds": compile_seconds,
    "run_seconds": run_seconds,
  }


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


def first_reach(forwards: np.ndarray, curve: np.ndarray, target: float) -> int | None:
  """The first forwards at which ``curve >= target`` (None if never)."""
  hits = np.flatnonzero(curve >= target - 1e-9)
  return int(forwards[hits[0]]) if hits.size else None


def summarize(
  methods: Sequence[Method], runs: dict, lrs: dict, seconds: dict, seeds: Sequence[int]
) -> list[dict]:
  """Per method: best learning rate, its curve, final accuracy and cost to reach MeZO's final."""
  rows = []
  for m in methods:
    r = runs[m.label]
    final = r["accuracy"][:, :, -1]  # (lrs, seeds)
    best = int(np.argmax(final.mean(axis=1)))
    curve = r["accuracy"][best]  # (seeds, evals)
    rows.append(
      {
        "method": m.label,
        "optimizer": m.name,
        "overrides": dict(m.overrides),
        "forwards_per_step": r["forwards_per_step"],
        "steps": r["steps"],
        "step_ms": 1e3 * seconds[m.label],
        "best_lr": lrs[m.label][best],
        "best_lr_index": best,
        "lr_edge": best in (0, len(lrs[m.label]) - 1),
        "lrs": list(lrs[m.label]),
        "final_by_lr": [
          {
            "lr": lr,
            "mean": float(final[i].mean()),
            "min": float(final[i].min()),
            "max": float(final[i].max()),
            "diverged_seeds": int(np.sum(~np.isfinite(r["final_loss"][i]))),
          }
          for i, lr in enumerate(lrs[m.label])
        ],
        "forwards": r["forwards"].tolist(),
        "curve_mean": curve.mean(axis=0).tolist(),
        "curve_min": curve.min(axis=0).tolist(),
        "curve_max": curve.max(axis=0).tolist(),
        "curve_by_seed": {str(s): curve[i].tolist() for i, s in enumerate(seeds)},
        "final_mean": float(curve[:, -1].mean()),
        "final_min": float(curve[:, -1].min()),
        "final_max": float(curve[:, -1].max()),
        "batching": r["batching"],
        "compile_seconds": r["compile_seconds"],
        "vmapped_run_seconds": r["run_seconds"],
      }
    )
  by = {row["method"]: row for row in rows}
  target = by["mezo"]["final_mean"]
  for row in rows:
    fwd = first_reach(np.asarray(row["forwards"]), np.asarray(row["curve_mean"]), target)
    row["forwards_to_mezo"] = fwd
    row["seconds_to_mezo"] = (
      None if fwd is None else fwd / row["forwards_per_step"] * row["step_ms"] / 1e3
    )
    seed_hits = [
      first_reach(np.asarray(row["forwards"]), np.asarray(c), target)
      for c in row["curve_by_seed"].values()
    ]
    row["seeds_reaching_mezo"] = sum(h is not None for h in seed_hits)
  ref = by["mezo"]
  for row in rows:
    for key, out in (("forwards_to_mezo", "forwards_ratio"), ("seconds_to_mezo", "time_ratio")):
      ok = row[key] is not None and ref[key]
      row[out] = row[key] / ref[key] if ok else None
  return rows


def targets(rows: list[dict]) -> list[dict]:
  """The issue's target (best zojax method <= 25% of MeZO's forwards) and ZO-Muon's own."""
  zo = [r for r in rows if r["optimizer"] in optimizers.ZEROTH_ORDER and r["method"] != "mezo"]
  out = []
  reached = [r for r in zo if r["forwards_ratio"] is not None]
  if zo:
    best = min(reached, key=lambda r: r["forwards_ratio"]) if reached else None
    out.append(
      {
        "what": "best zojax method forwards to MeZO's final accuracy / MeZO's"
        + (f" ({best['method']})" if best else " (none reaches it)"),
        "value": best["forwards_ratio"] if best else math.inf,
        "limit": ZO_MUON_TARGET,
      }
    )
  for r in zo:
    if r["optimizer"] == "zo_muon":
      out.append(
        {
          "what": f"{r['method']} forwards to MeZO's final accuracy / MeZO's",
          "value": r["forwards_ratio"] if r["forwards_ratio"] is not None else math.inf,
          "limit": ZO_MUON_TARGET,
        }
      )
  for t in out:
    t["met"] = t["value"] <= t["limit"]
  return out


def plot(rows: list[dict], target: float, path: str) -> None:
  """Accuracy against forwards, one line per method at its best lr, min-max band over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
  for row in rows:
    x = np.asarray(row["forwards"])
    style = "--" if row["optimizer"] == "fo-adam" else "-"
    (line,) = ax.plot(
      x, row["curve_mean"], style, label=f"{row['method']} (lr {row['best_lr']:.3g})"
    )
    ax.fill_between(x, row["curve_min"], row["curve_max"], color=line.get_color(), alpha=0.15)
  ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"MeZO final mean {target:.3f}")
  ax.set_xlabel("forward passes (Adam: steps; its backward passes are not counted)")
  ax.set_ylabel("test accuracy (10 digits)")
  ax.set_title("digits ViT fine-tuning: mean over seeds at the best lr, min-max band")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt_opt(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def print_tables(rows: list[dict], checks: dict) -> None:
  """Prints the learning-rate grid, the summary and the targets."""
  print("\nfinal test accuracy by learning rate (mean [min, max] over seeds; * best)")
  grid = []
  for row in rows:
    cells = {"method": row["method"]}
    for i, f in enumerate(row["final_by_lr"]):
      mark = "*" if i == row["best_lr_index"] else " "
      div = f" {f['diverged_seeds']}nan" if f["diverged_seeds"] else ""
      cells[f"lr{i}"] = f"{f['lr']:.2g}: {f['mean']:.3f} [{f['min']:.2f},{f['max']:.2f}]{mark}{div}"
    grid.append(cells)
  width = max(len(r["final_by_lr"]) for r in rows)
  print(
    common.format_table(
      grid, [("method", "method", "s")] + [(f"lr{i}", f"lr {i}", "s") for i in range(width)]
    )
  )
  target = next(r for r in rows if r["method"] == "mezo")["final_mean"]
  print(f"\nat the best lr; target = MeZO's final mean accuracy {target:.4f}")
  table = []
  for row in rows:
    table.append(
      {
        **row,
        "final": f"{row['final_mean']:.3f} [{row['final_min']:.3f}, {row['final_max']:.3f}]",
        "fwd": _fmt_opt(row["forwards_to_mezo"], "d"),
        "sec": _fmt_opt(row["seconds_to_mezo"], ".2f"),
        "fr": _fmt_opt(row["forwards_ratio"], ".3f"),
        "tr": _fmt_opt(row["time_ratio"], ".3f"),
        "seeds": f"{row['seeds_reaching_mezo']}/{len(row['curve_by_seed'])}",
        "edge": "edge" if row["lr_edge"] else "",
      }
    )
  print(
    common.format_table(
      table,
      [
        ("method", "method", "s"),
        ("best_lr", "best lr", ".3g"),
        ("edge", "grid", "s"),
        ("forwards_per_step", "fwd/step", "d"),
        ("step_ms", "step ms", ".2f"),
        ("final", "final acc [min, max]", "s"),
        ("fwd", "fwd to MeZO", "s"),
        ("fr", "/ MeZO", "s"),
        ("sec", "s to MeZO", "s"),
        ("tr", "/ MeZO", "s"),
        ("seeds", "seeds reach", "s"),
      ],
    )
  )
  print(
    f"(ZO-Muon paper: {PAPER['queries']:.1%} of MeZO's queries, about {PAPER['time']:.0%} of its"
    " time; seconds = steps x single-run median step time)"
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
  log = lambda msg: print(msg, flush=True)
  methods = [Method(n, n) for n in args.methods] + args.variants
  labels = [m.label for m in methods]
  if len(set(labels)) != len(labels):
    raise SystemExit(f"error: duplicate method labels {labels}")
  if len(args.seeds) < 3:
    log(f"warning: {len(args.seeds)} seeds; the issue asks for >= 3")
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

  runs, lrs = {}, {}
  for m in methods:
    lrs[m.label] = [float(f"{m.default_lr * f:.4g}") for f in args.lr_factors]
    budget = args.fo_budget if m.name in optimizers.FIRST_ORDER else args.forward_budget
    batching = args.batching
    if batching == "auto":
      batching = "map" if m.name in MAP_METHODS else "vmap"
    log(
      f"{m.label}: lrs {lrs[m.label]}, seeds {args.seeds}, {budget} forwards, runs batched by "
      f"{batching}"
    )
    runs[m.label] = run_method(m, apply, data, lrs[m.label], budget, args.eval_every, log, batching)
    runs[m.label]["batching"] = batching
    log(
      f"  {m.label}: compile {runs[m.label]['compile_seconds']:.1f} s, "
      f"{len(lrs[m.label]) * len(args.seeds)} runs in {runs[m.label]['run_seconds']:.1f} s"
    )

  rows = summarize(methods, runs, lrs, seconds, args.seeds)
  target_checks = targets(rows)
  print_tables(rows, target_checks)
  result = {
    "config": {k: v for k, v in vars(args).items() if k != "variants"},
    "task": {
      "model": MODEL,
      "num_params": model_lib.num_params(data[0].params),
      "num_train": int(len(data[0].train_y)),
      "num_test": int(len(data[0].test_y)),
      "pretrain_accuracy": {str(s): d.pretrain_accuracy for s, d in zip(args.seeds, data)},
    },
    "mezo_final_mean": next(r for r in rows if r["method"] == "mezo")["final_mean"],
    "rows": rows,
    "targets": target_checks,
    "checks": checks,
    "paper": PAPER,
    "total_seconds": time.perf_counter() - wall_start,
    "environment": common.environment(),
  }
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(result, os.path.join(args.out_dir, "query_efficiency.json"))
    plot(rows, result["mezo_final_mean"], os.path.join(args.out_dir, "query_efficiency.png"))
    log(f"wrote {args.out_dir}/query_efficiency.json and .png")
  log(f"total {result['total_seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main()
