"""Vision Transformer (ViT) in Flax linen, laid out like the official checkpoints.

Why linen: a zeroth-order optimizer only ever sees the loss as a pure function
of a parameter pytree, and linen gives exactly that, ``model.apply({"params":
p}, x)``, with the parameters held in a plain nested dict and nothing mutable
in the module. Linen's module names also map one-to-one onto the "/"-joined
names of the official ``.npz`` checkpoints, so `pretrained.load_npz` is a
rename-free reshaping of a flat dict.

Names, shapes and numerics follow google-research/vision_transformer
(``vit_jax/models_vit.py``, ``vit_jax/configs/models.py``), token classifier
only:

* ``embedding``: a ``patch x patch`` convolution with stride ``patch``
  (kernel HWIO ``(p, p, C, D)``, bias ``(D,)``); the grid of patch embeddings
  is flattened row-major and a learnt ``cls`` token ``(1, 1, D)`` prepended.
* ``Transformer/posembed_input/pos_embedding`` ``(1, 1 + N, D)`` added to all
  tokens (cls row first).
* ``Transformer/encoderblock_{i}``: pre-LN residual blocks. The sub-module
  names ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``
  and ``MlpBlock_3`` (with ``Dense_0``, ``Dense_1``) are those stored in the
  ``.npz`` files: the checkpoints predate linen, whose per-class counters
  would say ``MultiHeadDotProductAttention_0``, and the official loader
  renames them with ``flax.training.checkpoints.convert_pre_linen``. Here the
  names are given explicitly, so no renaming is needed.
* Attention kernels ``query``/``key``/``value`` ``(D, heads, D // heads)``
  with biases ``(heads, D // heads)``; ``out`` kernel ``(heads, D // heads,
  D)``, bias ``(D,)`` (flax's ``MultiHeadDotProductAttention``).
* ``Transformer/encoder_norm``, then the cls token's features, an optional
  ``pre_logits`` Dense + tanh (``representation_size``; some ImageNet-21k
  checkpoints carry one), and the ``head`` Dense, initialised to zero.

Numerics: every LayerNorm is flax's default, epsilon 1e-6 (models_vit.py calls
``nn.LayerNorm()`` with no epsilon); the MLP uses ``nn.gelu`` with its default
``approximate=True``, i.e. the tanh approximation (models_vit.py calls
``nn.gelu(x)``). Attention scales the queries by ``1 / sqrt(D // heads)``.
Official checkpoints expect NHWC images scaled to ``[-1, 1]``, i.e.
``(pixel - 127.5) / 127.5`` (``vit_jax/input_pipeline.py``).

There is no dropout: the official fine-tuning configs of Ti/S/B set it to
zero. A zeroth-order estimator could use it only with one dropout mask shared
by every forward pass of a step (one key per step): both perturbed losses of
a finite difference must be the same function of the parameters, or the
masks' noise, divided by 2 eps, swamps the estimate (docs: Flax NNX page).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
  """Size of a ViT (token classifier).

  Attributes:
    hidden_size: token width ``D``.
    mlp_dim: hidden width of each MLP block.
    num_heads: attention heads; must divide ``hidden_size``.
    num_layers: encoder blocks.
    patch_size: side of the square patches (the embedding conv's kernel and
      stride).
    image_size: default input resolution (square images); `create` and
      `pretrained.load_npz` accept another one.
    channels: input channels (3 for RGB checkpoints).
    representation_size: width of the ``pre_logits`` Dense + tanh layer, or
      None for none (the head then reads the encoder's cls features).
  """

  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  patch_size: int
  image_size: int
  channels: int = 3
  representation_size: int | None = None

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )


# Published sizes from vit_jax/configs/models.py (hidden_size, mlp_dim,
# num_heads, num_layers); 16 x 16 patches at 224 px, 3 channels.
CONFIGS: dict[str, Config] = {
  "Ti/16": Config(192, 768, 3, 12, patch_size=16, image_size=224),
  "S/16": Config(384, 1536, 6, 12, patch_size=16, image_size=224),
  "B/16": Config(768, 3072, 12, 12, patch_size=16, image_size=224),
  "L/16": Config(1024, 4096, 16, 24, patch_size=16, image_size=224),
  # Tiny model for unit tests: 16 px RGB, 4 x 4 patches -> 16 tokens + cls.
  "micro": Config(16, 32, 2, 2, patch_size=4, image_size=16),
  # scikit-learn's 8 x 8 grey digits, 2 x 2 patches -> 16 tokens + cls;
  # about 68k parameters with a 10-way head, trains in seconds on a CPU.
  "digits": Config(64, 128, 4, 2, patch_size=2, image_size=8, channels=1),
}


def get_config(config: str | Config) -> Config:
  """Returns ``config`` itself, or the entry of `CONFIGS` it names.

  Raises:
    ValueError: for a name not in `CONFIGS`.
  """
  if isinstance(config, Config):
    return config
  if config not in CONFIGS:
    raise ValueError(f"unknown ViT config {config!r}; choose one of: {', '.join(CONFIGS)}")
  return CONFIGS[config]


def grid_size(image_size: int, patch_size: int) -> int:
  """Patches along each side of a square image.

  Raises:
    ValueError: if ``patch_size`` does not divide ``image_size``.
  """
  if image_size < patch_size or image_size % patch_size:
    raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
  return image_size // patch_size


class AddPositionEmbs(nn.Module):
  """Adds a learnt ``pos_embedding`` of shape ``(1, tokens, D)`` to the tokens."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=0.02)
    pe = self.param("pos_embedding", init, (1, *x.shape[1:]), self.param_dtype)
    return x + pe.astype(x.dtype)


class MlpBlock(nn.Module):
  """``Dense_0 -> GELU (tanh approximation) -> Dense_1`` back to the input width."""

  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
      name=name,
    )
    y = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=True)
    return dense(x.shape[-1], "Dense_1")(y)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0", **kw)(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      force_fp32_for_softmax=True,  # no-op in float32; keeps bfloat16 softmax accurate
      name="MultiHeadDotProductAttention_1",
      **kw,
    )(y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_2", **kw)(x)
    return x + MlpBlock(self.mlp_dim, name="MlpBlock_3", **kw)(y)


class Encoder(nn.Module):
  """Position embeddings, ``num_layers`` blocks and the final ``encoder_norm``."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    for i in range(self.num_layers):
      x = EncoderBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}", **kw)(x)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm", **kw)(x)


class VisionTransformer(nn.Module):
  """ViT with a cls-token classifier; ``(B, H, W, C)`` images -> ``(B, classes)`` logits.

  Attributes:
    config: the model's size.
    num_classes: width of the ``head``.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); logits come out in it.
    param_dtype: dtype of the parameters created by ``init``.
  """

  config: Config
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding", **kw)(
      images
    )
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, d)), x], axis=1)
    x = Encoder(cfg.num_layers, cfg.mlp_dim, cfg.num_heads, name="Transformer", **kw)(x)
    x = x[:, 0]
    if cfg.representation_size is not None:
      x = jnp.tanh(nn.Dense(cfg.representation_size, name="pre_logits", **kw)(x))
    head = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      name="head",
      **kw,
    )
    return head(x)


def create(
  config: str | Config,
  num_classes: int,
  image_size: int | None = None,
  *,
  channels: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  key: jax.Array | None = None,
) -> tuple[VisionTransformer, Params]:
  """Builds a ViT and initialises its parameters (head at zero).

  Initialisers are the official ones: LeCun-normal patch embedding, zero cls
  token, N(0, 0.02) position embeddings, Xavier-uniform attention and MLP
  kernels, zero head.

  Args:
    config: a name from `CONFIGS` or a `Config`.
    num_classes: width of the head.
    image_size: square input resolution; defaults to ``config.image_size``.
      Sets the length of ``pos_embedding``.
    channels: input channels; defaults to ``config.channels``.
    dtype: compute dtype of the forward pass.
    param_dtype: dtype of the parameters (float32 by default, also under a
      bfloat16 ``dtype``).
    key: PRNG key of the initialisation; ``jax.random.key(0)`` if None.

  Returns:
    ``(model, params)``: the module and its ``params`` collection (a nested
    dict keyed like the official checkpoints).

  Raises:
    ValueError: for an unknown config name or an image size that is not a
      multiple of the patch size.
  """
  model, shape = _model_and_input(config, num_classes, image_size, channels, dtype, param_dtype)
  key = jax.random.key(0) if key is None else key
  params = jax.jit(model.init)(key, jnp.zeros(shape, jnp.float32))["params"]
  return model, params


def param_shapes(
  config: str | Config,
  num_classes: int,
  image_size: int | None = None,
  *,
  channels: int | None = None,
  param_dtype: Any = jnp.float32,
) -> Params:
  """The parameter tree as `jax.ShapeDtypeStruct` leaves, allocating nothing.

  Args:
    config: a name from `CONFIGS` or a `Config`.
    num_classes: width of the head.
    image_size: square input resolution; defaults to ``config.image_size``.
    channels: input channels; defaults to ``config.channels``.
    param_dtype: dtype of the parameters.

  Returns:
    The nested dict `create` would return, with shapes and dtypes only.

  Raises:
    ValueError: as `create`.
  """
  model, shape = _model_and_input(config, num_classes, image_size, channels, None, param_dtype)
  dummy = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter tree (arrays or shape structs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def make_logits(model: VisionTransformer) -> Callable[[Params, jax.Array], jax.Array]:
  """Returns the pure function ``logits(params, images)`` of ``model``.

  Args:
    model: a `VisionTransformer`.

  Returns:
    ``logits(params, images) -> (B, num_classes)``: ``params`` is the nested
    dict `create` or `pretrained.load_npz` returns, ``images`` a ``(B, H, W,
    C)`` batch at the resolution the params were built for.
  """

  def logits(params: Params, images: jax.Array) -> jax.Array:
    return model.apply({"params": params}, images)

  return logits


def _model_and_input(config, num_classes, image_size, channels, dtype, param_dtype):
  """The module and the shape of a one-image input batch."""
  cfg = get_config(config)
  size = cfg.image_size if image_size is None else image_size
  grid_size(size, cfg.patch_size)  # validates
  channels = cfg.channels if channels is None else channels
  model = VisionTransformer(
    cfg, num_classes, dtype=jnp.float32 if dtype is None else dtype, param_dtype=param_dtype
  )
  return model, (1, size, size, channels)
