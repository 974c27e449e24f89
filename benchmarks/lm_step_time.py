"""Step time over forward time of the presets on an OPT-shaped decoder, under the XLA flags set.

The companion of `benchmarks.lm_memory`: the same optimizers
(`lm_memory.make_optimizer`) and label-word loss, on the LM example's decoder
with OPT-125m's widths and ``--layers`` layers, with real (random) weights.
Every preset's jitted, buffer-donating step and the inference forward are
timed in one process by interleaved medians (`common.interleaved_medians`),
and each step is reported as a multiple of the forward.

XLA's CPU scheduler is chosen by a process-wide flag, so comparing
schedulers takes two processes: run this once with the default and once
with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``
(the memory-minimizing schedulers, see `benchmarks.lm_memory`), best
alternating a few times, and compare the step-over-forward ratios. The
flags are recorded in the JSON.

Example:
  python -m benchmarks.lm_step_time --presets mezo zo_muon zo_mopi
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
    python -m benchmarks.lm_step_time --presets mezo zo_muon zo_mopi
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, lm_memory
from examples.lm_prompt import model as model_lib


def make_params(config: model_lib.DecoderConfig, seed: int = 0):
  """Random weights of the decoder's unrolled layout (scale 0.02, as OPT initializes)."""
  shapes = model_lib.param_shapes(config, jnp.float32, scan_layers=False)
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, arrays)


def make_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict:
  """Random prompts, full attention, the answer at the last token, random labels."""
  rng = np.random.default_rng(seed)
  return {
    "input_ids": jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32),
    "attention_mask": jnp.ones((batch, length), jnp.int32),
    "positions": jnp.full((batch,), length - 1, jnp.int32),
    "labels": jnp.asarray(rng.integers(0, len(lm_memory.LABEL_WORDS), batch), jnp.int32),
  }


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.lm_step_time",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--presets", nargs="+", default=list(lm_memory.PRESETS), choices=list(lm_memory.PRESETS)
  )
  parser.add_argument("--layers", type=int, default=2, help="decoder layers (OPT-125m widths)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--length", type=int, default=64, help="tokens per example")
  parser.add_argument("--repeats", type=int, default=8, help="interleaved timed rounds")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.layers < 1 or args.batch_size < 1 or args.length < 2 or args.repeats < 1:
    parser.error("--layers, --batch-size and --repeats must be >= 1, --length >= 2")
  config = dataclasses.replace(lm_memory.opt_config("opt-125m"), num_layers=args.layers)
  params = make_params(config)
  batch = make_batch(config.vocab_size, args.batch_size, args.length)
  loss = lm_memory.label_word_loss(config)
  forward = jax.jit(loss)
  fns = {"forward": lambda: forward(params, batch)}
  for name in args.presets:
    tx = lm_memory.make_optimizer(name)

    def step(p, s, b, tx=tx):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    holder = {"params": jax.tree.map(jnp.copy, params)}
    holder["state"] = tx.init(holder["params"])

    def run(jitted=jitted, holder=holder):
      holder["params"], holder["state"] = jitted(holder["params"], holder["state"], batch)
      return holder["params"]

    print(f"compiling {name}", file=sys.stderr, flush=True)
    jax.block_until_ready(run())
    fns[name] = run
  medians = common.interleaved_medians(fns, args.repeats, warmup=2)
  rows = [
    {
      "preset": name,
      "step_ms": 1e3 * medians[name],
      "over_forward": medians[name] / medians["forward"],
    }
    for name in args.presets
  ]
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; forward {1e3 * medians['forward']:.1f} ms")
  print(
    common.format_table(
      rows,
      [
        ("preset", "preset", "s"),
        ("step_ms", "step ms", ".1f"),
        ("over_forward", "/ forward", ".2f"),
      ],
    )
  )
  result = {
    "config": {**vars(args), "xla_flags": os.environ.get("XLA_FLAGS", "")},
    "forward_ms": 1e3 * medians["forward"],
    "rows": rows,
  }
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
