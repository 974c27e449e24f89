"""Data parallelism with scalar-only communication, on 4 forced CPU devices.

Every preset is run for a few steps in three data-parallel modes: `jax.pmap`
and `jax.shard_map` with ``axis_name="data"``, and plain `jax.jit` with the
batch sharded over a mesh and ``axis_name=None``. Each run must match the
single-device run on the global batch, keep its replicas bit-identical, and
compile to a step whose only collectives are all-reduces of at most one float
per forward pass.

JAX fixes the device count when it starts, so the checks run in a fresh
interpreter with ``--xla_force_host_platform_device_count=4``, one per group of
presets so that pytest-xdist can run the groups side by side.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import zojax
from benchmarks.hlo import hlo_computations, reduced_floats  # cross-device traffic, from HLO

SCRIPT = textwrap.dedent(
  r"""
  import sys
  import jax, jax.numpy as jnp, numpy as np, optax, chex
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import zojax
  from benchmarks.hlo import OTHER_COLLECTIVES as FORBIDDEN, reduced_floats

  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"hidden": {"kernel": jax.random.normal(k1, (6, 8)) * 0.4, "bias": jnp.zeros(8)},
            "head": {"kernel": jax.random.normal(k2, (8, 3)) * 0.4}}

  def loss(p, batch):
    bx, by = batch
    h = jnp.tanh(bx @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    logits = h @ p["head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, by).mean()

  # Settings under which the 4 steps include a subspace refresh (at step 2)
  # and a block switch (every step; mezo_bcd's default blocks are the two
  # top-level modules). Second entry: forward passes per step.
  two, one = zojax.forwards_per_step(1, "two_sided"), zojax.forwards_per_step(2, "one_sided")
  PRESETS = {
    "mezo": (lambda a: zojax.mezo(0.05, axis_name=a), two),
    "mezo_bcd": (lambda a: zojax.mezo_bcd(0.05, switch_every=1, axis_name=a), two),
    "zo_muon": (lambda a: zojax.zo_muon(0.05, rank=2, refresh_every=2, num_queries=2,
                                        vector_learning_rate=0.05, axis_name=a), one),
    "zo_mopi": (lambda a: zojax.zo_mopi(0.05, rank=2, k=1, refresh_every=2, num_queries=2,
                                        vector_learning_rate=0.05, axis_name=a), one),
    "lozo": (lambda a: zojax.lozo(0.05, rank=2, refresh_every=2, axis_name=a), two),
    "lozo_m": (lambda a: zojax.lozo_m(0.05, rank=2, refresh_every=2, axis_name=a), two),
    "subzero": (lambda a: zojax.subzero(0.05, rank=2, refresh_every=2, axis_name=a), two),
  }
  # A data-parallel loss is a mean of shard sums instead of one sum: equal to
  # the single-device loss up to float32 rounding (an ulp of a loss ~1 is
  # 1.2e-7), which the finite difference divides by eps = 1e-3. The scalars
  # c_i thus differ by a few 1e-4, a step by lr * that * |z| (|z| up to ~3,
  # more under SubZero's sqrt(mn)/r scale): at most 6e-5 after 4 steps here,
  # ZO-Muon's Newton-Schulz included, hence 2e-4. ZO-MOPI keeps only the top
  # k = 1 of the 2 singular directions of its momentum (power iteration and
  # anchored refresh); a perturbation d turns them by about d / (s_1 - s_2) and
  # its step has unit size whatever the scale of the estimate, so a small gap
  # amplifies the rounding: 8e-5 here, but 6e-4 with a bias on the head as
  # well, hence 1e-3. The three modes agree with one another at least as
  # closely. Every bound is below a twentieth of how far the weights move.
  TOL = {"zo_mopi": 1e-3}
  STEPS = 4

  def body(tx):
    def step(p, s, b):
      u, s = tx.update(None, s, p, value_fn=lambda q: loss(q, b))
      return optax.apply_updates(p, u), s
    return step

  def run(compiled, p, s, b):
    for _ in range(STEPS):
      p, s = compiled(p, s, b)
    return p, s

  def plain(tree):  # key arrays as their raw bits, so that they compare too
    is_key = lambda a: jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree)

  def assert_shards_identical(tree):
    for leaf in jax.tree.leaves(plain(tree)):
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert len(shards) == 4, leaf.sharding
      for shard in shards[1:]:
        np.testing.assert_array_equal(shard, shards[0])

  def check_traffic(name, mode, compiled, forwards):
    hlo = compiled.as_text()
    for op in FORBIDDEN:
      assert op not in hlo, (name, mode, op)
    floats = reduced_floats(hlo)
    assert 1 <= floats <= forwards, (name, mode, floats, forwards)
    return floats

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  batch = (x, y)

  for name in sys.argv[1:]:
    make, forwards = PRESETS[name]
    tol = TOL.get(name, 2e-4)
    close = lambda p, ref: chex.assert_trees_all_close(p, ref, atol=tol, rtol=tol)

    single = make(None)
    local_step = body(single)  # one Python function, traced once for (c) too
    step = jax.jit(local_step).lower(params, single.init(params), batch).compile()
    reference, _ = run(step, params, single.init(params), batch)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), reference, params)
    assert max(jax.tree.leaves(moved)) > 20 * tol, (name, moved)

    # (a) pmap: batch split 4 ways, params and state stacked.
    tx = make("data")
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 4), t)
    args = (stack(params), stack(tx.init(params)), (x.reshape(4, 8, 6), y.reshape(4, 8)))
    step = jax.pmap(body(tx), axis_name="data").lower(*args).compile()
    p, s = run(step, *args)
    for leaf in jax.tree.leaves(plain((p, s))):
      leaf = np.asarray(leaf)
      for i in range(1, 4):
        np.testing.assert_array_equal(leaf[i], leaf[0])
    close(jax.tree.map(lambda a: a[0], p), reference)
    counts = [check_traffic(name, "pmap", step, forwards)]

    # (b) shard_map over a 1-D mesh.
    spmd = jax.shard_map(body(tx), mesh=mesh, in_specs=(P(), P(), P("data")),
                         out_specs=(P(), P()))
    step = jax.jit(spmd).lower(params, tx.init(params), batch).compile()
    p, s = run(step, params, tx.init(params), batch)
    assert_shards_identical((p, s))
    close(p, reference)
    counts.append(check_traffic(name, "shard_map", step, forwards))

    # (c) plain jit, axis_name=None: batch sharded, params and state replicated
    # (also on output, so a partitioner that sharded them would need gathers).
    put = lambda t: jax.device_put(t, replicated)
    args = (put(params), put(single.init(params)), jax.device_put(batch, by_row))
    step = jax.jit(local_step, out_shardings=replicated).lower(*args).compile()
    p, s = run(step, *args)
    assert_shards_identical((p, s))
    close(p, reference)
    counts.append(check_traffic(name, "sharded jit", step, forwards))
    print(name, "ok", counts)
  """
)

# Two subprocesses, one per xdist worker, of about equal CPU time (presets in
# one interpreter share JAX's start-up and much of their tracing).
GROUPS = [("mezo", "zo_muon", "zo_mopi", "lozo"), ("mezo_bcd", "lozo_m", "subzero")]


def _check_in_subprocess(presets):
  # The checks are about the programs XLA partitions, not their machine code,
  # and compiling dominates these tests: LLVM at -O0 and the classic CPU
  # fusion emitters (no MLIR pipeline per fusion) together cut their CPU time
  # by more than half. The single-device reference compiles with the same flags.
  flags = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false"
  )
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT, *presets],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  for name in presets:
    assert f"{name} ok" in result.stdout, result.stdout


# The two slow tests sit at either end of the file: pytest-xdist hands out
# consecutive tests in pairs, so this puts them on different workers.
def test_data_parallel_mezo_zo_muon_zo_mopi_lozo():
  _check_in_subprocess(GROUPS[0])


def test_every_preset_is_checked():
  helpers = {"DEFAULTS", "matrix_mask", "split_learning_rates"}
  checked = [name for group in GROUPS for name in group]
  assert sorted(checked) == sorted(set(zojax.presets.__all__) - helpers)


# The forms of the compiled text the counter must read (a tuple-shaped
# all-reduce as XLA's combiner emits it, an async pair, a counted loop, a
# conditional), in a small module written out by hand.
_HLO = """HloModule jit_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[])) -> (s32[], f32[]) {
  %p = (s32[], f32[]) parameter(0)
  %loss = f32[] get-tuple-element(%p), index=1
  %all-reduce.1 = f32[] all-reduce(%loss), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[]) tuple(%i, %all-reduce.1)
}

%cond (p: (s32[], f32[])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%branch_0 (v: f32[2]) -> f32[2] {
  %v = f32[2]{0} parameter(0)
  ROOT %ar = f32[2]{0} all-reduce(%v), channel_id=2, to_apply=%add
}

%branch_1 (v: f32[3]) -> f32[3] {
  %v = f32[3]{0} parameter(0)
  %ar-start = f32[3]{0} all-reduce-start(%v), channel_id=3, to_apply=%add
  ROOT %ar-done = f32[3]{0} all-reduce-done(%ar-start)
}

ENTRY %main.1_spmd (a: f32[], b: f32[3]) -> f32[] {
  %all-reduce.3 = (f32[], f32[3]{0}) all-reduce(%a, %b), channel_id=4, to_apply=%add
  %while.1 = (s32[], f32[]) while(%init), condition=%cond, body=%body, \
backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"2"}}
  %conditional = f32[3]{0} conditional(%i, %x, %y), branch_computations={%branch_0, %branch_1}
  ROOT %out = f32[] get-tuple-element(%while.1), index=1
}
"""


def test_reduced_floats_reads_tuples_async_loops_and_branches():
  comps, entry = hlo_computations(_HLO)
  assert entry == "main.1_spmd" and set(comps) >= {"add", "body", "branch_1"}
  # (1 + 3) (the tuple) + 2 trips x 1 (the loop) + max(2, 3) (the conditional).
  assert reduced_floats(_HLO) == 1 + 3 + 2 * 1 + 3


@pytest.mark.parametrize(
  "old, new, message",
  [
    (',"known_trip_count":{"n":"2"}', "", "no known trip count"),
    ('"known_trip_count":{"n":"2"}', '"known_trip_count":{"n":"5"}', None),
    ("f32[3]{0} all-reduce-start", "s32[3]{0} all-reduce-start", "non-float"),
  ],
)
def test_reduced_floats_edge_cases(old, new, message):
  hlo = _HLO.replace(old, new)
  assert hlo != _HLO
  if message is None:
    assert reduced_floats(hlo) == 1 + 3 + 5 * 1 + 3
  else:
    with pytest.raises(AssertionError, match=message):
      reduced_floats(hlo)


def test_unbound_axis_name_is_a_clear_error():
  params = {"w": jnp.ones(3)}
  tx = zojax.zo_grad(axis_name="data")
  with pytest.raises(ValueError, match="not running under a jax.pmap"):
    jax.jit(lambda p, s: tx.update(None, s, p, value_fn=lambda q: jnp.sum(q["w"] ** 2)))(
      params, tx.init(params)
    )


def test_data_parallel_mezo_bcd_lozo_m_subzero():
  _check_in_subprocess(GROUPS[1])
