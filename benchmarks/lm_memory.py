"""Memory of a ZO step on language models, where the weights dominate.

For OPT shapes (the LM example's decoders, `examples/lm_prompt/model.py`)
at batch 16 x 64 tokens with MeZO's label-word loss (cross-entropy over the
logits of two label words at the answer position), it compiles, from
abstract shapes only (`jax.ShapeDtypeStruct` parameters: nothing is
allocated, so OPT-13B compiles on a laptop), the inference forward, a
jitted, buffer-donating step of every preset and a backprop + Adam step,
and reports XLA's compiled memory analysis of each:

    peak = arguments + outputs - aliased (donated) + temporaries,

as a ratio to the inference forward's peak (and, separately, the share of
it that is the optimizer's own state: bases, momentum, power-iteration
bases, a part of the step no scheduling can remove), with unrolled layers (a list of
per-layer leaves, run by a Python loop) and scanned layers (stacked leaves
run by `jax.lax.scan`). ``mezo (up front)`` is `zojax.mezo` with
``perturb_at_use=False``: the whole tree perturbed before the forward, as
zojax did before `zojax.perturb_at_use` (the figure the memory issue
started from). MeZO-BCD's blocks are the decoder layers (embeddings, final
norm and head frozen, as its reference code does; in the scanned layout a
block is one layer's slice of the stacked leaves, `zojax.StackedBlocks`).

Target (the memory issue): every preset <= 1.1x inference on both layouts.

The figures depend on XLA's scheduler. On CPU it defaults to a
concurrency-optimized order, which may start independent work early and
hold its results (ZO-Muon's per-matrix basis transposes and scaled
coordinates at the end of its step); with
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` it
uses its memory-minimizing schedulers instead. The flag is process-wide (a
per-compile ``compiler_options`` entry does not change the CPU schedule), so
the benchmark records ``XLA_FLAGS`` in its JSON; run it once with and once
without to see both.

Example:
  python -m benchmarks.lm_memory --quick
  python -m benchmarks.lm_memory --models opt-125m opt-1.3b --layouts unrolled scan
  python -m benchmarks.lm_memory --models opt-13b --dtype bfloat16 --presets mezo zo_muon adam
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
    python -m benchmarks.lm_memory --quick --layouts unrolled
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import zojax
from benchmarks import common
from examples.lm_prompt import model as model_lib
from examples.lm_prompt import optimizers as lm_optimizers

# The OPT family's shapes (Hugging Face configs of facebook/opt-*; Zhang et
# al., arXiv 2205.01068).
OPT_SHAPES = {
  "opt-125m": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
  "opt-1.3b": dict(hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=8192),
  "opt-13b": dict(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=20480),
}
PRESETS = ("mezo", "mezo_bcd", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero")
MODES = ("mezo_upfront", *PRESETS, "adam")
LABELS = {"mezo_upfront": "mezo (up front)", "adam": "backprop + Adam"}
TARGET = 1.1
LABEL_WORDS = (1000, 2000)  # any two token ids: only their count matters here


def opt_config(name: str) -> model_lib.DecoderConfig:
  """The `DecoderConfig` of an OPT shape (pre-LN, tied head, vocabulary 50272)."""
  shape = OPT_SHAPES[name]
  return model_lib.DecoderConfig(
    family="opt",
    vocab_size=50272,
    hidden_size=shape["hidden_size"],
    num_layers=shape["num_layers"],
    num_heads=shape["num_heads"],
    num_kv_heads=shape["num_heads"],
    head_dim=shape["hidden_size"] // shape["num_heads"],
    intermediate_size=shape["intermediate_size"],
    max_positions=2048,
    norm_eps=1e-5,
    activation="relu",
    tie_word_embeddings=True,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    model_type="opt",
  )


def label_word_loss(config: model_lib.DecoderConfig):
  """MeZO's prompt loss: cross-entropy over the label words' logits at the answer."""
  words = jnp.asarray(LABEL_WORDS, jnp.int32)

  def loss(params, batch):
    logits = model_lib.label_logits(
      params, config, batch["input_ids"], batch["attention_mask"], batch["positions"], words
    )
    picked = jnp.take_along_axis(logits, batch["labels"][:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

  return loss


def make_optimizer(mode: str):
  """The transform of a mode, at the papers' LLM settings (learning rates do not matter here).

  The per-matrix methods get the decoder's matrix view
  (`examples.lm_prompt.model.matrix_dimension_numbers`: one matrix per layer
  in either layout, token and position tables with the vocabulary as their
  output axis, as the released PyTorch code treats them).
  """
  dims = model_lib.matrix_dimension_numbers
  if mode == "mezo_upfront":
    return optax.chain(zojax.zo_grad(perturb_at_use=False), optax.sgd(1e-6))
  if mode == "mezo":
    return zojax.mezo(1e-6)
  if mode == "mezo_bcd":
    return zojax.mezo_bcd(1e-6, blocks=lm_optimizers.layer_blocks)
  if mode == "zo_muon":
    return zojax.zo_muon(
      1e-2, rank=64, num_queries=4, refresh_every=100, weight_dimension_numbers=dims
    )
  if mode == "zo_mopi":
    return zojax.zo_mopi(1e-2, weight_dimension_numbers=dims)
  if mode == "lozo":
    return zojax.lozo(1e-6, weight_dimension_numbers=dims)
  if mode == "lozo_m":
    return zojax.lozo_m(1e-6, weight_dimension_numbers=dims)
  if mode == "subzero":
    return zojax.subzero(1e-6, weight_dimension_numbers=dims)
  if mode == "adam":
    return optax.adam(1e-5)
  raise ValueError(f"unknown mode {mode!r}")


def analysis(compiled) -> dict:
  m = compiled.memory_analysis()
  figures = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
  }
  figures["peak"] = (
    figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
  )
  return figures


def measure(model: str, layout: str, modes: Sequence[str], batch: int, length: int, dtype):
  """Compiles every mode for one model and layout; returns one row per mode."""
  config = opt_config(model)
  scan = layout == "scan"
  params = model_lib.param_shapes(config, dtype, scan_layers=scan)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  per_example = jax.ShapeDtypeStruct((batch,), jnp.int32)
  data = {
    "input_ids": tokens,
    "attention_mask": tokens,
    "positions": per_example,
    "labels": per_example,
  }
  loss = label_word_loss(config)
  start = time.perf_counter()
  inference = analysis(jax.jit(loss).lower(params, data).compile())
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rows = [
    {
      "model": model,
      "layout": layout,
      "mode": "inference",
      **inference,
      "over_inference": 1.0,
      "compile_s": time.perf_counter() - start,
    }
  ]
  print(
    f"{model} {layout}: {num_params / 1e6:.0f}M parameters, inference peak "
    f"{inference['peak'] / 2**30:.2f} GiB",
    file=sys.stderr,
    flush=True,
  )
  inference_arguments = inference["arguments"]
  for mode in modes:
    tx = make_optimizer(mode)
    state = jax.eval_shape(tx.init, params)
    if mode == "adam":

      def step(p, s, b, tx=tx):
        grads = jax.grad(loss)(p, b)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    else:

      def step(p, s, b, tx=tx):
        updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
        return optax.apply_updates(p, updates), s

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, data).compile()
    figures = analysis(compiled)
    row = {
      "model": model,
      "layout": layout,
      "mode": mode,
      **figures,
      "over_inference": figures["peak"] / inference["peak"],
      # The optimizer's own state (bases, momentum, ...): what the step's
      # arguments hold beyond the inference forward's (weights and batch).
      "state_over_inference": (figures["arguments"] - inference_arguments) / inference["peak"],
      "compile_s": time.perf_counter() - start,
    }
    rows.append(row)
    print(
      f"  {LABELS.get(mode, mode):18s} peak {figures['peak'] / 2**30:7.2f} GiB "
      f"= {row['over_inference']:.2f}x inference ({row['compile_s']:.0f} s to compile)",
      file=sys.stderr,
      flush=True,
    )
  return num_params, rows


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.lm_memory",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--models", nargs="+", default=["opt-125m", "opt-1.3b"], choices=sorted(OPT_SHAPES)
  )
  parser.add_argument(
    "--layouts", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"]
  )
  parser.add_argument(
    "--presets",
    nargs="+",
    default=list(MODES),
    choices=list(MODES),
    help="modes besides inference (adam = backprop + Adam)",
  )
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--length", type=int, default=64, help="tokens per example")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="weight dtype (losses are float32)",
  )
  parser.add_argument("--quick", action="store_true", help="OPT-125m only")
  parser.add_argument("--out", default=None, help="write the results as JSON here (and a PNG)")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.length < 2:
    parser.error("--batch-size must be >= 1 and --length >= 2")
  models = ["opt-125m"] if args.quick else args.models
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  rows, sizes = [], {}
  for model in models:
    for layout in args.layouts:
      sizes[model], model_rows = measure(
        model, layout, args.presets, args.batch_size, args.length, dtype
      )
      rows.extend(model_rows)
  result = {
    "config": {
      "models": models,
      "layouts": args.layouts,
      "batch_size": args.batch_size,
      "length": args.length,
      "dtype": args.dtype,
      "label_words": len(LABEL_WORDS),
      "target": TARGET,
      # XLA's scheduler options change the figures (see the docs' memory page).
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "num_params": sizes,
    "rows": rows,
  }
  table = [
    {
      "what": f"{r['model']} {r['layout']} {LABELS.get(r['mode'], r['mode'])}",
      "peak_gib": r["peak"] / 2**30,
      "temp_gib": r["temporaries"] / 2**30,
      "state": r.get("state_over_inference", 0.0),
      "over": r["over_inference"],
    }
    for r in rows
  ]
  print(
    common.format_table(
      table,
      [
        ("what", "model, layout, mode", "s"),
        ("peak_gib", "XLA peak GiB", ".2f"),
        ("temp_gib", "temporaries GiB", ".2f"),
        ("state", "optimizer state (x inference)", ".3f"),
        ("over", "x inference", ".2f"),
      ],
    )
  )
  common.write_json(result, args.out)
  panels = []
  for model in models:
    for layout in args.layouts:
      values = {
        LABELS.get(r["mode"], r["mode"]): r["over_inference"]
        for r in rows
        if r["model"] == model and r["layout"] == layout and r["mode"] != "inference"
      }
      panels.append({"title": f"{model}, {layout} layers", "values": values, "limit": TARGET})
  common.bar_chart(panels, common.png_path(args.out), "XLA peak / inference peak")
  return result


if __name__ == "__main__":
  main()
