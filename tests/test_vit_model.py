"""The ViT example's model and official-checkpoint loader (examples/vit_cifar100).

Checkpoints here are random, written with the official names and shapes; the
forward pass is checked against a NumPy ViT written below from the raw arrays
(float64), and the position-embedding resize against a direct bilinear
formula and against `scipy.ndimage.zoom`, which the official loader calls.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import pretrained

POS = "Transformer/posembed_input/pos_embedding"
MICRO = model_lib.CONFIGS["micro"]
MICRO_REP = dataclasses.replace(MICRO, representation_size=8)


# --- The official layout, written out by hand (independent of the model) ----------------------


def official_shapes(cfg, num_classes, image_size, channels=3):
  """Name -> shape of an official ViT checkpoint with a token classifier."""
  d, m, h, p = cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.patch_size
  n = (image_size // p) ** 2
  shapes = {
    "cls": (1, 1, d),
    "embedding/kernel": (p, p, channels, d),
    "embedding/bias": (d,),
    POS: (1, 1 + n, d),
    "Transformer/encoder_norm/scale": (d,),
    "Transformer/encoder_norm/bias": (d,),
  }
  for i in range(cfg.num_layers):
    block = f"Transformer/encoderblock_{i}"
    for norm in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{block}/{norm}/scale"] = (d,)
      shapes[f"{block}/{norm}/bias"] = (d,)
    attention = f"{block}/MultiHeadDotProductAttention_1"
    for proj in ("query", "key", "value"):
      shapes[f"{attention}/{proj}/kernel"] = (d, h, d // h)
      shapes[f"{attention}/{proj}/bias"] = (h, d // h)
    shapes[f"{attention}/out/kernel"] = (h, d // h, d)
    shapes[f"{attention}/out/bias"] = (d,)
    shapes[f"{block}/MlpBlock_3/Dense_0/kernel"] = (d, m)
    shapes[f"{block}/MlpBlock_3/Dense_0/bias"] = (m,)
    shapes[f"{block}/MlpBlock_3/Dense_1/kernel"] = (m, d)
    shapes[f"{block}/MlpBlock_3/Dense_1/bias"] = (d,)
  width = d
  if cfg.representation_size is not None:
    width = cfg.representation_size
    shapes["pre_logits/kernel"] = (d, width)
    shapes["pre_logits/bias"] = (width,)
  shapes["head/kernel"] = (width, num_classes)
  shapes["head/bias"] = (num_classes,)
  return shapes


def random_checkpoint(shapes, seed=0):
  """Small random float32 arrays: kernels ~ N(0, 1/fan_in), norms' scales ~ 1."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in shapes.items():
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("/scale"):
      x = 1.0 + 0.1 * x
    elif name.endswith("/kernel"):
      fan_in = shape[0] if "/query/" in name or "/key/" in name or "/value/" in name else None
      fan_in = fan_in or math.prod(shape[:-1])
      x = x / np.sqrt(fan_in)
    else:
      x = 0.1 * x
    arrays[name] = x
  return arrays


# --- An independent NumPy ViT forward pass --------------------------------------------------


def _layer_norm(x, w, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * w[f"{name}/scale"] + w[f"{name}/bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_logits(arrays, pos_embedding, images, cfg):
  """ViT logits in float64 from raw checkpoint arrays (``pos_embedding`` passed separately)."""
  w = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
  x = np.asarray(images, np.float64)
  b, size, _, c = x.shape
  p, d, h = cfg.patch_size, cfg.hidden_size, cfg.num_heads
  g = size // p
  patches = x.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, c)
  t = np.einsum("bnijc,ijcd->bnd", patches, w["embedding/kernel"]) + w["embedding/bias"]
  t = np.concatenate([np.broadcast_to(w["cls"], (b, 1, d)), t], axis=1)
  t = t + np.asarray(pos_embedding, np.float64)
  for i in range(cfg.num_layers):
    block = f"Transformer/encoderblock_{i}"
    att = f"{block}/MultiHeadDotProductAttention_1"
    y = _layer_norm(t, w, f"{block}/LayerNorm_0")
    q, k, v = (
      np.einsum("btd,dhk->bthk", y, w[f"{att}/{n}/kernel"]) + w[f"{att}/{n}/bias"]
      for n in ("query", "key", "value")
    )
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(d // h)
    o = np.einsum("bhqs,bshk->bqhk", _softmax(scores), v)
    t = t + np.einsum("bqhk,hkd->bqd", o, w[f"{att}/out/kernel"]) + w[f"{att}/out/bias"]
    y = _layer_norm(t, w, f"{block}/LayerNorm_2")
    mlp = f"{block}/MlpBlock_3"
    y = _gelu_tanh(y @ w[f"{mlp}/Dense_0/kernel"] + w[f"{mlp}/Dense_0/bias"])
    t = t + y @ w[f"{mlp}/Dense_1/kernel"] + w[f"{mlp}/Dense_1/bias"]
  feats = _layer_norm(t, w, "Transformer/encoder_norm")[:, 0]
  if "pre_logits/kernel" in w:
    feats = np.tanh(feats @ w["pre_logits/kernel"] + w["pre_logits/bias"])
  return feats @ w["head/kernel"] + w["head/bias"]


def bilinear_aligned(grid, n_out):
  """Resizes a ``(n, n, D)`` grid to ``(n_out, n_out, D)``, one output point at a time."""
  n_in = grid.shape[0]
  step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  out = np.zeros((n_out, n_out, grid.shape[2]))
  for a in range(n_out):
    for b in range(n_out):
      y, x = a * step, b * step
      y0, x0 = min(int(y), n_in - 1), min(int(x), n_in - 1)
      y1, x1 = min(y0 + 1, n_in - 1), min(x0 + 1, n_in - 1)
      wy, wx = y - y0, x - x0
      out[a, b] = (
        (1 - wy) * (1 - wx) * grid[y0, x0]
        + (1 - wy) * wx * grid[y0, x1]
        + wy * (1 - wx) * grid[y1, x0]
        + wy * wx * grid[y1, x1]
      )
  return out


def reference_pos_embedding(posemb, grid):
  """The cls row, then the grid rows resized with `bilinear_aligned`."""
  g = int(round(np.sqrt(posemb.shape[1] - 1)))
  old = np.asarray(posemb[0, 1:], np.float64).reshape(g, g, -1)
  new = bilinear_aligned(old, grid).reshape(1, grid * grid, -1)
  return np.concatenate([np.asarray(posemb[:, :1], np.float64), new], axis=1)


def _images(size, batch=2, channels=3, seed=1):
  return (
    np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
  )


def _with_head(params, arrays):
  """``params`` with the checkpoint's own head (the loader replaces it by zeros)."""
  head = {"kernel": jnp.asarray(arrays["head/kernel"]), "bias": jnp.asarray(arrays["head/bias"])}
  return {**params, "head": head}


# --- Fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ti16(tmp_path_factory):
  """A random ViT-Ti/16 checkpoint at 224 px with a 1000-way head."""
  arrays = random_checkpoint(official_shapes(model_lib.CONFIGS["Ti/16"], 1000, 224))
  path = tmp_path_factory.mktemp("ckpt") / "ViT-Ti_16.npz"
  np.savez(path, **arrays)
  return path, arrays


@pytest.fixture(scope="module")
def micro():
  """``(params, jitted logits)`` of a freshly created 4-class micro model."""
  model, params = model_lib.create("micro", 4, key=jax.random.key(3))
  return params, jax.jit(model_lib.make_logits(model))


def _write(tmp_path, arrays, name="ckpt.npz"):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


# --- Tests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "cfg,image_size,channels",
  [(MICRO, 16, 3), (MICRO_REP, 32, 3), (model_lib.CONFIGS["Ti/16"], 224, 3), ("digits", 8, 1)],
)
def test_parameter_names_and_shapes_are_the_official_ones(cfg, image_size, channels):
  cfg = model_lib.get_config(cfg)
  got = pretrained.flatten(model_lib.param_shapes(cfg, 7, image_size, channels=channels))
  assert {k: tuple(v.shape) for k, v in got.items()} == official_shapes(
    cfg, 7, image_size, channels
  )
  assert all(v.dtype == jnp.float32 for v in got.values())


@pytest.mark.parametrize(
  "name,sizes,published",
  [
    ("Ti/16", (192, 768, 3, 12), 5.7e6),
    ("S/16", (384, 1536, 6, 12), 22e6),
    ("B/16", (768, 3072, 12, 12), 86e6),
    ("L/16", (1024, 4096, 16, 24), 304e6),
  ],
)
def test_configs_have_the_published_sizes(name, sizes, published):
  cfg = model_lib.CONFIGS[name]
  assert (cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.num_layers) == sizes
  assert (cfg.patch_size, cfg.image_size, cfg.channels) == (16, 224, 3)
  count = model_lib.num_params(model_lib.param_shapes(name, 1000))
  assert count == sum(math.prod(s) for s in official_shapes(cfg, 1000, 224).values())
  assert abs(count - published) < 0.01 * published


def test_digits_config_is_small():
  count = model_lib.num_params(model_lib.param_shapes("digits", 10))
  assert 50_000 <= count <= 100_000


@pytest.mark.parametrize("image_size", [224, 32])
def test_forward_matches_numpy_reference(ti16, image_size):
  path, arrays = ti16
  cfg = model_lib.CONFIGS["Ti/16"]
  params = _with_head(pretrained.load_npz(path, "Ti/16", 1000, image_size), arrays)
  model = model_lib.VisionTransformer(cfg, 1000)
  images = _images(image_size)
  logits = jax.jit(model_lib.make_logits(model))(params, images)
  chex.assert_shape(logits, (2, 1000))
  posemb = reference_pos_embedding(arrays[POS], image_size // 16)
  loaded = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(np.asarray(loaded), posemb, atol=1e-6)
  expected = reference_logits(arrays, posemb, images, cfg)
  assert np.abs(expected).max() > 0.1  # a non-trivial comparison
  # float32 vs float64 differ by ~3e-6 here; exact (erf) GELU instead of the tanh
  # approximation would be off by ~1e-3, LayerNorm epsilon 1e-5 instead of 1e-6 by ~2e-4.
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)


def test_loaded_pos_embedding_is_the_bilinear_resize(ti16):
  path, arrays = ti16
  # 224 (same grid) and 32 px (14 x 14 -> 2 x 2) are checked with the forward pass above.
  for image_size, grid in [(384, 24), (16, 1)]:
    params = pretrained.load_npz(path, "Ti/16", 10, image_size)
    got = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    chex.assert_shape(got, (1, 1 + grid * grid, 192))
    np.testing.assert_allclose(got, reference_pos_embedding(arrays[POS], grid), atol=1e-6)
    np.testing.assert_array_equal(got[:, 0], arrays[POS][:, 0])  # the cls row is kept


@pytest.mark.parametrize("n_in,n_out", [(14, 2), (14, 24), (14, 1), (4, 7), (5, 5), (7, 3)])
def test_resize_matches_scipy_zoom_order_1(n_in, n_out):
  import scipy.ndimage  # what vit_jax/checkpoint.py uses; scipy comes with scikit-learn

  rng = np.random.default_rng(n_in * 100 + n_out)
  posemb = rng.standard_normal((1, 1 + n_in * n_in, 6))
  got = pretrained.resize_pos_embedding(posemb, 1 + n_out * n_out)
  grid = posemb[0, 1:].reshape(n_in, n_in, 6)
  zoomed = scipy.ndimage.zoom(grid, (n_out / n_in, n_out / n_in, 1), order=1)
  np.testing.assert_allclose(got[0, 1:], zoomed.reshape(n_out * n_out, 6), atol=1e-12)
  np.testing.assert_allclose(got, reference_pos_embedding(posemb, n_out), atol=1e-12)


def test_pre_logits_kept_when_configured_and_dropped_otherwise(tmp_path):
  arrays = random_checkpoint(official_shapes(MICRO_REP, 4, 16), seed=3)
  path = _write(tmp_path, arrays)
  # Kept: the forward pass goes through Dense + tanh.
  params = _with_head(pretrained.load_npz(path, MICRO_REP, 4), arrays)
  images = _images(16)
  logits = jax.jit(model_lib.make_logits(model_lib.VisionTransformer(MICRO_REP, 4)))(params, images)
  expected = reference_logits(arrays, arrays[POS], images, MICRO_REP)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
  # Dropped: the new head reads the encoder's D features.
  params = pretrained.load_npz(path, MICRO, 4)
  assert "pre_logits" not in params
  chex.assert_shape(params["head"]["kernel"], (MICRO.hidden_size, 4))


def test_missing_and_unexpected_names_are_reported(tmp_path):
  arrays = random_checkpoint(official_shapes(MICRO, 4, 16))
  old = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
  new = "Transformer/encoderblock_1/MlpBlock_3/Dense_9/kernel"
  arrays[new] = arrays.pop(old)
  with pytest.raises(ValueError) as err:
    pretrained.load_npz(_write(tmp_path, arrays), "micro", 4)
  assert f"{old}: missing from the checkpoint (model expects (16, 32))" in str(err.value)
  assert f"{new}: unexpected in the checkpoint (shape (16, 32))" in str(err.value)


def test_misshapen_parameter_is_reported_with_both_shapes(tmp_path):
  arrays = random_checkpoint(official_shapes(MICRO, 4, 16))
  name = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
  arrays[name] = np.zeros((16, 16), np.float32)
  with pytest.raises(ValueError, match="checkpoint has shape") as err:
    pretrained.load_npz(_write(tmp_path, arrays), "micro", 4)
  assert f"{name}: checkpoint has shape (16, 16), model expects (16, 2, 8)" in str(err.value)


def test_layer_count_mismatch_is_reported(tmp_path):
  # A 2-layer checkpoint for a 3-layer model, and a wider one for the micro model.
  arrays = random_checkpoint(official_shapes(MICRO, 4, 16))
  deeper = dataclasses.replace(MICRO, num_layers=3)
  with pytest.raises(ValueError, match="encoderblock_2/LayerNorm_0/scale: missing"):
    pretrained.load_npz(_write(tmp_path, arrays), deeper, 4)
  wide = random_checkpoint(official_shapes(dataclasses.replace(MICRO, hidden_size=32), 4, 16))
  with pytest.raises(ValueError, match=r"cls: checkpoint has shape \(1, 1, 32\), model expects"):
    pretrained.load_npz(_write(tmp_path, wide, "wide.npz"), "micro", 4)


def test_non_square_pos_embedding_is_reported(tmp_path):
  arrays = random_checkpoint(official_shapes(MICRO, 4, 16))
  arrays[POS] = arrays[POS][:, :-1]  # 15 grid tokens
  with pytest.raises(ValueError, match=f"{POS}: cannot resize .* square grid"):
    pretrained.load_npz(_write(tmp_path, arrays), "micro", 4, image_size=32)


def test_zero_head_gives_zero_logits(tmp_path, micro):
  _, logits_fn = micro
  arrays = random_checkpoint(official_shapes(MICRO, 1000, 16))
  params = pretrained.load_npz(_write(tmp_path, arrays), "micro", 4)
  chex.assert_trees_all_equal(params["head"], {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)})
  logits = logits_fn(params, _images(16))
  np.testing.assert_array_equal(np.asarray(logits), np.zeros((2, 4), np.float32))
  # A nonzero head does give nonzero logits through the same function.
  params["head"]["bias"] = jnp.ones(4)
  assert np.all(np.asarray(logits_fn(params, _images(16))) == 1.0)


def test_create_then_save_and_load_round_trip(tmp_path, micro):
  params, _ = micro
  chex.assert_trees_all_equal(params["head"], {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)})
  assert np.abs(np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])).max() > 0
  path = tmp_path / "ours.npz"
  pretrained.save_npz(path, params)
  with np.load(path) as archive:
    assert set(archive.files) == set(official_shapes(MICRO, 4, 16))
  loaded = pretrained.load_npz(path, "micro", 4)
  chex.assert_trees_all_equal(loaded, params)
  chex.assert_trees_all_equal_dtypes(loaded, params)


def test_bfloat16_forward_keeps_float32_params(micro):
  params, full_fn = micro
  shapes = jax.eval_shape(lambda: model_lib.create("micro", 4, dtype=jnp.bfloat16)[1])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  params = {
    **params,
    "head": {"kernel": jax.random.normal(jax.random.key(2), (16, 4)), "bias": jnp.zeros(4)},
  }
  images = _images(16)
  low_fn = jax.jit(model_lib.make_logits(model_lib.VisionTransformer(MICRO, 4, dtype=jnp.bfloat16)))
  low, full = low_fn(params, images), full_fn(params, images)
  assert (low.dtype, full.dtype) == (jnp.bfloat16, jnp.float32)
  scale = np.abs(np.asarray(full)).max()
  np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(full), atol=0.03 * scale)


def test_create_shapes_and_errors():
  model = model_lib.VisionTransformer(model_lib.CONFIGS["digits"], 10)
  shapes = jax.eval_shape(lambda: model_lib.create("digits", 10)[1])  # default 8 px, 1 channel
  chex.assert_shape(shapes["embedding"]["kernel"], (2, 2, 1, 64))
  chex.assert_shape(shapes["Transformer"]["posembed_input"]["pos_embedding"], (1, 17, 64))
  images = jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.float32)
  chex.assert_shape(jax.eval_shape(model_lib.make_logits(model), shapes, images), (3, 10))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    model_lib.create("micro", 3, image_size=18)
  with pytest.raises(ValueError, match="unknown ViT config"):
    model_lib.create("XXL/7", 3)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    model_lib.Config(10, 20, 3, 1, patch_size=2, image_size=4)
