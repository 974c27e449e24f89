"""Memory of a ZO step against inference and backprop, on the example's ViT.

Two measurements per mode (an inference forward: the loss at a batch; a ZO
step of each preset; a backprop step with Adam), both taken in one fresh
process per mode from one compilation:

* XLA's compiled memory analysis of the jitted, buffer-donating step
  (arguments + outputs - aliased + temporaries, see
  ``examples/vit_cifar100/memory.py``).
* Peak resident memory (RSS) that running the step adds: the parameters,
  batch and optimizer state are built and the step is compiled ahead of
  time; then the RSS, sampled every millisecond while the step runs
  ``--runs`` times (once by default: the first run already holds every
  buffer a later one would), is compared with the RSS just before. (A
  sampled peak can miss a spike shorter than the sampling interval.)

With ``--no-rss`` nothing runs: the programs are compiled from shapes alone
in this process, for their memory analysis only.

Both are reported as ratios to the inference forward's figure, measured in
the same run. Targets (the benchmarks issue, ViT at batch 64): ZO step <=
1.2x inference; backprop >= 4x a ZO step.

The ratios depend on the resolution: at 224 px a ViT-S/16 forward's
activations at batch 64 outweigh its weights, while at 112 px the weights
dominate and one perturbed copy of them alone adds about 0.7x inference, so
``--quick`` keeps 224 px and measures fewer steps instead.

Example:
  python -m benchmarks.memory --model S/16 --image-size 224 --batch-size 64 --out memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

from benchmarks import common

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs one mode in a fresh process: compiles its program once, ahead of time,
# and prints that executable's memory analysis, the RSS before the step first
# runs and the highest RSS sampled (every millisecond) while it runs. The
# allocator is asked to return the compiler's freed memory to the system first.
_PROGRAM = """
import ctypes, gc, json, resource, sys, threading, time
import jax, jax.numpy as jnp, numpy as np
from examples.vit_cifar100 import memory as vit_memory, model as model_lib, optimizers, train
cfg = json.loads(sys.argv[1])
page = resource.getpagesize()

def rss_now():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * page

model, params = model_lib.create(cfg["model"], 100, cfg["image_size"], key=jax.random.key(0))
apply = model_lib.make_logits(model)
channels = model_lib.get_config(cfg["model"]).channels
shape = (cfg["batch_size"], cfg["image_size"], cfg["image_size"], channels)
batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32),
         "label": jnp.zeros((cfg["batch_size"],), jnp.int32)}
if cfg["mode"] == "inference":
  compiled = jax.jit(lambda p, b: train.cross_entropy(apply, p, b)).lower(params, batch).compile()
  run = lambda: compiled(params, batch)
  forwards = 1
else:
  queries = cfg["num_queries"] if cfg["mode"] in vit_memory.QUERY_PRESETS else None
  opt = optimizers.make(cfg["mode"], 1e-4, num_queries=queries)
  forwards = opt.forwards_per_step
  state = opt.tx.init(params)
  compiled = train.make_train_step(apply, opt).lower(params, state, batch).compile()
  holder = [params, state]
  def run():
    holder[0], holder[1], _ = compiled(holder[0], holder[1], batch)
    return holder[0]
analysis = vit_memory.analysis_bytes(compiled)
gc.collect()
try:
  ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
  pass
before = rss_now()
peak = [before]
done = threading.Event()
def sample():
  while not done.is_set():
    peak[0] = max(peak[0], rss_now())
    time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
for _ in range(cfg["runs"]):
  jax.block_until_ready(run())
done.set()
thread.join()
peak[0] = max(peak[0], rss_now())
print(json.dumps({"before": before, "peak": peak[0], "analysis": analysis,
                  "forwards_per_step": forwards, "num_params": model_lib.num_params(params),
                  "backend": jax.default_backend(), "jax": jax.__version__}))
"""


def measure_mode(
  mode: str,
  model: str,
  image_size: int,
  batch_size: int,
  num_queries: int | None = None,
  runs: int = 1,
) -> dict:
  """Compiles and runs ``mode`` in a fresh process (see module doc).

  Args:
    mode: ``"inference"`` or a name from the example's `optimizers.NAMES`.
    model: ViT config name.
    image_size: input resolution.
    batch_size: images per step.
    num_queries: directions per step of ZO-Muon / ZO-MOPI (None: preset's).
    runs: how many times the step runs while the RSS is sampled.

  Returns:
    ``{"before", "peak", "added"}`` RSS bytes, ``"analysis"`` (the
    executable's memory figures, as `examples.vit_cifar100.memory.analysis_bytes`),
    ``"forwards_per_step"``, ``"num_params"``, ``"backend"`` and ``"jax"``.
  """
  cfg = {
    "mode": mode,
    "model": model,
    "image_size": image_size,
    "batch_size": batch_size,
    "num_queries": num_queries,
    "runs": runs,
  }
  proc = subprocess.run(
    [sys.executable, "-c", _PROGRAM, json.dumps(cfg)],
    cwd=_ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f"measuring {mode} failed:\n{proc.stderr[-2000:]}")
  figures = json.loads(proc.stdout.strip().splitlines()[-1])
  figures["added"] = figures["peak"] - figures["before"]
  return figures


def xla_report(measured: dict, model: str, image_size: int, batch_size: int, num_queries) -> dict:
  """`measure_mode` results in the shape of `examples.vit_cifar100.memory.report`."""
  inference = measured["inference"]["analysis"]
  steps = {}
  for mode, figures in measured.items():
    if mode == "inference":
      continue
    steps[mode] = {
      **figures["analysis"],
      "over_inference": figures["analysis"]["peak"] / inference["peak"],
      "forwards_per_step": figures["forwards_per_step"],
    }
  return {
    "config": {
      "model": model,
      "image_size": image_size,
      "batch_size": batch_size,
      "num_classes": 100,
      "num_queries": num_queries,
      "rank": None,
      "refresh_every": None,
    },
    "backend": measured["inference"]["backend"],
    "jax": measured["inference"]["jax"],
    "num_params": measured["inference"]["num_params"],
    "inference": inference,
    "steps": steps,
  }


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark, prints its table and returns the results."""
  from examples.vit_cifar100 import memory as vit_memory

  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.memory",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--model", default="S/16", help="ViT config")
  parser.add_argument("--image-size", type=int, default=224, help="input resolution")
  parser.add_argument("--batch-size", type=int, default=64, help="images per step")
  parser.add_argument(
    "--optimizer",
    nargs="+",
    default=None,
    help="ZO presets and backprop baselines (fo-adam, fo-muon) to measure (default: mezo "
    "zo_muon lozo subzero fo-adam; with --quick mezo zo_muon fo-adam)",
  )
  parser.add_argument(
    "--num-queries",
    type=int,
    default=None,
    help="directions per step of ZO-Muon / ZO-MOPI (default: the preset's); the queries run "
    "one after another, so the step's memory does not depend on it",
  )
  parser.add_argument(
    "--runs", type=int, default=1, help="times each step runs while its RSS is sampled"
  )
  parser.add_argument(
    "--no-rss",
    action="store_true",
    help="compile from shapes in this process, memory analysis only (nothing runs)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="MeZO, ZO-Muon and backprop only (a few minutes on 2 cores)",
  )
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.optimizer is None:
    args.optimizer = (
      ["mezo", "zo_muon", "fo-adam"]
      if args.quick
      else ["mezo", "zo_muon", "lozo", "subzero", "fo-adam"]
    )
  setting = f"ViT-{args.model}, {args.image_size} px, batch {args.batch_size}"
  rss = {}
  if args.no_rss:
    print(f"XLA memory analysis: {setting}", flush=True)
    xla = vit_memory.report(
      args.model,
      args.image_size,
      args.batch_size,
      args.optimizer,
      num_queries=args.num_queries,
    )
  else:
    measured = {}
    for mode in ["inference", *args.optimizer]:
      print(f"{setting}: compiling and running {mode} in a fresh process", flush=True)
      measured[mode] = measure_mode(
        mode, args.model, args.image_size, args.batch_size, args.num_queries, args.runs
      )
      rss[mode] = {k: measured[mode][k] for k in ("before", "peak", "added")}
    xla = xla_report(measured, args.model, args.image_size, args.batch_size, args.num_queries)
  print(vit_memory.format_table(xla), flush=True)
  rows = []
  for mode in ["inference", *args.optimizer]:
    figures = xla["inference"] if mode == "inference" else xla["steps"][mode]
    row = {"mode": mode, "xla_peak_mib": figures["peak"] / 2**20}
    row["xla_over_inference"] = figures["peak"] / xla["inference"]["peak"]
    if rss:
      row["rss_added_mib"] = rss[mode]["added"] / 2**20
      row["rss_over_inference"] = rss[mode]["added"] / rss["inference"]["added"]
    rows.append(row)
  print(
    common.format_table(
      rows,
      [
        ("mode", "mode", "s"),
        ("xla_peak_mib", "XLA peak MiB", ".1f"),
        ("xla_over_inference", "x inference", ".2f"),
        ("rss_added_mib", "RSS added MiB", ".1f"),
        ("rss_over_inference", "x inference", ".2f"),
      ],
    )
  )
  by = {r["mode"]: r for r in rows}
  checks = []
  backprop = next((m for m in ("fo-adam", "fo-muon") if m in by), None)
  for name in args.optimizer:
    if name.startswith("fo-"):
      continue
    checks.append(
      {
        "what": f"{name} XLA peak / inference",
        "value": by[name]["xla_over_inference"],
        "limit": 1.2,
        "sign": "<=",
        "met": by[name]["xla_over_inference"] <= 1.2,
      }
    )
    if backprop:
      ratio = by[backprop]["xla_over_inference"] / by[name]["xla_over_inference"]
      checks.append(
        {
          "what": f"{backprop} / {name} XLA peak",
          "value": ratio,
          "limit": 4.0,
          "sign": ">=",
          "met": ratio >= 4,
        }
      )
  for t in checks:
    verdict = "met" if t["met"] else "MISSED"
    print(f"  target {t['what']}: {t['value']:.2f} {t['sign']} {t['limit']}: {verdict}")
  out = {
    "config": vars(args),
    "xla": xla,
    "rss": rss,
    "rows": rows,
    "targets": checks,
    "environment": common.environment(),
  }
  common.write_json(out, args.out)
  panels = [
    {
      "title": f"XLA peak, ViT-{args.model} {args.image_size} px batch {args.batch_size}",
      "values": {r["mode"]: r["xla_over_inference"] for r in rows},
      "limit": 1.2,
    }
  ]
  if rss:
    panels.append(
      {
        "title": "peak RSS added by the step",
        "values": {r["mode"]: r["rss_over_inference"] for r in rows},
        "limit": 1.2,
      }
    )
  common.bar_chart(panels, common.png_path(args.out), "x inference (dashed: 1.2x target)")
  return out


if __name__ == "__main__":
  main()
