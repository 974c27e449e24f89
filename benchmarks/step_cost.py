"""Step cost of every zojax preset in units of one forward pass.

Builds a deep MLP (``--layers`` hidden layers, so one block per layer), then
measures, in one process and side by side, the median wall time of

* one jitted forward pass (the loss at a batch), and
* one jitted optimizer step (all queries, refreshes and the update; buffers
  donated) for each preset,

and prints ``step / forward`` next to the number of forward passes the
preset needs per step (``2`` for MeZO-style two-sided presets, ``q + 1`` for
ZO-Muon and ZO-MOPI). A ratio close to that number means the step costs its
forward passes and little else. Absolute times vary between machines and
runs; only the ratios, measured in one process, are comparable.

Example:
  python -m benchmarks.step_cost --layers 12 --width 256 --batch 64 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import zojax


def make_problem(
  layers: int, width: int, batch: int, tokens: int = 16, classes: int = 10, seed: int = 0
):
  """A ``layers``-deep tanh MLP applied per token, mean-pooled, with a cross-entropy loss.

  The token axis gives the forward pass the work per parameter of a
  transformer (``2 * batch * tokens`` flops per weight), which is what sets
  the ratio of parameter-sized work (random draws, perturbations) to
  forward work in a real fine-tuning step.
  """
  keys = jax.random.split(jax.random.key(seed), layers + 3)
  params = {
    f"layer_{i:02d}": {
      "kernel": jax.random.normal(keys[i], (width, width)) / jnp.sqrt(width),
      "bias": jnp.zeros(width),
    }
    for i in range(layers)
  }
  params["head"] = {"kernel": jnp.zeros((width, classes)), "bias": jnp.zeros(classes)}
  x = jax.random.normal(keys[-2], (batch, tokens, width))
  y = jax.random.randint(keys[-1], (batch,), 0, classes)

  def loss(p, batch_xy):
    h, labels = batch_xy
    for i in range(layers):
      layer = p[f"layer_{i:02d}"]
      h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    logits = h.mean(axis=1) @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss, (x, y)


def presets(num_queries: int):
  """The presets measured, with their forward passes per step."""
  return {
    "mezo": (zojax.mezo(1e-3), 2),
    "mezo_bcd": (zojax.mezo_bcd(1e-3, switch_every=1), 2),
    "zo_muon": (zojax.zo_muon(1e-2, num_queries=num_queries), num_queries + 1),
    "zo_mopi": (zojax.zo_mopi(1e-2, num_queries=num_queries), num_queries + 1),
    "lozo": (zojax.lozo(1e-3), 2),
    "lozo_m": (zojax.lozo_m(1e-3), 2),
    "subzero": (zojax.subzero(1e-3), 2),
  }


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(args) -> dict:
  params, loss, batch = make_problem(args.layers, args.width, args.batch, args.tokens)
  forward = jax.jit(loss)
  jax.block_until_ready(forward(params, batch))
  forward_s = median_time(lambda: forward(params, batch), args.repeats)
  rows = []
  for name, (tx, forwards) in presets(args.num_queries).items():
    if args.only and name not in args.only:
      continue

    def step(p, s, b, tx=tx):
      u, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = {"p": jax.tree.map(jnp.copy, params), "s": tx.init(params)}

    def run(jitted=jitted, state=state):
      state["p"], state["s"] = jitted(state["p"], state["s"], batch)
      return state["p"]

    compile_start = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - compile_start
    for _ in range(2):
      run()
    # Forward and step are timed in alternation, so machine noise hits both alike.
    step_times, forward_times = [], []
    for _ in range(args.repeats):
      forward_times.append(median_time(lambda: forward(params, batch), 3))
      step_times.append(median_time(run, 1))
    step_s = statistics.median(step_times)
    forward_s = statistics.median(forward_times)
    rows.append(
      {
        "preset": name,
        "forwards_per_step": forwards,
        "step_ms": 1e3 * step_s,
        "forward_ms": 1e3 * forward_s,
        "step_over_forward": step_s / forward_s,
        "over_forwards": step_s / forward_s / forwards,
        "first_call_s": compile_s,
      }
    )
    print(
      f"{name:10s} forwards/step {forwards:3d}   step/forward {step_s / forward_s:7.2f}"
      f"   ratio/forwards {step_s / forward_s / forwards:5.2f}",
      flush=True,
    )
  return {
    "config": vars(args),
    "forward_ms": 1e3 * forward_s,  # a first, separate measurement
    "rows": rows,
    "jax": jax.__version__,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=12, help="hidden layers (blocks)")
  parser.add_argument("--width", type=int, default=256, help="hidden width")
  parser.add_argument("--batch", type=int, default=64, help="batch size")
  parser.add_argument("--tokens", type=int, default=16, help="tokens per example")
  parser.add_argument(
    "--num-queries", type=int, default=4, help="queries q of ZO-Muon / ZO-MOPI (q+1 forwards)"
  )
  parser.add_argument("--repeats", type=int, default=20, help="timed repeats per step")
  parser.add_argument("--only", nargs="*", help="measure only these presets")
  parser.add_argument("--out", help="write the results as JSON to this path")
  args = parser.parse_args(argv)
  result = measure(args)
  print(f"forward {result['forward_ms']:.3f} ms on {result['device']}, jax {result['jax']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
