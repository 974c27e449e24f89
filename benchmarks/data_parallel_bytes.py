"""Data parallel: bytes the compiled step all-reduces per step, from the HLO, for each preset.

A zeroth-order step needs from the other replicas only its loss values, one
float per forward pass, where a first-order data-parallel step all-reduces
the whole gradient, ``d`` floats. This benchmark reads that off the programs
XLA actually runs: for every zojax preset and for a first-order backprop step
(``--first-order``, Adam by default) on the same MLP, it compiles one training
step on ``--devices`` forced CPU devices in three data-parallel modes,

* ``jit``: plain `jax.jit`, the batch sharded over a 1-D mesh and the params
  and optimizer state replicated (``axis_name=None``; XLA's SPMD partitioner
  inserts the collectives),
* ``pmap``: `jax.pmap` with ``axis_name="data"`` (params and state stacked),
* ``shard_map``: `jax.shard_map` over the mesh with ``axis_name="data"``,

and walks the compiled HLO text (`benchmarks.hlo.reduced_bytes`): the bytes
one step all-reduces, with loop bodies counted by their trip count and a
conditional by its costliest branch. The first-order step takes the ``pmean``
of its gradient over ``"data"`` under ``pmap``; under ``shard_map`` autodiff
already sums it over the replicated params (see `_first_order_step`). Its
three modes are run for one step and checked to agree. It prints, per method and mode, the
bytes, the forward passes per step, the number of parameters ``d``, the ratio
``first-order bytes / method bytes`` in the same mode, and any collective
other than all-reduce found in the program (there should be none).

JAX fixes the device count when it starts, so `main` re-runs this module in a
child interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and ``JAX_PLATFORMS=cpu``. The ZO steps are only compiled, not run; compilation
uses ``--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false``
(machine code only, not the partitioned HLO) unless ``--full-compile``.

Example:
  python -m benchmarks.data_parallel_bytes --devices 4 --width 256 --layers 2 \\
    --out data_parallel_bytes.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import zojax
from benchmarks import hlo
from benchmarks.common import environment, format_table, write_json

_CHILD = "ZOJAX_DATA_PARALLEL_BYTES_CHILD"
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
MODES = ("jit", "pmap", "shard_map")


def make_problem(
  inputs: int, width: int, layers: int, classes: int, batch: int, seed: int = 0
) -> tuple[dict, Callable, tuple]:
  """A tanh MLP (``layers`` hidden layers of ``width``) with a cross-entropy loss.

  Returns:
    ``(params, loss, batch)`` with ``loss(params, batch)`` a float32 scalar,
    the mean over the batch (so a sharded batch needs one all-reduce of it).
  """
  keys = jax.random.split(jax.random.key(seed), layers + 3)
  sizes = [inputs] + [width] * layers
  params = {
    f"layer_{i:02d}": {
      "kernel": jax.random.normal(keys[i], (sizes[i], sizes[i + 1])) / np.sqrt(sizes[i]),
      "bias": jnp.zeros(sizes[i + 1]),
    }
    for i in range(layers)
  }
  params["head"] = {
    "kernel": jax.random.normal(keys[layers], (width, classes)) / np.sqrt(width),
    "bias": jnp.zeros(classes),
  }
  x = jax.random.normal(keys[-2], (batch, inputs))
  y = jax.random.randint(keys[-1], (batch,), 0, classes)

  def loss(p, b):
    h, labels = b
    for i in range(layers):
      h = jnp.tanh(h @ p[f"layer_{i:02d}"]["kernel"] + p[f"layer_{i:02d}"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss, (x, y)


def zo_methods(rank: int, num_queries: int) -> dict[str, tuple[Callable, int]]:
  """Each preset as ``axis_name -> transform``, with its forward passes per step."""
  two = zojax.forwards_per_step(1, "two_sided")
  one = zojax.forwards_per_step(num_queries, "one_sided")
  sub = {"rank": rank, "refresh_every": 2}
  return {
    "mezo": (lambda a: zojax.mezo(1e-3, axis_name=a), two),
    "mezo_bcd": (lambda a: zojax.mezo_bcd(1e-3, switch_every=1, axis_name=a), two),
    "zo_muon": (
      lambda a: zojax.zo_muon(1e-2, num_queries=num_queries, axis_name=a, **sub),
      one,
    ),
    "zo_mopi": (
      lambda a: zojax.zo_mopi(
        1e-2, k=max(1, rank // 2), num_queries=num_queries, axis_name=a, **sub
      ),
      one,
    ),
    "lozo": (lambda a: zojax.lozo(1e-3, axis_name=a, **sub), two),
    "lozo_m": (lambda a: zojax.lozo_m(1e-3, axis_name=a, **sub), two),
    "subzero": (lambda a: zojax.subzero(1e-3, axis_name=a, **sub), two),
  }


def _zo_step(tx, loss, mode):
  del mode  # the transform was built with its axis_name

  def step(p, s, b):
    updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
    return optax.apply_updates(p, updates), s

  return step


def _first_order_step(tx, loss, mode):
  def step(p, s, b):
    grads = jax.grad(loss)(p, b)
    if mode == "pmap":
      grads = jax.lax.pmean(grads, "data")
    elif mode == "shard_map":
      # Params enter replicated, so autodiff already sums the gradient over
      # "data" (the transpose of the implicit broadcast to the device-varying
      # batch is a psum); a pmean here would all-reduce it a second time.
      grads = jax.tree.map(lambda g: g / jax.lax.axis_size("data"), grads)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return step


def compile_modes(make_tx, make_step, params, batch, devices: int) -> dict[str, tuple]:
  """One step compiled in each data-parallel mode, with arguments to run it on.

  Args:
    make_tx: ``axis_name -> optax transform`` (``None`` for plain jit).
    make_step: ``(tx, mode) -> step(params, state, batch) -> (params, state)``.
    params: the (unreplicated) parameters.
    batch: the global batch, split along its leading axis.
    devices: the number of devices to shard over.

  Returns:
    mode -> ``(compiled, args, unstack)``, where ``unstack(compiled(*args)[0])``
    are the updated parameters as one tree.
  """
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  same = lambda p: p
  out = {}

  tx = make_tx(None)
  put = lambda t: jax.device_put(t, replicated)
  args = (put(params), put(tx.init(params)), jax.device_put(batch, by_row))
  step = jax.jit(make_step(tx, "jit"), out_shardings=replicated)
  out["jit"] = (step.lower(*args).compile(), args, same)

  tx = make_tx("data")
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * devices), t)
  split = jax.tree.map(lambda a: a.reshape(devices, -1, *a.shape[1:]), batch)
  args = (stack(params), stack(tx.init(params)), split)
  step = jax.pmap(make_step(tx, "pmap"), axis_name="data", devices=jax.devices()[:devices])
  out["pmap"] = (step.lower(*args).compile(), args, lambda p: jax.tree.map(lambda a: a[0], p))

  spmd = jax.shard_map(
    make_step(tx, "shard_map"), mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P())
  )
  args = (params, tx.init(params), batch)
  out["shard_map"] = (jax.jit(spmd).lower(*args).compile(), args, same)
  return out


def _traffic(text: str) -> dict:
  other = hlo.other_collectives(text)
  return {
    "bytes": hlo.reduced_bytes(text),
    "other_collectives": ", ".join(f"{k} x{v}" for k, v in sorted(other.items())) or "-",
  }


def measure(args: argparse.Namespace) -> dict:
  """Compiles every method in every mode and reads its all-reduced bytes (in this process)."""
  if jax.device_count() < args.devices:
    raise RuntimeError(f"need {args.devices} devices, have {jax.devices()}")
  params, loss, batch = make_problem(args.inputs, args.width, args.layers, args.classes, args.batch)
  d = sum(a.size for a in jax.tree.leaves(params))
  optimizers = {"sgd": optax.sgd(1e-2), "adam": optax.adam(1e-3)}
  first_order = f"first_order_{args.first_order}"
  methods = {first_order: (lambda a: optimizers[args.first_order], None)}
  methods.update(zo_methods(args.rank, args.num_queries))
  traffic = {}
  for name, (make_tx, forwards) in methods.items():
    if args.only and name not in args.only and name != first_order:
      continue
    start = time.perf_counter()
    build = _first_order_step if forwards is None else _zo_step
    make_step = lambda tx, mode, build=build: build(tx, loss, mode)
    compiled = compile_modes(make_tx, make_step, params, batch, args.devices)
    traffic[name] = {mode: _traffic(c.as_text()) for mode, (c, _, _) in compiled.items()}
    if forwards is None:
      # The three first-order steps must agree: one step each, against plain jit.
      stepped = {mode: un(c(*a)[0]) for mode, (c, a, un) in compiled.items()}
      for mode in MODES:
        chex.assert_trees_all_close(stepped[mode], stepped["jit"], atol=1e-5, rtol=1e-4)
    print(f"  compiled {name} in 3 modes: {time.perf_counter() - start:.1f} s", flush=True)
  rows = []
  for name, by_mode in traffic.items():
    forwards = methods[name][1]
    for mode in MODES:
      t = by_mode[mode]
      fo = traffic[first_order][mode]["bytes"]
      rows.append(
        {
          "method": name,
          "mode": mode,
          "passes": "1 fwd + 1 bwd" if forwards is None else f"{forwards} fwd",
          "forwards_per_step": 1 if forwards is None else forwards,
          "backward_per_step": 1 if forwards is None else 0,
          "num_params": d,
          "bytes_all_reduced": t["bytes"],
          "first_order_over_method": fo / t["bytes"] if t["bytes"] else None,
          "other_collectives": t["other_collectives"],
        }
      )
  return {
    "benchmark": "data_parallel_bytes",
    "config": {k: v for k, v in vars(args).items() if k != "result_file"},
    "num_params": d,
    "first_order": first_order,
    "environment": environment(),
    "rows": rows,
  }


COLUMNS = [
  ("method", "method", "s"),
  ("mode", "mode", "s"),
  ("passes", "passes/step", "s"),
  ("num_params", "d", "d"),
  ("bytes_all_reduced", "bytes all-reduced", "d"),
  ("first_order_over_method", "first-order / this", ".1f"),
  ("other_collectives", "other collectives", "s"),
]


def _child_env(devices: int, full_compile: bool) -> dict:
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  if not full_compile:
    flags.append(_FAST_COMPILE)
  return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **{_CHILD: "1"})


def main(argv: Sequence[str] | None = None) -> dict:
  """Parses ``argv``, measures (in a child interpreter with N devices), prints, writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=4, help="forced CPU devices N")
  parser.add_argument("--inputs", type=int, default=32, help="input features")
  parser.add_argument("--width", type=int, default=256, help="hidden width")
  parser.add_argument("--layers", type=int, default=2, help="hidden layers")
  parser.add_argument("--classes", type=int, default=10, help="output classes")
  parser.add_argument("--batch", type=int, default=64, help="global batch (a multiple of N)")
  parser.add_argument("--rank", type=int, default=8, help="rank of the subspace presets")
  parser.add_argument(
    "--num-queries", type=int, default=4, help="queries q of ZO-Muon / ZO-MOPI (q+1 forwards)"
  )
  parser.add_argument("--first-order", choices=("adam", "sgd"), default="adam")
  parser.add_argument("--only", nargs="*", help="only these presets (first-order always runs)")
  parser.add_argument(
    "--full-compile", action="store_true", help="compile with XLA's default backend flags"
  )
  parser.add_argument("--quick", action="store_true", help="a smaller MLP (width 64, batch 32)")
  parser.add_argument("--out", help="write the results as JSON to this path")
  parser.add_argument("--result-file", help=argparse.SUPPRESS)  # the child's answer
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  if args.quick:
    args.width, args.batch = 64, 32
  if args.batch % args.devices:
    parser.error(f"--batch {args.batch} is not a multiple of --devices {args.devices}")

  if os.environ.get(_CHILD) == "1":
    result = measure(args)
    if args.result_file:
      with open(args.result_file, "w") as f:
        json.dump(result, f, default=float)
  else:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "result.json")
      subprocess.run(
        [sys.executable, "-m", "benchmarks.data_parallel_bytes", *argv, "--result-file", path],
        env=_child_env(args.devices, args.full_compile),
        cwd=root,
        check=True,
      )
      with open(path) as f:
        result = json.load(f)
    env = result["environment"]
    print(
      f"\nd = {result['num_params']} parameters, {len(env['devices'])} {env['backend']} devices, "
      f"jax {env['jax']}; bytes all-reduced by one compiled step:"
    )
    print(format_table(result["rows"], COLUMNS))
    write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
