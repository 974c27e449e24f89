"""Hugging Face checkpoints -> `examples.lm_prompt.model` params: config, weights and tokenizer.

A model directory is what ``save_pretrained`` writes (or a Hub snapshot): ``config.json``, the
weights as ``model.safetensors`` or as shards listed in ``model.safetensors.index.json``, and
``tokenizer.json`` for the fast tokenizer. PyTorch ``.bin`` files are not read.

Names: HF's ``OPTForCausalLM`` prefixes its tensors with ``model.decoder.``, the Llama family with
``model.``; base-model checkpoints (no head) have no prefix, and both are accepted. The rest of
each name is our params path with the leaf renamed (``kernel``, ``scale`` and ``embedding`` are
HF's ``weight``), so ``model.layers.3.self_attn.q_proj.weight`` is
``params["layers"][3]["self_attn"]["q_proj"]["kernel"]``, transposed: a Linear stores its weight as
``(out, in)``. A tied head has no ``lm_head.weight``; an untied one does. Rotary-embedding buffers
(``*.rotary_emb.inv_freq``) that older Llama checkpoints carry are skipped: they are recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples.lm_prompt import model as model_lib

SUPPORTED_MODEL_TYPES = ("opt", "llama", "mistral", "qwen2", "qwen3")
_PREFIXES = {"opt": ("model.decoder.", "decoder."), "llama": ("model.",)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# HF's per-model defaults for keys a config.json may leave out.
_TIE_DEFAULT = {"opt": True, "llama": False, "mistral": False, "qwen2": False, "qwen3": False}


def _rope_settings(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """RoPE fields of `DecoderConfig` from current or legacy config keys."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in model_lib.ROPE_TYPES:
    raise ValueError(
      f"{source}: rope type {rope_type!r} is not supported (supported: {model_lib.ROPE_TYPES})"
    )
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"{source}: partial_rotary_factor {partial} is not supported")
  out = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    out["rope_low_freq_factor"] = float(params["low_freq_factor"])
    out["rope_high_freq_factor"] = float(params["high_freq_factor"])
    out["rope_original_max_positions"] = int(
      params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    )
  return out


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
  window = hf.get("sliding_window")
  if model_type == "mistral" or window is None:
    return window
  if model_type in ("qwen2", "qwen3"):
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      return window if "sliding_attention" in layer_types else None
    if not hf.get("use_sliding_window", False):
      return None
    slides = hf.get("max_window_layers", 28) < hf["num_hidden_layers"]
    return window if slides else None
  return None


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> model_lib.DecoderConfig:
  """Normalise a Hugging Face config dict (the contents of ``config.json``) to a `DecoderConfig`.

  Args:
    hf: the config as a dict (``json.load`` of ``config.json``, or ``PretrainedConfig.to_dict()``).
    source: where it came from, for error messages.

  Returns:
    The `DecoderConfig`.

  Raises:
    ValueError: an unsupported ``model_type``, rope type or option.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"{source}: model_type {model_type!r} is not supported; supported model types: "
      f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
  tie = bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[model_type]))
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  common = dict(
    vocab_size=hf["vocab_size"],
    hidden_size=d,
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    max_positions=hf.get("max_position_embeddings", 2048),
    tie_word_embeddings=tie,
    model_type=model_type,
  )
  if model_type == "opt":
    if not hf.get("layer_norm_elementwise_affine", True):
      raise ValueError(f"{source}: OPT without elementwise-affine LayerNorms is not supported")
    pre = hf.get("do_layer_norm_before", True)
    bias = hf.get("enable_bias", True)
    proj = hf.get("word_embed_proj_dim") or d
    return model_lib.DecoderConfig(
      family="opt",
      num_kv_heads=heads,
      head_dim=d // heads,
      intermediate_size=hf["ffn_dim"],
      norm_eps=1e-5,  # torch.nn.LayerNorm's default; OPT's config does not set it
      activation=hf.get("activation_function", "relu"),
      qkv_bias=bias,
      out_bias=bias,
      mlp_bias=bias,
      do_layer_norm_before=pre,
      final_norm=pre and not hf.get("_remove_final_layer_norm", False),
      word_embed_proj_dim=proj if proj != d else None,
      **common,
    )
  attention_bias = hf.get("attention_bias", False)
  return model_lib.DecoderConfig(
    family="llama",
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or d // heads,
    intermediate_size=hf["intermediate_size"],
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    activation=hf.get("hidden_act", "silu"),
    qkv_bias=model_type == "qwen2" or (model_type != "mistral" and attention_bias),
    out_bias=model_type in ("llama", "qwen3") and attention_bias,
    mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
    qk_norm=model_type == "qwen3",
    sliding_window=_sliding_window(hf, model_type),
    **_rope_settings(hf, source),
    **common,
  )


def _require_dir(model_dir: str | os.PathLike) -> Path:
  path = Path(model_dir)
  if not path.is_dir():
    raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
  return path


def load_config(model_dir: str | os.PathLike) -> model_lib.DecoderConfig:
  """Read ``config.json`` from a model directory.

  Args:
    model_dir: a directory written by ``save_pretrained`` (or a Hub snapshot).

  Returns:
    The `DecoderConfig`.

  Raises:
    FileNotFoundError: the directory or its ``config.json`` is missing.
    ValueError: an unsupported model type or option (the message names the file).
  """
  path = _require_dir(model_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} not found: expected a Hugging Face config.json")
  with open(path) as f:
    return config_from_hf(json.load(f), source=str(path))


def _weight_files(model_dir: Path) -> tuple[dict[str, Path], str]:
  """Map of tensor name -> file holding it, and a description of where the names came from."""
  single = model_dir / "model.safetensors"
  index = model_dir / "model.safetensors.index.json"
  if single.is_file():
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}, str(single)
  if index.is_file():
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {}
    for name, shard in weight_map.items():
      files[name] = model_dir / shard
      if not files[name].is_file():
        raise FileNotFoundError(f"shard {str(files[name])!r} listed in {str(index)!r} is missing")
    return files, str(index)
  raise FileNotFoundError(
    f"no weights in {str(model_dir)!r}: expected model.safetensors or "
    "model.safetensors.index.json (PyTorch .bin checkpoints are not read)"
  )


def _expected(config: model_lib.DecoderConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
  """HF short name -> (our params path, HF shape) for every tensor of `config`."""
  shapes = model_lib.param_shapes(config)
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = _path_keys(path)
    name = ".".join(str(k) for k in keys[:-1]) + "." + _HF_LEAF[keys[-1]]
    shape = leaf.shape[::-1] if keys[-1] == "kernel" else leaf.shape
    expected[name] = (keys, tuple(shape))
  return expected


def _short_name(name: str, family: str) -> str:
  if name.startswith("lm_head."):
    return name
  for prefix in _PREFIXES[family]:
    if name.startswith(prefix):
      return name[len(prefix) :]
  return name


def _open_all(files: dict[str, Path]) -> Iterator[tuple[Path, Any]]:
  from safetensors import safe_open

  for file in sorted(set(files.values())):
    with safe_open(file, framework="flax") as handle:
      yield file, handle


def _path_keys(path) -> tuple:
  """A pytree key path as plain dict keys and list indices."""
  return tuple(k.key if hasattr(k, "key") else k.idx for k in path)


def load_params(
  model_dir: str | os.PathLike,
  config: model_lib.DecoderConfig,
  dtype=None,
  scan_layers: bool = False,
) -> model_lib.Params:
  """Read the safetensors weights of a model directory into our params pytree.

  Every tensor is checked before any is read: each one `config` implies must be present with its
  shape, and the files may hold nothing else (rotary ``inv_freq`` buffers aside). bf16 and other
  dtypes NumPy lacks are read through safetensors' flax backend.

  Args:
    model_dir: a directory with ``model.safetensors`` or ``model.safetensors.index.json``.
    config: the architecture, usually ``load_config(model_dir)``.
    dtype: cast every tensor to this dtype; None keeps the stored dtype (e.g. bf16).
    scan_layers: return the scanned layout (`examples.lm_prompt.model.stack_layers`).

  Returns:
    The params pytree, with arrays on JAX's default device.

  Raises:
    FileNotFoundError: the directory, its weights or a shard is missing.
    ValueError: a tensor is missing, extra or has the wrong shape (the message names the tensor
      and the file).
  """
  model_dir = _require_dir(model_dir)
  files, listing = _weight_files(model_dir)
  expected = _expected(config)
  family = config.family

  by_short: dict[str, str] = {}
  for name in files:
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    short = _short_name(name, family)
    if short in by_short:
      raise ValueError(f"tensor {name!r} appears twice (also as {by_short[short]!r}) in {listing}")
    by_short[short] = name
  tied_copy = by_short.pop("lm_head.weight", None) if config.tie_word_embeddings else None
  for short, name in by_short.items():
    if short not in expected:
      raise ValueError(
        f"unexpected tensor {name!r} in {str(files[name])!r}: not part of a {config.model_type} "
        f"model with this config.json (tie_word_embeddings={config.tie_word_embeddings})"
      )
  prefix = _PREFIXES[family][0] if family == "llama" else "model.decoder."
  for short in expected:
    if short not in by_short:
      full = short if short.startswith("lm_head.") else prefix + short
      raise ValueError(f"tensor {full!r} is missing from {listing}")

  values: dict[tuple, jax.Array] = {}
  for file, handle in _open_all(files):
    names = set(handle.keys())
    for short, (keys, shape) in expected.items():
      name = by_short[short]
      if files[name] != file:
        continue
      if name not in names:
        raise ValueError(f"tensor {name!r} is listed in {listing} but missing from {str(file)!r}")
      stored = tuple(handle.get_slice(name).get_shape())
      if stored != shape:
        raise ValueError(
          f"tensor {name!r} in {str(file)!r} has shape {stored}, expected {shape} from the config"
        )
      value = handle.get_tensor(name)
      if dtype is not None:
        value = value.astype(dtype)
      values[keys] = jnp.transpose(value) if keys[-1] == "kernel" else value
  params = jax.tree_util.tree_map_with_path(
    lambda path, _: values[_path_keys(path)], model_lib.param_shapes(config)
  )

  if tied_copy is not None:
    from safetensors import safe_open

    with safe_open(files[tied_copy], framework="flax") as handle:
      head = handle.get_tensor(tied_copy)
    table = params["embed_tokens"]["embedding"]
    if head.shape != table.shape or not np.array_equal(
      np.asarray(head, np.float32), np.asarray(table, np.float32)
    ):
      raise ValueError(
        f"tensor {tied_copy!r} in {str(files[tied_copy])!r} differs from the token embeddings, "
        "but config.json says tie_word_embeddings"
      )
  if scan_layers:
    params = model_lib.stack_layers(params)
  return params


def load_tokenizer(model_dir: str | os.PathLike):
  """The fast tokenizer of a model directory, ``tokenizers.Tokenizer.from_file("tokenizer.json")``.

  Args:
    model_dir: the model directory.

  Returns:
    A `tokenizers.Tokenizer`.

  Raises:
    FileNotFoundError: the directory or its ``tokenizer.json`` is missing.
  """
  from tokenizers import Tokenizer

  path = _require_dir(model_dir) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(
      f"{str(path)!r} not found: expected a fast-tokenizer tokenizer.json (slow tokenizers such "
      "as a bare vocab.json/merges.txt or tokenizer.model are not read)"
    )
  return Tokenizer.from_file(str(path))
