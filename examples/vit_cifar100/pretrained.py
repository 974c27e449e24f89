"""Official ViT ``.npz`` checkpoints: load them for fine-tuning, save ours alike.

The checkpoints of google-research/vision_transformer are ``np.savez``
archives mapping "/"-joined parameter names (``embedding/kernel``,
``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``,
...) to float32 arrays; `model.VisionTransformer` uses the same names, so a
checkpoint is the model's parameter tree, flattened.

`load_npz` adapts a pretrained checkpoint to a fine-tuning model as the
official ``vit_jax/checkpoint.py:load_pretrained`` does:

* the checkpoint's ``head`` is dropped and a zero head of ``num_classes``
  outputs put in its place (``models_vit.py`` initialises heads to zero);
* ``pre_logits`` is kept only when the target config has a
  ``representation_size`` (it must then match the checkpoint's); with none,
  as in all the published fine-tuning configs, it is dropped (the official
  "drop-head variant") and the head reads the encoder's cls features
  directly;
* when the target resolution gives another patch grid, ``pos_embedding``
  keeps its cls row and its grid rows, seen as a ``(g, g, D)`` image, are
  resized to the new grid by linear interpolation with corners aligned:
  the behaviour of the ``scipy.ndimage.zoom(grid, zoom, order=1)`` call of the
  official loader, computed here in NumPy.

Everything else must be present with exactly the model's shape: any missing,
unexpected or misshapen parameter fails with a `ValueError` that names it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from examples.vit_cifar100 import model as model_lib

Params = dict[str, Any]
POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a nested parameter dict into ``{"a/b/c": leaf}``."""
  flat = {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      for sub, leaf in flatten(value).items():
        flat[f"{key}/{sub}"] = leaf
    else:
      flat[key] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten`: ``{"a/b/c": leaf}`` -> nested dicts."""
  tree: Params = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The ``(n_out, n_in)`` matrix of 1-D linear interpolation with corners aligned.

  Output sample ``i`` sits at input coordinate ``i * (n_in - 1) / (n_out - 1)``
  (coordinate 0 when ``n_out == 1``), as in ``scipy.ndimage.zoom(order=1)``
  with its default ``grid_mode=False``.

  Args:
    n_in: input length (>= 1).
    n_out: output length (>= 1).

  Returns:
    A float64 matrix whose rows are non-negative and sum to one.
  """
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  coords = np.arange(n_out) * scale
  lo = np.clip(np.floor(coords).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = coords - lo
  weights = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def resize_pos_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes a ``(1, 1 + g * g, D)`` position embedding to ``(1, num_tokens, D)``.

  The first (cls) row is kept; the others, a row-major ``g x g`` grid, are
  bilinearly resized (corners aligned) to the ``h x h`` grid with ``1 + h * h
  == num_tokens``.

  Args:
    posemb: the checkpoint's position embedding.
    num_tokens: token count of the target model, cls included.

  Returns:
    The resized embedding, in ``posemb``'s dtype.

  Raises:
    ValueError: if either token count is not one plus a square.
  """
  g_old = _square_side(posemb.shape[1] - 1, f"{POS_EMBEDDING} of shape {posemb.shape}")
  g_new = _square_side(num_tokens - 1, f"a model with {num_tokens} tokens")
  grid = posemb[0, 1:].reshape(g_old, g_old, -1).astype(np.float64)
  m = linear_resize_matrix(g_old, g_new)
  grid = np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(1, g_new * g_new, -1)
  return np.concatenate([posemb[:, :1], grid.astype(posemb.dtype)], axis=1)


def load_npz(
  path: str | os.PathLike | BinaryIO,
  config: str | model_lib.Config,
  num_classes: int,
  image_size: int | None = None,
  *,
  channels: int | None = None,
) -> Params:
  """Reads an official ViT checkpoint as fine-tuning parameters for our model.

  Args:
    path: the ``.npz`` file (a path or an open binary file).
    config: the target model, a name from `model.CONFIGS` or a `model.Config`.
    num_classes: width of the new, zero-initialised head.
    image_size: target resolution; defaults to ``config.image_size``. The
      position embedding is resized when its grid differs.
    channels: input channels; defaults to ``config.channels``.

  Returns:
    The nested parameter dict of ``model.create(config, num_classes,
    image_size)``, float32, with the checkpoint's weights and a zero head.

  Raises:
    ValueError: naming every parameter that is missing from the checkpoint,
      unexpected in it, of another shape than the model's (both shapes
      given), not floating-point or not finite; for a file that is not an
      ``.npz`` archive of arrays; or for an unknown config or an image size
      that is not a multiple of the patch size.
  """
  cfg = model_lib.get_config(config)
  expected = flatten(model_lib.param_shapes(cfg, num_classes, image_size, channels=channels))
  found = _read_npz(path)
  dropped = ("head/",) + (("pre_logits/",) if cfg.representation_size is None else ())

  params, problems = {}, []
  for name, spec in expected.items():
    if name.startswith("head/"):
      params[name] = np.zeros(spec.shape, spec.dtype)
    elif name not in found:
      problems.append(f"{name}: missing from the checkpoint (model expects {tuple(spec.shape)})")
    else:
      value = _fit(name, found[name], tuple(spec.shape), problems)
      if value is not None and not np.issubdtype(value.dtype, np.floating):
        problems.append(f"{name}: dtype {value.dtype}, expected floating-point weights")
      elif value is not None and not np.all(np.isfinite(value)):
        problems.append(f"{name}: holds NaN or infinite values")
      elif value is not None:
        params[name] = value.astype(spec.dtype)
  for name in sorted(found.keys() - expected.keys()):
    if not name.startswith(dropped):
      problems.append(
        f"{name}: unexpected in the checkpoint (shape {found[name].shape}); the model has no "
        "such parameter"
      )
  if problems:
    raise ValueError(
      f"checkpoint {path} does not fit ViT config {cfg} with {num_classes} classes:\n  "
      + "\n  ".join(problems)
    )
  return jax.tree.map(jnp.asarray, unflatten(params))


def _read_npz(path) -> dict[str, np.ndarray]:
  """The named arrays of an ``.npz`` file; ValueError naming ``path`` if it is not one.

  numpy's own message for a file that is not ``.npy``/``.npz`` speaks of
  ``allow_pickle``, which misleads: say what the file is instead.
  """
  if isinstance(path, (str, os.PathLike)):
    with open(path, "rb") as f:
      magic = f.read(6)
    if magic.startswith(b"\x93NUMPY"):
      raise ValueError(f"{path} is a single .npy array, not a .npz archive of named arrays")
    if not magic.startswith(b"PK"):
      raise ValueError(f"{path} is not a .npz archive of arrays (not a zip file)")
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    reason = "it holds object arrays, which are not loaded" if "pickle" in str(e) else str(e)
    raise ValueError(f"{path} is not a readable .npz archive of arrays ({reason})") from None


def save_npz(path: str | os.PathLike | BinaryIO, params: Mapping[str, Any]) -> None:
  """Writes parameters as an official-style checkpoint (``np.savez``, "/" names).

  Floating arrays are written as float32, like the published checkpoints.
  `numpy.savez` appends ``.npz`` to a path that lacks it.

  Args:
    path: destination file (a path or an open binary file).
    params: a nested parameter dict, e.g. from `model.create` or `load_npz`.
  """
  arrays = {}
  for name, leaf in flatten(params).items():
    leaf = np.asarray(jax.device_get(leaf))
    arrays[name] = leaf.astype(np.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  np.savez(path, **arrays)


def _fit(name: str, value: np.ndarray, shape: tuple[int, ...], problems: list[str]):
  """``value`` as the model's ``shape``, or None after recording why not."""
  if value.shape == shape:
    return value
  resizable = name == POS_EMBEDDING and value.ndim == 3 and value.shape[::2] == shape[::2]
  if resizable:
    try:
      return resize_pos_embedding(value, shape[1])
    except ValueError as err:
      problems.append(f"{name}: cannot resize {value.shape} to {shape}: {err}")
      return None
  problems.append(f"{name}: checkpoint has shape {value.shape}, model expects {shape}")
  return None


def _square_side(n: int, what: str) -> int:
  """The integer square root of ``n``; ValueError naming ``what`` if ``n`` is no square."""
  side = int(round(np.sqrt(max(n, 0))))
  if side < 1 or side * side != n:
    raise ValueError(f"{what}: {n} grid tokens do not form a square grid")
  return side
