"""examples/lm_prompt/model.py against PyTorch ``transformers`` on tiny random checkpoints.

Each architecture of `tests.lm_fixtures` (OPT pre-LN, OPT-350m post-LN with project_in/out,
Llama with GQA, llama3 rope scaling, biases and an untied head, Qwen2 with qkv biases, Qwen3 with
qk-norm, Mistral with linear rope scaling) is saved with ``save_pretrained``, loaded with our
loader and run on a left-padded and a right-padded batch. Bound: on the real positions,
``max |ours - torch| <= 1e-5 * max(1, max |torch logits|)``. The logits are of order 3-25, float32
rounding differences measure 2e-7 to 4e-7 of that, and a wrong detail (the rope scaling type, the
linear rope factor, the LayerNorm epsilon 1e-5 vs 1e-3) moves them by 3e-4 to 0.5 of it.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures as fx

torch = fx.torch
from examples.lm_prompt import checkpoint, model  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  # Accelerators may run float32 matmuls at reduced precision by default; the bounds assume not.
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """arch -> (torch model, config, params), built on first use."""
  cache = {}

  def get(arch):
    if arch not in cache:
      directory = tmp_path_factory.mktemp(arch)
      hf = fx.save_hf_model(arch, directory)
      config = checkpoint.load_config(directory)
      cache[arch] = hf, config, checkpoint.load_params(directory, config)
    return cache[arch]

  return get


@jax.jit(static_argnums=1)
def _full_logits(params, config, ids, mask):
  return model.logits(params, config, model.forward(params, config, ids, mask))


@pytest.mark.parametrize("arch", fx.ARCHS)
def test_logits_match_transformers(saved, arch):
  """Float32 logits equal PyTorch's to 1e-5 of their scale, with left and with right padding."""
  hf, config, params = saved(arch)
  assert model.param_count(params) == sum(p.numel() for p in hf.parameters())
  for side in ("left", "right"):
    ids, mask = fx.padded_batch(side)
    ours = np.asarray(_full_logits(params, config, ids, mask))
    assert ours.dtype == np.float32 and ours.shape == (*ids.shape, fx.VOCAB)
    err = fx.max_scaled_error(ours, fx.hf_logits(hf, ids, mask), mask)
    assert err <= TOL, f"{arch} {side}: scaled error {err:.2e}"


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_left_padding_does_not_change_logits(saved, arch):
  """Positions are counted over real tokens: a left-padded row equals the row alone."""
  _, config, params = saved(arch)
  ids, mask = fx.padded_batch("left")
  batch = np.asarray(_full_logits(params, config, ids, mask))
  n = int(mask[1].sum())
  alone = np.asarray(_full_logits(params, config, ids[1:2, -n:], mask[1:2, -n:]))
  scale = max(1.0, np.abs(alone).max())
  assert np.abs(batch[1, -n:] - alone[0]).max() <= TOL * scale


@pytest.mark.parametrize("arch", ["opt_350m", "qwen3"])
def test_scanned_layout_matches_unrolled(saved, arch):
  """`stack_layers` (run by lax.scan) gives the unrolled logits up to float32 rounding (1e-6)."""
  _, config, params = saved(arch)
  stacked = model.stack_layers(params)
  assert isinstance(stacked["layers"], dict)
  assert jax.tree.leaves(stacked["layers"])[0].shape[0] == config.num_layers
  chex.assert_trees_all_equal(model.unstack_layers(stacked), params)
  ids, mask = fx.padded_batch("right")
  unrolled = np.asarray(_full_logits(params, config, ids, mask))
  scanned = np.asarray(_full_logits(stacked, config, ids, mask))
  assert np.abs(scanned - unrolled).max() <= 1e-6 * max(1.0, np.abs(unrolled).max())


@pytest.mark.parametrize("arch", ["opt", "mistral"])  # tied and untied heads
def test_label_logits_gather_full_logits(saved, arch):
  """label_logits equals the token columns of the full logits at each example's position."""
  _, config, params = saved(arch)
  ids, mask = fx.padded_batch("right")
  positions = mask.sum(axis=1) - 1  # last real token of each row
  tokens = jnp.array([5, 17, 3])
  got = model.label_logits(params, config, ids, mask, jnp.asarray(positions), tokens)
  full = np.asarray(_full_logits(params, config, ids, mask))
  want = full[np.arange(len(ids)), positions][:, np.asarray(tokens)]
  assert got.dtype == jnp.float32 and got.shape == (3, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["opt", "qwen2"])
def test_causal_lm_loss_matches_transformers(saved, arch):
  """Mean next-token cross-entropy equals HF's loss with labels -100 on padding (rel. 1e-5)."""
  hf, config, params = saved(arch)
  ids, mask = fx.padded_batch("right")
  labels = torch.from_numpy(np.where(mask == 1, ids, -100)).long()
  with torch.no_grad():
    want = hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), labels=labels)
  got = model.causal_lm_loss(params, config, ids, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want.loss.item(), rtol=1e-5)


def test_causal_lm_loss_scores_only_selected_tokens(saved):
  """loss_mask picks target tokens: the loss is the mean of their -log p from the full logits."""
  _, config, params = saved("llama")
  ids, mask = fx.padded_batch("left")
  loss_mask = np.zeros_like(mask)
  loss_mask[:, -2:] = 1  # the last two tokens of each row (row 2 has only two: one counts)
  lg = np.asarray(_full_logits(params, config, ids, mask), np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  terms = [-logp[b, t - 1, ids[b, t]] for b in range(3) for t in (7, 8) if mask[b, t - 1]]
  assert len(terms) == 5
  got = model.causal_lm_loss(params, config, ids, mask, loss_mask)
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  assert model.causal_lm_loss(params, config, ids, mask, np.zeros_like(mask)) == 0.0


def test_fully_padded_row_is_finite(saved):
  """A row with no real token gives finite hidden states (masking is finite, not -inf)."""
  _, config, params = saved("llama")
  ids, mask = fx.padded_batch("left")
  mask[2] = 0
  hidden = model.forward(params, config, ids, mask)
  chex.assert_tree_all_finite(hidden)
  chex.assert_tree_all_finite(model.causal_lm_loss(params, config, ids, mask))


def test_bf16_compute(saved):
  """bf16 compute from float32 weights: float32 logits within bf16 resolution of float32 ones.

  bf16 keeps 8 significant bits (rounding 2^-9 relative); about ten roundings in sequence
  through two layers give errors of a few 2^-8 of the logit scale. Bound: 0.05 of the scale
  (measured 0.006-0.009 over the six test architectures); a misread or misplaced weight moves
  logits by a large fraction of their scale.
  """
  _, config, params = saved("qwen3")
  ids, mask = fx.padded_batch("left")
  full = np.asarray(_full_logits(params, config, ids, mask))
  hidden = model.forward(params, config, ids, mask, compute_dtype=jnp.bfloat16)
  assert hidden.dtype == jnp.bfloat16
  low = model.logits(params, config, hidden)
  assert low.dtype == jnp.float32
  assert fx.max_scaled_error(low, full, mask) <= 0.05
  loss = model.causal_lm_loss(params, config, ids, mask, compute_dtype=jnp.bfloat16)
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize("arch", fx.ARCHS)
def test_init_params_matches_checkpoint_structure(saved, arch):
  """init_params builds the loader's tree (both layouts), with HF's initialisation."""
  _, config, params = saved(arch)
  fresh = model.init_params(config, jax.random.key(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh, params)
  scanned = model.init_params(config, jax.random.key(0), jnp.bfloat16, scan_layers=True)
  chex.assert_trees_all_equal_structs(scanned, model.stack_layers(params))
  assert jax.tree.leaves(scanned)[0].dtype == jnp.bfloat16
  assert model.param_count(scanned) == model.param_count(params)
  table = fresh["embed_tokens"]["embedding"]
  assert 0.015 < float(jnp.std(table)) < 0.025
  layer = fresh["layers"][0]
  norm = layer["input_layernorm" if config.family == "llama" else "final_layer_norm"]
  assert float(jnp.min(norm["scale"])) == 1.0 == float(jnp.max(norm["scale"]))


def test_tiny_model_from_scratch_runs_under_jit():
  """A DecoderConfig built by hand runs forward and loss under jit (pretraining from scratch)."""
  config = model.DecoderConfig(
    family="llama",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    intermediate_size=32,
    max_positions=128,
    norm_eps=1e-6,
    activation="silu",
    tie_word_embeddings=True,
  )
  params = model.init_params(config, jax.random.key(1), scan_layers=True)
  ids = jax.random.randint(jax.random.key(2), (2, 6), 0, 64)
  loss = jax.jit(model.causal_lm_loss, static_argnums=1)(params, config, ids)
  # Near-uniform predictions from a small init: the loss is close to log(vocab).
  assert abs(float(loss) - np.log(64)) < 0.1


def test_config_validation_and_sliding_window(saved):
  """Bad configs and sequences longer than the sliding window raise clear errors."""
  _, config, params = saved("mistral")
  short = dataclasses.replace(config, sliding_window=4)
  ids, mask = fx.padded_batch("right")
  with pytest.raises(ValueError, match="sliding window"):
    model.forward(params, short, ids, mask)
  with pytest.raises(ValueError, match="activation"):
    dataclasses.replace(config, activation="tanh")
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(config, num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type"):
    dataclasses.replace(config, rope_type="yarn")
  _, opt_config, opt_params = saved("opt")
  with pytest.raises(ValueError, match="learned positions"):
    model.forward(opt_params, dataclasses.replace(opt_config, max_positions=4), ids, mask)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_matrix_dimension_numbers(scan):
  """Kernels are (in, out) matrices (stacked: a batch of them), tables (V, D) have V as output."""
  from optax.contrib import MuonDimensionNumbers

  config = model.DecoderConfig(
    family="opt",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=4,
    intermediate_size=32,
    max_positions=128,
    norm_eps=1e-5,
    activation="relu",
    tie_word_embeddings=False,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
  )
  params = model.param_shapes(config, scan_layers=scan)
  dims = model.matrix_dimension_numbers(params)
  is_dn = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
  flat = {
    jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(dims, is_leaf=is_dn)
  }
  shapes = {
    jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  assert flat.keys() == shapes.keys()
  for name, dn in flat.items():
    ndim = len(shapes[name])
    if name.endswith("['kernel']"):
      assert dn == MuonDimensionNumbers(ndim - 2, ndim - 1), name
    elif name.endswith("['embedding']"):
      assert dn == MuonDimensionNumbers(reduction_axis=1, output_axis=0), name
    else:
      assert dn is None, name
  layer = "['layers']['fc1']['kernel']" if scan else "['layers'][0]['fc1']['kernel']"
  assert flat[layer] == MuonDimensionNumbers(1 if scan else 0, 2 if scan else 1)
  assert flat["['lm_head']['kernel']"] == MuonDimensionNumbers(0, 1)
