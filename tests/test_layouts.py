"""Tests for zojax.layouts: Equinox weights are (out, in), and the presets must know it."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as DN

import zojax
from zojax.layouts import equinox_dimension_numbers

X = jax.random.normal(jax.random.key(1), (16, 6))
Y = jax.random.normal(jax.random.key(2), (16, 3))


def _model():
  # Widths 6 -> 4 -> 3: no weight is square, so a swapped layout changes shapes.
  return eqx.nn.MLP(6, 3, 4, 1, key=jax.random.key(0))


def _eqx_loss(static):
  def loss(p):
    return jnp.mean((jax.vmap(eqx.combine(p, static))(X) - Y) ** 2)

  return loss


def _flax_layout(params):
  """The same model with every Linear weight transposed to Flax's (in, out)."""
  return eqx.tree_at(
    lambda m: [layer.weight for layer in m.layers], params, [lay.weight.T for lay in params.layers]
  )


def _flax_loss(p):
  h = X
  for i, layer in enumerate(p.layers):
    h = h @ layer.weight + layer.bias
    if i < len(p.layers) - 1:
      h = jax.nn.relu(h)
  return jnp.mean((h - Y) ** 2)


def test_linear_and_bias_numbers():
  params, _ = eqx.partition(_model(), eqx.is_inexact_array)
  dims = equinox_dimension_numbers(params)
  for layer in dims.layers:
    assert layer.weight == DN(reduction_axis=1, output_axis=0)
    assert layer.bias is None


def test_conv_stacked_and_other_layers():
  key = jax.random.key(0)
  conv = eqx.filter(eqx.nn.Conv2d(3, 5, (2, 4), key=key), eqx.is_inexact_array)
  assert equinox_dimension_numbers(conv).weight == DN(reduction_axis=(1, 2, 3), output_axis=0)
  tconv = eqx.filter(eqx.nn.ConvTranspose1d(3, 5, 2, key=key), eqx.is_inexact_array)
  assert equinox_dimension_numbers(tconv).weight == DN(reduction_axis=(1, 2), output_axis=0)
  stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 4, key=k))(jax.random.split(key, 5))
  stacked = eqx.filter(stacked, eqx.is_inexact_array)
  assert equinox_dimension_numbers(stacked).weight == DN(reduction_axis=2, output_axis=1)
  # Not a Linear/Conv: the default rule (an Embedding is (vocab, features) as in Flax).
  embed = eqx.filter(eqx.nn.Embedding(10, 4, key=key), eqx.is_inexact_array)
  assert equinox_dimension_numbers(embed).weight == DN(reduction_axis=0, output_axis=1)
  norm = eqx.filter(eqx.nn.LayerNorm(4), eqx.is_inexact_array)
  assert jax.tree.leaves(equinox_dimension_numbers(norm), is_leaf=lambda x: x is None) == [
    None,
    None,
  ]


def test_whole_model_is_refused_with_the_fix():
  with pytest.raises(TypeError, match=r"\.activation.*eqx\.partition"):
    equinox_dimension_numbers(_model())


def test_the_numbers_are_what_resolve_sees():
  # An Equinox module is callable; the numbers' tree must not be taken for a
  # callable returning numbers.
  params, _ = eqx.partition(_model(), eqx.is_inexact_array)
  for dims in (equinox_dimension_numbers(params), equinox_dimension_numbers):
    resolved = zojax.orthogonalizers.resolve_dimension_numbers(dims, params)
    assert resolved.layers[0].weight == DN(reduction_axis=1, output_axis=0)


PRESETS = {
  "zo_muon": lambda dims: zojax.zo_muon(
    1e-2, rank=2, refresh_every=2, num_queries=2, weight_dimension_numbers=dims
  ),
  "zo_mopi": lambda dims: zojax.zo_mopi(
    1e-2, rank=2, k=1, refresh_every=2, num_queries=2, weight_dimension_numbers=dims
  ),
  "lozo": lambda dims: zojax.lozo(1e-2, rank=2, refresh_every=2, weight_dimension_numbers=dims),
  "subzero": lambda dims: zojax.subzero(
    1e-2, rank=2, refresh_every=2, weight_dimension_numbers=dims
  ),
}


def _run(tx, params, loss, steps=3):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_on_equinox_weights_match_the_flax_layout(name):
  """With the numbers, an (out, in) weight gets exactly the steps its (in, out) twin gets.

  Same seed and shapes of every draw (bases, coordinates), and the same loss
  up to rounding, so the trajectories agree up to float error; with the
  default rule the basis sits on the input axis and they differ at once.
  """
  params, static = eqx.partition(_model(), eqx.is_inexact_array)
  eqx_loss = _eqx_loss(static)
  twin, _ = _run(PRESETS[name](None), _flax_layout(params), _flax_loss)
  got, _ = _run(PRESETS[name](equinox_dimension_numbers(params)), params, eqx_loss)
  chex.assert_trees_all_close(_flax_layout(got), twin, rtol=2e-3, atol=2e-5)
  wrong, _ = _run(PRESETS[name](None), params, eqx_loss)
  moved = lambda p: jnp.abs(_flax_layout(p).layers[0].weight - twin.layers[0].weight).max()
  assert moved(wrong) > 100 * moved(got)


def test_zo_muon_basis_spans_the_output_axis():
  params, static = eqx.partition(_model(), eqx.is_inexact_array)
  tx = zojax.zo_muon(
    1e-2, rank=2, num_queries=2, weight_dimension_numbers=equinox_dimension_numbers
  )
  new, state = _run(tx, params, _eqx_loss(static), steps=1)
  sub = optax.tree_utils.tree_get(state, "SubspaceState")
  basis = sub.bases[0]  # layers[0].weight, (out=4, in=6)
  assert basis.shape == (4, 2)
  update = new.layers[0].weight - params.layers[0].weight
  # ZO-Muon moves each weight along its output basis: P P^T dW = dW.
  chex.assert_trees_all_close(basis @ (basis.T @ update), update, atol=1e-6)
  assert jnp.abs(update).max() > 1e-4
