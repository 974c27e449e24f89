"""What every benchmark shares: timing by medians, the run's environment, JSON output.

Every figure a benchmark reports is a ratio of times (or bytes) measured in
one process, side by side: these machines are noisy, and an absolute time
compared across runs or machines means little.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

RESULTS_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results"
)


def environment() -> dict:
  """The JAX version, backend, devices, CPU count and platform a benchmark ran on."""
  import jaxlib

  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "cpu_count": os.cpu_count(),
    "python": sys.version.split()[0],
    "platform": platform.platform(),
  }


def commit() -> str | None:
  """The repository's checked-out commit (with ``+changes`` when the tree differs), or None."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+changes" if dirty else "")


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of ``fn()`` (its result blocked on) over ``repeats`` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_medians(
  fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
  """Median seconds of each function, timed in alternation so noise hits all alike.

  Args:
    fns: name -> zero-argument callable (its result is blocked on).
    repeats: timed rounds; each round calls every function once.
    warmup: untimed rounds first (compilation, caches).

  Returns:
    name -> median seconds per call.
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(value: Any) -> Any:
  """``value`` with absolute file paths made relative to the repository (else their name).

  Results are committed under ``docs/``; the paths a run was given on one
  machine mean nothing on another.
  """
  if isinstance(value, dict):
    return {k: portable(v) for k, v in value.items()}
  if isinstance(value, list):
    return [portable(v) for v in value]
  if isinstance(value, str) and os.path.isabs(value) and os.sep in value:
    inside = os.path.commonpath([_ROOT, os.path.abspath(value)]) == _ROOT
    return os.path.relpath(value, _ROOT) if inside else os.path.basename(value)
  return value


def write_json(result: dict, path: str | None) -> None:
  """Writes ``result`` (with the environment added) as indented JSON, if ``path``.

  The ``config`` entry's absolute paths are made portable (`portable`).
  """
  if not path:
    return
  result = {**result, "environment": result.get("environment") or environment()}
  if "config" in result:
    result["config"] = portable(result["config"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=float)
    f.write("\n")


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A plain-text table.

  Args:
    rows: dicts of values.
    columns: ``(key, header, format)`` per column, e.g. ``("ratio", "step/fwd", ".2f")``.

  Returns:
    The table, one line per row under a header line.
  """
  cells = [[h for _, h, _ in columns]]
  for row in rows:
    line = []
    for key, _, fmt in columns:
      value = row.get(key)
      line.append("-" if value is None else format(value, fmt))
    cells.append(line)
  widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
  out = []
  for line in cells:
    first, *rest = line
    out.append("  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]))
  return "\n".join(out)


def bar_chart(
  panels: Sequence[dict], path: str | None, ylabel: str, reference_label: str | None = None
) -> None:
  """Writes a row of bar charts as a PNG, if ``path``.

  Args:
    panels: one dict per chart: ``title``, ``values`` (label -> bar height)
      and optionally ``reference`` (label -> a value drawn as a black tick on
      that bar, e.g. the forward passes a step evaluates) and ``limit`` (a
      horizontal dashed line, e.g. a target).
    path: the PNG's path (None: nothing is written).
    ylabel: the y axis label of the first chart.
    reference_label: the legend entry of the ticks.
  """
  if not path or not panels:
    return
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, constrained_layout=True
  )
  for ax, panel in zip(axes[0], panels):
    labels = list(panel["values"])
    heights = [panel["values"][k] for k in labels]
    ax.bar(range(len(labels)), heights, color="tab:blue")
    for i, h in enumerate(heights):
      ax.annotate(f"{h:.2f}", (i, h), ha="center", va="bottom", fontsize=7)
    reference = panel.get("reference") or {}
    ticks = [(i, reference[k]) for i, k in enumerate(labels) if k in reference]
    if ticks:
      ax.scatter(
        [i for i, _ in ticks],
        [v for _, v in ticks],
        marker="_",
        s=300,
        color="black",
        label=reference_label,
        zorder=3,
      )
      if reference_label:
        ax.legend(fontsize=7, loc="upper left")
    if panel.get("limit") is not None:
      ax.axhline(panel["limit"], color="tab:red", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(panel["title"], fontsize=9)
  axes[0][0].set_ylabel(ylabel)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def png_path(json_path: str | None) -> str | None:
  """The PNG written beside a JSON result (``x.json`` -> ``x.png``), or None."""
  if not json_path:
    return None
  return os.path.splitext(json_path)[0] + ".png"


def read_checkpoint(directory: str | None, name: str, settings: dict) -> dict | None:
  """A finished part of a long benchmark saved by `write_checkpoint`, if its settings match.

  Long comparisons write each method's results as they finish, so that a run
  stopped part-way (the session ends, the machine is needed) resumes from
  the methods it has, given the same ``--resume-dir``. A part is only reused
  when every setting that shaped it is equal; a part from other settings is
  ignored (and overwritten when the method is run again).

  Args:
    directory: where parts are kept (None: resuming is off).
    name: the part's name (a method's label).
    settings: every setting that shapes the part, as JSON values.

  Returns:
    The saved payload, or None when there is none for these settings.
  """
  if not directory:
    return None
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if saved.get("settings") != json.loads(json.dumps(settings, default=float)):
    return None
  return saved["payload"]


def write_checkpoint(directory: str | None, name: str, settings: dict, payload: dict) -> None:
  """Saves ``payload`` (JSON values) for `read_checkpoint`, atomically (no half-written file)."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"settings": settings, "payload": payload}, f, default=float)
  os.replace(path + ".tmp", path)
