"""Runs every benchmark and writes their JSON (and PNG) results to one directory.

Each benchmark runs in its own Python process (a fresh JAX runtime, so one
benchmark's compiled programs and memory do not disturb the next), with
``--quick`` when asked, writing ``<name>.json`` under ``--out-dir``
(``docs/results`` by default, the figures the docs show). At the end it
prints one summary line per benchmark, read back from those files.

Example:
  python -m benchmarks.all --quick            # every table, < 20 min on 2 CPU cores
  python -m benchmarks.all --only step_cost memory
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks import common

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> extra arguments; every benchmark takes --out (or --out-dir) and --quick.
BENCHMARKS = {
  "step_cost": [],
  "memory": [],
  "torch_mezo": [],
  "query_efficiency": [],
  "lm_query_efficiency": [],
  "bcd_step_time": ["--no-progress"],
  "low_precision": [],
  "data_parallel_bytes": [],
}
_WRITES_DIRECTORY = ("query_efficiency", "lm_query_efficiency")


def _summary(name: str, result: dict) -> str:
  """One line of the headline figures of a benchmark's JSON result."""
  if name == "step_cost":
    parts = []
    for r in result["results"]:
      by = {row["method"]: row for row in r["rows"]}
      if "mezo" in by:
        parts.append(f"{r['problem']} b{r['batch']}: mezo {by['mezo']['step_over_forward']:.2f}")
      if "zo_muon" in by:
        parts.append(f"zo_muon {by['zo_muon']['over_forwards']:.2f}x(q+1)")
    return "step/forward " + ", ".join(parts)
  if name == "memory":
    rows = {r["mode"]: r for r in result["rows"]}
    return "XLA peak / inference: " + ", ".join(
      f"{m} {r['xla_over_inference']:.2f}" for m, r in rows.items() if m != "inference"
    )
  if name == "bcd_step_time":
    return f"MeZO / MeZO-BCD step time {result['mezo_over_mezo_bcd']:.2f}x"
  if name == "torch_mezo":
    return "torch / zojax MeZO step: " + ", ".join(
      f"batch {r['batch']} {r['speedup']:.2f}x" for r in result["rows"]
    )
  if name == "low_precision":
    return "fp32 moves kept: " + ", ".join(
      f"lr {r['learning_rate']:g} {r['method']} {r['fp32_moves_kept']:.2f}"
      for r in result["rows"]
      if r["method"] != "fp32_reference"
    )
  if name == "lm_query_efficiency":
    return "LM AUC - MeZO (paired): " + ", ".join(
      f"{r['method']} {r['auc']['minus_mezo']['point']:+.3f}"
      for r in result["rows"]
      if r["method"] != "mezo"
    )
  if name == "data_parallel_bytes":
    jit = [r for r in result["rows"] if r["mode"] == "jit"]
    return "bytes all-reduced per step (jit): " + ", ".join(
      f"{r['method']} {r['bytes_all_reduced']}" for r in jit
    )
  targets = result.get("targets")
  if targets:
    return "; ".join(
      f"{t['what']} {t['value']:.2f} ({'met' if t['met'] else 'missed'})" for t in targets
    )
  return "see JSON"


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmarks; returns the number that failed."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.all",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--quick", action="store_true", help="each benchmark's quick settings")
  parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
  parser.add_argument("--out-dir", default=common.RESULTS_DIR, help="where results go")
  args = parser.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  names = args.only or list(BENCHMARKS)
  failed, timings = [], {}
  for name in names:
    if name == "torch_mezo" and importlib.util.find_spec("torch") is None:
      print(f"== {name}: skipped (torch not installed: pip install -e '.[bench]')", flush=True)
      continue
    out = (
      ["--out-dir", args.out_dir]
      if name in _WRITES_DIRECTORY
      else ["--out", os.path.join(args.out_dir, f"{name}.json")]
    )
    command = [sys.executable, "-m", f"benchmarks.{name}", *BENCHMARKS[name], *out]
    if args.quick:
      command.append("--quick")
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=_ROOT)
    timings[name] = time.perf_counter() - start
    if code:
      failed.append(name)
      print(f"== {name} FAILED (exit code {code})", flush=True)
  print("\nsummary")
  for name in names:
    path = os.path.join(args.out_dir, f"{name}.json")
    if name in failed or name not in timings or not os.path.exists(path):
      continue
    with open(path) as f:
      line = _summary(name, json.load(f))
    print(f"  {name:20s} {timings[name]:6.0f} s  {line}")
  print(f"total {sum(timings.values()) / 60:.1f} min")
  return len(failed)


if __name__ == "__main__":
  sys.exit(main())
