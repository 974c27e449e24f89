"""Tests for zojax.trajectory: a run replays bit for bit from its logged scalars."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from tests.test_presets import _classification_problem
from zojax import trajectory

STEPS = 10
EXACT = ("mezo_bcd",)  # under the suite's fast-compile flags; all three at default flags
PRESETS = {
  # Two queries and weight decay: the log row has two scalars, the chain more than zo_grad.
  "mezo": lambda: zojax.mezo(0.05, weight_decay=0.1, num_queries=2),
  # Block switches every 2 steps: the active block's estimator is recorded.
  "mezo_bcd": lambda: zojax.mezo_bcd(0.05, switch_every=2),
  # One-sided, subspace refreshes at steps 3, 6, 9, Newton-Schulz, momentum.
  "zo_muon": lambda: zojax.zo_muon(0.05, rank=4, refresh_every=3, vector_learning_rate=0.05),
}


def _run_and_record(tx, loss, params, steps, batches=None):
  """Runs ``steps`` jitted steps and returns the final (params, state) and the log rows."""

  @jax.jit
  def run(p, s, xs):
    def body(carry, x):
      p, s = carry
      value_fn = loss if x is None else (lambda q: loss(q) * x)
      u, s = tx.update(None, s, p, value_fn=value_fn)
      return (optax.apply_updates(p, u), s), trajectory.record(s)

    return jax.lax.scan(body, (p, s), xs, length=steps)

  return run(params, tx.init(params), batches)


def _comparable(state):
  """The state with keys as raw data and the (replay-NaN) loss fields zeroed."""

  def fix(node):
    if isinstance(node, (zojax.ZOGradState, zojax.BlockCoordinateState)):
      node = node._replace(loss=jnp.zeros([], jnp.float32))
    return node

  def walk(tree):
    nodes = (zojax.ZOGradState, zojax.BlockCoordinateState)
    return jax.tree.map(
      lambda n: fix(n) if isinstance(n, nodes) else n,
      tree,
      is_leaf=lambda n: isinstance(n, nodes),
    )

  def keys_as_data(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x

  once = walk(state)
  # BlockCoordinateState holds ZOGradStates; walk again below the outer node.
  once = jax.tree.map(
    lambda n: (
      n._replace(inner_states=walk(n.inner_states))
      if isinstance(n, zojax.BlockCoordinateState)
      else n
    ),
    once,
    is_leaf=lambda n: isinstance(n, zojax.BlockCoordinateState),
  )
  return jax.tree.map(keys_as_data, once)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_replay_reproduces_the_run_bit_for_bit(name):
  params, loss = _classification_problem()
  tx = PRESETS[name]()
  (p_run, s_run), rows = _run_and_record(tx, loss, params, STEPS)
  assert rows.shape[0] == STEPS and rows.dtype == jnp.float32
  assert np.all(np.asarray(rows) != 0.0)

  log = trajectory.TrajectoryLog(0, np.asarray(rows))
  p_rep, s_rep = trajectory.replay(tx, params, tx.init(params), log)

  if name in EXACT:
    chex.assert_trees_all_equal(p_rep, p_run)
    chex.assert_trees_all_equal(_comparable(s_rep), _comparable(s_run))
  else:
    # Bit-identical under default XLA flags (next test); with the suite's
    # fast-compile flags (conftest.py) the two programs are code-generated
    # differently and a few entries differ in their last bit (~4e-9).
    chex.assert_trees_all_close(p_rep, p_run, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(_comparable(s_rep), _comparable(s_run), rtol=1e-5, atol=1e-6)
  # The parameters did move, so equality is not vacuous.
  assert not np.array_equal(p_run["l1"]["kernel"], params["l1"]["kernel"])


_DEFAULT_FLAGS_CHECK = """
import json, numpy as np, jax
from tests.test_trajectory import PRESETS, _run_and_record, _classification_problem
from zojax import trajectory
params, loss = _classification_problem()
out = {}
for name in PRESETS:
  tx = PRESETS[name]()
  (p_run, _), rows = _run_and_record(tx, loss, params, 10)
  log = trajectory.TrajectoryLog(0, np.asarray(rows))
  p_rep, _ = trajectory.replay(tx, params, tx.init(params), log)
  pairs = zip(jax.tree.leaves(p_run), jax.tree.leaves(p_rep))
  out[name] = all(np.array_equal(a, b) for a, b in pairs)
print(json.dumps(out))
"""


def test_replay_bit_for_bit_at_default_xla_flags():
  # The suite compiles with fast-compile flags; at XLA's defaults (what users
  # run) every preset's replay must equal its run bit for bit.
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # Drop the suite's fast-compile flags but keep any other (e.g. CI's
  # --xla_cpu_max_isa run): replay must equal the run on every CPU's arithmetic.
  from conftest import _FAST_COMPILE

  flags = os.environ.get("XLA_FLAGS", "").replace(_FAST_COMPILE, "").strip()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if flags:
    env["XLA_FLAGS"] = flags
  proc = subprocess.run(
    [sys.executable, "-c", _DEFAULT_FLAGS_CHECK],
    cwd=root,
    env=dict(env, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == {name: True for name in PRESETS}, result


def _tiny_problem():
  params = {"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.ones(2)}
  return params, lambda p: jnp.sum((p["w"] @ jnp.ones(2) + p["b"]) ** 2)


def test_replay_of_a_skipped_nonfinite_step():
  params, loss = _tiny_problem()
  tx = zojax.mezo(0.05)
  scales = jnp.ones(6).at[2].set(jnp.nan)
  (p_run, s_run), rows = _run_and_record(tx, loss, params, 6, scales)
  assert int(s_run[0].num_nonfinite) == 1
  np.testing.assert_array_equal(rows[2], np.zeros(1))
  p_rep, _ = trajectory.replay(tx, params, tx.init(params), trajectory.TrajectoryLog(0, rows))
  chex.assert_trees_all_equal(p_rep, p_run)


def test_replay_of_a_clipped_run_with_a_skipped_step():
  # The log holds the c_i as applied (clipped), and replay does not clip
  # again; skipped steps log zeros, which the running RMS does not average
  # in either run, so the replayed clipping state matches too.
  params, loss = _tiny_problem()
  tx = zojax.mezo(0.01, clip_c=3.0)
  scales = jnp.ones(8).at[3].set(jnp.nan).at[5].set(1e3)
  (p_run, s_run), rows = _run_and_record(tx, loss, params, 8, scales)
  assert int(s_run[0].num_nonfinite) == 1 and int(s_run[0].c_count) == 7
  assert np.all(np.abs(rows[5]) < 100.0)  # clipped: unclipped it is 1e3 times a normal c
  p_rep, s_rep = trajectory.replay(tx, params, tx.init(params), trajectory.TrajectoryLog(0, rows))
  chex.assert_trees_all_equal(p_rep, p_run)
  chex.assert_trees_all_equal(
    (s_rep[0].c_mean_square, s_rep[0].c_count), (s_run[0].c_mean_square, s_run[0].c_count)
  )


def test_replay_resumes_from_a_midway_state():
  params, loss = _tiny_problem()
  tx = zojax.mezo(0.05)
  (p_run, _), rows = _run_and_record(tx, loss, params, 6)
  rows = np.asarray(rows)
  first = trajectory.TrajectoryLog(0, rows[:3])
  second = trajectory.TrajectoryLog(3, rows[3:])
  p_mid, s_mid = trajectory.replay(tx, params, tx.init(params), first)
  p_end, _ = trajectory.replay(tx, p_mid, s_mid, second)
  chex.assert_trees_all_equal(p_end, p_run)
  joined = trajectory.concatenate([first, second])
  np.testing.assert_array_equal(joined.projected_grads, rows)
  with pytest.raises(ValueError, match="starts at step 3 but the optimizer state has taken 0"):
    trajectory.replay(tx, params, tx.init(params), second)


def test_log_file_round_trip_and_size(tmp_path):
  rows = np.random.default_rng(0).normal(size=(100_000, 1)).astype(np.float32)
  path = tmp_path / "run.npz"
  trajectory.save(path, trajectory.TrajectoryLog(7, rows))
  loaded = trajectory.load(path)
  assert loaded.start_step == 7
  np.testing.assert_array_equal(loaded.projected_grads, rows)
  # 100k MeZO steps: 4 bytes per step plus the npz headers.
  assert path.stat().st_size <= 100_000 * 4 + 1024


def test_record_and_replay_errors():
  params = {"w": jnp.ones(3)}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(ValueError, match="exactly one zo_grad estimator; found 0"):
    trajectory.record(optax.adam(0.1).init(params))
  two = optax.chain(zojax.zo_grad(), zojax.zo_grad())
  with pytest.raises(ValueError, match="found 2"):
    trajectory.record(two.init(params))
  with pytest.raises(ValueError, match="not consecutive"):
    trajectory.concatenate(
      [trajectory.TrajectoryLog(0, np.zeros((3, 1))), trajectory.TrajectoryLog(4, np.zeros((1, 1)))]
    )
  tx = zojax.mezo(0.1, num_queries=2)
  with pytest.raises(ValueError, match="records 1 scalars per step but the optimizer takes 2"):
    trajectory.replay(tx, params, tx.init(params), trajectory.TrajectoryLog(0, np.zeros((3, 1))))
  est = zojax.zo_grad()
  with pytest.raises(ValueError, match="pass one or the other"):
    est.update(None, est.init(params), params, value_fn=loss, projected_grads=jnp.zeros(1))
  with pytest.raises(ValueError, match=r"shape \(1,\)"):
    est.update(None, est.init(params), params, projected_grads=jnp.zeros(2))
