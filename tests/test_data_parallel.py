"""Data parallelism with scalar-only communication, on 4 forced CPU devices.

JAX fixes the device count when it starts, so the checks run in a fresh
interpreter with ``--xla_force_host_platform_device_count=4``.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import zojax

SCRIPT = textwrap.dedent(
  r"""
  import re
  import jax, jax.numpy as jnp, numpy as np, optax, chex
  from jax.sharding import Mesh, PartitionSpec as P
  import zojax

  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"hidden": {"kernel": jax.random.normal(k1, (6, 8)) * 0.4, "bias": jnp.zeros(8)},
            "head": {"kernel": jax.random.normal(k2, (8, 3)) * 0.4, "bias": jnp.zeros(3)}}

  def loss(p, batch):
    bx, by = batch
    h = jnp.tanh(bx @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()

  makers = {
    "mezo": lambda a: zojax.mezo(0.05, axis_name=a),
    "zo_muon": lambda a: zojax.zo_muon(0.05, rank=2, refresh_every=2, num_queries=2,
                                       vector_learning_rate=0.05, axis_name=a),
  }
  forwards = {"mezo": 2, "zo_muon": 3}
  # The global loss is a mean of shard means, equal to the single-device loss
  # only up to float32 rounding (~1e-7); the finite difference divides that by
  # eps = 1e-3, and Newton-Schulz does not damp it, hence the looser ZO-Muon bound.
  tol = {"mezo": 2e-5, "zo_muon": 2e-4}
  steps = 5
  for name, make in makers.items():
    single = make(None)

    @jax.jit
    def step(p, s, b, tx=single):
      u, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, u), s

    p1, s1 = params, single.init(params)
    for _ in range(steps):
      p1, s1 = step(p1, s1, (x, y))

    # pmap: batch split 4 ways, params and state replicated.
    tx = make("data")
    def pstep(p, s, b, tx=tx):
      u, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, u), s
    pstep = jax.pmap(pstep, axis_name="data")
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 4), t)
    pp, ps = rep(params), rep(tx.init(params))
    shards = (x.reshape(4, 8, 6), y.reshape(4, 8))
    for _ in range(steps):
      pp, ps = pstep(pp, ps, shards)
    for i in range(1, 4):  # replicas stay bit-identical
      replica = jax.tree.map(lambda a: a[i], pp)
      chex.assert_trees_all_equal(replica, jax.tree.map(lambda a: a[0], pp))
    first = jax.tree.map(lambda a: a[0], pp)
    chex.assert_trees_all_close(first, p1, atol=tol[name], rtol=tol[name])

    # The only cross-device traffic: all-reduces of a few float scalars.
    hlo = pstep.lower(pp, ps, shards).compile().as_text()
    reduced = re.findall(r"=\s*(\w+)\[([\d,]*)\][^=\n]*\sall-reduce(?:-start)?\(", hlo)
    assert reduced, "expected the loss values to be all-reduced"
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for _, dims in reduced]
    assert sum(sizes) <= forwards[name], (name, reduced)
    for op in ("all-gather", "collective-permute", "all-to-all"):
      assert op not in hlo, (name, op)

    # shard_map over a mesh.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    def body(p, s, b, tx=tx):
      u, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, u), s
    sstep = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("data")),
                                  out_specs=(P(), P())))
    p3, s3 = params, tx.init(params)
    for _ in range(steps):
      p3, s3 = sstep(p3, s3, (x, y))
    chex.assert_trees_all_close(p3, p1, atol=tol[name], rtol=tol[name])
    print(name, "ok")
  """
)


def test_pmap_and_shard_map_match_single_device_and_send_only_scalars():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "mezo ok" in result.stdout and "zo_muon ok" in result.stdout


def test_unbound_axis_name_is_a_clear_error():
  params = {"w": jnp.ones(3)}
  tx = zojax.zo_grad(axis_name="data")
  with pytest.raises(ValueError, match="not running under a jax.pmap"):
    jax.jit(lambda p, s: tx.update(None, s, p, value_fn=lambda q: jnp.sum(q["w"] ** 2)))(
      params, tx.init(params)
    )
