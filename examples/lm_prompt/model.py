"""Decoder-only language models (OPT and the Llama family) as pure functions of a params pytree.

A zeroth-order optimizer sees the loss only as a function of a parameter pytree, so the model here
is a set of pure functions over plain nested dicts of arrays: no module objects, no mutable state,
no dropout (both perturbed losses of a ZO step must be the same function of the weights). The
numerics follow Hugging Face ``transformers`` (v5) closely enough that float32 logits agree with
PyTorch to float32 rounding (tests/test_lm_model.py):

* OPT (arXiv 2205.01068): learned positions with HF's offset of 2, the positions counted from the
  cumulative sum of the attention mask (so left padding does not shift them); pre-LN blocks
  (125m, 1.3b, ...) or the post-LN blocks of opt-350m with ``project_in``/``project_out`` between
  the 512-wide word embeddings and the 1024-wide decoder; LayerNorm with epsilon 1e-5; the queries
  scaled by ``head_dim ** -0.5`` before the score product, as HF does.
* The Llama family (arXiv 2302.13971, 2307.09288, 2407.21783): RMSNorm, SwiGLU MLP, rotary position
  embeddings (arXiv 2104.09864, HF's half-split layout, not interleaved) with rope scaling
  ``"linear"`` or ``"llama3"``, grouped-query attention (arXiv 2305.13245); Mistral (arXiv
  2310.06825) is the same layout with a sliding window, Qwen2 (arXiv 2407.10671) adds biases to
  q, k and v (not o), Qwen3 (arXiv 2505.09388) adds an RMSNorm on each query and key head before
  the rotation. Positions are ``cumsum(mask) - 1`` as in HF's ``generate``; RoPE scores depend only
  on position differences, so this matters only to rounding.

Parameter names follow HF's module names (``self_attn.q_proj``, ``mlp.gate_proj``, ...) with
flax's leaf names: a Linear is ``{"kernel": (in, out), "bias": (out,)}`` (HF stores the transposed
``(out, in)`` weight), a norm is ``{"scale", "bias"}``, an embedding table
``{"embedding": (V, D)}``.
An untied output head is ``{"lm_head": {"kernel": (E, V)}}``; a tied one reuses the token table.

Two layouts of the decoder layers are supported, told apart by the pytree itself:

* unrolled: ``params["layers"]`` is a list of per-layer dicts, run by a Python loop. Every layer's
  weights are separate leaves, so MeZO-BCD (arXiv 2501.19099) gets decoder layers as its default
  blocks from the tree structure alone, and the compiled program is a straight line of layers
  (simple HLO, easy to profile); compile time grows with the depth.
* scanned: ``params["layers"]`` is one dict of arrays stacked on a leading layer axis, run by
  ``jax.lax.scan``. Compile time does not depend on the depth, and a ZO step can perturb one
  layer's slice inside the scan body, so a perturbed copy of one layer, not of the whole model,
  is alive at a time (the memory of inference). Block-coordinate methods then have to slice the
  stacked leaves instead of picking whole leaves.

`stack_layers` and `unstack_layers` convert between them; both give the same logits up to float32
rounding. Which one the training program uses by default is left to it.

Precision: weights are cast to the compute dtype (by default the dtype of the token table) where
they are used; norms, the rotary embedding, the attention softmax and the logits are computed in
float32, and the residual stream is kept in the compute dtype, as HF does for bf16 models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

FAMILIES = ("opt", "llama")
ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = {
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
# Added to the scores of masked keys. Finite, so a query whose keys are all masked (a padded row
# under left padding) gets a uniform softmax instead of NaN.
_MASKED_SCORE = -1e30


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder-only language model, normalised from a Hugging Face config.

  Frozen and hashable, so it can be a static argument of `jax.jit`. Build one from a
  ``config.json`` with `examples.lm_prompt.checkpoint.load_config` or directly for a model trained
  from scratch.

  Attributes:
    family: ``"opt"`` or ``"llama"`` (Llama, Mistral, Qwen2, Qwen3).
    vocab_size: rows of the token table.
    hidden_size: width of the residual stream.
    num_layers: number of decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when below ``num_heads``).
    head_dim: width of one head (``hidden_size // num_heads`` unless the checkpoint says else).
    intermediate_size: width of the MLP (OPT's ``ffn_dim``).
    max_positions: OPT: rows of the learned position table (without the offset of 2). Llama: the
      context length the model was trained for (informational; RoPE has no table).
    norm_eps: epsilon of every LayerNorm (OPT) or RMSNorm (Llama family).
    activation: MLP activation, an HF name (``"relu"``, ``"silu"``, ``"gelu"``, ``"gelu_new"``).
    tie_word_embeddings: the output head reuses the token table (no ``lm_head`` params).
    qkv_bias: q, k and v projections have biases (OPT's ``enable_bias``, Qwen2, Llama's
      ``attention_bias``).
    out_bias: the attention output projection has a bias (OPT, Llama's ``attention_bias``).
    mlp_bias: the MLP projections have biases (OPT, Llama's ``mlp_bias``).
    do_layer_norm_before: OPT only: pre-LN blocks (True) or the post-LN blocks of opt-350m.
    final_norm: OPT only: a final LayerNorm after the last layer (pre-LN OPT models have one).
    word_embed_proj_dim: OPT only: width of the token table when it differs from
      ``hidden_size`` (opt-350m: 512); ``project_in`` and ``project_out`` map between them.
    rope_theta: RoPE base.
    rope_type: ``"default"``, ``"linear"`` (positions divided by ``rope_factor``) or ``"llama3"``.
    rope_factor: scaling factor of ``"linear"`` and ``"llama3"``.
    rope_low_freq_factor: ``"llama3"`` only.
    rope_high_freq_factor: ``"llama3"`` only.
    rope_original_max_positions: ``"llama3"`` only: the pre-extension context length.
    qk_norm: Qwen3: an RMSNorm over ``head_dim`` on each query and key head before the rotation.
    sliding_window: attention window (Mistral; Qwen when it uses one), or None. Sequences no longer
      than the window are unaffected by it; longer ones raise an error (not implemented).
    model_type: the HF ``model_type`` this config came from (informational).
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_positions: int
  norm_eps: float
  activation: str
  tie_word_embeddings: bool
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  do_layer_norm_before: bool = True
  final_norm: bool = True
  word_embed_proj_dim: int | None = None
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  qk_norm: bool = False
  sliding_window: int | None = None
  model_type: str = ""

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.family == "opt" and self.num_kv_heads != self.num_heads:
      raise ValueError("OPT has no grouped-query attention: num_kv_heads must equal num_heads")
    if self.family == "llama" and self.word_embed_proj_dim not in (None, self.hidden_size):
      raise ValueError("word_embed_proj_dim is an OPT setting")

  @property
  def embed_dim(self) -> int:
    """Width of the token table and of the output head's input."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def projects_embeddings(self) -> bool:
    """Whether ``project_in``/``project_out`` exist (OPT with a narrower token table)."""
    return self.embed_dim != self.hidden_size


# --- Parameters -----------------------------------------------------------------------------------


def _dense_shapes(n_in: int, n_out: int, bias: bool) -> dict:
  shapes = {"kernel": (n_in, n_out)}
  if bias:
    shapes["bias"] = (n_out,)
  return shapes


def _layer_shapes(config: DecoderConfig) -> dict:
  d, f = config.hidden_size, config.intermediate_size
  q_width = config.num_heads * config.head_dim
  kv_width = config.num_kv_heads * config.head_dim
  attn = {
    "q_proj": _dense_shapes(d, q_width, config.qkv_bias),
    "k_proj": _dense_shapes(d, kv_width, config.qkv_bias),
    "v_proj": _dense_shapes(d, kv_width, config.qkv_bias),
  }
  if config.family == "opt":
    attn["out_proj"] = _dense_shapes(q_width, d, config.out_bias)
    norm = {"scale": (d,), "bias": (d,)}
    return {
      "self_attn": attn,
      "self_attn_layer_norm": dict(norm),
      "fc1": _dense_shapes(d, f, config.mlp_bias),
      "fc2": _dense_shapes(f, d, config.mlp_bias),
      "final_layer_norm": dict(norm),
    }
  attn["o_proj"] = _dense_shapes(q_width, d, config.out_bias)
  if config.qk_norm:
    attn["q_norm"] = {"scale": (config.head_dim,)}
    attn["k_norm"] = {"scale": (config.head_dim,)}
  return {
    "input_layernorm": {"scale": (d,)},
    "self_attn": attn,
    "post_attention_layernorm": {"scale": (d,)},
    "mlp": {
      "gate_proj": _dense_shapes(d, f, config.mlp_bias),
      "up_proj": _dense_shapes(d, f, config.mlp_bias),
      "down_proj": _dense_shapes(f, d, config.mlp_bias),
    },
  }


def _shapes(config: DecoderConfig) -> dict:
  """The unrolled params tree with shape tuples as leaves."""
  d, e = config.hidden_size, config.embed_dim
  tree: dict[str, Any] = {"embed_tokens": {"embedding": (config.vocab_size, e)}}
  if config.family == "opt":
    tree["embed_positions"] = {"embedding": (config.max_positions + 2, d)}
    if config.projects_embeddings:
      tree["project_in"] = {"kernel": (e, d)}
      tree["project_out"] = {"kernel": (d, e)}
    if config.final_norm:
      tree["final_layer_norm"] = {"scale": (d,), "bias": (d,)}
  else:
    tree["norm"] = {"scale": (d,)}
  tree["layers"] = [_layer_shapes(config) for _ in range(config.num_layers)]
  if not config.tie_word_embeddings:
    tree["lm_head"] = {"kernel": (e, config.vocab_size)}
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def param_shapes(config: DecoderConfig, dtype=jnp.float32, scan_layers: bool = False) -> Params:
  """The params tree of `config` with `jax.ShapeDtypeStruct` leaves (nothing allocated).

  Args:
    config: the architecture.
    dtype: dtype of every leaf.
    scan_layers: the scanned layout (layers stacked on a leading axis) instead of the unrolled one.

  Returns:
    A pytree with the structure `init_params` and the checkpoint loader return.
  """
  shapes = _shapes(config)
  if scan_layers:
    layer = shapes["layers"][0]
    shapes["layers"] = jax.tree.map(lambda s: (config.num_layers, *s), layer, is_leaf=_is_shape)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=_is_shape)


def init_params(
  config: DecoderConfig,
  key: jax.Array,
  dtype=jnp.float32,
  scan_layers: bool = False,
  std: float = 0.02,
) -> Params:
  """Random parameters: normal(0, std) weights and embeddings, zero biases, unit norm scales.

  This is HF's initialisation (``initializer_range`` 0.02) for OPT and Llama.

  Args:
    config: the architecture.
    key: a `jax.random.key`.
    dtype: dtype of every leaf.
    scan_layers: return the scanned layout (see the module docstring).
    std: standard deviation of the weights and embeddings.

  Returns:
    The params pytree.

  Example:
    >>> cfg = DecoderConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2,
    ...   num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=32, max_positions=128,
    ...   norm_eps=1e-6, activation="silu", tie_word_embeddings=True)
    >>> params = init_params(cfg, jax.random.key(0))
    >>> forward(params, cfg, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5))).shape
    (2, 5, 16)
  """
  shapes = param_shapes(config, dtype, scan_layers)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(leaves))
  values = []
  for (path, leaf), k in zip(leaves, keys):
    name = path[-1].key
    if name == "scale":
      values.append(jnp.ones(leaf.shape, dtype))
    elif name == "bias":
      values.append(jnp.zeros(leaf.shape, dtype))
    else:
      values.append((std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, values)


def param_count(params: Params) -> int:
  """Number of scalars in a params pytree (either layout; a tied head is counted once)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def stack_layers(params: Params) -> Params:
  """Unrolled layout -> scanned layout: the list of layer dicts becomes one dict of stacked arrays.

  Args:
    params: params with ``params["layers"]`` a list (or tuple) of per-layer dicts.

  Returns:
    A new params dict whose ``"layers"`` leaves have a leading axis of length ``num_layers``.
  """
  layers = params["layers"]
  if not isinstance(layers, list | tuple):
    raise ValueError("params['layers'] is already stacked (a dict of arrays)")
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: Params) -> Params:
  """Scanned layout -> unrolled layout (inverse of `stack_layers`).

  Args:
    params: params with ``params["layers"]`` a dict of arrays stacked on a leading layer axis.

  Returns:
    A new params dict whose ``"layers"`` is a list of per-layer dicts.
  """
  layers = params["layers"]
  if isinstance(layers, list | tuple):
    raise ValueError("params['layers'] is already a list of per-layer dicts")
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]}


def matrix_dimension_numbers(params: Params) -> Any:
  """The matrix view of every leaf for zojax's per-matrix methods (``weight_dimension_numbers=``).

  ZO-Muon, ZO-MOPI, LOZO and SubZero (`zojax.subspace`) treat each weight
  matrix on its own, as their PyTorch code treats each ``(out, in)`` weight:

  * a Linear kernel ``(in, out)``: reduction axis ``in``, output axis ``out``;
    stacked ``(layers, in, out)`` (the scanned layout): the same, with the
    layer axis a batch axis, so each layer is its own matrix with its own
    basis;
  * a token or position table ``(V, D)``: output axis ``V``, reduction axis
    ``D``. PyTorch stores an embedding as ``(V, D)`` and the released code of
    these methods puts the ``out`` side (ZO-Muon's projection ``P``, LOZO's
    fresh factor) on its first axis, ``V``. It also keeps ZO-Muon's random
    coordinates ``D x r`` rather than ``V x r`` per query;
  * biases and norm scales (stacked or not): None, not matrices (ZO-SGD at the
    presets' vector learning rate).

  Args:
    params: decoder parameters, either layout (only names and ranks matter).

  Returns:
    A pytree of `optax.contrib.MuonDimensionNumbers` / None with the structure
    of ``params``.
  """
  from optax.contrib import MuonDimensionNumbers

  def view(path, x):
    name = getattr(path[-1], "key", None)
    if name == "kernel":
      return MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
    if name == "embedding":
      return MuonDimensionNumbers(reduction_axis=1, output_axis=0)
    return None

  return jax.tree_util.tree_map_with_path(view, params)


# --- Building blocks ------------------------------------------------------------------------------


def _dense(p: dict, x: jax.Array) -> jax.Array:
  y = x @ p["kernel"].astype(x.dtype)
  if "bias" in p:
    y = y + p["bias"].astype(x.dtype)
  return y


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


def _rms_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (p["scale"].astype(jnp.float32) * y).astype(x.dtype)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
  """Inverse frequencies of the rotary embedding, ``(head_dim // 2,)`` float32, scaling applied.

  ``"linear"`` divides them all by ``rope_factor``; ``"llama3"`` divides the low frequencies
  (wavelength above ``original / low_freq_factor``) by ``rope_factor``, keeps the high ones
  (wavelength below ``original / high_freq_factor``) and interpolates smoothly in between, as
  Llama 3.1 does (arXiv 2407.21783).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    old_len = config.rope_original_max_positions
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return np.asarray(inv_freq, np.float32)


def _rope_tables(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin, ``(B, T, 1, head_dim)`` float32, for HF's half-split rotation."""
  inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _attention(p: dict, config: DecoderConfig, x: jax.Array, allowed: jax.Array, rope) -> jax.Array:
  b, t, _ = x.shape
  h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  scaling = hd**-0.5
  q = _dense(p["q_proj"], x)
  if config.family == "opt":
    q = q * jnp.asarray(scaling, q.dtype)  # HF OPT scales the queries before the product
  q = q.reshape(b, t, h, hd)
  k = _dense(p["k_proj"], x).reshape(b, t, kv, hd)
  v = _dense(p["v_proj"], x).reshape(b, t, kv, hd)
  if config.qk_norm:
    q = _rms_norm(p["q_norm"], q, config.norm_eps)
    k = _rms_norm(p["k_norm"], k, config.norm_eps)
  if rope is not None:
    q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
  # Query head j uses key/value head j // (h // kv), as HF's repeat_kv does.
  q = q.reshape(b, t, kv, h // kv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  if config.family != "opt":
    scores = scores * scaling
  scores = jnp.where(allowed[:, None, None], scores, _MASKED_SCORE)
  probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * hd)
  return _dense(p["out_proj" if config.family == "opt" else "o_proj"], out)


def _opt_layer(p: dict, config: DecoderConfig, x: jax.Array, allowed: jax.Array) -> jax.Array:
  act = _ACTIVATIONS[config.activation]
  pre = config.do_layer_norm_before
  eps = config.norm_eps
  residual = x
  if pre:
    x = _layer_norm(p["self_attn_layer_norm"], x, eps)
  x = residual + _attention(p["self_attn"], config, x, allowed, None)
  if not pre:
    x = _layer_norm(p["self_attn_layer_norm"], x, eps)
  residual = x
  if pre:
    x = _layer_norm(p["final_layer_norm"], x, eps)
  x = residual + _dense(p["fc2"], act(_dense(p["fc1"], x)))
  if not pre:
    x = _layer_norm(p["final_layer_norm"], x, eps)
  return x


def _llama_layer(p: dict, config: DecoderConfig, x: jax.Array, allowed: jax.Array, rope):
  act = _ACTIVATIONS[config.activation]
  eps = config.norm_eps
  x = x + _attention(p["self_attn"], config, _rms_norm(p["input_layernorm"], x, eps), allowed, rope)
  y = _rms_norm(p["post_attention_layernorm"], x, eps)
  mlp = p["mlp"]
  y = _dense(mlp["down_proj"], act(_dense(mlp["gate_proj"], y)) * _dense(mlp["up_proj"], y))
  return x + y


def _check_length(config: DecoderConfig, length: int):
  if config.sliding_window is not None and length > config.sliding_window:
    raise ValueError(
      f"sequence length {length} exceeds the sliding window ({config.sliding_window}) of this "
      f"{config.model_type or config.family} model; sliding-window attention is not implemented"
    )
  if config.family == "opt" and length > config.max_positions:
    raise ValueError(
      f"sequence length {length} exceeds OPT's {config.max_positions} learned positions"
    )


# --- Model ----------------------------------------------------------------------------------------


def forward(
  params: Params,
  config: DecoderConfig,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  compute_dtype=None,
) -> jax.Array:
  """Final hidden states of the decoder (after the final norm and OPT's ``project_out``).

  Args:
    params: the params pytree, unrolled or scanned layout.
    config: the architecture (static under `jax.jit`).
    input_ids: ``(B, T)`` integer token ids.
    attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding (left or right); None means no
      padding. Positions are counted over the real tokens only.
    compute_dtype: dtype of the matmuls and of the residual stream; None uses the dtype of the
      token table. Norms, softmax and rotary embedding are computed in float32 regardless.

  Returns:
    ``(B, T, E)`` hidden states in the compute dtype, ``E = config.embed_dim``. Rows of padded
    positions are finite but meaningless.

  Raises:
    ValueError: ``T`` exceeds the sliding window, or OPT's learned positions.
  """
  b, t = input_ids.shape
  _check_length(config, t)
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  mask = attention_mask.astype(bool)
  table = params["embed_tokens"]["embedding"]
  dtype = jnp.dtype(compute_dtype or table.dtype)
  x = table[input_ids].astype(dtype)
  cumsum = jnp.cumsum(mask.astype(jnp.int32), axis=1)
  allowed = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]

  if config.family == "opt":
    positions = jnp.where(mask, cumsum - 1, -1) + 2  # HF's OPTLearnedPositionalEmbedding
    if config.projects_embeddings:
      x = _dense(params["project_in"], x)
    x = x + params["embed_positions"]["embedding"][positions].astype(dtype)
    layer_fn = lambda p, h: _opt_layer(p, config, h, allowed)
  else:
    positions = jnp.where(mask, cumsum - 1, 1)  # HF generate's position_ids
    rope = _rope_tables(config, positions)
    layer_fn = lambda p, h: _llama_layer(p, config, h, allowed, rope)

  layers = params["layers"]
  if isinstance(layers, list | tuple):
    for p in layers:
      x = layer_fn(p, x)
  else:
    x, _ = jax.lax.scan(lambda h, p: (layer_fn(p, h), None), x, layers)

  if config.family == "opt":
    if config.final_norm:
      x = _layer_norm(params["final_layer_norm"], x, config.norm_eps)
    if config.projects_embeddings:
      x = _dense(params["project_out"], x)
  else:
    x = _rms_norm(params["norm"], x, config.norm_eps)
  return x


def logits(
  params: Params, config: DecoderConfig, hidden: jax.Array, token_ids: jax.Array | None = None
) -> jax.Array:
  """Output-head logits, float32, over the whole vocabulary or over a few tokens only.

  Args:
    params: the params pytree.
    config: the architecture.
    hidden: ``(..., E)`` hidden states from `forward`.
    token_ids: optional ``(k,)`` integer ids; only their k columns are computed, by gathering the
      head's rows first (a 2-way verbaliser does not pay for a 50k-vocabulary matmul).

  Returns:
    ``(..., V)``, or ``(..., k)`` when ``token_ids`` is given; float32.
  """
  if config.tie_word_embeddings:
    head = params["embed_tokens"]["embedding"]  # (V, E)
    if token_ids is not None:
      head = head[token_ids]
    return jnp.einsum(
      "...e,ve->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
  head = params["lm_head"]["kernel"]  # (E, V)
  if token_ids is not None:
    head = head[:, token_ids]
  return jnp.einsum(
    "...e,ev->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
  )


def label_logits(
  params: Params,
  config: DecoderConfig,
  input_ids: jax.Array,
  attention_mask: jax.Array | None,
  positions: jax.Array,
  token_ids: jax.Array,
  compute_dtype=None,
) -> jax.Array:
  """Logits of a few candidate tokens at one position per example (prompt-based classification).

  Args:
    params: the params pytree.
    config: the architecture.
    input_ids: ``(B, T)`` token ids.
    attention_mask: ``(B, T)`` padding mask (see `forward`).
    positions: ``(B,)`` index along T of the position whose next-token distribution is scored
      (usually the last real token of each prompt).
    token_ids: ``(k,)`` ids of the candidate tokens (the verbaliser).
    compute_dtype: see `forward`.

  Returns:
    ``(B, k)`` float32 logits, equal to the ``token_ids`` columns of the full logits at
    ``positions``.
  """
  hidden = forward(params, config, input_ids, attention_mask, compute_dtype)
  picked = jnp.take_along_axis(hidden, positions[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return logits(params, config, picked, token_ids)


def causal_lm_loss(
  params: Params,
  config: DecoderConfig,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  loss_mask: jax.Array | None = None,
  compute_dtype=None,
) -> jax.Array:
  """Mean next-token cross-entropy (float32) over the selected target tokens.

  Token ``t`` is predicted from the hidden state at ``t - 1``. It counts when ``loss_mask[:, t]``
  is 1 and both ``t - 1`` and ``t`` are real tokens, so padding never contributes. This is HF's
  ``labels`` convention (labels are the input ids, shifted inside) with ``-100`` where the mask is
  0.

  Args:
    params: the params pytree.
    config: the architecture.
    input_ids: ``(B, T)`` token ids.
    attention_mask: ``(B, T)`` padding mask (see `forward`), None for no padding.
    loss_mask: ``(B, T)`` 1 on the target tokens to score (e.g. only the answer after a prompt);
      None scores every real token after the first.
    compute_dtype: see `forward`.

  Returns:
    Scalar float32 mean cross-entropy; 0 when no token is selected.
  """
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  if loss_mask is None:
    loss_mask = attention_mask
  hidden = forward(params, config, input_ids, attention_mask, compute_dtype)
  lg = logits(params, config, hidden[:, :-1])
  targets = input_ids[:, 1:]
  real = attention_mask.astype(jnp.float32)
  weight = loss_mask[:, 1:].astype(jnp.float32) * real[:, 1:] * real[:, :-1]
  target_logit = jnp.take_along_axis(lg, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jax.nn.logsumexp(lg, axis=-1) - target_logit
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
