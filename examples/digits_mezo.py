"""Fine-tune a pretrained MLP on scikit-learn's digits with MeZO (forward passes only).

The program has two stages:

1. *Pretraining* (first order). A small flax MLP is trained with `optax.adam`
   and `jax.grad` on part of the task only: the training images of digits
   0-4, with a 5-way head.
2. *Zeroth-order fine-tuning*. The pretrained body is kept, the head is
   replaced by a fresh 10-way `Dense` layer initialised to zeros, and the
   whole network is fine-tuned on the full 10-class training split with
   `zojax.mezo`, which estimates the gradient from two forward passes per
   query and never calls `jax.grad`.

Test accuracy on the full 10-class test split is printed before fine-tuning
(the zero head predicts one class everywhere, so this is chance level) and
after. The data set ships with scikit-learn (`sklearn.datasets.load_digits`),
so nothing is downloaded.

Each jitted call runs ``--chunk`` ZO steps in a `jax.lax.scan`, with the
parameter and optimizer-state buffers donated; the loss on the progress bar is
read from the optimizer state, so logging costs no extra forward pass. All
randomness (split, initialisation, batches, directions) derives from
``--seed``.

Run ``python examples/digits_mezo.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax

NUM_CLASSES = 10
PRETRAIN_CLASSES = 5  # pretraining sees digits 0 .. PRETRAIN_CLASSES - 1 only


class MLP(nn.Module):
  """``64 -> hidden -> hidden -> num_classes`` perceptron with GELU activations.

  The last layer is named ``head`` so that it can be swapped for fine-tuning.
  """

  num_classes: int
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, name="dense_0")(x))
    x = nn.gelu(nn.Dense(self.hidden, name="dense_1")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def load_data(seed: int, test_fraction: float = 0.25):
  """Loads digits, scales pixels to [0, 1] and makes a stratified split.

  Args:
    seed: seed of the `numpy.random.Generator` that shuffles each class.
    test_fraction: share of every class held out for testing.

  Returns:
    ``(x_train, y_train, x_test, y_test)`` as NumPy arrays (float32 / int32).
  """
  from sklearn.datasets import load_digits  # examples-only dependency

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = int(round(test_fraction * idx.size))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  train_idx = rng.permutation(np.concatenate(train_idx))
  test_idx = np.sort(np.concatenate(test_idx))
  return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def cross_entropy(model: nn.Module, params, x, y) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` with ``params`` on ``(x, y)``."""
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model: nn.Module, params, x, y) -> float:
  """Top-1 accuracy of ``model`` with ``params`` on ``(x, y)``."""
  logits = jax.jit(model.apply)({"params": params}, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def sample_batch(key, x, y, batch_size: int):
  """Draws ``batch_size`` examples uniformly with replacement."""
  idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
  return x[idx], y[idx]


def pretrain(key, x, y, *, steps: int, batch_size: int, learning_rate: float):
  """First-order pretraining with `optax.adam` on the examples given.

  Returns:
    The parameters of an ``MLP(PRETRAIN_CLASSES)``.
  """
  model = MLP(PRETRAIN_CLASSES)
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, x[:1])["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train(params, opt_state):
    def step(carry, t):
      params, opt_state = carry
      xb, yb = sample_batch(jax.random.fold_in(data_key, t), x, y, batch_size)
      grads = jax.grad(cross_entropy, argnums=1)(model, params, xb, yb)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
    return params, opt_state

  params, _ = train(params, opt_state)
  return params


def with_zero_head(body_params, num_classes: int):
  """Keeps the body of ``body_params`` and adds a zero ``head`` with ``num_classes`` outputs."""
  params = dict(body_params)
  hidden = body_params["head"]["kernel"].shape[0]
  params["head"] = {
    "kernel": jnp.zeros((hidden, num_classes), jnp.float32),
    "bias": jnp.zeros((num_classes,), jnp.float32),
  }
  return params


def make_zo_train_chunk(model, tx, data_key, x, y, *, batch_size: int, length: int):
  """Returns a jitted function running ``length`` ZO steps in one `lax.scan`.

  The function maps ``(params, opt_state, start)`` to ``(params, opt_state)``;
  ``start`` is the index of the first step (it selects the batches), and the
  ``params`` and ``opt_state`` buffers are donated.
  """

  def step(carry, t):
    params, opt_state = carry
    xb, yb = sample_batch(jax.random.fold_in(data_key, t), x, y, batch_size)
    updates, opt_state = tx.update(
      None, opt_state, params, value_fn=lambda p: cross_entropy(model, p, xb, yb)
    )
    return (optax.apply_updates(params, updates), opt_state), None

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_chunk(params, opt_state, start):
    carry, _ = jax.lax.scan(step, (params, opt_state), start + jnp.arange(length))
    return carry

  return train_chunk


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses the command line (``argv`` None reads `sys.argv`)."""
  parser = argparse.ArgumentParser(
    description=(
      "Pretrain a small MLP with Adam on digits 0-4, swap in a zero 10-way head, "
      "then fine-tune all weights on the 10 digit classes with zeroth-order MeZO "
      "(zojax.mezo), printing test accuracy before and after."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--steps", type=int, default=20000, help="MeZO fine-tuning steps (one batch each)."
  )
  parser.add_argument("--lr", type=float, default=7e-4, help="MeZO (ZO-SGD) learning rate.")
  parser.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation scale epsilon.")
  parser.add_argument(
    "--batch-size", type=int, default=64, help="examples per step (pretraining and fine-tuning)."
  )
  parser.add_argument(
    "--num-queries",
    type=int,
    default=1,
    help="random directions per MeZO step; a step costs 2 * num_queries forward passes.",
  )
  parser.add_argument(
    "--pretrain-steps",
    type=int,
    default=300,
    help="first-order Adam steps on digits 0-4 before fine-tuning.",
  )
  parser.add_argument(
    "--pretrain-lr", type=float, default=1e-3, help="Adam learning rate for pretraining."
  )
  parser.add_argument(
    "--chunk",
    type=int,
    default=500,
    help="MeZO steps per jitted call (lax.scan length); the progress bar updates per chunk.",
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="seed for the data split, init, batches and directions."
  )
  parser.add_argument(
    "--json", metavar="PATH", default=None, help="also write the summary as JSON to PATH."
  )
  parser.add_argument(
    "--quiet", action="store_true", help="print nothing (no progress bar, no summary)."
  )
  args = parser.parse_args(argv)
  for name in ("steps", "batch_size", "num_queries", "chunk"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.pretrain_steps < 0:
    parser.error("--pretrain-steps must be >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs pretraining and MeZO fine-tuning; returns (and prints) the summary.

  Args:
    argv: command-line arguments without the program name; None reads
      `sys.argv`.

  Returns:
    A dict with the accuracies before/after, the forward passes and the wall
    time of fine-tuning, and the settings used.
  """
  args = parse_args(argv)
  log = (lambda *a: None) if args.quiet else print

  x_train, y_train, x_test, y_test = load_data(args.seed)
  pre_key, zo_key, data_key = jax.random.split(jax.random.key(args.seed), 3)

  # Stage 1: first-order pretraining on part of the task (digits 0-4).
  sub = y_train < PRETRAIN_CLASSES
  sub_test = y_test < PRETRAIN_CLASSES
  t0 = time.perf_counter()
  body = pretrain(
    pre_key,
    jnp.asarray(x_train[sub]),
    jnp.asarray(y_train[sub]),
    steps=args.pretrain_steps,
    batch_size=args.batch_size,
    learning_rate=args.pretrain_lr,
  )
  pretrain_acc = accuracy(MLP(PRETRAIN_CLASSES), body, x_test[sub_test], y_test[sub_test])
  pretrain_seconds = time.perf_counter() - t0
  log(
    f"pretrained (Adam, {args.pretrain_steps} steps, digits 0-{PRETRAIN_CLASSES - 1}): "
    f"test accuracy on digits 0-{PRETRAIN_CLASSES - 1} = {pretrain_acc:.4f}"
  )

  # Stage 2: fresh zero head for 10 classes, zeroth-order fine-tuning of everything.
  model = MLP(NUM_CLASSES)
  params = with_zero_head(body, NUM_CLASSES)
  acc_before = accuracy(model, params, x_test, y_test)
  log(f"before MeZO (pretrained body + zero 10-way head): test accuracy = {acc_before:.4f}")

  tx = zojax.mezo(args.lr, eps=args.eps, num_queries=args.num_queries, seed=zo_key)
  opt_state = tx.init(params)
  xj, yj = jnp.asarray(x_train), jnp.asarray(y_train)
  chunk = min(args.chunk, args.steps)
  lengths = [chunk] * (args.steps // chunk) + ([args.steps % chunk] if args.steps % chunk else [])

  # Compile ahead of time, so that the reported wall time is the training itself.
  t0 = time.perf_counter()
  compiled = {}
  for length in sorted(set(lengths)):
    fn = make_zo_train_chunk(model, tx, data_key, xj, yj, batch_size=args.batch_size, length=length)
    compiled[length] = fn.lower(params, opt_state, jnp.int32(0)).compile()
  compile_seconds = time.perf_counter() - t0

  progress = None
  if not args.quiet:
    from tqdm.auto import tqdm  # examples-only dependency

    progress = tqdm(total=args.steps, desc="MeZO", unit="step", file=sys.stdout)
  start = 0
  t0 = time.perf_counter()
  for length in lengths:
    params, opt_state = compiled[length](params, opt_state, jnp.int32(start))
    start += length
    if progress is not None:
      loss = float(optax.tree_utils.tree_get(opt_state, "loss"))
      progress.set_postfix(loss=f"{loss:.4f}")
      progress.update(length)
  jax.block_until_ready(params)
  finetune_seconds = time.perf_counter() - t0
  if progress is not None:
    progress.close()

  acc_after = accuracy(model, params, x_test, y_test)
  forwards = args.steps * zojax.forwards_per_step(args.num_queries)
  summary = {
    "accuracy_before": acc_before,
    "accuracy_after": acc_after,
    "pretrain_accuracy": pretrain_acc,
    "final_loss": float(optax.tree_utils.tree_get(opt_state, "loss")),
    "forward_passes": forwards,
    "finetune_seconds": finetune_seconds,
    "compile_seconds": compile_seconds,
    "pretrain_seconds": pretrain_seconds,
    "num_train": int(x_train.shape[0]),
    "num_test": int(x_test.shape[0]),
    "num_params": int(sum(p.size for p in jax.tree.leaves(params))),
    "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
  }
  log(f"after MeZO ({args.steps} steps):  test accuracy = {acc_after:.4f}")
  log(
    f"forward passes: {forwards} ({args.steps} steps x "
    f"{zojax.forwards_per_step(args.num_queries)} per step, batch {args.batch_size})"
  )
  log(f"fine-tuning wall time: {finetune_seconds:.2f} s (+ {compile_seconds:.2f} s compile)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
    log(f"wrote {args.json}")
  return summary


if __name__ == "__main__":
  main()
