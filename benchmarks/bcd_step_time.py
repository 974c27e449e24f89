"""Step time of MeZO-BCD against MeZO, side by side in one process.

Builds a deep per-token MLP (``--layers`` hidden ``width x width`` layers and
a small head, so ``layers + 1`` blocks under the default one-block-per-
submodule rule), then jits

* the loss (one forward pass),
* a MeZO step (`zojax.mezo`) and
* a MeZO-BCD step (`zojax.mezo_bcd`, arXiv 2501.19099),

both steps with their parameter and optimizer-state buffers donated. After a
warm-up it times the three in alternation, ``--repeats`` times, so machine
noise hits them alike, and prints the median times, ``MeZO / MeZO-BCD`` (the
wall-clock speedup) and ``step / forward`` for each (2 would mean a step costs
its two forward passes and nothing else). First-call (trace + compile) times
are reported too: MeZO-BCD compiles one branch per block.

Both steps run the same two full-model forward passes; MeZO-BCD draws,
perturbs and updates only the active block (about ``1/L`` of the weights),
so its gain is the parameter-sized work of a MeZO step. The token axis gives
the forward the work per weight of a transformer (``2 * batch * tokens``
flops per weight), which sets how large that share is. Absolute times vary
between machines and runs; compare ratios measured in one process.

Example:
  python -m benchmarks.bcd_step_time --layers 12 --width 256 --batch 16 --tokens 16 \\
    --out bcd_step_time.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import zojax
from benchmarks import common
from benchmarks.step_cost import make_problem


class _Stepper:
  """A jitted, buffer-donating optimizer step that owns its params and state."""

  def __init__(self, tx, params, loss, batch):
    def step(p, s, b):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, updates), s

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._batch = batch
    self.params = jax.tree.map(jnp.copy, params)
    self.state = tx.init(params)

  def __call__(self):
    self.params, self.state = self._step(self.params, self.state, self._batch)
    return self.params


def _time(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
  """Runs the benchmark and returns the results as a JSON-ready dict."""
  params, loss, batch = make_problem(args.layers, args.width, args.batch, args.tokens)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  forward = jax.jit(loss)
  steppers = {
    "mezo": _Stepper(zojax.mezo(args.learning_rate, key=0), params, loss, batch),
    "mezo_bcd": _Stepper(
      zojax.mezo_bcd(args.learning_rate, switch_every=args.switch_every, key=0),
      params,
      loss,
      batch,
    ),
  }
  first_call_s = {"forward": _time(lambda: forward(params, batch))}
  for name, stepper in steppers.items():
    first_call_s[name] = _time(stepper)
  # XLA's CPU runtime does per-branch set-up on a `lax.switch` branch's first run (30-40 ms
  # each here), so the warm-up runs MeZO-BCD through every block once (one epoch of switches)
  # before the ``--warmup`` rounds: otherwise the timed rounds measure cold branches.
  num_blocks = len(optax.tree_utils.tree_get(steppers["mezo_bcd"].state, "inner_states"))
  epoch_steps = num_blocks * args.switch_every
  first_call_s["mezo_bcd_epoch"] = _time(
    lambda: [steppers["mezo_bcd"]() for _ in range(max(epoch_steps - 1, 1))][-1]
  )
  for _ in range(args.warmup):
    forward(params, batch).block_until_ready()
    for stepper in steppers.values():
      jax.block_until_ready(stepper())

  times = {"forward": [], "mezo": [], "mezo_bcd": []}
  repeats = range(args.repeats)
  if not args.no_progress:
    try:
      from tqdm import tqdm  # optional (examples extra)

      repeats = tqdm(repeats, desc="timing", leave=False)
    except ImportError:
      pass
  for _ in repeats:  # in alternation, so load on the machine hits all three alike
    times["forward"].append(_time(lambda: forward(params, batch)))
    for name, stepper in steppers.items():
      times[name].append(_time(stepper))
  median_s = {name: statistics.median(ts) for name, ts in times.items()}
  return {
    "config": vars(args),
    "num_params": int(num_params),
    "num_blocks": num_blocks,
    "median_ms": {k: 1e3 * v for k, v in median_s.items()},
    "first_call_s": first_call_s,
    "mezo_over_mezo_bcd": median_s["mezo"] / median_s["mezo_bcd"],
    "step_over_forward": {
      "mezo": median_s["mezo"] / median_s["forward"],
      "mezo_bcd": median_s["mezo_bcd"] / median_s["forward"],
    },
    "jax": jax.__version__,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
  }


def print_table(result: dict) -> None:
  ms, first = result["median_ms"], result["first_call_s"]
  ratio = result["step_over_forward"]
  print(
    f"{result['num_params']:,} parameters in {result['num_blocks']} blocks; "
    f"jax {result['jax']} on {result['device']}"
  )
  print(f"{'':10s} {'median ms':>10s} {'step/forward':>13s} {'first call s':>13s}")
  print(f"{'forward':10s} {ms['forward']:10.3f} {'1.00':>13s} {first['forward']:13.2f}")
  for name in ("mezo", "mezo_bcd"):
    print(f"{name:10s} {ms[name]:10.3f} {ratio[name]:13.2f} {first[name]:13.2f}")
  print(f"MeZO / MeZO-BCD step time: {result['mezo_over_mezo_bcd']:.2f}x")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--layers", type=int, default=12, help="hidden layers (one block each)")
  parser.add_argument("--width", type=int, default=256, help="hidden width")
  parser.add_argument("--batch", type=int, default=16, help="examples per batch")
  parser.add_argument("--tokens", type=int, default=16, help="tokens per example")
  parser.add_argument(
    "--switch-every",
    type=int,
    default=1,
    help="MeZO-BCD steps per block (1: the timed steps visit every block)",
  )
  parser.add_argument("--learning-rate", type=float, default=1e-4, help="learning rate of both")
  parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after compiling")
  parser.add_argument("--repeats", type=int, default=30, help="timed rounds (medians reported)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--quick", action="store_true", help="10 timed rounds")
  parser.add_argument("--out", help="write the results as JSON to this path")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats = min(args.repeats, 10)
  result = measure(args)
  result["environment"] = common.environment()
  print_table(result)
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
