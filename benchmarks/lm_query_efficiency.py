"""Query efficiency on the LM task: test accuracy against forward passes, every ZO method.

The main method comparison. The task is the embedded default of
``examples/lm_prompt``: a 2-layer, 64-wide OPT-style decoder (141,568
parameters) pretrained with Adam as a causal LM on generated text
(`pretrain.pretrain`, the example's settings), fine-tuned on the prompt task
``synthetic-sst2`` (SST-2's template ``<sentence> It was`` and label words
`` terrible`` / `` great``; the loss is the cross-entropy over the label
words' logits at the last prompt token, the prediction their argmax, as in
`train.make_loss`). Methods: MeZO, ZO-Muon, ZO-MOPI, LOZO, LOZO-M, SubZero
and MeZO-BCD, with the example's settings (`optimizers.make`: the decoder's
matrix view `model.matrix_dimension_numbers`, MeZO-BCD's per-layer blocks
`optimizers.layer_blocks`, ranks from `train.DEFAULTS["embedded"]`) except
ZO-MOPI, which gets the released code's recipe: ``k = r / 2`` and a random
(not momentum-anchored) basis at each refresh, every 50 steps (``run.py``'s
interval). (The digits ViT comparison,
`benchmarks.query_efficiency`, is the second one.)

Seeds and pairing. The model is pretrained once (seed 0, 2000 Adam steps,
about a minute on 2 CPU cores), and that checkpoint is every run's initial
model, as the papers fine-tune one pretrained checkpoint with several seeds.
Seed ``s`` draws MeZO's split from the generated pools (`data.
split_train_dev_test`: 1000 training and 500 validation examples from the
training pool, 1000 test examples from the validation pool), the order of
the training batches (`train.batch_rows`, 16 examples a step) and the
optimizer's key. At a seed every method and every learning rate sees the same
initial model and the same batch at the same step.

Learning rates are chosen on the validation examples (never on the test
examples): each method starts from a grid around the example's default
(`train.DEFAULTS`) times ``--lr-factors``; the learning rate with the best
mean validation accuracy at the end of the budget is picked
(`comparison_stats.select_learning_rate`), and while it sits at an edge of
the grid, the grid grows by one point beyond that edge (times or over
``--extend-factor``, `comparison_stats.extend_grid`) and only the new point
is run, at most ``--max-extensions`` times. The final grid and what was added
are recorded.

What is reported, per method at its chosen learning rate, all with 95%
bootstrap intervals over seeds (`benchmarks.comparison_stats`):

* test accuracy at fixed forward budgets (``--budget-fractions`` of
  ``--forward-budget``) and its paired difference to MeZO (same seeds);
* the area under the test accuracy against forwards curve, normalized by the
  forward span (a mean accuracy over the run), and its paired difference to
  MeZO;
* the forwards to reach the target (MeZO's final mean test accuracy), with
  an interval, the fraction of seeds that reach it, and the ratio of the
  point estimate to MeZO's own.

The PNG shows the mean test accuracy (with a bootstrap band) against forward
passes beside the same curves against estimated wall-clock time: steps times
the median single-run step time of the method, every method's jitted step
timed in alternation in this run (`benchmarks.query_efficiency.step_times`).
The JSON holds every per-seed test curve of every learning rate, the
validation scores and the statistics.

How it runs fast. As in `benchmarks.query_efficiency` (whose `make_chunk`,
`stack` and `step_times` this reuses): each method's step is compiled once,
every (learning rate, seed) run of the method is trained together under
`jax.vmap` (`jax.lax.map` for `query_efficiency.MAP_METHODS`), ``eval_every``
forwards at a time inside one `jax.lax.scan`, with the optimizer built at
learning rate 1 and each run's updates scaled by its learning rate (every
preset ends with its learning-rate scaling; `query_efficiency` checks this
numerically). A grid extension compiles the step once more, for the new
point's runs.

Sizes. The full setting (the default) gives every run 3600 forward passes,
evaluated every 450 (whole steps of every method at 2, 5 and 9 forwards a
step), with 10 seeds, a 3-point grid and up to 3 extensions: 210 runs of
3600 forwards before any extension, an estimated 30 minutes on 2 idle CPU
cores with one grid extension per method, up to about 45 if every grid grows
three times. (Scaled from the quick run's phases: about 3 ms a run-forward,
evaluations included, and 20 s a compile, while other jobs shared the cores;
by the CPU time it got, that run was about twice as slow as on idle cores.)
Compute is what bounds it: batching the runs saves little on the CPU (a MeZO
step of six vmapped runs took 9.2 ms a run against 10.3 ms alone, in one
measurement). So the full setting is early fine-tuning (the example's
defaults were chosen at 40,000 forwards, where MeZO lifts the zero-shot 0.71
to about 0.79), and differences of a point or two are what it resolves.
``--quick`` (for `benchmarks.all`, a smoke test) uses 2 seeds, a 2-point
grid without extension and 900 forward passes.

Resuming. With ``--resume-dir`` each method's runs are saved as soon as they
finish, and a later run with the same settings reads them back instead of
training again (`common.read_checkpoint`), so a full run can be split
across sittings; the step timing is measured afresh each time, every
method side by side, and the commit each method's runs came from is kept
(``commits``).

Example:
  python -m benchmarks.lm_query_efficiency --quick --out-dir /tmp/lmqe
  python -m benchmarks.lm_query_efficiency --methods mezo zo_muon --seeds 5 --out-dir /tmp/lmqe
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import zojax
from benchmarks import common
from benchmarks import comparison_stats as stats
from benchmarks import query_efficiency as qe
from examples.lm_prompt import data as data_lib
from examples.lm_prompt import model as model_lib
from examples.lm_prompt import optimizers, synthetic
from examples.lm_prompt import pretrain as pretrain_lib
from examples.lm_prompt import tasks as tasks_lib
from examples.lm_prompt import train as train_lib

METHODS = ("mezo", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero", "mezo_bcd")
REFERENCE = "mezo"
TASK = "synthetic-sst2"
PRETRAIN_SEED = 0  # the one checkpoint every run starts from
EPS = 1e-3  # the example's perturbation scale
# ZO-MOPI's basis refresh interval: the default of the released run.py. The README's 500 steps
# would never refresh within these budgets (400 ZO-MOPI steps in the full setting).
ZO_MOPI_REFRESH_EVERY = 50
# Settings of a full run and of --quick (flags given explicitly override either).
# Evaluations every 450 forwards land on whole steps of every method (2, 5 and 9 forwards a step).
FULL = {
  "seeds": 10,
  "lr_factors": [0.5, 1.0, 2.0],
  "max_extensions": 3,
  "forward_budget": 3600,
  "eval_every": 450,
  "timing_repeats": 10,
}
QUICK = {
  "seeds": 2,
  "lr_factors": [1.0, 2.0],
  "max_extensions": 0,
  "forward_budget": 900,
  "eval_every": 450,
  "timing_repeats": 5,
}


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer of the comparison with the example's LM settings.

  Attributes:
    name: an `optimizers.NAMES` entry (zeroth-order).
  """

  name: str

  @property
  def label(self) -> str:
    """The name printed and stored."""
    return self.name

  @property
  def rank(self) -> int | None:
    """The example's rank for the embedded model (None: the preset's)."""
    return train_lib.DEFAULTS["embedded"].get(self.name, {}).get("rank")

  @property
  def default_lr(self) -> float:
    """The example's learning rate for the embedded model: the grid's centre."""
    return train_lib.DEFAULTS["embedded"][self.name]["lr"]

  def make(self, learning_rate: float, seed: int = 0) -> optimizers.Optimizer:
    """The optimizer at ``learning_rate`` with key ``seed``.

    Every method is the example's `optimizers.make` but ZO-MOPI, built here
    as its released code runs it: ``k = r / 2`` (the README's 64 / 32) and a
    random basis (``anchored=False``) every `ZO_MOPI_REFRESH_EVERY` steps,
    with the example's matrix view, perturbation scale and 1-D learning rate
    (``lr / 100``).
    """
    if self.name != "zo_mopi":
      return optimizers.make(self.name, learning_rate, eps=EPS, rank=self.rank, seed=seed)
    rank = self.rank or zojax.presets.DEFAULTS["zo_mopi"]["rank"]
    tx = zojax.zo_mopi(
      learning_rate,
      rank=rank,
      k=max(1, rank // 2),
      anchored=False,
      refresh_every=ZO_MOPI_REFRESH_EVERY,
      eps=EPS,
      vector_learning_rate=learning_rate / 100,
      weight_dimension_numbers=model_lib.matrix_dimension_numbers,
      key=seed,
    )
    queries = zojax.presets.DEFAULTS["zo_mopi"]["num_queries"]
    return optimizers.Optimizer("zo_mopi", tx, zojax.forwards_per_step(queries, "one_sided"), True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows a flag's default unless it is None or a switch (their help says what happens)."""

  def _get_help_string(self, action):
    if action.default is None or isinstance(action.default, bool):
      return action.help
    return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (``argv`` None reads `sys.argv`)."""
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.lm_query_efficiency",
    description=__doc__.split("\n\n")[0],
    formatter_class=_HelpFormatter,
  )
  p.add_argument(
    "--methods", nargs="+", default=list(METHODS), help="optimizers to compare (with mezo)"
  )

  def setting(flag, kind, help_text, nargs=None):
    key = flag[2:].replace("-", "_")
    p.add_argument(
      flag,
      type=kind,
      nargs=nargs,
      default=None,
      help=f"{help_text} (default {FULL[key]}, quick {QUICK[key]})",
    )

  setting("--seeds", int, "paired seeds 0..N-1 (split, batch order, optimizer key); >= 2")
  setting("--lr-factors", float, "the initial grid: the example's learning rate times these", "+")
  setting("--max-extensions", int, "times the grid may grow past an edge the best lr sits on")
  setting("--forward-budget", int, "forward passes per run (rounded down to whole evaluations)")
  setting("--eval-every", int, "forward passes between test evaluations (whole steps)")
  setting("--timing-repeats", int, "interleaved rounds of the single-run step timing")
  p.add_argument(
    "--extend-factor", type=float, default=2.0, help="ratio of a grid extension to the edge"
  )
  p.add_argument(
    "--budget-fractions",
    nargs="+",
    type=float,
    default=[0.25, 0.5, 1.0],
    help="fixed forward budgets, as fractions of --forward-budget (rounded to evaluations)",
  )
  p.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch size (MeZO: 16)")
  p.add_argument("--num-train", type=int, default=1000, help="training examples per seed")
  p.add_argument(
    "--num-dev", type=int, default=500, help="validation examples per seed (from training pool)"
  )
  p.add_argument("--num-test", type=int, default=1000, help="test examples per seed")
  p.add_argument(
    "--pretrain-steps",
    type=int,
    default=pretrain_lib.PretrainSettings.steps,
    help="Adam steps of the one pretraining (the example's)",
  )
  p.add_argument(
    "--pretrained-cache",
    default=None,
    help="reuse (or save) the pretrained model in this .npz (the example's cache format)",
  )
  p.add_argument(
    "--batching",
    choices=["auto", "vmap", "map"],
    default="auto",
    help="how a method's runs share its step (auto: lax.map for "
    f"{', '.join(qe.MAP_METHODS)}, vmap for the rest)",
  )
  p.add_argument(
    "--quick", action="store_true", help="the quick settings (a few minutes on 2 CPU cores)"
  )
  p.add_argument("--out-dir", default=None, help="write lm_query_efficiency.json and .png here")
  p.add_argument(
    "--resume-dir",
    default=None,
    help="save each method's runs here as it finishes, and reuse the saved ones whose "
    "settings match (a stopped run resumes; the step timing is always re-measured)",
  )
  args = p.parse_args(argv)
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  unknown = sorted(set(args.methods) - set(optimizers.ZEROTH_ORDER))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(optimizers.ZEROTH_ORDER)}")
  if REFERENCE not in args.methods:
    p.error(f"--methods must include {REFERENCE} (the reference)")
  if args.seeds < 2:
    p.error("--seeds must be >= 2 (the intervals are over seeds)")
  for name in ("forward_budget", "eval_every", "batch_size", "num_train", "num_dev", "num_test"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.max_extensions < 0 or args.extend_factor <= 1:
    p.error("--max-extensions must be >= 0 and --extend-factor > 1")
  if args.max_extensions and len(set(args.lr_factors)) < 2:
    p.error("a grid that may grow needs >= 2 --lr-factors (one point is both edges)")
  if not all(0 < f <= 1 for f in args.budget_fractions):
    p.error("--budget-fractions must lie in (0, 1]")
  return args


# --------------------------------------------------------------------------- task


@dataclasses.dataclass
class Task:
  """The pretrained checkpoint and the encoded example pools.

  Attributes:
    config: the decoder's architecture.
    label_ids: ``(2,)`` token ids of the label words.
    params: the pretrained parameters (host arrays).
    pools: ``{"train": (x, y), "validation": (x, y)}``: every generated
      example of the pools, ``x`` the packed prompts (`pack`), ``y`` labels.
    description: facts for the JSON (sizes, pretraining loss and time).
  """

  config: model_lib.DecoderConfig
  label_ids: np.ndarray
  params: Any
  pools: dict
  description: dict


@dataclasses.dataclass
class SeedData:
  """One seed's split, batch order and (shared) initial parameters.

  ``train_x`` / ``train_y`` and ``order`` are named as in
  `benchmarks.query_efficiency` so that its `step_times` reads them.
  """

  seed: int
  params: Any
  train_x: np.ndarray
  train_y: np.ndarray
  dev_x: np.ndarray
  dev_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  order: np.ndarray  # (steps, batch) indices into the training examples


def pack(arrays: dict) -> np.ndarray:
  """Left-padded prompts as one int32 array ``(N, 2T)``: token ids, then the attention mask."""
  return np.concatenate([arrays["input_ids"], arrays["attention_mask"]], axis=1).astype(np.int32)


def make_apply(config: model_lib.DecoderConfig, label_ids: np.ndarray) -> Callable:
  """``(params, packed) -> (N, classes)`` label-word logits at each prompt's last token."""
  token_ids = jnp.asarray(label_ids, jnp.int32)

  def apply(params, x):
    length = x.shape[1] // 2
    last = jnp.full((x.shape[0],), length - 1, jnp.int32)  # left padding: the last column
    return model_lib.label_logits(params, config, x[:, :length], x[:, length:], last, token_ids)

  return apply


def prepare_task(
  pretrain_steps: int, cache: str | None, log: Callable[[str], None], *, max_length: int = 40
) -> Task:
  """Pretrains (or reads) the embedded model and encodes the example's generated pools.

  Args:
    pretrain_steps: Adam steps (`pretrain.PretrainSettings`, seed 0).
    cache: an ``.npz`` to read the pretrained model from or write it to.
    log: prints progress lines.
    max_length: the longest prompt (the example's 40 tokens).

  Returns:
    The `Task`.
  """
  tokenizer = pretrain_lib.build_tokenizer(PRETRAIN_SEED)
  config = pretrain_lib.embedded_config(tokenizer.get_vocab_size())
  settings = pretrain_lib.PretrainSettings(steps=pretrain_steps, seed=PRETRAIN_SEED)
  key = pretrain_lib.cache_key(config, settings)
  description = {"pretrain_steps": pretrain_steps, "pretrain_seed": PRETRAIN_SEED}
  if cache and os.path.exists(cache):
    params, extras = pretrain_lib.load_cache(cache, config, key)
    description["pretrain_loss"] = extras.get("loss")
    log(f"pretrained model read from {cache}")
  else:
    start = time.perf_counter()
    params, loss = pretrain_lib.pretrain(config, tokenizer, settings)
    description.update(pretrain_loss=loss, pretrain_seconds=time.perf_counter() - start)
    log(
      f"pretrained once ({pretrain_steps} Adam steps, seed {PRETRAIN_SEED}) in "
      f"{description['pretrain_seconds']:.0f} s: causal-LM loss {loss:.3f}"
    )
    if cache:
      pretrain_lib.save_cache(cache, params, key, {"loss": loss})
  task = tasks_lib.get_task(TASK)
  train_pool = synthetic.generate_task(
    train_lib.SYNTHETIC_TRAIN_SIZE, train_lib.SYNTHETIC_SPLIT_SEEDS["train"]
  )
  validation_pool = synthetic.generate_task(
    train_lib.SYNTHETIC_VALIDATION_SIZE, train_lib.SYNTHETIC_SPLIT_SEEDS["validation"]
  )
  arrays = tasks_lib.encode_batch(  # one call: one padded length for both pools
    task,
    tokenizer,
    [*train_pool, *validation_pool],
    max_length,
    synthetic.PAD_ID,
    bos_id=synthetic.BOS_ID,
    pad_to_multiple_of=train_lib.PAD_MULTIPLE,
  )
  x, y = pack(arrays), arrays["labels"].astype(np.int32)
  n = len(train_pool)
  description.update(
    num_params=model_lib.param_count(params), sequence_length=int(arrays["input_ids"].shape[1])
  )
  return Task(
    config,
    tasks_lib.label_token_ids(task, tokenizer),
    jax.device_get(params),
    {"train": (x[:n], y[:n]), "validation": (x[n:], y[n:])},
    description,
  )


def prepare_seed(
  task: Task, seed: int, steps: int, batch_size: int, num_train: int, num_dev: int, num_test: int
) -> SeedData:
  """Seed ``seed``'s MeZO split (train and validation from the training pool) and batch order.

  The split is `data.split_train_dev_test` of the example (test examples from
  the validation pool only), the order `train.batch_rows`, the parameters the
  one pretrained checkpoint.
  """
  train_x, train_y = task.pools["train"]
  pool_x, pool_y = task.pools["validation"]
  splits = data_lib.split_train_dev_test(
    np.arange(len(train_y)), np.arange(len(pool_y)), num_train, num_dev, num_test, seed
  )
  train, dev, test = (np.asarray(s, np.int64) for s in splits)
  order = np.stack([train_lib.batch_rows(t, len(train), batch_size, seed) for t in range(steps)])
  return SeedData(
    seed,
    task.params,
    train_x[train],
    train_y[train],
    train_x[dev],
    train_y[dev],
    pool_x[test],
    pool_y[test],
    order.astype(np.int32),
  )


def make_evaluate(apply) -> Callable:
  """Jitted ``(params, x, y) -> (runs,)`` accuracy, the runs one after another (`lax.map`).

  One run at a time keeps the activations to one run's examples (under vmap
  they would be every run's at once).
  """

  def accuracy(args):
    params, x, y = args
    return jnp.mean(jnp.argmax(apply(params, x), -1) == y)

  return jax.jit(lambda params, x, y: jax.lax.map(accuracy, (params, x, y)))


# --------------------------------------------------------------------------- runs


def run_grid(
  method: Method,
  apply,
  seeds: Sequence[SeedData],
  lrs: Sequence[float],
  budget: int,
  eval_every: int,
  batching: str,
  log: Callable[[str], None],
) -> dict:
  """Trains every (learning rate, seed) run of ``method`` together, with one compiled step.

  Args:
    method: the optimizer.
    apply: `make_apply`'s function.
    seeds: the seeds' data.
    lrs: learning rates.
    budget: forward passes per run (rounded down to whole evaluation chunks).
    eval_every: forward passes between test evaluations (rounded down to
      whole steps).
    batching: ``"vmap"`` or ``"map"`` (`query_efficiency.make_chunk`).
    log: prints a line per evaluation.

  Returns:
    ``{"forwards": (evals,), "test": (lrs, seeds, evals) test accuracy,
    "validation": (lrs, seeds) final validation accuracy, "final_loss":
    (lrs, seeds), "batches_sha": (lrs, seeds) SHA-1 of the batch indices each
    run trained on, "forwards_per_step", "steps", "compile_seconds",
    "run_seconds"}``.
  """
  unit = method.make(1.0)
  fps = unit.forwards_per_step
  per_chunk = max(1, eval_every // fps)  # whole steps, at most eval_every forwards
  steps = max(1, budget // (per_chunk * fps)) * per_chunk
  n_lr, n_seed = len(lrs), len(seeds)
  runs = [(i, s) for i in range(n_lr) for s in range(n_seed)]  # run r: lr r // n, seed r % n
  pick = lambda field: jnp.asarray(np.stack([getattr(seeds[s], field) for _, s in runs]))
  params = qe.stack([jax.tree.map(jnp.asarray, seeds[s].params) for _, s in runs])
  # Every seed's initial state from one compiled program (each seed unbatched under lax.map):
  # initialising eagerly compiled every op of every preset's init on its own, and a full run's
  # thousands of small programs exhausted the process's memory mappings (LLVM: "Cannot
  # allocate memory") after four methods.
  init_one = lambda a: method.make(1.0, seed=a[0]).tx.init(a[1])
  seed_ids = jnp.asarray([d.seed for d in seeds], jnp.int32)
  seed_params = qe.stack([jax.tree.map(jnp.asarray, d.params) for d in seeds])
  init = jax.jit(lambda ids, p: jax.lax.map(init_one, (ids, p)))(seed_ids, seed_params)
  states = jax.tree.map(lambda x: x[np.asarray([s for _, s in runs])], init)
  lr_array = jnp.asarray(np.repeat(np.asarray(lrs, np.float32), n_seed))
  xs, ys = pick("train_x"), pick("train_y")
  test_x, test_y = pick("test_x"), pick("test_y")
  order = np.stack([seeds[s].order[:steps] for _, s in runs], axis=1)  # (steps, runs, batch)
  digest = [
    hashlib.sha1(np.ascontiguousarray(order[:, r]).tobytes()).hexdigest() for r in range(len(runs))
  ]
  chunk = qe.make_chunk(apply, unit.tx, True, batching)
  evaluate = make_evaluate(apply)

  forwards, accuracy = [0], [np.asarray(evaluate(params, test_x, test_y))]
  start = time.perf_counter()
  compiled = chunk.lower(params, states, lr_array, xs, ys, jnp.asarray(order[:per_chunk])).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  done, loss = 0, None
  while done < steps:
    idx = jnp.asarray(order[done : done + per_chunk])
    params, states, loss = compiled(params, states, lr_array, xs, ys, idx)
    done += per_chunk
    forwards.append(done * fps)
    accuracy.append(np.asarray(evaluate(params, test_x, test_y)))
    by_lr = accuracy[-1].reshape(n_lr, n_seed).mean(axis=1)
    log(
      f"  {method.label:<9s} {done * fps:>6d}/{steps * fps} fwd {time.perf_counter() - start:6.1f}"
      " s  mean test acc by lr: " + " ".join(f"{a:.3f}" for a in by_lr)
    )
  run_seconds = time.perf_counter() - start
  validation = np.asarray(evaluate(params, pick("dev_x"), pick("dev_y")))
  return {
    "forwards": np.asarray(forwards),
    "test": np.stack(accuracy, axis=-1).reshape(n_lr, n_seed, -1),
    "validation": validation.reshape(n_lr, n_seed),
    "final_loss": np.asarray(loss).reshape(n_lr, n_seed),
    "batches_sha": np.asarray(digest).reshape(n_lr, n_seed),
    "forwards_per_step": fps,
    "steps": steps,
    "compile_seconds": compile_seconds,
    "run_seconds": run_seconds,
  }


ARRAYS = ("forwards", "test", "validation", "final_loss", "batches_sha")  # run_grid's arrays


def run_settings(args, method: Method, batching: str) -> dict:
  """Every setting that shapes ``method``'s runs (what `common.read_checkpoint` must match)."""
  keys = ("seeds", "lr_factors", "max_extensions", "forward_budget", "eval_every")
  keys += ("extend_factor", "batch_size", "num_train", "num_dev", "num_test", "pretrain_steps")
  return {
    **{k: getattr(args, k) for k in keys},
    "method": method.label,
    "rank": method.rank,
    "batching": batching,
    "jax": jax.__version__,
  }


def _merge(a: dict, lrs_a: list, b: dict, lrs_b: list) -> tuple[dict, list]:
  """Two grids' results as one, sorted by learning rate."""
  lrs = list(lrs_a) + list(lrs_b)
  order = np.argsort(lrs)
  merged = dict(a)
  for key in ("test", "validation", "final_loss", "batches_sha"):
    merged[key] = np.concatenate([a[key], b[key]])[order]
  for key in ("compile_seconds", "run_seconds"):
    merged[key] = a[key] + b[key]
  return merged, [lrs[i] for i in order]


def tune(
  method: Method,
  run: Callable[[list[float]], dict],
  factors: Sequence[float],
  max_extensions: int,
  extend_factor: float,
  log: Callable[[str], None] = print,
) -> dict:
  """Runs ``method``'s grid and picks its learning rate on the validation scores.

  The grid starts at the method's `default_lr` times ``factors``; while the
  best mean validation accuracy (`comparison_stats.select_learning_rate`) is
  at an edge, `comparison_stats.extend_grid` adds a point beyond it and only
  that point is run, at most ``max_extensions`` times.

  Args:
    method: the optimizer.
    run: ``lrs -> run_grid result`` for those learning rates.
    factors: the initial grid as multiples of the default learning rate.
    max_extensions: how many times the grid may grow.
    extend_factor: ratio of an added point to the edge it extends.
    log: prints progress lines.

  Returns:
    The merged `run_grid` result with ``lrs`` (the final grid, ascending),
    ``initial_lrs``, ``added_lrs``, ``selected`` (index into ``lrs``) and
    ``at_edge`` (the selected one is still at an edge).
  """
  lrs = sorted(float(f"{method.default_lr * f:.4g}") for f in factors)
  result = run(lrs)
  initial, added = list(lrs), []
  for attempt in range(max_extensions + 1):
    index, at_edge = stats.select_learning_rate(lrs, result["validation"])
    if not at_edge or attempt == max_extensions:
      break
    grown = stats.extend_grid(lrs, index, extend_factor)
    new = [float(f"{lr:.4g}") for lr in grown if not any(math.isclose(lr, o) for o in lrs)]
    if not new:
      break
    log(f"  {method.label}: best lr {lrs[index]:.3g} at the grid's edge; adding {new}")
    added += new
    result, lrs = _merge(result, lrs, run(new), new)
  index, at_edge = stats.select_learning_rate(lrs, result["validation"])
  return {
    **result,
    "lrs": lrs,
    "initial_lrs": initial,
    "added_lrs": added,
    "selected": int(index),
    "at_edge": bool(at_edge),
  }


# --------------------------------------------------------------------------- report


def fixed_budgets(budget: int, eval_every: int, fractions: Sequence[float]) -> list[int]:
  """Fractions of ``budget`` rounded to whole evaluation intervals (at least one), ascending.

  Rounding to evaluation points keeps a budget from silently meaning the
  evaluation before it (`comparison_stats.accuracy_at` takes the last point
  within the budget).
  """
  evals = max(1, budget // eval_every)
  return sorted({max(1, round(f * evals)) * eval_every for f in fractions})


def _interval(triple) -> dict:
  point, low, high = triple
  return {"point": float(point), "low": float(low), "high": float(high)}


def summarize(
  methods: Sequence[Method],
  runs: dict,
  seconds: dict,
  seeds: Sequence[int],
  budgets: Sequence[int],
) -> list[dict]:
  """Per method at its selected learning rate: accuracies, areas, forwards to MeZO's final.

  Args:
    methods: the methods (`REFERENCE` among them).
    runs: label -> `tune` result.
    seconds: label -> median single-run step seconds.
    seeds: the seed values, in the runs' order.
    budgets: fixed forward budgets for the accuracy comparison.

  Returns:
    One dict per method (JSON-able), with every per-seed curve of every
    learning rate.
  """
  ref = runs[REFERENCE]
  ref_forwards = ref["forwards"]
  ref_curves = ref["test"][ref["selected"]]
  # In float64, as `comparison_stats` averages curves: a float32 mean of the same
  # accuracies can sit above MeZO's own float64 mean curve, which would then never reach it.
  target = float(np.mean(ref_curves[:, -1], dtype=np.float64))
  ref_auc = stats.area_under_curve(ref_forwards, ref_curves)
  rows = []
  for m in methods:
    r = runs[m.label]
    forwards = r["forwards"]
    curves = r["test"][r["selected"]]  # (seeds, evals)
    at = []
    for b in budgets:
      acc = stats.accuracy_at(forwards, curves, b)
      diff = stats.paired_difference(acc, stats.accuracy_at(ref_forwards, ref_curves, b))
      at.append(
        {
          "budget": int(b),
          "by_seed": np.asarray(acc).tolist(),
          **_interval(stats.bootstrap_ci(acc)),
          "minus_mezo": _interval(diff),
        }
      )
    auc = stats.area_under_curve(forwards, curves)
    reach = stats.forwards_to_target(forwards, curves, target)
    step_s = seconds[m.label]
    rows.append(
      {
        "method": m.label,
        "forwards_per_step": r["forwards_per_step"],
        "steps": r["steps"],
        "step_ms": 1e3 * step_s,
        "lrs": r["lrs"],
        "initial_lrs": r["initial_lrs"],
        "added_lrs": r["added_lrs"],
        "selected_lr": r["lrs"][r["selected"]],
        "selected_index": r["selected"],
        "at_edge": r["at_edge"],
        "validation_by_lr": r["validation"].tolist(),
        "validation_mean_by_lr": r["validation"].mean(axis=1).tolist(),
        "test_final_mean_by_lr": r["test"][:, :, -1].mean(axis=1).tolist(),
        "diverged_by_lr": np.sum(~np.isfinite(r["final_loss"]), axis=1).tolist(),
        "batches_sha_by_lr": r["batches_sha"].tolist(),
        "forwards": forwards.tolist(),
        "seconds": (forwards / r["forwards_per_step"] * step_s).tolist(),
        "curves": {  # every per-seed test curve of every learning rate
          f"{lr:g}": {str(s): r["test"][i, j].tolist() for j, s in enumerate(seeds)}
          for i, lr in enumerate(r["lrs"])
        },
        "curve_mean": curves.mean(axis=0).tolist(),
        "accuracy_at": at,
        "auc": {
          "by_seed": np.asarray(auc).tolist(),
          **_interval(stats.bootstrap_ci(auc)),
          "minus_mezo": _interval(stats.paired_difference(auc, ref_auc)),
        },
        "to_target": {k: (None if v is None else float(v)) for k, v in reach.items()},
        "compile_seconds": r["compile_seconds"],
        "batched_run_seconds": r["run_seconds"],
        "batching": r["batching"],
      }
    )
  ref_point = rows[[m.label for m in methods].index(REFERENCE)]["to_target"]["point"]
  for row in rows:
    point = row["to_target"]["point"]
    ok = _finite(point) and _finite(ref_point) and ref_point > 0
    row["to_target"]["ratio_to_mezo"] = point / ref_point if ok else None
    row["to_target"]["target"] = target
  return rows


def _finite(value) -> bool:
  return value is not None and math.isfinite(value)


def _band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-point 95% bootstrap interval of the mean over seeds."""
  bounds = [stats.bootstrap_ci(c, resamples=1000)[1:] for c in curves.T]
  return np.asarray([b[0] for b in bounds]), np.asarray([b[1] for b in bounds])


def plot(rows: list[dict], path: str) -> None:
  """Mean test accuracy with a bootstrap band, against forwards and against estimated time."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True, constrained_layout=True)
  target = rows[0]["to_target"]["target"]
  for row in rows:
    curves = np.asarray(list(row["curves"][f"{row['selected_lr']:g}"].values()))
    low, high = _band(curves)
    for ax, key in zip(axes, ("forwards", "seconds")):
      x = np.asarray(row[key])
      (line,) = ax.plot(
        x, curves.mean(axis=0), label=f"{row['method']} (lr {row['selected_lr']:.3g})"
      )
      ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
  for ax, label in zip(axes, ("forward passes (equal queries)", "estimated seconds (equal time)")):
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"MeZO final mean {target:.3f}")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (synthetic-sst2)")
  axes[1].legend(fontsize=8)
  fig.suptitle(
    "LM prompt fine-tuning: mean over seeds at each method's validation-chosen lr, 95% bootstrap"
    " band; time = steps x median single-run step time"
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _ci(d: dict, fmt: str = ".3f") -> str:
  return f"{d['point']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def print_tables(rows: list[dict]) -> None:
  """Prints the grids and the comparison."""
  print("\nmean validation accuracy by learning rate (* chosen; + added past an edge)")
  for row in rows:
    cells = []
    for i, (lr, v) in enumerate(zip(row["lrs"], row["validation_mean_by_lr"])):
      added = "+" if lr in row["added_lrs"] else ""
      chosen = "*" if i == row["selected_index"] else ""
      cells.append(f"{lr:.3g}{added}: {v:.3f}{chosen}")
    edge = "  (still at an edge)" if row["at_edge"] else ""
    print(f"  {row['method']:<9s} " + "  ".join(cells) + edge)
  target = rows[0]["to_target"]["target"]
  print(
    f"\ntest accuracy at the chosen lr, mean [95% bootstrap CI over seeds]; target {target:.4f}"
  )
  table = []
  for row in rows:
    cells = {"method": row["method"], "lr": row["selected_lr"], "step_ms": row["step_ms"]}
    for a in row["accuracy_at"]:
      cells[f"at{a['budget']}"] = _ci(a)
      cells[f"d{a['budget']}"] = _ci(a["minus_mezo"], "+.3f")
    cells["auc"] = _ci(row["auc"])
    cells["dauc"] = _ci(row["auc"]["minus_mezo"], "+.3f")
    t = row["to_target"]
    fwd = lambda v: f"{v:.0f}" if _finite(v) else "-"
    cells["reach"] = (
      f"{fwd(t['point'])} [{fwd(t['low'])}, {fwd(t['high'])}] {t['reached_fraction']:.0%}"
    )
    cells["ratio"] = t["ratio_to_mezo"]
    table.append(cells)
  last = rows[0]["accuracy_at"]
  columns = [("method", "method", "s"), ("lr", "lr", ".3g"), ("step_ms", "step ms", ".2f")]
  for a in last:
    columns += [(f"at{a['budget']}", f"acc @{a['budget']}", "s")]
  columns += [(f"d{last[-1]['budget']}", "- MeZO (paired)", "s"), ("auc", "AUC", "s")]
  columns += [("dauc", "AUC - MeZO", "s"), ("reach", "fwd to target [CI] seeds", "s")]
  columns += [("ratio", "/ MeZO", ".2f")]
  print(common.format_table(table, columns))


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparison, prints its tables, writes JSON and PNG (with ``--out-dir``).

  Returns:
    The result dict (also written as ``lm_query_efficiency.json``).
  """
  args = parse_args(argv)
  wall_start = time.perf_counter()
  commit = common.commit()  # the code this process runs (HEAD may move while it does)
  log = lambda msg: print(msg, flush=True)
  methods = [Method(n) for n in dict.fromkeys([REFERENCE, *args.methods])]
  seeds = list(range(args.seeds))
  task = prepare_task(args.pretrain_steps, args.pretrained_cache, log)
  max_steps = args.forward_budget // 2 + args.eval_every  # the most steps any method takes
  data = [
    prepare_seed(task, s, max_steps, args.batch_size, args.num_train, args.num_dev, args.num_test)
    for s in seeds
  ]
  apply = make_apply(task.config, task.label_ids)
  evaluate = make_evaluate(apply)
  before = [
    float(evaluate(qe.stack([task.params]), d.test_x[None], d.test_y[None])[0]) for d in data
  ]
  log(f"zero-shot test accuracy by seed: {' '.join(f'{a:.3f}' for a in before)}")

  log(f"timing single-run steps ({args.timing_repeats} interleaved rounds)")
  seconds = qe.step_times(methods, apply, data[0], args.timing_repeats)
  for m in methods:
    log(f"  {m.label:<9s} {1e3 * seconds[m.label]:.2f} ms/step")

  runs = {}
  for m in methods:
    batching = args.batching
    if batching == "auto":
      batching = "map" if m.name in qe.MAP_METHODS else "vmap"
    settings = run_settings(args, m, batching)
    saved = common.read_checkpoint(args.resume_dir, m.label, settings)
    if saved is not None:
      runs[m.label] = {k: np.asarray(v) if k in ARRAYS else v for k, v in saved.items()}
      log(f"{m.label}: runs read from {args.resume_dir} (commit {saved.get('commit')})")
      continue
    log(f"{m.label}: seeds {seeds}, {args.forward_budget} forwards, runs batched by {batching}")

    def run(lrs, m=m, batching=batching):
      log(f"  {m.label}: lrs {lrs}")
      return run_grid(m, apply, data, lrs, args.forward_budget, args.eval_every, batching, log)

    runs[m.label] = tune(m, run, args.lr_factors, args.max_extensions, args.extend_factor, log)
    runs[m.label]["batching"] = batching
    runs[m.label]["commit"] = commit
    portable = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in runs[m.label].items()}
    common.write_checkpoint(args.resume_dir, m.label, settings, portable)
    log(
      f"  {m.label}: chose lr {runs[m.label]['lrs'][runs[m.label]['selected']]:.3g} on "
      f"validation; compile {runs[m.label]['compile_seconds']:.1f} s, runs "
      f"{runs[m.label]['run_seconds']:.1f} s"
    )

  budgets = fixed_budgets(args.forward_budget, args.eval_every, args.budget_fractions)
  rows = summarize(methods, runs, seconds, seeds, budgets)
  print_tables(rows)
  result = {
    "config": vars(args),
    "task": {
      "name": TASK,
      "model": "embedded OPT-style decoder, pretrained once",
      **task.description,
      "num_train": args.num_train,
      "num_validation": args.num_dev,
      "num_test": args.num_test,
      "zero_shot_test_accuracy": {str(s): a for s, a in zip(seeds, before)},
    },
    "seeds": seeds,
    "budgets": budgets,
    "target": rows[0]["to_target"]["target"],
    "rows": rows,
    "commits": sorted({str(r.get("commit")) for r in runs.values()}),  # several after a resume
    "total_seconds": time.perf_counter() - wall_start,
    "environment": common.environment(),
  }
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(result, os.path.join(args.out_dir, "lm_query_efficiency.json"))
    plot(rows, os.path.join(args.out_dir, "lm_query_efficiency.png"))
    log(f"wrote {args.out_dir}/lm_query_efficiency.json and .png")
  log(f"total {result['total_seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main()
