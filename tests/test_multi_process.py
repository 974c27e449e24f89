"""The README's multi-host recipe, run in 2 JAX processes on this machine.

Two processes (`tests.multi_process`), each with 2 CPU devices, join one run
through `jax.distributed.initialize` with a coordinator on 127.0.0.1 and
JAX's CPU collectives (gloo, the default of ``jax_cpu_collectives_implementation``
in jax 0.10.2). Each trains with MeZO and with ZO-Muon for a few steps as the
README says: a 4-device mesh, parameters and state replicated, every process
feeding only its rows of each global batch through
`jax.make_array_from_process_local_data`. The test checks that

(a) both processes end with the same parameters and state, bit for bit (every
    local shard of every leaf);
(b) these equal a single-process run on the global batches (in float64,
    under a bound derived below; ZO-Muon's subspace step is float32);
(c) the compiled step all-reduces only scalars, one per forward pass, and has
    no other collective;
(d) the checkpoint both processes wrote restores in this single process,
    verified against its digest, and equals their final parameters and state.
"""

import os
import re
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import zojax
from benchmarks.hlo import other_collectives, reduced_floats
from tests import multi_process, numerics
from zojax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # seconds for both processes; they take 15-40 s on 2 busy cores


# (b) The two programs (4 devices over 2 processes; 1 device) sum the loss
# in different orders. MeZO in float64: that rounding, ~1e-16 relative, is
# amplified by 1/eps to ~1e-13 in each c_i (tests/numerics.py); the c_i are
# then stored in float32 (ZOGradState), so the two runs' c_i round alike or,
# near a rounding boundary, one float32 ulp apart (2^-23 |c_i|, hence the
# rtol of the float32 leaves). A MeZO step moves a weight by lr |c| |z|, so
# such an ulp moves it by at most 0.05 * 2^-23 * 4 * 5 = 1.2e-7 per step
# (|c| < 4, checked; |z| < 5 for the 80 Gaussian entries of a direction): 5e-7 after four
# steps. ZO-Muon's subspace step runs in float32 whatever the weights' dtype
# (bases, coordinates and Newton-Schulz, zojax/subspaces.py), so its bound is
# the float32 one of tests/test_data_parallel.py, for the same model,
# learning rate, rank, queries and steps: 2e-4, on every float leaf.
TOL = {"mezo": (5e-7, 2 * numerics.F32_UNIT_ROUNDOFF), "zo_muon": (2e-4, 0.0)}


def _reference(name):
  """The single-process run on the global batches, in float64: (params, state, scalars c_i)."""
  params, batches, loss = multi_process.problem(np.float64)
  tx = multi_process.PRESETS[name][0]()
  step = jax.jit(multi_process.train_step(tx, loss))
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  scalars = []
  for batch in batches:
    params, state = step(params, state, batch)
    scalars.append(np.concatenate([np.ravel(c) for c in _projected_grads(state)]))
  return params, state, np.stack(scalars)


def _projected_grads(state):
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, zojax.ZOGradState))
  return [n.projected_grads for n in nodes if isinstance(n, zojax.ZOGradState)]


def _shards(path):
  """``{leaf index: [shard arrays]}`` from a process's .npz."""
  out = {}
  with np.load(path) as data:
    for key in sorted(data.files, key=lambda k: tuple(map(int, k.split("/")))):
      out.setdefault(int(key.split("/")[0]), []).append(data[key])
  return out


def _all_reduced_shapes(hlo):
  """The result type of every all-reduce in an HLO module's text, e.g. ``"f64[]"``."""
  return re.findall(r"^\s*(?:ROOT )?%\S+ = (.+?) all-reduce(?:-start)?\(", hlo, re.MULTILINE)


def _run_two_processes(out):
  """Runs every preset in 2 processes, writing their results under ``out``."""
  port = multi_process.free_port()
  names = list(multi_process.PRESETS)
  results = multi_process.launch(
    lambda i: [sys.executable, "-m", "tests.multi_process", str(i), str(port), str(out), *names],
    multi_process.NUM_PROCESSES,
    timeout=TIMEOUT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    cwd=ROOT,
  )
  assert all(r.returncode == 0 for r in results), multi_process.report(results)
  for r in results:
    assert all(f"{name} done" in r.stdout for name in names), multi_process.report(results)


# One test for both presets: the processes start once (a module fixture would
# start them once per pytest-xdist worker).
def test_two_processes_match_one(tmp_path):
  _run_two_processes(tmp_path)
  for name in multi_process.PRESETS:
    _check_preset(name, tmp_path)


def _check_preset(name, runs):
  per_process = [_shards(runs / f"{name}-{i}.npz") for i in range(multi_process.NUM_PROCESSES)]
  # (a) Every shard of every leaf, on both processes, is the same array.
  first = per_process[0]
  for shards in per_process:
    assert shards.keys() == first.keys()
    for i, leaf in shards.items():
      assert len(leaf) == multi_process.DEVICES_PER_PROCESS
      for shard in leaf:
        np.testing.assert_array_equal(shard, first[i][0])
  final = [first[i][0] for i in sorted(first)]

  with numerics.float64():
    params, state, scalars = _reference(name)
    expected = [np.asarray(x) for x in jax.tree.leaves(multi_process.plain((params, state)))]
    assert len(expected) == len(final)
    # (b) Within the bound of each preset (see TOL), which is below a
    # twentieth of how far the weights move.
    tol, f32_rtol = TOL[name]
    initial = jax.tree.leaves(multi_process.problem(np.float64)[0])
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), initial))
    assert moved > 20 * tol, moved
    assert np.max(np.abs(scalars)) < 4, scalars  # the |c| MeZO's bound assumes
    for got, want in zip(final, expected):
      if want.dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
      elif np.issubdtype(want.dtype, np.floating):  # float32 state: c_i, losses, bases
        np.testing.assert_allclose(got, want, rtol=f32_rtol, atol=0 if f32_rtol else tol)
      else:  # counts, keys
        np.testing.assert_array_equal(got, want)

    # (c) Only scalars cross devices: one all-reduce of a float64 scalar per
    # forward pass, and nothing else.
    forwards = multi_process.PRESETS[name][1]
    for i in range(multi_process.NUM_PROCESSES):
      hlo = (runs / f"{name}-{i}.hlo").read_text()
      shapes = _all_reduced_shapes(hlo)
      assert shapes and all(re.fullmatch(r"f64\[\](\{\})?", s) for s in shapes), shapes
      assert reduced_floats(hlo) == forwards
      assert other_collectives(hlo) == {}

    # (d) The checkpoint the two processes wrote, restored here (one process,
    # one device) into a freshly built optimizer: verified against the digest
    # saved with it, and equal to the final parameters and state.
    template_params = jax.tree.map(jnp.asarray, multi_process.problem(np.float64)[0])
    tx = multi_process.PRESETS[name][0]()
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(runs / f"{name}-ckpt", options=options) as manager:
      meta = checkpointing.metadata(manager)
      assert meta["step"] == multi_process.STEPS
      assert meta["arrays_sha256"] is not None  # replicated arrays are hashed, so verified
      restored = checkpointing.restore(
        manager, None, template_params, tx.init(template_params), config={"preset": name}
      )
    restored = [np.asarray(x) for x in jax.tree.leaves(multi_process.plain(restored))]
    chex.assert_trees_all_equal(restored, final)


def test_launch_stops_the_others_when_one_fails():
  # Process 0 fails at once; process 1 would sleep for a minute.
  script = "import sys, time; sys.exit(3) if sys.argv[1] == '0' else time.sleep(60)"
  start = time.monotonic()
  results = multi_process.launch(lambda i: [sys.executable, "-c", script, str(i)], 2, timeout=60)
  assert time.monotonic() - start < 30
  assert results[0].returncode == 3 and results[1].returncode < 0  # killed by a signal


def test_launch_kills_every_process_after_its_timeout():
  script = "import time; print('started', flush=True); time.sleep(60)"
  results = multi_process.launch(lambda i: [sys.executable, "-c", script], 2, timeout=3)
  assert all(r.returncode < 0 and "timed out" in r.stderr for r in results)
  assert all(r.stdout == "started\n" for r in results)
