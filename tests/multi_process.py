"""Runs of one program in several JAX processes on this machine (`jax.distributed` on CPU).

`launch` starts the processes, each with its own output files, and stops all
of them as soon as one fails or the time is up, so that a test never leaves
a process behind (a process whose peer died otherwise waits for it: in
`jax.distributed.initialize` for up to 300 s, at a collective until JAX's
heartbeat timeout, 100 s). `free_port` finds a
port for the coordinator.

Run as a program (``python -m tests.multi_process ...``), this module is one
process of the README's multi-host recipe, on a problem small enough for a
test: `main` joins the run, trains a tiny MLP with each preset it is given,
every process on its own rows of every global batch, and writes what
``tests/test_multi_process.py`` checks: the local shards of the final
parameters and state, the compiled step's HLO text, and a checkpoint.
`problem`, `PRESETS` and `train_step` are shared with the test's
single-process reference run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 4
GLOBAL_BATCH = 16
LEARNING_RATE = 0.05


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Finished:
  """What one process of `launch` left: its exit code and its output."""

  returncode: int
  stdout: str
  stderr: str


def launch(
  command: Callable[[int], Sequence[str]],
  num_processes: int,
  *,
  timeout: float,
  env: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
  cwd: str | None = None,
) -> list[Finished]:
  """Runs ``command(i)`` for each process ``i`` at once and waits for all of them.

  Each process writes to its own temporary files (no pipe can fill up and
  block it). When one exits with an error, or ``timeout`` seconds have
  passed, the others are killed; every process is killed if the wait itself
  is interrupted.

  Args:
    command: the argv of process ``i``.
    num_processes: how many processes to start.
    timeout: seconds for all of them together.
    env: their environment (None: this process's), or a function giving
      process ``i``'s.
    cwd: their working directory.

  Returns:
    A `Finished` per process, in order. A process killed after a peer's
    failure has a negative return code; a timeout kills all and sets
    ``returncode`` to -9 with ``"timed out"`` appended to its stderr.
  """
  with tempfile.TemporaryDirectory() as tmp:
    procs, files = [], []
    try:
      for i in range(num_processes):
        out = open(os.path.join(tmp, f"{i}.out"), "w+")  # noqa: SIM115
        err = open(os.path.join(tmp, f"{i}.err"), "w+")  # noqa: SIM115
        files.append((out, err))
        env_i = env(i) if callable(env) else env
        procs.append(subprocess.Popen(list(command(i)), stdout=out, stderr=err, env=env_i, cwd=cwd))
      deadline = time.monotonic() + timeout
      timed_out = False
      while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
          break  # a peer failed: the others would wait for it
        if time.monotonic() > deadline:
          timed_out = True
          break
        time.sleep(0.1)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      stderr = err.read() + ("\ntimed out" if timed_out else "")
      results.append(Finished(p.returncode, out.read(), stderr))
      out.close()
      err.close()
    return results


def report(results: Sequence[Finished]) -> str:
  """The exit codes and output of every process, for an assertion message."""
  return "\n".join(
    f"--- process {i}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    for i, r in enumerate(results)
  )


# ----------------------------------------------------------------------------- the problem


def problem(dtype):
  """A tiny MLP, its data and loss: ``(params, batches, loss)``.

  ``batches`` holds `STEPS` global batches of `GLOBAL_BATCH` rows, as NumPy
  arrays; process ``i`` of ``n`` feeds rows ``[i B / n, (i + 1) B / n)`` of each.
  """
  import jax
  import jax.numpy as jnp
  import optax

  rng = np.random.default_rng(0)
  x = rng.normal(size=(STEPS, GLOBAL_BATCH, 6)).astype(dtype)
  y = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {
    "hidden": {
      "kernel": np.asarray(jax.random.normal(k1, (6, 8), dtype) * 0.4),
      "bias": np.zeros(8, dtype),
    },
    "head": {"kernel": np.asarray(jax.random.normal(k2, (8, 3), dtype) * 0.4)},
  }

  def loss(p, batch):
    bx, by = batch
    h = jnp.tanh(bx @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    logits = h @ p["head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()

  return params, [(x[t], y[t]) for t in range(STEPS)], loss


def _mezo():
  import zojax

  return zojax.mezo(LEARNING_RATE, key=0)


def _zo_muon():
  import zojax

  # A subspace refresh at step 2 falls within the run.
  return zojax.zo_muon(
    LEARNING_RATE, rank=2, refresh_every=2, num_queries=2, vector_learning_rate=LEARNING_RATE
  )


# name: (optimizer factory, forward passes per step)
PRESETS = {"mezo": (_mezo, 2), "zo_muon": (_zo_muon, 3)}


def train_step(tx, loss):
  """``(params, opt_state, batch) -> (params, opt_state)``: one step of ``tx``."""
  import optax

  def step(params, opt_state, batch):
    updates, opt_state = tx.update(None, opt_state, params, value_fn=lambda p: loss(p, batch))
    return optax.apply_updates(params, updates), opt_state

  return step


def plain(tree):
  """``tree`` with typed keys replaced by their key data, so that they compare as arrays."""
  import jax

  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree)


# ----------------------------------------------------------------------------- one process


def main(argv: Sequence[str]) -> None:
  """One process: ``PROCESS_ID PORT OUT_DIR PRESET...``."""
  process_id, port, out = int(argv[0]), int(argv[1]), argv[2]
  import jax

  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_enable_x64", True)
  # Before any other JAX call, as the README says.
  jax.distributed.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)

  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from zojax import checkpointing

  assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()

  # The README's recipe, step for step.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  put = lambda x: jax.make_array_from_process_local_data(replicated, x)
  host_params, batches, loss = problem(np.float64)
  rows = GLOBAL_BATCH // NUM_PROCESSES
  mine = slice(process_id * rows, (process_id + 1) * rows)  # this process's rows only
  for name in argv[3:]:
    tx = PRESETS[name][0]()
    params = jax.tree.map(put, host_params)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = jax.jit(train_step(tx, loss), out_shardings=replicated)
    compiled = None
    for global_batch in batches:
      local = tuple(a[mine] for a in global_batch)
      batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(by_row, a), local)
      if compiled is None:
        compiled = step.lower(params, opt_state, batch).compile()
      params, opt_state = compiled(params, opt_state, batch)
    with open(os.path.join(out, f"{name}-{process_id}.hlo"), "w") as f:
      f.write(compiled.as_text())
    # Every local shard of every leaf, as this process holds it.
    shards = {}
    for i, leaf in enumerate(jax.tree.leaves(plain((params, opt_state)))):
      for j, shard in enumerate(leaf.addressable_shards):
        shards[f"{i}/{j}"] = np.asarray(shard.data)
    np.savez(os.path.join(out, f"{name}-{process_id}.npz"), **shards)
    # Every process calls save (orbax coordinates the writers).
    with ocp.CheckpointManager(os.path.join(out, f"{name}-ckpt")) as manager:
      checkpointing.save(manager, STEPS, params, opt_state, config={"preset": name})
    print(f"{name} done", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
