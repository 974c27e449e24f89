"""Step time of perturbing at the point of use against perturbing up front.

`zojax.zo_grad(perturb_at_use=True)` (the default) forms each perturbed
weight where the loss reads it (`zojax.perturb_at_use`) instead of building
a perturbed copy of the whole tree before the forward. This program times
both side by side, in one process, with interleaved medians, for MeZO and
ZO-Muon steps on an OPT-shaped decoder (the LM example's model, label-word
loss) and reports the ratio ``at use / up front`` (target of the memory
issue: within 10%, i.e. <= 1.10).

Example:
  python -m benchmarks.at_use_step_time --quick
  python -m benchmarks.at_use_step_time --hidden 768 --layers 12 --batch-size 16 --length 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import zojax
from benchmarks import common, lm_memory
from examples.lm_prompt import model as model_lib


def _optimizer(method: str, at_use: bool):
  zo = dict(perturb_at_use=at_use)
  if method == "mezo":
    return optax.chain(zojax.zo_grad(**zo), optax.sgd(1e-6))
  if method == "zo_muon":
    inner = optax.chain(
      zojax.zo_grad(num_queries=4, estimator="one_sided", **zo), zojax.orthogonalize()
    )
    return optax.chain(zojax.subspace(inner, rank=64, refresh_every=100), optax.sgd(1e-2))
  raise ValueError(method)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.at_use_step_time",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--hidden", type=int, default=768, help="width (OPT-125m: 768)")
  parser.add_argument("--layers", type=int, default=4, help="decoder layers")
  parser.add_argument("--vocab", type=int, default=50272)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--layout", default="unrolled", choices=["unrolled", "scan"])
  parser.add_argument("--methods", nargs="+", default=["mezo", "zo_muon"])
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
  parser.add_argument("--quick", action="store_true", help="2 layers, 5 rounds")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  layers, repeats = (2, 5) if args.quick else (args.layers, args.repeats)
  base = lm_memory.opt_config("opt-125m")
  config = base.__class__(
    **{
      **base.__dict__,
      "hidden_size": args.hidden,
      "num_layers": layers,
      "intermediate_size": 4 * args.hidden,
      "num_heads": max(1, args.hidden // 64),
      "num_kv_heads": max(1, args.hidden // 64),
      "head_dim": 64 if args.hidden >= 64 else args.hidden,
      "vocab_size": args.vocab,
    }
  )
  params = model_lib.init_params(config, jax.random.key(0), scan_layers=args.layout == "scan")
  rng = jax.random.key(1)
  data = {
    "input_ids": jax.random.randint(rng, (args.batch_size, args.length), 4, args.vocab),
    "attention_mask": jnp.ones((args.batch_size, args.length), jnp.int32),
    "positions": jnp.full((args.batch_size,), args.length - 1, jnp.int32),
    "labels": jnp.zeros((args.batch_size,), jnp.int32),
  }
  loss = lm_memory.label_word_loss(config)
  forward = jax.jit(loss)
  fns = {"forward": lambda: forward(params, data)}
  for method in args.methods:
    for at_use in (False, True):
      tx = _optimizer(method, at_use)
      state = tx.init(params)

      @jax.jit
      def step(p, s, b, tx=tx):
        updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
        return optax.apply_updates(p, updates), s

      jax.block_until_ready(step(params, state, data))
      name = f"{method} {'at use' if at_use else 'up front'}"
      fns[name] = lambda step=step, state=state: step(params, state, data)[0]
    print(f"compiled {method}", file=sys.stderr, flush=True)
  times = common.interleaved_medians(fns, repeats)
  rows = []
  for method in args.methods:
    up, at = times[f"{method} up front"], times[f"{method} at use"]
    rows.append(
      {
        "method": method,
        "up_front_s": up,
        "at_use_s": at,
        "ratio": at / up,
        "up_front_forwards": up / times["forward"],
        "at_use_forwards": at / times["forward"],
      }
    )
  print(
    common.format_table(
      rows,
      [
        ("method", "method", "s"),
        ("up_front_forwards", "up front (forwards)", ".2f"),
        ("at_use_forwards", "at use (forwards)", ".2f"),
        ("ratio", "at use / up front", ".3f"),
      ],
    )
  )
  result = {
    "config": {
      "hidden": args.hidden,
      "layers": layers,
      "vocab": args.vocab,
      "batch_size": args.batch_size,
      "length": args.length,
      "layout": args.layout,
      "repeats": repeats,
    },
    "forward_s": times["forward"],
    "rows": rows,
  }
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
