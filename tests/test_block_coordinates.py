"""Tests for zojax.block_coordinate: one block per step, block orders, no recompiles, errors."""

import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import strategies as st

import zojax
from tests import numerics
from zojax import keys as keys_lib
from zojax import mezo_bcd
from zojax.block_coordinates import (
  ORDERS,
  BlockCoordinateState,
  active_block,
  block_coordinate,
  top_level_blocks,
)

HIDDEN = ("layer_0", "layer_1", "layer_2", "layer_3")  # blocks 0..3; "head" is frozen
LEARNING_RATE = 0.05
SWITCH_EVERY = 2
EPS = 1e-3


def mlp_problem():
  """A 4 -> 16 -> 16 -> 16 -> 16 -> 1 tanh MLP (Flax layout) with squared loss."""
  rng = np.random.default_rng(0)
  dims = (4, 16, 16, 16, 16, 1)
  names = (*HIDDEN, "head")
  params = {
    "params": {
      name: {
        "kernel": jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32),
        "bias": jnp.zeros(n, jnp.float32),
      }
      for name, m, n in zip(names, dims[:-1], dims[1:])
    }
  }
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  y = jnp.sin(x @ jnp.asarray([1.0, -1.0, 0.5, 2.0])).reshape(-1, 1)

  def loss(p, batch):
    bx, by = batch
    h = bx
    for name in HIDDEN:
      h = jnp.tanh(h @ p["params"][name]["kernel"] + p["params"][name]["bias"])
    out = h @ p["params"]["head"]["kernel"] + p["params"]["head"]["bias"]
    return jnp.mean((out - by) ** 2)

  return params, loss, (x, y)


TRACES = []  # one entry per Python trace of the shared step function


def make_bcd(loss):
  """The MeZO-BCD optimizer the tests use: hidden layers as blocks, head frozen."""
  return mezo_bcd(
    LEARNING_RATE,
    eps=EPS,
    blocks=lambda p: top_level_blocks(p, exclude=["head"]),
    switch_every=SWITCH_EVERY,
    order="random",
    key=0,
    loss_fn=loss,
  )


@functools.cache
def shared_step():
  """The one jitted MeZO-BCD step most tests reuse (a single compile)."""
  params, loss, batch = mlp_problem()
  tx = make_bcd(loss)

  @jax.jit
  def step(p, state, batch):
    TRACES.append(1)
    updates, state = tx.update(None, state, p, batch=batch)
    return optax.apply_updates(p, updates), state

  return tx, step, params, batch


def block_of(name):
  return HIDDEN.index(name) if name in HIDDEN else -1


def bcd_state(state) -> BlockCoordinateState:
  return optax.tree_utils.tree_get(state, "BlockCoordinateState")


def test_only_the_active_block_changes():
  tx, step, params, batch = shared_step()
  state = tx.init(params)
  seen = set()
  for t in range(4 * SWITCH_EVERY):
    new_params, new_state = step(params, state, batch)
    bcd, new_bcd = bcd_state(state), bcd_state(new_state)
    b = int(new_bcd.block)
    seen.add(b)
    assert b == int(active_block(t, 4, switch_every=SWITCH_EVERY, order="random", key=bcd.key))
    assert int(new_bcd.count) == t + 1
    for name, layer in params["params"].items():
      if block_of(name) == b:
        assert any(not np.array_equal(layer[k], new_params["params"][name][k]) for k in layer)
      else:
        chex.assert_trees_all_equal(layer, new_params["params"][name])
    for j in range(4):
      if j != b:
        chex.assert_trees_all_equal(bcd.inner_states[j], new_bcd.inner_states[j])
    active_zo = new_bcd.inner_states[b][0]
    assert int(active_zo.count) == int(bcd.inner_states[b][0].count) + 1
    # The loss is logged at the top level of the combinator's state.
    np.testing.assert_array_equal(new_bcd.loss, active_zo.loss)
    np.testing.assert_allclose(new_bcd.loss, loss_at(params, batch), rtol=1e-3)
    params, state = new_params, new_state
  assert len(seen) >= 3


def loss_at(params, batch):
  return mlp_problem()[1](params, batch)


def test_step_is_mezo_on_the_active_block():
  # The active block moves by -lr * c * z, with z drawn from the block's
  # inner key and c the central difference along z of the full-model loss.
  # In float64 (tests/numerics.py): the step and the reference below are
  # different programs, whose float32 losses may differ in their last bits
  # on another CPU, amplified by 1 / (2 eps) in c.
  with numerics.float64():
    params, batch = numerics.to_float64((mlp_problem()[0], mlp_problem()[2]))
    loss = mlp_problem()[1]
    tx = make_bcd(loss)
    state = tx.init(params)
    updates, new_state = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(
      params, state, batch
    )
    new_params = optax.apply_updates(params, updates)
    bcd = bcd_state(new_state)
    b = int(bcd.block)
    zo = bcd.inner_states[b][0]
    name = HIDDEN[b]
    sub = {"params": {n: (v if n == name else None) for n, v in params["params"].items()}}
    query = keys_lib.query_key(keys_lib.step_key(zo.key, 0), 0)
    z = zojax.sample_direction(query, sub)["params"][name]

    def at(scale):
      p = {"params": dict(params["params"])}
      p["params"][name] = jax.tree.map(lambda w, d: w + scale * d, params["params"][name], z)
      return loss(p, batch)

    c = (at(EPS) - at(-EPS)) / (2 * EPS)
    # c is stored in float32 (relative error 2^-24); the float64 rounding of
    # the losses, amplified by 1 / (2 eps), is ~1e-13 (tests/numerics.py).
    np.testing.assert_allclose(zo.projected_grads[0], c, rtol=2 * numerics.F32_UNIT_ROUNDOFF)
    expected = jax.tree.map(
      lambda w, d: w - LEARNING_RATE * zo.projected_grads[0] * d, params["params"][name], z
    )
    chex.assert_trees_all_close(
      new_params["params"][name], expected, rtol=numerics.F64_RTOL, atol=numerics.F64_ATOL
    )


def test_block_switches_do_not_recompile():
  tx, step, params, batch = shared_step()
  state = tx.init(params)
  blocks = []
  for _ in range(5 * SWITCH_EVERY):
    params, state = step(params, state, batch)
    blocks.append(int(bcd_state(state).block))
  switches = sum(a != b for a, b in zip(blocks, blocks[1:]))
  assert switches > 2
  assert len(TRACES) == 1  # every test shares this jitted step: traced exactly once


def test_same_seed_is_bit_identical():
  tx, step, params, batch = shared_step()

  def run():
    p, s = params, tx.init(params)
    for _ in range(3 * SWITCH_EVERY):
      p, s = step(p, s, batch)
    return p, s

  chex.assert_trees_all_equal(run(), run())


def test_mezo_bcd_lowers_the_loss():
  tx, step, params, batch = shared_step()
  state = tx.init(params)
  start = float(loss_at(params, batch))
  for _ in range(1000):  # 2000 forward passes; each step trains a quarter of the model
    params, state = step(params, state, batch)
  chex.assert_tree_all_finite(params)
  assert float(loss_at(params, batch)) < 0.5 * start
  # The frozen head never moves.
  chex.assert_trees_all_equal(params["params"]["head"], mlp_problem()[0]["params"]["head"])


def _random_bits_sizes(jaxpr) -> int:
  """Total number of random words the jaxpr (and its sub-jaxprs) draws, per execution.

  Directions come from `zojax.fastrandom`, which hashes a uint32 iota of the
  leaf's size (its key words, two per leaf, are not counted).
  """
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "iota" and eqn.params["dtype"] == jnp.uint32:
      total += sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _random_bits_sizes(inner)
  return total


def test_branches_draw_only_their_block():
  # Each switch branch draws z for its own block twice (once inside the
  # forward map, once for the update) and nothing for the other blocks.
  tx, _, params, batch = shared_step()
  state = tx.init(params)
  fn = lambda p, s: tx.update(None, s, p, batch=batch)
  jaxpr = jax.make_jaxpr(fn)(params, state).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1
  for b, branch in enumerate(conds[0].params["branches"]):
    size = sum(x.size for x in jax.tree.leaves(params["params"][HIDDEN[b]]))
    assert _random_bits_sizes(branch.jaxpr) == 2 * size


class BlockCoordinateVariantsTest(parameterized.TestCase):
  # Jit only: an eager lax.switch retraces and recompiles its branches on every
  # call (about 2 s a step here), so without_jit would dominate the file's run time.
  @chex.variants(with_jit=True)
  @parameterized.parameters("ascending", "descending")
  def test_deterministic_orders_through_the_transform(self, order):
    params = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(())}
    loss = lambda p: sum(jnp.sum((v - 2.0) ** 2) for v in jax.tree.leaves(p))
    tx = block_coordinate(optax.chain(zojax.zo_grad(), optax.sgd(0.1)), switch_every=1, order=order)
    update = self.variant(lambda p, s: tx.update(None, s, p, value_fn=loss))
    state = tx.init(params)
    blocks = []
    for _ in range(4):
      updates, state = update(params, state)
      b = int(state.block)
      blocks.append(b)
      for j, name in enumerate("abc"):
        if j == b:
          assert np.any(np.asarray(updates[name]) != 0)
        else:
          chex.assert_trees_all_equal(updates[name], jnp.zeros_like(params[name]))
    assert blocks == ([0, 1, 2, 0] if order == "ascending" else [2, 1, 0, 2])


@functools.partial(jax.jit, static_argnames=("num_blocks", "switch_every", "order"))
def block_sequence(counts, key, *, num_blocks, switch_every, order):
  """`active_block` at every step of ``counts`` (one compile per static configuration)."""
  fn = lambda c: active_block(c, num_blocks, switch_every=switch_every, order=order, key=key)
  return jax.vmap(fn)(counts)


def test_active_block_deterministic_orders():
  counts = jnp.arange(3 * 4 * 5)  # 3 epochs of 4 blocks, switching every 5 steps
  key = jax.random.key(0)
  asc = block_sequence(counts, key, num_blocks=4, switch_every=5, order="ascending")
  desc = block_sequence(counts, key, num_blocks=4, switch_every=5, order="descending")
  np.testing.assert_array_equal(asc, np.tile(np.repeat(np.arange(4), 5), 3))
  np.testing.assert_array_equal(desc, np.tile(np.repeat(np.arange(4)[::-1], 5), 3))


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  num_blocks=st.integers(1, 6), switch_every=st.integers(1, 2), seed=st.integers(0, 2**31 - 1)
)
def test_random_order_is_reshuffling(num_blocks, switch_every, seed):
  epochs = 4
  # Fixed-length counts (the largest case), so only the static arguments recompile.
  order = block_sequence(
    jnp.arange(epochs * 6 * 2),
    jax.random.key(seed),
    num_blocks=num_blocks,
    switch_every=switch_every,
    order="random",
  )[: epochs * num_blocks * switch_every]
  order = np.asarray(order).reshape(epochs, num_blocks, switch_every)
  assert (order == order[..., :1]).all()  # constant between switches
  for epoch in order[..., 0]:
    assert sorted(epoch) == list(range(num_blocks))  # each block exactly once per epoch


def test_random_order_depends_on_the_seed():
  counts = jnp.arange(4 * 6)

  def sequence(seed):
    return np.asarray(
      block_sequence(counts, jax.random.key(seed), num_blocks=6, switch_every=1, order="random")
    )

  np.testing.assert_array_equal(sequence(0), sequence(0))
  assert len({tuple(sequence(seed)) for seed in range(4)}) > 1
  # Epochs are reshuffled, not one permutation repeated.
  assert len({tuple(epoch) for epoch in sequence(0).reshape(4, 6)}) > 1


def test_top_level_blocks():
  params = {"params": {f"layer_{i}": {"w": jnp.ones(2)} for i in (10, 2, 1)}}
  params["params"]["embed"] = jnp.ones(3)
  ids = top_level_blocks(params)
  assert ids["params"]["embed"] == 0
  assert [ids["params"][f"layer_{i}"]["w"] for i in (1, 2, 10)] == [1, 2, 3]
  ids = top_level_blocks(params, exclude=["embed"])
  assert ids["params"]["embed"] == -1
  assert [ids["params"][f"layer_{i}"]["w"] for i in (1, 2, 10)] == [0, 1, 2]
  assert top_level_blocks([jnp.ones(2), {"a": jnp.ones(1), "b": jnp.ones(1)}]) == [
    0,
    {"a": 1, "b": 1},
  ]
  with pytest.raises(ValueError, match="not top-level entries"):
    top_level_blocks(params, exclude=["head"])
  with pytest.raises(ValueError, match="single array"):
    top_level_blocks(jnp.ones(3))


def test_top_level_blocks_descend_through_single_entries():
  layers = [{"w": jnp.ones(2), "b": jnp.ones(1)} for _ in range(3)]
  ids = top_level_blocks({"model": {"params": {"layers": layers}}})
  assert [layer["w"] for layer in ids["model"]["params"]["layers"]] == [0, 1, 2]
  assert [layer["b"] for layer in ids["model"]["params"]["layers"]] == [0, 1, 2]
  # A single entry that is itself a leaf is where the descent stops.
  assert top_level_blocks({"params": {"w": jnp.ones(2)}}) == {"params": {"w": 0}}
  # A single entry named in stacked= (or exclude=) is the level the names refer to.
  stacked = {"layers": {"w": jnp.ones((3, 2)), "b": jnp.ones((3, 1))}}
  ids = top_level_blocks(stacked, stacked=["layers"])
  assert ids["layers"]["w"] == zojax.StackedBlocks(0)


def test_default_blocks_of_an_equinox_mlp_are_its_layers():
  """eqx.nn.MLP's arrays sit under its one field ``layers``: one block per Linear."""
  import equinox as eqx

  model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  ids = top_level_blocks(params)
  assert [(layer.weight, layer.bias) for layer in ids.layers] == [(0, 0), (1, 1), (2, 2)]
  x = jax.random.normal(jax.random.key(1), (8, 3))
  loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)
  tx = mezo_bcd(1e-2, switch_every=1, order="ascending")
  state = tx.init(params)
  assert len(optax.tree_utils.tree_get(state, "BlockCoordinateState").inner_states) == 3
  for block in range(3):
    updates, state = tx.update(None, state, params, value_fn=loss)
    moved = [bool(jnp.any(layer.weight != 0)) for layer in updates.layers]
    assert moved == [i == block for i in range(3)]


def test_inner_state_is_per_block_and_keys_differ():
  params, _, _ = mlp_problem()
  tx = block_coordinate(optax.chain(zojax.zo_grad(key=0), optax.adam(1e-3)))
  state = tx.init(params)
  assert len(state.inner_states) == 5  # default rule: head, layer_0..layer_3
  names = sorted(params["params"])
  for b, inner in enumerate(state.inner_states):
    mu = optax.tree_utils.tree_get(inner, "mu")
    assert jax.tree.leaves(mu) and set(mu["params"]) == set(names)
    # Adam moments exist for block b's leaves only (other leaves are None).
    assert [x.shape for x in jax.tree.leaves(mu)] == [
      x.shape for x in jax.tree.leaves(params["params"][names[b]])
    ]
  inner_keys = [jax.random.key_data(s[0].key) for s in state.inner_states]
  assert len({tuple(np.asarray(k)) for k in inner_keys}) == 5


def test_errors():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  inner = optax.chain(zojax.zo_grad(), optax.sgd(0.1))
  for bad, error in ((0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError)):
    with pytest.raises(error, match="switch_every"):
      block_coordinate(inner, switch_every=bad)
  with pytest.raises(ValueError, match="random.*ascending.*descending"):
    block_coordinate(inner, order="flip_flop")
  with pytest.raises(ValueError, match="random.*ascending.*descending"):
    mezo_bcd(1e-3, order="flip_flop")
  assert ORDERS == ("random", "ascending", "descending")
  with pytest.raises(TypeError, match="optax GradientTransformation"):
    block_coordinate(lambda m: inner)
  with pytest.raises(ValueError, match="same pytree structure"):
    block_coordinate(inner, {"a": 0}).init(params)
  with pytest.raises(ValueError, match=r"Blocks \[1\] have no leaves"):
    block_coordinate(inner, {"a": 0, "b": 2}).init(params)
  with pytest.raises(ValueError, match="no leaf to a block"):
    block_coordinate(inner, {"a": -1, "b": -1}).init(params)
  with pytest.raises(TypeError, match="static Python int"):
    block_coordinate(inner, {"a": 0, "b": 0.5}).init(params)
  tx = block_coordinate(inner)
  state = tx.init(params)
  with pytest.raises(ValueError, match="2 inner states"):
    tx.update(None, state, {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}, value_fn=jnp.sum)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(None, state, value_fn=jnp.sum)


# ---------------------------------------------------------------------------
# Stacked layers (run by lax.scan): one block per layer slice.

STACK_LAYERS, STACK_WIDTH = 4, 96  # 96 x 96 = 9216 >= GROUP_BELOW: evaluated lazily


def stacked_problem(dtype=jnp.float32):
  """A scanned tanh MLP: embed (frozen), 4 stacked layers (blocks 0..3), head (block 4)."""
  rng = np.random.default_rng(1)
  n, d = STACK_LAYERS, STACK_WIDTH
  params = {
    "embed": jnp.asarray(rng.normal(size=(8, d)) / np.sqrt(8), dtype),
    "layers": {
      "w": jnp.asarray(rng.normal(size=(n, d, d)) / np.sqrt(d), dtype),
      "b": jnp.asarray(rng.normal(size=(n, d)) * 0.1, dtype),
    },
    "head": jnp.asarray(rng.normal(size=(d,)) / np.sqrt(d), dtype),
  }
  x = jnp.asarray(rng.normal(size=(16, 8)), dtype)

  def loss(p, x):
    def body(h, layer):
      return jnp.tanh(h @ layer["w"] + layer["b"]), None

    h, _ = jax.lax.scan(body, x @ p["embed"], p["layers"])
    return jnp.mean((h @ p["head"]) ** 2)

  return params, loss, x


def stacked_blocks(params):
  return top_level_blocks(params, exclude=["embed"], stacked=["layers"])


def test_top_level_blocks_stacked():
  params, _, _ = stacked_problem()
  ids = stacked_blocks(params)
  # Natural order: "head" is block 0, the four layers blocks 1..4.
  assert ids == {
    "embed": -1,
    "head": 0,
    "layers": {"w": zojax.StackedBlocks(1), "b": zojax.StackedBlocks(1)},
  }
  with pytest.raises(ValueError, match="both exclude and stacked"):
    top_level_blocks(params, exclude=["layers"], stacked=["layers"])
  with pytest.raises(ValueError, match=r"stacked names \['layer'\]"):
    top_level_blocks(params, stacked=["layer"])
  bad = {**params, "layers": {"w": params["layers"]["w"], "b": jnp.ones((3, STACK_WIDTH))}}
  with pytest.raises(ValueError, match="one leading axis of layers"):
    top_level_blocks(bad, stacked=["layers"])
  with pytest.raises(ValueError, match=">= 0"):
    zojax.StackedBlocks(-1)
  with pytest.raises(TypeError, match="Python int"):
    zojax.StackedBlocks(1.0)
  inner = optax.chain(zojax.zo_grad(), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"\['head'\].*leading axis of layers"):
    block_coordinate(inner, {**ids, "head": zojax.StackedBlocks(0)}).init(
      {**params, "head": jnp.ones(())}
    )
  # Layers of a stack may not leave a gap before the next block.
  with pytest.raises(ValueError, match=r"Blocks \[5\] have no leaves"):
    block_coordinate(inner, {**ids, "embed": 6}).init(params)


def test_stacked_step_is_mezo_on_the_active_layer():
  # Block b >= 1 is layer j = b - 1 of every stacked leaf: that slice moves
  # by -lr c z, z drawn from the block's inner key for the slice-shaped
  # sub-tree, c the central difference of the full model's loss with only
  # that slice perturbed; every other slice and leaf is unchanged. Float64
  # (tests/numerics.py: the step and the reference are different programs).
  with numerics.float64():
    params, loss, x = stacked_problem()
    params, x = numerics.to_float64((params, x))
    tx = mezo_bcd(LEARNING_RATE, eps=EPS, blocks=stacked_blocks, switch_every=1, order="ascending")
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=lambda q: loss(q, x)))
    for t in range(1 + STACK_LAYERS):
      updates, new_state = step(params, state)
      new_params = optax.apply_updates(params, updates)
      bcd = bcd_state(new_state)
      b = int(bcd.block)
      assert b == t  # ascending: head, then layers 0..3
      zo = bcd.inner_states[b][0]
      query = keys_lib.query_key(keys_lib.step_key(zo.key, 0), 0)
      if b == 0:
        sub = {"embed": None, "head": params["head"], "layers": {"b": None, "w": None}}
      else:
        j = b - 1
        sub = {
          "embed": None,
          "head": None,
          "layers": jax.tree.map(lambda a, j=j: a[j], params["layers"]),
        }
      z = zojax.sample_direction(query, sub)

      def at(scale, z=z, b=b):
        if b == 0:
          return loss({**params, "head": params["head"] + scale * z["head"]}, x)
        layers = jax.tree.map(
          lambda a, d: a.at[b - 1].add(scale * d), params["layers"], z["layers"]
        )
        return loss({**params, "layers": layers}, x)

      c = (at(EPS) - at(-EPS)) / (2 * EPS)
      np.testing.assert_allclose(zo.projected_grads[0], c, rtol=2 * numerics.F32_UNIT_ROUNDOFF)
      c = zo.projected_grads[0]
      chex.assert_trees_all_equal(new_params["embed"], params["embed"])
      if b == 0:
        chex.assert_trees_all_close(
          new_params["head"],
          params["head"] - LEARNING_RATE * c * z["head"],
          rtol=numerics.F64_RTOL,
          atol=numerics.F64_ATOL,
        )
        chex.assert_trees_all_equal(new_params["layers"], params["layers"])
      else:
        chex.assert_trees_all_equal(new_params["head"], params["head"])
        for name in ("w", "b"):
          for layer in range(STACK_LAYERS):
            got, was = new_params["layers"][name][layer], params["layers"][name][layer]
            if layer == b - 1:
              chex.assert_trees_all_close(
                got,
                was - LEARNING_RATE * c * z["layers"][name],
                rtol=numerics.F64_RTOL,
                atol=numerics.F64_ATOL,
              )
            else:
              chex.assert_trees_all_equal(got, was)
      params, state = new_params, new_state


def test_stacked_at_use_matches_up_front():
  # Float32, so the layers are perturbed at use (inside the scan body, only
  # in the active layer's iteration). Same draws as perturbing up front:
  # the directions agree to float32 rounding of the draw (rtol 1e-5 covers a
  # few ulps of the Box-Muller/erf arithmetic), and the scalars c to the
  # loss's rounding amplified by 1 / (2 eps): the loss (~0.5) is summed over
  # 16 examples after ~200 operations per output, |error| <= 200 * 2^-24 *
  # 0.5 ~ 6e-6 per loss, so |c_a - c_b| <= 2 * 6e-6 / 2e-3 = 6e-3.
  params, loss, x = stacked_problem()
  runs = []
  for at_use in (True, False):
    inner = optax.chain(zojax.zo_grad(eps=EPS, perturb_at_use=at_use), optax.sgd(LEARNING_RATE))
    tx = block_coordinate(inner, stacked_blocks, switch_every=1, order="ascending")
    step = jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, value_fn=lambda q: loss(q, x)))
    state, out = tx.init(params), []
    for _ in range(1 + STACK_LAYERS):
      updates, state = step(params, state)
      bcd = bcd_state(state)
      out.append((updates, float(bcd.inner_states[int(bcd.block)][0].projected_grads[0])))
    runs.append(out)
  for (u_a, c_a), (u_b, c_b) in zip(*runs):
    assert abs(c_a - c_b) <= 6e-3, (c_a, c_b)
    assert abs(c_a) > 0.1  # the comparison below is not vacuous
    # u = -lr c z: u_a c_b == u_b c_a wherever z agrees.
    chex.assert_trees_all_close(
      jax.tree.map(lambda u: u * c_b, u_a),
      jax.tree.map(lambda u: u * c_a, u_b),
      rtol=1e-5,
      atol=1e-7,
    )


def test_stacked_step_memory_is_one_layer():
  # 8 stacked 512 x 512 layers (one layer = 1/8 of the weights). Perturbed at
  # use, the active layer is formed inside the scan iteration that reads it,
  # and its update is broadcast into the apply: the step's temporaries stay
  # at a few layers. Up front, writing the perturbed layer back into the
  # stack copies the stack (1.0 of the weights).
  layers, width = 8, 512
  params = {"w": jax.ShapeDtypeStruct((layers, width, width), jnp.float32)}
  x = jax.ShapeDtypeStruct((4, width), jnp.float32)

  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
    return jnp.mean(h**2)

  def fraction(at_use):
    inner = optax.chain(zojax.zo_grad(perturb_at_use=at_use), optax.sgd(1e-3))
    tx = block_coordinate(inner, {"w": zojax.StackedBlocks(0)})

    def step(p, s, x):
      updates, s = tx.update(None, s, p, value_fn=lambda q: loss(q, x))
      return optax.apply_updates(p, updates), s

    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (layers * width * width * 4)

  up_front, at_use = fraction(False), fraction(True)
  assert up_front > 0.9, up_front
  assert at_use < 0.45, f"temp = {at_use:.4f} of the weights (up front: {up_front:.4f})"
