"""Tests of the ViT example's optimizer settings (examples/vit_cifar100/optimizers.py).

Each leaf of the example ViT must get the treatment the PyTorch references
give the same tensor: its matrix view (`vit_dimension_numbers`) for the
subspace methods, and its MeZO-BCD block (`vit_blocks`).
"""

import dataclasses
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers

NUM_CLASSES = 10
ATTENTION = "MultiHeadDotProductAttention_1"

# The matrix view of every leaf of one encoder block, by path inside the block.
BLOCK_VIEWS = {
  "['LayerNorm_0']['bias']": None,
  "['LayerNorm_0']['scale']": None,
  "['LayerNorm_2']['bias']": None,
  "['LayerNorm_2']['scale']": None,
  "['MlpBlock_3']['Dense_0']['bias']": None,
  "['MlpBlock_3']['Dense_0']['kernel']": Dims(0, 1),
  "['MlpBlock_3']['Dense_1']['bias']": None,
  "['MlpBlock_3']['Dense_1']['kernel']": Dims(0, 1),
  # (heads, head_dim) in flax, (D,) in PyTorch: vectors.
  f"['{ATTENTION}']['query']['bias']": None,
  f"['{ATTENTION}']['key']['bias']": None,
  f"['{ATTENTION}']['value']['bias']": None,
  f"['{ATTENTION}']['out']['bias']": None,
  # (D, heads, head_dim) -> D x (heads head_dim); out (heads, head_dim, D) -> (heads head_dim) x D.
  f"['{ATTENTION}']['query']['kernel']": Dims(0, (1, 2)),
  f"['{ATTENTION}']['key']['kernel']": Dims(0, (1, 2)),
  f"['{ATTENTION}']['value']['kernel']": Dims(0, (1, 2)),
  f"['{ATTENTION}']['out']['kernel']": Dims((0, 1), 2),
}

# The leaves outside the encoder blocks.
OTHER_VIEWS = {
  "['embedding']['kernel']": Dims((0, 1, 2), 3),  # conv HWIO -> (p p C) x D
  "['embedding']['bias']": None,
  "['cls']": Dims((1, 2), 0),  # PyTorch (1, 1, D): one row, rank 1
  "['Transformer']['posembed_input']['pos_embedding']": Dims((1, 2), 0),  # (1, 1 + N, D)
  "['Transformer']['encoder_norm']['bias']": None,
  "['Transformer']['encoder_norm']['scale']": None,
  "['head']['kernel']": Dims(0, 1),
  "['head']['bias']": None,
}


def _is_view(x):
  return x is None or isinstance(x, Dims)


def _by_path(tree, is_leaf=None):
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  return {jax.tree_util.keystr(path): value for path, value in leaves}


def _digits_params():
  return model_lib.param_shapes("digits", NUM_CLASSES)


def test_every_vit_leaf_gets_the_references_view():
  params = _digits_params()
  expected = dict(OTHER_VIEWS)
  for i in range(model_lib.get_config("digits").num_layers):
    block = f"['Transformer']['encoderblock_{i}']"
    expected.update({block + path: view for path, view in BLOCK_VIEWS.items()})
  views = _by_path(optimizers.vit_dimension_numbers(params), is_leaf=_is_view)
  assert views.keys() == _by_path(params).keys()
  assert views == expected


def test_pre_logits_kernel_is_a_matrix_and_its_bias_a_vector():
  cfg = model_lib.get_config("micro")
  params = model_lib.param_shapes(dataclasses.replace(cfg, representation_size=8), NUM_CLASSES)
  views = _by_path(optimizers.vit_dimension_numbers(params), is_leaf=_is_view)
  assert views["['pre_logits']['kernel']"] == Dims(0, 1)
  assert views["['pre_logits']['bias']"] is None


def _trained_head_problem():
  """The digits ViT with a random head (a zero head makes every finite difference 0)."""
  model, params = model_lib.create("digits", NUM_CLASSES, key=jax.random.key(0))
  head = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape) * 0.1
  params = {**params, "head": {**params["head"], "kernel": head}}
  images = jax.random.normal(jax.random.key(2), (16, 8, 8, 1))
  labels = jnp.arange(16) % NUM_CLASSES
  logits = model_lib.make_logits(model)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, images), labels).mean()

  return params, loss


def _first_update(learning_rate, vector_learning_rate, params, loss):
  opt = optimizers.make(
    "zo_muon",
    learning_rate,
    num_queries=2,
    rank=4,
    vector_learning_rate=vector_learning_rate,
    seed=3,
  )
  state = opt.tx.init(params)
  updates, _ = jax.jit(lambda s: opt.tx.update(None, s, params, value_fn=loss))(state)
  return state, updates


def test_zo_muon_steps_attention_biases_by_the_vector_rule():
  """q/k/v biases: no basis, an update at the vector learning rate, not orthogonalized.

  With the same key, the first step's finite differences are the same for
  any learning rates, so a vector leaf's update is exactly proportional to
  the vector learning rate and blind to the matrix one, and a matrix leaf's
  the other way round. Routed as a matrix (flax's 2-D bias under the default
  rule), a bias would get a basis and step at the matrix rate.
  """
  params, loss = _trained_head_problem()
  state, base = _first_update(1e-2, 1e-4, params, loss)
  _, double_vector = _first_update(1e-2, 2e-4, params, loss)
  _, double_matrix = _first_update(2e-2, 1e-4, params, loss)

  subspace_state = optax.tree_utils.tree_get(state, "SubspaceState")
  paths = _by_path(params).keys()  # the order of the leaves, as the bases are stored
  flat_bases = dict(zip(paths, subspace_state.bases, strict=True))
  block = "['Transformer']['encoderblock_0']"
  for name in ("query", "key", "value"):
    bias = f"{block}['{ATTENTION}']['{name}']['bias']"
    kernel = f"{block}['{ATTENTION}']['{name}']['kernel']"
    assert isinstance(flat_bases[bias], tuple) and not flat_bases[bias]  # no basis: full space
    assert flat_bases[kernel].shape == (64, 4)  # fan_out (heads * head_dim) x rank: a basis
    u, u2v, u2m = (_by_path(t)[bias] for t in (base, double_vector, double_matrix))
    assert float(jnp.abs(u).max()) > 0
    np.testing.assert_allclose(u2v, 2 * u, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(u2m, u, rtol=1e-5, atol=1e-12)
    k, k2v, k2m = (_by_path(t)[kernel] for t in (base, double_vector, double_matrix))
    np.testing.assert_allclose(k2v, k, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(k2m, 2 * k, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("rank, k", [(8, 4), (2, 1), (None, 32)])
def test_zo_mopi_gets_k_below_the_rank(rank, k):
  """Given a rank, make picks k = rank // 2 (the preset's k = 32 would reach rank 8)."""
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    opt = optimizers.make("zo_mopi", 1e-2, rank=rank)
  assert not [w for w in record if "zo_mopi: k=" in str(w.message)]
  params = model_lib.param_shapes("digits", NUM_CLASSES)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the 4-wide patch kernel: k = 4 spans it (rank 8)
    state = jax.eval_shape(opt.tx.init, params)
  power = optax.tree_utils.tree_get(state, "PowerIterationState")
  mlp = _by_path(power.v)["['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']"]
  assert mlp.shape[-1] == k  # coordinates (64, min(rank, 128)): k below both


def test_blocks_are_the_layers_then_the_head_with_the_embeddings_frozen():
  """MeZO-BCD as its reference: a block per layer, embeddings out, the head block last."""
  params = _digits_params()
  blocks = _by_path(optimizers.vit_blocks(params))
  num_layers = model_lib.get_config("digits").num_layers
  expected = {}
  for path in _by_path(params):
    layer = re.search(r"encoderblock_(\d+)", path)
    if layer:
      expected[path] = int(layer.group(1))
    elif path.startswith(("['embedding']", "['cls']", "['Transformer']['posembed_input']")):
      expected[path] = -1
    else:
      expected[path] = num_layers
  assert blocks == expected
  assert {path for path, b in blocks.items() if b == num_layers} == {
    "['Transformer']['encoder_norm']['bias']",
    "['Transformer']['encoder_norm']['scale']",
    "['head']['bias']",
    "['head']['kernel']",
  }
  assert sorted(set(blocks.values())) == [-1, *range(num_layers + 1)]


def test_mezo_bcd_trains_the_zero_head_and_never_the_embeddings():
  """From a zero head: the head block's steps move the head, the embeddings stay put."""
  model, params = model_lib.create("digits", NUM_CLASSES, key=jax.random.key(0))
  images = jax.random.normal(jax.random.key(2), (16, 8, 8, 1))
  labels = jnp.arange(16) % NUM_CLASSES
  logits = model_lib.make_logits(model)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
    logits(p, images), labels
  ).mean()
  opt = optimizers.make("mezo_bcd", 1e-2, refresh_every=1, seed=0)
  state = opt.tx.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.tx.update(None, s, p, value_fn=loss)
    return optax.apply_updates(p, updates), s

  num_blocks = model_lib.get_config("digits").num_layers + 1
  new = params
  for _ in range(2 * num_blocks):  # two epochs of random reshuffling: each block active twice
    new, state = step(new, state)
  assert float(jnp.abs(new["head"]["kernel"]).max()) > 0
  for frozen in ("embedding", "cls"):
    chex.assert_trees_all_equal(new[frozen], params[frozen])
  chex.assert_trees_all_equal(
    new["Transformer"]["posembed_input"], params["Transformer"]["posembed_input"]
  )
  assert float(loss(new)) < float(loss(params))
