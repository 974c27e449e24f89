"""Low precision: bf16 coordinates moved per step, round-to-nearest vs stochastic vs fp32 master.

At MeZO's learning rates a step changes a weight by far less than the spacing
of bfloat16 numbers near it, so under round-to-nearest most updates are lost.
This benchmark builds a bfloat16 tanh MLP (``--layers`` hidden layers of
``--width``, float32 accumulation and a float32 mean-squared-error loss
against a fixed random teacher's outputs, one full batch) and, for each
learning rate in ``--learning-rates``, runs ``--steps`` MeZO steps
(`zojax.mezo`, same ``--seed`` everywhere, so every run draws the same
directions) four ways:

* ``bf16_nearest``: `zojax.mezo` on the bf16 params, `optax.apply_updates`
  rounding to nearest;
* ``bf16_stochastic``: ``optax.chain(zojax.mezo(lr), zojax.stochastic_rounding(seed))``;
* ``bf16_master``: ``zojax.master_weights(zojax.mezo(lr))`` (a float32 master
  copy, bf16 weights its rounding);
* ``fp32_reference``: `zojax.mezo` on float32 copies of the same initial weights.

It reports per run

* ``moved/step``: the mean over steps of the fraction of coordinates whose
  value changed at that step, bit for bit (bf16 bits for the bf16 runs,
  float32 bits for the reference);
* ``moved/run``: the fraction that differ at the end from the start;
* ``fp32 moves kept``: of the coordinates the float32 run moved by at least
  one bf16 spacing (of the initial weight) over the run, the fraction the run
  also moved (the reference scores 1 by definition);
* ``loss drop / fp32``: the run's loss decrease over the float32 run's.

Example:
  python -m benchmarks.low_precision --learning-rates 1e-7 1e-6 1e-5 --steps 200 \\
    --out low_precision.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
from benchmarks.common import environment, format_table, write_json

METHODS = ("bf16_nearest", "bf16_stochastic", "bf16_master", "fp32_reference")


def make_problem(
  inputs: int, width: int, layers: int, outputs: int, batch: int, seed: int = 0
) -> tuple[dict, Callable]:
  """A bf16 tanh MLP and a float32 regression loss on one fixed batch.

  The targets are a second, independently drawn MLP's outputs (float32), so
  the loss starts well above its minimum.

  Returns:
    ``(params, loss)``: bfloat16 parameters and ``loss(params)``, a float32
    scalar, for bf16 or float32 parameters alike.
  """
  sizes = [inputs] + [width] * layers + [outputs]
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(sizes) + 2))

  def init():
    return {
      f"dense_{i}": {
        "kernel": jax.random.normal(next(keys), (sizes[i], sizes[i + 1])) / np.sqrt(sizes[i]),
        "bias": jnp.zeros(sizes[i + 1]),
      }
      for i in range(len(sizes) - 1)
    }

  def apply(p, x):
    h = x
    for i in range(len(sizes) - 1):
      layer = p[f"dense_{i}"]
      k = layer["kernel"]
      h = jnp.dot(h.astype(k.dtype), k, preferred_element_type=jnp.float32)
      h = h + layer["bias"].astype(jnp.float32)
      if i < len(sizes) - 2:
        h = jnp.tanh(h)
    return h

  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init())
  teacher = init()
  x = jax.random.normal(next(keys), (batch, inputs))
  y = apply(teacher, x)

  def loss(p):
    return jnp.mean(jnp.sum((apply(p, x) - y) ** 2, axis=-1))

  return params, loss


def _bits(a: jax.Array) -> jax.Array:
  """``a``'s raw bits as unsigned integers, so that comparisons are bit for bit."""
  return jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])


def _changed(new, old) -> jax.Array:
  """How many coordinates differ, bit for bit, between two parameter trees."""
  return sum(
    jnp.sum(_bits(a) != _bits(b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))
  )


def optimizer(method: str, learning_rate, seed: int) -> optax.GradientTransformation:
  """The optimizer of one run (see the module docstring)."""
  mezo = zojax.mezo(learning_rate, key=seed)
  if method == "bf16_stochastic":
    return optax.chain(mezo, zojax.stochastic_rounding(seed))
  if method == "bf16_master":
    return zojax.master_weights(mezo)
  return mezo


def make_run(method: str, loss: Callable, steps: int, seed: int) -> Callable:
  """A jitted ``run(params, learning_rate) -> (final params, coordinates changed per step)``.

  The learning rate is an argument, not a constant, so that one compilation
  serves every learning rate.
  """

  @jax.jit
  def run(params, learning_rate):
    tx = optimizer(method, learning_rate, seed)

    def body(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, value_fn=loss)
      new = optax.apply_updates(p, updates)
      return (new, s), _changed(new, p)

    (final, _), changed = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return final, changed

  return run


def _bf16_spacing(w: jax.Array) -> np.ndarray:
  """The gap from each bf16 value to the next one up (as in ``tests/test_precision.py``)."""
  up = jnp.nextafter(w, jnp.full_like(w, jnp.inf))
  return np.asarray(up.astype(jnp.float32) - w.astype(jnp.float32))


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(a, np.float32).ravel() for a in jax.tree.leaves(tree)])


def measure(args: argparse.Namespace) -> dict:
  """Runs every method at every learning rate and compares them with the float32 run."""
  params, loss = make_problem(args.inputs, args.width, args.layers, args.outputs, args.batch)
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  d = sum(a.size for a in jax.tree.leaves(params))
  w0 = _flat(params)
  spacing = np.concatenate([_bf16_spacing(a).ravel() for a in jax.tree.leaves(params)])
  start_loss = float(loss(params))
  runs = {method: make_run(method, loss, args.steps, args.seed) for method in METHODS}
  rows = []
  for lr in args.learning_rates:
    finals, changed = {}, {}
    for method in METHODS:
      tic = time.perf_counter()
      start = params32 if method == "fp32_reference" else params
      finals[method], steps_changed = runs[method](start, jnp.float32(lr))
      changed[method] = np.asarray(steps_changed)
      print(f"  lr {lr:g} {method}: {time.perf_counter() - tic:.1f} s", flush=True)
    ref = _flat(finals["fp32_reference"])
    should = np.abs(ref - w0) >= spacing
    fp32_drop = start_loss - float(loss(finals["fp32_reference"]))
    for method in METHODS:
      final = _flat(finals[method])
      moved = final != w0
      drop = start_loss - float(loss(finals[method]))
      rows.append(
        {
          "learning_rate": lr,
          "method": method,
          "moved_per_step": float(changed[method].mean() / d),
          "moved_over_run": float(moved.mean()),
          "fp32_should_move": float(should.mean()),
          "fp32_moves_kept": float(moved[should].mean()) if should.any() else None,
          "loss_start": start_loss,
          "loss_drop": drop,
          "loss_drop_over_fp32": drop / fp32_drop if fp32_drop > 0 else None,
        }
      )
  return {
    "benchmark": "low_precision",
    "config": vars(args),
    "num_params": d,
    "environment": environment(),
    "rows": rows,
  }


COLUMNS = [
  ("learning_rate", "lr", "g"),
  ("method", "method", "s"),
  ("moved_per_step", "moved/step", ".4f"),
  ("moved_over_run", "moved/run", ".4f"),
  ("fp32_should_move", "fp32 moved>=1 spacing", ".4f"),
  ("fp32_moves_kept", "fp32 moves kept", ".4f"),
  ("loss_drop", "loss drop", ".3g"),
  ("loss_drop_over_fp32", "loss drop / fp32", ".3f"),
]


def main(argv: Sequence[str] | None = None) -> dict:
  """Parses ``argv``, measures, prints the table and writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--learning-rates", type=float, nargs="+", default=[1e-7, 1e-6, 1e-5], help="MeZO rates"
  )
  parser.add_argument("--steps", type=int, default=200, help="steps T per run")
  parser.add_argument("--inputs", type=int, default=64, help="input features")
  parser.add_argument("--width", type=int, default=256, help="hidden width")
  parser.add_argument("--layers", type=int, default=2, help="hidden layers")
  parser.add_argument("--outputs", type=int, default=16, help="regression outputs")
  parser.add_argument("--batch", type=int, default=128, help="examples in the fixed batch")
  parser.add_argument("--seed", type=int, default=0, help="MeZO and rounding seed (all runs)")
  parser.add_argument("--quick", action="store_true", help="50 steps")
  parser.add_argument("--out", help="write the results as JSON to this path")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps = 50
  result = measure(args)
  env = result["environment"]
  print(
    f"\nd = {result['num_params']} bf16 parameters, {args.steps} MeZO steps per run, "
    f"{env['device_kind']}, jax {env['jax']}:"
  )
  print(format_table(result["rows"], COLUMNS))
  write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
