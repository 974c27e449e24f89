"""Memory of a ZO step against inference and backprop, on the example's ViT.

Two measurements per mode (an inference forward: the loss at a batch; a ZO
step of each preset; a backprop step with Adam):

* XLA's compiled memory analysis of the jitted, buffer-donating step
  (arguments + outputs - aliased + temporaries, see
  ``examples/vit_cifar100/memory.py``), compiled from shapes alone.
* Peak resident memory (RSS) that running the step adds, in a fresh process:
  the parameters, batch and optimizer state are built and the step is
  compiled ahead of time; then the RSS, sampled every millisecond while the
  step runs three times, is compared with the RSS just before. (A sampled
  peak can miss a spike shorter than the sampling interval.)

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

# Runs one mode in a fresh process and prints, in bytes, the RSS before the
# compiled step first runs and the highest RSS sampled (every millisecond)
# while it runs three times. Compiling happens before, ahead of time, and the
# allocator is asked to return the compiler's freed memory to the system.
_RSS_PROGRAM = """
import ctypes, gc, json, resource, sys, threading, time
import jax, jax.numpy as jnp, numpy as np
from examples.vit_cifar100 import model as model_lib, optimizers, train
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
  fn = jax.jit(lambda p, b: train.cross_entropy(apply, p, b)).lower(params, batch).compile()
  run = lambda: fn(params, batch)
else:
  opt = optimizers.make(cfg["mode"], 1e-4)
  state = opt.tx.init(params)
  step = train.make_train_step(apply, opt).lower(params, state, batch).compile()
  holder = [params, state]
  def run():
    holder[0], holder[1], _ = step(holder[0], holder[1], batch)
    return holder[0]
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
for _ in range(3):
  jax.block_until_ready(run())
done.set()
thread.join()
peak[0] = max(peak[0], rss_now())
print(json.dumps({"before": before, "peak": peak[0]}))
"""


def peak_rss(mode: str, model: str, image_size: int, batch_size: int) -> dict:
  """Peak RSS a fresh process adds by compiling and running ``mode`` (see module doc)."""
  cfg = {"mode": mode, "model": model, "image_size": image_size, "batch_size": batch_size}
  proc = subprocess.run(
    [sys.executable, "-c", _RSS_PROGRAM, json.dumps(cfg)],
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
  parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
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
  print(f"XLA memory analysis: ViT-{args.model}, {args.image_size} px, batch {args.batch_size}")
  xla = vit_memory.report(args.model, args.image_size, args.batch_size, args.optimizer)
  print(vit_memory.format_table(xla), flush=True)
  rss = {}
  if not args.no_rss:
    for mode in ["inference", *args.optimizer]:
      print(f"peak RSS: running {mode} in a fresh process", flush=True)
      rss[mode] = peak_rss(mode, args.model, args.image_size, args.batch_size)
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
