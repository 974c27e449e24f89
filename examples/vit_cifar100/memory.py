"""Device memory a ViT fine-tuning step needs, from XLA's compiled memory analysis.

Nothing is allocated: the parameters, optimizer state and batch are
`jax.ShapeDtypeStruct` placeholders, the train step (the same donated jitted
step `train.py` runs) and a plain inference forward (the loss at a batch) are
compiled ahead of time for the default backend, and each executable's
`memory_analysis()` gives the bytes of its arguments, outputs, temporaries
and the outputs that alias donated arguments. The peak a step needs is

    peak = arguments + outputs - aliased + temporaries,

(an upper bound of the live set XLA's buffer assignment plans for). For a ZO
step this is about the inference figure plus the optimizer state: no
activations are kept for a backward pass.

The figures are the compiling backend's (CPU here; run on the GPU you will
train on for its numbers: buffer assignment and fusion differ slightly).

Example (the ZO-Muon paper's ViT-B/16 setting on CIFAR-100):
  python -m examples.vit_cifar100.memory --model B/16 --image-size 224 \\
      --batch-size 256 --optimizer zo_muon mezo fo-adam --rank 64 --num-queries 16
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers
from examples.vit_cifar100 import train as train_lib

_GIB = 2.0**30
# --num-queries applies to the multi-query presets (MeZO-style presets keep one
# two-sided query, as in the papers' comparisons); --rank and --refresh-every
# to the subspace presets.
QUERY_PRESETS = ("zo_muon", "zo_mopi")
SUBSPACE_PRESETS = ("zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero")


def analysis_bytes(compiled) -> dict:
  """The memory figures of a compiled executable, in bytes.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    ``{"arguments", "outputs", "aliased", "temporaries", "peak"}`` with
    ``peak = arguments + outputs - aliased + temporaries``.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  out = {
    "arguments": int(stats.argument_size_in_bytes),
    "outputs": int(stats.output_size_in_bytes),
    "aliased": int(stats.alias_size_in_bytes),
    "temporaries": int(stats.temp_size_in_bytes),
  }
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def _abstract(tree):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)


def report(
  model: str,
  image_size: int,
  batch_size: int,
  optimizer_names: Sequence[str],
  *,
  num_classes: int = 100,
  num_queries: int | None = None,
  rank: int | None = None,
  refresh_every: int | None = None,
) -> dict:
  """Compiles inference and one train step per optimizer; returns their memory.

  Args:
    model: a name from `model.CONFIGS`.
    image_size: input resolution.
    batch_size: images per step (all on one device).
    optimizer_names: names from `optimizers.NAMES`.
    num_classes: width of the head.
    num_queries: ZO directions per step of ZO-Muon / ZO-MOPI (None: the
      preset's default; the other presets keep theirs).
    rank: subspace rank of the `SUBSPACE_PRESETS` (None: preset default).
    refresh_every: steps between their subspace refreshes (None: default).

  Returns:
    ``{"config", "num_params", "inference", "steps": {name: figures}}``:
    figures as `analysis_bytes`, each step's also with ``"over_inference"``
    (its peak over the inference peak) and ``"forwards_per_step"``.
  """
  config = model_lib.get_config(model)
  net = model_lib.VisionTransformer(config, num_classes)
  apply = model_lib.make_logits(net)
  params = _abstract(model_lib.param_shapes(model, num_classes, image_size))
  batch = {
    "image": jax.ShapeDtypeStruct(
      (batch_size, image_size, image_size, config.channels), jnp.float32
    ),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  loss = jax.jit(functools.partial(train_lib.cross_entropy, apply))
  inference = analysis_bytes(loss.lower(params, batch).compile())
  steps = {}
  for name in optimizer_names:
    opt = optimizers.make(
      name,
      1e-3,
      num_queries=num_queries if name in QUERY_PRESETS else None,
      rank=rank if name in SUBSPACE_PRESETS else None,
      refresh_every=refresh_every if name in SUBSPACE_PRESETS else None,
    )
    state = jax.eval_shape(opt.tx.init, params)
    step = train_lib.make_train_step(apply, opt)
    figures = analysis_bytes(step.lower(params, state, batch).compile())
    figures["over_inference"] = figures["peak"] / inference["peak"]
    figures["forwards_per_step"] = opt.forwards_per_step
    steps[name] = figures
  return {
    "config": {
      "model": model,
      "image_size": image_size,
      "batch_size": batch_size,
      "num_classes": num_classes,
      "num_queries": num_queries,
      "rank": rank,
      "refresh_every": refresh_every,
    },
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "num_params": model_lib.num_params(params),
    "inference": inference,
    "steps": steps,
  }


def _size(num_bytes: int) -> str:
  if num_bytes >= _GIB:
    return f"{num_bytes / _GIB:.2f} GiB"
  return f"{num_bytes / 2.0**20:.1f} MiB"


def format_table(result: dict) -> str:
  """The report as a plain-text table."""
  rows = [("inference forward", result["inference"], None)]
  rows += [(name, fig, fig["over_inference"]) for name, fig in result["steps"].items()]
  lines = [
    f"{'':18s} {'arguments':>11s} {'temporaries':>11s} {'peak':>11s} {'x inference':>11s}",
  ]
  for name, fig, ratio in rows:
    ratio_s = "" if ratio is None else f"{ratio:.2f}"
    lines.append(
      f"{name:18s} {_size(fig['arguments']):>11s} {_size(fig['temporaries']):>11s}"
      f" {_size(fig['peak']):>11s} {ratio_s:>11s}"
    )
  c = result["config"]
  lines.append(
    f"ViT-{c['model']} ({result['num_params'] / 1e6:.1f}M parameters), {c['image_size']} px, "
    f"batch {c['batch_size']}, {result['backend']} memory analysis, jax {result['jax']}"
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; prints the table and returns the exit code."""
  p = argparse.ArgumentParser(
    prog="python -m examples.vit_cifar100.memory",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--model", default="B/16", help="ViT config.")
  p.add_argument("--image-size", type=int, default=224, help="input resolution.")
  p.add_argument("--batch-size", type=int, default=256, help="images per step.")
  p.add_argument("--num-classes", type=int, default=100, help="head width.")
  p.add_argument(
    "--optimizer", nargs="+", default=["zo_muon", "mezo", "fo-adam"], help="optimizers to compile."
  )
  p.add_argument("--num-queries", type=int, default=None, help="queries of zo_muon / zo_mopi.")
  p.add_argument("--rank", type=int, default=None, help="rank of the subspace presets.")
  p.add_argument("--refresh-every", type=int, default=None, help="steps between refreshes.")
  p.add_argument("--json", default=None, help="also write the figures as JSON here.")
  args = p.parse_args(argv)
  unknown = [n for n in args.optimizer if n not in optimizers.NAMES]
  if unknown:
    print(
      f"error: unknown --optimizer {', '.join(unknown)}; "
      f"choose from: {', '.join(optimizers.NAMES)}",
      file=sys.stderr,
    )
    return 2
  try:
    model_lib.get_config(args.model)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result = report(
    args.model,
    args.image_size,
    args.batch_size,
    args.optimizer,
    num_classes=args.num_classes,
    num_queries=args.num_queries,
    rank=args.rank,
    refresh_every=args.refresh_every,
  )
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
